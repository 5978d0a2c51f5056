// WaitUntil: how every test waits. A condition, a deadline in wall-clock
// time, and an optional step run between checks (poll a domain, drive
// progress). Never an iteration count or a fixed sleep: a loaded machine
// slows the condition down, it does not make the test fail.
#pragma once

#include <algorithm>
#include <chrono>
#include <thread>

namespace te::testing {

// Checks `done` until it holds or `deadline` passes, running `step` between
// checks and napping from 10 us up to 1 ms. Returns done()'s last answer.
template <typename Pred, typename Step>
bool WaitUntil(Pred&& done, std::chrono::milliseconds deadline, Step&& step) {
  const auto end = std::chrono::steady_clock::now() + deadline;
  auto nap = std::chrono::microseconds(10);
  while (!done()) {
    if (std::chrono::steady_clock::now() >= end) return done();
    step();
    std::this_thread::sleep_for(nap);
    nap = std::min<std::chrono::microseconds>(nap * 2, std::chrono::milliseconds(1));
  }
  return true;
}

template <typename Pred>
bool WaitUntil(Pred&& done, std::chrono::milliseconds deadline) {
  return WaitUntil(std::forward<Pred>(done), deadline, [] {});
}

}  // namespace te::testing
