// Expert placement for MoE expert parallelism: the Placement type (each
// layer's experts on ranks, an equal number per rank where the ranks divide
// the experts, ranks grouped into nodes), the baselines (round-robin, random), trace statistics (loads,
// inter-layer affinity, hop counts) and EPLB-style replication. The solver
// that fits a placement to a trace: moe/placement_solver.h; the bytes a
// placement makes dispatch move: moe/dispatch_cost.h.
#pragma once

#include <cstdint>
#include <vector>

#include "base/status.h"
#include "moe/expert_map.h"
#include "moe/routing_trace.h"

namespace te::moe {

// Token counts from a trace: pair[l][i * E + j] = tokens with expert i at
// layer l and expert j at layer l+1 (over all top-k pairs); load[l][e] =
// tokens routed to expert e at layer l.
struct ExpertAffinity {
  uint32_t layers = 0, experts = 0;
  std::vector<std::vector<uint32_t>> pair;  // layers - 1 entries
  std::vector<std::vector<uint64_t>> load;  // layers entries

  // The tables are dense: (layers - 1) x experts^2 counters. A trace may
  // declare up to 32767 experts, which would need gigabytes per layer, so
  // callers check the size first; FromTrace on a refused shape is a bug.
  static constexpr uint64_t kMaxTableBytes = uint64_t(1) << 30;
  static Status CheckSize(uint32_t layers, uint32_t experts);
  static ExpertAffinity FromTrace(const RoutingTrace& trace);
  // P(j at l+1 | i at l); 0 when i never appears at layer l.
  double Conditional(uint32_t layer, uint32_t i, uint32_t j) const;
};

struct Placement {
  uint32_t layers = 0, experts = 0, ranks = 0;
  std::vector<std::vector<uint32_t>> rank_of;  // [layer][expert]: the primary copy
  // Replicas beyond the primary: replicas[layer][expert] = their ranks. Empty
  // (or empty lists) when nothing is replicated.
  std::vector<std::vector<std::vector<uint32_t>>> replicas;
  // Token splits per layer (ExpertMap's TokenSplit): how a source's tokens of
  // a replicated expert are shared among its copies. Empty when none.
  std::vector<std::vector<TokenSplit>> splits;
  // How each layer's dispatch chooses among an expert's copies
  // (ExpertMap's ReplicaChoice). Empty: kBySource everywhere.
  std::vector<ReplicaChoice> choice;
  // Every expert's primary on a rank in range, no rank holding more than
  // PrimarySlots(experts, ranks) primaries (so exactly experts / ranks each
  // where ranks divide the experts); replicas on ranks in range, none on a
  // rank that already holds the expert, at most ReplicaSlots per rank and
  // layer.
  Status Validate(uint32_t extra_slots = 0) const;
  // Replicas rank r may hold at layer l: `extra_slots` beyond its primary
  // slots, plus the primary slots its primaries leave free (none where
  // ranks divide the experts), so every rank holds at most
  // PrimarySlots + extra_slots copies.
  std::vector<uint32_t> ReplicaSlots(uint32_t layer, uint32_t extra_slots) const;
  // Layer l as a dispatch map (ranks r of node r / (ranks / nodes)).
  Result<ExpertMap> Map(uint32_t layer, uint32_t nodes) const;
  // Ranks holding expert e at layer l, primary first.
  std::vector<uint32_t> RanksOf(uint32_t layer, uint32_t expert) const;
};

// A shape placements take: 1 .. kMaxPlacementRanks ranks (the tables a
// placement's count keeps grow with the ranks), and nodes of equal size.
// The experts need not divide over the ranks: with 60 experts on 8 ranks
// each rank has 8 slots for primaries and four stay empty (dispatch takes
// ranks with different numbers of experts).
inline constexpr uint32_t kMaxPlacementRanks = 32768;
Status CheckShape(uint32_t experts, uint32_t ranks, uint32_t nodes);
// Primary slots per rank: ceil(experts / ranks).
uint32_t PrimarySlots(uint32_t experts, uint32_t ranks);
Placement RoundRobinPlacement(uint32_t layers, uint32_t experts, uint32_t ranks);
Placement RandomPlacement(uint32_t layers, uint32_t experts, uint32_t ranks, uint64_t seed);

struct PlacementStats {
  // Per token, summed over layer transitions: experts at layer l+1 on a rank
  // (node) that holds none of the token's experts at layer l.
  double cross_rank_hops_per_token = 0;
  double cross_node_hops_per_token = 0;
  double max_load_imbalance = 0;       // max over layers of (max rank load / mean)
  double max_node_load_imbalance = 0;  // the same per node
};
PlacementStats Evaluate(const RoutingTrace& trace, const Placement& placement, uint32_t nodes);

// EPLB-style: `slots_per_rank` * ranks slots (>= experts) for one layer; the
// extra slots go one by one to the expert with the highest load per replica,
// and replicas are packed heaviest first onto the least-loaded rank with a
// free slot that does not hold the expert yet.
struct Replication {
  std::vector<std::vector<uint32_t>> experts_on_rank;  // replicas per rank
  std::vector<uint32_t> replicas;                      // per expert
  double imbalance = 0;                                // max rank load / mean
};
Result<Replication> ReplicateHotExperts(const std::vector<uint64_t>& load, uint32_t ranks, uint32_t slots_per_rank);
// max rank load / mean for one layer of a placement.
double LoadImbalance(const std::vector<uint64_t>& load, const std::vector<uint32_t>& rank_of, uint32_t ranks);
// max node load / mean (ranks r of node r / (ranks / nodes)).
double NodeLoadImbalance(const std::vector<uint64_t>& load, const std::vector<uint32_t>& rank_of, uint32_t ranks,
                         uint32_t nodes);
// load[l][e]: tokens routed to expert e at layer l.
std::vector<std::vector<uint64_t>> LayerLoads(const RoutingTrace& trace);

}  // namespace te::moe
