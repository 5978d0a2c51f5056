// Unit layer of MoE dispatch/combine: number formats, expert maps, the
// reference on a hand-worked case, and the record format with memcpy as the
// transport.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "moe/coherent_dispatcher.h"
#include "moe/dispatch_records.h"
#include "moe/dispatch_reference.h"
#include "moe/numeric_formats.h"

namespace te::moe {
namespace {

TEST(NumericFormats, Bf16RoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(Bf16ToFloat(0x3f80), 1.0f);
  // 1 + 2^-8 lies halfway between 1.0 and 1 + 2^-7: ties go to the even 1.0.
  EXPECT_EQ(FloatToBf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  // 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 (odd) and 1 + 2^-6: goes up.
  EXPECT_EQ(FloatToBf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(NAN))));
  EXPECT_EQ(FloatToBf16(-2.5f), 0xc020);
}

TEST(NumericFormats, Fp8E4M3EveryCodeRoundTrips) {
  for (int v = 0; v < 256; ++v) {
    if ((v & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(Fp8E4M3ToFloat(uint8_t(v))));
      continue;
    }
    EXPECT_EQ(FloatToFp8E4M3(Fp8E4M3ToFloat(uint8_t(v))), v) << "code " << v << " = " << Fp8E4M3ToFloat(uint8_t(v));
  }
  EXPECT_EQ(Fp8E4M3ToFloat(0x7e), 448.0f);
  EXPECT_EQ(FloatToFp8E4M3(1000.0f), 0x7e);  // saturates
  EXPECT_EQ(FloatToFp8E4M3(-1000.0f), 0xfe);
  EXPECT_EQ(FloatToFp8E4M3(NAN), 0x7f);
  EXPECT_EQ(Fp8E4M3ToFloat(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(FloatToFp8E4M3(1.0625f), 0x38);               // halfway 1.0 / 1.125: even (1.0)
  EXPECT_EQ(FloatToFp8E4M3(1.1f), 0x39);                  // nearest 1.125
}

TEST(ExpertMap, ContiguousAndFromRanks) {
  auto m = ExpertMap::Contiguous(16, 4);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->rank_of(5), 1u);
  EXPECT_EQ(m->local_index(5), 1u);
  EXPECT_EQ(m->local_experts(3), (std::vector<uint32_t>{12, 13, 14, 15}));
  EXPECT_FALSE(ExpertMap::Contiguous(10, 4).ok());
  auto bad = ExpertMap::FromRanks({0, 1, 4}, 4);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("expert 2 on rank 4, outside [0, 4)"), std::string::npos);
  auto other = ExpertMap::FromRanks({1, 0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 2, 2, 1, 0}, 4);
  ASSERT_TRUE(other.ok());
  EXPECT_NE(other->fingerprint(), m->fingerprint());
  EXPECT_EQ(other->local_experts(0), (std::vector<uint32_t>{1, 2, 3, 15}));
}

// Token splits share one source's tokens of a replicated expert among its
// copies by key ranges from 0, in the order given; other sources and keys
// past the ranges keep the rule's choice.
TEST(ExpertMap, TokenSplitsShareASourcesTokensByKey) {
  std::vector<std::vector<uint32_t>> on(8);
  on[0] = {1, 2, 5};
  for (uint32_t e = 1; e < 8; ++e) on[e] = {e};
  const auto plain = ExpertMap::WithReplicas(on, 8, 2).value();
  const uint32_t rule = plain.ChoiceFor(0, 0);
  auto m = ExpertMap::WithReplicas(on, 8, 2, {{0, 0, 5, 20000}, {0, 0, 2, 10000}});
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->RankFor(0, 0, 0), 5u);
  EXPECT_EQ(m->RankFor(0, 0, 19999), 5u);
  EXPECT_EQ(m->RankFor(0, 0, 20000), 2u);
  EXPECT_EQ(m->RankFor(0, 0, 29999), 2u);
  EXPECT_EQ(m->RankFor(0, 0, 30000), rule);
  EXPECT_EQ(m->RankFor(0, 0, ExpertMap::kKeySpace - 1), rule);
  for (uint32_t s = 1; s < 8; ++s)
    for (uint32_t key : {0u, 25000u, 65535u}) EXPECT_EQ(m->RankFor(0, s, key), plain.ChoiceFor(0, s));
  EXPECT_EQ(m->RankFor(3, 0, 0), 3u);
  EXPECT_EQ(m->splits().size(), 2u);
  EXPECT_NE(m->fingerprint(), plain.fingerprint());
  // Each refusal names the bad value.
  const std::vector<std::pair<TokenSplit, std::string>> bad = {{{8, 0, 1, 1}, "expert 8"},
                                                               {{0, 8, 1, 1}, "source 8"},
                                                               {{0, 0, 3, 1}, "rank 3"},
                                                               {{0, 0, 1, 0}, "share 0"},
                                                               {{0, 0, 1, 65537}, "share 65537"}};
  for (const auto& [split, names] : bad) {
    auto r = ExpertMap::WithReplicas(on, 8, 2, {split});
    ASSERT_FALSE(r.ok()) << names;
    EXPECT_NE(r.status().message().find(names), std::string::npos) << r.status().ToString();
  }
  auto past = ExpertMap::WithReplicas(on, 8, 2, {{0, 4, 1, 40000}, {0, 4, 2, 30000}});
  ASSERT_FALSE(past.ok());
  EXPECT_NE(past.status().message().find("sum past 65536"), std::string::npos) << past.status().ToString();
}

