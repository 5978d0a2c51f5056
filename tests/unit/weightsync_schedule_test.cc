// Weight-update schedules: built for several source/destination layouts,
// verified, and applied with memcpy to check every destination byte.
#include <gtest/gtest.h>

#include <cstring>

#include "weightsync/fp8_block_quant.h"
#include "weightsync/fp8_conversion.h"
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

// A plan is walked piece by piece; past max_pieces it is refused, naming
// the parameter, whatever the layouts (they come from files and peers).
TEST(WeightSchedule, APlanOfTooManyPiecesIsRefused) {
  ModelSpec m;
  m.params.push_back({"w", DType::kFp32, {1 << 12, 1 << 8}});
  auto src = ShardLayout::Make(m, 2, {{0, 2}}).value();
  auto dst = ShardLayout::Make(m, 2, {{1, 2}}).value();  // rows cut in half: one piece per row
  ScheduleOptions so;
  ASSERT_TRUE(Schedule::Build(src, dst, so).ok());
  so.max_pieces = 1000;
  auto refused = Schedule::Build(src, dst, so);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("'w'"), std::string::npos) << refused.status().ToString();
  EXPECT_NE(refused.status().message().find("1000"), std::string::npos) << refused.status().ToString();
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

// ---- fp8 receivers of bf16 sources ----

// Odd shapes (not multiples of 128), split where blocks stay whole at the
// sources: rows of "a" at 128 and 256, "e"'s rows at 128 (three ranks, so
// rank 2 holds a replica of part 0); "o" and "n" are replicated.
ModelSpec Fp8TestModel() {
  ModelSpec m;
  m.params = {{"a", DType::kBf16, {384, 200}},
              {"n", DType::kFp32, {24}},
              {"e", DType::kBf16, {3, 256, 130}},
              {"o", DType::kBf16, {130, 260}}};
  return m;
}
ShardLayout Fp8TestSources() {
  return ShardLayout::Make(Fp8TestModel(), 3, {{0, 3}, {-1, 1}, {1, 2}, {-1, 1}}).value();
}

// Each source quantizes its own shard (as the pusher does), the transfers
// move the bytes, and every destination byte must equal the quantization of
// the whole tensor: shard-local blocks are the tensor's blocks.
TEST(WeightSchedule, Fp8DestinationsGetTheWholeTensorsQuantization) {
  const ShardLayout src = Fp8TestSources();
  const ModelSpec fp8 = Fp8Model(Fp8TestModel()).value();
  ASSERT_EQ(fp8.params.size(), 7u);  // a, a.scale, n, e, e.scale, o, o.scale
  EXPECT_EQ(fp8.params[1].name, "a.scale");
  EXPECT_EQ(fp8.params[1].shape, (std::vector<uint64_t>{3, 2}));
  EXPECT_EQ(fp8.params[4].shape, (std::vector<uint64_t>{3, 2, 2}));
  for (const auto& [kind, D] :
       std::vector<std::pair<std::string, uint32_t>>{{"tp", 2}, {"fsdp", 3}, {"replicated", 1}}) {
    const ShardLayout dst = ShardLayout::Named(fp8, D, kind).value();
    ScheduleOptions o;
    o.max_transfer_bytes = 256;
    auto s = Schedule::Build(src, dst, o);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    ASSERT_TRUE(s->converts());
    ASSERT_TRUE(s->Verify(src, dst).ok()) << s->Verify(src, dst).ToString();
    const ShardLayout& wire = s->wire_source();
    // The sources' wire regions: copies, or their shard quantized.
    std::vector<std::vector<uint8_t>> sr(src.ranks()), dr(D);
    for (uint32_t r = 0; r < src.ranks(); ++r) {
      std::vector<uint8_t> bf16(src.RegionBytes(r));
      FillShards(src, r, 5, bf16.data());
      sr[r].assign(wire.RegionBytes(r), 0);
      for (size_t q = 0; q < fp8.params.size(); ++q) {
        const WireParam& w = s->wire_params()[q];
        const uint8_t* from = bf16.data() + src.ParamOffset(w.source_param, r);
        if (w.kind == WireParam::kCopy) {
          std::memcpy(sr[r].data() + wire.ParamOffset(q, r), from, wire.ShardBytes(q, r));
        } else if (w.kind == WireParam::kFp8Codes) {
          const std::vector<uint64_t> ext = src.ShardBox(w.source_param, r).extents();
          const Fp8BlockShape shape = Fp8ShapeOf(ext.data(), ext.size()).value();
          ASSERT_TRUE(QuantizeBf16ToFp8Blocks(reinterpret_cast<const uint16_t*>(from), shape,
                                              sr[r].data() + wire.ParamOffset(q, r),
                                              reinterpret_cast<float*>(sr[r].data() + wire.ParamOffset(q + 1, r)))
                          .ok());
          EXPECT_EQ(shape.scales() * 4, wire.ShardBytes(q + 1, r));
        }
      }
    }
    for (uint32_t r = 0; r < D; ++r) dr[r].assign(dst.RegionBytes(r), 0xee);
    Apply(*s, sr, &dr);
    uint64_t wire_bytes = 0;
    for (uint32_t r = 0; r < D; ++r) {
      EXPECT_EQ(CountWrong(dst, r, 5, dr[r].data(), s->wire_params()), 0u) << kind << " rank " << r;
      EXPECT_GT(CountWrong(dst, r, 6, dr[r].data(), s->wire_params()), 0u) << "the check can fail";
      wire_bytes += s->bytes_to(r);
    }
    // Codes are half of bf16; scales add 4 bytes per 128 x 128 block.
    EXPECT_LT(double(wire_bytes) / D, 0.6 * double(Fp8TestModel().bytes()));
  }
}

