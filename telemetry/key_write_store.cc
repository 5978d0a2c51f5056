#include "telemetry/key_write_store.h"

#include <cmath>
#include <cstring>
#include <map>

#include "base/checked_math.h"
#include "base/crc32c.h"

namespace te::telemetry {
namespace {

uint64_t Mix64(uint64_t x) {  // splitmix64 finalizer
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t HashKey(std::span<const uint8_t> key, uint64_t seed) {
  uint64_t h = 0xcbf29ce484222325ull ^ seed;  // FNV-1a, then mixed
  for (uint8_t b : key) h = (h ^ b) * 0x100000001b3ull;
  return Mix64(h);
}

uint32_t SlotChecksum(std::span<const uint8_t> key, const uint8_t* value, size_t len) {
  uint32_t c = Crc32c(value, len, Crc32c(key.data(), key.size()));
  return c == 0 ? 1 : c;  // 0 marks a never-written slot
}

Status CheckKey(std::span<const uint8_t> key) {
  if (key.empty() || key.size() > kMaxKeyBytes)
    return InvalidArgument("key of " + std::to_string(key.size()) + " bytes; valid range is 1.." +
                           std::to_string(kMaxKeyBytes));
  return Status::Ok();
}

}  // namespace

Status StoreGeometry::Validate() const {
  if (slots == 0) return InvalidArgument("store has 0 slots");
  if (hashes == 0 || hashes > 16)
    return InvalidArgument("hashes = " + std::to_string(hashes) + "; valid range is 1..16");
  if (value_bytes == 0 || value_bytes > 4096)
    return InvalidArgument("value_bytes = " + std::to_string(value_bytes) + "; valid range is 1..4096");
  // slots comes from a file or a peer: the region size must not wrap.
  auto bytes = CheckedProduct("store region (slots x slot bytes)", {slots, slot_bytes()}, kMaxRegionBytes);
  if (!bytes.ok()) return bytes.status();
  return Status::Ok();
}

uint64_t SlotOf(const StoreGeometry& g, std::span<const uint8_t> key, uint32_t i) {
  return Mix64(HashKey(key, g.seed) + (uint64_t(i) + 1) * 0x9E3779B97F4A7C15ull) % g.slots;
}

Status EncodeSlot(const StoreGeometry& g, std::span<const uint8_t> key, std::span<const uint8_t> value,
                  std::vector<uint8_t>* slot) {
  TE_RETURN_IF_ERROR(CheckKey(key));
  if (value.size() != g.value_bytes)
    return InvalidArgument("value of " + std::to_string(value.size()) + " bytes; this store holds values of exactly " +
                           std::to_string(g.value_bytes));
  slot->assign(g.slot_bytes(), 0);
  std::memcpy(slot->data() + 4, value.data(), value.size());
  const uint32_t c = SlotChecksum(key, slot->data() + 4, g.slot_bytes() - 4);
  std::memcpy(slot->data(), &c, 4);
  return Status::Ok();
}

Status WriteLocal(const StoreGeometry& g, std::span<uint8_t> region, std::span<const uint8_t> key,
                  std::span<const uint8_t> value) {
  if (region.size() < g.region_bytes())
    return InvalidArgument("region of " + std::to_string(region.size()) + " bytes; store needs " +
                           std::to_string(g.region_bytes()));
  std::vector<uint8_t> slot;
  TE_RETURN_IF_ERROR(EncodeSlot(g, key, value, &slot));
  for (uint32_t i = 0; i < g.hashes; ++i)
    std::memcpy(region.data() + SlotOf(g, key, i) * g.slot_bytes(), slot.data(), slot.size());
  return Status::Ok();
}

Result<QueryResult> Query(const StoreGeometry& g, std::span<const uint8_t> region, std::span<const uint8_t> key) {
  TE_RETURN_IF_ERROR(g.Validate());
  TE_RETURN_IF_ERROR(CheckKey(key));
  if (region.size() < g.region_bytes())
    return InvalidArgument("region of " + std::to_string(region.size()) + " bytes; store needs " +
                           std::to_string(g.region_bytes()));
  QueryResult r;
  // value -> (count, first hash position)
  std::map<std::vector<uint8_t>, std::pair<int, uint32_t>> votes;
  const size_t sb = g.slot_bytes();
  for (uint32_t i = 0; i < g.hashes; ++i) {
    const uint8_t* slot = region.data() + SlotOf(g, key, i) * sb;
    uint32_t stored;
    std::memcpy(&stored, slot, 4);
    if (stored == 0 || stored != SlotChecksum(key, slot + 4, sb - 4)) continue;
    ++r.matching_slots;
    std::vector<uint8_t> v(slot + 4, slot + 4 + g.value_bytes);
    auto [it, fresh] = votes.try_emplace(std::move(v), 0, i);
    it->second.first++;
  }
  if (votes.empty()) return r;
  r.found = true;
  r.conflict = votes.size() > 1;
  auto best = votes.begin();
  for (auto it = votes.begin(); it != votes.end(); ++it) {
    if (it->second.first > best->second.first ||
        (it->second.first == best->second.first && it->second.second < best->second.second))
      best = it;
  }
  r.value = best->first;
  return r;
}

double SuccessAtAge(uint64_t slots, uint32_t hashes, uint64_t age) {
  const double survive = std::exp(double(hashes) * double(age) * std::log1p(-1.0 / double(slots)));
  return 1.0 - std::pow(1.0 - survive, double(hashes));
}

double ExpectedSuccess(uint64_t slots, uint64_t keys, uint32_t hashes) {
  if (keys == 0) return 1.0;
  // Midpoint sum over at most 20000 age buckets: exact for small K, and
  // within 1e-6 of the full sum for large K (the summand is smooth).
  const uint64_t buckets = std::min<uint64_t>(keys, 20000);
  double sum = 0;
  for (uint64_t b = 0; b < buckets; ++b) {
    const uint64_t lo = b * keys / buckets, hi = (b + 1) * keys / buckets;
    if (hi == lo) continue;
    sum += double(hi - lo) * SuccessAtAge(slots, hashes, (lo + hi - 1) / 2);
  }
  return sum / double(keys);
}

uint64_t SlotsForTarget(uint64_t keys, uint32_t hashes, double target) {
  uint64_t lo = 1, hi = std::max<uint64_t>(keys, 1);
  while (ExpectedSuccess(hi, keys, hashes) < target) hi *= 2;
  while (lo < hi) {
    const uint64_t mid = lo + (hi - lo) / 2;
    if (ExpectedSuccess(mid, keys, hashes) >= target)
      hi = mid;
    else
      lo = mid + 1;
  }
  return lo;
}

double BytesPerKeyForTarget(uint64_t keys, uint32_t hashes, double target, size_t slot_bytes) {
  return double(SlotsForTarget(keys, hashes, target)) * double(slot_bytes) / double(keys);
}

}  // namespace te::telemetry
