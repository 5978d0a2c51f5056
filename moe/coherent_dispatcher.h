// CoherentDispatcher: context-coherent MoE dispatch and combine (ExFlow).
// Dispatch is EpDispatcher's; combine does not return a token's output to
// the rank that dispatched it but merges it on the rank of its top-1 expert,
// and the token's next layer starts from there. A token whose experts sit
// together then stays where they are, and its next dispatch is local.
//
//   auto d = CoherentDispatcher::Create(engine, config).value();
//   d->Connect(infos_of_all_ranks);           // infos[r] = rank r's LocalInfo()
//   for each layer:
//     d->Dispatch(batch, ids, map, &result);  // ids[t]: the caller's name of token t
//     ... run the experts ...
//     d->Combine(outputs, result, &merged);   // the tokens that now live here
//     batch = merged tokens (their ids, their data, the next layer's routing)
//
// Merge rank of a token: the rank that computes its top-1 expert, where
// map.Route sends slot 0 (replicas, splits and replica choice included). A token
// whose first slot is -1 merges where it was dispatched from; one without
// any expert stays there with zeros. This is dispatch_cost.h's
// TokenHome::kTop1 rule, so CountRecords with kTop1 predicts the records
// exactly: RecordCount::rank for dispatch, RecordCount::merged for combine.
//
// What makes this legal is not the dispatcher's business: a token's
// attention at the next layer needs its context (KV cache) on the rank it
// now lives on. RecordCount::away_from_source counts the tokens that need
// it; te-moe place and te-moe bench put that cost beside the records.
//
// How it is built: two EpDispatchers on one engine.
//  - Dispatch: the group's map. Records name tokens by the caller's id (so
//    ExpertTokens::src_token is the id) and carry the merge rank.
//  - Merge: virtual expert r on rank r, top-1. Each rank sends, for every
//    row it received, its rank partial (weight x output summed over the
//    token's experts there, in top-k order, float from 0, rounded to bf16)
//    to the token's merge rank, with (dispatching rank, id) appended to the
//    row. The merge rank sums a token's partials in rank order (float from
//    0, bf16): exactly EpDispatcher's combine arithmetic, so a merged token
//    equals ReferenceCombine's output for it bit for bit.
// Merged tokens come in (dispatching rank, id) order. Ids must be distinct
// within a rank's batch (Dispatch checks); a group-wide token id is.
//
// Top-1 groups (config.topk == 1) have no merge step: a token's one expert
// runs on its merge rank, so its output is already where it merges, and
// Combine is local (the same arithmetic, bit for bit). A layer is then one
// exchange, the dispatch: ExFlow's single all-to-all per layer. With top-k >
// 1 the merge step cannot be folded into the next dispatch: the next
// layer's routing is computed from the merged output.
//
// Memory: a rank may receive up to ranks x max_tokens rows, so the merge
// dispatcher (none for top-1) is sized for that, and as many tokens may merge on one rank.
// More than max_tokens of them cannot be dispatched from there at the next
// layer (Dispatch refuses the batch), so size max_tokens for the skew.
// Immediates: imm_base + 0 .. 5 (dispatch) and + 10 .. 15 (merge).
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

// The tokens living on a rank after a context-coherent combine.
struct MergedTokens {
  uint32_t count = 0;
  std::vector<uint32_t> from_rank;  // [count] the rank that dispatched the token at this layer
  std::vector<uint32_t> ids;        // [count] the token's id there
  std::vector<uint16_t> data;       // [count, hidden] bf16: the combined output
};

// The merge arithmetic, shared with tests and fuzzing. rows[i]: a merge row
// (a rank partial, hidden bf16, then the dispatching rank and the id as two
// u32 in four bf16 slots) sent by rank senders[i], in arrival order (rank
// by rank); `stay`: ids of this rank's tokens without experts. Fills
// `merged` in (dispatching rank, id) order, each token's partials summed in
// rank order. Rows naming a rank outside [0, ranks), or two partials of one
// token from one rank, fail with kInternal.
Status MergePartials(uint32_t ranks, uint32_t self, uint32_t hidden, const std::vector<const uint16_t*>& rows,
                     const std::vector<uint32_t>& senders, const std::vector<uint32_t>& stay, MergedTokens* merged);

