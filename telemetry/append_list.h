// Append lists: reporter-owned rings in the collector's memory.
//
// List l has `rings` rings; reporter r of that list owns ring r alone, so no
// two writers ever touch the same bytes and no coordination is needed. A
// ring holds `ring_records` record slots; record `seq` of a ring lives in
// slot seq % ring_records:
//     u64 seq + 1 (0 = never written) | u32 crc32c(seq, len, payload) | u32 len | payload
// A reader follows a ring with a cursor: records come back in order; a torn
// or not-yet-landed record ends the read (retry later); a ring that lapped
// the reader is reported as lost records, never as wrong ones.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "base/status.h"

namespace te::telemetry {

struct ListGeometry {
  uint32_t lists = 0;
  uint32_t rings = 0;         // per list: reporters that may append to it
  uint32_t ring_records = 0;  // record slots per ring
  uint32_t record_bytes = 0;  // largest payload

  Status Validate() const;
  size_t record_slot_bytes() const { return 16 + ((size_t(record_bytes) + 7) & ~size_t(7)); }
  size_t ring_bytes() const { return size_t(ring_records) * record_slot_bytes(); }
  size_t region_bytes() const { return size_t(lists) * rings * ring_bytes(); }
  // Offset of record `seq` of ring (list, ring) from the start of the lists.
  size_t RecordOffset(uint32_t list, uint32_t ring, uint64_t seq) const {
    return (size_t(list) * rings + ring) * ring_bytes() + size_t(seq % ring_records) * record_slot_bytes();
  }
};

// The bytes a reporter writes for record `seq`.
Status EncodeRecord(const ListGeometry& g, uint64_t seq, std::span<const uint8_t> payload, std::vector<uint8_t>* out);

struct ListRead {
  std::vector<std::vector<uint8_t>> records;  // in sequence order
  uint64_t lost = 0;                          // overwritten before they were read
};

// Reads ring (list, ring) from `*cursor` on, advancing it. `lists_region`
// starts at the first list.
Result<ListRead> ReadRing(const ListGeometry& g, std::span<const uint8_t> lists_region, uint32_t list, uint32_t ring,
                          uint64_t* cursor);

}  // namespace te::telemetry
