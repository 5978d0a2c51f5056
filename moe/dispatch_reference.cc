#include "moe/dispatch_reference.h"

#include <map>
#include <string>

#include "moe/numeric_formats.h"

namespace te::moe {

namespace {

// The rank source s sends slot k of its token t to (ExpertMap::Route).
uint32_t SlotRank(const ExpertMap& map, const TokenBatch& b, uint32_t topk, uint32_t s, uint32_t t, uint32_t k) {
  const int32_t* row = b.topk_idx + size_t(t) * topk;
  std::vector<uint32_t> dest(topk);
  map.Route(row, topk, s, ExpertMap::TokenKey(row, topk), dest.data());
  return dest[k];
}

}  // namespace

Result<std::vector<std::vector<ExpertTokens>>> ReferenceDispatch(const EpConfig& shape, const ExpertMap& map,
                                                                 const std::vector<TokenBatch>& batches) {
  if (batches.size() != shape.ranks)
    return InvalidArgument("reference dispatch needs one batch per rank: " + std::to_string(batches.size()) + " for " +
                           std::to_string(shape.ranks) + " ranks");
  const size_t tb = shape.token_bytes(), sc = shape.scale_count();
  std::vector<std::vector<ExpertTokens>> out(shape.ranks);
  for (uint32_t r = 0; r < shape.ranks; ++r) {
    for (uint32_t e : map.local_experts(r)) {
      ExpertTokens x;
      x.expert = e;
      // Sources in rank order, their tokens in order.
      for (uint32_t s = 0; s < shape.ranks; ++s) {
        const TokenBatch& b = batches[s];
        for (uint32_t t = 0; t < b.tokens; ++t) {
          for (uint32_t k = 0; k < shape.topk; ++k) {
            if (b.topk_idx[size_t(t) * shape.topk + k] != int32_t(e) || SlotRank(map, b, shape.topk, s, t, k) != r)
              continue;
            x.data.insert(x.data.end(), b.data + t * tb, b.data + (t + 1) * tb);
            if (sc) x.scales.insert(x.scales.end(), b.scales + t * sc, b.scales + (t + 1) * sc);
            x.weights.push_back(b.topk_weights[size_t(t) * shape.topk + k]);
            x.src_rank.push_back(s);
            x.src_token.push_back(t);
            x.count++;
          }
        }
      }
      out[r].push_back(std::move(x));
    }
  }
  return out;
}

namespace {

// Combine as defined in dispatch_types.h; with nodes > 0 the rank partials
// of each node are first summed into a node partial (rank order, bf16), as
// HierarchicalDispatcher does.
Result<std::vector<std::vector<uint16_t>>> Combine(const EpConfig& shape, const ExpertMap& map, uint32_t nodes,
                                                   const std::vector<TokenBatch>& batches,
                                                   const std::vector<std::vector<ExpertTokens>>& dispatched,
                                                   const std::vector<ExpertOutputs>& outputs) {
  const uint32_t R = shape.ranks, K = shape.topk, H = shape.hidden;
  if (batches.size() != R || dispatched.size() != R || outputs.size() != R)
    return InvalidArgument("reference combine needs batches, dispatch results and outputs for every rank");
  // Where (source rank, token) sits in each expert's list on each rank.
  std::vector<std::vector<std::map<std::pair<uint32_t, uint32_t>, uint32_t>>> position(
      R, std::vector<std::map<std::pair<uint32_t, uint32_t>, uint32_t>>(shape.experts));
  for (uint32_t r = 0; r < R; ++r)
    for (const ExpertTokens& x : dispatched[r])
      for (uint32_t i = 0; i < x.count; ++i) position[r][x.expert][{x.src_rank[i], x.src_token[i]}] = i;

  std::vector<std::vector<uint16_t>> combined(R);
  if (nodes > 0 && R % nodes) return InvalidArgument("nodes must divide ranks");
  const uint32_t per_node = nodes > 0 ? R / nodes : R;
  std::vector<float> total(H), partial(H), node_sum(H);
  for (uint32_t s = 0; s < R; ++s) {
    const TokenBatch& b = batches[s];
    combined[s].assign(size_t(b.tokens) * H, 0);
    for (uint32_t t = 0; t < b.tokens; ++t) {
      std::fill(total.begin(), total.end(), 0.0f);
      std::fill(node_sum.begin(), node_sum.end(), 0.0f);
      bool node_any = false;
      for (uint32_t r = 0; r < R; ++r) {
        bool any = false;
        std::fill(partial.begin(), partial.end(), 0.0f);
        for (uint32_t k = 0; k < K; ++k) {
          const int32_t e = b.topk_idx[size_t(t) * K + k];
          if (e < 0 || SlotRank(map, b, K, s, t, k) != r) continue;
          auto it = position[r][e].find({s, t});
          if (it == position[r][e].end())
            return Internal("token " + std::to_string(t) + " of rank " + std::to_string(s) + " missing from expert " +
                            std::to_string(e));
          const uint16_t* y = outputs[r][map.local_index(e, r)] + size_t(it->second) * H;
          const float w = b.topk_weights[size_t(t) * K + k];
          for (uint32_t j = 0; j < H; ++j) partial[j] += w * Bf16ToFloat(y[j]);
          any = true;
        }
        if (any && nodes == 0) {
          for (uint32_t j = 0; j < H; ++j) total[j] += Bf16ToFloat(FloatToBf16(partial[j]));
        } else if (any) {
          for (uint32_t j = 0; j < H; ++j) node_sum[j] += Bf16ToFloat(FloatToBf16(partial[j]));
          node_any = true;
        }
        if (nodes > 0 && (r + 1) % per_node == 0 && node_any) {  // the node's last rank
          for (uint32_t j = 0; j < H; ++j) total[j] += Bf16ToFloat(FloatToBf16(node_sum[j]));
          std::fill(node_sum.begin(), node_sum.end(), 0.0f);
          node_any = false;
        }
      }
      for (uint32_t j = 0; j < H; ++j) combined[s][size_t(t) * H + j] = FloatToBf16(total[j]);
    }
  }
  return combined;
}

}  // namespace

Result<std::vector<std::vector<uint16_t>>> ReferenceCombine(const EpConfig& shape, const ExpertMap& map,
                                                            const std::vector<TokenBatch>& batches,
                                                            const std::vector<std::vector<ExpertTokens>>& dispatched,
                                                            const std::vector<ExpertOutputs>& outputs) {
  return Combine(shape, map, 0, batches, dispatched, outputs);
}

Result<std::vector<std::vector<uint16_t>>> ReferenceHierarchicalCombine(
    const EpConfig& shape, const ExpertMap& map, uint32_t nodes, const std::vector<TokenBatch>& batches,
    const std::vector<std::vector<ExpertTokens>>& dispatched, const std::vector<ExpertOutputs>& outputs) {
  if (nodes == 0) return InvalidArgument("nodes must be at least 1");
  return Combine(shape, map, nodes, batches, dispatched, outputs);
}

}  // namespace te::moe
