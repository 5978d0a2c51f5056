#include "weightsync/fp8_conversion.h"

#include <map>

#include "weightsync/fp8_block_quant.h"

namespace te::weightsync {
namespace {

std::vector<uint64_t> ScaleShape(const std::vector<uint64_t>& shape) {
  std::vector<uint64_t> s = shape;
  for (size_t d = s.size() - 2; d < s.size(); ++d) s[d] = (s[d] + kFp8BlockSize - 1) / kFp8BlockSize;
  return s;
}

// Every source rank's shard of `codes` must be whole blocks, and its shard of
// `scale` exactly those blocks' scales.
Status CheckBlocksStayOnOneSource(const ShardLayout& wire, size_t codes, size_t scale) {
  const ParamSpec& p = wire.model().params[codes];
  const size_t n = p.shape.size();
  const Sharding& s = wire.sharding(codes);
  if (s.replicated() || size_t(s.dim) + 2 < n) return Status::Ok();  // whole matrices per rank
  const char* what = size_t(s.dim) == n - 2 ? "row" : "column";
  for (uint32_t r = 0; r < wire.ranks() && r < s.parts; ++r) {
    const Box c = wire.ShardBox(codes, r), k = wire.ShardBox(scale, r);
    for (uint64_t edge : {c.begin[s.dim], c.end[s.dim]})
      if (edge % kFp8BlockSize != 0 && edge != p.shape[s.dim])
        return InvalidArgument("parameter '" + p.name + "': source rank " + std::to_string(r) + "'s shard " +
                               (edge == c.begin[s.dim] ? "starts" : "ends") + " at " + what + " " +
                               std::to_string(edge) + ", inside a 128 x 128 block; fp8 conversion needs every " +
                               "source shard boundary on a multiple of 128 (a block's scale comes from one source)");
    const uint64_t first = c.begin[s.dim] / kFp8BlockSize, last = (c.end[s.dim] + kFp8BlockSize - 1) / kFp8BlockSize;
    if (c.empty() ? !k.empty() : (k.begin[s.dim] != first || k.end[s.dim] != last))
      return InvalidArgument("parameter '" + p.name + "': source rank " + std::to_string(r) + " holds " + what +
                             " blocks [" + std::to_string(first) + ", " + std::to_string(last) +
                             ") but its shard of the scales would be [" + std::to_string(k.begin[s.dim]) + ", " +
                             std::to_string(k.end[s.dim]) + "); split the tensor into parts of whole blocks");
  }
  return Status::Ok();
}

}  // namespace

bool AnyQuantized(const std::vector<WireParam>& params) {
  for (const WireParam& w : params)
    if (w.kind != WireParam::kCopy) return true;
  return false;
}

Result<Fp8Conversion> PlanFp8Conversion(const ShardLayout& src, const ModelSpec& dst_model) {
  const ModelSpec& sm = src.model();
  TE_RETURN_IF_ERROR(dst_model.Validate());
  std::map<std::string, uint32_t> by_name, dst_names;
  for (size_t i = 0; i < sm.params.size(); ++i) by_name[sm.params[i].name] = uint32_t(i);
  for (size_t i = 0; i < dst_model.params.size(); ++i) dst_names[dst_model.params[i].name] = uint32_t(i);

  Fp8Conversion conv;
  conv.params.resize(dst_model.params.size());
  std::vector<Sharding> sharding(dst_model.params.size());
  std::vector<bool> covered(sm.params.size(), false);
  std::vector<std::pair<size_t, size_t>> quantized;  // (codes, scale) destination indexes
  for (size_t q = 0; q < dst_model.params.size(); ++q) {
    const ParamSpec& d = dst_model.params[q];
    auto it = by_name.find(d.name);
    if (it != by_name.end()) {
      const ParamSpec& s = sm.params[it->second];
      if (s.shape != d.shape)
        return InvalidArgument("parameter '" + d.name + "' is " + ShapeString(s.shape) + " at the sources and " +
                               ShapeString(d.shape) + " at the destination");
      WireParam w{WireParam::kCopy, it->second};
      if (s.dtype != d.dtype) {
        if (s.dtype != DType::kBf16 || d.dtype != DType::kFp8 || d.shape.size() < 2)
          return InvalidArgument("parameter '" + d.name + "' is " + DTypeName(s.dtype) + " at the sources and " +
                                 DTypeName(d.dtype) + " at the destination; only bf16 -> fp8 of 2 or more " +
                                 "dimensions converts (e4m3, 128 x 128 block scales)");
        const std::string scale_name = d.name + kFp8ScaleSuffix;
        auto sc = dst_names.find(scale_name);
        if (sc == dst_names.end())
          return InvalidArgument("parameter '" + d.name + "' is fp8 at the destination, which has no '" + scale_name +
                                 "' for its block scales");
        const ParamSpec& k = dst_model.params[sc->second];
        if (k.dtype != DType::kFp32 || k.shape != ScaleShape(d.shape))
          return InvalidArgument("'" + scale_name + "' is " + DTypeName(k.dtype) + " " + ShapeString(k.shape) +
                                 "; the scales of " + ShapeString(d.shape) + " are fp32 " +
                                 ShapeString(ScaleShape(d.shape)));
        if (by_name.count(scale_name))
          return InvalidArgument("'" + scale_name + "' is a source parameter and the scales of '" + d.name + "'");
        w.kind = WireParam::kFp8Codes;
        conv.params[sc->second] = {WireParam::kFp8Scales, it->second};
        sharding[sc->second] = src.sharding(it->second);
        quantized.push_back({q, sc->second});
      }
      conv.params[q] = w;
      sharding[q] = src.sharding(it->second);
      covered[it->second] = true;
    }
  }
  for (size_t q = 0; q < dst_model.params.size(); ++q) {
    const std::string& name = dst_model.params[q].name;
    if (!by_name.count(name) && conv.params[q].kind != WireParam::kFp8Scales)
      return InvalidArgument("destination parameter '" + name + "' is not held by the sources");
  }
  for (size_t i = 0; i < sm.params.size(); ++i)
    if (!covered[i]) return InvalidArgument("source parameter '" + sm.params[i].name + "' has no destination");
  TE_ASSIGN_OR_RETURN(conv.wire_source, ShardLayout::Make(dst_model, src.ranks(), std::move(sharding)));
  for (auto [codes, scale] : quantized) TE_RETURN_IF_ERROR(CheckBlocksStayOnOneSource(conv.wire_source, codes, scale));
  return conv;
}

Result<ModelSpec> Fp8Model(const ModelSpec& bf16, const std::vector<std::string>& names) {
  TE_RETURN_IF_ERROR(bf16.Validate());
  std::map<std::string, bool> wanted;
  for (const std::string& n : names) wanted[n] = false;
  ModelSpec out;
  for (const ParamSpec& p : bf16.params) {
    auto it = wanted.find(p.name);
    const bool take = names.empty()
                          ? p.dtype == DType::kBf16 && p.shape.size() >= 2 &&
                                p.name.find("embed") == std::string::npos && p.name.find("head") == std::string::npos
                          : it != wanted.end();
    if (!take) {
      out.params.push_back(p);
      continue;
    }
    if (p.dtype != DType::kBf16 || p.shape.size() < 2)
      return InvalidArgument("parameter '" + p.name + "' is " + DTypeName(p.dtype) + " with " +
                             std::to_string(p.shape.size()) +
                             " dimensions; fp8 conversion takes bf16 of 2 or more dimensions");
    if (it != wanted.end()) it->second = true;
    ParamSpec codes = p;
    codes.dtype = DType::kFp8;
    out.params.push_back(codes);
    out.params.push_back(ParamSpec{p.name + kFp8ScaleSuffix, DType::kFp32, ScaleShape(p.shape)});
  }
  for (const auto& [n, seen] : wanted)
    if (!seen) return InvalidArgument("fp8 parameter '" + n + "' is not in the model");
  TE_RETURN_IF_ERROR(out.Validate());
  return out;
}

}  // namespace te::weightsync
