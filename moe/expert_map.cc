#include "moe/expert_map.h"

#include <string>

#include "base/crc32c.h"

namespace te::moe {

Result<ExpertMap> ExpertMap::Contiguous(uint32_t experts, uint32_t ranks) {
  if (ranks == 0 || experts == 0 || experts % ranks != 0)
    return InvalidArgument("experts " + std::to_string(experts) + " must be a positive multiple of ranks " +
                           std::to_string(ranks));
  std::vector<uint32_t> rank_of(experts);
  for (uint32_t e = 0; e < experts; ++e) rank_of[e] = e / (experts / ranks);
  return FromRanks(std::move(rank_of), ranks);
}

Result<ExpertMap> ExpertMap::FromRanks(std::vector<uint32_t> rank_of, uint32_t ranks) {
  if (ranks == 0) return InvalidArgument("ranks must be >= 1");
  if (rank_of.empty() || rank_of.size() > 65535)
    return InvalidArgument("expert count " + std::to_string(rank_of.size()) + " outside [1, 65535]");
  ExpertMap m;
  m.ranks_ = ranks;
  m.local_.resize(ranks);
  m.local_index_.resize(rank_of.size());
  for (uint32_t e = 0; e < rank_of.size(); ++e) {
    if (rank_of[e] >= ranks)
      return InvalidArgument("expert " + std::to_string(e) + " on rank " + std::to_string(rank_of[e]) +
                             ", outside [0, " + std::to_string(ranks) + ")");
    m.local_index_[e] = uint32_t(m.local_[rank_of[e]].size());
    m.local_[rank_of[e]].push_back(e);
  }
  m.fingerprint_ = Crc32c(rank_of.data(), rank_of.size() * sizeof(uint32_t)) ^ ranks;
  m.rank_of_ = std::move(rank_of);
  return m;
}

}  // namespace te::moe