class CoherentDispatcher {
 public:
  // Immediates of the merge step: config.imm_base + this.
  static constexpr uint32_t kMergeImmOffset = 10;

  // Needs ranks <= 65535 (the merge rank travels in 16 bits) and ranks x
  // max_tokens <= 2^20. `engine` outlives the dispatcher.
  static Result<std::unique_ptr<CoherentDispatcher>> Create(TransferEngine* engine, const EpConfig& config);
  ~CoherentDispatcher();

  std::string LocalInfo() const;
  Status Connect(const std::vector<std::string>& infos);

  // As EpDispatcher::Dispatch; `ids` ([batch.tokens], distinct) name the
  // tokens (null: ids are 0 .. tokens - 1). ExpertTokens::src_token is the id.
  Status Dispatch(const TokenBatch& batch, const uint32_t* ids, const ExpertMap& map, DispatchResult* out);
  // Tokens named by their row (ids 0 .. tokens - 1).
  Status Dispatch(const TokenBatch& batch, const ExpertMap& map, DispatchResult* out) {
    return Dispatch(batch, nullptr, map, out);
  }
  // outputs[i]: local expert i's output [count, hidden] bf16. Fills `merged`
  // with every token that merges here.
  Status Combine(const ExpertOutputs& outputs, const DispatchResult& dispatched, MergedTokens* merged);

  const EpConfig& config() const { return config_; }
  size_t buffer_bytes() const;
  // Records this rank sent to other ranks so far: tokens dispatched, and
  // rank partials sent to merge ranks.
  uint64_t records_dispatched() const { return dispatched_sent_; }
  uint64_t records_merged() const { return merged_sent_; }
  // The last combine's rank partials to each rank [ranks], and the bytes one
  // of them takes on the wire (a record of the merge step).
  const std::vector<uint32_t>& last_merge_sent_to() const { return merge_result_.handle.sent_to; }
  size_t merge_record_bytes() const;

 private:
  explicit CoherentDispatcher(const EpConfig& config);
  Status Fail(Status s) { return calls_.Fail(s); }
  // Received row q's merge row: its rank partial (hidden bf16), then the
  // dispatching rank and the id in the kKeySlots after it.
  void FillMergeRow(const ExpertOutputs& outputs, const DispatchResult& dispatched, uint32_t q, uint16_t* row) const;
  // Combine of a top-1 group: every token merges where its expert ran.
  Status CombineHere(const ExpertOutputs& outputs, const DispatchResult& dispatched, MergedTokens* merged);

  EpConfig config_;
  std::unique_ptr<EpDispatcher> dispatch_, merge_;  // merge_: null for top-1 (no merge step)
  ExpertMap merge_map_;                             // virtual expert r on rank r
  CallSequence calls_;
  uint64_t dispatched_sent_ = 0, merged_sent_ = 0;
  // State of the pending dispatch.
  std::vector<uint32_t> ids_;                // this rank's token ids
  std::vector<uint16_t> merge_of_;           // [tokens] merge rank of each token
  std::vector<uint32_t> row_from_, row_id_;  // [rows received] dispatching rank and id
  std::vector<uint16_t> row_merge_;          // [rows received] merge rank
  std::vector<uint32_t> no_expert_;          // this rank's tokens without an expert (they stay)
  SendPlan plan_;
  std::vector<const uint8_t*> records_;
  // Merge step.
  std::vector<uint32_t> row_token_;          // received row of each record in the merge staging
  std::vector<const uint16_t*> merge_rows_;  // received merge rows, in the receive region
  std::vector<uint16_t> local_rows_;         // top-1: the merge rows, built here
  std::vector<uint32_t> local_senders_;      // top-1: this rank, once per row
  std::vector<int32_t> merge_idx_;
  std::vector<float> merge_weight_;
  DispatchResult merge_result_;
};

}  // namespace te::moe
