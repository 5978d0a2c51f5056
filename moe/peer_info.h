// The text a dispatcher's LocalInfo() gives its peers, and the check of a
// peer's against this rank's own, shared by EpDispatcher and
// LowLatencyDispatcher.
//
// An info is a magic word and whitespace-separated fields: the group's shape,
// with the rank second, and last the hex of the rank's receive-region
// descriptor ("temoe1 4 2 64 8 ... 0a1b..."). Infos come from peers, through
// whatever the caller uses to exchange them, and are read as hostile bytes:
// a malformed one is an error naming the rank, never an exception.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "base/status.h"

namespace te::moe {

// Peer r's info against this rank's `mine`: the same magic word and number
// of fields, the rank field reading exactly r (no sign, no leading zeros, no
// overflow), and every other field but the last equal to ours. Returns the
// last field, the peer's descriptor hex (MrDescriptor::FromHex checks it).
// kInvalidArgument otherwise; a shape mismatch names the first differing
// field from `field_names` (space-separated, one per field but the last)
// with both values.
Result<std::string> MatchPeerInfo(std::string_view info, std::string_view mine, uint32_t r,
                                  std::string_view field_names);

}  // namespace te::moe
