// StopAndJoin: the shutdown of a background thread that sleeps on a
// condition variable until there is work or it is told to stop.
#pragma once

#include <condition_variable>
#include <mutex>
#include <thread>

namespace te {

// Sets `stop` under `mu` (so the thread cannot miss it between checking and
// sleeping), wakes every waiter on `cv`, and joins `thread` if it runs.
// `Flag` is bool or std::atomic<bool>.
template <typename Flag>
void StopAndJoin(std::mutex& mu, std::condition_variable& cv, Flag& stop, std::thread& thread) {
  {
    std::lock_guard<std::mutex> lock(mu);
    stop = true;
  }
  cv.notify_all();
  if (thread.joinable()) thread.join();
}

}  // namespace te
