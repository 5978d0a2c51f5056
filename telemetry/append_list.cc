#include "telemetry/append_list.h"

#include <cstring>

#include "base/checked_math.h"
#include "base/crc32c.h"

namespace te::telemetry {
namespace {

uint32_t RecordCrc(uint64_t seq, uint32_t len, const uint8_t* payload) {
  uint32_t c = Crc32c(&seq, 8);
  c = Crc32c(&len, 4, c);
  return Crc32c(payload, len, c);
}

}  // namespace

Status ListGeometry::Validate() const {
  if (lists == 0 || rings == 0 || ring_records == 0)
    return InvalidArgument("append lists need lists, rings and ring_records > 0 (got " + std::to_string(lists) + ", " +
                           std::to_string(rings) + ", " + std::to_string(ring_records) + ")");
  if (record_bytes == 0 || record_bytes > 65536)
    return InvalidArgument("record_bytes = " + std::to_string(record_bytes) + "; valid range is 1..65536");
  // The counts come from a file or a peer: the region size must not wrap.
  auto bytes = CheckedProduct("append lists region (lists x rings x records x slot bytes)",
                              {lists, rings, ring_records, record_slot_bytes()}, kMaxRegionBytes);
  if (!bytes.ok()) return bytes.status();
  return Status::Ok();
}

Status EncodeRecord(const ListGeometry& g, uint64_t seq, std::span<const uint8_t> payload, std::vector<uint8_t>* out) {
  if (payload.size() > g.record_bytes)
    return InvalidArgument("record of " + std::to_string(payload.size()) + " bytes exceeds record_bytes " +
                           std::to_string(g.record_bytes));
  out->assign(16 + payload.size(), 0);
  const uint64_t tag = seq + 1;
  const uint32_t len = uint32_t(payload.size());
  const uint32_t crc = RecordCrc(seq, len, payload.data());
  std::memcpy(out->data(), &tag, 8);
  std::memcpy(out->data() + 8, &crc, 4);
  std::memcpy(out->data() + 12, &len, 4);
  if (!payload.empty()) std::memcpy(out->data() + 16, payload.data(), payload.size());
  return Status::Ok();
}

Result<ListRead> ReadRing(const ListGeometry& g, std::span<const uint8_t> lists_region, uint32_t list, uint32_t ring,
                          uint64_t* cursor) {
  TE_RETURN_IF_ERROR(g.Validate());
  if (list >= g.lists || ring >= g.rings)
    return OutOfRange("ring (" + std::to_string(list) + ", " + std::to_string(ring) + ") outside " +
                      std::to_string(g.lists) + " lists x " + std::to_string(g.rings) + " rings");
  if (lists_region.size() < g.region_bytes())
    return InvalidArgument("lists region of " + std::to_string(lists_region.size()) + " bytes; geometry needs " +
                           std::to_string(g.region_bytes()));
  ListRead out;
  // At most one ring of records plus one restart after a lap.
  for (uint64_t n = 0; n <= uint64_t(g.ring_records); ++n) {
    const uint8_t* rec = lists_region.data() + g.RecordOffset(list, ring, *cursor);
    uint64_t tag;
    uint32_t crc, len;
    std::memcpy(&tag, rec, 8);
    std::memcpy(&crc, rec + 8, 4);
    std::memcpy(&len, rec + 12, 4);
    if (tag == 0 || tag - 1 < *cursor) break;  // not written yet
    const uint64_t seq = tag - 1;
    if (len > g.record_bytes || RecordCrc(seq, len, rec + 16) != crc) break;  // torn or landing
    if (seq > *cursor) {
      // The writer lapped us: restart at the oldest intact record the ring
      // still holds (a scan of the ring, paid only when lapped).
      uint64_t oldest = seq;
      for (uint32_t k = 0; k < g.ring_records; ++k) {
        const uint8_t* r2 = lists_region.data() + g.RecordOffset(list, ring, k);
        uint64_t t2;
        uint32_t c2, l2;
        std::memcpy(&t2, r2, 8);
        std::memcpy(&c2, r2 + 8, 4);
        std::memcpy(&l2, r2 + 12, 4);
        if (t2 == 0 || t2 - 1 < *cursor || l2 > g.record_bytes) continue;
        if (RecordCrc(t2 - 1, l2, r2 + 16) == c2) oldest = std::min(oldest, t2 - 1);
      }
      out.lost += oldest - *cursor;
      *cursor = oldest;
      if (seq != oldest) continue;
    }
    out.records.emplace_back(rec + 16, rec + 16 + len);
    ++*cursor;
  }
  return out;
}

}  // namespace te::telemetry
