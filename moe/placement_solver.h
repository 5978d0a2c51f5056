// PlaceExperts: fits an expert placement to a routing trace so that
// dispatch and combine move as few records as possible across ranks and
// across nodes, counted as moe/dispatch_cost.h counts them (per-rank
// deduplication; node-level deduplication for the node term).
//
// How: layer by layer, a balanced partition of the layer's experts first
// into nodes (minimizing the distinct nodes a token's experts sit on), then,
// inside each node, into its ranks (distinct ranks), each under a load cap
// (moe/expert_partition.h). With TokenHome::kTop1 the rank a token is
// dispatched from (fixed by the previous layer's placement) counts as a
// place the token already is, which is how inter-layer affinity enters
// (and each layer also tries assigning every expert straight to the rank
// holding most of its tokens, kept where that sends fewer records);
// with kSource a token's source rank is unrelated to its routing, so only
// co-activation within a layer matters.
//
// Guarantees: every rank holds experts / ranks primaries of every layer
// (plus up to extra_slots replicas); where the ranks do not divide the
// experts, at most PrimarySlots(experts, ranks), the free slots where the
// balancing put them (moe/placement.h). Without replicas, on the fitted trace
// the placement never moves more records (rank + node) than round-robin:
// for kSource each layer keeps the better of the two, for kTop1 the whole
// placement does. Replicas trade some of that for balance (below), so the
// guarantee covers the primaries as placed before the balancing pass. A
// node's (rank's) load stays under (1 + load_slack) x mean where swaps can
// bring it there (a single expert heavier than that is its own cap; a layer
// where round-robin sends fewer records keeps round-robin's loads).
// Deterministic.
#pragma once

#include <cstdint>
#include <optional>

#include "base/status.h"
#include "moe/dispatch_cost.h"
#include "moe/placement.h"
#include "moe/routing_trace.h"

namespace te::moe {

struct PlacementOptions {
  uint32_t nodes = 1;  // ranks r of node r / (ranks / nodes)
  TokenHome home = TokenHome::kSource;
  double load_slack = 0.25;
  int max_sweeps = 20;  // swap passes per partition
  // Replica slots per rank and layer beyond the primaries' slots,
  // used on layers whose expert loads differ beyond the fitted trace's
  // sampling noise (a layer of equally popular experts gets none and is
  // placed as without replicas: copies there balance only that noise).
  // Loads are shrunk towards the layer mean by the share of their spread
  // that sampling noise explains, so balancing does not fit noise. Copies
  // go one by one to the expert with the most load per copy, and
  // primaries are then partitioned by load per copy (ranks and nodes held to
  // min(load_slack, 5%)). Each replica goes to the rank, among those with a
  // free slot and near the mean load, where the fitted trace's tokens of
  // that expert send the fewest records under ExpertMap's replica rule;
  // every slot of a replicated layer is used (the extra slots and the
  // primary slots left free where the ranks do not divide the experts).
  // Then, on exact loads under that rule:
  //  1. unreplicated primaries are exchanged between heavier and lighter
  //     ranks, towards the mean;
  //  2. copies are exchanged off the heaviest rank (same node first) while
  //     that lowers it; where none does, a replica of an expert on it trades
  //     places with a replica elsewhere (towards the expert's sources).
  // An exchange that moves an unreplicated primary to another rank (1) or
  // node (2) is made only where the records it adds on the fitted trace are
  // within that trace's sampling noise (3 sqrt(tokens), or 1%): experts
  // tied to their place by co-activation stay.
  //  3. token splits (Placement::splits, ExpertMap's TokenSplit): while the
  //     heaviest rank is above the mean, shares of single sources' tokens of
  //     replicated experts move off it along the cheapest path of shifts
  //     between copies to a rank below the mean, none adding more than two
  //     records (rank + node) per moved token on the fitted trace.
  // How dispatch chooses among copies (Placement::choice, ExpertMap's
  // ReplicaChoice). Unset: each replicated layer is built by source (steps
  // 1-3), then its copies are counted as they are with kReachedRank and with
  // kReachedNode; a choice that saves at least 5% of the layer's records
  // there gets a build of its own (Replicate and the balancing price its
  // routes; no token splits), the larger saving first and the other only
  // where that build is not kept. The layer keeps the fewest records among
  // those whose rank and node imbalance on the fitted trace stay within
  // 1 + min(load_slack, 5%), or within that trace's sampling noise
  // (1 / sqrt(pairs per rank)) of the by-source build's. Set: every
  // replicated layer is built with the one given.
  std::optional<ReplicaChoice> replica_choice;
  uint32_t extra_slots = 0;
};

// At most this many experts (the solver keeps an experts^2 table per layer).
inline constexpr uint32_t kMaxPlacedExperts = 4096;

Result<Placement> PlaceExperts(const RoutingTrace& fitted, uint32_t ranks, const PlacementOptions& options);

}  // namespace te::moe
