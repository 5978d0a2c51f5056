#include "moe/placement_solver.h"

#include <algorithm>
#include <numeric>
#include <string>

#include "moe/expert_partition.h"

namespace te::moe {
namespace {

// What the keep-the-better rule compares: records crossing ranks plus
// network crossings (node-level deduplication).
uint64_t Objective(const RecordCount& c) { return c.rank + c.node; }

double Cap(const std::vector<uint64_t>& load, uint32_t parts, double slack) {
  const uint64_t total = std::accumulate(load.begin(), load.end(), uint64_t(0));
  const uint64_t heaviest = load.empty() ? 0 : *std::max_element(load.begin(), load.end());
  return std::max((1.0 + slack) * double(total) / parts, double(heaviest));
}

// Places layer l of `p` given the layers before it.
void PlaceLayer(const RoutingTrace& t, uint32_t l, const std::vector<uint64_t>& load, const PlacementOptions& o,
                Placement* p) {
  const uint32_t E = t.experts, R = p->ranks, N = o.nodes, per_node = R / N;
  // Each token's distinct experts at this layer, and its home rank (kTop1).
  std::vector<std::vector<uint32_t>> experts_of(t.tokens);
  for (uint32_t tok = 0; tok < t.tokens; ++tok)
    for (uint32_t k = 0; k < t.topk; ++k)
      if (const int e = t.at(tok, l, k); e >= 0) experts_of[tok].push_back(uint32_t(e));
  std::vector<int32_t> home(t.tokens, -1);
  if (o.home == TokenHome::kTop1 && l > 0) {
    const auto homes = TokenHomes(t, *p, o.home, l);
    for (uint32_t tok = 0; tok < t.tokens; ++tok) home[tok] = int32_t(homes[tok]);
  }

  // Nodes first.
  std::vector<uint32_t> node_of(E, 0);
  if (N > 1) {
    PartitionProblem np;
    np.items = E;
    np.parts = N;
    np.load = load;
    np.cap = Cap(load, N, o.load_slack);
    for (uint32_t tok = 0; tok < t.tokens; ++tok) {
      const int32_t h = home[tok] >= 0 ? int32_t(uint32_t(home[tok]) / per_node) : -1;
      if (experts_of[tok].size() + (h >= 0) >= 2)
        np.AddToken(experts_of[tok].data(), uint32_t(experts_of[tok].size()), h);
    }
    node_of = SolvePartition(np, o.max_sweeps);
  }
  // Then each node's ranks.
  const double rank_cap = Cap(load, R, o.load_slack);
  for (uint32_t n = 0; n < N; ++n) {
    std::vector<uint32_t> items, local(E, UINT32_MAX);
    for (uint32_t e = 0; e < E; ++e)
      if (node_of[e] == n) local[e] = uint32_t(items.size()), items.push_back(e);
    PartitionProblem rp;
    rp.items = uint32_t(items.size());
    rp.parts = per_node;
    rp.cap = rank_cap;
    for (uint32_t e : items) rp.load.push_back(load[e]);
    std::vector<uint32_t> mine;
    for (uint32_t tok = 0; tok < t.tokens; ++tok) {
      mine.clear();
      for (uint32_t e : experts_of[tok])
        if (local[e] != UINT32_MAX) mine.push_back(local[e]);
      const bool home_here = home[tok] >= 0 && uint32_t(home[tok]) / per_node == n;
      const int32_t h = home_here ? int32_t(uint32_t(home[tok]) % per_node) : -1;
      if (!mine.empty() && mine.size() + (h >= 0) >= 2) rp.AddToken(mine.data(), uint32_t(mine.size()), h);
    }
    const auto rank_in_node = SolvePartition(rp, o.max_sweeps);
    for (uint32_t i = 0; i < items.size(); ++i) p->rank_of[l][items[i]] = n * per_node + rank_in_node[i];
  }
}

}  // namespace

Result<Placement> PlaceExperts(const RoutingTrace& t, uint32_t ranks, const PlacementOptions& o) {
  TE_RETURN_IF_ERROR(t.Validate());
  TE_RETURN_IF_ERROR(CheckShape(t.experts, ranks, o.nodes));
  if (t.experts > kMaxPlacedExperts)
    return InvalidArgument("trace has " + std::to_string(t.experts) + " experts; the solver places at most " +
                           std::to_string(kMaxPlacedExperts));
  if (o.load_slack < 0) return InvalidArgument("load_slack " + std::to_string(o.load_slack) + " must be >= 0");
  const auto load = LayerLoads(t);
  const Placement rr = RoundRobinPlacement(t.layers, t.experts, ranks);
  Placement p = rr;
  for (uint32_t l = 0; l < t.layers; ++l) PlaceLayer(t, l, load[l], o, &p);
  TE_RETURN_IF_ERROR(p.Validate());

  const CostOptions cost{o.nodes, o.home, /*hierarchical=*/true};
  auto mine = CountRecords(t, p, cost);
  auto base = CountRecords(t, rr, cost);
  if (!mine.ok()) return mine.status();
  if (!base.ok()) return base.status();
  if (o.home == TokenHome::kSource) {
    // Layers are independent: keep the better of each.
    for (uint32_t l = 0; l < t.layers; ++l)
      if (Objective(mine->layers[l]) > Objective(base->layers[l])) p.rank_of[l] = rr.rank_of[l];
  } else if (Objective(mine->total()) > Objective(base->total())) {
    p = rr;
  }
  return p;
}

}  // namespace te::moe
