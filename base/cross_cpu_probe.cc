#include "base/cross_cpu_probe.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

namespace te {
namespace {

bool Pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(pthread_self(), sizeof(set), &set) == 0;
}

// One burst: `trips` round trips of a line between this thread (CPU 0) and
// a helper (CPU 1); each side waits for the other's value before writing.
// The first trip, which waits for the helper to start on its CPU, is not
// timed.
double Burst(uint32_t trips) {
  alignas(64) std::atomic<uint32_t> line{0};
  std::atomic<bool> helper_pinned{false};
  std::thread helper([&] {
    helper_pinned.store(Pin(1));
    for (uint32_t i = 0; i <= trips; ++i) {
      while (line.load(std::memory_order_acquire) != 2 * i + 1) {
      }
      line.store(2 * i + 2, std::memory_order_release);
    }
  });
  std::chrono::steady_clock::time_point start;
  for (uint32_t i = 0; i <= trips; ++i) {
    if (i == 1) start = std::chrono::steady_clock::now();
    line.store(2 * i + 1, std::memory_order_release);
    while (line.load(std::memory_order_acquire) != 2 * i + 2) {
    }
  }
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count() / trips;
  helper.join();
  return helper_pinned.load() ? ns : 0;
}

}  // namespace

double CrossCpuRoundTripNs() {
  cpu_set_t saved;
  if (pthread_getaffinity_np(pthread_self(), sizeof(saved), &saved) != 0) return 0;
  if (!CPU_ISSET(0, &saved) || !CPU_ISSET(1, &saved) || !Pin(0)) return 0;
  std::vector<double> bursts;
  for (int i = 0; i < 5; ++i) bursts.push_back(Burst(2000));
  pthread_setaffinity_np(pthread_self(), sizeof(saved), &saved);
  if (std::find(bursts.begin(), bursts.end(), 0.0) != bursts.end()) return 0;
  std::nth_element(bursts.begin(), bursts.begin() + 2, bursts.end());
  return bursts[2];
}

}  // namespace te
