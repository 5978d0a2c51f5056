#include "moe/dispatch_cost.h"

#include <algorithm>
#include <string>

namespace te::moe {

const char* TokenHomeName(TokenHome home) { return home == TokenHome::kSource ? "source" : "top1"; }

RecordCount DispatchCost::total() const {
  RecordCount sum;
  for (const auto& l : layers) sum.rank += l.rank, sum.node += l.node;
  return sum;
}

double DispatchCost::rank_per_token_layer() const {
  return layers.empty() || tokens == 0 ? 0 : double(total().rank) / (double(tokens) * layers.size());
}

double DispatchCost::node_per_token_layer() const {
  return layers.empty() || tokens == 0 ? 0 : double(total().node) / (double(tokens) * layers.size());
}

std::vector<uint32_t> TokenHomes(const RoutingTrace& t, const Placement& p, TokenHome home, uint32_t layer) {
  std::vector<uint32_t> homes(t.tokens);
  for (uint32_t tok = 0; tok < t.tokens; ++tok) {
    homes[tok] = tok % p.ranks;
    // kTop1: the rank of the last layer before `layer` where the token had a
    // top-1 expert (a token with none stays where it was).
    if (home == TokenHome::kTop1)
      for (uint32_t l = layer; l-- > 0;)
        if (const int e = t.at(tok, l, 0); e >= 0) {
          homes[tok] = p.rank_of[l][e];
          break;
        }
  }
  return homes;
}

Result<DispatchCost> CountRecords(const RoutingTrace& t, const Placement& p, const CostOptions& o) {
  if (p.layers != t.layers || p.experts != t.experts)
    return InvalidArgument("placement of " + std::to_string(p.layers) + " layers x " + std::to_string(p.experts) +
                           " experts does not fit a trace of " + std::to_string(t.layers) + " x " +
                           std::to_string(t.experts));
  TE_RETURN_IF_ERROR(CheckShape(p.experts, p.ranks, o.nodes));
  const uint32_t per_node = p.ranks / o.nodes;
  DispatchCost cost;
  cost.tokens = t.tokens;
  cost.layers.resize(t.layers);
  std::vector<uint32_t> rank_seen(p.ranks, UINT32_MAX), node_seen(o.nodes, UINT32_MAX);
  for (uint32_t l = 0; l < t.layers; ++l) {
    const std::vector<uint32_t> homes = TokenHomes(t, p, o.home, l);
    RecordCount& c = cost.layers[l];
    std::fill(rank_seen.begin(), rank_seen.end(), UINT32_MAX);  // stamps are token ids: fresh per layer
    std::fill(node_seen.begin(), node_seen.end(), UINT32_MAX);
    for (uint32_t tok = 0; tok < t.tokens; ++tok) {
      const uint32_t home = homes[tok], home_node = home / per_node;
      rank_seen[home] = tok;  // nothing goes to the own rank
      node_seen[home_node] = tok;
      for (uint32_t k = 0; k < t.topk; ++k) {
        const int e = t.at(tok, l, k);
        if (e < 0) continue;
        const uint32_t r = p.rank_of[l][e], node = r / per_node;
        if (rank_seen[r] == tok) continue;
        rank_seen[r] = tok;
        c.rank++;
        if (node == home_node) continue;
        if (!o.hierarchical) {
          c.node++;
        } else if (node_seen[node] != tok) {
          node_seen[node] = tok;
          c.node++;
        }
      }
    }
  }
  return cost;
}

}  // namespace te::moe
