// KV-cache transfer between prefill and decode instances in one process,
// over tcp on loopback: byte-exact pages for every tensor-parallel pairing,
// concurrency, cancellation, shutdown and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <thread>

#include "integration/kv_instances.h"

namespace te::testing {
namespace {

using kvcache::KvOrder;

// `count` disjoint random page lists of `n` pages out of `total`.
std::vector<std::vector<uint32_t>> RandomPages(uint32_t total, size_t count, size_t n, uint32_t seed) {
  std::vector<uint32_t> all(total);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), std::mt19937(seed));
  std::vector<std::vector<uint32_t>> out;
  for (size_t i = 0; i < count; ++i) out.emplace_back(all.begin() + i * n, all.begin() + (i + 1) * n);
  return out;
}

struct TpCase {
  uint32_t src_tp, dst_tp;
  KvOrder order;
  bool mla;
};

class KvTpTest : public ::testing::TestWithParam<TpCase> {};

// Three requests, each with the PULL at a different point of the prefill:
// before Start, after half the layers, after Finish.
TEST_P(KvTpTest, EveryDecodeRankGetsExactlyItsHeads) {
  const TpCase c = GetParam();
  PrefillInstance prefill(TestLayout(c.src_tp, c.order, c.mla));
  DecodeInstance decode(TestLayout(c.dst_tp, c.order, c.mla));
  auto src = RandomPages(64, 3, 5, 1), dst = RandomPages(64, 3, 5, 2);

  decode.Receive(1, prefill.Info(), dst[0]);  // PULL first
  prefill.RunAll(1, src[0]);

  prefill.Start(2, src[1]);  // PULL mid-way
  for (uint32_t l = 0; l < 3; ++l) prefill.Layer(2, l);
  decode.Receive(2, prefill.Info(), dst[1]);
  for (uint32_t l = 3; l < 6; ++l) prefill.Layer(2, l);
  prefill.Finish(2);

  prefill.RunAll(3, src[2]);  // PULL after the whole prefill
  decode.Receive(3, prefill.Info(), dst[2]);

  ASSERT_TRUE(decode.WaitAll(3));
  for (uint64_t id = 1; id <= 3; ++id) {
    for (uint32_t r = 0; r < c.dst_tp; ++r) {
      EXPECT_TRUE(decode.ready[r]->Get(id).ok()) << decode.ready[r]->Get(id).ToString();
      EXPECT_EQ(decode.ready[r]->Context(id), "context of request " + std::to_string(id));
      EXPECT_EQ(decode.ready[r]->Calls(id), 1);
    }
    EXPECT_EQ(decode.Wrong(id, dst[id - 1]), 0u) << "request " << id;
  }
  for (auto& sent : prefill.sent_by_rank) {  // every prefill rank retires every request
    ASSERT_TRUE(sent->WaitCount(3));
    for (uint64_t id = 1; id <= 3; ++id) EXPECT_TRUE(sent->Get(id).ok()) << sent->Get(id).ToString();
  }
  for (auto& d : decode.ranks) EXPECT_EQ(d->active_requests(), 0u);
  for (auto& p : prefill.ranks) EXPECT_EQ(p->active_requests(), 0u);
}

INSTANTIATE_TEST_SUITE_P(Pairs, KvTpTest,
                         ::testing::Values(TpCase{1, 1, KvOrder::kNHD, false}, TpCase{1, 2, KvOrder::kNHD, false},
                                           TpCase{2, 1, KvOrder::kNHD, false}, TpCase{4, 2, KvOrder::kNHD, false},
                                           TpCase{1, 2, KvOrder::kHND, false}, TpCase{2, 4, KvOrder::kHND, false},
                                           TpCase{1, 2, KvOrder::kNHD, true}, TpCase{2, 1, KvOrder::kNHD, true}),
                         [](const auto& info) {
                           const TpCase& c = info.param;
                           return std::string(c.mla ? "Mla" : "Gqa") + (c.order == KvOrder::kNHD ? "Nhd" : "Hnd") +
                                  "Tp" + std::to_string(c.src_tp) + "to" + std::to_string(c.dst_tp);
                         });

