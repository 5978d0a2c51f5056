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
  if (ranks == 0 || ranks > kMaxPlacementRanks)
    return InvalidArgument(std::to_string(ranks) + " ranks outside [1, " + std::to_string(kMaxPlacementRanks) + "]");
  if (nodes == 0 || ranks % nodes != 0)
    return InvalidArgument(std::to_string(ranks) + " ranks do not split evenly into " + std::to_string(nodes) +
                           " nodes");
  return Status::Ok();
}

uint32_t PrimarySlots(uint32_t experts, uint32_t ranks) { return ranks ? (experts + ranks - 1) / ranks : 0; }

Status Placement::Validate(uint32_t extra_slots) const {
  TE_RETURN_IF_ERROR(CheckShape(experts, ranks, 1));
  if (rank_of.size() != layers) return InvalidArgument("placement has the wrong number of layers");
  if (!splits.empty() && splits.size() != layers)
    return InvalidArgument("placement has token splits for " + std::to_string(splits.size()) + " of " +
                           std::to_string(layers) + " layers");
  if (!choice.empty() && choice.size() != layers)
    return InvalidArgument("placement has a replica choice for " + std::to_string(choice.size()) + " of " +
                           std::to_string(layers) + " layers");
  if (!replicas.empty() && replicas.size() != layers)
    return InvalidArgument("placement has replicas for " + std::to_string(replicas.size()) + " of " +
                           std::to_string(layers) + " layers");
  for (uint32_t l = 0; l < layers; ++l) {
    if (rank_of[l].size() != experts) return InvalidArgument("layer " + std::to_string(l) + " misses experts");
    std::vector<uint32_t> per(ranks, 0), extra(ranks, 0);
    for (uint32_t r : rank_of[l]) {
      if (r >= ranks) return OutOfRange("rank " + std::to_string(r) + " outside " + std::to_string(ranks));
      per[r]++;
    }
    const uint32_t slots = PrimarySlots(experts, ranks);
    for (uint32_t r = 0; r < ranks; ++r)
      if (per[r] > slots)
        return InvalidArgument("layer " + std::to_string(l) + " puts " + std::to_string(per[r]) + " experts on rank " +
                               std::to_string(r) + "; at most " + std::to_string(slots) + " (" +
                               std::to_string(experts) + " experts over " + std::to_string(ranks) + " ranks)");
    if (replicas.empty()) continue;
    if (replicas[l].size() != experts && !replicas[l].empty())
      return InvalidArgument("layer " + std::to_string(l) + " has replica lists for " +
                             std::to_string(replicas[l].size()) + " of " + std::to_string(experts) + " experts");
    for (uint32_t e = 0; e < replicas[l].size(); ++e) {
      const auto on = RanksOf(l, e);
      for (size_t j = 1; j < on.size(); ++j) {
        if (on[j] >= ranks)
          return OutOfRange("replica rank " + std::to_string(on[j]) + " outside " + std::to_string(ranks));
        if (std::find(on.begin(), on.begin() + j, on[j]) != on.begin() + j)
          return InvalidArgument("layer " + std::to_string(l) + " puts expert " + std::to_string(e) +
                                 " twice on rank " + std::to_string(on[j]));
        if (++extra[on[j]] > extra_slots + slots - per[on[j]])
          return InvalidArgument("layer " + std::to_string(l) + " puts more than " +
                                 std::to_string(extra_slots + slots - per[on[j]]) + " replicas on rank " +
                                 std::to_string(on[j]) + " (" + std::to_string(extra_slots) +
                                 " extra slots, and its free primary slots)");
      }
    }
  }
  // The map checks every split (expert, source, a rank holding it, shares).
  for (uint32_t l = 0; l < splits.size(); ++l) {
    if (splits[l].empty()) continue;
    auto m = Map(l, 1);
    if (!m.ok()) return InvalidArgument("layer " + std::to_string(l) + ": " + m.status().message());
  }
  return Status::Ok();
}

std::vector<uint32_t> Placement::ReplicaSlots(uint32_t layer, uint32_t extra_slots) const {
  const uint32_t slots = PrimarySlots(experts, ranks);
  std::vector<uint32_t> free(ranks, extra_slots + slots);
  for (uint32_t r : rank_of[layer])
    if (r < ranks && free[r] > extra_slots) free[r]--;
  return free;
}

std::vector<uint32_t> Placement::RanksOf(uint32_t layer, uint32_t expert) const {
  std::vector<uint32_t> on{rank_of[layer][expert]};
  if (layer < replicas.size() && expert < replicas[layer].size())
    on.insert(on.end(), replicas[layer][expert].begin(), replicas[layer][expert].end());
  return on;
}

Result<ExpertMap> Placement::Map(uint32_t layer, uint32_t nodes) const {
  std::vector<std::vector<uint32_t>> on(experts);
  for (uint32_t e = 0; e < experts; ++e) on[e] = RanksOf(layer, e);
  static const std::vector<TokenSplit> kNone;
  return ExpertMap::WithReplicas(std::move(on), ranks, nodes, layer < splits.size() ? splits[layer] : kNone,
                                 layer < choice.size() ? choice[layer] : ReplicaChoice::kBySource);
}

Placement RoundRobinPlacement(uint32_t layers, uint32_t experts, uint32_t ranks) {
  Placement p{layers, experts, ranks, {}, {}};
  p.rank_of.assign(layers, std::vector<uint32_t>(experts));
  if (ranks == 0) return p;  // every expert on rank 0 of none: Validate refuses it
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

double NodeLoadImbalance(const std::vector<uint64_t>& load, const std::vector<uint32_t>& rank_of, uint32_t ranks,
                         uint32_t nodes) {
  std::vector<uint32_t> node_of(rank_of.size());
  for (size_t e = 0; e < rank_of.size(); ++e) node_of[e] = rank_of[e] / (ranks / nodes);
  return LoadImbalance(load, node_of, nodes);
}

std::vector<std::vector<uint64_t>> LayerLoads(const RoutingTrace& t) {
  std::vector<std::vector<uint64_t>> load(t.layers, std::vector<uint64_t>(t.experts, 0));
  for (uint32_t tok = 0; tok < t.tokens; ++tok)
    for (uint32_t l = 0; l < t.layers; ++l)
      for (uint32_t k = 0; k < t.topk; ++k)
        if (const int e = t.at(tok, l, k); e >= 0) load[l][e]++;
  return load;
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
  const auto load = LayerLoads(t);
  for (uint32_t l = 0; l < t.layers; ++l) {
    s.max_load_imbalance = std::max(s.max_load_imbalance, LoadImbalance(load[l], p.rank_of[l], p.ranks));
    s.max_node_load_imbalance =
        std::max(s.max_node_load_imbalance, NodeLoadImbalance(load[l], p.rank_of[l], p.ranks, std::max(1u, nodes)));
  }
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
