#include "transfer/callback_executor.h"

#include "base/stop_and_join.h"

namespace te {

CallbackExecutor::CallbackExecutor(bool own_thread) {
  if (own_thread) thread_ = std::thread([this] { Loop(); });
}

CallbackExecutor::~CallbackExecutor() { Shutdown(); }

void CallbackExecutor::Post(std::vector<Callback>* batch) {
  if (batch->empty()) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (queue_.empty()) {
      queue_.swap(*batch);
    } else {
      for (auto& cb : *batch) queue_.push_back(std::move(cb));
    }
  }
  batch->clear();
  cv_.notify_one();
}

void CallbackExecutor::Post(Callback callback) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(std::move(callback));
  }
  cv_.notify_one();
}

bool CallbackExecutor::RunPending() {
  std::vector<Callback> batch;
  {
    std::lock_guard<std::mutex> lock(mu_);
    batch.swap(queue_);
  }
  for (auto& cb : batch) cb();
  return !batch.empty();
}

void CallbackExecutor::Loop() {
  std::vector<Callback> batch;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty() && stop_) return;
      batch.swap(queue_);
    }
    for (auto& cb : batch) cb();
    batch.clear();
  }
}

void CallbackExecutor::Shutdown() {
  StopAndJoin(mu_, cv_, stop_, thread_);
  // Callbacks queued after the thread left, or in manual mode.
  while (RunPending()) {
  }
}

}  // namespace te
