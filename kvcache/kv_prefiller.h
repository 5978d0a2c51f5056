// KvPrefiller: one tensor-parallel rank of a prefill instance. It streams a
// request's KV cache, layer by layer as the model computes it, into the
// pages decode ranks allocated for it.
//
// The inference engine drives it:
//   Start(id, pages)         the request's pages in this rank's cache
//   LayerDone(id, layer)     layer's K/V are final: written out at once to
//                            every decode rank that has asked (PULL)
//   Finish(id, context)      after the last layer: the context (e.g. the
//                            last hidden state) goes to each decode rank
//                            with the request's immediate
// and learns through `on_sent` when a request's pages may be freed: every
// write of it completed, or it was cancelled or dropped.
//
// Decode ranks PULL (see kv_messages.h) before, during or after the
// compute; whatever layers are done when a PULL arrives go at once. A
// request stays here until Finish (or Abort) even when every write is out,
// so the engine's calls stay valid; if its decode ranks cancel or fail it,
// it goes at once and later calls answer kNotFound (Start: kCancelled),
// which tells the engine to stop computing it.
// One PagedWrite per layer per decode rank, and nothing is sent to say
// "done": the decoder counts immediates (kv_plan.h says how many).
//
// Cancellation: on CANCEL from a decode rank, nothing more is submitted to
// it; once every write already submitted has completed, CANCELLED carries
// how many immediates were delivered, so the decoder can wait for exactly
// those and only then reuse the pages.
//
// Failure: heartbeats go to every decode rank with work here; a decode rank
// silent for `peer_timeout`, or a write that fails, drops its part of the
// request (FAILED is sent to it, if it can still hear). Nothing waits
// forever: engine writes themselves fail within the engine's request
// timeout.
//
// Lifetime: the engine outlives the prefiller (it holds the engine's receive
// handler and a registration).
// Threads: the public methods are safe from any thread. The engine must run
// in ProgressMode::kThread. `on_sent` runs on an internal thread, outside
// the prefiller's lock; it may call the prefiller.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "base/status.h"
#include "kvcache/kv_layout.h"
#include "kvcache/kv_messages.h"
#include "kvcache/kv_plan.h"
#include "transfer/transfer_engine.h"

namespace te::kvcache {

struct PrefillerOptions {
  uint32_t context_slots = 64;  // requests whose context can be staged at once
  uint64_t context_bytes = 16384;
  std::chrono::milliseconds heartbeat_interval{100};
  std::chrono::milliseconds peer_timeout{2000};
  // How long a finished request waits for decode ranks that have not asked
  // for it yet; then it is dropped (on_sent reports kTimeout).
  std::chrono::milliseconds pull_timeout{10000};
  // The request's pages may be reused: OK when every decode rank got it,
  // else why not (cancelled, a dead decoder).
  std::function<void(uint64_t request, const Status& status)> on_sent;
  // A decode rank asked for a request this rank has not started (pull-driven
  // serving: the prefill engine may Start it now). Runs on the engine's
  // callback thread, outside the prefiller's lock, once per request.
  std::function<void(uint64_t request, size_t pages)> on_pull;
};

struct PrefillerStats {
  uint64_t requests_sent = 0;
  uint64_t requests_failed = 0;  // a decode rank failed or cancelled
  uint64_t writes = 0;
  uint64_t bytes = 0;
};

class KvPrefiller {
 public:
  // Bytes of `memory` Create needs: the cache, then the context staging.
  static uint64_t MemoryBytes(const KvLayout& layout, const PrefillerOptions& options);
  // `memory` (MemoryBytes) holds this rank's cache in `layout`'s order and
  // outlives the prefiller; it is registered here. Takes over the engine's
  // receive handler.
  static Result<std::unique_ptr<KvPrefiller>> Create(TransferEngine* engine, const KvLayout& layout, uint32_t rank,
                                                     uint8_t* memory, const PrefillerOptions& options = {});
  ~KvPrefiller();

  Status Start(uint64_t request, std::vector<uint32_t> pages);
  Status LayerDone(uint64_t request, uint32_t layer);
  // At most options.context_bytes, and no more than the decoder's context slot.
  Status Finish(uint64_t request, std::span<const uint8_t> context);
  // Drops the request here: decode ranks get FAILED.
  Status Abort(uint64_t request, const std::string& why);

  PrefillerStats stats() const;
  size_t active_requests() const;

 private:
  struct Dest;
  struct Request;
  KvPrefiller(TransferEngine* engine, const KvLayout& layout, uint32_t rank, uint8_t* memory,
              const PrefillerOptions& options);
  void OnMessage(const EngineAddress& from, std::span<const uint8_t> data);
  void OnPull(const EngineAddress& from, KvMessage m);
  // Records a checked PULL (or answers FAILED when `refuse` says why not);
  // true when the request is new here and on_pull should hear of it.
  bool AcceptPullLocked(const KvMessage& m, std::unique_ptr<Dest> dest, std::string refuse);
  // Submits what is ready, sends final messages, retires finished requests.
  void PumpLocked(uint64_t id, Request& r);
  // Submits layer `layer` (or the context) of request `id` to `d`.
  void SubmitLocked(uint64_t id, Request& r, Dest& d, bool context, uint32_t layer);
  void FailDestLocked(Dest& d, const std::string& why);
  void SendLocked(const PeerRef& peer, const KvMessage& m);
  void Run();

  TransferEngine* engine_;
  KvLayout layout_;
  uint32_t rank_;
  uint8_t* memory_;
  PrefillerOptions options_;
  LocalMr mr_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint64_t, std::unique_ptr<Request>> requests_;
  std::vector<uint32_t> free_context_slots_;
  std::map<std::string, std::chrono::steady_clock::time_point> last_heard_;  // by address hex
  std::vector<std::pair<uint64_t, Status>> sent_;                            // on_sent calls due
  // Recently retired requests, so that a late PULL gets FAILED, not silence.
  std::set<uint64_t> retired_;
  std::deque<uint64_t> retired_order_;
  PrefillerStats stats_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace te::kvcache
