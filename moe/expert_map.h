// ExpertMap: which ranks hold each expert of one layer, and each expert's
// index among a rank's local experts (ascending global id). Every rank of a
// group must use the same map for a layer; dispatch checks a fingerprint.
//
// Replicas: an expert may live on several ranks (at most once per rank).
// Dispatch sends one source rank's tokens for expert e to one replica,
// ChoiceFor(e, source), chosen when the map is built, the same on every
// rank (unless token splits below share them), in three passes over the
// sources (in rank order):
//  1. the replica on the source rank itself;
//  2. else the least used replica on the source's node that has fewer than
//     its fair share of sources, ceil(ranks / replicas);
//  3. else the least used replica anywhere.
// "Least used" counts the sources assigned so far; ties go to the lower rank.
// So sources stay on their node where that keeps replicas even, and spread
// evenly over the replicas otherwise. Ranks r of node r / (ranks / nodes).
//
// Token splits refine that per token: a source's tokens of one expert can be
// shared among its replicas, since a hot expert's tokens often come from a
// few sources, and whole sources are too coarse to balance its copies. Each
// token has a key, TokenKey(its routing row at the layer), uniform in
// [0, 65536); a TokenSplit sends the tokens of (expert, source) whose key
// falls in its share of that range to `rank`. The splits of one (expert,
// source) take consecutive ranges from 0 in the order given; keys past them
// go to the rule's choice. Every rank computes the same key from the same
// row, so a token's replica needs no coordination, and a placement's record
// count over a trace (moe/dispatch_cost.h) stays exact. Tokens with equal
// rows go together: under top-1 routing a split moves all or none of an
// expert's tokens from a source.
//
// Reached choices refine that by the rest of the token's row: a token
// already goes to the ranks of its experts and crosses to their nodes, so a
// replica on such a node costs no network crossing (node-level
// deduplication), and one on such a rank no record either, where the
// replica the rule (and splits) chose may cost both. Per token of source s,
// its reached ranks are s and the ranks of its experts that have one copy,
// its reached nodes theirs. Reached-rank choice (kReachedRank) sends an
// expert with replicas
//  1. to the rule's rank if it is reached; else to a node chosen among
//  2. the nodes with a copy on a reached rank, else the rule's node if it
//     is reached, else the reached nodes holding a copy: the rule's node
//     where it is among them, else of those in ascending order the
//     (key x count / 65536)-th, so tokens spread over them evenly;
//  3. and there to a copy on a reached rank (of those in ranks_of order the
//     (key mod count)-th), else the rule's rank if on the node, else
//     RankInNode; where no node qualifies, to the rule's rank.
// Reached-node choice (kReachedNode) takes the same steps seeing no reached
// rank: the node follows the token, the rank on it the rule. Step 3 reads
// only the reached ranks on its node, so a relay there that sees only its
// node's part of the row computes it alike (RankOnNode). Rank choice saves
// more records, and piles more load onto the ranks of popular single-copy
// experts: a placement picks per layer (moe/placement_solver.h).
// Only single-copy experts count as reached, so where one replicated
// expert's tokens go does not depend on another's: a placement's loads can
// be computed expert by expert (moe/placement_solver.cc does).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"

namespace te::moe {

// `share` of the 65536 token keys of (expert, source) go to `rank`, a rank
// holding the expert.
struct TokenSplit {
  uint32_t expert = 0, source = 0, rank = 0;
  uint32_t share = 0;  // [1, 65536]
  friend bool operator==(const TokenSplit&, const TokenSplit&) = default;
};

enum class ReplicaChoice : uint8_t {
  kBySource = 0,     // the rule and token splits: (expert, source, key)
  kReachedNode = 1,  // kBySource, moved to a node the token reaches (above)
  kReachedRank = 2,  // and to a rank the token reaches, where one holds a copy
};

// "source", "reached_node", "reached_rank"; and back (an error names the
// valid ones).
const char* ReplicaChoiceName(ReplicaChoice choice);
Result<ReplicaChoice> ParseReplicaChoice(const std::string& name);

class ExpertMap {
 public:
  static constexpr uint32_t kKeySpace = 65536;
  static constexpr uint32_t kNoRank = UINT32_MAX;

