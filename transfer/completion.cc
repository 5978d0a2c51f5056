#include "transfer/completion.h"

#include <thread>

namespace te {

// The counter increment is the last touch of the counter: once a waiter sees
// it, the owner may destroy the counter.
void CompletionCounter::MarkDone() { done_.fetch_add(1, std::memory_order_release); }

void CompletionCounter::MarkFailed(const Status& status) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (first_error_.ok()) first_error_ = status;
  }
  failed_.fetch_add(1, std::memory_order_release);
}

bool CompletionCounter::WaitFinished(uint64_t n, std::chrono::nanoseconds timeout) const {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  // atomic::wait has no timeout: wait in short slices, spinning first since
  // hot-path callers usually wait only microseconds.
  int spins = 0;
  while (finished() < n) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    if (++spins < 2000) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }
  return true;
}

}  // namespace te