// A token's key is a function of its routing row only, and spreads rows
// evenly over the key space (so a share of keys is that share of tokens).
TEST(ExpertMap, TokenKeysAreFunctionsOfTheRowAndEven) {
  const int32_t a[4] = {3, 17, -1, 9}, b[4] = {3, 17, -1, 9}, c[4] = {17, 3, -1, 9};
  const int16_t a16[4] = {3, 17, -1, 9};
  EXPECT_EQ(ExpertMap::TokenKey(a, 4), ExpertMap::TokenKey(b, 4));
  EXPECT_EQ(ExpertMap::TokenKey(a, 4), ExpertMap::TokenKey(a16, 4));  // a trace's ids are 16-bit
  EXPECT_NE(ExpertMap::TokenKey(a, 4), ExpertMap::TokenKey(c, 4));
  std::mt19937 rng(5);
  std::vector<uint32_t> quarter(4, 0);
  constexpr int kRows = 40000;
  for (int i = 0; i < kRows; ++i) {
    int32_t row[8];
    for (int32_t& x : row) x = int32_t(rng() % 256);
    const uint32_t key = ExpertMap::TokenKey(row, 8);
    ASSERT_LT(key, ExpertMap::kKeySpace);
    quarter[key / (ExpertMap::kKeySpace / 4)]++;
  }
  for (uint32_t q : quarter) EXPECT_NEAR(double(q) / kRows, 0.25, 0.02);
}

