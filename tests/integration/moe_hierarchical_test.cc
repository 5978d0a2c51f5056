// HierarchicalDispatcher: EP ranks as threads of one process, each with its
// own engine, grouped into nodes by rank. Every layer is checked bit for bit
// against the reference (ReferenceDispatch, with sources named by relay as
// the header says, and ReferenceHierarchicalCombine), and trace replays send
// exactly the records CountRecords predicts for the relay protocol.
#include <gtest/gtest.h>

#include <algorithm>
#include <thread>
#include <tuple>

#include "integration/moe_group.h"
#include "integration/test_support.h"
#include "moe/dispatch_cost.h"
#include "moe/hierarchical_dispatcher.h"

namespace te::testing {
namespace {

using moe::EpConfig;
using moe::ExpertMap;
using moe::HierarchicalDispatcher;

struct HierGroup {
  std::vector<std::unique_ptr<TransferEngine>> engines;
  std::vector<std::unique_ptr<HierarchicalDispatcher>> ranks;
};

HierGroup MakeHierGroup(EpConfig shape, uint32_t nodes, const EngineOptions& options) {
  HierGroup g;
  std::vector<std::string> infos;
  for (uint32_t r = 0; r < shape.ranks; ++r) {
    auto e = TransferEngine::Create(options);
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    if (!e.ok()) return {};
    g.engines.push_back(std::move(e).value());
    shape.rank = r;
    auto d = HierarchicalDispatcher::Create(g.engines.back().get(), shape, nodes);
    EXPECT_TRUE(d.ok()) << d.status().ToString();
    if (!d.ok()) return {};
    g.ranks.push_back(std::move(d).value());
    infos.push_back(g.ranks.back()->LocalInfo());
  }
  for (auto& d : g.ranks) {
    Status s = d->Connect(infos);
    EXPECT_TRUE(s.ok()) << s.ToString();
  }
  return g;
}

void RunHierGroup(HierGroup& g, const ExpertMap& map, Routing routing, const std::vector<uint32_t>& tokens,
                  uint32_t layers, uint64_t seed = 7) {
  ASSERT_FALSE(g.ranks.empty());
  std::vector<std::string> errors(g.ranks.size());
  std::vector<std::thread> threads;
  for (size_t r = 0; r < g.ranks.size(); ++r)
    threads.emplace_back(
        [&, r] { errors[r] = RunHierRank(*g.ranks[r], routing, tokens, seed, layers, TraceRun{}, &map); });
  for (auto& t : threads) t.join();
  for (size_t r = 0; r < errors.size(); ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

EpConfig Shape(uint32_t ranks, moe::Payload payload = moe::Payload::kBf16) { return TestShape(ranks, 48, payload); }

TEST(MoeHierarchical, RandomRoutingBf16Tcp4RanksIn2Nodes) {
  HierGroup g = MakeHierGroup(Shape(4), 2, Options("tcp"));
  RunHierGroup(g, ExpertMap::Contiguous(16, 4).value(), Routing::kRandom, {48, 30, 48, 17}, 4);
}

TEST(MoeHierarchical, RandomRoutingFp8Shm4RanksIn2Nodes) {
  HierGroup g = MakeHierGroup(Shape(4, moe::Payload::kFp8E4M3), 2, Options("shm"));
  RunHierGroup(g, ExpertMap::Contiguous(16, 4).value(), Routing::kRandom, {48, 48, 48, 48}, 3);
}

// One node (everything relayed inside it) and one rank per node (every
// relay is the expert rank itself): both ends of the split.
TEST(MoeHierarchical, OneNodeAndOneRankPerNode) {
  for (uint32_t nodes : {1u, 4u}) {
    HierGroup g = MakeHierGroup(Shape(4), nodes, Options("tcp"));
    RunHierGroup(g, ExpertMap::Contiguous(16, 4).value(), Routing::kRandom, {48, 48, 48, 48}, 2);
  }
}

TEST(MoeHierarchical, SkewedEmptyAndLocalRouting) {
  EpConfig shape = Shape(4);
  shape.private_tokens = 5;  // the skewed layer goes through overflow
  HierGroup g = MakeHierGroup(shape, 2, Options("tcp"));
  const ExpertMap map = ExpertMap::Contiguous(16, 4).value();
  RunHierGroup(g, map, Routing::kSkewed, {48, 48, 48, 48}, 2, 3);
  RunHierGroup(g, map, Routing::kRandom, {0, 48, 0, 3}, 2, 4);
  RunHierGroup(g, map, Routing::kNone, {48, 48, 48, 48}, 1, 5);
  RunHierGroup(g, map, Routing::kLocal, {48, 20, 48, 7}, 2, 6);
}

TEST(MoeHierarchical, ManualProgress6RanksIn3Nodes) {
  EngineOptions o = Options("tcp");
  o.progress = ProgressMode::kManual;
  EpConfig shape = Shape(6);
  shape.experts = 12;
  HierGroup g = MakeHierGroup(shape, 3, o);
  RunHierGroup(g, ExpertMap::Contiguous(12, 6).value(), Routing::kRandom, {48, 48, 40, 48, 1, 48}, 3);
}

// A co-activation trace under a placement fitted for 2 nodes, with and
// without replicas: bit-exact every layer, and the records between ranks
// and across nodes are exactly CountRecords' relayed and node counts.
void ReplayTrace(const std::string& provider, uint32_t extra_slots) {
  const TraceCase tc = MakeTraceCase(moe::TraceModel::kCoactivationGroups, 40, extra_slots);
  EXPECT_EQ(tc.maps[0].replicated(), extra_slots > 0);
  // With replicas the fitted placement shares some sources' tokens among
  // copies (token splits): the count below covers them.
  EXPECT_EQ(HasTokenSplits(tc), extra_slots > 0);
  EXPECT_EQ(HasReachedChoices(tc), extra_slots > 0);
  HierGroup g = MakeHierGroup(Shape(4), 2, Options(provider));
  ASSERT_EQ(g.ranks.size(), 4u);
  std::vector<uint64_t> sent(4, 0);
  std::vector<std::string> errors(4);
  std::vector<std::thread> threads;
  for (uint32_t r = 0; r < 4; ++r)
    threads.emplace_back([&, r] {
      TraceRun run{&tc.trace, &tc.maps, &sent[r]};
      errors[r] = RunHierRank(*g.ranks[r], Routing::kTrace, {40, 40, 40, 40}, 11, 3, run, nullptr);
    });
  for (auto& t : threads) t.join();
  for (uint32_t r = 0; r < 4; ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
  const auto hier = moe::CountRecords(tc.trace, tc.placement, {2, moe::TokenHome::kSource, true}).value().total();
  uint64_t across = 0, inside = 0;
  for (auto& d : g.ranks) across += d->records_across_nodes(), inside += d->records_inside_node();
  EXPECT_EQ(sent[0] + sent[1] + sent[2] + sent[3], hier.relayed);
  EXPECT_EQ(across + inside, hier.relayed);
  EXPECT_EQ(across, hier.node);  // ranks 0-1 and 2-3 are the nodes: every record across is a crossing
  // Node-level deduplication saves crossings against the flat dispatcher.
  const auto flat = moe::CountRecords(tc.trace, tc.placement, {2, moe::TokenHome::kSource, false}).value().total();
  EXPECT_LT(hier.node, flat.node);
}

TEST(MoeHierarchical, TraceReplayMovesExactlyThePredictedRecordsTcp) { ReplayTrace("tcp", 0); }
TEST(MoeHierarchical, TraceReplayWithReplicasShm) { ReplayTrace("shm", 1); }

// A rank that never dispatches: the others fail with kTimeout within the
// timeout, and later calls are refused.
TEST(MoeHierarchical, SilentPeerTimesOut) {
  EpConfig shape = Shape(4);
  shape.timeout = std::chrono::milliseconds(400);
  HierGroup g = MakeHierGroup(shape, 2, Options("tcp"));
  ASSERT_EQ(g.ranks.size(), 4u);
  const ExpertMap map = ExpertMap::Contiguous(16, 4).value();
  std::vector<Status> results(3);
  std::vector<std::thread> threads;
  const auto start = std::chrono::steady_clock::now();
  for (uint32_t r = 0; r < 3; ++r)
    threads.emplace_back([&, r] {
      BatchData b = MakeBatch(g.ranks[r]->config(), map, Routing::kRandom, 16, 1, 0, r);
      moe::DispatchResult out;
      results[r] = g.ranks[r]->Dispatch(b.view(), map, &out);
    });
  for (auto& t : threads) t.join();
  // Ended by the 400 ms timeout, not hung: the silent peer never writes, so
  // without it the wait has no end. The bound leaves room for a loaded
  // machine (ten times slower at times, under TSan more).
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
  for (uint32_t r = 0; r < 3; ++r) {
    EXPECT_EQ(results[r].code(), StatusCode::kTimeout) << results[r].ToString();
    BatchData b = MakeBatch(g.ranks[r]->config(), map, Routing::kRandom, 4, 1, 1, r);
    moe::DispatchResult out;
    EXPECT_EQ(g.ranks[r]->Dispatch(b.view(), map, &out).code(), StatusCode::kUnavailable);
  }
}

TEST(MoeHierarchical, BadShapesAndInfosAreRefused) {
  auto engine = TransferEngine::Create(Options("tcp")).value();
  EpConfig shape = Shape(4);
  EXPECT_EQ(HierarchicalDispatcher::Create(engine.get(), shape, 3).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(HierarchicalDispatcher::Create(engine.get(), shape, 0).status().code(), StatusCode::kInvalidArgument);
  shape.experts = 20000;
  shape.topk = 4;
  auto big = HierarchicalDispatcher::Create(engine.get(), shape, 2);
  EXPECT_EQ(big.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(big.status().message().find("65535"), std::string::npos) << big.status().ToString();
  shape.experts = 16;
  auto d = HierarchicalDispatcher::Create(engine.get(), shape, 2).value();
  const std::string info = d->LocalInfo();
  EXPECT_FALSE(d->Connect({info, info, info}).ok());                       // wrong count
  EXPECT_FALSE(d->Connect({info, "temoe1 x", info, info}).ok());           // not ours
  EXPECT_FALSE(d->Connect({info, info, info, "temoeh1 4 | a | b"}).ok());  // other nodes
  EXPECT_FALSE(d->Connect({info, info + " | extra", info, info}).ok());    // malformed
  moe::DispatchResult out;
  BatchData b = MakeBatch(shape, ExpertMap::Contiguous(16, 4).value(), Routing::kRandom, 4, 1, 0, 0);
  EXPECT_EQ(d->Dispatch(b.view(), ExpertMap::Contiguous(16, 4).value(), &out).code(), StatusCode::kInvalidArgument);
}

// A map that routes replicas by reached rank or node over other nodes than
// the group's would send tokens where relays do not expect them: refused
// before anything is sent, naming both node counts.
TEST(MoeHierarchical, ReachedChoiceOverOtherNodesIsRefused) {
  HierGroup g = MakeHierGroup(Shape(4), 2, Options("tcp"));
  ASSERT_EQ(g.ranks.size(), 4u);
  std::vector<std::vector<uint32_t>> on(16);
  for (uint32_t e = 0; e < 16; ++e) on[e] = {e / 4};
  on[0] = {0, 3};
  for (auto choice : {moe::ReplicaChoice::kReachedNode, moe::ReplicaChoice::kReachedRank}) {
    const auto map = ExpertMap::WithReplicas(on, 4, 4, {}, choice).value();
    BatchData b = MakeBatch(g.ranks[0]->config(), map, Routing::kRandom, 4, 1, 0, 0);
    moe::DispatchResult out;
    const Status s = g.ranks[0]->Dispatch(b.view(), map, &out);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    EXPECT_NE(s.message().find(std::string(moe::ReplicaChoiceName(choice)) + " over 4 nodes; this group has 2"),
              std::string::npos)
        << s.ToString();
  }
}

}  // namespace
}  // namespace te::testing
