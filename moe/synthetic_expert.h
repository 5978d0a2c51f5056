// A synthetic expert for tests and benchmarks: a cheap, deterministic
// function of the expert id and the (dequantized) token, so a token routed to
// the wrong expert, or with the wrong bytes, gives a different output. It is
// not a model layer.
#pragma once

#include <cstdint>
#include <vector>

#include "moe/dispatch_types.h"
#include "moe/ep_config.h"
#include "moe/numeric_formats.h"

namespace te::moe {

// out = bf16(x * (1 + (expert % 7) / 8) + expert / 64), [count, hidden].
inline void SyntheticExpert(const EpConfig& c, const ExpertTokens& in, std::vector<uint16_t>* out) {
  const uint32_t H = c.hidden;
  out->resize(size_t(in.count) * H);
  const float scale = 1.0f + float(in.expert % 7) / 8.0f, bias = float(in.expert) / 64.0f;
  for (uint32_t i = 0; i < in.count; ++i) {
    for (uint32_t j = 0; j < H; ++j) {
      float x;
      if (c.payload == Payload::kBf16) {
        uint16_t v;
        std::memcpy(&v, in.data.data() + (size_t(i) * H + j) * 2, 2);
        x = Bf16ToFloat(v);
      } else {
        x = Fp8E4M3ToFloat(in.data[size_t(i) * H + j]) * in.scales[size_t(i) * (H / 128) + j / 128];
      }
      (*out)[size_t(i) * H + j] = FloatToBf16(x * scale + bias);
    }
  }
}

}  // namespace te::moe
