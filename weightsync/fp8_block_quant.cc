#include "weightsync/fp8_block_quant.h"

#include <algorithm>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace te::weightsync {
namespace {

// Flush-to-zero for the quantizer's own arithmetic. A quotient x / scale
// below 2^-126 is an fp32 subnormal, which x86 computes through a slow
// microcode assist (weights of mixed scale hit it often: twice the time on
// random bits). Every such quotient encodes to +-0 in e4m3 (whose smallest
// step is 2^-9), and FTZ gives +-0 with the same sign, so the codes do not
// change; scales below 2^-126 are raised to 2^-126 either way. Inputs are
// not treated as zero (no DAZ): a subnormal bf16 still counts.
class FlushToZero {
 public:
#if defined(__SSE__)
  FlushToZero() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8000u); }
  ~FlushToZero() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

uint32_t Bits(float x) { return std::bit_cast<uint32_t>(x); }
float FromBits(uint32_t b) { return std::bit_cast<float>(b); }

// The inner loops are built for AVX2 and for the baseline, and the loader
// picks one (an ifunc). Not under ThreadSanitizer: an ifunc resolver runs
// before its runtime is up, and the program dies at load.
#if defined(__SANITIZE_THREAD__)
#define TE_VECTOR_CLONES __attribute__((noinline))
#elif defined(__clang__)  // clang never inlines a multiversioned function, and refuses the attribute
#define TE_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TE_VECTOR_CLONES __attribute__((noinline, target_clones("avx2", "default")))
#endif

// 2^-6, the smallest normal e4m3 magnitude, and 448, the largest.
constexpr uint32_t kMinNormalBits = 0x3C800000u;
constexpr uint32_t kMaxBits = 0x43E00000u;

float BlockScale(float amax) {
  if (!(amax > 0.0f)) return 1.0f;
  return std::max(amax / kFp8E4M3Max, FLT_MIN);
}

}  // namespace

float Bf16ToFloat(uint16_t bits) { return FromBits(uint32_t(bits) << 16); }

uint16_t FloatToBf16(float x) {
  const uint32_t b = Bits(x);
  if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x40);  // NaN stays NaN
  return uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

namespace {

// Branch-free, so that the quantization loop vectorizes. The normal range
// rounds the fp32 mantissa to 3 bits at bit 20, ties to even (a carry out of
// the mantissa moves into the exponent, which is what rounding up does);
// the subnormal range rounds |x| * 2^9 to an integer with the float
// round-to-nearest-even trick.
inline uint8_t EncodeE4M3(float x) {
  const uint32_t b = Bits(x);
  const uint32_t sign = (b >> 24) & 0x80u;
  const uint32_t a = b & 0x7fffffffu;
  const uint32_t normal = ((a + 0x7ffffu + ((a >> 20) & 1u)) >> 20) - (120u << 3);
  const float t = FromBits(a) * 512.0f;  // exact: a power-of-two scaling
  // 0 .. 8 (8 is code 0x08, 2^-6); through int32, which vectorizes (a
  // float -> uint32 conversion does not).
  const uint32_t subnormal = uint32_t(int32_t((t + 0x1.8p23f) - 0x1.8p23f));
  // Selects as masks (all ones or zero), which the vectorizer takes where
  // it refuses the equivalent branches.
  const uint32_t sub = 0u - uint32_t(a < kMinNormalBits);
  const uint32_t sat = 0u - uint32_t(a > kMaxBits);  // beyond 448, and Inf: saturate
  const uint32_t nan = 0u - uint32_t(a > 0x7f800000u);
  uint32_t code = (subnormal & sub) | (normal & ~sub);
  code = (0x7eu & sat) | (code & ~sat);
  code = (0x7fu & nan) | (code & ~nan);
  return uint8_t(sign | code);
}

inline float Bf16ToFloatInline(uint16_t bits) { return FromBits(uint32_t(bits) << 16); }

// The two inner loops, kept apart so that each vectorizes as a leaf loop.
TE_VECTOR_CLONES uint16_t MaxFiniteMagnitude(const uint16_t* __restrict p, size_t n, uint16_t m) {
  // On the bf16 bits: for finite values the magnitude bits order as the
  // values do; Inf and NaN (0x7f80 and up) count as 0.
  // Signed 16-bit lanes (magnitudes fit): SSE2 has a signed max only.
  int16_t best = int16_t(m);
  for (size_t i = 0; i < n; ++i) {
    int16_t mag = int16_t(p[i] & 0x7fff);
    mag = mag >= 0x7f80 ? int16_t(0) : mag;
    best = mag > best ? mag : best;
  }
  return uint16_t(best);
}

TE_VECTOR_CLONES void EncodeRun(const uint16_t* __restrict in, size_t n, float scale, uint8_t* __restrict out) {
  for (size_t i = 0; i < n; ++i) out[i] = EncodeE4M3(Bf16ToFloatInline(in[i]) / scale);
}

}  // namespace