  // Experts 0 .. E/R - 1 on rank 0, and so on (E a multiple of R).
  static Result<ExpertMap> Contiguous(uint32_t experts, uint32_t ranks);
  // rank_of[e] for every expert, e.g. one layer of a Placement. Ranks may hold
  // different numbers of experts (or none).
  static Result<ExpertMap> FromRanks(std::vector<uint32_t> rank_of, uint32_t ranks);
  // ranks_of[e]: the ranks holding expert e (at least one, distinct; the
  // first is its primary). `nodes` divides `ranks`. `splits` as above; the
  // shares of one (expert, source) sum to at most kKeySpace.
  static Result<ExpertMap> WithReplicas(std::vector<std::vector<uint32_t>> ranks_of, uint32_t ranks, uint32_t nodes,
                                        const std::vector<TokenSplit>& splits = {},
                                        ReplicaChoice choice = ReplicaChoice::kBySource);

  // A token's key: a hash of its routing row at this layer (top-k expert
  // ids, -1 for an empty slot, in slot order), in [0, kKeySpace).
  template <typename Id>
  static uint32_t TokenKey(const Id* row, uint32_t topk) {
    uint64_t h = 0x9e3779b97f4a7c15ull ^ topk;
    for (uint32_t k = 0; k < topk; ++k) {
      h = (h ^ uint32_t(int32_t(row[k]))) * 0xff51afd7ed558ccdull;
      h ^= h >> 33;
    }
    h *= 0xc4ceb9fe1a85ec53ull;
    return uint32_t(h >> 48);
  }

  // The rule above for one expert: choice[s] = the rank source s sends to.
  static std::vector<uint32_t> ChooseReplicas(const std::vector<uint32_t>& ranks_of, uint32_t ranks, uint32_t nodes);

  uint32_t experts() const { return uint32_t(ranks_of_.size()); }
  uint32_t ranks() const { return ranks_; }
  uint32_t nodes() const { return nodes_; }
  // The expert's primary rank (its only one without replicas).
  uint32_t rank_of(uint32_t expert) const { return ranks_of_[expert][0]; }
  const std::vector<uint32_t>& ranks_of(uint32_t expert) const { return ranks_of_[expert]; }
  bool replicated() const { return replicated_; }
  // The rank a source sends expert e's token with key `key` to (the rule
  // and the splits above).
  uint32_t RankFor(uint32_t expert, uint32_t source, uint32_t key) const {
    if (choice_[expert].empty()) return ranks_of_[expert][0];
    if (!split_begin_[expert].empty())
      for (uint32_t i = split_begin_[expert][source]; i < split_begin_[expert][source + 1]; ++i)
        if (key < split_[expert][i].until) return split_[expert][i].rank;
    return choice_[expert][source];
  }
  // The rule's choice for a source, before splits.
  uint32_t ChoiceFor(uint32_t expert, uint32_t source) const {
    return choice_[expert].empty() ? ranks_of_[expert][0] : choice_[expert][source];
  }
  ReplicaChoice replica_choice() const { return replica_choice_; }
  // Whether Route reads the token's key (token splits or a reached
  // choice); without, a caller may pass any key.
  bool uses_key() const { return !splits_.empty() || (replicated_ && replica_choice_ != ReplicaChoice::kBySource); }

