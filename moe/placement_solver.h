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
// place the token already is, which is how inter-layer affinity enters;
// with kSource a token's source rank is unrelated to its routing, so only
// co-activation within a layer matters.
//
// Guarantees: every rank holds experts / ranks primaries of every layer
// (plus up to extra_slots replicas); on the fitted trace the primaries never
// move more records (rank + node) than round-robin's: for kSource each layer
// keeps the better of the two, for kTop1 the whole placement does. Loads: a node's (rank's) load stays
// under (1 + load_slack) x mean where the swaps allow (a single expert
// heavier than that is its own cap); replication (moe/placement.h) is what
// brings imbalance down further. Deterministic.
#pragma once

#include <cstdint>

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
  // Replica slots per rank and layer beyond the experts / ranks primaries.
  // They go to the experts with the most load per copy (EPLB's rule), and
  // each replica to a rank of a node holding no copy yet where possible
  // (sources of that node then stay inside it), the least loaded, and among
  // nearly equally loaded ranks the one whose experts share the most tokens
  // with it (those tokens already send a record there).
  uint32_t extra_slots = 0;
};

// At most this many experts (the solver keeps an experts^2 table per layer).
inline constexpr uint32_t kMaxPlacedExperts = 4096;

Result<Placement> PlaceExperts(const RoutingTrace& fitted, uint32_t ranks, const PlacementOptions& options);

}  // namespace te::moe
