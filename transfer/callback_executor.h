// Where user callbacks run: a dedicated thread (kThread mode) or the thread
// that calls RunPending (kManual mode). Never the worker that posts and polls.
#pragma once

#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace te {

class CallbackExecutor {
 public:
  using Callback = std::function<void()>;

  explicit CallbackExecutor(bool own_thread);
  ~CallbackExecutor();  // runs what is queued, then stops

  // Queues callbacks in order; empties `batch`.
  void Post(std::vector<Callback>* batch);
  void Post(Callback callback);
  // Runs queued callbacks on the calling thread (manual mode).
  bool RunPending();
  // Runs everything queued so far and stops the thread.
  void Shutdown();

 private:
  void Loop();

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Callback> queue_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace te