TEST(ExpertMap, ReplicasAreChosenOwnRankThenOwnNodeThenEvenly) {
  // 8 ranks in 2 nodes (0-3, 4-7); expert 0 on ranks 1 and 2 (node 0) and 5
  // (node 1); the other experts once each.
  std::vector<std::vector<uint32_t>> on(8);
  on[0] = {1, 2, 5};
  for (uint32_t e = 1; e < 8; ++e) on[e] = {e};
  auto m = ExpertMap::WithReplicas(on, 8, 2);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_TRUE(m->replicated());
  EXPECT_EQ(m->ChoiceFor(0, 1), 1u);  // its own rank
  EXPECT_EQ(m->ChoiceFor(0, 2), 2u);
  EXPECT_EQ(m->ChoiceFor(0, 5), 5u);
  // Fair share: ceil(8 / 3) = 3 sources per replica. Node 0's sources 0 and
  // 3 go to the less used of 1 and 2; node 1's sources 4, 6, 7 to 5 until
  // it holds 3, then the least used anywhere.
  std::vector<uint32_t> per(8, 0);
  for (uint32_t s = 0; s < 8; ++s) {
    const uint32_t r = m->ChoiceFor(0, s);
    EXPECT_TRUE(r == 1 || r == 2 || r == 5) << "source " << s;
    per[r]++;
    if (s < 4) {
      EXPECT_LT(r, 4u) << "source " << s << " left its node";
    }
  }
  EXPECT_LE(per[1], 3u);
  EXPECT_LE(per[2], 3u);
  EXPECT_LE(per[5], 3u);
  EXPECT_EQ(m->ChoiceFor(3, 0), 3u);  // unreplicated: its only rank
  EXPECT_EQ(m->local_index(0, 5), 0u);
  EXPECT_EQ(m->local_experts(5), (std::vector<uint32_t>{0, 5}));
  EXPECT_EQ(m->local_index(5, 5), 1u);
  EXPECT_EQ(m->local_index(0, 3), UINT32_MAX);  // not held there
  // The same assignment is the same map; replicas change the fingerprint.
  EXPECT_EQ(ExpertMap::WithReplicas(on, 8, 2)->fingerprint(), m->fingerprint());
  on[0] = {1};
  EXPECT_NE(ExpertMap::WithReplicas(on, 8, 2)->fingerprint(), m->fingerprint());
  on[0] = {1, 1};
  EXPECT_FALSE(ExpertMap::WithReplicas(on, 8, 2).ok());  // twice on one rank
  on[0] = {};
  EXPECT_FALSE(ExpertMap::WithReplicas(on, 8, 2).ok());  // nowhere
  on[0] = {1};
  EXPECT_FALSE(ExpertMap::WithReplicas(on, 8, 3).ok());  // 8 ranks into 3 nodes
}

// Reached-node choice: 12 ranks in 3 nodes (0-3, 4-7, 8-11); expert 0 on
// ranks 1 (node 0) and 9 (node 2), expert e on rank e otherwise. By source,
// sources 4 and 6 send expert 0 to rank 1 and 5 and 7 to rank 9 (node 1 has
// no copy; the least used replica, ties to the lower rank).
TEST(ExpertMap, ReachedNodeChoiceSendsATokenToACopyOnANodeItReaches) {
  std::vector<std::vector<uint32_t>> on(12);
  on[0] = {1, 9};
  for (uint32_t e = 1; e < 12; ++e) on[e] = {e};
  const auto by_source = ExpertMap::WithReplicas(on, 12, 3).value();
  const auto reached = ExpertMap::WithReplicas(on, 12, 3, {}, ReplicaChoice::kReachedNode).value();
  ASSERT_EQ(by_source.ChoiceFor(0, 4), 1u);
  ASSERT_EQ(by_source.ChoiceFor(0, 5), 9u);
  EXPECT_NE(by_source.fingerprint(), reached.fingerprint());
  EXPECT_TRUE(reached.uses_key());
  EXPECT_FALSE(by_source.uses_key());
  auto route = [](const ExpertMap& m, std::vector<int32_t> row, uint32_t source) {
    std::vector<uint32_t> dest(row.size());
    m.Route(row.data(), uint32_t(row.size()), source, ExpertMap::TokenKey(row.data(), uint32_t(row.size())),
            dest.data());
    return dest;
  };
  const uint32_t none = ExpertMap::kNoRank;
  // Source 4 with expert 10 (node 2): the rule's rank 1 is on node 0, which
  // the token does not reach; node 2 holds a copy, so 9, and one crossing.
  EXPECT_EQ(route(by_source, {0, 10}, 4), (std::vector<uint32_t>{1, 10}));
  EXPECT_EQ(route(reached, {0, 10}, 4), (std::vector<uint32_t>{9, 10}));
  // With expert 2 (node 0) the rule's rank is reached already: unchanged.
  EXPECT_EQ(route(reached, {0, 2, -1}, 4), (std::vector<uint32_t>{1, 2, none}));
  // Source 5's rule picks 9; with expert 2 it goes to node 0, to the copy
  // node 0's rank 1 (same index as 5 in its node) would choose: 1.
  EXPECT_EQ(route(by_source, {2, 0}, 5), (std::vector<uint32_t>{2, 9}));
  EXPECT_EQ(route(reached, {2, 0}, 5), (std::vector<uint32_t>{2, 1}));
  EXPECT_EQ(reached.RankInNode(0, 5, 0, 0), 1u);
  EXPECT_EQ(reached.RankInNode(0, 5, 0, 1), none);  // node 1 holds no copy
  // Only single-copy experts count as reached: 0's route does not depend on
  // another replicated expert's.
  on[3] = {3, 10};
  const auto two = ExpertMap::WithReplicas(on, 12, 3, {}, ReplicaChoice::kReachedNode).value();
  EXPECT_EQ(route(two, {3, 0}, 4)[1], two.ChoiceFor(0, 4));
  // A token with no expert elsewhere (nothing reached but its own node, which
  // holds no copy) goes where the rule sends it.
  EXPECT_EQ(route(reached, {0, 4}, 4), (std::vector<uint32_t>{1, 4}));
  EXPECT_FALSE(ExpertMap::WithReplicas(on, 12, 3, {}, ReplicaChoice(7)).ok());
}

