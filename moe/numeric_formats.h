// bf16 and fp8 (e4m3) conversions on the host, as MoE payloads use them.
//
// bf16: the top 16 bits of an IEEE float, rounded to nearest even.
// fp8 e4m3 (OCP "E4M3FN"): 1 sign, 4 exponent (bias 7), 3 mantissa bits, no
// infinities, largest finite 448; values beyond saturate to +-448, NaN stays
// NaN. Quantized activations carry one float scale per 128 elements:
// value = fp8 * scale.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace te::moe {

inline float Bf16ToFloat(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t FloatToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);                                         // nearest even
  return uint16_t(bits >> 16);
}

inline float Fp8E4M3ToFloat(uint8_t v) {
  const int sign = v >> 7, exp = (v >> 3) & 0xf, man = v & 7;
  float mag;
  if (exp == 0xf && man == 7) return NAN;
  if (exp == 0)
    mag = std::ldexp(float(man), -9);  // subnormal: man/8 * 2^-6
  else
    mag = std::ldexp(1.0f + float(man) / 8.0f, exp - 7);
  return sign ? -mag : mag;
}

inline uint8_t FloatToFp8E4M3(float f) {
  if (std::isnan(f)) return 0x7f;
  const uint8_t sign = std::signbit(f) ? 0x80 : 0;
  float a = std::fabs(f);
  if (a >= 448.0f) return sign | 0x7e;  // saturate
  // Smallest step at this magnitude: 2^(e-3) for normals, 2^-9 below 2^-6.
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  int unbiased = e - 1;
  if (unbiased < -6) unbiased = -6;
  const float step = std::ldexp(1.0f, unbiased - 3);
  float q = std::nearbyint(a / step) * step;  // ties to even under the default rounding mode
  if (q >= 448.0f) return sign | 0x7e;
  if (q == 0) return sign;
  int qe;
  float qm = std::frexp(q, &qe);  // q = qm * 2^qe
  int biased = qe - 1 + 7;
  if (biased <= 0) return sign | uint8_t(std::lround(q / std::ldexp(1.0f, -9)));  // subnormal
  uint8_t man = uint8_t(std::lround((qm * 2 - 1) * 8));
  return sign | uint8_t(biased << 3) | man;
}

}  // namespace te::moe
