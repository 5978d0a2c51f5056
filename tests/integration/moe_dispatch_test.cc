// MoE dispatch/combine over the transfer engine: EP ranks as threads of one
// process, each with its own engine, checked bit for bit against the
// reference over several layers (so both buffer parities are reused).
#include <gtest/gtest.h>

#include <thread>

#include "integration/moe_group.h"
#include "integration/test_support.h"
#include "moe/dispatch_cost.h"
#include "moe/placement_solver.h"
#include "moe/trace_generator.h"

namespace te::testing {
namespace {

using moe::EpConfig;
using moe::EpDispatcher;
using moe::ExpertMap;

EpConfig Shape(uint32_t ranks, moe::Payload payload = moe::Payload::kBf16) { return TestShape(ranks, 48, payload); }

using Group = testing::Group<EpDispatcher>;
Group MakeGroup(const EpConfig& shape, const EngineOptions& options) {
  return testing::MakeGroup<EpDispatcher>(shape, options);
}

// Every rank runs `layers` layers on its own thread; all must match the reference.
void RunGroup(Group& g, const ExpertMap& map, Routing routing, const std::vector<uint32_t>& tokens, uint32_t layers,
              uint64_t seed = 7) {
  ASSERT_FALSE(g.ranks.empty());
  std::vector<std::string> errors(g.ranks.size());
  std::vector<std::thread> threads;
  for (size_t r = 0; r < g.ranks.size(); ++r)
    threads.emplace_back([&, r] { errors[r] = RunRank(*g.ranks[r], map, routing, tokens, seed, layers); });
  for (auto& t : threads) t.join();
  for (size_t r = 0; r < errors.size(); ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

// A trace replayed through the dispatcher under a fitted placement: every
// layer matches the reference bit for bit, and the records the ranks send
// to each other are exactly what CountRecords predicts for the trace.
void ReplayTrace(const std::string& provider, moe::TraceModel model, uint32_t extra_slots = 0, uint32_t experts = 16,
                 uint32_t group_size = 4) {
  const TraceCase tc = MakeTraceCase(model, 40, extra_slots, experts, group_size);
  ASSERT_NE(tc.placement.rank_of, moe::RoundRobinPlacement(3, experts, 4).rank_of);  // a placement of its own
  EXPECT_EQ(tc.maps[0].replicated(), extra_slots > 0);
  // With replicas the fitted placement shares some sources' tokens among
  // copies (token splits) on one layer and, on the others, sends tokens to
  // copies on nodes and ranks they reach anyway (reached-node and
  // reached-rank choice): the count below covers all three.
  EXPECT_EQ(HasTokenSplits(tc), extra_slots > 0);
  EXPECT_EQ(HasReachedChoices(tc), extra_slots > 0);
  const auto& trace = tc.trace;
  const auto& placement = tc.placement;
  const auto& maps = tc.maps;
  EpConfig shape = Shape(4);
  shape.experts = experts;
  Group g = MakeGroup(shape, Options(provider));
  ASSERT_EQ(g.ranks.size(), 4u);
  std::vector<uint64_t> sent(4, 0);
  std::vector<std::string> errors(4);
  std::vector<std::thread> threads;
  for (uint32_t r = 0; r < 4; ++r)
    threads.emplace_back([&, r] {
      TraceRun run{&trace, &maps, &sent[r]};
      errors[r] = RunRank(*g.ranks[r], maps[0], Routing::kTrace, {40, 40, 40, 40}, 11, 3, run);
    });
  for (auto& t : threads) t.join();
  for (uint32_t r = 0; r < 4; ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
  const auto predicted = moe::CountRecords(trace, placement, {2, moe::TokenHome::kSource, false}).value();
  EXPECT_EQ(sent[0] + sent[1] + sent[2] + sent[3], predicted.total().rank);
}

TEST(MoeDispatch, TraceReplayMovesExactlyThePredictedRecordsTcp) {
  ReplayTrace("tcp", moe::TraceModel::kCoactivationGroups);
}

TEST(MoeDispatch, TraceReplayMovesExactlyThePredictedRecordsShm) { ReplayTrace("shm", moe::TraceModel::kPopularity); }

TEST(MoeDispatch, TraceReplayWithReplicasTcp) { ReplayTrace("tcp", moe::TraceModel::kPopularity, /*extra_slots=*/1); }

TEST(MoeDispatch, TraceReplayWithReplicasShm) {
  ReplayTrace("shm", moe::TraceModel::kCoactivationGroups, /*extra_slots=*/2);
}

// 14 experts over 4 ranks: ranks hold 4 or fewer primaries (Placement,
// PrimarySlots), replicas and token splits on top, and the count stays exact.
TEST(MoeDispatch, TraceReplayOfExpertsThatDoNotDivideOverTheRanksTcp) {
  ReplayTrace("tcp", moe::TraceModel::kCoactivationGroups, /*extra_slots=*/1, /*experts=*/14, /*group_size=*/7);
}

TEST(MoeDispatch, RandomRoutingBf16Tcp4Ranks) {
  Group g = MakeGroup(Shape(4), Options("tcp"));
  RunGroup(g, ExpertMap::Contiguous(16, 4).value(), Routing::kRandom, {48, 48, 48, 48}, 5);
}

TEST(MoeDispatch, RandomRoutingFp8Tcp4Ranks) {
  Group g = MakeGroup(Shape(4, moe::Payload::kFp8E4M3), Options("tcp"));
  RunGroup(g, ExpertMap::Contiguous(16, 4).value(), Routing::kRandom, {40, 17, 48, 1}, 4);
}

TEST(MoeDispatch, ShmTwoDomainsThreeRanks) {
  EpConfig shape = Shape(3);
  shape.experts = 15;
  Group g = MakeGroup(shape, Options("shm", 2));
  RunGroup(g, ExpertMap::Contiguous(15, 3).value(), Routing::kRandom, {30, 48, 12}, 4);
}

TEST(MoeDispatch, ManualProgressTcp3Ranks) {
  EngineOptions o = Options("tcp");
  o.progress = ProgressMode::kManual;
  EpConfig shape = Shape(3);
  shape.experts = 12;
  Group g = MakeGroup(shape, o);
  RunGroup(g, ExpertMap::Contiguous(12, 3).value(), Routing::kRandom, {48, 48, 48}, 4);
}

// Every token to expert 0: rank 0 takes all of them, far beyond its private
// slots, through the shared overflow region.
TEST(MoeDispatch, SkewedRoutingGoesThroughOverflow) {
  EpConfig shape = Shape(4);
  shape.private_tokens = 5;
  Group g = MakeGroup(shape, Options("tcp"));
  RunGroup(g, ExpertMap::Contiguous(16, 4).value(), Routing::kSkewed, {48, 48, 48, 48}, 4);
  for (auto& d : g.ranks) EXPECT_EQ(d->overflow_records_sent(), 4u * (48 - 5)) << "rank " << d->config().rank;
}

TEST(MoeDispatch, RandomRoutingWithTinyPrivateSlots) {
  EpConfig shape = Shape(4);
  shape.private_tokens = 1;
  Group g = MakeGroup(shape, Options("tcp"));
  RunGroup(g, ExpertMap::Contiguous(16, 4).value(), Routing::kRandom, {48, 48, 48, 48}, 3);
  uint64_t overflow = 0;
  for (auto& d : g.ranks) overflow += d->overflow_records_sent();
  EXPECT_GT(overflow, 0u);
}

TEST(MoeDispatch, EmptyRanksAndZeroTokens) {
  Group g = MakeGroup(Shape(4), Options("tcp"));
  const ExpertMap map = ExpertMap::Contiguous(16, 4).value();
  RunGroup(g, map, Routing::kRandom, {0, 48, 0, 3}, 3, 11);
  RunGroup(g, map, Routing::kRandom, {0, 0, 0, 0}, 2, 12);
  RunGroup(g, map, Routing::kNone, {48, 48, 48, 48}, 2, 13);
}

TEST(MoeDispatch, AllExpertsLocal) {
  Group g = MakeGroup(Shape(4), Options("tcp"));
  RunGroup(g, ExpertMap::Contiguous(16, 4).value(), Routing::kLocal, {48, 20, 48, 7}, 3);
}

// A placement that leaves rank 2 without experts and gives rank 0 eight.
TEST(MoeDispatch, UnevenPlacementWithAnExpertlessRank) {
  std::vector<uint32_t> rank_of(16);
  for (uint32_t e = 0; e < 16; ++e) rank_of[e] = e < 8 ? 0 : (e % 2 ? 1 : 3);
  Group g = MakeGroup(Shape(4), Options("tcp"));
  RunGroup(g, ExpertMap::FromRanks(rank_of, 4).value(), Routing::kRandom, {48, 48, 48, 48}, 3);
}

// Too little overflow for a skewed layer: every rank fails alike with
// kUnavailable, nobody hangs, and later calls are refused.
TEST(MoeDispatch, OverflowTooSmallFailsOnEveryRank) {
  EpConfig shape = Shape(3);
  shape.experts = 12;
  shape.private_tokens = 4;
  shape.overflow_tokens = 10;
  Group g = MakeGroup(shape, Options("tcp"));
  const ExpertMap map = ExpertMap::Contiguous(12, 3).value();
  std::vector<Status> results(3);
  std::vector<std::thread> threads;
  for (uint32_t r = 0; r < 3; ++r)
    threads.emplace_back([&, r] {
      BatchData b = MakeBatch(g.ranks[r]->config(), map, Routing::kSkewed, 48, 1, 0, r);
      moe::DispatchResult out;
      results[r] = g.ranks[r]->Dispatch(b.view(), map, &out);
    });
  for (auto& t : threads) t.join();
  for (uint32_t r = 0; r < 3; ++r) {
    EXPECT_EQ(results[r].code(), StatusCode::kUnavailable) << results[r].ToString();
    EXPECT_NE(results[r].message().find("overflow region holds 10"), std::string::npos) << results[r].ToString();
  }
  BatchData b = MakeBatch(g.ranks[0]->config(), map, Routing::kRandom, 4, 1, 1, 0);
  moe::DispatchResult out;
  EXPECT_EQ(g.ranks[0]->Dispatch(b.view(), map, &out).code(), StatusCode::kUnavailable);
}

// A rank that never dispatches: the others fail with kTimeout naming the
// count rows they waited for, within the configured timeout.
TEST(MoeDispatch, SilentPeerTimesOut) { ExpectSilentPeerTimesOut<EpDispatcher>(Shape(3), "count rows"); }

// The packed entry points the CUDA path drives (PrepareDispatch,
// DispatchPacked, CombinePacked), with the kernels' copies done by memcpy
// here: the protocol side of the device path, checked on every run.
std::string RunPackedRank(EpDispatcher& d, const ExpertMap& map, const std::vector<uint32_t>& tokens, uint32_t layers) {
  const EpConfig& c = d.config();
  for (uint32_t l = 0; l < layers; ++l) {
    ReferenceLayer ref = RunReference(c, map, Routing::kRandom, tokens, 3, l);
    const BatchData& b = ref.batches[c.rank];
    if (Status s = d.PrepareDispatch(); !s.ok()) return s.ToString();
    moe::DispatchResult out;
    moe::SendPlan plan;
    std::vector<uint32_t> row_token;
    moe::ResetResult(c, map, &out);
    moe::PackRecords(c, map, b.view(), d.send_records(), &plan, &out.handle, /*copy_payload=*/false, &row_token);
    const size_t rec = moe::RecordBytes(c), off = moe::RecordPayloadOffset(c);
    for (size_t r = 0; r < row_token.size(); ++r)  // the gather kernel's work
      std::memcpy(d.send_records() + r * rec + off, b.data.data() + row_token[r] * c.token_bytes(), c.token_bytes());
    std::vector<const uint8_t*> rows;
    if (Status s = d.DispatchPacked(plan, map, b.tokens, &out, &rows); !s.ok()) return s.ToString();
    // The scatter kernel's work: payloads from the receive region.
    for (size_t q = 0; q < rows.size(); ++q)
      for (uint32_t i = out.handle.row_begin[q]; i < out.handle.row_begin[q + 1]; ++i) {
        auto& x = out.experts[out.handle.entries[i].local_expert];
        x.data.insert(x.data.end(), rows[q] + off, rows[q] + off + c.token_bytes());
      }
    std::string diff = CompareDispatch(ref.dispatched[c.rank], out);
    if (!diff.empty()) return "layer " + std::to_string(l) + " dispatch: " + diff;
    moe::ExpertOutputs outs;
    for (auto& o : ref.outputs[c.rank]) outs.push_back(o.data());
    uint32_t received = 0;
    for (uint32_t n : out.handle.recv_from) received += n;
    moe::ReduceRows(c, out.handle, outs, 0, received, d.send_partials());  // the reduce kernel's work
    auto back = d.CombinePacked(out);
    if (!back.ok()) return back.status().ToString();
    std::vector<uint16_t> combined(b.tokens * size_t(c.hidden));
    moe::SumPartials(c, out.handle, *back, combined.data());
    if (combined != ref.combined[c.rank]) return "layer " + std::to_string(l) + ": combined output differs";
  }
  return "";
}

TEST(MoeDispatch, PackedEntryPointsOfTheDevicePath) {
  EpConfig shape = Shape(3);
  shape.experts = 12;
  shape.private_tokens = 6;
  Group g = MakeGroup(shape, Options("tcp"));
  const ExpertMap map = ExpertMap::Contiguous(12, 3).value();
  std::vector<std::string> errors(3);
  std::vector<std::thread> threads;
  for (uint32_t r = 0; r < 3; ++r)
    threads.emplace_back([&, r] { errors[r] = RunPackedRank(*g.ranks[r], map, {48, 30, 0}, 4); });
  for (auto& t : threads) t.join();
  for (uint32_t r = 0; r < 3; ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

TEST(MoeDispatch, BadInputIsRefusedWithAClearError) {
  Group g = MakeGroup(Shape(2), Options("tcp"));
  EpDispatcher& d = *g.ranks[0];
  const ExpertMap map = ExpertMap::Contiguous(16, 2).value();
  BatchData b = MakeBatch(d.config(), map, Routing::kRandom, 4, 1, 0, 0);
  moe::DispatchResult out;

  b.idx[5] = 16;
  Status s = d.Dispatch(b.view(), map, &out);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("topk_idx[1][1] = 16, outside [-1, 16)"), std::string::npos) << s.ToString();

  b.idx[5] = b.idx[4] = 3;
  s = d.Dispatch(b.view(), map, &out);
  EXPECT_NE(s.message().find("names expert 3 twice"), std::string::npos) << s.ToString();

  BatchData big = MakeBatch(d.config(), map, Routing::kRandom, 49, 1, 0, 0);
  s = d.Dispatch(big.view(), map, &out);
  EXPECT_NE(s.message().find("tokens 49 exceeds max_tokens 48"), std::string::npos) << s.ToString();

  s = d.Dispatch(b.view(), ExpertMap::Contiguous(16, 4).value(), &out);
  EXPECT_NE(s.message().find("expert map has 16 experts on 4 ranks"), std::string::npos) << s.ToString();

  s = d.Combine({}, out, nullptr);
  EXPECT_NE(s.message().find("Combine without a pending Dispatch"), std::string::npos) << s.ToString();

  EpConfig bad = Shape(2, moe::Payload::kFp8E4M3);
  bad.hidden = 200;
  auto created = EpDispatcher::Create(g.engines[0].get(), bad);
  ASSERT_FALSE(created.ok());
  EXPECT_NE(created.status().message().find("multiple of 128"), std::string::npos);

  // A group whose ranks disagree on the shape does not connect.
  EpConfig other = Shape(2);
  other.rank = 1;
  other.hidden = 512;
  auto d1 = EpDispatcher::Create(g.engines[1].get(), other);
  ASSERT_TRUE(d1.ok());
  s = d.Connect({d.LocalInfo(), (*d1)->LocalInfo()});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("rank 1 has another shape: hidden 512 there"), std::string::npos) << s.ToString();
  s = d.Connect({(*d1)->LocalInfo(), d.LocalInfo()});
  EXPECT_NE(s.message().find("infos[0] comes from rank 1"), std::string::npos) << s.ToString();

  // The rank field must read exactly the rank: 2^32 would wrap to 0 as a
  // uint32, and "00" or "+0" are other spellings a peer has no reason for.
  auto connected = EpDispatcher::Create(g.engines[1].get(), Shape(2)).value();  // rank 0's shape
  const std::string info = connected->LocalInfo();
  const size_t from = info.find(' ', info.find(' ') + 1) + 1, to = info.find(' ', from);
  for (const std::string rank : {"4294967296", "00", "+0", "-0"}) {
    const std::string forged = info.substr(0, from) + rank + info.substr(to);
    s = d.Connect({forged, d.LocalInfo()});
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << rank;
    EXPECT_NE(s.message().find("infos[0] comes from rank " + rank), std::string::npos) << s.ToString();
  }
  // Truncated, padded and foreign infos are refused, naming the rank.
  for (const std::string& bad :
       {std::string(""), info.substr(0, info.rfind(' ')), info + " extra", "temoell1" + info.substr(info.find(' '))}) {
    s = d.Connect({bad, d.LocalInfo()});
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(s.message().find("rank 0"), std::string::npos) << s.ToString();
  }
}

}  // namespace
}  // namespace te::testing
