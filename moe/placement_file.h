// Placements as CSV files ("layer,expert,rank" header, one line per copy
// of every expert of every layer; an expert's first line is its primary,
// later lines its replicas), as te-moe place writes them and te-moe bench
// reads them. A line "layer,expert,rank,source,share" is a token split
// (ExpertMap's TokenSplit: `share` of the 65536 token keys of (expert,
// source) go to `rank`; the splits of one (expert, source) take their key
// ranges in file order). A line "layer,choice" sets the layer's replica
// choice (ExpertMap's ReplicaChoice: 0 by source, the default; 1 reached
// node; 2 reached rank). A file is untrusted: every line is checked (three
// or five decimal numbers, each in range, no expert twice on one rank, none
// missing, a split's rank holding its expert and its shares summing to at
// most 65536) and the first bad one is named in the error.
#pragma once

#include <string>

#include "base/status.h"
#include "moe/placement.h"

namespace te::moe {

Status WritePlacementCsv(const Placement& placement, const std::string& path);
// Ranks may hold different numbers of experts (ExpertMap allows it); call
// Placement::Validate to hold them to the solver's slots.
Result<Placement> ParsePlacementCsv(const std::string& text, uint32_t layers, uint32_t experts, uint32_t ranks);
Result<Placement> ReadPlacementCsv(const std::string& path, uint32_t layers, uint32_t experts, uint32_t ranks);

}  // namespace te::moe
