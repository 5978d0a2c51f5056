// ExpertMap: which rank holds each expert of one layer, and each expert's
// index among its rank's local experts (ascending global id). Every rank of a
// group must use the same map for a layer; dispatch checks a fingerprint.
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

  uint32_t experts() const { return uint32_t(rank_of_.size()); }
  uint32_t ranks() const { return ranks_; }
  uint32_t rank_of(uint32_t expert) const { return rank_of_[expert]; }
  uint32_t local_index(uint32_t expert) const { return local_index_[expert]; }
  const std::vector<uint32_t>& local_experts(uint32_t rank) const { return local_[rank]; }
  // CRC-32C of the assignment: equal maps, equal fingerprints.
  uint32_t fingerprint() const { return fingerprint_; }

 private:
  uint32_t ranks_ = 0;
  std::vector<uint32_t> rank_of_, local_index_;
  std::vector<std::vector<uint32_t>> local_;
  uint32_t fingerprint_ = 0;
};

}  // namespace te::moe
