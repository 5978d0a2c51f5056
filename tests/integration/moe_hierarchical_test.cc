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

// (source rank, source token) of every row relay `relay` receives: written
// from the header's definition (sources with the relay's index inside their
// node, in rank order, each token that has an expert on the relay's node).
std::vector<std::pair<uint32_t, uint32_t>> RelayRows(const EpConfig& c, const ExpertMap& map, uint32_t nodes,
                                                     const std::vector<BatchData>& batches, uint32_t relay) {
  const uint32_t L = c.ranks / nodes, node = relay / L;
  std::vector<std::pair<uint32_t, uint32_t>> rows;
  for (uint32_t s = relay % L; s < c.ranks; s += L)
    for (uint32_t t = 0; t < batches[s].tokens; ++t) {
      bool needs = false;
      for (uint32_t k = 0; k < c.topk; ++k) {
        const int32_t e = batches[s].idx[size_t(t) * c.topk + k];
        needs |= e >= 0 && map.RankFor(uint32_t(e), s) / L == node;
      }
      if (needs) rows.emplace_back(s, t);
    }
  return rows;
}

// One rank's part of `layers` layers against the reference. Returns "" or
// the first failure.
std::string RunHierRank(HierarchicalDispatcher& d, Routing routing, const std::vector<uint32_t>& tokens, uint64_t seed,
                        uint32_t layers, const TraceRun& run, const ExpertMap* fixed_map) {
  const EpConfig& c = d.config();
  const uint32_t nodes = d.nodes();
  moe::DispatchResult result;
  for (uint32_t l = 0; l < layers; ++l) {
    const ExpertMap& m = run.maps ? (*run.maps)[l] : *fixed_map;
    const std::string at = "layer " + std::to_string(l) + " ";
    ReferenceLayer ref = RunReference(c, m, routing, tokens, seed, l, run.trace);
    Status s = d.Dispatch(ref.batches[c.rank].view(), m, &result);
    if (!s.ok()) return at + "dispatch: " + s.ToString();
    // Name sources as the reference does, then order as the reference does.
    std::vector<std::vector<std::pair<uint32_t, uint32_t>>> relay_rows(c.ranks);
    moe::DispatchResult named;
    for (const moe::ExpertTokens& x : result.experts) {
      std::vector<std::tuple<uint32_t, uint32_t, uint32_t>> order;  // (source, token, position)
      for (uint32_t i = 0; i < x.count; ++i) {
        const uint32_t relay = x.src_rank[i];
        if (relay >= c.ranks) return at + "relay rank " + std::to_string(relay) + " out of range";
        if (relay_rows[relay].empty()) relay_rows[relay] = RelayRows(c, m, nodes, ref.batches, relay);
        if (x.src_token[i] >= relay_rows[relay].size()) return at + "relay row out of range";
        const auto [src, tok] = relay_rows[relay][x.src_token[i]];
        order.emplace_back(src, tok, i);
      }
      std::sort(order.begin(), order.end());
      moe::ExpertTokens y;
      y.expert = x.expert;
      y.count = x.count;
      const size_t tb = c.token_bytes(), sc = c.scale_count();
      for (const auto& [src, tok, i] : order) {
        y.src_rank.push_back(src);
        y.src_token.push_back(tok);
        y.weights.push_back(x.weights[i]);
        y.data.insert(y.data.end(), x.data.begin() + i * tb, x.data.begin() + (i + 1) * tb);
        if (sc) y.scales.insert(y.scales.end(), x.scales.begin() + i * sc, x.scales.begin() + (i + 1) * sc);
      }
      named.experts.push_back(std::move(y));
    }
    std::string diff = CompareDispatch(ref.dispatched[c.rank], named);
    if (!diff.empty()) return at + "dispatch: " + diff;
    if (run.records_sent)
      for (uint32_t r = 0; r < c.ranks; ++r) *run.records_sent += r == c.rank ? 0 : result.handle.sent_to[r];

    // Synthetic experts on the rows as they arrived; combine.
    std::vector<std::vector<uint16_t>> outs(result.experts.size());
    moe::ExpertOutputs views;
    for (size_t i = 0; i < outs.size(); ++i) {
      moe::SyntheticExpert(c, result.experts[i], &outs[i]);
      views.push_back(outs[i].data());
    }
    std::vector<uint16_t> combined(tokens[c.rank] * size_t(c.hidden), 0xffff);
    s = d.Combine(views, result, combined.data());
    if (!s.ok()) return at + "combine: " + s.ToString();
    std::vector<moe::TokenBatch> batch_views;
    for (auto& b : ref.batches) batch_views.push_back(b.view());
    std::vector<moe::ExpertOutputs> ref_outs(c.ranks);
    for (uint32_t r = 0; r < c.ranks; ++r)
      for (auto& o : ref.outputs[r]) ref_outs[r].push_back(o.data());
    auto want = moe::ReferenceHierarchicalCombine(c, m, nodes, batch_views, ref.dispatched, ref_outs);
    if (!want.ok()) return at + "reference: " + want.status().ToString();
    if (combined != want.value()[c.rank]) {
      size_t i = 0;
      while (combined[i] == want.value()[c.rank][i]) ++i;
      return at + "combine differs at token " + std::to_string(i / c.hidden) + " element " +
             std::to_string(i % c.hidden);
    }
  }
  return "";
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
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
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

}  // namespace
}  // namespace te::testing
