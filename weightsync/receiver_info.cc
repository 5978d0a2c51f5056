#include "weightsync/receiver_info.h"

#include <algorithm>
#include <sstream>

#include "base/checked_math.h"

namespace te::weightsync {

Result<ReceiverInfo> ParseReceiverInfo(const std::string& line) {
  std::istringstream in(line);
  std::string magic;
  ReceiverInfo info;
  in >> magic >> info.rank;
  if ((magic != "tews1" && magic != "tews2") || !in) return InvalidArgument("receiver info is malformed");
  if (magic == "tews1") {
    uint64_t slot = 0, two_slots = 0;
    std::string hex;
    in >> slot >> hex;
    if (!in || slot == 0) return InvalidArgument("receiver info is malformed");
    TE_ASSIGN_OR_RETURN(MrDescriptor d, MrDescriptor::FromHex(hex));
    if (!CheckedMul(slot, 2, &two_slots) || d.length < two_slots)
      return InvalidArgument("receiver " + std::to_string(info.rank) + " registered " + std::to_string(d.length) +
                             " bytes for two slots of " + std::to_string(slot));
    info.slots = 2;
    for (uint32_t s = 0; s < 2; ++s) info.extents.push_back({s, 0, slot, d, s * slot});
    return info;
  }
  uint64_t n = 0;
  in >> info.slots >> n;
  if (!in || (info.slots != 1 && info.slots != 2) || n == 0 || n > (1u << 20))
    return InvalidArgument("receiver info is malformed (slots in [1, 2], 1 to 2^20 tensors)");
  for (uint64_t i = 0; i < n; ++i) {
    ReceiverExtent e;
    uint64_t end = 0;
    std::string hex;
    in >> e.slot >> e.offset >> e.length >> hex;
    if (!in || e.slot >= info.slots || e.length == 0 || !CheckedAdd(e.offset, e.length, &end))
      return InvalidArgument("receiver info: tensor " + std::to_string(i) + " is malformed");
    TE_ASSIGN_OR_RETURN(e.memory, MrDescriptor::FromHex(hex));
    if (e.memory.length < e.length)
      return InvalidArgument("receiver info: tensor " + std::to_string(i) + " registered " +
                             std::to_string(e.memory.length) + " bytes for " + std::to_string(e.length));
    info.extents.push_back(std::move(e));
  }
  std::string rest;
  if (in >> rest) return InvalidArgument("receiver info: trailing text after " + std::to_string(n) + " tensors");
  std::sort(info.extents.begin(), info.extents.end(), [](const ReceiverExtent& a, const ReceiverExtent& b) {
    return a.slot != b.slot ? a.slot < b.slot : a.offset < b.offset;
  });
  for (size_t i = 1; i < info.extents.size(); ++i) {
    const ReceiverExtent &a = info.extents[i - 1], &b = info.extents[i];
    if (a.slot == b.slot && a.offset + a.length > b.offset)
      return InvalidArgument("receiver info: tensors overlap at region offset " + std::to_string(b.offset));
  }
  return info;
}

}  // namespace te::weightsync
