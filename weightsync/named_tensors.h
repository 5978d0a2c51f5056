// NamedTensor: a caller's buffer for one parameter's shard, so that weights
// land in (or leave from) an inference or training engine's own tensors
// instead of a weightsync-owned region.
//
// A TensorMap names, for one rank, a buffer per parameter shard the rank
// holds: the shard's bytes, dense row-major with the shard's own extents
// (shard_layout.h), exactly ShardBytes(param, rank) long. The caller owns
// the memory; it must stay valid, and keep its address, for as long as the
// receiver or pusher it was given to lives.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"
#include "transfer/memory_region.h"
#include "weightsync/model_spec.h"
#include "weightsync/shard_layout.h"

namespace te::weightsync {

struct NamedTensor {
  void* data = nullptr;
  uint64_t bytes = 0;
  std::optional<DType> dtype;      // checked when given
  std::vector<uint64_t> shape;     // checked when given: the shard's extents
  Memory memory = Memory::Host();  // where `data` lives (receivers may take GPU memory)
};
using TensorMap = std::map<std::string, NamedTensor>;

// Every parameter shard `rank` holds (non-empty) has a tensor of its size,
// dtype and shape, and every tensor names such a shard. kInvalidArgument
// names the first tensor or parameter that does not match, and the value
// expected.
Status CheckTensorMap(const ShardLayout& layout, uint32_t rank, const TensorMap& tensors);

}  // namespace te::weightsync
