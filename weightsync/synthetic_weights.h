// Synthetic weights for tests and benchmarks: every byte of every parameter
// is a function of (parameter, element of the full tensor, byte, version),
// so a byte from the wrong parameter, element, shard or version is caught.
// Not model weights: a checkable pattern.
#pragma once

#include <cstdint>
#include <vector>

#include "weightsync/shard_layout.h"

namespace te::weightsync {

inline uint8_t PatternByte(size_t param, uint64_t element, uint32_t byte, uint64_t version) {
  uint64_t x = (param + 1) * 0x9e3779b97f4a7c15ull ^ (element * 0xc2b2ae3d27d4eb4full) ^ (byte + 1) * 0x165667b1ull ^
               version * 0x27d4eb2full;
  x ^= x >> 29;
  return uint8_t(x ^ (x >> 17));
}

// Calls fn(byte offset in the rank's region, full-tensor element index) for
// every element of every shard rank `rank` holds.
template <typename Fn>
void ForEachElement(const ShardLayout& layout, uint32_t rank, Fn fn) {
  const auto& model = layout.model();
  for (size_t p = 0; p < model.params.size(); ++p) {
    const Box b = layout.ShardBox(p, rank);
    if (b.empty()) continue;
    const auto& shape = model.params[p].shape;
    const uint64_t es = DTypeBytes(model.params[p].dtype);
    std::vector<uint64_t> c = b.begin;
    uint64_t off = layout.ParamOffset(p, rank);
    while (true) {
      uint64_t g = 0;
      for (size_t d = 0; d < shape.size(); ++d) g = g * shape[d] + c[d];
      fn(p, off, g, es);
      off += es;
      int d = int(c.size()) - 1;
      for (; d >= 0; --d) {
        if (++c[d] < b.end[d]) break;
        c[d] = b.begin[d];
      }
      if (d < 0) break;
    }
  }
}

inline void FillShards(const ShardLayout& layout, uint32_t rank, uint64_t version, uint8_t* region) {
  ForEachElement(layout, rank, [&](size_t p, uint64_t off, uint64_t g, uint64_t es) {
    for (uint32_t b = 0; b < es; ++b) region[off + b] = PatternByte(p, g, b, version);
  });
}

// Number of bytes of `rank`'s shards that do not hold `version`'s pattern.
inline uint64_t CountWrong(const ShardLayout& layout, uint32_t rank, uint64_t version, const uint8_t* region) {
  uint64_t wrong = 0;
  ForEachElement(layout, rank, [&](size_t p, uint64_t off, uint64_t g, uint64_t es) {
    for (uint32_t b = 0; b < es; ++b) wrong += region[off + b] != PatternByte(p, g, b, version);
  });
  return wrong;
}

}  // namespace te::weightsync
