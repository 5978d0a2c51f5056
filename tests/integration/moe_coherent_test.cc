// CoherentDispatcher: EP ranks as threads of one process, each with its own
// engine. Tokens move: every rank simulates the whole group from the seed
// (which tokens live where, what they route to), checks its dispatch against
// ReferenceDispatch and the tokens merged on it against ReferenceCombine,
// bit for bit, and continues the next layer from the tokens that merged on
// it. Trace replays send exactly the records CountRecords predicts with
// TokenHome::kTop1.
#include <gtest/gtest.h>

#include <thread>

#include "integration/moe_group.h"
#include "integration/test_support.h"
#include "moe/coherent_dispatcher.h"
#include "moe/dispatch_cost.h"

namespace te::testing {
namespace {

using moe::CoherentDispatcher;
using moe::EpConfig;
using moe::ExpertMap;

using CoherentGroup = Group<CoherentDispatcher>;

void RunCoherentGroup(CoherentGroup& g, const CoherentRun& run, uint64_t* moved = nullptr) {
  ASSERT_FALSE(g.ranks.empty());
  std::vector<std::string> errors(g.ranks.size());
  std::vector<uint64_t> moves(g.ranks.size(), 0);
  std::vector<std::thread> threads;
  for (size_t r = 0; r < g.ranks.size(); ++r)
    threads.emplace_back([&, r] { errors[r] = RunCoherentRank(*g.ranks[r], run, &moves[r]); });
  for (auto& t : threads) t.join();
  for (size_t r = 0; r < errors.size(); ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
  if (moved)
    for (uint64_t m : moves) *moved += m;
}

// max_tokens holds every token of the group: merges may gather them on one rank.
EpConfig Shape(uint32_t ranks, uint32_t tokens, moe::Payload payload = moe::Payload::kBf16) {
  return TestShape(ranks, tokens, payload);
}

TEST(MoeCoherent, RandomRoutingBf16Tcp4Ranks) {
  CoherentGroup g = MakeGroup<CoherentDispatcher>(Shape(4, 4 * 48), Options("tcp"));
  const ExpertMap map = ExpertMap::Contiguous(16, 4).value();
  uint64_t moved = 0;
  RunCoherentGroup(g, {Routing::kRandom, {48, 30, 48, 17}, 7, 4, nullptr, nullptr, &map}, &moved);
  EXPECT_GT(moved, 0u);  // tokens did change ranks
}

TEST(MoeCoherent, RandomRoutingFp8Shm2Ranks) {
  CoherentGroup g = MakeGroup<CoherentDispatcher>(Shape(2, 2 * 48, moe::Payload::kFp8E4M3), Options("shm"));
  const ExpertMap map = ExpertMap::Contiguous(16, 2).value();
  RunCoherentGroup(g, {Routing::kRandom, {48, 40}, 5, 3, nullptr, nullptr, &map});
}

// Every token to expert 0: all merge on rank 0, which then dispatches them
// all; then no experts at all (tokens stay, zeros) and empty ranks.
TEST(MoeCoherent, SkewedNoExpertAndEmptyRanks) {
  EpConfig shape = Shape(4, 4 * 48);
  shape.private_tokens = 5;  // through overflow
  CoherentGroup g = MakeGroup<CoherentDispatcher>(shape, Options("tcp"));
  const ExpertMap map = ExpertMap::Contiguous(16, 4).value();
  RunCoherentGroup(g, {Routing::kSkewed, {48, 48, 48, 48}, 3, 2, nullptr, nullptr, &map});
  RunCoherentGroup(g, {Routing::kNone, {48, 0, 48, 3}, 4, 2, nullptr, nullptr, &map});
  RunCoherentGroup(g, {Routing::kRandom, {0, 48, 0, 3}, 5, 2, nullptr, nullptr, &map});
}

TEST(MoeCoherent, ManualProgress3Ranks) {
  EngineOptions o = Options("tcp");
  o.progress = ProgressMode::kManual;
  EpConfig shape = Shape(3, 3 * 40);
  shape.experts = 12;
  CoherentGroup g = MakeGroup<CoherentDispatcher>(shape, o);
  const ExpertMap map = ExpertMap::Contiguous(12, 3).value();
  RunCoherentGroup(g, {Routing::kRandom, {40, 1, 40}, 9, 3, nullptr, nullptr, &map});
}

// A co-activation trace under a fitted placement, with and without
// replicas: bit-exact every layer, and the records between ranks are
// exactly CountRecords' with kTop1 homes: `rank` dispatched, `merged` merged.
void ReplayTrace(const std::string& provider, uint32_t extra_slots) {
  const TraceCase tc = MakeTraceCase(moe::TraceModel::kCoactivationGroups, 40, extra_slots);
  EXPECT_EQ(tc.maps[0].replicated(), extra_slots > 0);
  // With replicas the fitted placement shares some sources' tokens among
  // copies (token splits): the count below covers them.
  EXPECT_EQ(HasTokenSplits(tc), extra_slots > 0);
  EXPECT_EQ(HasReachedChoices(tc), extra_slots > 0);
  CoherentGroup g = MakeGroup<CoherentDispatcher>(Shape(4, 160), Options(provider));
  ASSERT_EQ(g.ranks.size(), 4u);
  uint64_t moved = 0;
  RunCoherentGroup(g, {Routing::kTrace, {40, 40, 40, 40}, 11, 3, &tc.trace, &tc.maps, nullptr}, &moved);
  const auto want = moe::CountRecords(tc.trace, tc.placement, {2, moe::TokenHome::kTop1, false}).value().total();
  uint64_t dispatched = 0, merged = 0;
  for (auto& d : g.ranks) dispatched += d->records_dispatched(), merged += d->records_merged();
  EXPECT_EQ(dispatched, want.rank);
  EXPECT_EQ(merged, want.merged);
  EXPECT_GT(moved, 0u);
  // Layers 1 and 2 start away from the source exactly as often as the model says.
  EXPECT_GT(want.away_from_source, 0u);
}

TEST(MoeCoherent, TraceReplayMovesExactlyThePredictedRecordsTcp) { ReplayTrace("tcp", 0); }
TEST(MoeCoherent, TraceReplayWithReplicasShm) { ReplayTrace("shm", 1); }

// Top-1 routing: a token merges where its one expert ran, so a layer is one
// exchange (the dispatch) and combine is local: reference-exact over three
// layers with tokens moving, no merge records, no merge buffers, and no
// immediate of a merge step on any engine.
TEST(MoeCoherent, TopOneIsOneExchangePerLayer) {
  EpConfig shape = Shape(4, 4 * 32);
  shape.topk = 1;
  CoherentGroup g = MakeGroup<CoherentDispatcher>(shape, Options("tcp"));
  ASSERT_EQ(g.ranks.size(), 4u);
  EpConfig wider = shape;
  wider.topk = 2;
  auto with_merge = CoherentDispatcher::Create(g.engines[0].get(), wider);
  ASSERT_TRUE(with_merge.ok()) << with_merge.status().ToString();
  EXPECT_LT(g.ranks[0]->buffer_bytes(), with_merge.value()->buffer_bytes() / 4);  // no merge step's buffers
  EXPECT_EQ(g.ranks[0]->merge_record_bytes(), 0u);
  with_merge.value().reset();
  const ExpertMap map = ExpertMap::Contiguous(16, 4).value();
  uint64_t moved = 0;
  RunCoherentGroup(g, {Routing::kRandom, {32, 20, 32, 9}, 13, 3, nullptr, nullptr, &map}, &moved);
  EXPECT_GT(moved, 0u);
  uint64_t dispatched = 0;
  for (auto& d : g.ranks) {
    EXPECT_EQ(d->records_merged(), 0u);
    dispatched += d->records_dispatched();
    for (uint32_t n : d->last_merge_sent_to()) EXPECT_EQ(n, 0u);
  }
  EXPECT_GT(dispatched, 0u);
  // Not even a merge step's count rows went out: no immediate of the merge
  // step's values reached any rank.
  for (auto& e : g.engines)
    for (uint32_t i = 0; i < 6; ++i)
      EXPECT_EQ(e->ImmAvailable(shape.imm_base + CoherentDispatcher::kMergeImmOffset + i), 0u) << i;
  // A dispatcher whose group has a merge step refuses to connect to a top-1
  // one (their exchanges would not line up).
  std::vector<std::string> infos;
  for (auto& d : g.ranks) infos.push_back(d->LocalInfo());
  auto other = CoherentDispatcher::Create(g.engines[1].get(), wider).value();
  infos[1] = other->LocalInfo();
  auto fresh = CoherentDispatcher::Create(g.engines[0].get(), shape).value();
  EXPECT_EQ(fresh->Connect(infos).code(), StatusCode::kInvalidArgument);
}

TEST(MoeCoherent, RefusesBadCalls) {
  CoherentGroup g = MakeGroup<CoherentDispatcher>(Shape(2, 16), Options("tcp"));
  ASSERT_EQ(g.ranks.size(), 2u);
  const ExpertMap map = ExpertMap::Contiguous(16, 2).value();
  BatchData b = MakeBatch(g.ranks[0]->config(), map, Routing::kRandom, 4, 1, 0, 0);
  const std::vector<uint32_t> twice{3, 5, 3, 9};
  moe::DispatchResult out;
  Status s = g.ranks[0]->Dispatch(b.view(), twice.data(), map, &out);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("token 3 twice"), std::string::npos) << s.ToString();
  moe::MergedTokens merged;
  EXPECT_EQ(g.ranks[0]->Combine({}, out, &merged).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(g.ranks[0]->Connect({"x", "y"}).code(), StatusCode::kInvalidArgument);
  EpConfig too_many = Shape(70000, 1);
  too_many.experts = 70000;
  EXPECT_EQ(CoherentDispatcher::Create(g.engines[0].get(), too_many).status().code(), StatusCode::kInvalidArgument);
}

// A rank that never dispatches: the others fail with kTimeout within the
// timeout, and later calls are refused.
TEST(MoeCoherent, SilentPeerTimesOut) {
  CoherentGroup g = ExpectSilentPeerTimesOut<CoherentDispatcher>(Shape(3, 16), "count rows");
  ASSERT_EQ(g.ranks.size(), 3u);
  const ExpertMap map = ExpertMap::Contiguous(12, 3).value();
  BatchData b = MakeBatch(g.ranks[0]->config(), map, Routing::kRandom, 16, 1, 1, 0);
  moe::DispatchResult out;
  EXPECT_EQ(g.ranks[0]->Dispatch(b.view(), map, &out).code(), StatusCode::kUnavailable);
}

}  // namespace
}  // namespace te::testing
