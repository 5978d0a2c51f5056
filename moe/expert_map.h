// ExpertMap: which ranks hold each expert of one layer, and each expert's
// index among a rank's local experts (ascending global id). Every rank of a
// group must use the same map for a layer; dispatch checks a fingerprint.
//
// Replicas: an expert may live on several ranks (at most once per rank).
// Dispatch sends all of one source rank's tokens for expert e to one replica,
// RankFor(e, source), chosen when the map is built, the same on every rank,
// in three passes over the sources (in rank order):
//  1. the replica on the source rank itself;
//  2. else the least used replica on the source's node that has fewer than
//     its fair share of sources, ceil(ranks / replicas);
//  3. else the least used replica anywhere.
// "Least used" counts the sources assigned so far; ties go to the lower rank.
// So sources stay on their node where that keeps replicas even, and spread
// evenly over the replicas otherwise. Ranks r of node r / (ranks / nodes).
#pragma once

#include <cstdint>
#include <vector>

#include "base/status.h"

namespace te::moe {

class ExpertMap {
 public:
  // Experts 0 .. E/R - 1 on rank 0, and so on (E a multiple of R).
  static Result<ExpertMap> Contiguous(uint32_t experts, uint32_t ranks);
  // rank_of[e] for every expert, e.g. one layer of a Placement. Ranks may hold
  // different numbers of experts (or none).
  static Result<ExpertMap> FromRanks(std::vector<uint32_t> rank_of, uint32_t ranks);
  // ranks_of[e]: the ranks holding expert e (at least one, distinct; the
  // first is its primary). `nodes` divides `ranks`.
  static Result<ExpertMap> WithReplicas(std::vector<std::vector<uint32_t>> ranks_of, uint32_t ranks, uint32_t nodes);

  // The rule above for one expert: choice[s] = the rank source s sends to.
  static std::vector<uint32_t> ChooseReplicas(const std::vector<uint32_t>& ranks_of, uint32_t ranks, uint32_t nodes);

  uint32_t experts() const { return uint32_t(ranks_of_.size()); }
  uint32_t ranks() const { return ranks_; }
  uint32_t nodes() const { return nodes_; }
  // The expert's primary rank (its only one without replicas).
  uint32_t rank_of(uint32_t expert) const { return ranks_of_[expert][0]; }
  const std::vector<uint32_t>& ranks_of(uint32_t expert) const { return ranks_of_[expert]; }
  bool replicated() const { return replicated_; }
  // The rank a source sends expert e's tokens to (the rule above).
  uint32_t RankFor(uint32_t expert, uint32_t source) const {
    return choice_[expert].empty() ? ranks_of_[expert][0] : choice_[expert][source];
  }
  // Index of the expert among `rank`'s local experts; the rank must hold it.
  uint32_t local_index(uint32_t expert, uint32_t rank) const;
  uint32_t local_index(uint32_t expert) const { return local_index(expert, rank_of(expert)); }
  const std::vector<uint32_t>& local_experts(uint32_t rank) const { return local_[rank]; }
  // CRC-32C of the assignment: equal maps, equal fingerprints.
  uint32_t fingerprint() const { return fingerprint_; }

 private:
  uint32_t ranks_ = 0, nodes_ = 1;
  bool replicated_ = false;
  std::vector<std::vector<uint32_t>> ranks_of_, local_index_;  // [expert][replica]
  std::vector<std::vector<uint32_t>> choice_;                  // [expert][source]; empty: one replica
  std::vector<std::vector<uint32_t>> local_;
  uint32_t fingerprint_ = 0;
};

}  // namespace te::moe
