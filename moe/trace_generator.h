// Synthetic routing traces from three models with different structure, and
// for each the best placement its known structure suggests (an oracle the
// solver, which sees only a trace, is measured against).
//
//  - kSuccessorChain: a token's k-th expert at layer l+1 is the planted
//    successor of its k-th expert at layer l with probability `affinity`
//    (structure across layers, none within a layer).
//  - kCoactivationGroups: each layer's experts are split into groups of
//    `group_size`; a token belongs to one latent group and draws each of its
//    experts from that group's experts with probability `affinity` (structure
//    within a layer: a token's experts sit together).
//  - kPopularity: experts drawn by popularity only (Zipf `skew`), no
//    structure a placement can exploit beyond load.
//
// Every model draws the rest of a token's experts by popularity (Zipf over a
// random permutation per layer). `seed` fixes the model, `sample_seed` the
// tokens: two sample seeds give two independent traces of one model, which
// is how placements are judged on traces they were not fitted on.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"
#include "moe/placement.h"
#include "moe/routing_trace.h"

namespace te::moe {

enum class TraceModel { kSuccessorChain, kCoactivationGroups, kPopularity };
const char* TraceModelName(TraceModel model);
// "chain", "groups" or "popularity".
Result<TraceModel> ParseTraceModel(const std::string& name);

struct TraceOptions {
  uint32_t tokens = 4096, layers = 8, topk = 8, experts = 64;
  TraceModel model = TraceModel::kSuccessorChain;
  // chain: P(follow the planted successor); groups: P(draw from the token's
  // group); ignored by kPopularity. In [0, 1].
  double affinity = 0.8;
  double skew = 0.5;         // Zipf exponent of expert popularity (0 = uniform)
  uint32_t group_size = 16;  // groups: experts per group, divides experts
  uint64_t seed = 1;
  uint64_t sample_seed = 0;
};
Result<RoutingTrace> GenerateTrace(const TraceOptions& options);

// The placement the model's structure suggests for `ranks` ranks in `nodes`
// nodes (an equal number of experts per rank):
//  - groups: each group's experts on consecutive ranks of one node (a group
//    larger than a node's experts spans consecutive nodes);
//  - chain, with `follow_top1` (tokens dispatched from their previous top-1
//    expert's rank): each expert's successor on the expert's rank; without
//    it the model has no within-layer structure, so round-robin;
//  - popularity: round-robin.
Result<Placement> OraclePlacement(const TraceOptions& options, uint32_t ranks, uint32_t nodes, bool follow_top1);

}  // namespace te::moe
