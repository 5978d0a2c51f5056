// Balanced partition of a layer's experts into parts (the nodes of an EP
// group, or the ranks of one node) that minimizes what dispatch sends:
// the sum over tokens of the number of distinct parts holding the token's
// experts. With per-destination deduplication (moe/ep_dispatcher.h) a token
// costs one record per distinct destination, so this is the record count up
// to the token's own part, which a token may have fixed (its "home": where
// it is dispatched from); a home counts as a part the token already holds.
//
// Every part gets exactly items / parts experts; a part's load (tokens
// routed to its experts) stays under `cap` where a solution allows it.
// Used by PlaceExperts (moe/placement.h); exposed for tests.
#pragma once

#include <cstdint>
#include <vector>

namespace te::moe {

struct PartitionProblem {
  uint32_t items = 0, parts = 0;  // items % parts == 0
  std::vector<uint64_t> load;     // [items]
  double cap = 0;
  // Tokens, compressed: token i's items are members[begin[i] .. begin[i + 1]),
  // distinct; home[i] is a part or -1.
  std::vector<uint32_t> begin{0};
  std::vector<uint32_t> members;
  std::vector<int32_t> home;

  void AddToken(const uint32_t* items, uint32_t n, int32_t home_part);
  uint32_t tokens() const { return uint32_t(home.size()); }
  // parts > 0 divides items, one load per item, tokens' items in range and
  // distinct, homes a part or -1.
  bool WellFormed() const;
};

// Sum over tokens of distinct parts (a home counts as one); UINT64_MAX when
// the problem is not WellFormed() or part_of does not name a part per item.
uint64_t PartitionCost(const PartitionProblem& problem, const std::vector<uint32_t>& part_of);

// Greedy construction (heaviest expert first, into the part it shares most
// tokens with, under the cap), then pairwise swaps with exact gains until
// none gains or `max_sweeps` passes. Filling slots can leave a part over the
// cap (the light experts left at the end may fit only there), and swaps for
// fewer records never fix that, so then a repair: while a part is over the
// cap, the swap of one of its heaviest experts that keeps the other part
// under the cap and adds the fewest records per unit of excess removed, else
// the swap that lowers it most; then swaps for fewer records again.
// Deterministic. Empty when the problem is not WellFormed().
std::vector<uint32_t> SolvePartition(const PartitionProblem& problem, int max_sweeps = 20);

// The same repair on a given assignment. With `groups` (the same items and
// tokens; its parts are groups of problem.parts / groups->parts consecutive
// parts, e.g. the nodes of ranks, each token's home its group's) each group
// is also held under groups->cap and records count at both levels: the
// partition of a layer into nodes and then into ranks leaves a rank over its
// cap where its node took more heavy experts than its ranks can spread.
// Empty when a problem is not WellFormed(), part_of does not name a part
// for every item, or the groups do not match (items, tokens, parts).
std::vector<uint32_t> RepairLoads(const PartitionProblem& problem, std::vector<uint32_t> part_of,
                                  const PartitionProblem* groups = nullptr);

}  // namespace te::moe
