// Fp8Conversion: a receiver that serves in fp8 takes parameters the trainers
// hold in bf16, at half the bytes on the wire.
//
// The receiver declares it in its model: a parameter P that the sources hold
// as bf16 with two or more dimensions appears in the destination's model as
// fp8 with the same shape, followed anywhere by a parameter "P.scale" (fp32,
// shape [..., ceil(R / 128), ceil(C / 128)] for P's [..., R, C]): the format
// of fp8_block_quant.h, as DeepSeek-V3 checkpoints hold it. Every other
// parameter is the same on both sides.
//
// What moves is then the destination's model (the "wire model"). Each source
// rank holds the wire model sharded as it holds the bf16 one (P.scale split
// along the same dimension as P), and quantizes its own shard of P into codes
// and scales during the push. A block's scale comes from the whole block, so
// no block may straddle two source ranks: every source shard boundary of P in
// its last two dimensions must lie on a multiple of 128, and the scale's
// shard boundaries must then fall on the matching block index. A layout that
// cuts a block between two sources is refused, naming the parameter and the
// row or column. (Such a block would need its owners to gather its edge rows
// on one of them before quantizing, or to exchange partial maxima first;
// neither is built. Real tensor-parallel sizes are multiples of 128 x parts.)
// The destination's own sharding is free: any rank may take any codes and
// scales.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"
#include "weightsync/model_spec.h"
#include "weightsync/shard_layout.h"

namespace te::weightsync {

// Where a destination (wire) parameter's bytes come from at a source.
struct WireParam {
  enum Kind : uint8_t { kCopy, kFp8Codes, kFp8Scales };
  Kind kind = kCopy;
  uint32_t source_param = 0;  // index in the sources' model (for scales: the quantized weight)
};

struct Fp8Conversion {
  ShardLayout wire_source;        // the sources' layout of the destination's model
  std::vector<WireParam> params;  // per destination parameter
};
bool AnyQuantized(const std::vector<WireParam>& params);

// Matches the destination's model against the sources' layout. Equal models
// give a conversion that copies everything. kInvalidArgument names the first
// parameter that neither copies nor converts, or the first block that
// straddles two source ranks.
Result<Fp8Conversion> PlanFp8Conversion(const ShardLayout& src, const ModelSpec& dst_model);

// A receiver's fp8 model from a bf16 one: the named parameters become fp8,
// each followed by its ".scale". No names: every bf16 parameter of two or
// more dimensions except embeddings and output heads (names holding "embed"
// or "head"), which DeepSeek-V3's fp8 checkpoints keep in bf16 as well. A named parameter that is not bf16 or has fewer
// than two dimensions is refused.
Result<ModelSpec> Fp8Model(const ModelSpec& bf16, const std::vector<std::string>& names = {});

inline constexpr const char* kFp8ScaleSuffix = ".scale";

}  // namespace te::weightsync
