// fp8 (e4m3) block quantization against a second implementation written
// from the rules in fp8_block_quant.h: nearest value by search over all 256
// codes, ties to the even code, saturation at 448, NaN kept.
#include "weightsync/fp8_block_quant.h"

#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

namespace te::weightsync {
namespace {

// ---- The reference ----

double RefDecode(uint8_t code) {  // from the format's definition
  const int e = (code >> 3) & 0xf, m = code & 7;
  const double sign = (code & 0x80) ? -1.0 : 1.0;
  if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
  if (e == 0) return sign * m * std::pow(2.0, -9);
  return sign * (1.0 + m / 8.0) * std::pow(2.0, e - 7);
}

uint8_t RefEncode(float y) {
  const uint8_t sign = std::signbit(y) ? 0x80 : 0;
  if (std::isnan(y)) return sign | 0x7f;
  const double a = std::fabs(double(y));
  if (a > 448.0) return sign | 0x7e;  // includes Inf
  uint8_t best = 0;
  double best_d = INFINITY;
  for (int c = 0; c <= 0x7e; ++c) {
    const double d = std::fabs(RefDecode(uint8_t(c)) - a);
    if (d < best_d || (d == best_d && (c & 1) == 0)) {
      best = uint8_t(c);
      best_d = d;
    }
  }
  return sign | best;
}

float RefBf16(uint16_t b) {
  uint32_t x = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

// Quantizes matrix-by-matrix, block-by-block, straight from the rules.
void RefQuantize(const std::vector<uint16_t>& src, const Fp8BlockShape& s, std::vector<uint8_t>* codes,
                 std::vector<float>* scales) {
  codes->assign(s.elements(), 0);
  scales->assign(s.scales(), 0);
  for (uint64_t b = 0; b < s.batch; ++b)
    for (uint64_t br = 0; br < s.block_rows(); ++br)
      for (uint64_t bc = 0; bc < s.block_cols(); ++bc) {
        const uint64_t r0 = br * 128, r1 = std::min(s.rows, r0 + 128), c0 = bc * 128, c1 = std::min(s.cols, c0 + 128);
        auto at = [&](uint64_t r, uint64_t c) { return (b * s.rows + r) * s.cols + c; };
        float amax = 0;
        for (uint64_t r = r0; r < r1; ++r)
          for (uint64_t c = c0; c < c1; ++c) {
            const float v = std::fabs(RefBf16(src[at(r, c)]));
            if (std::isfinite(v)) amax = std::max(amax, v);
          }
        float scale = amax > 0 ? amax / 448.0f : 1.0f;
        if (amax > 0 && scale < FLT_MIN) scale = FLT_MIN;
        (*scales)[(b * s.block_rows() + br) * s.block_cols() + bc] = scale;
        for (uint64_t r = r0; r < r1; ++r)
          for (uint64_t c = c0; c < c1; ++c) (*codes)[at(r, c)] = RefEncode(RefBf16(src[at(r, c)]) / scale);
      }
}

// Weights-like bf16 values with the awkward ones mixed in.
std::vector<uint16_t> Weights(uint64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::uniform_int_distribution<int> pick(0, 999);
  std::vector<uint16_t> v(n);
  for (auto& x : v) {
    const int p = pick(rng);
    float f = normal(rng);
    if (p == 0) f = NAN;
    if (p == 1) f = -INFINITY;
    if (p == 2) f = 0.0f;
    if (p == 3) f = -0.0f;
    if (p == 4) f = 1e-40f;  // an fp32 subnormal
    if (p == 5) f *= 1000.0f;
    x = FloatToBf16(f);
  }
  return v;
}

// ---- The element conversion ----

TEST(Fp8, EveryBf16ValueConvertsAsTheReferenceDoes) {
  for (uint32_t b = 0; b <= 0xffff; ++b) {
    const float x = Bf16ToFloat(uint16_t(b));
    ASSERT_EQ(FloatToFp8E4M3(x), RefEncode(x)) << "bf16 0x" << std::hex << b << " = " << x;
  }
}

TEST(Fp8, MidpointsRoundToTheEvenCodeAndEveryCodeRoundTrips) {
  for (int c = 0; c < 0x7e; ++c) {  // between code c and c + 1, positive and negative
    const double lo = RefDecode(uint8_t(c)), hi = RefDecode(uint8_t(c + 1));
    const float mid = float((lo + hi) / 2);  // exact: a few bits only
    ASSERT_EQ(double(mid), (lo + hi) / 2);
    const uint8_t even = (c & 1) ? uint8_t(c + 1) : uint8_t(c);
    EXPECT_EQ(FloatToFp8E4M3(mid), even) << "midpoint of codes " << c << " and " << c + 1;
    EXPECT_EQ(FloatToFp8E4M3(-mid), 0x80 | even);
    EXPECT_EQ(FloatToFp8E4M3(std::nextafter(mid, 0.0f)), c);
    EXPECT_EQ(FloatToFp8E4M3(std::nextafter(mid, 1000.0f)), c + 1);
  }
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(Fp8E4M3ToFloat(uint8_t(c))));
      continue;
    }
    EXPECT_EQ(Fp8E4M3ToFloat(uint8_t(c)), float(RefDecode(uint8_t(c)))) << c;
    EXPECT_EQ(FloatToFp8E4M3(Fp8E4M3ToFloat(uint8_t(c))), c) << c;
  }
  EXPECT_EQ(FloatToFp8E4M3(448.0f), 0x7e);
  EXPECT_EQ(FloatToFp8E4M3(1e30f), 0x7e);
  EXPECT_EQ(FloatToFp8E4M3(-INFINITY), 0xfe);
  EXPECT_EQ(FloatToFp8E4M3(-NAN) & 0x7f, 0x7f);
  EXPECT_EQ(FloatToFp8E4M3(-0.0f), 0x80);
  EXPECT_EQ(FloatToFp8E4M3(std::ldexp(1.0f, -11)), 0);  // below half the smallest subnormal
}