uint8_t FloatToFp8E4M3(float x) { return EncodeE4M3(x); }

float Fp8E4M3ToFloat(uint8_t code) {
  const float sign = (code & 0x80) ? -1.0f : 1.0f;
  const uint32_t e = (code >> 3) & 0xf, m = code & 7;
  if (e == 15 && m == 7) return std::nanf("");
  if (e == 0) return sign * std::ldexp(float(m), -9);
  return sign * std::ldexp(1.0f + float(m) / 8.0f, int(e) - 7);
}

Result<Fp8BlockShape> Fp8ShapeOf(const uint64_t* dims, size_t ndims) {
  if (ndims < 2)
    return InvalidArgument("fp8 block quantization needs a tensor of 2 or more dimensions, got " +
                           std::to_string(ndims));
  Fp8BlockShape s;
  s.rows = dims[ndims - 2];
  s.cols = dims[ndims - 1];
  for (size_t i = 0; i + 2 < ndims; ++i) s.batch *= dims[i];
  if (s.rows == 0 || s.cols == 0 || s.batch == 0) return InvalidArgument("fp8 block quantization of an empty tensor");
  return s;
}

Status QuantizeBf16Band(const uint16_t* src, uint64_t src_row_stride, uint64_t rows, uint64_t cols, uint8_t* codes,
                        float* scales) {
  if (!src || !codes || !scales) return InvalidArgument("fp8 quantization given a null buffer");
  if (rows == 0 || cols == 0) return InvalidArgument("fp8 quantization of an empty band");
  if (src_row_stride < cols)
    return InvalidArgument("source row stride " + std::to_string(src_row_stride) + " is below the " +
                           std::to_string(cols) + " columns");
  const uint64_t bcols = (cols + kFp8BlockSize - 1) / kFp8BlockSize;
  FlushToZero ftz;
  std::vector<uint16_t> amax(bcols);
  std::vector<float> scale(bcols);
  for (uint64_t r0 = 0; r0 < rows; r0 += kFp8BlockSize) {
    const uint64_t r1 = std::min(rows, r0 + kFp8BlockSize);
    // The largest finite magnitude per block column, then the scales.
    std::fill(amax.begin(), amax.end(), uint16_t(0));
    for (uint64_t r = r0; r < r1; ++r) {
      const uint16_t* row = src + r * src_row_stride;
      for (uint64_t bc = 0; bc < bcols; ++bc) {
        const uint64_t c0 = bc * kFp8BlockSize, c1 = std::min(cols, c0 + kFp8BlockSize);
        amax[bc] = MaxFiniteMagnitude(row + c0, c1 - c0, amax[bc]);
      }
    }
    for (uint64_t bc = 0; bc < bcols; ++bc) {
      scale[bc] = BlockScale(Bf16ToFloat(amax[bc]));
      scales[(r0 / kFp8BlockSize) * bcols + bc] = scale[bc];
    }
    for (uint64_t r = r0; r < r1; ++r) {
      const uint16_t* row = src + r * src_row_stride;
      uint8_t* out = codes + r * cols;
      for (uint64_t bc = 0; bc < bcols; ++bc) {
        const uint64_t c0 = bc * kFp8BlockSize, c1 = std::min(cols, c0 + kFp8BlockSize);
        EncodeRun(row + c0, c1 - c0, scale[bc], out + c0);
      }
    }
  }
  return Status::Ok();
}

Status QuantizeBf16ToFp8Blocks(const uint16_t* src, const Fp8BlockShape& shape, uint8_t* codes, float* scales) {
  if (shape.rows == 0 || shape.cols == 0 || shape.batch == 0)
    return InvalidArgument("fp8 quantization of an empty tensor");
  const uint64_t matrix = shape.rows * shape.cols, matrix_scales = shape.block_rows() * shape.block_cols();
  for (uint64_t b = 0; b < shape.batch; ++b)
    TE_RETURN_IF_ERROR(QuantizeBf16Band(src + b * matrix, shape.cols, shape.rows, shape.cols, codes + b * matrix,
                                        scales + b * matrix_scales));
  return Status::Ok();
}

}  // namespace te::weightsync