// Reached-rank choice: expert 0 on ranks 1 (node 0), 8 and 9 (node 2),
// expert e on rank e otherwise. A token that needs expert 9 reaches rank 9,
// so expert 0 goes there (no record of its own) from any source that does
// not hold a copy; reached-node choice only picks the node.
TEST(ExpertMap, ReachedRankChoiceSendsATokenToACopyOnARankItReaches) {
  std::vector<std::vector<uint32_t>> on(12);
  on[0] = {1, 8, 9};
  for (uint32_t e = 1; e < 12; ++e) on[e] = {e};
  const auto by_rank = ExpertMap::WithReplicas(on, 12, 3, {}, ReplicaChoice::kReachedRank).value();
  const auto by_node = ExpertMap::WithReplicas(on, 12, 3, {}, ReplicaChoice::kReachedNode).value();
  EXPECT_NE(by_rank.fingerprint(), by_node.fingerprint());
  EXPECT_TRUE(by_rank.uses_key());
  bool differ = false;
  for (uint32_t source = 0; source < 12; ++source) {
    std::vector<int32_t> row{0, 9};
    std::vector<uint32_t> rank(2), node(2);
    by_rank.Route(row.data(), 2, source, ExpertMap::TokenKey(row.data(), 2), rank.data());
    by_node.Route(row.data(), 2, source, ExpertMap::TokenKey(row.data(), 2), node.data());
    // A source holding a copy is reached itself and keeps it.
    const uint32_t want = source == 1 || source == 8 ? source : 9;
    EXPECT_EQ(rank, (std::vector<uint32_t>{want, 9})) << "source " << source;
    // By node: node 0's sources keep the copy on their own node, the others
    // go to node 2, which the token reaches.
    EXPECT_EQ(node[0] / 4, source < 4 ? 0u : 2u) << "source " << source;
    differ |= node[0] != rank[0];
  }
  EXPECT_TRUE(differ);  // node-level choice leaves some on rank 8
  EXPECT_STREQ(moe::ReplicaChoiceName(ReplicaChoice::kReachedRank), "reached_rank");
  for (auto c : {ReplicaChoice::kBySource, ReplicaChoice::kReachedNode, ReplicaChoice::kReachedRank})
    EXPECT_EQ(moe::ParseReplicaChoice(moe::ReplicaChoiceName(c)).value(), c);
  EXPECT_FALSE(moe::ParseReplicaChoice("nearest").ok());
  EXPECT_FALSE(ExpertMap::WithReplicas(on, 12, 3, {}, ReplicaChoice(3)).ok());
}

