// ShardLayout: how one side of a weight update (the trainer ranks, or the
// inference ranks) holds every parameter, and where each shard sits in a
// rank's memory region.
//
// A parameter is replicated, or split along one dimension into `parts`
// balanced parts: part i of an extent E is [i*E/parts, (i+1)*E/parts)
// (floor; sizes differ by at most one, some may be empty). Rank r holds part
// r % parts, so ranks beyond `parts` hold replicas. A shard is stored dense,
// row-major, with its own extents; a rank's region holds its shards in
// parameter order, each at a 64-byte aligned offset.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"
#include "weightsync/model_spec.h"

namespace te::weightsync {

struct Sharding {
  int dim = -1;  // -1: replicated
  uint32_t parts = 1;
  bool replicated() const { return dim < 0 || parts <= 1; }
};

// A hyper-rectangle of a parameter: [begin[d], end[d]) per dimension.
struct Box {
  std::vector<uint64_t> begin, end;
  bool empty() const;
  uint64_t elements() const;
  std::vector<uint64_t> extents() const;  // end - begin per dimension: the shard's shape
};
Box Intersect(const Box& a, const Box& b);

class ShardLayout {
 public:
  // One Sharding per parameter; a split dimension must exist in its shape.
  static Result<ShardLayout> Make(const ModelSpec& model, uint32_t ranks, std::vector<Sharding> sharding);
  // "replicated"; "fsdp" (every parameter split along dimension 0 into
  // `ranks` parts); "tp" (Megatron-style: o_proj/down_proj along their last
  // dimension, 1-D parameters and routers replicated, other stacked expert
  // tensors along dimension 1, everything else along dimension 0).
  static Result<ShardLayout> Named(const ModelSpec& model, uint32_t ranks, const std::string& kind);

  uint32_t ranks() const { return ranks_; }
  const ModelSpec& model() const { return model_; }
  const Sharding& sharding(size_t param) const { return sharding_[param]; }
  Box ShardBox(size_t param, uint32_t rank) const;
  uint64_t ShardBytes(size_t param, uint32_t rank) const;
  uint64_t ParamOffset(size_t param, uint32_t rank) const { return offsets_[rank][param]; }
  uint64_t RegionBytes(uint32_t rank) const { return region_bytes_[rank]; }
  std::string Describe() const;  // e.g. "tp x4"

 private:
  ModelSpec model_;
  uint32_t ranks_ = 0;
  std::string kind_;
  std::vector<Sharding> sharding_;
  std::vector<std::vector<uint64_t>> offsets_;  // [rank][param]
  std::vector<uint64_t> region_bytes_;
};

}  // namespace te::weightsync