  // Where every slot of one token of `source` goes: dest[k] for row[k] (an
  // expert id < experts(), or negative for an empty slot, whose dest is
  // kNoRank); key = TokenKey(row, topk). What dispatch sends and what a
  // placement's record count assumes.
  template <typename Id>
  void Route(const Id* row, uint32_t topk, uint32_t source, uint32_t key, uint32_t* dest) const;
  // The rank a token of `source` that reached `node` for `expert` goes to
  // there: the rule's choice for the source at that node's rank with the
  // same index (as if that rank had dispatched it) where it lies on the node,
  // else the node's copies in ranks_of order, the (key mod count)-th;
  // kNoRank where the node holds no copy.
  uint32_t RankInNode(uint32_t expert, uint32_t source, uint32_t key, uint32_t node) const;
  // RankInNode's pick for copies `on` where the rule chose `choice` for that
  // node's rank (ChooseReplicas), ranks r of node r / per_node.
  static uint32_t CopyInNode(const std::vector<uint32_t>& on, uint32_t choice, uint32_t per_node, uint32_t node,
                             uint32_t key);
  // A reached choice for one slot of a replicated expert: its copies
  // `on`, the rule's choices `choice` (ChooseReplicas), `rule` the rank the
  // rule and splits chose for this token of `source` with `key`, `reached`
  // the ranks the token reaches anyway (its source and its single-copy
  // experts' ranks; a ReachedRanks below, or any type with its three calls).
  // The steps at the top of this file. Static so a solver can weigh copies
  // it has not placed yet exactly as Route will route them.
  // `how`: kReachedNode reads only the reached nodes (steps 1-3 with no
  // rank reached), kReachedRank the ranks too.
  template <typename Set>
  static uint32_t ReachedCopy(ReplicaChoice how, const std::vector<uint32_t>& on, const std::vector<uint32_t>& choice,
                              uint32_t rule, uint32_t source, uint32_t key, uint32_t per_node, const Set& reached);
  // Its last step, once `node` is chosen: a copy on a reached rank of the
  // node (the rule's if it is one, else the (key mod count)-th in `on`
  // order), else the rule's rank if on the node, else CopyInNode. Tests
  // only ranks on `node`: a relay there, which sees only its node's part of
  // a row, computes it alike (RankOnNode).
  template <typename Set>
  static uint32_t CopyOnNode(const std::vector<uint32_t>& on, const std::vector<uint32_t>& choice, uint32_t rule,
                             uint32_t source, uint32_t key, uint32_t per_node, uint32_t node, const Set& reached);
  // Reached ranks as a list of n (duplicates allowed).
  struct ReachedRanks {
    const uint32_t* ranks;
    uint32_t n, per_node;
    uint32_t node_of(uint32_t r) const { return r / per_node; }
    bool rank(uint32_t r) const { return std::find(ranks, ranks + n, r) != ranks + n; }
    bool node(uint32_t x) const {
      return std::any_of(ranks, ranks + n, [&](uint32_t r) { return r / per_node == x; });
    }
  };
  // CopyOnNode for this map's expert, `reached` the n ranks of `node` the
  // token reaches anyway (read with kReachedRank only).
  uint32_t RankOnNode(uint32_t expert, uint32_t source, uint32_t key, uint32_t node, const uint32_t* reached,
                      uint32_t n) const {
    const uint32_t per_node = ranks_ / nodes_;
    if (replica_choice_ != ReplicaChoice::kReachedRank) n = 0;
    return CopyOnNode(ranks_of_[expert], choice_[expert], RankFor(expert, source, key), source, key, per_node, node,
                      ReachedRanks{reached, n, per_node});
  }
  const std::vector<TokenSplit>& splits() const { return splits_; }
  // Index of the expert among `rank`'s local experts; the rank must hold it.
  uint32_t local_index(uint32_t expert, uint32_t rank) const;
  uint32_t local_index(uint32_t expert) const { return local_index(expert, rank_of(expert)); }
  const std::vector<uint32_t>& local_experts(uint32_t rank) const { return local_[rank]; }
  // CRC-32C of the assignment: equal maps, equal fingerprints.
  uint32_t fingerprint() const { return fingerprint_; }

 private:
  // ReachedCopy's steps 1-3 (kReachedRank; kReachedNode hides the ranks).
  template <typename Set>
  static uint32_t Steer(const std::vector<uint32_t>& on, const std::vector<uint32_t>& choice, uint32_t rule,
                        uint32_t source, uint32_t key, uint32_t per_node, const Set& reached);

