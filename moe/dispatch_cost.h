// What dispatch and combine move for a routing trace under a placement,
// counted the way both dispatchers (moe/ep_dispatcher.h, moe/ll_dispatcher.h)
// move it: one record per token per distinct destination rank, however many
// of the token's experts live there, and none to the token's own rank;
// combine returns one partial row per record. A replicated expert's tokens
// go to the replica ExpertMap::Route picks for the token's home rank and
// its row (token splits and reached-node choice included), as in dispatch. The count is exact: replaying a trace
// through the dispatchers sends these records (MoeDispatch.TraceReplay*, MoeLowLatency.TraceReplay*).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"
#include "moe/placement.h"
#include "moe/routing_trace.h"

namespace te::moe {

// Which rank a token is dispatched from at each layer.
enum class TokenHome {
  // Rank t % ranks at every layer: combine returns every token to its source
  // (the normal mode; attention runs where the token's KV cache is).
  kSource,
  // Rank t % ranks at layer 0; afterwards the rank of the token's top-1
  // expert at the layer before (combine merges there, and the next layer
  // starts from there: context-coherent dispatch).
  kTop1,
};
const char* TokenHomeName(TokenHome home);
// "source" or "top1".
Result<TokenHome> ParseTokenHome(const std::string& name);

struct CostOptions {
  uint32_t nodes = 1;  // ranks r of node r / (ranks / nodes)
  TokenHome home = TokenHome::kSource;
  // Node-level deduplication: a token crosses the network once per remote
  // node that holds any of its experts, to one rank there, which forwards it
  // inside the node. Without it, every record to a remote rank crosses.
  bool hierarchical = false;
};

struct RecordCount {
  uint64_t rank = 0;  // records to another rank (dispatch; combine returns as many)
  uint64_t node = 0;  // of those, network crossings between nodes
  // hierarchical: records between ranks as HierarchicalDispatcher sends them,
  // a token's home its own relay: one to the relay of each remote node the
  // token needs (rank n * L + home % L, L ranks per node; these are `node`),
  // plus one from each node's relay to every other rank there holding the
  // token's experts. Combine returns as many.
  uint64_t relayed = 0;
  // kTop1: tokens whose home at this layer is not their source rank. Each
  // needs its attention context (KV cache) where it now is: what makes
  // context-coherent dispatch legal, and what it costs beyond the records.
  uint64_t away_from_source = 0;
  // kTop1: combine merges on the token's next home (CoherentDispatcher):
  // one rank partial from every rank holding its experts other than that
  // home. `merged` counts those records, `merged_node` the ones between
  // nodes. With kSource combine returns as many records as dispatch sent.
  uint64_t merged = 0;
  uint64_t merged_node = 0;
};

struct DispatchCost {
  std::vector<RecordCount> layers;
  std::vector<std::vector<uint64_t>> rank_load;  // [layer][rank]: (token, expert) pairs computed there
  uint32_t tokens = 0;
  RecordCount total() const;
  // Per token and layer, for tables.
  double rank_per_token_layer() const;
  double node_per_token_layer() const;
  // Max over layers of (max load / mean), per rank and per node.
  double max_rank_imbalance() const;
  double max_node_imbalance(uint32_t nodes) const;
};

// Fails when the shapes disagree or the ranks do not split into the nodes.
Result<DispatchCost> CountRecords(const RoutingTrace& trace, const Placement& placement, const CostOptions& options);
// One layer of CountRecords (the homes of the layers before it included),
// and the (token, expert) pairs each rank computes there.
// `homes`: the tokens' homes at that layer where the caller has them (from
// AdvanceHomes); else computed from the layers before it.
Result<RecordCount> CountLayerRecords(const RoutingTrace& trace, const Placement& placement, const CostOptions& options,
                                      uint32_t layer, std::vector<uint64_t>* rank_load = nullptr,
                                      const std::vector<uint32_t>* homes = nullptr);
// kTop1: every token's home at layer + 1 from its home at `layer` (where
// `map`, that layer's, routes its first slot; a token whose first slot is
// empty stays).
void AdvanceHomes(const RoutingTrace& trace, const ExpertMap& map, uint32_t layer, std::vector<uint32_t>* homes);

// The home rank of every token at `layer` (the rule above); with kTop1 the
// rank that computed the token's top-1 expert, replicas included.
std::vector<uint32_t> TokenHomes(const RoutingTrace& trace, const Placement& placement, TokenHome home, uint32_t layer,
                                 uint32_t nodes);

}  // namespace te::moe
