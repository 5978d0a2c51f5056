// WeightPusher: the trainer side of a weight update, one per source rank.
//
// Push(v) walks this rank's transfers of the Schedule in order, in buckets,
// and writes each bucket with ScatterWrites per receiver. The immediate is
// tagged with v. A transfer contiguous in the source region is written
// straight from it (the region is registered once, at Create, and stays
// registered: no copy); a strided one (re-sharding along another dimension)
// is gathered into registered staging memory first. The next bucket is
// gathered while earlier ones are on the wire, and staging never exceeds
// `staging_bytes` (the watermark): a bucket waits for the oldest one to
// complete before it reuses its memory. Before any write, every receiver is
// told how many writes to expect (BEGIN) and must answer READY
// (weight_receiver.h).
//
// A receiver that is absent, does not answer, refuses, or fails a write is
// reported in PushReport::missed with the reason. The others go on. It
// catches up on a later version: every version writes every byte.
//
// Where the receivers take bf16 parameters as fp8 (fp8_conversion.h), the
// pusher quantizes its shard of each such parameter when the parameter's
// first transfer comes up, into registered memory of its own, and writes
// codes and scales from there.
//
// Threads: one thread at a time calls SetReceiver and Push (they are not
// safe against each other); the receivers' READY answers arrive on the
// engine's callback thread and are handed to Push under the pusher's lock.
// The engine (kThread mode) and `region` (or the named tensors) outlive the
// pusher.
#pragma once

#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "base/status.h"
#include "transfer/imm_ranges.h"
#include "transfer/transfer_engine.h"
#include "weightsync/control_messages.h"
#include "weightsync/named_tensors.h"
#include "weightsync/schedule.h"
#include "weightsync/shard_layout.h"

namespace te::weightsync {

struct PusherOptions {
  uint64_t staging_bytes = 256 << 20;  // watermark: registered staging in use at once
  uint64_t bucket_bytes = 16 << 20;    // one gather + one write per receiver; >= the schedule's transfers
  // Write contiguous transfers straight from the (registered) source region
  // instead of copying them into staging. Off: every byte is staged.
  bool zero_copy = true;
  uint32_t imm_base = kWeightSyncImms.base;  // as the receivers' ReceiverOptions::imm_base
  // How long receivers get to answer BEGIN; keep it below the receivers'
  // ReceiverOptions::timeout. Writes time out through the engine's
  // request_timeout.
  std::chrono::milliseconds ready_timeout{2000};
};

struct PushReport {
  uint64_t version = 0;
  uint64_t bytes = 0;  // written to receivers that completed
  uint64_t writes = 0;
  double seconds = 0;
  std::map<uint32_t, std::string> missed;  // receiver rank -> why
  double quantize_seconds = 0;             // of `seconds`: bf16 -> fp8 on this rank
};

class WeightPusher {
 public:
  // `region` is this source rank's shards laid out as `src` says
  // (src.RegionBytes(rank) bytes); the pusher reads it during Push only, and
  // with zero_copy registers it with the engine for its lifetime. Takes
  // over the engine's receive handler.
  static Result<std::unique_ptr<WeightPusher>> Create(TransferEngine* engine, const Schedule& schedule,
                                                      const ShardLayout& src, uint32_t rank, const uint8_t* region,
                                                      const PusherOptions& options = {});
  // The same, reading this rank's shards from the training engine's own
  // tensors by name (named_tensors.h; host memory). With zero_copy each
  // tensor is registered with the engine for the pusher's lifetime.
  static Result<std::unique_ptr<WeightPusher>> CreateNamed(TransferEngine* engine, const Schedule& schedule,
                                                           const ShardLayout& src, uint32_t rank,
                                                           const TensorMap& tensors, const PusherOptions& options = {});
  ~WeightPusher();

  // Receiver `rank`'s WeightReceiver::Info(); empty marks it absent.
  // Re-setting it (a restarted receiver) takes effect at the next Push.
  Status SetReceiver(uint32_t rank, const std::string& info);

  Result<PushReport> Push(uint64_t version);

 private:
  // Where a source parameter's shard is read from: memory, and the
  // registration holding it (null without zero_copy) at an offset.
  struct SourceShard {
    const uint8_t* data = nullptr;
    LocalMr mr;
    uint64_t mr_offset = 0;
  };
  // A receiver's memory: per slot (version v lands in slot v % slots),
  // extents of its region, each a registered range of the receiver's.
  struct Extent {
    uint64_t offset = 0, length = 0;  // in the receiver's region (ShardLayout offsets)
    RemoteMr mr;
    uint64_t mr_offset = 0;
  };
  struct Landing {
    uint32_t slots = 0;  // 0: absent
    std::vector<Extent> extents[2];
    // The extent holding [offset, offset + length) of version's slot, or null.
    const Extent* Find(uint64_t version, uint64_t offset, uint64_t length) const;
    RemoteMr any() const;
  };

  WeightPusher(TransferEngine* engine, const Schedule& schedule, const ShardLayout& src, uint32_t rank,
               std::vector<SourceShard> shards, const PusherOptions& options)
      : engine_(engine), schedule_(schedule), src_(src), rank_(rank), shards_(std::move(shards)), options_(options) {}
  static Result<std::unique_ptr<WeightPusher>> Make(TransferEngine* engine, const Schedule& schedule,
                                                    const ShardLayout& src, uint32_t rank,
                                                    std::vector<SourceShard> shards, const PusherOptions& options);
  // bf16 -> fp8 codes and scales of this rank's shard of source `param`.
  Status Quantize(uint32_t param);

  static constexpr uint32_t kNone = ~0u;
  TransferEngine* engine_;
  Schedule schedule_;
  ShardLayout src_;
  uint32_t rank_;
  std::vector<SourceShard> shards_;  // per source parameter
  PusherOptions options_;
  uint32_t receivers_ = 0;
  std::vector<Landing> landings_;  // per receiver
  LocalMr staging_mr_;
  // Quantized parameters (fp8_conversion.h): codes and scales of this rank's
  // shards, at converted_at_[wire param]; fp8_of_[source param] = (codes,
  // scales) wire parameters, or kNone.
  LocalMr converted_mr_;
  std::vector<uint64_t> converted_at_;
  std::vector<std::pair<uint32_t, uint32_t>> fp8_of_;

  std::mutex mu_;
  std::condition_variable cv_;
  // Receiver rank -> its answer to the current version's BEGIN.
  std::map<uint32_t, AnswerMessage> answers_;  // by receiver rank, for asking_
  uint64_t asking_ = 0;                        // the version being begun
};

}  // namespace te::weightsync
