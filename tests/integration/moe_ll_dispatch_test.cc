// Low-latency MoE dispatch/combine: EP ranks as threads of one process, each
// with its own engine, checked bit for bit against the same reference as
// EpDispatcher over several layers (both slot parities reused).
#include <gtest/gtest.h>

#include <condition_variable>
#include <mutex>
#include <thread>

#include "integration/moe_group.h"
#include "integration/test_support.h"
#include "moe/dispatch_cost.h"
#include "moe/placement_solver.h"
#include "moe/trace_generator.h"

namespace te::testing {
namespace {

using moe::EpConfig;
using moe::ExpertMap;
using moe::LowLatencyDispatcher;

EpConfig Shape(uint32_t ranks, moe::Payload payload = moe::Payload::kBf16) { return TestShape(ranks, 32, payload); }

using Group = testing::Group<LowLatencyDispatcher>;
Group MakeGroup(const EpConfig& shape, const EngineOptions& options) {
  return testing::MakeGroup<LowLatencyDispatcher>(shape, options);
}

void RunGroup(Group& g, const ExpertMap& map, Routing routing, const std::vector<uint32_t>& tokens, uint32_t layers,
              const TraceRun& run = {}, std::vector<uint64_t>* sent = nullptr) {
  ASSERT_FALSE(g.ranks.empty());
  std::vector<std::string> errors(g.ranks.size());
  std::vector<std::thread> threads;
  for (size_t r = 0; r < g.ranks.size(); ++r)
    threads.emplace_back([&, r] {
      TraceRun mine = run;
      if (sent) mine.records_sent = &(*sent)[r];
      errors[r] = RunRank(*g.ranks[r], map, routing, tokens, 7, layers, mine);
    });
  for (auto& t : threads) t.join();
  for (size_t r = 0; r < errors.size(); ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

TEST(MoeLowLatency, RandomRoutingBf16Tcp4Ranks) {
  Group g = MakeGroup(Shape(4), Options("tcp"));
  RunGroup(g, ExpertMap::Contiguous(16, 4).value(), Routing::kRandom, {32, 1, 17, 32}, 5);
}

TEST(MoeLowLatency, RandomRoutingFp8Shm3Ranks) {
  EpConfig shape = Shape(3, moe::Payload::kFp8E4M3);
  shape.experts = 15;
  Group g = MakeGroup(shape, Options("shm"));
  RunGroup(g, ExpertMap::Contiguous(15, 3).value(), Routing::kRandom, {8, 32, 3}, 4);
}

TEST(MoeLowLatency, ManualProgressTcp3Ranks) {
  EngineOptions o = Options("tcp");
  o.progress = ProgressMode::kManual;
  EpConfig shape = Shape(3);
  shape.experts = 12;
  Group g = MakeGroup(shape, o);
  RunGroup(g, ExpertMap::Contiguous(12, 3).value(), Routing::kRandom, {5, 32, 9}, 4);
}

TEST(MoeLowLatency, EmptyRanksSkewAndLocalRouting) {
  Group g = MakeGroup(Shape(4), Options("tcp"));
  const ExpertMap map = ExpertMap::Contiguous(16, 4).value();
  RunGroup(g, map, Routing::kNone, {4, 0, 4, 0}, 2);
  RunGroup(g, map, Routing::kSkewed, {32, 32, 32, 32}, 2);  // every token to expert 0: rank 0 gets the maximum
  RunGroup(g, map, Routing::kLocal, {7, 7, 7, 7}, 2);
}

// A trace with a fitted placement and replicas: bit-exact, and the records
// sent are what CountRecords predicts, as for EpDispatcher.
TEST(MoeLowLatency, TraceReplayWithReplicasMovesThePredictedRecords) {
  const TraceCase tc = MakeTraceCase(moe::TraceModel::kCoactivationGroups, 24, /*extra_slots=*/1);
  EXPECT_TRUE(HasTokenSplits(tc));
  EXPECT_TRUE(HasReachedChoices(tc));
  const auto& trace = tc.trace;
  const auto& placement = tc.placement;
  const auto& maps = tc.maps;
  Group g = MakeGroup(Shape(4), Options("tcp"));
  std::vector<uint64_t> sent(4, 0);
  RunGroup(g, maps[0], Routing::kTrace, {24, 24, 24, 24}, 3, TraceRun{&trace, &maps, nullptr}, &sent);
  const auto predicted = moe::CountRecords(trace, placement, {2, moe::TokenHome::kSource, false}).value();
  EXPECT_EQ(sent[0] + sent[1] + sent[2] + sent[3], predicted.total().rank);
}

// The split API: every rank posts its dispatch before any rank receives, and
// posts its combine before receiving it (what overlapping compute does).
TEST(MoeLowLatency, SendsCompleteBeforeAnyReceive) {
  Group g = MakeGroup(Shape(3), Options("tcp"));
  EpConfig shape = Shape(3);
  const ExpertMap map3 = ExpertMap::FromRanks({0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2}, 3).value();
  const std::vector<uint32_t> tokens = {12, 20, 6};
  ReferenceLayer ref = RunReference(g.ranks[0]->config(), map3, Routing::kRandom, tokens, 3, 0);
  for (uint32_t r = 0; r < 3; ++r) ASSERT_TRUE(g.ranks[r]->SendDispatch(ref.batches[r].view(), map3).ok());
  std::vector<moe::DispatchResult> results(3);
  std::vector<std::vector<std::vector<uint16_t>>> outs(3);
  std::vector<std::thread> threads;
  std::vector<std::string> errors(3);
  for (uint32_t r = 0; r < 3; ++r)
    threads.emplace_back([&, r] {
      Status s = g.ranks[r]->RecvDispatch(&results[r]);
      if (!s.ok()) errors[r] = s.ToString();
    });
  for (auto& t : threads) t.join();
  threads.clear();
  for (uint32_t r = 0; r < 3; ++r) {
    ASSERT_EQ(errors[r], "") << "rank " << r;
    EXPECT_EQ(CompareDispatch(ref.dispatched[r], results[r]), "") << "rank " << r;
    moe::ExpertOutputs views;
    outs[r].resize(results[r].experts.size());
    for (size_t i = 0; i < outs[r].size(); ++i) {
      moe::SyntheticExpert(g.ranks[r]->config(), results[r].experts[i], &outs[r][i]);
      views.push_back(outs[r][i].data());
    }
    ASSERT_TRUE(g.ranks[r]->SendCombine(views, results[r]).ok());
  }
  std::vector<std::vector<uint16_t>> combined(3);
  for (uint32_t r = 0; r < 3; ++r)
    threads.emplace_back([&, r] {
      combined[r].assign(size_t(tokens[r]) * shape.hidden, 0);
      Status s = g.ranks[r]->RecvCombine(combined[r].data());
      if (!s.ok()) errors[r] = s.ToString();
    });
  for (auto& t : threads) t.join();
  for (uint32_t r = 0; r < 3; ++r) {
    EXPECT_EQ(errors[r], "") << "rank " << r;
    EXPECT_EQ(combined[r], ref.combined[r]) << "rank " << r;
  }
}

// With a kManual engine nothing moves unless its owner calls in, so the
// Send calls must post their writes themselves: here rank 1 receives rank
// 0's dispatch, and later its combine, while rank 0 sits between Send and
// Recv without touching its engine (what a rank computing there does).
TEST(MoeLowLatency, ManualSendPostsBeforeTheReceiveCall) {
  EngineOptions o = Options("tcp");
  o.progress = ProgressMode::kManual;
  EpConfig shape = Shape(2);
  shape.experts = 8;
  Group g = MakeGroup(shape, o);
  ASSERT_EQ(g.ranks.size(), 2u);
  const ExpertMap map = ExpertMap::Contiguous(8, 2).value();
  const std::vector<uint32_t> tokens = {2, 2};
  RunGroup(g, map, Routing::kRandom, tokens, 1);  // connections up
  // Every token to expert 0, on rank 0: rank 1 waits for rank 0's dispatch
  // block (every rank sends one to every rank) and for its combine rows.
  const ReferenceLayer ref = RunReference(g.ranks[0]->config(), map, Routing::kSkewed, tokens, 5, 1);
  // 1: rank 0 sent dispatch; 2: rank 1 has it; 3: rank 0 sent combine.
  int stage = 0;
  std::mutex mu;
  std::condition_variable moved;
  auto advance = [&](int s) {
    std::lock_guard<std::mutex> lock(mu);
    stage = s;
    moved.notify_all();
  };
  auto await = [&](int s) {
    std::unique_lock<std::mutex> lock(mu);
    return moved.wait_for(lock, std::chrono::seconds(20), [&] { return stage >= s; });
  };
  std::vector<std::string> errors(2);
  std::vector<std::vector<uint16_t>> combined(2);
  auto run = [&](uint32_t r) -> std::string {
    LowLatencyDispatcher& d = *g.ranks[r];
    if (r == 1 && !await(1)) return "rank 0 never sent";
    if (Status s = d.SendDispatch(ref.batches[r].view(), map); !s.ok()) return s.ToString();
    if (r == 0) {
      advance(1);
      if (!await(2)) return "rank 1 never received rank 0's records";
    }
    moe::DispatchResult result;
    if (Status s = d.RecvDispatch(&result); !s.ok()) return "RecvDispatch: " + s.ToString();
    if (std::string diff = CompareDispatch(ref.dispatched[r], result); !diff.empty()) return diff;
    std::vector<std::vector<uint16_t>> outs(result.experts.size());
    moe::ExpertOutputs views;
    for (size_t i = 0; i < outs.size(); ++i) {
      moe::SyntheticExpert(d.config(), result.experts[i], &outs[i]);
      views.push_back(outs[i].data());
    }
    if (r == 1) {
      advance(2);
      if (!await(3)) return "rank 0 never sent its combine";
    }
    if (Status s = d.SendCombine(views, result); !s.ok()) return s.ToString();
    if (r == 0) advance(3);
    combined[r].assign(size_t(tokens[r]) * shape.hidden, 0);
    if (Status s = d.RecvCombine(combined[r].data()); !s.ok()) return "RecvCombine: " + s.ToString();
    return "";
  };
  std::thread t0([&] { errors[0] = run(0); });
  std::thread t1([&] { errors[1] = run(1); });
  t0.join();
  t1.join();
  for (uint32_t r = 0; r < 2; ++r) {
    EXPECT_EQ(errors[r], "") << "rank " << r;
    EXPECT_EQ(combined[r], ref.combined[r]) << "rank " << r;
  }
}

TEST(MoeLowLatency, CallsOutOfOrderAndBadInputAreRefused) {
  Group g = MakeGroup(Shape(2), Options("tcp"));
  ASSERT_EQ(g.ranks.size(), 2u);
  auto& d = *g.ranks[0];
  moe::DispatchResult out;
  EXPECT_EQ(d.RecvDispatch(&out).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(d.RecvCombine(nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(d.SendCombine({}, out).code(), StatusCode::kInvalidArgument);
  const ExpertMap wrong = ExpertMap::Contiguous(8, 2).value();  // 8 experts, the group has 16
  BatchData b = MakeBatch(d.config(), ExpertMap::Contiguous(16, 2).value(), Routing::kRandom, 4, 1, 0, 0);
  EXPECT_FALSE(d.SendDispatch(b.view(), wrong).ok());
  EpConfig big = Shape(2);
  big.max_tokens = 5000;
  EXPECT_FALSE(LowLatencyDispatcher::Create(g.engines[0].get(), big).ok());
  // Another shape is refused at Connect, naming the field.
  EpConfig other = Shape(2);
  other.hidden = 512;
  other.rank = 1;
  auto o = LowLatencyDispatcher::Create(g.engines[1].get(), other).value();
  Status s = d.Connect({d.LocalInfo(), o->LocalInfo()});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("another shape"), std::string::npos) << s.ToString();
  EXPECT_FALSE(d.Connect({d.LocalInfo(), "temoell1 2 1 garbage"}).ok());
}

// Ranks that disagree on the layer's expert map would file records under
// the wrong experts: the block header carries the map's fingerprint, and
// every rank fails the receive with an error naming the other rank.
TEST(MoeLowLatency, RanksWithAnotherMapFailNamingTheRank) {
  Group g = MakeGroup(Shape(2), Options("tcp"));
  ASSERT_EQ(g.ranks.size(), 2u);
  std::vector<uint32_t> alternating(16);
  for (uint32_t e = 0; e < 16; ++e) alternating[e] = e % 2;
  const std::vector<ExpertMap> maps = {ExpertMap::Contiguous(16, 2).value(),
                                       ExpertMap::FromRanks(alternating, 2).value()};
  ASSERT_NE(maps[0].fingerprint(), maps[1].fingerprint());
  std::vector<Status> results(2);
  std::vector<std::thread> threads;
  for (uint32_t r = 0; r < 2; ++r)
    threads.emplace_back([&, r] {
      BatchData b = MakeBatch(g.ranks[r]->config(), maps[r], Routing::kRandom, 4, 1, 0, r);
      moe::DispatchResult out;
      results[r] = g.ranks[r]->Dispatch(b.view(), maps[r], &out);
    });
  for (auto& t : threads) t.join();
  for (uint32_t r = 0; r < 2; ++r) {
    EXPECT_EQ(results[r].code(), StatusCode::kInvalidArgument) << results[r].ToString();
    EXPECT_NE(results[r].message().find("rank " + std::to_string(1 - r) + " uses another expert map"),
              std::string::npos)
        << results[r].ToString();
  }
  moe::DispatchResult out;  // and the dispatcher stays failed
  BatchData b = MakeBatch(g.ranks[0]->config(), maps[0], Routing::kRandom, 4, 1, 1, 0);
  EXPECT_EQ(g.ranks[0]->Dispatch(b.view(), maps[0], &out).code(), StatusCode::kUnavailable);
}

TEST(MoeLowLatency, SilentPeerTimesOut) {
  Group g = ExpectSilentPeerTimesOut<LowLatencyDispatcher>(Shape(3), "token records");
  ASSERT_EQ(g.ranks.size(), 3u);
  const ExpertMap map = ExpertMap::Contiguous(12, 3).value();
  // Failed for good: the group's immediate counts are out of step.
  BatchData b = MakeBatch(g.ranks[0]->config(), map, Routing::kRandom, 4, 1, 1, 0);
  moe::DispatchResult out;
  EXPECT_EQ(g.ranks[0]->Dispatch(b.view(), map, &out).code(), StatusCode::kUnavailable);
}

}  // namespace
}  // namespace te::testing