  uint32_t ranks_ = 0, nodes_ = 1;
  bool replicated_ = false;
  ReplicaChoice replica_choice_ = ReplicaChoice::kBySource;
  std::vector<std::vector<uint32_t>> ranks_of_, local_index_;  // [expert][replica]
  std::vector<std::vector<uint32_t>> choice_;                  // [expert][source]; empty: one replica
  std::vector<std::vector<uint32_t>> local_;
  // Splits of expert e: split_[e][split_begin_[e][s] .. split_begin_[e][s+1])
  // are source s's ranges, in order. Both empty for an expert without splits.
  struct Range {
    uint32_t until, rank;
  };
  Status SetSplits(const std::vector<std::vector<uint32_t>>& ranks_of, const std::vector<TokenSplit>& splits);
  std::vector<std::vector<Range>> split_;
  std::vector<std::vector<uint32_t>> split_begin_;
  std::vector<TokenSplit> splits_;
  uint32_t fingerprint_ = 0;
};

template <typename Id>
void ExpertMap::Route(const Id* row, uint32_t topk, uint32_t source, uint32_t key, uint32_t* dest) const {
  for (uint32_t k = 0; k < topk; ++k) dest[k] = int64_t(row[k]) < 0 ? kNoRank : RankFor(uint32_t(row[k]), source, key);
  if (!replicated_ || replica_choice_ == ReplicaChoice::kBySource) return;
  // Reached ranks: the source, then single-copy experts' (slot order).
  uint32_t small[64];
  std::vector<uint32_t> large;
  uint32_t* reached = topk < 64 ? small : (large.resize(topk + 1), large.data());
  uint32_t n = 0;
  reached[n++] = source;
  for (uint32_t k = 0; k < topk; ++k)
    if (dest[k] != kNoRank && ranks_of_[uint32_t(row[k])].size() == 1 &&
        std::find(reached, reached + n, dest[k]) == reached + n)
      reached[n++] = dest[k];
  for (uint32_t k = 0; k < topk; ++k)
    if (dest[k] != kNoRank && ranks_of_[uint32_t(row[k])].size() > 1)
      dest[k] = ReachedCopy(replica_choice_, ranks_of_[uint32_t(row[k])], choice_[uint32_t(row[k])], dest[k], source,
                            key, ranks_ / nodes_, ReachedRanks{reached, n, ranks_ / nodes_});
}

template <typename Set>
uint32_t ExpertMap::ReachedCopy(ReplicaChoice how, const std::vector<uint32_t>& on, const std::vector<uint32_t>& choice,
                                uint32_t rule, uint32_t source, uint32_t key, uint32_t per_node, const Set& reached) {
  if (how != ReplicaChoice::kReachedNode) return Steer(on, choice, rule, source, key, per_node, reached);
  // The same steps, seeing the reached nodes and no reached rank.
  struct NodesOnly {
    const Set& set;
    uint32_t node_of(uint32_t r) const { return set.node_of(r); }
    bool rank(uint32_t) const { return false; }
    bool node(uint32_t n) const { return set.node(n); }
  };
  return Steer(on, choice, rule, source, key, per_node, NodesOnly{reached});
}

template <typename Set>
uint32_t ExpertMap::Steer(const std::vector<uint32_t>& on, const std::vector<uint32_t>& choice, uint32_t rule,
                          uint32_t source, uint32_t key, uint32_t per_node, const Set& reached) {
  if (reached.rank(rule)) return rule;  // what the steps below give, the common case made short
  // Candidate nodes: 1. those with a copy on a reached rank; 2. else the
  // rule's node, if reached; 3. else the reached nodes holding a copy.
  uint32_t small[64];
  std::vector<uint32_t> large;
  uint32_t* nodes = on.size() <= 64 ? small : (large.resize(on.size()), large.data());
  uint32_t count = 0;
  auto add = [&](uint32_t node) {
    if (std::find(nodes, nodes + count, node) == nodes + count) nodes[count++] = node;
  };
  for (uint32_t r : on)
    if (reached.rank(r)) add(reached.node_of(r));
  if (count == 0 && reached.node(reached.node_of(rule))) return rule;  // CopyOnNode's answer there
  if (count == 0)
    for (uint32_t r : on)
      if (reached.node(reached.node_of(r))) add(reached.node_of(r));
  if (count == 0) return rule;  // no reached node holds a copy
  // The rule's node where it is a candidate, else the key picks one (in
  // node order), so tokens spread over them evenly.
  if (std::find(nodes, nodes + count, reached.node_of(rule)) == nodes + count) {
    std::sort(nodes, nodes + count);
    nodes[0] = nodes[(uint64_t(key & 0xffff) * count) >> 16];
  } else {
    nodes[0] = reached.node_of(rule);
  }
  return CopyOnNode(on, choice, rule, source, key, per_node, nodes[0], reached);
}

template <typename Set>
uint32_t ExpertMap::CopyOnNode(const std::vector<uint32_t>& on, const std::vector<uint32_t>& choice, uint32_t rule,
                               uint32_t source, uint32_t key, uint32_t per_node, uint32_t node, const Set& reached) {
  auto here = [&](uint32_t r) { return reached.node_of(r) == node && reached.rank(r); };
  if (here(rule)) return rule;
  if (const uint32_t count = uint32_t(std::count_if(on.begin(), on.end(), here)); count > 0) {
    uint32_t i = key % count;
    for (uint32_t r : on)
      if (here(r) && i-- == 0) return r;
  }
  if (reached.node_of(rule) == node) return rule;
  return CopyInNode(on, choice[node * per_node + source % per_node], per_node, node, key);
}

}  // namespace te::moe
