// HierarchicalDispatcher: MoE dispatch and combine with node-level
// deduplication. A token bound for several ranks of one remote node crosses
// the network once, to one rank of that node (its relay), which forwards it
// to the expert ranks of its node. Combine runs the other way: the expert
// ranks return their partial sums to the relay, the relay sums them into one
// partial for the node, and only that crosses back. This is the internode
// mode of DeepEP, over WriteImm and ImmCounter only, so it runs on any
// provider. The interface is EpDispatcher's (ep_dispatcher.h):
//
//   auto d = HierarchicalDispatcher::Create(engine, config, nodes).value();
//   d->Connect(infos_of_all_ranks);  // infos[r] = rank r's LocalInfo()
//   d->Dispatch(batch, map, &result);
//   ... run the experts ...
//   d->Combine(outputs, result, out);
//
// Nodes: ranks r of node r / (ranks / nodes), the split ExpertMap uses.
// Rank s's relay in node n is the rank of node n with s's index inside its
// node (rank n * L + s % L, L ranks per node), so the relays of one source
// are spread evenly and every rank relays for one source per node. For its
// own node a rank is its own relay.
//
// How it is built: two EpDispatchers on the same engine.
//  - Across nodes: the whole group, with virtual experts (relay, expert):
//    one record per token per node it needs, carrying the token's experts
//    on that node and their router weights. Nothing goes to the own rank.
//  - Inside each node: the node's ranks; each relay dispatches the rows it
//    received to the ranks holding their experts, exactly the replica
//    ExpertMap::Route names, as the flat dispatcher would (the relay asks
//    ExpertMap::RankAtNode: the token's key travels in the record's tag, and
//    a relay sees only its node's part of the row).
// Records between ranks: per token, one per remote node it needs, plus one
// per rank of each node it needs other than that node's relay
// (dispatch_cost.h, RecordCount::relayed, counts them exactly).
//
// Differences from EpDispatcher, both written into the results:
//  - An expert's tokens come grouped by relay: ExpertTokens::src_rank is the
//    relay's rank and src_token the token's row at the relay (the relay
//    receives rows in source-rank, source-token order). Weights and bytes
//    are the source's.
//  - Combine sums in three steps, fixed so every run gives the same bits: an
//    expert rank sums weight x output over the token's experts there, in
//    top-k order (float from 0, rounded to bf16: a rank partial); the relay
//    sums its node's rank partials in rank order (a node partial, bf16); the
//    source sums the node partials in node order (bf16).
//    ReferenceHierarchicalCombine (dispatch_reference.h) is that definition.
//  - The result's handle carries only seq, tokens, and sent_to / recv_from:
//    the records this rank sent to / received from each rank in both steps
//    (combine returns one row per record). The rest stays inside.
//
// Memory: the relay receives up to nodes x max_tokens rows, so the inside
// dispatcher is sized for that. Immediates: imm_base + 0 .. 5 across nodes
// and imm_base + 10 .. 15 inside (transfer/imm_ranges.h), so an
// EpDispatcher or LowLatencyDispatcher cannot share the engine with it at
// the same imm_base.
//
// Failure and threads: as EpDispatcher. A failure in either step fails the
// call and every later one (kUnavailable).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "base/status.h"
#include "moe/call_sequence.h"
#include "moe/dispatch_types.h"
#include "moe/ep_config.h"
#include "moe/ep_dispatcher.h"
#include "moe/expert_map.h"
#include "transfer/transfer_engine.h"

namespace te::moe {

class HierarchicalDispatcher {
 public:
  // Immediates of the dispatch inside a node: config.imm_base + this.
  static constexpr uint32_t kInsideImmOffset = 10;

  // `nodes` divides config.ranks; ranks x experts must stay within 65535
  // (the virtual experts of the step across nodes). `engine` outlives it.
  static Result<std::unique_ptr<HierarchicalDispatcher>> Create(TransferEngine* engine, const EpConfig& config,
                                                                uint32_t nodes);
  ~HierarchicalDispatcher();

  std::string LocalInfo() const;
  Status Connect(const std::vector<std::string>& infos);

  // `map` must have config.ranks ranks; with replicas it must have been built
  // for the same nodes.
  Status Dispatch(const TokenBatch& batch, const ExpertMap& map, DispatchResult* out);
  Status Combine(const ExpertOutputs& outputs, const DispatchResult& dispatched, uint16_t* out);

  const EpConfig& config() const { return config_; }
  uint32_t nodes() const { return nodes_; }
  size_t buffer_bytes() const;
  // Records this rank sent to other ranks so far: across nodes (each one a
  // network crossing when the ranks are on different hosts) and inside its
  // node (as a relay).
  uint64_t records_across_nodes() const { return across_sent_; }
  uint64_t records_inside_node() const { return inside_sent_; }

 private:
  HierarchicalDispatcher(const EpConfig& config, uint32_t nodes);
  Status Fail(Status s) { return calls_.Fail(s); }

  EpConfig config_;
  uint32_t nodes_, per_node_, node_, local_;
  std::unique_ptr<EpDispatcher> across_, inside_;
  ExpertMap across_map_, inside_map_;  // virtual experts (rank, expert), fixed
  CallSequence calls_;
  uint64_t across_sent_ = 0, inside_sent_ = 0;
  // State of the pending dispatch.
  std::vector<uint16_t> keys_;     // [tokens] ExpertMap::TokenKey of each row
  std::vector<uint32_t> dest_;     // [topk] one row's destinations (ExpertMap::Route)
  std::vector<uint32_t> reached_;  // [topk + 1] ranks of this node one relayed row reaches
  std::vector<int32_t> idx_;       // virtual top-k: across nodes, then inside
  std::vector<uint8_t> rows_;      // relayed token bytes [rows, token_bytes]
  std::vector<float> scales_;      // relayed fp8 scales
  std::vector<float> weights_;     // relayed weights [rows, topk]
  SendPlan plan_;
  DispatchResult across_result_, inside_result_;
  std::vector<const uint8_t*> records_;          // received rows across nodes, in the receive region
  std::vector<const uint16_t*> inside_outputs_;  // [experts]: the caller's outputs by expert id
};

}  // namespace te::moe
