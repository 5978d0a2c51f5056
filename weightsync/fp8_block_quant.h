// fp8 (e4m3) with per-block scales: how a receiver that serves in fp8 gets
// its weights from trainers that hold bf16, at half the bytes on the wire.
//
// The format is the one DeepSeek-V3 checkpoints use: a tensor [..., R, C]
// (row-major; leading dimensions are a batch, e.g. stacked experts) is cut
// into 128 x 128 blocks of its last two dimensions (edge blocks are
// smaller); each block has one fp32 scale, and element x is stored as the
// fp8 code q with x ~= decode(q) * scale. Scales are laid out
// [..., ceil(R / 128), ceil(C / 128)], row-major.
//
// The rules, exactly (tests hold a second, independent implementation to
// them bit for bit):
//  - bf16 inputs widen to fp32 exactly.
//  - amax = the largest |x| over the block's finite elements (NaN and +-Inf
//    do not count). scale = amax / 448 in fp32 (one division, rounded to
//    nearest even), but at least 2^-126 (the smallest normal fp32, so that a
//    block of tiny values never divides by zero); a block whose amax is 0
//    (all zeros, or nothing finite) gets scale 1.
//  - q = e4m3(x / scale): the quotient in fp32, then rounded to the nearest
//    e4m3 value, ties to the even code; finite values beyond 448 in
//    magnitude (and +-Inf) saturate to +-448 (codes 0x7e / 0xfe); NaN stays
//    NaN (0x7f / 0xff, sign kept); -0 is 0x80. Values below the smallest
//    subnormal (2^-9) round to +-0 by the same rule.
// e4m3 here is the "fn" variant (torch.float8_e4m3fn): 4 exponent bits with
// bias 7, 3 mantissa bits, no infinities, one NaN pattern per sign.
#pragma once

#include <cstddef>
#include <cstdint>

#include "base/status.h"

namespace te::weightsync {

inline constexpr uint64_t kFp8BlockSize = 128;
inline constexpr float kFp8E4M3Max = 448.0f;

float Bf16ToFloat(uint16_t bits);
// Round to nearest even (the usual float -> bf16 conversion), NaN kept.
uint16_t FloatToBf16(float x);
uint8_t FloatToFp8E4M3(float x);
float Fp8E4M3ToFloat(uint8_t code);

// The shape quantization sees: `batch` matrices of rows x cols.
struct Fp8BlockShape {
  uint64_t batch = 1, rows = 0, cols = 0;
  uint64_t block_rows() const { return (rows + kFp8BlockSize - 1) / kFp8BlockSize; }
  uint64_t block_cols() const { return (cols + kFp8BlockSize - 1) / kFp8BlockSize; }
  uint64_t elements() const { return batch * rows * cols; }
  uint64_t scales() const { return batch * block_rows() * block_cols(); }
};
// A tensor's shape as seen by quantization: the last two dimensions are the
// matrix, the rest the batch. Tensors of fewer than two dimensions (norms,
// biases) are not quantized: kInvalidArgument.
Result<Fp8BlockShape> Fp8ShapeOf(const uint64_t* dims, size_t ndims);

// Quantizes `src` (bf16, shape `shape`, dense row-major) into `codes` (one
// byte per element, same layout) and `scales` (shape.scales() floats).
Status QuantizeBf16ToFp8Blocks(const uint16_t* src, const Fp8BlockShape& shape, uint8_t* codes, float* scales);

// The same for one band of a matrix that starts at a block-row boundary
// (row 0, 128, 256, ...): `rows` rows (the band's blocks are then the
// matrix's), row i read from src + i * src_row_stride elements, so that a
// source quantizes its part of a tensor where it lies. Writes rows x cols
// codes densely and ceil(rows / 128) x ceil(cols / 128) scales.
Status QuantizeBf16Band(const uint16_t* src, uint64_t src_row_stride, uint64_t rows, uint64_t cols, uint8_t* codes,
                        float* scales);

}  // namespace te::weightsync
