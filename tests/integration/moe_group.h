// Helpers for the MoE dispatch/combine tests: routing scenarios, batches
// generated from a seed (so every process can rebuild every rank's inputs),
// and one rank's check of a layer against the reference.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "integration/test_support.h"
#include "moe/coherent_dispatcher.h"
#include "moe/dispatch_reference.h"
#include "moe/ep_dispatcher.h"
#include "moe/hierarchical_dispatcher.h"
#include "moe/ll_dispatcher.h"
#include "moe/numeric_formats.h"
#include "moe/placement_solver.h"
#include "moe/routing_trace.h"
#include "moe/synthetic_expert.h"
#include "moe/trace_generator.h"
#include "transfer/transfer_engine.h"

namespace te::testing {

enum class Routing {
  kRandom,  // top-k distinct experts, uniform, some slots -1
  kSkewed,  // every token to expert 0 only
  kLocal,   // every token's experts on its own rank
  kNone,    // no token has an expert
  kTrace,   // token t of rank r routes as trace token t * ranks + r (a RoutingTrace)
};

struct BatchData {
  std::vector<uint8_t> data;
  std::vector<float> scales;
  std::vector<int32_t> idx;
  std::vector<float> weights;
  uint32_t tokens = 0;
  moe::TokenBatch view() const {
    return {tokens, data.data(), scales.empty() ? nullptr : scales.data(), idx.data(), weights.data()};
  }
};

// Rank `rank`'s batch of layer `layer`: a function of (seed, layer, rank) only.
inline BatchData MakeBatch(const moe::EpConfig& c, const moe::ExpertMap& map, Routing routing, uint32_t tokens,
                           uint64_t seed, uint32_t layer, uint32_t rank, const moe::RoutingTrace* trace = nullptr) {
  std::mt19937_64 rng(seed * 1000003 + layer * 1009 + rank);
  BatchData b;
  b.tokens = tokens;
  b.data.resize(size_t(tokens) * c.token_bytes());
  if (c.payload == moe::Payload::kBf16) {
    for (size_t i = 0; i < size_t(tokens) * c.hidden; ++i) {
      uint16_t v = moe::FloatToBf16(float(int(rng() % 2001) - 1000) / 256.0f);
      std::memcpy(&b.data[i * 2], &v, 2);
    }
  } else {
    for (auto& x : b.data) x = moe::FloatToFp8E4M3(float(int(rng() % 801) - 400) / 64.0f);
    b.scales.resize(size_t(tokens) * c.scale_count());
    for (auto& s : b.scales) s = float(1 + rng() % 16) / 8.0f;
  }
  b.idx.assign(size_t(tokens) * c.topk, -1);
  b.weights.assign(size_t(tokens) * c.topk, 0.0f);
  static const std::vector<uint32_t> kNoExperts;
  const auto& local = routing == Routing::kLocal ? map.local_experts(rank) : kNoExperts;
  for (uint32_t t = 0; t < tokens; ++t) {
    int32_t* idx = &b.idx[size_t(t) * c.topk];
    if (routing == Routing::kTrace) {
      for (uint32_t k = 0; k < c.topk; ++k) idx[k] = trace->at(t * c.ranks + rank, layer, k);
    } else if (routing == Routing::kSkewed) {
      idx[0] = 0;
    } else if (routing == Routing::kLocal) {
      for (uint32_t k = 0; k < c.topk && k < local.size(); ++k) idx[k] = int32_t(local[(t + k) % local.size()]);
    } else if (routing == Routing::kRandom) {
      for (uint32_t k = 0; k < c.topk; ++k) {
        if (rng() % 8 == 0) continue;  // some empty slots
        int32_t e;
        bool dup;
        do {
          e = int32_t(rng() % c.experts);
          dup = false;
          for (uint32_t j = 0; j < k; ++j) dup |= idx[j] == e;
        } while (dup);
        idx[k] = e;
      }
    }
    for (uint32_t k = 0; k < c.topk; ++k) b.weights[size_t(t) * c.topk + k] = float(1 + rng() % 64) / 64.0f;
  }
  return b;
}

// The reference's view of one layer: every rank's inputs, dispatch results,
// synthetic outputs and combined results.
struct ReferenceLayer {
  std::vector<BatchData> batches;
  std::vector<std::vector<moe::ExpertTokens>> dispatched;
  std::vector<std::vector<std::vector<uint16_t>>> outputs;
  std::vector<std::vector<uint16_t>> combined;
};

inline ReferenceLayer RunReference(const moe::EpConfig& c, const moe::ExpertMap& map, Routing routing,
                                   const std::vector<uint32_t>& tokens, uint64_t seed, uint32_t layer,
                                   const moe::RoutingTrace* trace = nullptr) {
  ReferenceLayer ref;
  std::vector<moe::TokenBatch> views;
  for (uint32_t r = 0; r < c.ranks; ++r)
    ref.batches.push_back(MakeBatch(c, map, routing, tokens[r], seed, layer, r, trace));
  for (auto& b : ref.batches) views.push_back(b.view());
  auto d = moe::ReferenceDispatch(c, map, views);
  EXPECT_TRUE(d.ok()) << d.status().ToString();
  ref.dispatched = std::move(d).value();
  std::vector<moe::ExpertOutputs> outs(c.ranks);
  ref.outputs.resize(c.ranks);
  for (uint32_t r = 0; r < c.ranks; ++r) {
    ref.outputs[r].resize(ref.dispatched[r].size());
    for (size_t i = 0; i < ref.dispatched[r].size(); ++i) {
      moe::SyntheticExpert(c, ref.dispatched[r][i], &ref.outputs[r][i]);
      outs[r].push_back(ref.outputs[r][i].data());
    }
  }
  auto comb = moe::ReferenceCombine(c, map, views, ref.dispatched, outs);
  EXPECT_TRUE(comb.ok()) << comb.status().ToString();
  ref.combined = std::move(comb).value();
  return ref;
}

// Bit-for-bit comparison of one rank's dispatch result with the reference;
// returns a description of the first difference, empty when equal.
inline std::string CompareDispatch(const std::vector<moe::ExpertTokens>& ref, const moe::DispatchResult& got) {
  if (ref.size() != got.experts.size())
    return "local experts: " + std::to_string(got.experts.size()) + " vs " + std::to_string(ref.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    const auto &a = ref[i], &b = got.experts[i];
    const std::string e = "expert " + std::to_string(a.expert) + ": ";
    if (a.expert != b.expert) return e + "id " + std::to_string(b.expert);
    if (a.count != b.count) return e + "count " + std::to_string(b.count) + " vs " + std::to_string(a.count);
    if (a.src_rank != b.src_rank || a.src_token != b.src_token) return e + "sources differ";
    if (a.data != b.data) return e + "token bytes differ";
    if (a.scales != b.scales) return e + "scales differ";
    if (a.weights != b.weights) return e + "weights differ";
  }
  return "";
}

// The group shape the integration tests use: 16 experts, top-4, hidden 256.
inline moe::EpConfig TestShape(uint32_t ranks, uint32_t max_tokens, moe::Payload payload) {
  moe::EpConfig c;
  c.ranks = ranks;
  c.experts = 16;
  c.topk = 4;
  c.hidden = 256;
  c.max_tokens = max_tokens;
  c.payload = payload;
  c.timeout = std::chrono::milliseconds(5000);
  return c;
}

// EP ranks as threads of one process, each with its own engine and a
// dispatcher D (EpDispatcher or LowLatencyDispatcher), connected.
template <typename D>
struct Group {
  std::vector<std::unique_ptr<TransferEngine>> engines;
  std::vector<std::unique_ptr<D>> ranks;
};

template <typename D>
Group<D> MakeGroup(moe::EpConfig shape, const EngineOptions& options) {
  Group<D> g;
  std::vector<std::string> infos;
  for (uint32_t r = 0; r < shape.ranks; ++r) {
    auto e = TransferEngine::Create(options);
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    if (!e.ok()) return {};
    g.engines.push_back(std::move(e).value());
    shape.rank = r;
    auto d = D::Create(g.engines.back().get(), shape);
    EXPECT_TRUE(d.ok()) << d.status().ToString();
    if (!d.ok()) return {};
    g.ranks.push_back(std::move(d).value());
    infos.push_back(g.ranks.back()->LocalInfo());
  }
  for (auto& d : g.ranks) EXPECT_TRUE(d->Connect(infos).ok());
  return g;
}

// Ranks 0 and 1 of a 3-rank group (12 experts, 400 ms timeout) dispatch
// while rank 2 stays silent: both fail with kTimeout within seconds, the
// message naming `phase`. Returns the group for further checks.
template <typename D>
Group<D> ExpectSilentPeerTimesOut(moe::EpConfig shape, const std::string& phase) {
  shape.experts = 12;
  shape.timeout = std::chrono::milliseconds(400);
  Group<D> g = MakeGroup<D>(shape, Options("tcp"));
  const moe::ExpertMap map = moe::ExpertMap::Contiguous(12, 3).value();
  std::vector<Status> results(2);
  std::vector<std::thread> threads;
  const auto start = std::chrono::steady_clock::now();
  for (uint32_t r = 0; r < 2; ++r)
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
  for (uint32_t r = 0; r < 2; ++r) {
    EXPECT_EQ(results[r].code(), StatusCode::kTimeout) << results[r].ToString();
    EXPECT_NE(results[r].message().find(phase), std::string::npos) << results[r].ToString();
  }
  return g;
}

// A small co-activation trace (4 ranks x tokens_per_rank tokens, 3 layers,
// 16 experts, top-4) and a placement fitted to it on 4 ranks in 2 nodes,
// with `extra_slots` replica slots: the inputs of the trace replay tests.
struct TraceCase {
  moe::RoutingTrace trace;
  moe::Placement placement;
  std::vector<moe::ExpertMap> maps;  // [layer]
};

// `experts` need not divide over the 4 ranks (group_size must divide it).
inline TraceCase MakeTraceCase(moe::TraceModel model, uint32_t tokens_per_rank, uint32_t extra_slots,
                               uint32_t experts = 16, uint32_t group_size = 4) {
  moe::TraceOptions to;
  to.model = model;
  to.tokens = 4 * tokens_per_rank;
  to.layers = 3;
  to.experts = experts;
  to.topk = 4;
  to.group_size = group_size;
  // Skewed enough that every layer's loads show it at this size: the solver
  // replicates only layers whose loads differ beyond sampling noise.
  to.skew = 0.8;
  TraceCase c;
  c.trace = moe::GenerateTrace(to).value();
  moe::PlacementOptions po;
  po.nodes = 2;
  po.extra_slots = extra_slots;
  c.placement = moe::PlaceExperts(c.trace, 4, po).value();
  if (extra_slots > 0) {
    // Every replica choice: one layer by source with token splits, the
    // other two as placed for reached-node and for reached-rank choice.
    po.replica_choice = moe::ReplicaChoice::kBySource;
    c.placement = moe::PlaceExperts(c.trace, 4, po).value();
    c.placement.choice.assign(3, moe::ReplicaChoice::kBySource);
    uint32_t split = 2;
    for (uint32_t l = 3; l-- > 0;)
      if (!c.placement.splits[l].empty()) split = l;
    std::vector<moe::ReplicaChoice> reached{moe::ReplicaChoice::kReachedNode, moe::ReplicaChoice::kReachedRank};
    for (uint32_t l = 0; l < 3; ++l) {
      if (l == split) continue;
      po.replica_choice = reached.back();
      reached.pop_back();
      const moe::Placement other = moe::PlaceExperts(c.trace, 4, po).value();
      c.placement.rank_of[l] = other.rank_of[l];
      c.placement.replicas[l] = other.replicas[l];
      c.placement.splits[l].clear();
      c.placement.choice[l] = *po.replica_choice;
    }
  }
  for (uint32_t l = 0; l < 3; ++l) c.maps.push_back(c.placement.Map(l, 2).value());
  return c;
}

inline bool HasTokenSplits(const TraceCase& c) {
  for (const auto& m : c.maps)
    if (!m.splits().empty()) return true;
  return false;
}

// Whether layers route replicas by reached node and by reached rank.
inline bool HasReachedChoices(const TraceCase& c) {
  bool node = false, rank = false;
  for (const auto& m : c.maps) {
    node |= m.replicated() && m.replica_choice() == moe::ReplicaChoice::kReachedNode;
    rank |= m.replicated() && m.replica_choice() == moe::ReplicaChoice::kReachedRank;
  }
  return node && rank;
}

// Optional parts of a rank's run: routing from a trace with one map per
// layer, and a count of the records this rank sent to other ranks.
struct TraceRun {
  const moe::RoutingTrace* trace = nullptr;
  const std::vector<moe::ExpertMap>* maps = nullptr;  // [layer]
  uint64_t* records_sent = nullptr;
};

// One rank's part of `layers` layers: dispatch, synthetic experts, combine,
// each compared with the reference. Returns "" or the first failure.
// D: EpDispatcher or LowLatencyDispatcher.
template <typename D>
std::string RunRank(D& d, const moe::ExpertMap& map, Routing routing, const std::vector<uint32_t>& tokens,
                    uint64_t seed, uint32_t layers, const TraceRun& run = {}) {
  const moe::EpConfig& c = d.config();
  moe::DispatchResult result;
  for (uint32_t l = 0; l < layers; ++l) {
    const moe::ExpertMap& m = run.maps ? (*run.maps)[l] : map;
    ReferenceLayer ref = RunReference(c, m, routing, tokens, seed, l, run.trace);
    Status s = d.Dispatch(ref.batches[c.rank].view(), m, &result);
    if (!s.ok()) return "layer " + std::to_string(l) + " dispatch: " + s.ToString();
    std::string diff = CompareDispatch(ref.dispatched[c.rank], result);
    if (!diff.empty()) return "layer " + std::to_string(l) + " dispatch: " + diff;
    if (run.records_sent)
      for (uint32_t r = 0; r < c.ranks; ++r) *run.records_sent += r == c.rank ? 0 : result.handle.sent_to[r];
    std::vector<std::vector<uint16_t>> outs(result.experts.size());
    moe::ExpertOutputs views;
    for (size_t i = 0; i < outs.size(); ++i) {
      moe::SyntheticExpert(c, result.experts[i], &outs[i]);
      views.push_back(outs[i].data());
    }
    std::vector<uint16_t> combined(tokens[c.rank] * size_t(c.hidden), 0xffff);
    s = d.Combine(views, result, combined.data());
    if (!s.ok()) return "layer " + std::to_string(l) + " combine: " + s.ToString();
    if (combined != ref.combined[c.rank]) {
      size_t i = 0;
      while (combined[i] == ref.combined[c.rank][i]) ++i;
      return "layer " + std::to_string(l) + " combine differs at token " + std::to_string(i / c.hidden) + " element " +
             std::to_string(i % c.hidden);
    }
  }
  return "";
}

// ---- HierarchicalDispatcher ----

// (source rank, source token) of every row relay `relay` receives: written
// from the header's definition (sources with the relay's index inside their
// node, in rank order, each token that has an expert on the relay's node).
inline std::vector<std::pair<uint32_t, uint32_t>> RelayRows(const moe::EpConfig& c, const moe::ExpertMap& map,
                                                            uint32_t nodes, const std::vector<BatchData>& batches,
                                                            uint32_t relay) {
  const uint32_t L = c.ranks / nodes, node = relay / L;
  std::vector<std::pair<uint32_t, uint32_t>> rows;
  for (uint32_t s = relay % L; s < c.ranks; s += L)
    for (uint32_t t = 0; t < batches[s].tokens; ++t) {
      bool needs = false;
      const int32_t* row = batches[s].idx.data() + size_t(t) * c.topk;
      std::vector<uint32_t> dest(c.topk);
      map.Route(row, c.topk, s, moe::ExpertMap::TokenKey(row, c.topk), dest.data());
      for (uint32_t k = 0; k < c.topk; ++k) needs |= row[k] >= 0 && dest[k] / L == node;
      if (needs) rows.emplace_back(s, t);
    }
  return rows;
}

// One rank's part of `layers` layers against the reference. Returns "" or
// the first failure.
inline std::string RunHierRank(moe::HierarchicalDispatcher& d, Routing routing, const std::vector<uint32_t>& tokens,
                               uint64_t seed, uint32_t layers, const TraceRun& run, const moe::ExpertMap* fixed_map) {
  const moe::EpConfig& c = d.config();
  const uint32_t nodes = d.nodes();
  moe::DispatchResult result;
  for (uint32_t l = 0; l < layers; ++l) {
    const moe::ExpertMap& m = run.maps ? (*run.maps)[l] : *fixed_map;
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

// ---- CoherentDispatcher ----

// The batch of the tokens `ids` (ascending) at `layer`: token id's bytes and
// routing are a function of (seed, layer, id) only (with kTrace: trace
// token id), wherever it lives.
inline BatchData TokensBatch(const moe::EpConfig& c, const moe::ExpertMap& map, Routing routing,
                             const std::vector<uint32_t>& ids, uint64_t seed, uint32_t layer,
                             const moe::RoutingTrace* trace) {
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
  const std::vector<moe::ExpertMap>* maps = nullptr;  // [layer], else `map`
  const moe::ExpertMap* map = nullptr;
};

// One rank's part of the run. Returns "" or the first failure; `moved`
// counts tokens that merged on a rank other than the one they came from.
inline std::string RunCoherentRank(moe::CoherentDispatcher& d, const CoherentRun& run, uint64_t* moved) {
  const moe::EpConfig& c = d.config();
  const uint32_t R = c.ranks, H = c.hidden;
  std::vector<std::vector<uint32_t>> living(R);
  for (uint32_t r = 0; r < R; ++r)
    for (uint32_t t = 0; t < run.tokens[r]; ++t) living[r].push_back(t * R + r);
  moe::DispatchResult result;
  moe::MergedTokens merged;
  for (uint32_t l = 0; l < run.layers; ++l) {
    const moe::ExpertMap& m = run.maps ? (*run.maps)[l] : *run.map;
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
        const int32_t* row = batches[h].idx.data() + size_t(i) * c.topk;
        std::vector<uint32_t> dest(c.topk);
        m.Route(row, c.topk, h, moe::ExpertMap::TokenKey(row, c.topk), dest.data());
        const uint32_t merge = row[0] >= 0 ? dest[0] : h;
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

}  // namespace te::testing
