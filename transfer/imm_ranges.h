// Who uses which immediate values on an engine.
//
// Immediates are the only completion signal the receiver sees, and every
// user of an engine counts its own values (ImmCounter). Two users whose
// values overlap would consume each other's arrivals, so each data plane
// owns one range, and applications keep below kApplicationImmLimit:
//
//   range                      owner
//   0x00000000 .. 0x3fffffff   the application and the tools
//   0x4b000000 .. 0x4bffffff   kvcache: KvDecoder, imm_base | 24-bit request tag
//   0x4d450000 .. 0x4d45000f   moe: EpDispatcher imm_base + 0 .. 5, LowLatencyDispatcher + 6 .. 9,
//                              HierarchicalDispatcher + 0 .. 5 and + 10 .. 15
//   0x57530000 .. 0x5753ffff   weightsync: imm_base | (version & 0xffff)
//
// Telemetry writes carry no immediate. The bases are the planes' default
// options; a plane given another base takes the same span there.
#pragma once

#include <cstdint>

namespace te {

struct ImmRange {
  uint32_t base;
  uint32_t span;  // values base .. base + span - 1
  constexpr bool Overlaps(const ImmRange& o) const {
    return uint64_t(base) < uint64_t(o.base) + o.span && uint64_t(o.base) < uint64_t(base) + span;
  }
};

inline constexpr uint32_t kApplicationImmLimit = 0x40000000;
inline constexpr ImmRange kApplicationImms{0, kApplicationImmLimit};
inline constexpr ImmRange kKvDecoderImms{0x4B000000, 1u << 24};
inline constexpr ImmRange kMoeImms{0x4D450000, 16};
inline constexpr ImmRange kWeightSyncImms{0x57530000, 1u << 16};

static_assert(!kApplicationImms.Overlaps(kKvDecoderImms) && !kApplicationImms.Overlaps(kMoeImms) &&
                  !kApplicationImms.Overlaps(kWeightSyncImms) && !kKvDecoderImms.Overlaps(kMoeImms) &&
                  !kKvDecoderImms.Overlaps(kWeightSyncImms) && !kMoeImms.Overlaps(kWeightSyncImms),
              "immediate ranges of the planes must not overlap");

}  // namespace te
