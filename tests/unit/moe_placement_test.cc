#include <gtest/gtest.h>

#include <unistd.h>
#include <cstdio>
#include <numeric>
#include <set>

#include "moe/placement.h"
#include "moe/routing_trace.h"

namespace te::moe {
namespace {

RoutingTrace Trace(double affinity, double skew = 0.5, uint32_t experts = 64, uint32_t layers = 8,
                   uint64_t sample = 0) {
  TraceOptions o;
  o.sample_seed = sample;
  o.tokens = 4096;
  o.layers = layers;
  o.experts = experts;
  o.topk = 4;
  o.affinity = affinity;
  o.skew = skew;
  return GenerateTrace(o).value();
}

TEST(RoutingTrace, FileRoundTripAndCorruptionIsRejected) {
  auto t = Trace(0.5);
  const std::string path = "/tmp/te-moe-trace-" + std::to_string(::getpid());
  ASSERT_TRUE(WriteTrace(t, path).ok());
  auto back = ReadTrace(path);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->ids, t.ids);
  EXPECT_EQ(back->experts, 64u);
  std::remove(path.c_str());
  auto bytes = SerializeTrace(t);
  bytes[100] ^= 1;
  auto bad = ParseTrace(bytes);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("checksum"), std::string::npos);
  bytes.resize(50);
  EXPECT_NE(ParseTrace(bytes).status().message().find("needs"), std::string::npos);
  EXPECT_FALSE(ReadTrace("/nonexistent/trace").ok());
  RoutingTrace wrong = t;
  wrong.ids[3] = 64;
  auto v = wrong.Validate();
  ASSERT_FALSE(v.ok());
  EXPECT_NE(v.message().find("expert id 64"), std::string::npos);
}

TEST(RoutingTrace, TokensPickDistinctExperts) {
  auto t = Trace(0.9);
  for (uint32_t tok = 0; tok < t.tokens; ++tok)
    for (uint32_t l = 0; l < t.layers; ++l) {
      std::set<int> s;
      for (uint32_t k = 0; k < t.topk; ++k) s.insert(t.at(tok, l, k));
      ASSERT_EQ(s.size(), t.topk);
    }
}

TEST(Affinity, PlantedAffinityShowsInTheConditionalProbabilities) {
  // With affinity 0.9 every expert has one successor it is followed by in
  // most tokens; with 0 the next expert depends only on popularity.
  auto strong = ExpertAffinity::FromTrace(Trace(0.9, 0.0));
  auto none = ExpertAffinity::FromTrace(Trace(0.0, 0.0));
  auto best_successor = [](const ExpertAffinity& a) {
    double sum = 0;
    for (uint32_t i = 0; i < a.experts; ++i) {
      double best = 0;
      for (uint32_t j = 0; j < a.experts; ++j) best = std::max(best, a.Conditional(2, i, j));
      sum += best;
    }
    return sum / a.experts;
  };
  EXPECT_GT(best_successor(strong), 0.2);  // ~0.9 / topk of the pair mass
  EXPECT_LT(best_successor(none), 0.1);
  double row = 0;
  for (uint32_t j = 0; j < strong.experts; ++j) row += strong.Conditional(1, 5, j);
  EXPECT_NEAR(row, 1.0, 1e-9);
}

TEST(Placement, SolverKeepsEveryInvariant) {
  auto t = Trace(0.8, 1.0);
  auto a = ExpertAffinity::FromTrace(t);
  PlacementOptions o;
  o.nodes = 2;
  auto p = AffinityPlacement(a, 8, o);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  ASSERT_TRUE(p->Validate().ok());  // every expert placed, 8 per rank
  for (uint32_t l = 0; l < t.layers; ++l) {
    const uint64_t total = std::accumulate(a.load[l].begin(), a.load[l].end(), uint64_t(0));
    const uint64_t heaviest = *std::max_element(a.load[l].begin(), a.load[l].end());
    const double cap = std::max(1.25 * total / 8.0, double(heaviest));
    std::vector<uint64_t> per(8, 0);
    for (uint32_t e = 0; e < t.experts; ++e) per[p->rank_of[l][e]] += a.load[l][e];
    // The cap holds wherever the greedy fallback did not have to break it.
    EXPECT_LE(double(*std::max_element(per.begin(), per.end())), cap * 1.35) << "layer " << l;
  }
  EXPECT_FALSE(AffinityPlacement(a, 7, o).ok());  // 64 experts over 7 ranks
  o.nodes = 3;
  EXPECT_FALSE(AffinityPlacement(a, 8, o).ok());  // 8 ranks into 3 nodes
}

