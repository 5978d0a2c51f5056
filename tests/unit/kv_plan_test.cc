// KvLayout and the KV transfer plan, applied with memcpy: every decode rank
// must end up holding exactly its heads of every page, checked against the
// pattern definition (kv_pattern.h), not against the plan.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>

#include "kvcache/kv_layout.h"
#include "kvcache/kv_messages.h"
#include "kvcache/kv_pattern.h"
#include "kvcache/kv_plan.h"

namespace te::kvcache {
namespace {

KvLayout Small(uint32_t tp, KvOrder order, bool mla = false) {
  KvLayout l;
  l.layers = 3;
  l.page_tokens = 4;
  l.kv_heads = mla ? 1 : 8;
  l.head_dim = mla ? 24 : 8;
  l.dtype_bytes = 2;
  l.mla = mla;
  l.order = order;
  l.tp = tp;
  l.pages = 13;
  return l;
}

struct Case {
  uint32_t src_tp, dst_tp;
  KvOrder src_order, dst_order;
  bool mla;
};

// Moves a request from every prefill rank to every decode rank by memcpy,
// following the plan exactly as KvPrefiller submits it, and checks the
// immediate count the decoder would expect.
void MoveAndCheck(const Case& c) {
  KvLayout src = Small(c.src_tp, c.src_order, c.mla), dst = Small(c.dst_tp, c.dst_order, c.mla);
  std::mt19937 rng(c.src_tp * 31 + c.dst_tp);
  std::vector<uint32_t> all(13);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  std::vector<uint32_t> src_pages(all.begin(), all.begin() + 5);
  std::shuffle(all.begin(), all.end(), rng);
  std::vector<uint32_t> dst_pages(all.begin(), all.begin() + 5);

  std::vector<std::vector<uint8_t>> prefill(src.tp, std::vector<uint8_t>(src.region_bytes()));
  for (uint32_t r = 0; r < src.tp; ++r) FillKvPattern(src, r, src_pages, 42, prefill[r].data());
  for (uint32_t d = 0; d < dst.tp; ++d) {
    std::vector<uint8_t> decode(dst.region_bytes(), 0xEE);
    uint64_t imms = 1;  // the context
    for (uint32_t r : SourceRanks(src, dst, d)) {
      auto runs = PlanPageRuns(src, r, dst, d);
      ASSERT_TRUE(runs.ok()) << runs.status().ToString();
      ASSERT_GT(runs->runs(), 0u);
      for (uint32_t layer = 0; layer < src.layers; ++layer) {
        LayerWrites w;
        BuildLayerWrites(*runs, src, dst, layer, src_pages, dst_pages, &w);
        ASSERT_EQ(w.src_units.size(), w.dst_units.size());
        for (size_t i = 0; i < w.src_units.size(); ++i)
          std::memcpy(decode.data() + w.dst_units[i] * w.unit_bytes, prefill[r].data() + w.src_units[i] * w.unit_bytes,
                      w.run_bytes);
        imms += w.src_units.size();
      }
    }
    EXPECT_EQ(CountWrongKvHeads(dst, d, dst_pages, 42, decode.data()), 0u) << "decode rank " << d;
    auto expected = ExpectedImms(src, dst, d, dst_pages.size());
    ASSERT_TRUE(expected.ok());
    EXPECT_EQ(*expected, imms);
    // Pages outside the request are untouched.
    for (uint32_t p = 0; p < dst.pages; ++p) {
      if (std::find(dst_pages.begin(), dst_pages.end(), p) != dst_pages.end()) continue;
      EXPECT_EQ(decode[dst.Offset(0, 0, p, 0, 0)], 0xEE) << "page " << p << " written";
    }
  }
}

TEST(KvPlan, SameTpSameOrderIsOneRunPerPage) {
  auto runs = PlanPageRuns(Small(2, KvOrder::kNHD), 1, Small(2, KvOrder::kNHD), 1);
  ASSERT_TRUE(runs.ok());
  EXPECT_EQ(runs->runs(), 1u);
  EXPECT_EQ(runs->run_bytes, Small(2, KvOrder::kNHD).page_bytes());
  MoveAndCheck({2, 2, KvOrder::kNHD, KvOrder::kNHD, false});
}

TEST(KvPlan, HeadSlicingNhdIsOneRunPerToken) {
  // TP 1 -> 2: each decode rank takes 4 of 8 heads of every token.
  auto runs = PlanPageRuns(Small(1, KvOrder::kNHD), 0, Small(2, KvOrder::kNHD), 1);
  ASSERT_TRUE(runs.ok());
  EXPECT_EQ(runs->runs(), 4u);  // page_tokens
  EXPECT_EQ(runs->run_bytes, 4u * 16);
  EXPECT_EQ(runs->src_offsets[0], 4u * 16);  // heads 4..7 of token 0
}

TEST(KvPlan, HeadSlicingHndIsOneRunPerPage) {
  auto runs = PlanPageRuns(Small(1, KvOrder::kHND), 0, Small(2, KvOrder::kHND), 1);
  ASSERT_TRUE(runs.ok());
  EXPECT_EQ(runs->runs(), 1u);
  EXPECT_EQ(runs->run_bytes, 4u * 4 * 16);
}

TEST(KvPlan, TensorParallelPairsMoveEveryHeadToItsOwner) {
  for (auto order : {KvOrder::kNHD, KvOrder::kHND}) {
    MoveAndCheck({1, 2, order, order, false});
    MoveAndCheck({2, 1, order, order, false});
    MoveAndCheck({4, 2, order, order, false});
    MoveAndCheck({2, 4, order, order, false});
    MoveAndCheck({8, 1, order, order, false});
  }
}

TEST(KvPlan, DifferentMemoryOrdersMoveHeadByHead) {
  MoveAndCheck({2, 1, KvOrder::kNHD, KvOrder::kHND, false});
  MoveAndCheck({1, 4, KvOrder::kHND, KvOrder::kNHD, false});
}

TEST(KvPlan, MlaMatchesRanksInsteadOfSlicingHeads) {
  KvLayout src = Small(2, KvOrder::kNHD, true), dst = Small(4, KvOrder::kNHD, true);
  EXPECT_EQ(SourceRanks(src, dst, 3), std::vector<uint32_t>{1});
  EXPECT_EQ(TargetRanks(src, dst, 0), (std::vector<uint32_t>{0, 2}));
  EXPECT_EQ(src.tensors(), 1u);
  MoveAndCheck({2, 4, KvOrder::kNHD, KvOrder::kNHD, true});
  MoveAndCheck({4, 1, KvOrder::kHND, KvOrder::kHND, true});
}

TEST(KvLayout, OffsetsFollowTheDocumentedOrder) {
  KvLayout l = Small(2, KvOrder::kNHD);  // 4 local heads x 16 bytes, 4 tokens: 256-byte pages
  EXPECT_EQ(l.page_bytes(), 256u);
  EXPECT_EQ(l.Offset(0, 0, 1, 0, 0), 256u);
  EXPECT_EQ(l.Offset(0, 1, 0, 0, 0), 13u * 256);      // V block after K
  EXPECT_EQ(l.Offset(1, 0, 0, 0, 0), 2u * 13 * 256);  // next layer
  EXPECT_EQ(l.Offset(0, 0, 0, 1, 2), (1u * 4 + 2) * 16);
  l.order = KvOrder::kHND;
  EXPECT_EQ(l.Offset(0, 0, 0, 1, 2), (2u * 4 + 1) * 16);
}

TEST(KvLayout, BadShapesAreRefusedByName) {
  KvLayout l = Small(3, KvOrder::kNHD);  // 8 heads over 3 ranks
  auto s = l.Validate();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("kv_heads 8 does not divide by tp 3"), std::string::npos) << s.message();
  l = Small(1, KvOrder::kNHD);
  l.page_tokens = 0;
  EXPECT_NE(l.Validate().message().find("page_tokens is 0"), std::string::npos);
  KvLayout a = Small(1, KvOrder::kNHD), b = Small(2, KvOrder::kHND);
  b.layers = 4;
  auto c = CheckCompatible(a, b);
  EXPECT_NE(c.message().find("layers: 3 vs 4"), std::string::npos) << c.message();
  EXPECT_FALSE(PlanPageRuns(a, 1, Small(1, KvOrder::kNHD), 0).ok());  // rank outside tp
  EXPECT_FALSE(KvLayout::Preset("gpt5").ok());
}

TEST(KvLayout, SerializesAndParses) {
  for (const char* name : {"llama70b", "deepseek"}) {
    auto l = KvLayout::Preset(name);
    ASSERT_TRUE(l.ok());
    l->pages = 100;
    l->order = KvOrder::kHND;
    auto back = KvLayout::Parse(l->Serialize());
    ASSERT_TRUE(back.ok()) << back.status().ToString();
    EXPECT_EQ(back->Serialize(), l->Serialize());
    EXPECT_EQ(back->Describe(), l->Describe());
  }
  EXPECT_FALSE(KvLayout::Parse("kvl1 1 2 3").ok());
}

TEST(KvMessages, PullRoundTripsAndTruncationIsRefused) {
  KvMessage m;
  m.kind = KvMessage::Kind::kPull;
  m.request = 77;
  m.rank = 1;
  m.imm = 0x4B000005;
  m.context_offset = 4096;
  m.context_bytes = 64;
  m.layout = Small(2, KvOrder::kHND);
  m.descriptor_hex = "abcd";
  m.pages = {3, 0, 70000, 12};
  m.source_rank = 3;
  m.source_layout = Small(4, KvOrder::kNHD, false);
  auto bytes = m.Encode();
  auto back = KvMessage::Decode(bytes);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->pages, m.pages);
  EXPECT_EQ(back->imm, m.imm);
  EXPECT_EQ(back->layout.Serialize(), m.layout.Serialize());
  EXPECT_EQ(back->source_layout.Serialize(), m.source_layout.Serialize());
  EXPECT_EQ(back->source_rank, 3u);
  bytes.pop_back();
  EXPECT_FALSE(KvMessage::Decode(bytes).ok());
  KvMessage f;
  f.kind = KvMessage::Kind::kFailed;
  f.delivered = 9;
  f.reason = "decoder silent for more than 100 ms";
  auto fb = KvMessage::Decode(f.Encode());
  ASSERT_TRUE(fb.ok());
  EXPECT_EQ(fb->reason, f.reason);
  EXPECT_EQ(fb->delivered, 9u);
  const std::string junk = "tekv1 NOPE 1 2\n";
  EXPECT_FALSE(KvMessage::Decode({reinterpret_cast<const uint8_t*>(junk.data()), junk.size()}).ok());
}

}  // namespace
}  // namespace te::kvcache
