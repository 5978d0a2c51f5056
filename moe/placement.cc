#include "moe/placement.h"

#include <algorithm>
#include <numeric>
#include <queue>
#include <random>

#include "base/checked_math.h"

namespace te::moe {

Status ExpertAffinity::CheckSize(uint32_t layers, uint32_t experts) {
  auto bytes = CheckedProduct("affinity tables ((layers - 1) x experts x experts x 4 bytes)",
                              {layers > 0 ? layers - 1 : 0u, experts, experts, sizeof(uint32_t)}, kMaxTableBytes);
  return bytes.ok() ? Status::Ok() : bytes.status();
}

ExpertAffinity ExpertAffinity::FromTrace(const RoutingTrace& t) {
  ExpertAffinity a;
  a.layers = t.layers;
  a.experts = t.experts;
  const size_t E = t.experts;
  a.pair.assign(t.layers > 0 ? t.layers - 1 : 0, std::vector<uint32_t>(E * E, 0));
  a.load.assign(t.layers, std::vector<uint64_t>(E, 0));
  for (uint32_t tok = 0; tok < t.tokens; ++tok)
    for (uint32_t l = 0; l < t.layers; ++l)
      for (uint32_t k = 0; k < t.topk; ++k) {
        const int e = t.at(tok, l, k);
        if (e < 0) continue;
        a.load[l][e]++;
        if (l + 1 == t.layers) continue;
        for (uint32_t k2 = 0; k2 < t.topk; ++k2) {
          const int n = t.at(tok, l + 1, k2);
          if (n >= 0) a.pair[l][size_t(e) * E + n]++;
        }
      }
  return a;
}

double ExpertAffinity::Conditional(uint32_t layer, uint32_t i, uint32_t j) const {
  const auto& p = pair[layer];
  uint64_t row = 0;
  for (uint32_t k = 0; k < experts; ++k) row += p[size_t(i) * experts + k];
  return row ? double(p[size_t(i) * experts + j]) / double(row) : 0.0;
}

Status CheckShape(uint32_t experts, uint32_t ranks, uint32_t nodes) {
  if (ranks == 0 || experts % ranks != 0)
    return InvalidArgument(std::to_string(experts) + " experts do not split evenly over " + std::to_string(ranks) +
                           " ranks");
  if (nodes == 0 || ranks % nodes != 0)
    return InvalidArgument(std::to_string(ranks) + " ranks do not split evenly into " + std::to_string(nodes) +
                           " nodes");
  return Status::Ok();
}

Status Placement::Validate() const {
  TE_RETURN_IF_ERROR(CheckShape(experts, ranks, 1));
  if (rank_of.size() != layers) return InvalidArgument("placement has the wrong number of layers");
  for (uint32_t l = 0; l < layers; ++l) {
    if (rank_of[l].size() != experts) return InvalidArgument("layer " + std::to_string(l) + " misses experts");
    std::vector<uint32_t> per(ranks, 0);
    for (uint32_t r : rank_of[l]) {
      if (r >= ranks) return OutOfRange("rank " + std::to_string(r) + " outside " + std::to_string(ranks));
      per[r]++;
    }
    for (uint32_t r = 0; r < ranks; ++r)
      if (per[r] != experts / ranks)
        return InvalidArgument("layer " + std::to_string(l) + " puts " + std::to_string(per[r]) + " experts on rank " +
                               std::to_string(r) + "; expected " + std::to_string(experts / ranks));
  }
  return Status::Ok();
}

Placement RoundRobinPlacement(uint32_t layers, uint32_t experts, uint32_t ranks) {
  Placement p{layers, experts, ranks, {}};
  p.rank_of.assign(layers, std::vector<uint32_t>(experts));
  for (auto& layer : p.rank_of)
    for (uint32_t e = 0; e < experts; ++e) layer[e] = e % ranks;
  return p;
}

Placement RandomPlacement(uint32_t layers, uint32_t experts, uint32_t ranks, uint64_t seed) {
  Placement p = RoundRobinPlacement(layers, experts, ranks);
  std::mt19937_64 rng(seed);
  for (auto& layer : p.rank_of) std::shuffle(layer.begin(), layer.end(), rng);
  return p;
}

double LoadImbalance(const std::vector<uint64_t>& load, const std::vector<uint32_t>& rank_of, uint32_t ranks) {
  std::vector<uint64_t> per(ranks, 0);
  uint64_t total = 0;
  for (size_t e = 0; e < load.size(); ++e) {
    per[rank_of[e]] += load[e];
    total += load[e];
  }
  if (total == 0) return 1.0;
  return double(*std::max_element(per.begin(), per.end())) / (double(total) / ranks);
}

namespace {

// score[j * R + r]: how much expert j wants rank r, given neighbours' ranks.
void Score(const ExpertAffinity& a, const Placement& p, uint32_t l, uint32_t nodes, bool backward,
           std::vector<double>* score) {
  const uint32_t E = a.experts, R = p.ranks, per_node = R / nodes;
  score->assign(size_t(E) * R, 0.0);
  const double node_bonus = nodes > 1 ? 0.25 : 0.0;  // same node beats another node
  auto add = [&](uint32_t j, uint32_t r, double w) {
    (*score)[size_t(j) * R + r] += w;
    if (node_bonus > 0) {
      const uint32_t node = r / per_node;
      for (uint32_t r2 = node * per_node; r2 < (node + 1) * per_node; ++r2)
        if (r2 != r) (*score)[size_t(j) * R + r2] += node_bonus * w;
    }
  };
  if (l > 0) {
    const auto& pair = a.pair[l - 1];
    for (uint32_t i = 0; i < E; ++i)
      for (uint32_t j = 0; j < E; ++j)
        if (uint32_t w = pair[size_t(i) * E + j]) add(j, p.rank_of[l - 1][i], w);
  }
  if (backward && l + 1 < a.layers) {
    const auto& pair = a.pair[l];
    for (uint32_t j = 0; j < E; ++j)
      for (uint32_t k = 0; k < E; ++k)
        if (uint32_t w = pair[size_t(j) * E + k]) add(j, p.rank_of[l + 1][k], w);
  }
}

// Pairwise swaps between ranks while they gain and keep loads under the cap
// (or do not make the heavier rank worse).
void SwapSearch(const std::vector<double>& score, const std::vector<uint64_t>& load, uint32_t R, double cap,
                std::vector<uint32_t>* rank_of) {
  const uint32_t E = uint32_t(rank_of->size());
  std::vector<uint64_t> per(R, 0);
  for (uint32_t e = 0; e < E; ++e) per[(*rank_of)[e]] += load[e];
  for (int pass = 0; pass < 20; ++pass) {
    bool improved = false;
    for (uint32_t a = 0; a < E; ++a) {
      for (uint32_t b = a + 1; b < E; ++b) {
        const uint32_t ra = (*rank_of)[a], rb = (*rank_of)[b];
        if (ra == rb) continue;
        const double gain = score[size_t(a) * R + rb] + score[size_t(b) * R + ra] - score[size_t(a) * R + ra] -
                            score[size_t(b) * R + rb];
        if (gain <= 1e-9) continue;
        const uint64_t na = per[ra] - load[a] + load[b], nb = per[rb] - load[b] + load[a];
        const uint64_t worst_now = std::max(per[ra], per[rb]), worst_new = std::max(na, nb);
        if (double(worst_new) > cap && worst_new > worst_now) continue;
        (*rank_of)[a] = rb;
        (*rank_of)[b] = ra;
        per[ra] = na;
        per[rb] = nb;
        improved = true;
      }
    }
    if (!improved) break;
  }
}

// Greedy capacity-constrained assignment of every expert of layer l.
void GreedyLayer(const std::vector<double>& score, const std::vector<uint64_t>& load, uint32_t R, double cap,
                 std::vector<uint32_t>* rank_of) {
  const uint32_t E = uint32_t(rank_of->size()), slots = E / R;
  std::vector<std::pair<double, uint32_t>> cand;  // (score, j * R + r)
  cand.reserve(size_t(E) * R);
  for (uint32_t j = 0; j < E; ++j)
    for (uint32_t r = 0; r < R; ++r)
      if (score[size_t(j) * R + r] > 0) cand.emplace_back(score[size_t(j) * R + r], j * R + r);
  std::sort(cand.begin(), cand.end(), [](auto& x, auto& y) { return x.first > y.first; });
  std::vector<uint32_t> used(R, 0);
  std::vector<uint64_t> per(R, 0);
  std::vector<bool> placed(E, false);
  for (const auto& [s, jr] : cand) {
    const uint32_t j = jr / R, r = jr % R;
    if (placed[j] || used[r] == slots || double(per[r] + load[j]) > cap) continue;
    (*rank_of)[j] = r;
    placed[j] = true;
    used[r]++;
    per[r] += load[j];
  }
  // The rest, heaviest first, onto the least-loaded rank with a free slot.
  std::vector<uint32_t> rest;
  for (uint32_t j = 0; j < E; ++j)
    if (!placed[j]) rest.push_back(j);
  std::sort(rest.begin(), rest.end(), [&](uint32_t x, uint32_t y) { return load[x] > load[y]; });
  for (uint32_t j : rest) {
    uint32_t best = R;
    for (uint32_t r = 0; r < R; ++r)
      if (used[r] < slots && (best == R || per[r] < per[best])) best = r;
    (*rank_of)[j] = best;
    used[best]++;
    per[best] += load[j];
  }
}

}  // namespace

Result<Placement> AffinityPlacement(const ExpertAffinity& a, uint32_t ranks, const PlacementOptions& o) {
  TE_RETURN_IF_ERROR(CheckShape(a.experts, ranks, o.nodes));
  if (a.layers == 0) return InvalidArgument("affinity has no layers");
  if (o.load_slack < 0) return InvalidArgument("load_slack must be >= 0");
  Placement p{a.layers, a.experts, ranks, {}};
  p.rank_of.assign(a.layers, std::vector<uint32_t>(a.experts, 0));
  auto cap_of = [&](uint32_t l) {
    const uint64_t total = std::accumulate(a.load[l].begin(), a.load[l].end(), uint64_t(0));
    const uint64_t heaviest = *std::max_element(a.load[l].begin(), a.load[l].end());
    return std::max((1.0 + o.load_slack) * double(total) / ranks, double(heaviest));
  };
  std::vector<double> score;
  // Forward: each layer follows the one before it.
  for (uint32_t l = 0; l < a.layers; ++l) {
    Score(a, p, l, o.nodes, /*backward=*/false, &score);
    GreedyLayer(score, a.load[l], ranks, cap_of(l), &p.rank_of[l]);
    SwapSearch(score, a.load[l], ranks, cap_of(l), &p.rank_of[l]);
  }
  // Refinement: each layer against both neighbours.
  for (int s = 0; s < o.refine_sweeps; ++s)
    for (uint32_t l = 0; l < a.layers; ++l) {
      Score(a, p, l, o.nodes, /*backward=*/true, &score);
      SwapSearch(score, a.load[l], ranks, cap_of(l), &p.rank_of[l]);
    }
  TE_RETURN_IF_ERROR(p.Validate());
  return p;
}

PlacementStats Evaluate(const RoutingTrace& t, const Placement& p, uint32_t nodes) {
  PlacementStats s;
  const uint32_t per_node = p.ranks / std::max<uint32_t>(1, nodes);
  uint64_t rank_hops = 0, node_hops = 0;
  std::vector<uint32_t> prev_ranks;
  for (uint32_t tok = 0; tok < t.tokens; ++tok) {
    for (uint32_t l = 1; l < t.layers; ++l) {
      prev_ranks.clear();
      for (uint32_t k = 0; k < t.topk; ++k)
        if (int e = t.at(tok, l - 1, k); e >= 0) prev_ranks.push_back(p.rank_of[l - 1][e]);
      for (uint32_t k = 0; k < t.topk; ++k) {
        const int e = t.at(tok, l, k);
        if (e < 0) continue;
        const uint32_t r = p.rank_of[l][e];
        bool same_rank = false, same_node = false;
        for (uint32_t pr : prev_ranks) {
          same_rank |= pr == r;
          same_node |= pr / per_node == r / per_node;
        }
        rank_hops += !same_rank;
        node_hops += !same_node;
      }
    }
  }
  s.cross_rank_hops_per_token = double(rank_hops) / t.tokens;
  s.cross_node_hops_per_token = double(node_hops) / t.tokens;
  const ExpertAffinity a = ExpertAffinity::FromTrace(t);
  for (uint32_t l = 0; l < t.layers; ++l)
    s.max_load_imbalance = std::max(s.max_load_imbalance, LoadImbalance(a.load[l], p.rank_of[l], p.ranks));
  return s;
}

Result<Replication> ReplicateHotExperts(const std::vector<uint64_t>& load, uint32_t ranks, uint32_t slots_per_rank) {
  const uint32_t E = uint32_t(load.size());
  if (ranks == 0 || uint64_t(ranks) * slots_per_rank < E)
    return InvalidArgument(std::to_string(ranks) + " ranks x " + std::to_string(slots_per_rank) +
                           " slots cannot hold " + std::to_string(E) + " experts");
  Replication rep;
  rep.replicas.assign(E, 1);
  // Extra slots to the expert with the most load per replica.
  using Item = std::pair<double, uint32_t>;
  std::priority_queue<Item> heap;
  for (uint32_t e = 0; e < E; ++e) heap.emplace(double(load[e]), e);
  for (uint64_t extra = uint64_t(ranks) * slots_per_rank - E; extra > 0; --extra) {
    auto [w, e] = heap.top();
    heap.pop();
    if (rep.replicas[e] >= ranks) {  // one replica per rank at most
      ++extra;
      if (heap.empty()) break;
      continue;
    }
    rep.replicas[e]++;
    heap.emplace(double(load[e]) / rep.replicas[e], e);
  }
  // Pack replicas heaviest first onto the least-loaded rank with room.
  std::vector<Item> items;
  for (uint32_t e = 0; e < E; ++e)
    for (uint32_t k = 0; k < rep.replicas[e]; ++k) items.emplace_back(double(load[e]) / rep.replicas[e], e);
  std::sort(items.begin(), items.end(), std::greater<>());
  rep.experts_on_rank.assign(ranks, {});
  std::vector<double> per(ranks, 0);
  for (const auto& [w, e] : items) {
    uint32_t best = ranks;
    for (uint32_t r = 0; r < ranks; ++r) {
      const auto& on = rep.experts_on_rank[r];
      if (on.size() >= slots_per_rank || std::find(on.begin(), on.end(), e) != on.end()) continue;
      if (best == ranks || per[r] < per[best]) best = r;
    }
    if (best == ranks) return Internal("no rank left for a replica of expert " + std::to_string(e));
    rep.experts_on_rank[best].push_back(e);
    per[best] += w;
  }
  const double total = std::accumulate(per.begin(), per.end(), 0.0);
  rep.imbalance = total > 0 ? *std::max_element(per.begin(), per.end()) / (total / ranks) : 1.0;
  return rep;
}

}  // namespace te::moe