TEST(KvTransfer, ManyConcurrentRequestsInterleavedLayerByLayer) {
  PrefillInstance prefill(TestLayout(2));
  DecodeInstance decode(TestLayout(1));
  const size_t n = 24;
  auto src = RandomPages(64, n, 2, 3), dst = RandomPages(64, n, 2, 4);
  for (uint64_t id = 0; id < n; ++id) {
    decode.Receive(100 + id, prefill.Info(), dst[id]);
    prefill.Start(100 + id, src[id]);
  }
  for (uint32_t l = 0; l < 6; ++l)
    for (uint64_t id = 0; id < n; ++id) prefill.Layer(100 + id, l);
  for (uint64_t id = 0; id < n; ++id) prefill.Finish(100 + id);
  ASSERT_TRUE(decode.WaitAll(n));
  for (uint64_t id = 0; id < n; ++id) {
    EXPECT_TRUE(decode.ready[0]->Get(100 + id).ok()) << decode.ready[0]->Get(100 + id).ToString();
    EXPECT_EQ(decode.Wrong(100 + id, dst[id]), 0u) << "request " << 100 + id;
  }
  EXPECT_EQ(decode.ranks[0]->stats().requests_ready, n);
}

TEST(KvTransfer, CancelMidStreamStopsWritesBeforeThePagesAreReturned) {
  PrefillInstance prefill(TestLayout(1));
  DecodeInstance decode(TestLayout(2));
  auto src = RandomPages(64, 2, 6, 5), dst = RandomPages(64, 2, 6, 6);
  decode.Receive(7, prefill.Info(), dst[0]);
  prefill.Start(7, src[0]);
  for (uint32_t l = 0; l < 3; ++l) prefill.Layer(7, l);
  for (auto& d : decode.ranks) ASSERT_TRUE(d->Cancel(7).ok());
  ASSERT_TRUE(decode.WaitAll(1));
  for (auto& o : decode.ready) EXPECT_EQ(o->Get(7).code(), StatusCode::kCancelled) << o->Get(7).ToString();
  // From here the pages are the decoder's again: nothing may land in them.
  auto before = decode.memory;
  for (uint32_t l = 3; l < 6; ++l) {
    auto s = prefill.ranks[0]->LayerDone(7, l);
    if (!s.ok()) {
      EXPECT_EQ(s.code(), StatusCode::kNotFound);  // already retired
    }
  }
  (void)prefill.ranks[0]->Finish(7, {});
  ASSERT_TRUE(prefill.sent.WaitCount(1));
  EXPECT_EQ(prefill.sent.Get(7).code(), StatusCode::kCancelled) << prefill.sent.Get(7).ToString();
  std::this_thread::sleep_for(200ms);
  EXPECT_TRUE(decode.memory == before) << "a write landed after the cancellation was confirmed";
  // The same pages serve the next request, byte-exact.
  decode.Receive(8, prefill.Info(), dst[0]);
  prefill.RunAll(8, src[1]);
  ASSERT_TRUE(decode.WaitAll(2));
  for (auto& o : decode.ready) EXPECT_TRUE(o->Get(8).ok()) << o->Get(8).ToString();
  EXPECT_EQ(decode.Wrong(8, dst[0]), 0u);
}

TEST(KvTransfer, IdlePrefillRankKeepsTheRequestUntilFinish) {
  // MLA, prefill tp 2 -> decode tp 1: prefill rank 1 serves nobody. Its PULL
  // arrives before the prefill starts; its engine calls must still succeed.
  PrefillInstance prefill(TestLayout(2, KvOrder::kNHD, true));
  DecodeInstance decode(TestLayout(1, KvOrder::kNHD, true));
  decode.Receive(31, prefill.Info(), {3, 4});
  ASSERT_TRUE(WaitUntil(
      [&] {
        for (auto& p : prefill.ranks)
          if (p->active_requests() == 0) return false;
        return true;
      },
      20000ms))
      << "a prefill rank never saw the PULL";
  prefill.RunAll(31, {7, 8});  // asserts every Start/LayerDone/Finish is OK
  ASSERT_TRUE(decode.WaitAll(1));
  EXPECT_TRUE(decode.ready[0]->Get(31).ok()) << decode.ready[0]->Get(31).ToString();
  EXPECT_EQ(decode.Wrong(31, {3, 4}), 0u);
  for (auto& sent : prefill.sent_by_rank) {
    ASSERT_TRUE(sent->WaitCount(1));
    EXPECT_TRUE(sent->Get(31).ok()) << sent->Get(31).ToString();
    EXPECT_EQ(sent->Calls(31), 1);
  }
  for (auto& p : prefill.ranks) EXPECT_EQ(p->active_requests(), 0u);  // retired at Finish, not before
}

