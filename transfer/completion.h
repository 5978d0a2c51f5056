// How a request reports its end: exactly once, as done or as an error.
//
// Callbacks run on the engine's callback thread (or, in manual progress
// mode, inside TransferEngine::Progress on the caller's thread), never on
// the worker that posts and polls, so they may block briefly or submit more
// work. A CompletionCounter is the hot-path alternative: the worker bumps it
// directly, with no callback hop.
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
  // Returns false on timeout.
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
};

}  // namespace te
