// Synthetic weights for tests and benchmarks: every byte of every parameter
// is a function of (parameter, element of the full tensor, byte, version),
// so a byte from the wrong parameter, element, shard or version is caught.
// Not model weights: a checkable pattern.
#pragma once

#include <cstdint>
#include <cstring>
#include <map>
#include <vector>

#include "weightsync/fp8_block_quant.h"
#include "weightsync/fp8_conversion.h"
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

// The same for a destination that takes some parameters as fp8
// (Schedule::wire_params()): copied parameters hold the pattern of their
// source parameter; codes and scales are the quantization of the whole
// source tensor's pattern (fp8_block_quant.h), cut to the shard.
inline uint64_t CountWrong(const ShardLayout& dst, uint32_t rank, uint64_t version, const uint8_t* region,
                           const std::vector<WireParam>& wire) {
  std::map<uint32_t, std::vector<uint64_t>> shapes;  // source parameter -> its shape
  for (size_t p = 0; p < wire.size(); ++p)
    if (wire[p].kind == WireParam::kFp8Codes) shapes[wire[p].source_param] = dst.model().params[p].shape;
  struct Quantized {
    std::vector<uint8_t> codes;
    std::vector<float> scales;
  };
  std::map<uint32_t, Quantized> done;
  auto quantized = [&](uint32_t sp) -> const Quantized& {
    auto it = done.find(sp);
    if (it != done.end()) return it->second;
    const auto& shape = shapes[sp];
    const Fp8BlockShape fs = Fp8ShapeOf(shape.data(), shape.size()).value();
    std::vector<uint16_t> bf16(fs.elements());
    for (uint64_t g = 0; g < bf16.size(); ++g)
      bf16[g] = uint16_t(PatternByte(sp, g, 0, version) | PatternByte(sp, g, 1, version) << 8);
    Quantized q{std::vector<uint8_t>(fs.elements()), std::vector<float>(fs.scales())};
    if (!QuantizeBf16ToFp8Blocks(bf16.data(), fs, q.codes.data(), q.scales.data()).ok()) abort();
    return done.emplace(sp, std::move(q)).first->second;
  };
  uint64_t wrong = 0;
  ForEachElement(dst, rank, [&](size_t p, uint64_t off, uint64_t g, uint64_t es) {
    const WireParam& w = wire[p];
    if (w.kind == WireParam::kCopy) {
      for (uint32_t b = 0; b < es; ++b) wrong += region[off + b] != PatternByte(w.source_param, g, b, version);
    } else if (w.kind == WireParam::kFp8Codes) {
      wrong += region[off] != quantized(w.source_param).codes[g];
    } else {
      const float want = quantized(w.source_param).scales[g];
      wrong += std::memcmp(region + off, &want, sizeof want) != 0 ? es : 0;
    }
  });
  return wrong;
}

}  // namespace te::weightsync