TEST(KvTransfer, StartAfterTheDecoderCancelledIsRefused) {
  PrefillInstance prefill(TestLayout(1));
  DecodeInstance decode(TestLayout(1));
  decode.Receive(32, prefill.Info(), {1});
  ASSERT_TRUE(WaitUntil([&] { return prefill.ranks[0]->active_requests() == 1; }, 20000ms)) << "no PULL arrived";
  ASSERT_TRUE(decode.ranks[0]->Cancel(32).ok());
  ASSERT_TRUE(decode.WaitAll(1));
  EXPECT_EQ(decode.ready[0]->Get(32).code(), StatusCode::kCancelled);
  ASSERT_TRUE(prefill.sent.WaitCount(1));  // retired without ever starting
  EXPECT_EQ(prefill.ranks[0]->Start(32, {2}).code(), StatusCode::kCancelled);
  EXPECT_EQ(prefill.ranks[0]->active_requests(), 0u);
}

TEST(KvTransfer, CancelAfterEverythingLandedReportsReady) {
  PrefillInstance prefill(TestLayout(1));
  DecodeInstance decode(TestLayout(1));
  decode.Receive(9, prefill.Info(), {1, 2});
  prefill.RunAll(9, {3, 4});
  ASSERT_TRUE(decode.WaitAll(1));
  EXPECT_TRUE(decode.ready[0]->Get(9).ok());
  EXPECT_EQ(decode.ranks[0]->Cancel(9).code(), StatusCode::kNotFound);
  EXPECT_EQ(decode.ready[0]->Calls(9), 1);
}

TEST(KvTransfer, PrefillerShutdownFailsItsRequestsOnTheDecoder) {
  auto prefill = std::make_unique<PrefillInstance>(TestLayout(1));
  DecodeInstance decode(TestLayout(1));
  decode.Receive(11, prefill->Info(), {5, 6, 7});
  prefill->Start(11, {1, 2, 3});
  prefill->Layer(11, 0);
  // Layer 0 landing means the prefiller had the PULL (and said it is alive).
  WaitUntil([&] { return decode.engines[0]->ImmAvailable(0x4B000001) > 0; }, 20s);
  ASSERT_GT(decode.engines[0]->ImmAvailable(0x4B000001), 0u);
  const auto t0 = std::chrono::steady_clock::now();
  prefill.reset();  // its engine goes with it: silence from now on
  ASSERT_TRUE(decode.WaitAll(1));
  const auto waited = std::chrono::steady_clock::now() - t0;
  const Status s = decode.ready[0]->Get(11);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("request 11"), std::string::npos) << s.ToString();
  EXPECT_LT(waited, 5s);
  EXPECT_EQ(decode.ranks[0]->active_requests(), 0u);
  EXPECT_EQ(decode.ranks[0]->stats().requests_ready, 0u);
}

TEST(KvTransfer, DecoderShutdownDropsItsRequestsOnThePrefiller) {
  PrefillInstance prefill(TestLayout(1));
  auto decode = std::make_unique<DecodeInstance>(TestLayout(1));
  decode->Receive(12, prefill.Info(), {5, 6});
  prefill.Start(12, {1, 2});
  prefill.Layer(12, 0);
  Outcomes* ready = decode->ready[0].get();
  decode->ranks.clear();  // the decoder cancels what it had in flight
  EXPECT_EQ(ready->Get(12).code(), StatusCode::kCancelled);
  ASSERT_TRUE(prefill.sent.WaitCount(1));
  EXPECT_FALSE(prefill.sent.Get(12).ok());
  EXPECT_EQ(prefill.ranks[0]->active_requests(), 0u);
  EXPECT_EQ(prefill.ranks[0]->LayerDone(12, 1).code(), StatusCode::kNotFound);
}