// What a relay of the hierarchical dispatcher computes from its node's part
// of a row (RankOnNode) is where Route sent every slot there, for random
// copies, splits, rows and sources.
TEST(ExpertMap, RankOnNodeAgreesWithRouteFromANodesPartOfTheRow) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 80; ++trial) {
    const uint32_t nodes = 1 + rng() % 4, per_node = 1 + rng() % 4, ranks = nodes * per_node, experts = 24,
                   topk = 1 + rng() % 6;
    std::vector<std::vector<uint32_t>> on(experts);
    for (auto& v : on) {
      const uint32_t copies = 1 + rng() % std::min(ranks, 3u);
      while (v.size() < copies)
        if (uint32_t r = rng() % ranks; std::find(v.begin(), v.end(), r) == v.end()) v.push_back(r);
    }
    std::vector<moe::TokenSplit> splits;
    for (uint32_t e = 0; e < experts; ++e)
      if (on[e].size() > 1 && rng() % 2) splits.push_back({e, uint32_t(rng() % ranks), on[e][1], 20000});
    const auto how = trial % 2 ? moe::ReplicaChoice::kReachedNode : moe::ReplicaChoice::kReachedRank;
    const auto map = ExpertMap::WithReplicas(on, ranks, nodes, splits, how);
    ASSERT_TRUE(map.ok()) << map.status().ToString();
    for (int t = 0; t < 200; ++t) {
      std::vector<int32_t> row(topk);
      for (auto& e : row) e = rng() % 8 == 0 ? -1 : int32_t(rng() % experts);
      const uint32_t source = rng() % ranks, key = ExpertMap::TokenKey(row.data(), topk);
      std::vector<uint32_t> dest(topk);
      map->Route(row.data(), topk, source, key, dest.data());
      for (uint32_t k = 0; k < topk; ++k) {
        if (row[k] < 0) {
          EXPECT_EQ(dest[k], ExpertMap::kNoRank);
          continue;
        }
        const auto& copies = map->ranks_of(uint32_t(row[k]));
        ASSERT_NE(std::find(copies.begin(), copies.end(), dest[k]), copies.end());
        const uint32_t node = dest[k] / per_node;
        // The relay sees the slots sent to its node: its single-copy
        // experts' ranks, and the source if it is there.
        std::vector<uint32_t> seen;
        if (source / per_node == node) seen.push_back(source);
        for (uint32_t j = 0; j < topk; ++j)
          if (row[j] >= 0 && dest[j] / per_node == node && map->ranks_of(uint32_t(row[j])).size() == 1)
            seen.push_back(dest[j]);
        if (copies.size() > 1) {
          EXPECT_EQ(map->RankOnNode(uint32_t(row[k]), source, key, node, seen.data(), uint32_t(seen.size())), dest[k])
              << "trial " << trial << " token " << t << " slot " << k;
        }
      }
    }
  }
}

TEST(EpConfig, ValidateNamesTheBadField) {
  EpConfig c;
  c.ranks = 4;
  c.rank = 4;
  c.experts = 16;
  c.topk = 4;
  c.hidden = 256;
  c.max_tokens = 8;
  EXPECT_NE(c.Validate().message().find("rank 4 outside [0, 4)"), std::string::npos);
  c.rank = 0;
  c.topk = 17;
  EXPECT_NE(c.Validate().message().find("topk 17"), std::string::npos);
  c.topk = 4;
  c.private_tokens = 9;
  EXPECT_NE(c.Validate().message().find("private_tokens 9 exceeds max_tokens 8"), std::string::npos);
  c.private_tokens = 0;
  EXPECT_TRUE(c.Validate().ok());
  EXPECT_EQ(c.private_slot_tokens(), 4u);
  EXPECT_EQ(c.overflow_slot_tokens(), 4u * (8 - 4));
}

