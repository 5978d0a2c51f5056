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

struct CoherentGroup {
  std::vector<std::unique_ptr<TransferEngine>> engines;
  std::vector<std::unique_ptr<CoherentDispatcher>> ranks;
};

CoherentGroup MakeCoherentGroup(EpConfig shape, const EngineOptions& options) {
  CoherentGroup g;
  std::vector<std::string> infos;
  for (uint32_t r = 0; r < shape.ranks; ++r) {
    auto e = TransferEngine::Create(options);
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    if (!e.ok()) return {};
    g.engines.push_back(std::move(e).value());
    shape.rank = r;
    auto d = CoherentDispatcher::Create(g.engines.back().get(), shape);
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

// The batch of the tokens `ids` (ascending) at `layer`: token id's bytes and
// routing are a function of (seed, layer, id) only (with kTrace: trace
// token id), wherever it lives.
BatchData TokensBatch(const EpConfig& c, const ExpertMap& map, Routing routing, const std::vector<uint32_t>& ids,
                      uint64_t seed, uint32_t layer, const moe::RoutingTrace* trace) {
  BatchData all;
  all.tokens = uint32_t(ids.size());
  for (uint32_t id : ids) {
    // MakeBatch's token 0 of "rank" id: trace token 0 * ranks + id = id.
    BatchData one = MakeBatch(c, map, routing, 1, seed, layer, id, trace);
    all.data.insert(all.data.end(), one.data.begin(), one.data.end());
    all.scales.insert(all.scales.end(), one.scales.begin(), one.scales.end());
    all.idx.insert(all.idx.end(), one.idx.begin(), one.idx.end());
    all.weights.insert(all.weights.end(), one.weights.begin(), one.weights.end());
  }
  return all;
}

struct CoherentRun {
  Routing routing = Routing::kRandom;
  std::vector<uint32_t> tokens;  // at layer 0, rank r holds ids r, r + R, ...
  uint64_t seed = 7;
  uint32_t layers = 3;
  const moe::RoutingTrace* trace = nullptr;
  const std::vector<ExpertMap>* maps = nullptr;  // [layer], else `map`
  const ExpertMap* map = nullptr;
};

// One rank's part of the run. Returns "" or the first failure; `moved`
// counts tokens that merged on a rank other than the one they came from.
std::string RunCoherentRank(CoherentDispatcher& d, const CoherentRun& run, uint64_t* moved) {
  const EpConfig& c = d.config();
  const uint32_t R = c.ranks, H = c.hidden;
  std::vector<std::vector<uint32_t>> living(R);
  for (uint32_t r = 0; r < R; ++r)
    for (uint32_t t = 0; t < run.tokens[r]; ++t) living[r].push_back(t * R + r);
  moe::DispatchResult result;
  moe::MergedTokens merged;
  for (uint32_t l = 0; l < run.layers; ++l) {
    const ExpertMap& m = run.maps ? (*run.maps)[l] : *run.map;
    const std::string at = "layer " + std::to_string(l) + " ";
    // The whole group, as the reference sees it.
    std::vector<BatchData> batches;
    std::vector<moe::TokenBatch> views;
    for (uint32_t r = 0; r < R; ++r)
      batches.push_back(TokensBatch(c, m, run.routing, living[r], run.seed, l, run.trace));
    for (auto& b : batches) views.push_back(b.view());
    auto ref = moe::ReferenceDispatch(c, m, views);
    if (!ref.ok()) return at + "reference: " + ref.status().ToString();
    std::vector<std::vector<std::vector<uint16_t>>> ref_out(R);
    std::vector<moe::ExpertOutputs> ref_views(R);
    for (uint32_t r = 0; r < R; ++r) {
      ref_out[r].resize(ref.value()[r].size());
      for (size_t i = 0; i < ref_out[r].size(); ++i) {
        moe::SyntheticExpert(c, ref.value()[r][i], &ref_out[r][i]);
        ref_views[r].push_back(ref_out[r][i].data());
      }
    }
    auto combined = moe::ReferenceCombine(c, m, views, ref.value(), ref_views);
    if (!combined.ok()) return at + "reference combine: " + combined.status().ToString();

    // Dispatch: the reference's rows, sources named by id.
    const std::vector<uint32_t>& mine = living[c.rank];
    Status s = d.Dispatch(batches[c.rank].view(), mine.data(), m, &result);
    if (!s.ok()) return at + "dispatch: " + s.ToString();
    std::vector<moe::ExpertTokens> want = ref.value()[c.rank];
    for (auto& x : want)
      for (uint32_t i = 0; i < x.count; ++i) x.src_token[i] = living[x.src_rank[i]][x.src_token[i]];
    if (std::string diff = CompareDispatch(want, result); !diff.empty()) return at + "dispatch: " + diff;

    std::vector<std::vector<uint16_t>> outs(result.experts.size());
    moe::ExpertOutputs out_views;
    for (size_t i = 0; i < outs.size(); ++i) {
      moe::SyntheticExpert(c, result.experts[i], &outs[i]);
      out_views.push_back(outs[i].data());
    }
    s = d.Combine(out_views, result, &merged);
    if (!s.ok()) return at + "combine: " + s.ToString();

    // Merged here: every token whose top-1 expert's rank is this one, in
    // (rank, id) order, with the reference's combined output. Then move.
    std::vector<std::vector<uint32_t>> next(R);
    size_t k = 0;
    for (uint32_t h = 0; h < R; ++h)
      for (uint32_t i = 0; i < living[h].size(); ++i) {
        const int32_t top = batches[h].idx[size_t(i) * c.topk];
        const uint32_t merge = top >= 0 ? m.RankFor(uint32_t(top), h) : h;
        next[merge].push_back(living[h][i]);
        if (merge != h && moved && merge == c.rank) ++*moved;
        if (merge != c.rank) continue;
        const std::string tok = "token " + std::to_string(living[h][i]) + " of rank " + std::to_string(h) + ": ";
        if (k >= merged.count) return at + tok + "missing (" + std::to_string(merged.count) + " merged)";
        if (merged.from_rank[k] != h || merged.ids[k] != living[h][i])
          return at + tok + "merged as token " + std::to_string(merged.ids[k]) + " of rank " +
                 std::to_string(merged.from_rank[k]);
        if (!std::equal(merged.data.begin() + k * H, merged.data.begin() + (k + 1) * H,
                        combined.value()[h].begin() + size_t(i) * H))
          return at + tok + "combined output differs";
        ++k;
      }
    if (k != merged.count) return at + std::to_string(merged.count) + " merged, " + std::to_string(k) + " expected";
    for (auto& ids : next) std::sort(ids.begin(), ids.end());
    living = std::move(next);
  }
  return "";
}

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
  CoherentGroup g = MakeCoherentGroup(Shape(4, 4 * 48), Options("tcp"));
  const ExpertMap map = ExpertMap::Contiguous(16, 4).value();
  uint64_t moved = 0;
  RunCoherentGroup(g, {Routing::kRandom, {48, 30, 48, 17}, 7, 4, nullptr, nullptr, &map}, &moved);
  EXPECT_GT(moved, 0u);  // tokens did change ranks
}

TEST(MoeCoherent, RandomRoutingFp8Shm2Ranks) {
  CoherentGroup g = MakeCoherentGroup(Shape(2, 2 * 48, moe::Payload::kFp8E4M3), Options("shm"));
  const ExpertMap map = ExpertMap::Contiguous(16, 2).value();
  RunCoherentGroup(g, {Routing::kRandom, {48, 40}, 5, 3, nullptr, nullptr, &map});
}

// Every token to expert 0: all merge on rank 0, which then dispatches them
// all; then no experts at all (tokens stay, zeros) and empty ranks.
TEST(MoeCoherent, SkewedNoExpertAndEmptyRanks) {
  EpConfig shape = Shape(4, 4 * 48);
  shape.private_tokens = 5;  // through overflow
  CoherentGroup g = MakeCoherentGroup(shape, Options("tcp"));
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
  CoherentGroup g = MakeCoherentGroup(shape, o);
  const ExpertMap map = ExpertMap::Contiguous(12, 3).value();
  RunCoherentGroup(g, {Routing::kRandom, {40, 1, 40}, 9, 3, nullptr, nullptr, &map});
}

// A co-activation trace under a fitted placement, with and without
// replicas: bit-exact every layer, and the records between ranks are
// exactly CountRecords' with kTop1 homes: `rank` dispatched, `merged` merged.
void ReplayTrace(const std::string& provider, uint32_t extra_slots) {
  const TraceCase tc = MakeTraceCase(moe::TraceModel::kCoactivationGroups, 40, extra_slots);
  EXPECT_EQ(tc.maps[0].replicated(), extra_slots > 0);
  CoherentGroup g = MakeCoherentGroup(Shape(4, 160), Options(provider));
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

TEST(MoeCoherent, RefusesBadCalls) {
  CoherentGroup g = MakeCoherentGroup(Shape(2, 16), Options("tcp"));
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
  EpConfig shape = Shape(3, 16);
  shape.experts = 12;
  shape.timeout = std::chrono::milliseconds(400);
  CoherentGroup g = MakeCoherentGroup(shape, Options("tcp"));
  ASSERT_EQ(g.ranks.size(), 3u);
  const ExpertMap map = ExpertMap::Contiguous(12, 3).value();
  std::vector<Status> results(2);
  std::vector<std::thread> threads;
  const auto start = std::chrono::steady_clock::now();
  for (uint32_t r = 0; r < 2; ++r)
    threads.emplace_back([&, r] {
      BatchData b = MakeBatch(g.ranks[r]->config(), map, Routing::kRandom, 16, 1, 0, r);
      moe::DispatchResult out;
      results[r] = g.ranks[r]->Dispatch(b.view(), nullptr, map, &out);
    });
  for (auto& t : threads) t.join();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  for (uint32_t r = 0; r < 2; ++r) EXPECT_EQ(results[r].code(), StatusCode::kTimeout) << results[r].ToString();
  BatchData b = MakeBatch(g.ranks[0]->config(), map, Routing::kRandom, 16, 1, 1, 0);
  moe::DispatchResult out;
  EXPECT_EQ(g.ranks[0]->Dispatch(b.view(), nullptr, map, &out).code(), StatusCode::kUnavailable);
}

}  // namespace
}  // namespace te::testing