TEST(WeightSchedule, Fp8ConversionRefusesWhatItCannotQuantizeOnOneSource) {
  const ModelSpec fp8 = Fp8Model(Fp8TestModel()).value();
  const ShardLayout dst = ShardLayout::Named(fp8, 2, "tp").value();
  // "a" split in two at row 192: a block straddles two sources.
  auto src = ShardLayout::Make(Fp8TestModel(), 2, {{0, 2}, {-1, 1}, {1, 2}, {-1, 1}}).value();
  auto s = Schedule::Build(src, dst);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("'a': source rank 0's shard ends at row 192"), std::string::npos)
      << s.status().ToString();
  // Columns of "o" at 130: inside the second block column.
  src = ShardLayout::Make(Fp8TestModel(), 2, {{-1, 1}, {-1, 1}, {-1, 1}, {1, 2}}).value();
  s = Schedule::Build(src, dst);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("ends at column 130"), std::string::npos) << s.status().ToString();
  // Conversions other than bf16 -> fp8, a missing or misshapen scale, extra
  // and missing parameters are named.
  ModelSpec bad = fp8;
  bad.params[2].dtype = DType::kFp16;
  s = Schedule::Build(Fp8TestSources(), ShardLayout::Named(bad, 1, "replicated").value());
  EXPECT_NE(s.status().message().find("'n' is fp32 at the sources and fp16"), std::string::npos)
      << s.status().ToString();
  bad = fp8;
  bad.params[1].shape = {3, 3};
  s = Schedule::Build(Fp8TestSources(), ShardLayout::Named(bad, 1, "replicated").value());
  EXPECT_NE(s.status().message().find("'a.scale' is fp32 [3, 3]; the scales of [384, 200] are fp32 [3, 2]"),
            std::string::npos)
      << s.status().ToString();
  bad = fp8;
  bad.params.erase(bad.params.begin() + 1);
  s = Schedule::Build(Fp8TestSources(), ShardLayout::Named(bad, 1, "replicated").value());
  EXPECT_NE(s.status().message().find("has no 'a.scale'"), std::string::npos) << s.status().ToString();
  bad = fp8;
  bad.params.push_back({"extra", DType::kBf16, {4}});
  s = Schedule::Build(Fp8TestSources(), ShardLayout::Named(bad, 1, "replicated").value());
  EXPECT_NE(s.status().message().find("'extra' is not held by the sources"), std::string::npos)
      << s.status().ToString();
  bad = fp8;
  bad.params.erase(bad.params.begin() + 2);
  s = Schedule::Build(Fp8TestSources(), ShardLayout::Named(bad, 1, "replicated").value());
  EXPECT_NE(s.status().message().find("source parameter 'n' has no destination"), std::string::npos)
      << s.status().ToString();
  // Fp8Model's own refusals.
  EXPECT_FALSE(Fp8Model(Fp8TestModel(), {"n"}).ok());
  EXPECT_FALSE(Fp8Model(Fp8TestModel(), {"missing"}).ok());
  const ModelSpec only_o = Fp8Model(Fp8TestModel(), {"o"}).value();
  EXPECT_EQ(only_o.params.size(), 5u);
  // The moe preset's default choice keeps embeddings and the head in bf16.
  const ModelSpec moe = Fp8Model(ModelPreset("moe", 64 << 20).value()).value();
  for (const ParamSpec& p : moe.params)
    if (p.name == "embed_tokens" || p.name == "lm_head") {
      EXPECT_EQ(p.dtype, DType::kBf16);
    }
}

}  // namespace
}  // namespace te::weightsync
