// The plain reference for dispatch and combine: one process, every rank's
// inputs at once, no transfers, written straight from the definitions in
// dispatch_types.h (it shares no code with the transports). The host path and
// the CUDA path are tested against it bit for bit.
#pragma once

#include <cstdint>
#include <vector>

#include "base/status.h"
#include "moe/dispatch_types.h"
#include "moe/ep_config.h"
#include "moe/expert_map.h"

namespace te::moe {

// experts[r] = rank r's local experts with their tokens. `shape` gives the
// group's shape; its rank is ignored.
Result<std::vector<std::vector<ExpertTokens>>> ReferenceDispatch(const EpConfig& shape, const ExpertMap& map,
                                                                 const std::vector<TokenBatch>& batches);

// outputs[r][i]: rank r's local expert i output [count, hidden] bf16.
// Returns each rank's combined [tokens, hidden] bf16.
Result<std::vector<std::vector<uint16_t>>> ReferenceCombine(const EpConfig& shape, const ExpertMap& map,
                                                            const std::vector<TokenBatch>& batches,
                                                            const std::vector<std::vector<ExpertTokens>>& dispatched,
                                                            const std::vector<ExpertOutputs>& outputs);

// The same for HierarchicalDispatcher: each node's rank partials are summed
// in rank order into one node partial (bf16) before the source sums the node
// partials in node order. Ranks r of node r / (ranks / nodes).
Result<std::vector<std::vector<uint16_t>>> ReferenceHierarchicalCombine(
    const EpConfig& shape, const ExpertMap& map, uint32_t nodes, const std::vector<TokenBatch>& batches,
    const std::vector<std::vector<ExpertTokens>>& dispatched, const std::vector<ExpertOutputs>& outputs);

}  // namespace te::moe
