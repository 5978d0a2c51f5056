#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "telemetry/append_list.h"
#include "telemetry/collector.h"
#include "telemetry/flow_records.h"
#include "telemetry/key_write_store.h"

namespace te::telemetry {
namespace {

std::span<const uint8_t> S(const std::array<uint8_t, kFlowKeyBytes>& a) { return a; }
std::span<const uint8_t> V(const std::array<uint8_t, kPathValueBytes>& a) { return a; }

StoreGeometry Geometry(uint64_t slots, uint32_t hashes) {
  return StoreGeometry{slots, uint32_t(kPathValueBytes), hashes, 99};
}

TEST(KeyWriteStore, SlotRoundTripAndLayout) {
  auto g = Geometry(1000, 3);
  EXPECT_EQ(g.slot_bytes(), 24u);  // 4-byte checksum + 20-byte path trace
  std::vector<uint8_t> region(g.region_bytes(), 0);
  auto key = FlowKey(1, 7);
  auto val = PathTrace(1, 7);
  ASSERT_TRUE(WriteLocal(g, region, S(key), V(val)).ok());
  auto q = Query(g, region, S(key));
  ASSERT_TRUE(q.ok());
  EXPECT_TRUE(q->found);
  EXPECT_EQ(q->value, std::vector<uint8_t>(val.begin(), val.end()));
  EXPECT_EQ(q->matching_slots, 3u);
  EXPECT_FALSE(q->conflict);
  // The slot bytes are exactly what EncodeSlot produces, at SlotOf offsets.
  std::vector<uint8_t> slot;
  ASSERT_TRUE(EncodeSlot(g, S(key), V(val), &slot).ok());
  for (uint32_t i = 0; i < 3; ++i)
    EXPECT_EQ(0, memcmp(region.data() + SlotOf(g, S(key), i) * g.slot_bytes(), slot.data(), slot.size()));
  // A key never written is not found, even among written slots.
  auto other = Query(g, region, S(FlowKey(1, 8)));
  ASSERT_TRUE(other.ok());
  EXPECT_FALSE(other->found);
}

TEST(KeyWriteStore, LaterWritesOverwriteEarlierOnes) {
  auto g = Geometry(1000, 2);
  std::vector<uint8_t> region(g.region_bytes(), 0);
  auto key = FlowKey(2, 1);
  ASSERT_TRUE(WriteLocal(g, region, S(key), V(PathTrace(2, 1, 1))).ok());
  ASSERT_TRUE(WriteLocal(g, region, S(key), V(PathTrace(2, 1, 2))).ok());
  auto q = Query(g, region, S(key));
  ASSERT_TRUE(q->found);
  auto want = PathTrace(2, 1, 2);
  EXPECT_EQ(q->value, std::vector<uint8_t>(want.begin(), want.end()));
}

TEST(KeyWriteStore, TornAndForeignSlotsAreNeverReturned) {
  auto g = Geometry(64, 3);
  std::vector<uint8_t> region(g.region_bytes(), 0);
  auto key = FlowKey(3, 5);
  auto old_val = PathTrace(3, 5, 1);
  ASSERT_TRUE(WriteLocal(g, region, S(key), V(old_val)).ok());
  // A writer died after landing the first half of a new slot image in every
  // slot: each slot now mixes new and old bytes.
  std::vector<uint8_t> fresh;
  ASSERT_TRUE(EncodeSlot(g, S(key), V(PathTrace(3, 5, 2)), &fresh).ok());
  for (uint32_t i = 0; i < 3; ++i) memcpy(region.data() + SlotOf(g, S(key), i) * g.slot_bytes(), fresh.data(), 12);
  auto q = Query(g, region, S(key));
  ASSERT_TRUE(q.ok());
  EXPECT_FALSE(q->found) << "a torn slot was returned as a value";
  // One slot repaired with the old image: the old value comes back, whole.
  std::vector<uint8_t> old_slot;
  ASSERT_TRUE(EncodeSlot(g, S(key), V(old_val), &old_slot).ok());
  memcpy(region.data() + SlotOf(g, S(key), 1) * g.slot_bytes(), old_slot.data(), old_slot.size());
  q = Query(g, region, S(key));
  ASSERT_TRUE(q->found);
  EXPECT_EQ(q->value, std::vector<uint8_t>(old_val.begin(), old_val.end()));
  EXPECT_EQ(q->matching_slots, 1u);
}

TEST(KeyWriteStore, RacingWritesOfOneKeyAreReportedAsConflict) {
  auto g = Geometry(4096, 3);
  std::vector<uint8_t> region(g.region_bytes(), 0);
  auto key = FlowKey(4, 9);
  auto a = PathTrace(4, 9, 1), b = PathTrace(4, 9, 2);
  std::vector<uint8_t> sa, sb;
  ASSERT_TRUE(EncodeSlot(g, S(key), V(a), &sa).ok());
  ASSERT_TRUE(EncodeSlot(g, S(key), V(b), &sb).ok());
  // Two slots got b last, one got a last.
  memcpy(region.data() + SlotOf(g, S(key), 0) * g.slot_bytes(), sa.data(), sa.size());
  memcpy(region.data() + SlotOf(g, S(key), 1) * g.slot_bytes(), sb.data(), sb.size());
  memcpy(region.data() + SlotOf(g, S(key), 2) * g.slot_bytes(), sb.data(), sb.size());
  auto q = Query(g, region, S(key));
  ASSERT_TRUE(q->found);
  EXPECT_TRUE(q->conflict);
  EXPECT_EQ(q->value, std::vector<uint8_t>(b.begin(), b.end()));  // majority
}

TEST(KeyWriteStore, MalformedQueriesGetClearErrors) {
  auto g = Geometry(100, 2);
  std::vector<uint8_t> region(g.region_bytes(), 0);
  auto empty = Query(g, region, {});
  ASSERT_FALSE(empty.ok());
  EXPECT_NE(empty.status().message().find("valid range is 1..256"), std::string::npos);
  std::vector<uint8_t> huge(300, 1);
  EXPECT_EQ(Query(g, region, huge).status().code(), StatusCode::kInvalidArgument);
  auto small = Query(g, std::span(region.data(), 10), S(FlowKey(1, 1)));
  ASSERT_FALSE(small.ok());
  EXPECT_NE(small.status().message().find("store needs"), std::string::npos);
  std::vector<uint8_t> wrong_value(7, 0);
  EXPECT_FALSE(WriteLocal(g, region, S(FlowKey(1, 1)), wrong_value).ok());
  EXPECT_FALSE(Geometry(100, 0).Validate().ok());
  EXPECT_FALSE(Geometry(0, 2).Validate().ok());
}

// Measured success on real stores against the formula, over load factors and N.
TEST(KeyWriteStore, MeasuredSuccessFollowsTheFormula) {
  constexpr uint64_t kSlots = 40000;
  for (uint32_t n : {1u, 2u, 3u, 4u}) {
    for (double load : {0.05, 0.25, 0.5, 1.0}) {
      auto g = Geometry(kSlots, n);
      std::vector<uint8_t> region(g.region_bytes(), 0);
      const uint64_t keys = uint64_t(load * kSlots);
      for (uint64_t k = 0; k < keys; ++k) ASSERT_TRUE(WriteLocal(g, region, S(FlowKey(n, k)), V(PathTrace(n, k))).ok());
      uint64_t found = 0, wrong = 0;
      for (uint64_t k = 0; k < keys; ++k) {
        auto q = Query(g, region, S(FlowKey(n, k)));
        if (!q->found) continue;
        auto want = PathTrace(n, k);
        if (q->value == std::vector<uint8_t>(want.begin(), want.end()))
          ++found;
        else
          ++wrong;
      }
      const double measured = double(found) / keys;
      const double expected = ExpectedSuccess(kSlots, keys, n);
      EXPECT_EQ(wrong, 0u);
      EXPECT_NEAR(measured, expected, 0.015) << "N=" << n << " load=" << load;
    }
  }
}

TEST(KeyWriteStore, FormulaLimitsAndInverse) {
  EXPECT_DOUBLE_EQ(ExpectedSuccess(1000, 0, 2), 1.0);
  EXPECT_DOUBLE_EQ(SuccessAtAge(1000, 2, 0), 1.0);
  EXPECT_LT(SuccessAtAge(1000, 2, 5000), 0.01);
  EXPECT_GT(ExpectedSuccess(100000, 1000, 3), ExpectedSuccess(10000, 1000, 3));
  const uint64_t m = SlotsForTarget(10000, 3, 0.999);
  EXPECT_GE(ExpectedSuccess(m, 10000, 3), 0.999);
  EXPECT_LT(ExpectedSuccess(m - 1, 10000, 3), 0.999);  // the fewest slots that reach it
}

TEST(AppendList, RecordsComeBackInOrderAndLappingIsCountedAsLost) {
  ListGeometry g{2, 3, 8, 32};
  ASSERT_TRUE(g.Validate().ok());
  std::vector<uint8_t> region(g.region_bytes(), 0);
  auto put = [&](uint32_t list, uint32_t ring, uint64_t seq) {
    std::string payload = "rec-" + std::to_string(seq);
    std::vector<uint8_t> bytes;
    ASSERT_TRUE(EncodeRecord(g, seq, std::span((const uint8_t*)payload.data(), payload.size()), &bytes).ok());
    memcpy(region.data() + g.RecordOffset(list, ring, seq), bytes.data(), bytes.size());
  };
  for (uint64_t s = 0; s < 5; ++s) put(1, 2, s);
  uint64_t cursor = 0;
  auto r = ReadRing(g, region, 1, 2, &cursor);
  ASSERT_TRUE(r.ok());
  ASSERT_EQ(r->records.size(), 5u);
  EXPECT_EQ(std::string(r->records[3].begin(), r->records[3].end()), "rec-3");
  EXPECT_EQ(cursor, 5u);
  // Another ring of the same list is untouched.
  uint64_t other = 0;
  EXPECT_TRUE(ReadRing(g, region, 1, 1, &other)->records.empty());
  // The writer laps the reader: 5..19 written, the ring holds 12..19.
  for (uint64_t s = 5; s < 20; ++s) put(1, 2, s);
  r = ReadRing(g, region, 1, 2, &cursor);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->lost, 7u);
  ASSERT_EQ(r->records.size(), 8u);
  EXPECT_EQ(std::string(r->records[0].begin(), r->records[0].end()), "rec-12");
  // A torn record stops the read there; nothing wrong is returned.
  put(1, 2, 20);
  region[g.RecordOffset(1, 2, 20) + 17] ^= 0xff;
  r = ReadRing(g, region, 1, 2, &cursor);
  EXPECT_TRUE(r->records.empty());
  EXPECT_EQ(cursor, 20u);
  EXPECT_EQ(ReadRing(g, region, 2, 0, &cursor).status().code(), StatusCode::kOutOfRange);
}

TEST(CollectorInfo, RoundTripsAndRejectsGarbage) {
  CollectorInfo c;
  c.store = Geometry(1000, 3);
  c.lists = ListGeometry{1, 4, 16, 64};
  auto back = CollectorInfo::Parse(c.Serialize());
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->store.slots, 1000u);
  EXPECT_EQ(back->lists.rings, 4u);
  EXPECT_FALSE(CollectorInfo::Parse("tetel1 1 2").ok());
  EXPECT_FALSE(CollectorInfo::Parse("hello").ok());
  EXPECT_FALSE(CollectorInfo::Parse("tetel1 1000 20 0 1 1 1 1 1 -").ok());  // 0 hashes
}

}  // namespace
}  // namespace te::telemetry
