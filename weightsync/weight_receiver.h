// WeightReceiver: the inference side of a weight update. Owns nothing but
// the protocol: the weights live in a WeightsMemory (both slots registered
// with the engine), which the inference engine maps and reads.
//
// Protocol for version v (all control messages are engine Send/Recv):
//  1. Every source sends "BEGIN v n": n = the writes it will make here
//     (control_messages.h has the lines and their parsers).
//  2. On the first BEGIN of v the receiver raises header.begun to v (so
//     readers of slot v % 2 retry from now on), then answers READY; a source
//     writes only after READY. While an earlier version is still in flight,
//     the READY waits: v would overwrite the last complete version's slot.
//  3. With every source's BEGIN in, the receiver waits for sum(n) immediates
//     tagged with v. Then it publishes v. Nothing else is sent: the
//     immediates are the completion.
// A source that does not BEGIN within `timeout` of the first, or writes that
// stop arriving for `timeout` (a dead source), fail version v here: header.failed = v, and the previous
// version stays published and readable. A later version starts afresh, so a
// receiver that was down simply catches up on the next update.
//
// Memory: a WeightsMemory (Create), or the inference engine's own tensors
// by name (CreateNamed), in place or double buffered.
//
// Threads: the receiver runs its own thread (waiting for writes, publishing,
// calling on_version); BEGINs arrive on the engine's callback thread. Info()
// and published() are safe from any thread. The engine (kThread mode) and
// the WeightsMemory outlive the receiver.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "base/status.h"
#include "transfer/imm_ranges.h"
#include "transfer/transfer_engine.h"
#include "weightsync/control_messages.h"
#include "weightsync/named_tensors.h"
#include "weightsync/shard_layout.h"
#include "weightsync/weights_memory.h"

namespace te::weightsync {

struct ReceiverOptions {
  uint32_t imm_base = kWeightSyncImms.base;  // immediates: imm_base | (version & 0xffff)
  // Longer than the sources' PusherOptions::ready_timeout, so that a source
  // waiting on a dead receiver's READY does not fail the live ones.
  std::chrono::milliseconds timeout{10000};
  // Called on the receiver's thread after each version: OK, or why it failed.
  std::function<void(uint64_t version, const Status& status)> on_version;
};

class WeightReceiver {
 public:
  // `memory` must hold the rank's region (slot_bytes >= dst.RegionBytes(rank))
  // and outlive the receiver. Takes over the engine's receive handler.
  static Result<std::unique_ptr<WeightReceiver>> Create(TransferEngine* engine, const ShardLayout& dst, uint32_t rank,
                                                        uint32_t sources, WeightsMemory* memory,
                                                        const ReceiverOptions& options = {});
  // The same, landing in the caller's own tensors (named_tensors.h): one set
  // is in place (every version overwrites the same tensors: the inference
  // engine pauses reads from header().begun until published()), two are
  // double buffered (version v lands in set v % 2; the last complete version
  // stays intact while the next lands). Every tensor is registered with the
  // engine for the receiver's lifetime.
  static Result<std::unique_ptr<WeightReceiver>> CreateNamed(TransferEngine* engine, const ShardLayout& dst,
                                                             uint32_t rank, uint32_t sources,
                                                             const std::vector<TensorMap>& sets,
                                                             const ReceiverOptions& options = {});
  ~WeightReceiver();

  // What sources need (one line): rank, slot size, descriptor of both slots.
  std::string Info() const;
  uint64_t published() const { return memory_->published(); }
  // Versions begun, failed and completed (the WeightsMemory header, or the
  // receiver's own with CreateNamed).
  const WeightsHeader& header() const { return *memory_->header(); }

 private:
  WeightReceiver(TransferEngine* engine, uint32_t rank, uint32_t sources, uint64_t region_bytes, WeightsMemory* memory,
                 const ReceiverOptions& options)
      : engine_(engine),
        rank_(rank),
        sources_(sources),
        region_bytes_(region_bytes),
        memory_(memory),
        options_(options) {}
  struct Begin : BeginMessage {
    EngineAddress from;
  };
  static Result<std::unique_ptr<WeightReceiver>> Start(std::unique_ptr<WeightReceiver> r);
  void OnMessage(const EngineAddress& from, std::span<const uint8_t> data);
  std::string AcceptLocked(const Begin& begin);  // the reply; records the source
  void Reply(const EngineAddress& to, const std::string& reply);
  void Run();
  Status AwaitWrites(uint64_t version, uint64_t expected);

  TransferEngine* engine_;
  uint32_t rank_, sources_;
  uint64_t region_bytes_;                      // this rank's shards: every write lands at least one byte of them
  WeightsMemory* memory_;                      // the header, and with Create the slots
  std::unique_ptr<WeightsMemory> own_memory_;  // CreateNamed: holds the header only
  ReceiverOptions options_;
  std::vector<LocalMr> mrs_;  // what the sources write into
  std::string info_;

  struct Pending {
    std::set<uint32_t> sources;
    uint64_t expected = 0;
    std::chrono::steady_clock::time_point first_begin;
  };
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint64_t, Pending> pending_;  // by version
  std::vector<Begin> deferred_;          // BEGINs of versions after the one in flight
  // Bounds on both (a source is at most one version ahead of the receiver,
  // so more is a peer flooding it); DeferLocked and EvictHighestLocked keep
  // the lowest versions when full.
  static constexpr size_t kMaxPendingVersions = 8;
  size_t MaxDeferredBegins() const { return 16 * size_t(sources_) + 16; }
  bool DeferLocked(const Begin& begin);       // false: dropped
  bool EvictHighestLocked(uint64_t version);  // makes room for `version` in pending_
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace te::weightsync
