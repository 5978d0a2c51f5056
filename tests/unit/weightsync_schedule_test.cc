// Weight-update schedules: built for several source/destination layouts,
// verified, and applied with memcpy to check every destination byte.
#include <gtest/gtest.h>

#include <cstring>

#include "weightsync/schedule.h"
#include "weightsync/synthetic_weights.h"

namespace te::weightsync {
namespace {

// Moves the bytes the way the pusher does: gather pieces, write contiguous.
void Apply(const Schedule& s, const std::vector<std::vector<uint8_t>>& src, std::vector<std::vector<uint8_t>>* dst) {
  for (const Transfer& t : s.transfers())
    for (uint64_t k = 0; k < t.length / t.src_piece; ++k)
      std::memcpy((*dst)[t.dst_rank].data() + t.dst_offset + k * t.src_piece,
                  src[t.src_rank].data() + t.src_offset + k * t.src_stride, t.src_piece);
}

void CheckReshard(const ModelSpec& model, const ShardLayout& src, const ShardLayout& dst, uint64_t max_bytes) {
  ScheduleOptions o;
  o.max_transfer_bytes = max_bytes;
  auto s = Schedule::Build(src, dst, o);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  ASSERT_TRUE(s->Verify(src, dst).ok()) << s->Verify(src, dst).ToString();
  std::vector<std::vector<uint8_t>> sr(src.ranks()), dr(dst.ranks());
  for (uint32_t r = 0; r < src.ranks(); ++r) {
    sr[r].assign(src.RegionBytes(r), 0);
    FillShards(src, r, 3, sr[r].data());
  }
  for (uint32_t r = 0; r < dst.ranks(); ++r) dr[r].assign(dst.RegionBytes(r), 0xee);
  Apply(*s, sr, &dr);
  uint64_t total = 0;
  for (uint32_t r = 0; r < dst.ranks(); ++r) {
    EXPECT_EQ(CountWrong(dst, r, 3, dr[r].data()), 0u) << src.Describe() << " -> " << dst.Describe() << " rank " << r;
    total += s->bytes_to(r);
  }
  EXPECT_EQ(total, s->total_bytes());
}

TEST(WeightSchedule, ReshardsEveryLayoutPairByteExact) {
  const ModelSpec model = ModelPreset("tiny", 0).value();
  const std::vector<std::pair<std::string, uint32_t>> sides = {
      {"fsdp", 4}, {"fsdp", 3}, {"tp", 2}, {"tp", 4}, {"replicated", 1}, {"replicated", 3}, {"fsdp", 8}, {"tp", 5}};
  for (const auto& [sk, sn] : sides)
    for (const auto& [dk, dn] : sides) {
      auto src = ShardLayout::Named(model, sn, sk);
      auto dst = ShardLayout::Named(model, dn, dk);
      ASSERT_TRUE(src.ok() && dst.ok());
      CheckReshard(model, *src, *dst, 64);       // small transfers: many cuts
      CheckReshard(model, *src, *dst, 1 << 20);  // large: whole runs
    }
}

// Different split dimensions on each side of a 3-D tensor, uneven parts.
TEST(WeightSchedule, CrossDimensionSplitsOfA3DTensor) {
  ModelSpec m;
  m.params = {{"w", DType::kBf16, {5, 7, 11}}, {"b", DType::kFp32, {13}}};
  for (int sd = 0; sd < 3; ++sd)
    for (int dd = 0; dd < 3; ++dd) {
      auto src = ShardLayout::Make(m, 3, {{sd, 3}, {0, 3}});
      auto dst = ShardLayout::Make(m, 4, {{dd, 4}, {-1, 1}});
      ASSERT_TRUE(src.ok() && dst.ok());
      CheckReshard(m, *src, *dst, 64);
      CheckReshard(m, *src, *dst, 4096);
    }
}

TEST(WeightSchedule, ReplicatedSourcesShareTheWork) {
  const ModelSpec model = ModelPreset("moe", 64 << 20).value();
  auto src = ShardLayout::Named(model, 4, "replicated").value();
  auto dst = ShardLayout::Named(model, 2, "tp").value();
  auto s = Schedule::Build(src, dst).value();
  ASSERT_TRUE(s.Verify(src, dst).ok());
  uint64_t lo = UINT64_MAX, hi = 0;
  for (uint32_t r = 0; r < 4; ++r) lo = std::min(lo, s.bytes_from(r)), hi = std::max(hi, s.bytes_from(r));
  EXPECT_LT(double(hi) / double(lo), 1.2) << s.Summary();
  EXPECT_EQ(s.total_bytes(), s.bytes_to(0) + s.bytes_to(1));
}

TEST(WeightSchedule, VerifyCatchesBrokenTransfers) {
  const ModelSpec model = ModelPreset("tiny", 0).value();
  auto src = ShardLayout::Named(model, 2, "fsdp").value();
  auto dst = ShardLayout::Named(model, 2, "tp").value();
  auto s = Schedule::Build(src, dst).value();
  ASSERT_TRUE(s.Verify(src, dst).ok());

  Schedule moved = s;
  const_cast<Transfer&>(moved.transfers()[3]).dst_offset += DTypeBytes(model.params[moved.transfers()[3].param].dtype);
  Status v = moved.Verify(src, dst);
  EXPECT_EQ(v.code(), StatusCode::kInternal);

  Schedule wrong_src = s;
  Transfer& t = const_cast<Transfer&>(wrong_src.transfers()[5]);
  t.src_offset += DTypeBytes(model.params[t.param].dtype);
  v = wrong_src.Verify(src, dst);
  EXPECT_NE(v.message().find("source"), std::string::npos) << v.ToString();

  Schedule dropped = s;
  const_cast<std::vector<Transfer>&>(dropped.transfers()).pop_back();
  v = dropped.Verify(src, dst);
  EXPECT_NE(v.message().find("never written"), std::string::npos) << v.ToString();
}

TEST(ModelSpec, JsonRoundTripAndErrors) {
  const ModelSpec tiny = ModelPreset("tiny", 0).value();
  auto back = ParseModelJson(ModelToJson(tiny));
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(ModelToJson(*back), ModelToJson(tiny));
  auto bad = ParseModelJson(R"({"params": [{"name": "a", "dtype": "bf17", "shape": [2]}]})");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("dtype 'bf17'"), std::string::npos) << bad.status().ToString();
  bad = ParseModelJson(R"({"params": [{"name": "a", "dtype": "bf16", "shape": [2, 0]}]})");
  EXPECT_NE(bad.status().message().find("dimension 1 is 0"), std::string::npos) << bad.status().ToString();
  bad = ParseModelJson(
      R"({"params": [{"name": "a", "dtype": "bf16", "shape": [2]}, {"name": "a", "dtype": "fp32", "shape": [1]}]})");
  EXPECT_NE(bad.status().message().find("appears twice"), std::string::npos);
  bad = ParseModelJson(R"({"params": [{"name": "a", "dtype": "bf16", "shape": [2})");
  EXPECT_NE(bad.status().message().find("model JSON at byte"), std::string::npos) << bad.status().ToString();
  auto moe = ModelPreset("moe", 1ull << 30);
  ASSERT_TRUE(moe.ok());
  EXPECT_GT(moe->bytes(), 700ull << 20);
  EXPECT_LT(moe->bytes(), 1300ull << 20);
  EXPECT_FALSE(ModelPreset("gpt5", 0).ok());
  EXPECT_FALSE(ShardLayout::Named(tiny, 2, "zero3").ok());
}

}  // namespace
}  // namespace te::weightsync
