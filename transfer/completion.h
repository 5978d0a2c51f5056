// How a request reports its end: exactly once, as done or as an error.
//
// Callbacks run on the engine's callback thread (or, in manual progress
// mode, inside TransferEngine::Progress on the caller's thread), so they may
// block briefly or submit more work. Two hot-path alternatives skip the hop
// to the callback thread:
//  - `on_worker = true` declares the callbacks cheap: they run on the worker
//    that posts and polls (or on a thread that holds the worker's role in
//    TransferEngine::DriveUntil or WaitImm), right after the completion is
//    read. They may
//    Submit, Send, ExpectImm, bump counters and notify other threads; they
//    must not block (no waits, no locks held for long, no I/O): every
//    request of the engine waits while one runs. A round of them (those
//    ready at one pass) that takes longer than
//    EngineOptions::slow_worker_callback is counted
//    (EngineStats::slow_worker_callbacks) and logged; WaitImm called on the
//    worker is refused with kInvalidArgument instead of deadlocking.
//  - a CompletionCounter: the worker bumps it directly, with no callback.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>

#include "base/status.h"

namespace te {

class CompletionCounter {
 public:
  uint64_t done() const { return done_.load(std::memory_order_acquire); }
  uint64_t failed() const { return failed_.load(std::memory_order_acquire); }
  uint64_t finished() const { return done() + failed(); }
  // The first error counted, OK if none.
  Status first_error() const {
    std::lock_guard<std::mutex> lock(mu_);
    return first_error_;
  }
  // Blocks until at least `n` requests finished (done or failed), or timeout.
  // Returns false on timeout. Polls (yielding) a few thousand times before
  // it sleeps in 20 us naps.
  bool WaitFinished(uint64_t n, std::chrono::nanoseconds timeout) const;

  // Engine side. The count is the last thing either touches, so the owner
  // may destroy the counter as soon as a wait sees its requests finished.
  void MarkDone();
  void MarkFailed(const Status& status);

 private:
  std::atomic<uint64_t> done_{0};
  std::atomic<uint64_t> failed_{0};
  mutable std::mutex mu_;
  Status first_error_;
};

struct Completion {
  std::function<void()> on_done;
  std::function<void(const Status&)> on_error;
  CompletionCounter* counter = nullptr;  // not owned; must outlive the request
  bool on_worker = false;                // callbacks are cheap: run them on the worker (above)
};

}  // namespace te