// Placements are fitted on one trace and judged on another drawn from the
// same model, so the solver is credited only for structure, not for noise.
TEST(Placement, AffinityBeatsRoundRobinOnHeldOutTracesWithPlantedAffinity) {
  auto fit = Trace(0.9, 0.5, 64, 8, /*sample=*/1);
  auto held_out = Trace(0.9, 0.5, 64, 8, /*sample=*/2);
  ASSERT_NE(fit.ids, held_out.ids);
  auto p = AffinityPlacement(ExpertAffinity::FromTrace(fit), 8, {}).value();
  const auto rr = Evaluate(held_out, RoundRobinPlacement(fit.layers, fit.experts, 8), 1);
  const auto rnd = Evaluate(held_out, RandomPlacement(fit.layers, fit.experts, 8, 3), 1);
  const auto aff = Evaluate(held_out, p, 1);
  EXPECT_LT(aff.cross_rank_hops_per_token, 0.5 * rr.cross_rank_hops_per_token)
      << "affinity " << aff.cross_rank_hops_per_token << " vs round-robin " << rr.cross_rank_hops_per_token;
  EXPECT_LT(aff.cross_rank_hops_per_token, 0.5 * rnd.cross_rank_hops_per_token);
}

TEST(Placement, NoStructureMeansNoGainOnHeldOutTraces) {
  // Uniform popularity and no affinity: any gain on the fitted trace is noise
  // and must not carry over.
  auto fit = Trace(0.0, 0.0, 64, 8, 1);
  auto held_out = Trace(0.0, 0.0, 64, 8, 2);
  auto p = AffinityPlacement(ExpertAffinity::FromTrace(fit), 8, {}).value();
  const auto rr = Evaluate(held_out, RoundRobinPlacement(fit.layers, fit.experts, 8), 1);
  const auto aff = Evaluate(held_out, p, 1);
  EXPECT_NEAR(aff.cross_rank_hops_per_token / rr.cross_rank_hops_per_token, 1.0, 0.05);
}

TEST(Placement, NodesCutCrossNodeHops) {
  auto t = Trace(0.7);
  auto a = ExpertAffinity::FromTrace(t);
  PlacementOptions o;
  o.nodes = 4;
  auto aff = Evaluate(t, AffinityPlacement(a, 16, o).value(), 4);
  auto rr = Evaluate(t, RoundRobinPlacement(t.layers, t.experts, 16), 4);
  EXPECT_LT(aff.cross_node_hops_per_token, rr.cross_node_hops_per_token);
  EXPECT_LE(aff.cross_node_hops_per_token, aff.cross_rank_hops_per_token);
}

TEST(Replication, HotExpertsGetReplicasAndImbalanceDrops) {
  std::vector<uint64_t> load(16, 10);
  load[3] = 400;  // one very hot expert
  std::vector<uint32_t> rr(16);
  for (uint32_t e = 0; e < 16; ++e) rr[e] = e % 4;
  const double before = LoadImbalance(load, rr, 4);
  auto rep = ReplicateHotExperts(load, 4, 5);  // 4 base + 1 extra slot per rank
  ASSERT_TRUE(rep.ok()) << rep.status().ToString();
  EXPECT_EQ(rep->replicas[3], 4u);  // the hot expert on every rank
  EXPECT_LT(rep->imbalance, before);
  uint32_t slots = 0;
  for (const auto& on : rep->experts_on_rank) {
    slots += on.size();
    EXPECT_EQ(std::set<uint32_t>(on.begin(), on.end()).size(), on.size());  // no duplicate on a rank
  }
  EXPECT_EQ(slots, 20u);
  EXPECT_FALSE(ReplicateHotExperts(load, 4, 3).ok());  // 12 slots for 16 experts
}

}  // namespace
}  // namespace te::moe