TEST(KvTransfer, BadInputIsRefusedWithNamedErrors) {
  PrefillInstance prefill(TestLayout(1));
  DecodeInstance decode(TestLayout(1));
  auto info = prefill.Info();
  auto& d = *decode.ranks[0];
  auto noop = [](uint64_t, const Status&, std::span<const uint8_t>) {};
  EXPECT_NE(d.Receive(1, info, {64}, noop).message().find("page 64 outside [0, 64)"), std::string::npos);
  EXPECT_NE(d.Receive(1, info, {3, 3}, noop).message().find("page 3 given twice"), std::string::npos);
  EXPECT_NE(d.Receive(1, info, {}, noop).message().find("no pages"), std::string::npos);
  auto other = info;
  other.layout.layers = 7;
  EXPECT_NE(d.Receive(1, other, {1}, noop).message().find("layers: 7 vs 6"), std::string::npos);
  auto tiny = TestLayout(1);  // many small pages: a PULL too big for one message
  tiny.layers = 1;
  tiny.page_tokens = 1;
  tiny.head_dim = 8;
  tiny.pages = 40000;
  DecodeInstance big(tiny);
  std::vector<uint32_t> huge(20000);
  std::iota(huge.begin(), huge.end(), 0);
  auto big_info = info;
  big_info.layout = tiny;
  EXPECT_NE(big.ranks[0]->Receive(1, big_info, huge, noop).message().find("-byte PULL"), std::string::npos);
  ASSERT_TRUE(d.Receive(2, info, {1}, noop).ok());
  EXPECT_NE(d.Receive(2, info, {2}, noop).message().find("already in flight"), std::string::npos);

  auto& p = *prefill.ranks[0];
  EXPECT_NE(p.Start(5, {64}).message().find("page 64 outside"), std::string::npos);
  EXPECT_EQ(p.LayerDone(6, 0).code(), StatusCode::kNotFound);
  ASSERT_TRUE(p.Start(5, {1}).ok());
  EXPECT_NE(p.LayerDone(5, 6).message().find("layer 6 outside [0, 6)"), std::string::npos);
  EXPECT_NE(p.Finish(5, {}).message().find("before layer 0"), std::string::npos);
  std::vector<uint8_t> ctx(257);
  EXPECT_NE(p.Finish(5, ctx).message().find("exceeds context_bytes 256"), std::string::npos);
  EXPECT_TRUE(p.Abort(5, "test").ok());

  kvcache::DecoderOptions bad;
  bad.imm_base = 0x4B000001;
  std::vector<uint8_t> mem(KvDecoder::MemoryBytes(decode.layout, bad));
  EXPECT_FALSE(KvDecoder::Create(decode.engines[0].get(), decode.layout, 0, mem.data(), bad).ok());
  EXPECT_FALSE(KvDecoder::Create(decode.engines[0].get(), decode.layout, 1, mem.data()).ok());
}

TEST(KvTransfer, UnservableLayoutIsFailedByThePrefiller) {
  // The decoder believes the prefill instance has 2 ranks, both served by
  // one engine of tp 1. Its immediate count would be wrong, so the prefill
  // rank refuses both PULLs with FAILED rather than write.
  PrefillInstance prefill(TestLayout(1));
  DecodeInstance decode(TestLayout(2));
  auto info = prefill.Info();
  info.layout.tp = 2;
  info.ranks.push_back(info.ranks[0]);
  decode.Receive(21, info, {1, 2});
  ASSERT_TRUE(decode.WaitAll(1));
  for (uint32_t r = 0; r < 2; ++r) {
    const Status s = decode.ready[r]->Get(21);
    EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
    EXPECT_NE(s.message().find("prefill rank " + std::to_string(r) +
                               " failed request 21: decoder assumed prefill rank " + std::to_string(r)),
              std::string::npos)
        << s.ToString();
  }
}

// One data plane per engine: a second plane's claim on the receive handler is
// refused and names the holder; the holder keeps its messages.
TEST(KvTransfer, ASecondPlaneOnAnEngineIsRefusedAndTheFirstKeepsWorking) {
  PrefillInstance prefill(TestLayout(1));
  DecodeInstance decode(TestLayout(1));
  std::vector<uint8_t> mem(KvPrefiller::MemoryBytes(decode.layout, {}));
  auto second = KvPrefiller::Create(decode.engines[0].get(), decode.layout, 0, mem.data());
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(second.status().message().find("KvDecoder holds it"), std::string::npos) << second.status().ToString();
  auto src = RandomPages(64, 1, 2, 5), dst = RandomPages(64, 1, 2, 6);
  decode.Receive(7, prefill.Info(), dst[0]);
  prefill.Start(7, src[0]);
  for (uint32_t l = 0; l < 6; ++l) prefill.Layer(7, l);
  prefill.Finish(7);
  ASSERT_TRUE(decode.WaitAll(1));
  EXPECT_TRUE(decode.ready[0]->Get(7).ok()) << decode.ready[0]->Get(7).ToString();
  EXPECT_EQ(decode.Wrong(7, dst[0]), 0u);
}

}  // namespace
}  // namespace te::testing
