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

// One burst: `trips` round trips of a line between two threads pinned to
// CPUs 0 and 1; each side waits for the other's value before writing. The
// first trip, which waits for both threads to start on their CPUs, is not
// timed. Runs on threads of its own, so the caller's scheduling (its CPU,
// its affinity) is left as it was. 0 when a thread could not be pinned.
double Burst(uint32_t trips) {
  alignas(64) std::atomic<uint32_t> line{0};
  std::atomic<bool> pinned_b{false};
  double ns = 0;
  bool pinned_a = false;
  std::thread b([&] {
    pinned_b.store(Pin(1));
    for (uint32_t i = 0; i <= trips; ++i) {
      while (line.load(std::memory_order_acquire) != 2 * i + 1) {
      }
      line.store(2 * i + 2, std::memory_order_release);
    }
  });
  std::thread a([&] {
    pinned_a = Pin(0);
    std::chrono::steady_clock::time_point start;
    for (uint32_t i = 0; i <= trips; ++i) {
      if (i == 1) start = std::chrono::steady_clock::now();
      line.store(2 * i + 1, std::memory_order_release);
      while (line.load(std::memory_order_acquire) != 2 * i + 2) {
      }
    }
    ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count() / trips;
  });
  a.join();
  b.join();
  return pinned_a && pinned_b.load() ? ns : 0;
}

}  // namespace

double CrossCpuRoundTripNs() {
  cpu_set_t allowed;
  if (pthread_getaffinity_np(pthread_self(), sizeof(allowed), &allowed) != 0) return 0;
  if (!CPU_ISSET(0, &allowed) || !CPU_ISSET(1, &allowed)) return 0;
  std::vector<double> bursts;
  for (int i = 0; i < 5; ++i) bursts.push_back(Burst(2000));
  if (std::find(bursts.begin(), bursts.end(), 0.0) != bursts.end()) return 0;
  std::nth_element(bursts.begin(), bursts.begin() + 2, bursts.end());
  return bursts[2];
}

}  // namespace te