// Two ranks, four experts (0, 1 on rank 0; 2, 3 on rank 1), top-2, hidden 2.
TEST(Reference, HandWorkedCase) {
  EpConfig c;
  c.ranks = 2;
  c.experts = 4;
  c.topk = 2;
  c.hidden = 2;
  c.max_tokens = 2;
  const ExpertMap map = ExpertMap::Contiguous(4, 2).value();
  auto bf = [](float a, float b) {
    std::vector<uint8_t> v(4);
    uint16_t x = FloatToBf16(a), y = FloatToBf16(b);
    std::memcpy(&v[0], &x, 2);
    std::memcpy(&v[2], &y, 2);
    return v;
  };
  // Rank 0: token 0 -> experts 1 (w .5) and 2 (w .25). Rank 1: token 0 -> 3 (w 1), token 1 -> none.
  std::vector<uint8_t> d0 = bf(1, 2), d1 = bf(3, 4);
  d1.insert(d1.end(), {0, 0, 0, 0});
  std::vector<int32_t> i0{1, 2}, i1{3, -1, -1, -1};
  std::vector<float> w0{0.5f, 0.25f}, w1{1, 0, 0, 0};
  std::vector<TokenBatch> batches{{1, d0.data(), nullptr, i0.data(), w0.data()},
                                  {2, d1.data(), nullptr, i1.data(), w1.data()}};
  auto d = ReferenceDispatch(c, map, batches);
  ASSERT_TRUE(d.ok());
  ASSERT_EQ((*d)[0].size(), 2u);
  EXPECT_EQ((*d)[0][0].count, 0u);  // expert 0
  EXPECT_EQ((*d)[0][1].count, 1u);  // expert 1: rank 0's token 0
  EXPECT_EQ((*d)[0][1].weights, std::vector<float>{0.5f});
  EXPECT_EQ((*d)[1][0].count, 1u);  // expert 2: rank 0's token 0
  EXPECT_EQ((*d)[1][1].count, 1u);  // expert 3: rank 1's token 0
  EXPECT_EQ((*d)[1][1].src_rank, std::vector<uint32_t>{1});
  EXPECT_EQ((*d)[1][1].data, bf(3, 4));
  // Expert outputs: expert 1 gives (10, 20), expert 2 (100, 200), expert 3 (7, 8).
  std::vector<uint16_t> o1{FloatToBf16(10), FloatToBf16(20)}, o2{FloatToBf16(100), FloatToBf16(200)},
      o3{FloatToBf16(7), FloatToBf16(8)};
  std::vector<ExpertOutputs> outs{{nullptr, o1.data()}, {o2.data(), o3.data()}};
  auto comb = ReferenceCombine(c, map, batches, *d, outs);
  ASSERT_TRUE(comb.ok());
  // Rank 0 token 0: 0.5 * (10, 20) + 0.25 * (100, 200) = (30, 60).
  EXPECT_EQ((*comb)[0], (std::vector<uint16_t>{FloatToBf16(30), FloatToBf16(60)}));
  // Rank 1: token 0 = (7, 8), token 1 (no expert) = zeros.
  EXPECT_EQ((*comb)[1], (std::vector<uint16_t>{FloatToBf16(7), FloatToBf16(8), 0, 0}));
}

