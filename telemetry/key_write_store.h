// KeyWriteStore: the DART key-write structure, as it lies in a collector's
// memory. Reporters write it with one-sided writes; the collector (or any
// process that maps the memory) answers queries by reading it. Nobody
// coordinates and nothing runs per report on the collector.
//
// Layout: M slots of slot_bytes() each. A key is written to N slots chosen by
// N independent hashes; each slot holds
//     u32 checksum = crc32c(key || value) (never 0) | value (value_bytes)
// Later writes overwrite earlier ones. A query reads the key's N slots and
// keeps those whose checksum matches crc32c(key || slot value): that rejects
// slots of other keys and torn slots (a writer that died mid-write, or two
// writers interleaving) alike. If matching slots disagree (two writes of one
// key raced and landed in different orders), the value held by most slots
// wins, then the one in the lowest hash position; the result says so.
// A false match needs a 32-bit checksum collision: about 2^-32 per slot read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"

namespace te::telemetry {

struct StoreGeometry {
  uint64_t slots = 0;        // M
  uint32_t value_bytes = 0;  // fixed value size
  uint32_t hashes = 0;       // N
  uint64_t seed = 0;         // hash seed, shared by writers and readers

  Status Validate() const;
  size_t slot_bytes() const { return 4 + ((value_bytes + 3) & ~3u); }
  size_t region_bytes() const { return size_t(slots) * slot_bytes(); }
};

inline constexpr size_t kMaxKeyBytes = 256;

// Slot index of hash `i` of `key`.
uint64_t SlotOf(const StoreGeometry& g, std::span<const uint8_t> key, uint32_t i);

// The bytes a writer puts into each of the key's slots.
Status EncodeSlot(const StoreGeometry& g, std::span<const uint8_t> key, std::span<const uint8_t> value,
                  std::vector<uint8_t>* slot);

struct QueryResult {
  bool found = false;
  std::vector<uint8_t> value;
  uint32_t matching_slots = 0;  // slots whose checksum matched
  bool conflict = false;        // matching slots held different values
};

// Reads a store laid out in `region` (at least g.region_bytes()).
Result<QueryResult> Query(const StoreGeometry& g, std::span<const uint8_t> region, std::span<const uint8_t> key);

// Writes a key into a store in local memory: the same bytes a reporter's
// one-sided writes put there. For tests and for the formula's measurements.
Status WriteLocal(const StoreGeometry& g, std::span<uint8_t> region, std::span<const uint8_t> key,
                  std::span<const uint8_t> value);

// ---- The math ----
// Keys are written once each, one after another, into an empty store; a key
// followed by `age` later keys is found if at least one of its N slots was
// not overwritten: 1 - (1 - (1 - 1/M)^(N*age))^N (slots taken independent).

double SuccessAtAge(uint64_t slots, uint32_t hashes, uint64_t age);
// Mean over the K keys written (ages 0 .. K-1): the success of a query for a
// key picked uniformly among all written.
double ExpectedSuccess(uint64_t slots, uint64_t keys, uint32_t hashes);
// Fewest slots for which ExpectedSuccess >= target, and the bytes per key.
uint64_t SlotsForTarget(uint64_t keys, uint32_t hashes, double target);
double BytesPerKeyForTarget(uint64_t keys, uint32_t hashes, double target, size_t slot_bytes);

}  // namespace te::telemetry
