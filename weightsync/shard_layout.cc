#include "weightsync/shard_layout.h"

#include <algorithm>

namespace te::weightsync {

bool Box::empty() const {
  for (size_t d = 0; d < begin.size(); ++d)
    if (begin[d] >= end[d]) return true;
  return false;
}

uint64_t Box::elements() const {
  if (empty()) return 0;
  uint64_t n = 1;
  for (size_t d = 0; d < begin.size(); ++d) n *= end[d] - begin[d];
  return n;
}

std::vector<uint64_t> Box::extents() const {
  std::vector<uint64_t> e(begin.size());
  for (size_t d = 0; d < e.size(); ++d) e[d] = end[d] - begin[d];
  return e;
}

Box Intersect(const Box& a, const Box& b) {
  Box r = a;
  for (size_t d = 0; d < a.begin.size(); ++d) {
    r.begin[d] = std::max(a.begin[d], b.begin[d]);
    r.end[d] = std::max(r.begin[d], std::min(a.end[d], b.end[d]));
  }
  return r;
}

Result<ShardLayout> ShardLayout::Make(const ModelSpec& model, uint32_t ranks, std::vector<Sharding> sharding) {
  TE_RETURN_IF_ERROR(model.Validate());
  if (ranks == 0 || ranks > 4096) return InvalidArgument("ranks " + std::to_string(ranks) + " outside [1, 4096]");
  if (sharding.size() != model.params.size())
    return InvalidArgument("sharding given for " + std::to_string(sharding.size()) + " of " +
                           std::to_string(model.params.size()) + " parameters");
  for (size_t p = 0; p < sharding.size(); ++p) {
    const Sharding& s = sharding[p];
    if (!s.replicated() && size_t(s.dim) >= model.params[p].shape.size())
      return InvalidArgument("parameter '" + model.params[p].name + "' split along dimension " + std::to_string(s.dim) +
                             " of " + std::to_string(model.params[p].shape.size()));
    if (s.parts == 0) return InvalidArgument("parameter '" + model.params[p].name + "' split into 0 parts");
  }
  ShardLayout l;
  l.model_ = model;
  l.ranks_ = ranks;
  l.kind_ = "custom";
  l.sharding_ = std::move(sharding);
  l.offsets_.assign(ranks, std::vector<uint64_t>(model.params.size()));
  l.region_bytes_.assign(ranks, 0);
  for (uint32_t r = 0; r < ranks; ++r) {
    uint64_t at = 0;
    for (size_t p = 0; p < model.params.size(); ++p) {
      l.offsets_[r][p] = at;
      at = (at + l.ShardBytes(p, r) + 63) & ~uint64_t(63);
    }
    l.region_bytes_[r] = std::max<uint64_t>(at, 64);
  }
  return l;
}

Result<ShardLayout> ShardLayout::Named(const ModelSpec& model, uint32_t ranks, const std::string& kind) {
  std::vector<Sharding> s(model.params.size());
  for (size_t p = 0; p < s.size(); ++p) {
    const ParamSpec& x = model.params[p];
    if (kind == "replicated") continue;
    if (kind == "fsdp") {
      s[p] = {0, ranks};
    } else if (kind == "tp") {
      const bool row_parallel =
          x.name.find("o_proj") != std::string::npos || x.name.find("down_proj") != std::string::npos;
      if (x.shape.size() == 1 || x.name.find("router") != std::string::npos) continue;
      if (row_parallel)
        s[p] = {int(x.shape.size()) - 1, ranks};
      else
        s[p] = {x.shape.size() >= 3 ? 1 : 0, ranks};
    } else {
      return InvalidArgument("layout '" + kind + "' is not one of replicated, fsdp, tp");
    }
  }
  auto l = Make(model, ranks, std::move(s));
  if (l.ok()) l.value().kind_ = kind;
  return l;
}

Box ShardLayout::ShardBox(size_t param, uint32_t rank) const {
  const auto& shape = model_.params[param].shape;
  Box b{std::vector<uint64_t>(shape.size(), 0), shape};
  const Sharding& s = sharding_[param];
  if (!s.replicated()) {
    const uint64_t E = shape[s.dim], part = rank % s.parts;
    b.begin[s.dim] = part * E / s.parts;
    b.end[s.dim] = (part + 1) * E / s.parts;
  }
  return b;
}

uint64_t ShardLayout::ShardBytes(size_t param, uint32_t rank) const {
  return ShardBox(param, rank).elements() * DTypeBytes(model_.params[param].dtype);
}

std::string ShardLayout::Describe() const { return kind_ + " x" + std::to_string(ranks_); }

}  // namespace te::weightsync
