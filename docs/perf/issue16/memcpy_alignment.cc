// How much the relative alignment of source and destination costs memcpy
// here: 64 KiB copies between page-aligned buffers, and between a source
// 16 bytes past a page (a heap vector's data) and a page-aligned
// destination, alternating in one run.
//
//   g++ -O2 -std=c++20 docs/perf/issue16/memcpy_alignment.cc -o /tmp/memcpy_alignment && /tmp/memcpy_alignment
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

int main() {
  constexpr size_t kCopy = 64 << 10, kPage = 4096, kCopies = 100000;
  char* src = static_cast<char*>(std::aligned_alloc(kPage, kCopy + kPage));
  char* dst = static_cast<char*>(std::aligned_alloc(kPage, kCopy + kPage));
  if (!src || !dst) return 1;
  std::memset(src, 1, kCopy + kPage);
  std::memset(dst, 0, kCopy + kPage);
  auto gbps = [&](const char* from) {
    const auto start = std::chrono::steady_clock::now();
    for (size_t i = 0; i < kCopies; ++i) {
      std::memcpy(dst, from, kCopy);
      asm volatile("" ::: "memory");  // keep every copy
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return double(kCopies * kCopy) / s / 1e9;
  };
  std::printf("%12s %12s %8s\n", "aligned GB/s", "+16 B GB/s", "ratio");
  for (int round = 0; round < 5; ++round) {
    const double aligned = gbps(src), offset = gbps(src + 16);
    std::printf("%12.1f %12.1f %8.2f\n", aligned, offset, offset / aligned);
  }
  std::free(src);
  std::free(dst);
  return 0;
}
