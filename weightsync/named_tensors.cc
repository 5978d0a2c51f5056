#include "weightsync/named_tensors.h"

namespace te::weightsync {

Status CheckTensorMap(const ShardLayout& layout, uint32_t rank, const TensorMap& tensors) {
  if (rank >= layout.ranks())
    return InvalidArgument("rank " + std::to_string(rank) + " outside [0, " + std::to_string(layout.ranks()) + ")");
  const ModelSpec& model = layout.model();
  std::map<std::string, size_t> index;
  for (size_t p = 0; p < model.params.size(); ++p) index[model.params[p].name] = p;
  for (const auto& [name, t] : tensors) {
    auto it = index.find(name);
    if (it == index.end()) return InvalidArgument("tensor '" + name + "' is not a parameter of the model");
    const size_t p = it->second;
    const ParamSpec& spec = model.params[p];
    const std::vector<uint64_t> extent = layout.ShardBox(p, rank).extents();
    const uint64_t want = layout.ShardBytes(p, rank);
    if (want == 0) return InvalidArgument("tensor '" + name + "': rank " + std::to_string(rank) + " holds none of it");
    if (!t.data) return InvalidArgument("tensor '" + name + "' has no memory (null pointer)");
    if (t.bytes != want)
      return InvalidArgument("tensor '" + name + "' holds " + std::to_string(t.bytes) + " bytes; rank " +
                             std::to_string(rank) + "'s shard of it is " + std::to_string(want) + " bytes (" +
                             DTypeName(spec.dtype) + " " + ShapeString(extent) + ")");
    if (t.dtype && *t.dtype != spec.dtype)
      return InvalidArgument("tensor '" + name + "' is " + DTypeName(*t.dtype) + "; the parameter is " +
                             DTypeName(spec.dtype));
    if (!t.shape.empty() && t.shape != extent)
      return InvalidArgument("tensor '" + name + "' has shape " + ShapeString(t.shape) + "; rank " +
                             std::to_string(rank) + "'s shard of it is " + ShapeString(extent));
  }
  for (size_t p = 0; p < model.params.size(); ++p)
    if (layout.ShardBytes(p, rank) > 0 && !tensors.count(model.params[p].name))
      return InvalidArgument("rank " + std::to_string(rank) + " holds '" + model.params[p].name + "' (" +
                             std::to_string(layout.ShardBytes(p, rank)) +
                             " bytes) but no tensor of that name was given");
  return Status::Ok();
}

}  // namespace te::weightsync
