#include "moe/expert_map.h"

#include <algorithm>
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
  std::vector<std::vector<uint32_t>> ranks_of(rank_of.size());
  for (size_t e = 0; e < rank_of.size(); ++e) ranks_of[e] = {rank_of[e]};
  return WithReplicas(std::move(ranks_of), ranks, 1);
}

const char* ReplicaChoiceName(ReplicaChoice choice) {
  switch (choice) {
    case ReplicaChoice::kBySource:
      return "source";
    case ReplicaChoice::kReachedNode:
      return "reached_node";
    case ReplicaChoice::kReachedRank:
      return "reached_rank";
  }
  return "unknown";
}

Result<ReplicaChoice> ParseReplicaChoice(const std::string& name) {
  for (ReplicaChoice c : {ReplicaChoice::kBySource, ReplicaChoice::kReachedNode, ReplicaChoice::kReachedRank})
    if (name == ReplicaChoiceName(c)) return c;
  return InvalidArgument("replica choice '" + name + "' is not one of source, reached_node, reached_rank");
}

Result<ExpertMap> ExpertMap::WithReplicas(std::vector<std::vector<uint32_t>> ranks_of, uint32_t ranks, uint32_t nodes,
                                          const std::vector<TokenSplit>& splits, ReplicaChoice choice) {
  if (ranks == 0) return InvalidArgument("ranks must be >= 1");
  if (nodes == 0 || ranks % nodes != 0)
    return InvalidArgument(std::to_string(ranks) + " ranks do not split evenly into " + std::to_string(nodes) +
                           " nodes");
  if (ranks_of.empty() || ranks_of.size() > 65535)
    return InvalidArgument("expert count " + std::to_string(ranks_of.size()) + " outside [1, 65535]");
  if (uint32_t(choice) > uint32_t(ReplicaChoice::kReachedRank))
    return InvalidArgument("replica choice " + std::to_string(int(choice)) + " is not one of 0 (by source), " +
                           "1 (reached node), 2 (reached rank)");
  ExpertMap m;
  m.ranks_ = ranks;
  m.nodes_ = nodes;
  m.replica_choice_ = choice;
  m.local_.resize(ranks);
  m.local_index_.resize(ranks_of.size());
  m.choice_.resize(ranks_of.size());
  std::vector<uint32_t> crc_input;
  for (uint32_t e = 0; e < ranks_of.size(); ++e) {
    const auto& on = ranks_of[e];
    if (on.empty()) return InvalidArgument("expert " + std::to_string(e) + " has no rank");
    for (size_t j = 0; j < on.size(); ++j) {
      if (on[j] >= ranks)
        return InvalidArgument("expert " + std::to_string(e) + " on rank " + std::to_string(on[j]) + ", outside [0, " +
                               std::to_string(ranks) + ")");
      if (std::find(on.begin(), on.begin() + j, on[j]) != on.begin() + j)
        return InvalidArgument("expert " + std::to_string(e) + " named twice on rank " + std::to_string(on[j]));
      m.local_index_[e].push_back(uint32_t(m.local_[on[j]].size()));
      m.local_[on[j]].push_back(e);
    }
    crc_input.push_back(uint32_t(on.size()));
    crc_input.insert(crc_input.end(), on.begin(), on.end());
    if (on.size() == 1) continue;
    m.replicated_ = true;
    m.choice_[e] = ChooseReplicas(on, ranks, nodes);
  }
  crc_input.push_back(nodes);
  // Maps that route alike fingerprint alike: the choice matters only with replicas.
  if (m.replicated_ && choice != ReplicaChoice::kBySource) crc_input.push_back(0x52454143u + uint32_t(choice));
  TE_RETURN_IF_ERROR(m.SetSplits(ranks_of, splits));
  for (const TokenSplit& x : splits) crc_input.insert(crc_input.end(), {x.expert, x.source, x.rank, x.share});
  m.fingerprint_ = Crc32c(crc_input.data(), crc_input.size() * sizeof(uint32_t)) ^ ranks;
  m.ranks_of_ = std::move(ranks_of);
  return m;
}