// ---- Blocks ----

TEST(Fp8, BlocksAtOddShapesMatchTheReferenceBitForBit) {
  const std::vector<Fp8BlockShape> shapes = {{1, 300, 200}, {3, 129, 257}, {1, 1, 1}, {2, 128, 128}, {1, 7, 1000}};
  uint32_t seed = 1;
  for (const auto& s : shapes) {
    SCOPED_TRACE(std::to_string(s.batch) + "x" + std::to_string(s.rows) + "x" + std::to_string(s.cols));
    const auto src = Weights(s.elements(), seed++);
    std::vector<uint8_t> codes(s.elements()), want_codes;
    std::vector<float> scales(s.scales()), want_scales;
    ASSERT_TRUE(QuantizeBf16ToFp8Blocks(src.data(), s, codes.data(), scales.data()).ok());
    RefQuantize(src, s, &want_codes, &want_scales);
    ASSERT_EQ(0, std::memcmp(scales.data(), want_scales.data(), scales.size() * 4));
    ASSERT_EQ(codes, want_codes);
    // And the values come back within the format's precision.
    for (uint64_t i = 0; i < src.size(); ++i) {
      const float x = Bf16ToFloat(src[i]);
      if (!std::isfinite(x)) continue;
      const uint64_t b = i / (s.rows * s.cols), r = i / s.cols % s.rows, c = i % s.cols;
      const float scale = scales[(b * s.block_rows() + r / 128) * s.block_cols() + c / 128];
      const float back = Fp8E4M3ToFloat(codes[i]) * scale;
      ASSERT_LE(std::fabs(back - x), std::max(std::fabs(x) / 16, scale / 1024) * 1.0001f) << i;
    }
  }
}

// Every exponent, subnormal quotients and blocks of subnormal inputs: the
// quantizer flushes subnormal results of its own arithmetic to zero (for
// speed), which must not change a single code or scale.
TEST(Fp8, RandomBitsAndTinyBlocksMatchTheReference) {
  const Fp8BlockShape s{2, 256, 300};
  std::mt19937 rng(7);
  std::vector<uint16_t> src(s.elements());
  for (auto& x : src) x = uint16_t(rng());
  // The second matrix: tiny values only (bf16 subnormals and the smallest
  // normals), one block of them all subnormal.
  for (uint64_t i = s.rows * s.cols; i < src.size(); ++i) src[i] = uint16_t(rng() & 0x80ff);
  std::vector<uint8_t> codes(s.elements()), want_codes;
  std::vector<float> scales(s.scales()), want_scales;
  ASSERT_TRUE(QuantizeBf16ToFp8Blocks(src.data(), s, codes.data(), scales.data()).ok());
  RefQuantize(src, s, &want_codes, &want_scales);
  ASSERT_EQ(0, std::memcmp(scales.data(), want_scales.data(), scales.size() * 4));
  ASSERT_EQ(codes, want_codes);
  // The caller's floating-point mode is left as it was: a subnormal result
  // is still produced here.
  volatile float tiny = FLT_MIN;
  EXPECT_GT(tiny / 4.0f, 0.0f);
}

TEST(Fp8, ABandQuantizedWhereItLiesMatchesTheWholeTensor) {
  const Fp8BlockShape s{1, 300, 200};
  const auto src = Weights(s.elements(), 99);
  std::vector<uint8_t> codes(s.elements());
  std::vector<float> scales(s.scales());
  ASSERT_TRUE(QuantizeBf16ToFp8Blocks(src.data(), s, codes.data(), scales.data()).ok());
  // Rows 128 .. 299, held with 37 extra columns per row (a strided source).
  const uint64_t stride = s.cols + 37, rows = s.rows - 128;
  std::vector<uint16_t> strided(rows * stride, 0xffff);
  for (uint64_t r = 0; r < rows; ++r) std::memcpy(&strided[r * stride], &src[(128 + r) * s.cols], s.cols * 2);
  std::vector<uint8_t> band(rows * s.cols);
  std::vector<float> band_scales(2 * s.block_cols());
  ASSERT_TRUE(QuantizeBf16Band(strided.data(), stride, rows, s.cols, band.data(), band_scales.data()).ok());
  EXPECT_EQ(0, std::memcmp(band.data(), &codes[128 * s.cols], band.size()));
  EXPECT_EQ(0, std::memcmp(band_scales.data(), &scales[s.block_cols()], band_scales.size() * 4));
}

TEST(Fp8, BadShapesAreRefusedByName) {
  const uint64_t one[] = {4096};
  EXPECT_EQ(Fp8ShapeOf(one, 1).status().code(), StatusCode::kInvalidArgument);
  const uint64_t three[] = {8, 4096, 7168};
  auto s = Fp8ShapeOf(three, 3);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->batch, 8u);
  EXPECT_EQ(s->scales(), 8u * 32 * 56);
  uint16_t x = 0;
  uint8_t q = 0;
  float sc = 0;
  EXPECT_EQ(QuantizeBf16Band(&x, 0, 1, 1, &q, &sc).code(), StatusCode::kInvalidArgument);  // stride below cols
  EXPECT_EQ(QuantizeBf16Band(nullptr, 1, 1, 1, &q, &sc).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(QuantizeBf16ToFp8Blocks(&x, Fp8BlockShape{1, 0, 5}, &q, &sc).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace te::weightsync