// Pack every rank, move records with memcpy, unpack in source order: the
// same lists as the reference.
TEST(DispatchRecords, MemcpyTransportMatchesReference) {
  EpConfig c;
  c.ranks = 3;
  c.experts = 9;
  c.topk = 3;
  c.hidden = 128;
  c.max_tokens = 20;
  c.payload = Payload::kFp8E4M3;
  const ExpertMap map = ExpertMap::FromRanks({2, 0, 1, 1, 0, 2, 2, 0, 1}, 3).value();
  std::vector<std::vector<uint8_t>> data(3);
  std::vector<std::vector<float>> scales(3), weights(3);
  std::vector<std::vector<int32_t>> idx(3);
  std::vector<TokenBatch> batches;
  for (uint32_t r = 0; r < 3; ++r) {
    const uint32_t T = 20 - 7 * r;
    data[r].resize(T * 128);
    for (size_t i = 0; i < data[r].size(); ++i) data[r][i] = uint8_t(i * 7 + r);
    scales[r].assign(T, 0.5f + r);
    for (uint32_t t = 0; t < T; ++t)
      for (int32_t k = 0; k < 3; ++k) {
        idx[r].push_back(((t + r) % 4 == 0 && k == 2) ? -1 : int32_t((t * 2 + k * 3 + r) % 9));
        weights[r].push_back(0.1f * float(k + 1));
      }
    batches.push_back({T, data[r].data(), scales[r].data(), idx[r].data(), weights[r].data()});
    ASSERT_TRUE(ValidateBatch(c, map, batches.back()).ok());
  }
  auto ref = ReferenceDispatch(c, map, batches);
  ASSERT_TRUE(ref.ok());

  const size_t rec = RecordBytes(c);
  EXPECT_EQ(rec % 64, 0u);
  std::vector<std::vector<uint8_t>> staging(3, std::vector<uint8_t>(20 * 3 * rec));
  std::vector<SendPlan> plans(3);
  std::vector<DispatchHandle> send_handles(3);
  for (uint32_t r = 0; r < 3; ++r) PackRecords(c, map, batches[r], staging[r].data(), &plans[r], &send_handles[r]);
  for (uint32_t d = 0; d < 3; ++d) {
    EpConfig cd = c;
    cd.rank = d;
    DispatchResult out;
    ResetResult(cd, map, &out);
    for (uint32_t s = 0; s < 3; ++s)
      ASSERT_TRUE(
          UnpackRecords(cd, s, staging[s].data() + plans[s].rank_offset[d] * rec, plans[s].per_rank[d], &out).ok());
    ASSERT_EQ(out.experts.size(), (*ref)[d].size());
    for (size_t i = 0; i < out.experts.size(); ++i) {
      EXPECT_EQ(out.experts[i].src_token, (*ref)[d][i].src_token) << "rank " << d << " expert " << i;
      EXPECT_EQ(out.experts[i].data, (*ref)[d][i].data);
      EXPECT_EQ(out.experts[i].scales, (*ref)[d][i].scales);
      EXPECT_EQ(out.experts[i].weights, (*ref)[d][i].weights);
    }
  }
  // A record naming a local expert the receiver does not have is refused.
  EpConfig c0 = c;
  DispatchResult out;
  ResetResult(c0, ExpertMap::FromRanks({1, 1, 1, 1, 1, 1, 1, 1, 0}, 3).value(), &out);  // rank 0: one expert
  Status s = UnpackRecords(c0, 1, staging[1].data() + plans[1].rank_offset[0] * rec, plans[1].per_rank[0], &out);
  EXPECT_EQ(s.code(), StatusCode::kInternal);
  EXPECT_NE(s.message().find("disagree on the expert map"), std::string::npos) << s.ToString();
}

// The merge of context-coherent combine, worked by hand: rank 1 of 3
// receives partials for token 5 of rank 0 from ranks 0 and 2, and for token 9
// of rank 2 from itself; its own token 7 has no expert and stays.
std::vector<uint16_t> MergeRow(float value, uint32_t from, uint32_t id) {
  std::vector<uint16_t> row(2 + 4, FloatToBf16(value));
  std::memcpy(&row[2], &from, 4);
  std::memcpy(&row[4], &id, 4);
  return row;
}

TEST(MergePartials, SumsInRankOrderAndKeepsStayers) {
  const std::vector<std::vector<uint16_t>> rows = {MergeRow(1.5f, 0, 5), MergeRow(-4.0f, 2, 9), MergeRow(0.25f, 0, 5)};
  const std::vector<const uint16_t*> at = {rows[0].data(), rows[1].data(), rows[2].data()};
  MergedTokens m;
  ASSERT_TRUE(MergePartials(3, 1, 2, at, {0, 1, 2}, {7}, &m).ok());
  ASSERT_EQ(m.count, 3u);
  EXPECT_EQ(m.from_rank, (std::vector<uint32_t>{0, 1, 2}));
  EXPECT_EQ(m.ids, (std::vector<uint32_t>{5, 7, 9}));
  EXPECT_EQ(Bf16ToFloat(m.data[0]), 1.75f);  // ranks 0 and 2
  EXPECT_EQ(Bf16ToFloat(m.data[2]), 0.0f);   // stays, no expert
  EXPECT_EQ(Bf16ToFloat(m.data[4]), -4.0f);
  // A row naming rank 3 of 3, and two partials of one token from one rank.
  const auto bad = MergeRow(1, 3, 5);
  EXPECT_EQ(MergePartials(3, 1, 2, {bad.data()}, {0}, {}, &m).code(), StatusCode::kInternal);
  EXPECT_EQ(MergePartials(3, 1, 2, {at[0], at[2]}, {2, 2}, {}, &m).code(), StatusCode::kInternal);
  EXPECT_EQ(MergePartials(3, 1, 2, {at[0]}, {}, {}, &m).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace te::moe
