// KvDecoder: one tensor-parallel rank of a decode instance. It receives a
// request's KV cache into pages it allocated, straight from the prefill
// ranks that hold the heads it needs, and says when they are all there.
//
//   decoder->Receive(id, prefill_instance, pages, on_ready);
//   // ... prefill streams layer by layer ...
//   // on_ready(id, OK, context): every page of every layer and the context
//   // have landed; the pages belong to the decode engine again.
//
// Completion is counted, not announced: Receive computes how many
// immediates the request brings (kv_plan.h: every source's layers x tensors
// x pages x runs, plus the context) and expects exactly that many under the
// request's own immediate value (imm_base | a 24-bit tag).
//
// Cancel(id) asks every source to stop. `on_ready` then reports kCancelled,
// and only after every source confirmed and every write it delivered has
// landed: from then on nothing writes into those pages, and they may be
// reused. (If all data had landed first, on_ready reports OK instead.)
//
// Failure: heartbeats go to every prefill rank a request waits on. A source
// that fails the request (FAILED), cannot be reached with the PULL, or stays
// silent for `peer_timeout` fails it (a source never heard from gets the
// engine's request_timeout instead, since a first connection can be slow): the other sources are told to stop, and
// on_ready reports the error once they confirmed (or are silent too). A prefill rank that is alive but unreachable for
// peer_timeout could still be writing when on_ready reports its silence: that is the limit of any timeout-based
// detector.
//
// Lifetime: the engine outlives the decoder (it holds the engine's receive
// handler and a registration).
// Threads: public methods are safe from any thread; the engine must run in
// ProgressMode::kThread. `on_ready` runs exactly once per accepted Receive,
// on the engine's callback thread (success) or the decoder's own thread
// (everything else), outside the decoder's lock. `context` is valid only
// during the call. on_ready may call the decoder, but must not destroy it.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "base/callback_guard.h"
#include "base/status.h"
#include "kvcache/kv_layout.h"
#include "kvcache/kv_messages.h"
#include "transfer/imm_ranges.h"
#include "transfer/transfer_engine.h"

namespace te::kvcache {

struct DecoderOptions {
  uint32_t imm_base = kKvDecoderImms.base;  // low 24 bits must be zero (transfer/imm_ranges.h)
  uint32_t context_slots = 64;              // requests in flight at once
  uint64_t context_bytes = 16384;           // per request
  std::chrono::milliseconds heartbeat_interval{100};
  std::chrono::milliseconds peer_timeout{2000};
};

struct DecoderStats {
  uint64_t requests_ready = 0;
  uint64_t requests_cancelled = 0;
  uint64_t requests_failed = 0;
};

class KvDecoder {
 public:
  using ReadyCallback = std::function<void(uint64_t request, const Status& status, std::span<const uint8_t> context)>;

  // Bytes of `memory` Create needs: the cache, then the context slots.
  static uint64_t MemoryBytes(const KvLayout& layout, const DecoderOptions& options);
  // `memory` holds this rank's cache in `layout`'s order and outlives the
  // decoder; it is registered here. Takes over the engine's receive handler.
  static Result<std::unique_ptr<KvDecoder>> Create(TransferEngine* engine, const KvLayout& layout, uint32_t rank,
                                                   uint8_t* memory, const DecoderOptions& options = {});
  ~KvDecoder();  // fails requests still in flight with kCancelled

  // Asks `prefill`'s ranks for request `id` into `pages` (distinct, inside
  // the cache). Refused (on_ready never runs) when the layouts differ in
  // model shape, a page is bad, `id` is in flight, or every context slot is
  // taken (kUnavailable).
  Status Receive(uint64_t id, const KvInstanceInfo& prefill, std::vector<uint32_t> pages, ReadyCallback on_ready);
  Status Cancel(uint64_t id);

  const KvLayout& layout() const { return layout_; }
  DecoderStats stats() const;
  size_t active_requests() const;

 private:
  struct Source {
    PeerRef peer;
    std::string peer_hex;
    bool confirmed = false;  // CANCELLED/FAILED came, or it went silent
    bool silent = false;
    uint64_t delivered = 0;
  };
  struct Request {
    uint32_t tag = 0;
    uint32_t context_slot = 0;
    uint64_t expected = 0;
    uint64_t arrived = 0;                // immediates seen at the last heartbeat round
    std::map<uint32_t, Source> sources;  // by prefill rank
    bool stopping = false;               // cancelled or failed: waiting for sources
    Status outcome;                      // what on_ready reports when stopping
    std::chrono::steady_clock::time_point created, stop_since;
    ReadyCallback on_ready;
  };
  KvDecoder(TransferEngine* engine, const KvLayout& layout, uint32_t rank, uint8_t* memory,
            const DecoderOptions& options);
  uint32_t imm(uint32_t tag) const { return options_.imm_base | tag; }
  void OnMessage(const EngineAddress& from, std::span<const uint8_t> data);
  void OnArrived(uint64_t id, uint32_t tag);
  void OnPullFailed(uint64_t id, uint32_t tag, uint32_t source, const Status& e);
  // Starts stopping `r`: CANCEL to every source not yet confirmed.
  void StopLocked(uint64_t id, Request& r, Status outcome);
  // Retires stopping requests whose sources are all confirmed and whose
  // delivered writes have landed.
  void SweepLocked();
  void Run();
  std::span<const uint8_t> ContextOf(uint32_t slot) const;

  TransferEngine* engine_;
  KvLayout layout_;
  uint32_t rank_;
  uint8_t* memory_;
  DecoderOptions options_;
  LocalMr mr_;
  std::string descriptor_hex_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint64_t, Request> requests_;
  std::vector<uint32_t> free_context_slots_;
  std::map<uint32_t, uint64_t> tags_;  // tag -> request id, while in flight
  uint32_t next_tag_ = 1;
  std::map<std::string, std::chrono::steady_clock::time_point> last_heard_;
  std::vector<std::pair<Request, uint64_t>> due_;  // stopped requests to report (request, id)
  DecoderStats stats_;
  bool stop_ = false;
  std::thread thread_;
  CallbackGuard guard_;  // for engine callbacks that capture `this`
};

}  // namespace te::kvcache