Status ExpertMap::SetSplits(const std::vector<std::vector<uint32_t>>& ranks_of, const std::vector<TokenSplit>& splits) {
  const uint32_t E = uint32_t(ranks_of.size());
  // Per (expert, source): the ranges in the order given.
  std::vector<std::vector<std::vector<Range>>> by(E);
  for (size_t i = 0; i < splits.size(); ++i) {
    const TokenSplit& x = splits[i];
    const std::string at = "token split " + std::to_string(i) + ": ";
    if (x.expert >= E)
      return InvalidArgument(at + "expert " + std::to_string(x.expert) + " outside [0, " + std::to_string(E) + ")");
    if (x.source >= ranks_)
      return InvalidArgument(at + "source " + std::to_string(x.source) + " outside [0, " + std::to_string(ranks_) +
                             ")");
    const auto& on = ranks_of[x.expert];
    if (std::find(on.begin(), on.end(), x.rank) == on.end())
      return InvalidArgument(at + "rank " + std::to_string(x.rank) + " does not hold expert " +
                             std::to_string(x.expert));
    if (x.share == 0 || x.share > kKeySpace)
      return InvalidArgument(at + "share " + std::to_string(x.share) + " outside [1, " + std::to_string(kKeySpace) +
                             "]");
    if (on.size() == 1) continue;  // one copy: every token goes there anyway
    auto& ranges = by[x.expert];
    if (ranges.empty()) ranges.resize(ranks_);
    auto& mine = ranges[x.source];
    const uint32_t from = mine.empty() ? 0 : mine.back().until;
    if (x.share > kKeySpace - from)
      return InvalidArgument(at + "shares of expert " + std::to_string(x.expert) + " from source " +
                             std::to_string(x.source) + " sum past " + std::to_string(kKeySpace));
    mine.push_back({from + x.share, x.rank});
  }
  split_.assign(E, {});
  split_begin_.assign(E, {});
  for (uint32_t e = 0; e < E; ++e) {
    if (by[e].empty()) continue;
    split_begin_[e].push_back(0);
    for (const auto& mine : by[e]) {
      split_[e].insert(split_[e].end(), mine.begin(), mine.end());
      split_begin_[e].push_back(uint32_t(split_[e].size()));
    }
  }
  splits_ = splits;
  return Status::Ok();
}

std::vector<uint32_t> ExpertMap::ChooseReplicas(const std::vector<uint32_t>& on, uint32_t ranks, uint32_t nodes) {
  const uint32_t per_node = ranks / nodes, copies = uint32_t(on.size());
  if (copies == 0) return std::vector<uint32_t>(ranks, UINT32_MAX);  // no copy to choose
  if (copies == 1) return std::vector<uint32_t>(ranks, on[0]);       // what the passes below give
  const uint32_t fair = (ranks + copies - 1) / copies;               // sources per replica when spread evenly
  std::vector<uint32_t> sources(copies, 0), choice(ranks, UINT32_MAX);
  auto assign = [&](uint32_t s, size_t j) { sources[j]++, choice[s] = on[j]; };
  // 1. A replica on the source itself.
  for (size_t j = 0; j < copies; ++j)
    if (on[j] < ranks) assign(on[j], j);
  // 2. The least used replica on the source's node, while under its fair share.
  // 3. The least used replica anywhere. Ties: the lower rank.
  for (int tier = 2; tier <= 3; ++tier)
    for (uint32_t s = 0; s < ranks; ++s) {
      if (choice[s] != UINT32_MAX) continue;
      size_t pick = copies;
      for (size_t j = 0; j < copies; ++j) {
        if (tier == 2 && (on[j] / per_node != s / per_node || sources[j] >= fair)) continue;
        if (pick == copies || sources[j] < sources[pick] || (sources[j] == sources[pick] && on[j] < on[pick])) pick = j;
      }
      if (pick != copies) assign(s, pick);
    }
  return choice;
}

uint32_t ExpertMap::RankInNode(uint32_t expert, uint32_t source, uint32_t key, uint32_t node) const {
  const uint32_t per_node = ranks_ / nodes_;
  if (node >= nodes_) return kNoRank;
  return CopyInNode(ranks_of_[expert], ChoiceFor(expert, node * per_node + source % per_node), per_node, node, key);
}

uint32_t ExpertMap::CopyInNode(const std::vector<uint32_t>& on, uint32_t choice, uint32_t per_node, uint32_t node,
                               uint32_t key) {
  if (choice / per_node == node) return choice;
  const uint32_t count =
      uint32_t(std::count_if(on.begin(), on.end(), [&](uint32_t r) { return r / per_node == node; }));
  if (count == 0) return kNoRank;
  uint32_t i = key % count;
  for (uint32_t r : on)
    if (r / per_node == node && i-- == 0) return r;
  return kNoRank;  // not reached: count copies lie on the node
}

uint32_t ExpertMap::local_index(uint32_t expert, uint32_t rank) const {
  const auto& on = ranks_of_[expert];
  for (size_t j = 0; j < on.size(); ++j)
    if (on[j] == rank) return local_index_[expert][j];
  return UINT32_MAX;  // not held there: a caller bug, caught where the index is used
}

}  // namespace te::moe
