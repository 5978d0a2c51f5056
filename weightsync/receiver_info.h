// ReceiverInfo: the one line a WeightReceiver publishes (Info()) and a
// WeightPusher parses (SetReceiver): where the receiver's memory for each
// version lies, as registered extents of its region.
//
//   tews1 <rank> <slot bytes> <descriptor of both slots>
//       a WeightsMemory: slot s is bytes [s * slot, (s + 1) * slot) of one
//       registration; region offset o of version v lands at
//       (v % 2) * slot + o.
//   tews2 <rank> <slots> <n> (<slot> <region offset> <length> <descriptor>)*
//       tensors by name: each extent is one registered tensor holding
//       [offset, offset + length) of the region in version slot `slot`.
//
// Infos come from other processes (through the registry): Parse bounds
// every count, refuses overflowing ranges and overlapping extents, and
// checks each extent fits its registration.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"
#include "transfer/mr_descriptor.h"

namespace te::weightsync {

struct ReceiverExtent {
  uint32_t slot = 0;
  uint64_t offset = 0, length = 0;  // in the receiver's region
  MrDescriptor memory;              // the registration holding it
  uint64_t memory_offset = 0;       // where in that registration it starts
};

struct ReceiverInfo {
  uint32_t rank = 0;
  uint32_t slots = 0;                   // 1 (in place) or 2
  std::vector<ReceiverExtent> extents;  // sorted by (slot, offset)
};

// kInvalidArgument naming what is wrong.
Result<ReceiverInfo> ParseReceiverInfo(const std::string& line);

}  // namespace te::weightsync
