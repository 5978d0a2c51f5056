#include "moe/placement_solver.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <iterator>
#include <numeric>
#include <string>

#include "moe/expert_partition.h"

namespace te::moe {
namespace {

// Tokens per expert the balancing of reached routes weighs copies on.
constexpr size_t kSharesSample = 8192;

constexpr double kSplitMaxAdded = 2.01;

// What the keep-the-better rule compares: records crossing ranks plus
// network crossings (node-level deduplication).
uint64_t Objective(const RecordCount& c) { return c.rank + c.node; }

double Cap(const std::vector<uint64_t>& load, uint32_t parts, double slack) {
  const uint64_t total = std::accumulate(load.begin(), load.end(), uint64_t(0));
  const uint64_t heaviest = load.empty() ? 0 : *std::max_element(load.begin(), load.end());
  return std::max((1.0 + slack) * double(total) / parts, double(heaviest));
}

// Records (rank + node crossings, node-level deduplication) that layer l's
// tokens send from their homes under `rank_of`.
uint64_t LayerRecords(const std::vector<std::vector<uint32_t>>& experts_of, const std::vector<int32_t>& home,
                      const std::vector<uint32_t>& rank_of, uint32_t ranks, uint32_t per_node) {
  std::vector<uint32_t> rank_seen(ranks, UINT32_MAX), node_seen(ranks / per_node, UINT32_MAX);
  uint64_t records = 0;
  for (uint32_t tok = 0; tok < experts_of.size(); ++tok) {
    const uint32_t h = uint32_t(home[tok]);
    rank_seen[h] = tok, node_seen[h / per_node] = tok;
    for (uint32_t e : experts_of[tok]) {
      const uint32_t r = rank_of[e];
      if (rank_seen[r] == tok) continue;
      rank_seen[r] = tok, ++records;
      if (node_seen[r / per_node] != tok) node_seen[r / per_node] = tok, ++records;
    }
  }
  return records;
}

// kTop1: the inter-layer structure is rank to rank (a token lives on the
// rank of its previous top-1 expert), which a partition into nodes first
// sees only blurred. So also try the direct assignment: each expert to the
// rank holding most of its tokens, greedily by that count, every rank taking
// experts / ranks of them under the rank load cap; keep it if this layer's
// tokens send fewer records from their homes.
void FollowHomes(const RoutingTrace& t, uint32_t l, const std::vector<uint64_t>& load, const std::vector<int32_t>& home,
                 const std::vector<std::vector<uint32_t>>& experts_of, const PlacementOptions& o, Placement* p) {
  const uint32_t E = t.experts, R = p->ranks, per_node = R / o.nodes, per_rank = E / R;
  std::vector<std::vector<std::pair<uint32_t, uint32_t>>> at(E);  // [expert] (rank, tokens)
  {
    std::vector<uint32_t> count(size_t(E) * R, 0);
    for (uint32_t tok = 0; tok < t.tokens; ++tok)
      for (uint32_t e : experts_of[tok]) count[size_t(e) * R + uint32_t(home[tok])]++;
    for (uint32_t e = 0; e < E; ++e)
      for (uint32_t r = 0; r < R; ++r)
        if (const uint32_t c = count[size_t(e) * R + r]) at[e].emplace_back(r, c);
  }
  struct Pick {
    uint32_t tokens, expert, rank;
  };
  std::vector<Pick> picks;
  for (uint32_t e = 0; e < E; ++e)
    for (auto [r, c] : at[e]) picks.push_back({c, e, r});
  std::stable_sort(picks.begin(), picks.end(), [](const Pick& a, const Pick& b) { return a.tokens > b.tokens; });
  const double cap = Cap(load, R, o.load_slack), node_cap = Cap(load, o.nodes, o.load_slack);
  std::vector<uint32_t> rank_of(E, UINT32_MAX), held(R, 0);
  std::vector<double> rank_load(R, 0.0), node_load(o.nodes, 0.0);
  auto put = [&](uint32_t e, uint32_t r) {
    rank_of[e] = r, held[r]++, rank_load[r] += double(load[e]), node_load[r / per_node] += double(load[e]);
  };
  for (const Pick& k : picks) {
    if (rank_of[k.expert] != UINT32_MAX || held[k.rank] == per_rank) continue;
    const double w = double(load[k.expert]);
    if (rank_load[k.rank] + w > cap || node_load[k.rank / per_node] + w > node_cap) continue;
    put(k.expert, k.rank);
  }
  // The rest, heaviest first: the rank with room in the lightest node, then
  // the lightest such rank.
  std::vector<uint32_t> rest;
  for (uint32_t e = 0; e < E; ++e)
    if (rank_of[e] == UINT32_MAX) rest.push_back(e);
  std::stable_sort(rest.begin(), rest.end(), [&](uint32_t a, uint32_t b) { return load[a] > load[b]; });
  for (uint32_t e : rest) {
    uint32_t best = R;
    for (uint32_t r = 0; r < R; ++r) {
      if (held[r] == per_rank) continue;
      const double nb = best == R ? 0 : node_load[best / per_node], nr = node_load[r / per_node];
      if (best == R || nr < nb || (nr == nb && rank_load[r] < rank_load[best])) best = r;
    }
    put(e, best);
  }
  if (LayerRecords(experts_of, home, rank_of, R, per_node) < LayerRecords(experts_of, home, p->rank_of[l], R, per_node))
    p->rank_of[l] = rank_of;
}

// Places layer l of `p` given the layers before it.
void PlaceLayer(const RoutingTrace& t, uint32_t l, const std::vector<uint64_t>& load, const PlacementOptions& o,
                bool replicated, Placement* p) {
  const uint32_t E = t.experts, R = p->ranks, N = o.nodes, per_node = R / N;
  // Each token's distinct experts at this layer, and its home rank (kTop1).
  std::vector<std::vector<uint32_t>> experts_of(t.tokens);
  for (uint32_t tok = 0; tok < t.tokens; ++tok)
    for (uint32_t k = 0; k < t.topk; ++k) {
      const int e = t.at(tok, l, k);
      auto& mine = experts_of[tok];
      // A trace may name an expert twice for a token; it costs one record.
      if (e >= 0 && std::find(mine.begin(), mine.end(), uint32_t(e)) == mine.end()) mine.push_back(uint32_t(e));
    }
  std::vector<int32_t> home(t.tokens, -1);
  if (o.home == TokenHome::kTop1 && l > 0) {
    const auto homes = TokenHomes(t, *p, o.home, l, o.nodes);
    for (uint32_t tok = 0; tok < t.tokens; ++tok) home[tok] = int32_t(homes[tok]);
  }

  // With replicas, nodes and ranks are held tighter: the balancing pass
  // later moves one copy at a time, and a rank or node the partition left
  // 25% over the mean stays above it.
  const double slack = replicated ? std::min(o.load_slack, 0.05) : o.load_slack;

  // Nodes first.
  std::vector<uint32_t> node_of(E, 0);
  PartitionProblem np;  // also the node level of the repair below
  if (N > 1) {
    np.items = E;
    np.parts = N;
    np.load = load;
    np.cap = Cap(load, N, slack);
    for (uint32_t tok = 0; tok < t.tokens; ++tok) {
      const int32_t h = home[tok] >= 0 ? int32_t(uint32_t(home[tok]) / per_node) : -1;
      if (experts_of[tok].size() + (h >= 0) >= 2)
        np.AddToken(experts_of[tok].data(), uint32_t(experts_of[tok].size()), h);
    }
    node_of = SolvePartition(np, o.max_sweeps);
    if (node_of.size() != E) return;  // not well formed (it is by construction): the layer stays as it was
  }
  std::vector<uint32_t> rank_of(E);
  // Then each node's ranks.
  const double rank_cap = Cap(load, R, slack);
  for (uint32_t n = 0; n < N; ++n) {
    std::vector<uint32_t> items, local(E, UINT32_MAX);
    for (uint32_t e = 0; e < E; ++e)
      if (node_of[e] == n) local[e] = uint32_t(items.size()), items.push_back(e);
    PartitionProblem rp;
    rp.items = uint32_t(items.size());
    rp.parts = per_node;
    rp.cap = rank_cap;
    for (uint32_t e : items) rp.load.push_back(load[e]);
    std::vector<uint32_t> mine;
    for (uint32_t tok = 0; tok < t.tokens; ++tok) {
      mine.clear();
      for (uint32_t e : experts_of[tok])
        if (local[e] != UINT32_MAX) mine.push_back(local[e]);
      const bool home_here = home[tok] >= 0 && uint32_t(home[tok]) / per_node == n;
      const int32_t h = home_here ? int32_t(uint32_t(home[tok]) % per_node) : -1;
      if (!mine.empty() && mine.size() + (h >= 0) >= 2) rp.AddToken(mine.data(), uint32_t(mine.size()), h);
    }
    const auto rank_in_node = SolvePartition(rp, o.max_sweeps);
    if (rank_in_node.size() != items.size()) return;
    for (uint32_t i = 0; i < items.size(); ++i) rank_of[items[i]] = n * per_node + rank_in_node[i];
  }
  // A node may hold more heavy experts than its ranks can spread under the
  // rank cap; swap across nodes where that keeps both nodes under theirs.
  if (N > 1) {
    PartitionProblem ranks;  // the same tokens as np, homes as ranks
    ranks.items = E;
    ranks.parts = R;
    ranks.load = load;
    ranks.cap = rank_cap;
    for (uint32_t tok = 0; tok < t.tokens; ++tok) {
      const uint32_t m = uint32_t(experts_of[tok].size());
      if (m + (home[tok] >= 0) >= 2) ranks.AddToken(experts_of[tok].data(), m, home[tok]);
    }
    auto repaired = RepairLoads(ranks, rank_of, &np);
    if (repaired.size() != E) return;
    rank_of = std::move(repaired);
  }
  p->rank_of[l] = std::move(rank_of);
  if (o.home == TokenHome::kTop1 && l > 0) FollowHomes(t, l, load, home, experts_of, o, p);
}

// Copies per expert: `extra` replicas one by one to the expert with the
// most load per copy (at most one copy per rank).
std::vector<uint32_t> Copies(const std::vector<uint64_t>& load, uint32_t ranks, uint64_t extra) {
  const uint32_t E = uint32_t(load.size());
  std::vector<uint32_t> copies(E, 1);
  for (; extra > 0; --extra) {
    uint32_t best = E;
    for (uint32_t e = 0; e < E; ++e)
      if (copies[e] < ranks && (best == E || double(load[e]) * copies[best] > double(load[best]) * copies[e])) best = e;
    if (best == E || load[best] == 0) break;
    copies[best]++;
  }
  return copies;
}

// Replicas for layer l on top of its primaries. Each replica goes, among
// ranks with a free slot whose load stays near the mean, to the one that
// makes dispatch of the fitted trace send the fewest records (rank + node,
// counted for the tokens of that expert under ExpertMap's replica choice,
// `choice`: with kReachedNode a token's other experts as the rule places
// them stand for its reached nodes); ties to the lighter rank.
void Replicate(const RoutingTrace& t, uint32_t l, const std::vector<uint64_t>& load,
               const std::vector<uint32_t>& copies, const PlacementOptions& o, const std::vector<uint32_t>& capacity,
               ReplicaChoice replica_choice, const std::vector<uint32_t>& homes, Placement* p) {
  const uint32_t E = t.experts, R = p->ranks, per_node = R / o.nodes;
  p->replicas[l].assign(E, {});
  std::vector<double> rank_load(R, 0.0);
  for (uint32_t e = 0; e < E; ++e) rank_load[p->rank_of[l][e]] += double(load[e]) / copies[e];
  const double mean = std::accumulate(rank_load.begin(), rank_load.end(), 0.0) / R;
  std::vector<uint32_t> order;
  for (uint32_t e = 0; e < E; ++e)
    if (copies[e] > 1) order.push_back(e);
  std::stable_sort(order.begin(), order.end(),
                   [&](uint32_t a, uint32_t b) { return double(load[a]) / copies[a] > double(load[b]) / copies[b]; });
  // Where each expert's tokens go now (updated as replicas are added).
  std::vector<std::vector<uint32_t>> choice(E);
  for (uint32_t e = 0; e < E; ++e) choice[e] = ExpertMap::ChooseReplicas(p->RanksOf(l, e), R, o.nodes);
  std::vector<uint32_t> free_slots = capacity;  // replicas each rank may still take
  struct Token {
    uint32_t home, key;
    std::vector<uint32_t> others;  // destination ranks of the token's other experts
  };
  for (uint32_t e : order) {
    std::vector<Token> mine;
    std::vector<uint64_t> shared(R, 0);
    for (uint32_t tok = 0; tok < t.tokens; ++tok) {
      bool has = false;
      for (uint32_t k = 0; k < t.topk; ++k) has |= t.at(tok, l, k) == int(e);
      if (!has) continue;
      Token x{homes[tok], ExpertMap::TokenKey(&t.ids[(size_t(tok) * t.layers + l) * t.topk], t.topk), {}};
      for (uint32_t k = 0; k < t.topk; ++k)
        if (const int y = t.at(tok, l, k); y >= 0 && y != int(e)) {
          x.others.push_back(choice[y][x.home]);
          shared[choice[y][x.home]]++;
        }
      mine.push_back(std::move(x));
    }
    // Records the tokens of e cost were its copies `on` (choices `dest`).
    const bool reached = replica_choice != ReplicaChoice::kBySource;
    std::vector<uint32_t> reached_ranks;
    auto cost = [&](const std::vector<uint32_t>& dest, const std::vector<uint32_t>& on) {
      int64_t c = 0;
      for (const Token& x : mine) {
        uint32_t d = dest[x.home];
        if (reached) {
          // ExpertMap::Route, with the token's other experts where they are
          // now (their copies may move later) standing for its reached ranks.
          reached_ranks.assign(1, x.home);
          reached_ranks.insert(reached_ranks.end(), x.others.begin(), x.others.end());
          d = ExpertMap::ReachedCopy(
              replica_choice, on, dest, d, x.home, x.key, per_node,
              ExpertMap::ReachedRanks{reached_ranks.data(), uint32_t(reached_ranks.size()), per_node});
        }
        if (d == x.home || std::find(x.others.begin(), x.others.end(), d) != x.others.end()) continue;
        ++c;  // a record to d
        const uint32_t node = d / per_node;
        bool crossed = node != x.home / per_node;
        for (uint32_t r : x.others) crossed &= r / per_node != node;
        c += crossed;  // and a network crossing to a node the token did not reach yet
      }
      return c;
    };
    const double share = double(load[e]) / copies[e];
    for (uint32_t c = 1; c < copies[e]; ++c) {
      auto on = p->RanksOf(l, e);
      // Candidates: the lightest free ranks and the ranks sharing the most
      // tokens, among those not holding e.
      std::vector<uint32_t> cand;
      for (uint32_t r = 0; r < R; ++r)
        if (free_slots[r] > 0 && std::find(on.begin(), on.end(), r) == on.end()) cand.push_back(r);
      if (cand.empty()) break;
      const double light = [&] {
        double m = rank_load[cand[0]];
        for (uint32_t r : cand) m = std::min(m, rank_load[r]);
        return m;
      }();
      // Under the mean (with the replica) where possible, else the lightest.
      const double limit = std::max(1.0 * mean, light + share);
      std::vector<uint32_t> ok;
      for (uint32_t r : cand)
        if (rank_load[r] + share <= limit) ok.push_back(r);
      std::stable_sort(ok.begin(), ok.end(), [&](uint32_t a, uint32_t b) { return shared[a] > shared[b]; });
      if (ok.size() > 16) ok.resize(16);
      uint32_t best = R;
      int64_t best_cost = 0;
      for (uint32_t r : ok) {
        on.push_back(r);
        const int64_t v = cost(ExpertMap::ChooseReplicas(on, R, o.nodes), on);
        on.pop_back();
        if (best == R || v < best_cost || (v == best_cost && rank_load[r] < rank_load[best])) best = r, best_cost = v;
      }
      p->replicas[l][e].push_back(best);
      free_slots[best]--;
      rank_load[best] += share;
      choice[e] = ExpertMap::ChooseReplicas(p->RanksOf(l, e), R, o.nodes);
    }
  }
  // A slot left free (every free rank already held the expert it was meant
  // for) goes to the expert with the most load per copy not on that rank.
  for (uint32_t r = 0; r < R; ++r)
    while (free_slots[r] > 0) {
      uint32_t best = E;
      double best_share = 0;
      for (uint32_t e = 0; e < E; ++e) {
        const auto on = p->RanksOf(l, e);
        const double s = double(load[e]) / double(on.size());
        if (std::find(on.begin(), on.end(), r) == on.end() && s > best_share) best = e, best_share = s;
      }
      if (best == E) break;
      p->replicas[l][best].push_back(r);
      free_slots[r]--;
    }
}

// A layer's variance of expert loads over their mean: about 1 for counts of
// equally popular experts (sampling noise alone), far above where the
// experts differ.
double Dispersion(const std::vector<uint64_t>& load) {
  const size_t E = load.size();
  if (E < 2) return 0;
  double mean = 0, var = 0;
  for (uint64_t x : load) mean += double(x);
  mean /= double(E);
  if (mean == 0) return 0;
  for (uint64_t x : load) var += (double(x) - mean) * (double(x) - mean);
  return var / double(E - 1) / mean;
}

// Loads as replication should see them: a fitted trace's count of an
// expert's tokens is its true load plus sampling noise (variance about the
// mean count), and balancing exactly on the counts packs experts that were
// light by chance together, which a held-out trace then finds heavy (on a
// trace of equal experts one replica slot made the held-out imbalance worse
// than none). So each layer's loads are shrunk towards their mean by the
// share of their spread that noise explains (James-Stein): a skewed layer
// keeps its loads, a layer of equal experts gets equal loads.
std::vector<uint64_t> ShrunkLoads(const std::vector<uint64_t>& load) {
  const size_t E = load.size();
  if (E < 2) return load;
  double mean = 0;
  for (uint64_t x : load) mean += double(x);
  mean /= double(E);
  const double d = Dispersion(load);
  const double keep = d > 1 ? 1.0 - 1.0 / d : 0.0;
  std::vector<uint64_t> out(E);
  for (size_t e = 0; e < E; ++e)
    out[e] = load[e] == 0 ? 0 : uint64_t(std::llround(std::max(1.0, mean + (double(load[e]) - mean) * keep)));
  return out;
}

// Tokens of each expert per layer, a token counted once however many of its
// slots name the expert: the counts whose noise LoadsAreSkewed knows (a
// trace that repeats ids would otherwise scale counts and their variance
// apart).
std::vector<std::vector<uint64_t>> TokensPerExpert(const RoutingTrace& t) {
  std::vector<std::vector<uint64_t>> n(t.layers, std::vector<uint64_t>(t.experts, 0));
  for (uint32_t tok = 0; tok < t.tokens; ++tok)
    for (uint32_t l = 0; l < t.layers; ++l)
      for (uint32_t k = 0; k < t.topk; ++k) {
        const int e = t.at(tok, l, k);
        bool repeat = false;
        for (uint32_t j = 0; j < k && !repeat; ++j) repeat = t.at(tok, l, j) == e;
        if (e >= 0 && !repeat) n[l][uint32_t(e)]++;
      }
  return n;
}

// Whether a layer's loads (tokens per expert) differ beyond the fitted
// trace's sampling noise, which replicas exist to even out. With equally popular experts the
// dispersion is 1 give or take sqrt(2 / (E - 1)) (0.09 at 256 experts);
// beyond two of those the loads have structure (the skewed layers of every
// model measured at 256 experts are at 29 and above, the unskewed at
// 0.75 .. 1.07; a flat layer passes for skewed about one time in 40).
// A flat layer gets no replicas: copies of experts hot only by chance in
// the fitted trace balance nothing on another trace, while the tighter cap
// and the balancing moves they bring cost records where experts are tied by
// co-activation (held out, 64 ranks in 8 nodes, one slot: nested groups
// 22.6% / 53.8% fewer records than round-robin across ranks / nodes without
// replicas, 13.5% / 44.5% with, imbalance 1.145 against 1.225; ring
// locality 38.3% against 31.5% across nodes). On a layer of independent
// experts a copy near its tokens saves a little (2.7% of the crossings on
// equal experts), which this gives up; judging both on the fitted trace
// instead picks the wrong one there, since the unreplicated partition fits
// that trace's noise.
bool LoadsAreSkewed(const std::vector<uint64_t>& load) {
  if (load.size() < 2) return false;
  return Dispersion(load) > 1.0 + 2.0 * std::sqrt(2.0 / double(load.size() - 1));
}

// Whether an estimated cost of `cost` records, counted on the fitted trace
// for moves of experts with `tokens` tokens, is within that trace's sampling
// noise: each estimate is a difference of counts over those tokens, whose
// standard deviation is below sqrt(tokens / 2) where no structure ties the
// experts to their place. So a move that "costs" up to 3 sqrt(tokens) (or 1%)
// costs nothing on a held-out trace, while a real tie (co-activated
// experts sharing a rank or node) costs tens of percent.
bool WithinNoise(int64_t cost, uint64_t tokens) {
  const double t = double(tokens);
  return double(cost) <= std::max(0.01 * t, 3.0 * std::sqrt(t));
}

// Sends rank loads towards the mean by exchanging unreplicated primaries
// between a heavier and a lighter rank (their loads move whole, so each
// exchange is exact), where the exchange costs about no records: at most 1%
// of the two experts' tokens newly leave their rank or node, estimated from
// where each token's home and other experts are. An exchange lowers the
// heavier rank of the pair and keeps the lighter one below where the heavier
// was, so the sum of squared loads falls with each and the sweeps end; across
// nodes it also keeps the pair's heavier node from growing. The peak-lowering
// moves after it then start from ranks near the mean.
void EqualizePrimaries(const RoutingTrace& t, uint32_t l, const std::vector<uint32_t>& homes,
                       const std::vector<uint64_t>& total, uint32_t nodes, Placement* p,
                       std::vector<std::vector<uint32_t>>* choice, std::vector<uint64_t>* load) {
  const uint32_t E = t.experts, R = p->ranks, per_node = R / nodes;
  std::vector<std::vector<uint32_t>> prim(R);  // unreplicated primaries per rank
  for (uint32_t e = 0; e < E; ++e)
    if (p->RanksOf(l, e).size() == 1 && total[e] > 0) prim[p->rank_of[l][e]].push_back(e);
  std::vector<uint64_t> node_load(nodes, 0);
  for (uint32_t r = 0; r < R; ++r) node_load[r / per_node] += (*load)[r];
  // reach[e][r]: tokens of e that reach rank r anyway (their home or another
  // of their experts is there); moving e from rank a to b adds about
  // reach[e][a] - reach[e][b] records. reach_node: the same per node.
  std::vector<int64_t> reach(size_t(E) * R), reach_node(size_t(E) * nodes);
  std::vector<uint32_t> at(R), at_node(nodes);
  auto where = [&](int e, uint32_t home) { return (*choice)[e][home]; };
  std::vector<uint32_t> ranks;
  auto measure = [&] {
    std::fill(reach.begin(), reach.end(), 0);
    std::fill(reach_node.begin(), reach_node.end(), 0);
    for (uint32_t tok = 0; tok < t.tokens; ++tok) {
      const uint32_t home = homes[tok];
      ranks.assign(1, home);
      for (uint32_t k = 0; k < t.topk; ++k)
        if (const int e = t.at(tok, l, k); e >= 0) ranks.push_back(where(e, home));
      for (uint32_t r : ranks) at[r]++, at_node[r / per_node]++;
      for (uint32_t k = 0; k < t.topk; ++k) {
        const int e = t.at(tok, l, k);
        if (e < 0) continue;
        const uint32_t own = where(e, home);
        for (uint32_t r : ranks)
          if (at[r] > (r == own ? 1u : 0u)) reach[size_t(e) * R + r]++;
        for (uint32_t n = 0; n < nodes; ++n)
          if (at_node[n] > (n == own / per_node ? 1u : 0u)) reach_node[size_t(e) * nodes + n]++;
      }
      for (uint32_t r : ranks) at[r] = 0, at_node[r / per_node] = 0;
    }
    // A rank reached more than once counted its experts once per visit:
    // harmless, the estimate only needs to be near.
  };
  auto cost = [&](uint32_t e, uint32_t a, uint32_t b) {  // e moves from rank a to rank b
    int64_t c = reach[size_t(e) * R + a] - reach[size_t(e) * R + b];
    if (a / per_node != b / per_node)
      c += reach_node[size_t(e) * nodes + a / per_node] - reach_node[size_t(e) * nodes + b / per_node];
    return c;
  };
  std::vector<uint32_t> order(R);
  for (int sweep = 0; sweep < 8; ++sweep) {
    measure();
    bool moved = false;
    std::iota(order.begin(), order.end(), 0u);
    std::stable_sort(order.begin(), order.end(), [&](uint32_t x, uint32_t y) { return (*load)[x] > (*load)[y]; });
    for (size_t i = 0; i < order.size(); ++i) {
      const uint32_t a = order[i];
      for (size_t j = order.size(); j-- > i + 1;) {
        const uint32_t b = order[j];
        const uint64_t la = (*load)[a], lb = (*load)[b];
        if (lb + 1 >= la) break;  // the rest are no lighter
        const uint32_t na = a / per_node, nb = b / per_node;
        uint64_t best_max = la;
        size_t be = 0, bf = 0;
        bool found = false;
        for (size_t x = 0; x < prim[a].size(); ++x)
          for (size_t y = 0; y < prim[b].size(); ++y) {
            const uint32_t e = prim[a][x], f = prim[b][y];
            if (total[e] <= total[f]) continue;
            const uint64_t d = total[e] - total[f];
            const uint64_t pair_max = std::max(la - d, lb + d);
            if (pair_max >= best_max) continue;
            if (na != nb && node_load[nb] + d > std::max(node_load[na], node_load[nb])) continue;
            if (!WithinNoise(cost(e, a, b) + cost(f, b, a), total[e] + total[f])) continue;
            best_max = pair_max, be = x, bf = y, found = true;
          }
        if (!found) continue;
        const uint32_t e = prim[a][be], f = prim[b][bf];
        const uint64_t d = total[e] - total[f];
        p->rank_of[l][e] = b, p->rank_of[l][f] = a;
        std::fill((*choice)[e].begin(), (*choice)[e].end(), b);
        std::fill((*choice)[f].begin(), (*choice)[f].end(), a);
        std::swap(prim[a][be], prim[b][bf]);
        (*load)[a] -= d, (*load)[b] += d;
        node_load[na] -= d, node_load[nb] += d;
        moved = true;
      }
    }
    if (!moved) break;
  }
}

// Exact loads of layer l (tokens of each expert by home rank, routed by the
// replica rule; each expert's total as ShrunkLoads estimates it),
// EqualizePrimaries, then moves that lower the heaviest rank while one
// exists: one of its replicas to another rank with a free slot, or one of
// its copies swapped with one of the same kind on another rank (same node
// first, which keeps node-level records; unreplicated primaries cross nodes
// only where the crossings that adds are within the fitted trace's noise),
// or else a replica of one of its experts traded with a replica elsewhere.
// Bytes were fitted first; this trades them for balance only where the
// trace shows no cost.
void BalanceLoads(const RoutingTrace& t, uint32_t l, const std::vector<uint64_t>& shrunk, const PlacementOptions& o,
                  const std::vector<uint32_t>& capacity, ReplicaChoice replica_choice,
                  const std::vector<uint32_t>& homes, Placement* p) {
  const uint32_t E = t.experts, R = p->ranks, per_node = R / o.nodes;
  std::vector<std::vector<uint64_t>> from(E, std::vector<uint64_t>(R, 0));  // [expert][home]
  for (uint32_t tok = 0; tok < t.tokens; ++tok)
    for (uint32_t k = 0; k < t.topk; ++k)
      if (const int e = t.at(tok, l, k); e >= 0) from[e][homes[tok]]++;
  // Each expert's load as ShrunkLoads estimates it, spread over the homes
  // its tokens came from.
  for (uint32_t e = 0; e < E; ++e) {
    const uint64_t counted = std::accumulate(from[e].begin(), from[e].end(), uint64_t(0));
    if (counted == 0 || counted == shrunk[e]) continue;
    const double scale = double(shrunk[e]) / double(counted);
    for (uint64_t& x : from[e]) x = uint64_t(std::llround(double(x) * scale));
  }
  std::vector<std::vector<uint32_t>> choice(E);
  std::vector<uint64_t> load(R, 0);
  // With a reached choice a replicated expert's tokens follow each token's
  // reached ranks (its home and its single-copy experts' ranks; ExpertMap's
  // Route), which only moves of single-copy experts change: the bits of
  // their tokens are recomputed after those (`rebits`).
  const bool steer = replica_choice != ReplicaChoice::kBySource;
  const uint32_t N = o.nodes, RW = (R + 63) / 64, NW = (N + 63) / 64;
  // Per token, in one block for the scans below: its key, then the bits of
  // the ranks (RW words) and of the nodes (NW words) it reaches.
  const size_t stride = 1 + RW + NW;
  std::vector<uint64_t> reached;
  std::vector<uint32_t> node_of_rank(R);  // r / per_node, without a division per token
  for (uint32_t r = 0; r < R; ++r) node_of_rank[r] = r / per_node;
  std::vector<std::vector<uint32_t>> tokens_of(E);  // [expert] tokens, once per slot naming it
  // [expert] the tokens a copy set's shares are counted on (scale_of scales
  // them up): with kReachedRank every step-th, at most kSharesSample, since
  // a pass weighs thousands of copy sets, a popular expert's tokens may be
  // half the trace, and every move of a single-copy expert changes reached
  // ranks (reached nodes change far less often, so kReachedNode counts all).
  std::vector<std::vector<uint32_t>> sample_of(E);
  std::vector<double> scale_of(E, 1.0);                       // ShrunkLoads' estimate per counted token
  using Shares = std::vector<std::pair<uint32_t, uint64_t>>;  // (rank, load)
  struct Bits {                                               // ExpertMap::ReachedRanks, as bits
    const uint64_t *ranks, *nodes;
    const uint32_t* node_of_rank;
    uint32_t node_of(uint32_t r) const { return node_of_rank[r]; }
    bool rank(uint32_t r) const { return (ranks[r >> 6] >> (r & 63)) & 1; }
    bool node(uint32_t n) const { return (nodes[n >> 6] >> (n & 63)) & 1; }
  };
  // A balancing pass weighs the same copy sets again and again: the last
  // kKnownSets of each expert keep their shares until its tokens' bits
  // change (the rule's choices by hash: they are ranks-long).
  struct Known {
    std::vector<uint32_t> on;
    uint64_t ch_hash;
    Shares shares;
  };
  constexpr size_t kKnownSets = 64;
  std::vector<std::vector<Known>> known(E);
  std::vector<size_t> known_next(E, 0);  // the entry a full list replaces next
  auto reached_shares = [&](uint32_t x, const std::vector<uint32_t>& on, const std::vector<uint32_t>& ch) {
    uint64_t ch_hash = 0xcbf29ce484222325ull;
    for (uint32_t r : ch) ch_hash = (ch_hash ^ r) * 0x100000001b3ull;
    for (const Known& k : known[x])
      if (k.ch_hash == ch_hash && k.on == on) return k.shares;
    std::vector<uint64_t> count(on.size(), 0);
    for (uint32_t tok : sample_of[x]) {
      const uint32_t h = homes[tok];
      const uint64_t* at = &reached[tok * stride];
      const Bits bits{at + 1, at + 1 + RW, node_of_rank.data()};
      const uint32_t d = ExpertMap::ReachedCopy(replica_choice, on, ch, ch[h], h, uint32_t(at[0]), per_node, bits);
      for (size_t j = 0; j < on.size(); ++j)
        if (on[j] == d) count[j]++;
    }
    Shares out;
    for (size_t j = 0; j < on.size(); ++j)
      out.emplace_back(on[j], uint64_t(std::llround(double(count[j]) * scale_of[x])));
    if (known[x].size() < kKnownSets)
      known[x].push_back({on, ch_hash, out});
    else
      known[x][known_next[x]++ % kKnownSets] = {on, ch_hash, out};
    return out;
  };
  auto set_bits = [&](uint32_t tok) {
    uint64_t* rb = &reached[tok * stride + 1];
    uint64_t* nb = rb + RW;
    std::fill(rb, rb + RW, 0), std::fill(nb, nb + NW, 0);
    auto mark = [&](uint32_t r) {
      rb[r >> 6] |= uint64_t(1) << (r & 63), nb[r / per_node >> 6] |= uint64_t(1) << (r / per_node & 63);
    };
    mark(homes[tok]);
    for (uint32_t k = 0; k < t.topk; ++k)
      if (const int e = t.at(tok, l, k); e >= 0 && p->replicas[l][e].empty()) mark(p->rank_of[l][e]);
  };
  if (steer) {
    reached.assign(t.tokens * stride, 0);
    for (uint32_t tok = 0; tok < t.tokens; ++tok) {
      reached[tok * stride] = ExpertMap::TokenKey(&t.ids[(size_t(tok) * t.layers + l) * t.topk], t.topk);
      for (uint32_t k = 0; k < t.topk; ++k)
        if (const int e = t.at(tok, l, k); e >= 0) tokens_of[e].push_back(tok);
      set_bits(tok);
    }
    for (uint32_t e = 0; e < E; ++e) {
      const auto& all = tokens_of[e];
      const size_t step = replica_choice == ReplicaChoice::kReachedRank
                              ? std::max<size_t>((all.size() + kSharesSample - 1) / kSharesSample, 1)
                              : 1;
      for (size_t i = 0; i < all.size(); i += step) sample_of[e].push_back(all[i]);
      const uint64_t counted = sample_of[e].size();
      scale_of[e] = counted ? double(shrunk[e]) / double(counted) : 1.0;
    }
  }
  std::vector<Shares> added(E);  // with a reached choice: what add(e, +1) added, for add(e, -1)
  auto add = [&](uint32_t e, int sign) {
    if (steer && !p->replicas[l][e].empty()) {
      if (sign > 0) added[e] = reached_shares(e, p->RanksOf(l, e), choice[e]);
      for (auto [r, w] : added[e]) load[r] += sign * int64_t(w);
      return;
    }
    for (uint32_t s = 0; s < R; ++s) load[choice[e][s]] += sign * int64_t(from[e][s]);
  };
  for (uint32_t e = 0; e < E; ++e) choice[e] = ExpertMap::ChooseReplicas(p->RanksOf(l, e), R, o.nodes);
  for (uint32_t e = 0; e < E; ++e) add(e, +1);
  std::vector<uint32_t> used(R, 0);
  for (const auto& reps : p->replicas[l])
    for (uint32_t r : reps) used[r]++;
  std::vector<uint64_t> total(E, 0);
  for (uint32_t e = 0; e < E; ++e) total[e] = std::accumulate(from[e].begin(), from[e].end(), uint64_t(0));
  // Reached ranks are those of single-copy experts: after some of those
  // moved, the tokens naming them get new bits, and the replicated experts
  // of those tokens new loads.
  std::vector<char> marked(E, 0);
  auto rebits = [&](const std::vector<uint32_t>& moved) {
    if (!steer) return;
    std::vector<uint32_t> affected;
    for (uint32_t x : moved)
      if (p->replicas[l][x].empty())
        for (uint32_t tok : tokens_of[x])
          for (uint32_t k = 0; k < t.topk; ++k)
            if (const int y = t.at(tok, l, k); y >= 0 && !p->replicas[l][y].empty() && !marked[y])
              marked[y] = 1, affected.push_back(uint32_t(y));
    for (uint32_t y : affected) add(y, -1), known[y].clear();
    for (uint32_t x : moved)
      if (p->replicas[l][x].empty())
        for (uint32_t tok : tokens_of[x]) set_bits(tok);
    for (uint32_t y : affected) add(y, +1), marked[y] = 0;
  };
  auto reroute = [&] {
    if (!steer) return;
    for (uint32_t tok = 0; tok < t.tokens; ++tok) set_bits(tok);
    for (auto& k : known) k.clear();
    std::fill(load.begin(), load.end(), 0);
    for (uint32_t e = 0; e < E; ++e) add(e, +1);
  };
  EqualizePrimaries(t, l, homes, total, o.nodes, p, &choice, &load);
  reroute();
  // touch[e][n]: tokens of e that reach node n anyway (their home or another
  // of their experts is there), as placed now. Moving e from node a to node
  // b adds about touch[e][a] - touch[e][b] network crossings.
  std::vector<std::vector<int64_t>> touch(E, std::vector<int64_t>(N, 0));
  std::vector<uint32_t> at_node(N);
  for (uint32_t tok = 0; tok < t.tokens; ++tok) {
    std::fill(at_node.begin(), at_node.end(), 0);
    at_node[homes[tok] / per_node]++;
    for (uint32_t k = 0; k < t.topk; ++k)
      if (const int e = t.at(tok, l, k); e >= 0) at_node[choice[e][homes[tok]] / per_node]++;
    for (uint32_t k = 0; k < t.topk; ++k)
      if (const int e = t.at(tok, l, k); e >= 0) {
        const uint32_t own = choice[e][homes[tok]] / per_node;
        for (uint32_t n = 0; n < N; ++n) touch[e][n] += at_node[n] > (n == own ? 1u : 0u);
      }
  }

  // An expert's load on each of its copies under the replica rule, were
  // its copies `on` (choices `ch`): what a move changes, a few ranks, where
  // the loads of every rank would take a pass over the sources.
  auto shares = [&](uint32_t x, const std::vector<uint32_t>& on, const std::vector<uint32_t>& ch) {
    if (on.size() == 1) return Shares{{on[0], total[x]}};  // every source sends there
    if (steer) return reached_shares(x, on, ch);
    Shares out;
    for (uint32_t r : on) out.emplace_back(r, 0);
    for (uint32_t s = 0; s < R; ++s)
      for (auto& [r, w] : out)
        if (r == ch[s]) w += from[x][s];
    return out;
  };
  auto shares_if = [&](uint32_t x, const std::vector<uint32_t>& on) {
    return on.size() == 1 ? Shares{{on[0], total[x]}} : shares(x, on, ExpertMap::ChooseReplicas(on, R, o.nodes));
  };
  // Rank and node loads against their means: a move is judged by the
  // heaviest rank or node it touches (a copy's load under the replica rule
  // lands on its rank's node too, and ranks can be even while nodes are not).
  std::vector<uint64_t> node_load(N, 0);
  double rank_mean = 1, node_mean = 1;
  // The heaviest of rank h, its node and the ranks (and nodes) of e's and
  // f's new copies, were e's shares `was_e` to become `now_e` and f's
  // `was_f` `now_f`, as a multiple of the mean.
  auto peak_with = [&](uint32_t h, const Shares& was_e, const Shares& now_e, const Shares& was_f, const Shares& now_f) {
    auto delta = [&](auto in) {
      int64_t v = 0;
      for (const Shares* sh : {&was_e, &was_f})
        for (auto [r, w] : *sh) v -= in(r) ? int64_t(w) : 0;
      for (const Shares* sh : {&now_e, &now_f})
        for (auto [r, w] : *sh) v += in(r) ? int64_t(w) : 0;
      return v;
    };
    auto at = [&](uint32_t x) {
      return double(int64_t(load[x]) + delta([x](uint32_t r) { return r == x; })) / rank_mean;
    };
    auto at_node = [&](uint32_t n) {
      return double(int64_t(node_load[n]) + delta([n, per_node](uint32_t r) { return r / per_node == n; })) / node_mean;
    };
    double worst = std::max(at(h), N > 1 ? at_node(h / per_node) : 0.0);
    for (const Shares* sh : {&now_e, &now_f})
      for (auto [r, w] : *sh) worst = std::max({worst, at(r), N > 1 ? at_node(r / per_node) : 0.0});
    return worst;
  };
  auto peak_if = [&](uint32_t h, uint32_t e, const std::vector<uint32_t>& ne, uint32_t f,
                     const std::vector<uint32_t>& nf) {
    return peak_with(h, shares(e, p->RanksOf(l, e), choice[e]), shares_if(e, ne),
                     shares(f, p->RanksOf(l, f), choice[f]), shares_if(f, nf));
  };
  uint32_t iter = 0;
  for (; iter < 8 * R; ++iter) {
    std::fill(node_load.begin(), node_load.end(), 0);
    uint64_t sum = 0;
    for (uint32_t r = 0; r < R; ++r) node_load[r / per_node] += load[r], sum += load[r];
    if (sum == 0) break;
    rank_mean = double(sum) / R, node_mean = double(sum) / N;
    // The heaviest rank, or the ranks of the heaviest node (heaviest first)
    // where that node is further above its mean.
    std::vector<uint32_t> from_ranks{uint32_t(std::max_element(load.begin(), load.end()) - load.begin())};
    double peak = double(load[from_ranks[0]]) / rank_mean;
    if (N > 1) {
      const uint32_t n = uint32_t(std::max_element(node_load.begin(), node_load.end()) - node_load.begin());
      if (double(node_load[n]) / node_mean > peak) {
        peak = double(node_load[n]) / node_mean;
        from_ranks.resize(per_node);
        std::iota(from_ranks.begin(), from_ranks.end(), n * per_node);
        std::stable_sort(from_ranks.begin(), from_ranks.end(),
                         [&](uint32_t x, uint32_t y) { return load[x] > load[y]; });
      }
    }
    auto move_off = [&](uint32_t h) -> bool {
      // Best replica move off h: the new peak among the ranks it touches.
      double best_peak = peak;
      uint32_t move_e = E, move_to = R;
      const Shares none;
      for (uint32_t e = 0; e < E; ++e) {
        auto& reps = p->replicas[l][e];
        const auto at = std::find(reps.begin(), reps.end(), h);
        if (at == reps.end()) continue;
        const Shares was = shares(e, p->RanksOf(l, e), choice[e]);
        for (uint32_t r = 0; r < R; ++r) {
          if (used[r] >= capacity[r]) continue;
          auto on = p->RanksOf(l, e);
          if (std::find(on.begin(), on.end(), r) != on.end()) continue;
          std::replace(on.begin(), on.end(), h, r);
          const double worst = peak_with(h, was, shares_if(e, on), none, none);
          if (worst < best_peak) best_peak = worst, move_e = e, move_to = r;
        }
      }
      // Best exchange: a copy of e on h trades places with a copy of the same
      // kind (primary or replica, so every rank keeps its counts) of f on r.
      // Ranks of h's node first: that keeps the node-level records.
      uint32_t ex_e = E, ex_f = E, ex_r = R;
      // Each candidate's shares, computed once per iteration (the replica
      // rule is most of this search's time): f's as placed and with its copy
      // jf moved to h (the same for every e), e's as placed and with h moved
      // to r.
      std::vector<Shares> f_was(E);
      std::vector<std::vector<Shares>> f_to_h(E);
      std::vector<Shares> e_to(R);
      for (int pass = 0; pass < 2 && ex_e == E; ++pass)
        for (uint32_t e = 0; e < E; ++e) {
          const auto on_e = p->RanksOf(l, e);
          const auto at_e = std::find(on_e.begin(), on_e.end(), h);
          if (at_e == on_e.end()) continue;
          const bool primary = at_e == on_e.begin();
          const Shares e_was = shares(e, on_e, choice[e]);
          for (auto& c : e_to) c.clear();
          for (uint32_t f = 0; f < E; ++f) {
            if (f == e) continue;
            const auto on_f = p->RanksOf(l, f);
            if (std::find(on_f.begin(), on_f.end(), h) != on_f.end()) continue;
            for (size_t jf = primary ? 0 : 1; jf < (primary ? 1 : on_f.size()); ++jf) {
              const uint32_t r = on_f[jf];
              if (std::find(on_e.begin(), on_e.end(), r) != on_e.end()) continue;
              // Unreplicated primaries stay in their node (their node was chosen for
              // their tokens); copies of replicated experts may cross.
              // Unless the exchange costs (about) no crossings: 1% of their tokens.
              const uint32_t a = h / per_node, b = r / per_node;
              const bool pinned =
                  primary && (on_e.size() == 1 || on_f.size() == 1) &&
                  !WithinNoise(touch[e][a] - touch[e][b] + touch[f][b] - touch[f][a], total[e] + total[f]);
              if (a != b && (pass == 0 || pinned)) continue;
              auto ne = on_e, nf = on_f;
              std::replace(ne.begin(), ne.end(), h, r);
              nf[jf] = h;
              if (e_to[r].empty()) e_to[r] = shares_if(e, ne);
              if (f_to_h[f].size() <= jf) f_to_h[f].resize(on_f.size());
              if (f_to_h[f][jf].empty()) f_to_h[f][jf] = shares_if(f, nf);
              if (f_was[f].empty()) f_was[f] = shares(f, on_f, choice[f]);
              const double worst = peak_with(h, e_was, e_to[r], f_was[f], f_to_h[f][jf]);
              if (worst < best_peak) best_peak = worst, ex_e = e, ex_f = f, ex_r = r, move_e = E;
            }
          }
        }
      // Else a replica trade: an expert e on h has a replica on another rank
      // x, which trades places with a replica of g on rank r. The replica rule
      // splits sources by count, not tokens, so a hot expert's replicas on
      // nodes its tokens do not come from take little of its load: moving one
      // to a rank near its sources (whose slot is taken: every slot is used)
      // is what lowers its primary's rank.
      uint32_t tr_e = E, tr_g = E, tr_x = R, tr_r = R;
      if (ex_e == E && move_e == E) {
        std::vector<std::vector<uint32_t>> reps_on(R);
        for (uint32_t g = 0; g < E; ++g)
          for (uint32_t r : p->replicas[l][g]) reps_on[r].push_back(g);
        for (uint32_t e = 0; e < E; ++e) {
          const auto on_e = p->RanksOf(l, e);
          if (on_e.size() < 2 || std::find(on_e.begin(), on_e.end(), h) == on_e.end()) continue;
          for (size_t j = 1; j < on_e.size(); ++j) {
            const uint32_t x = on_e[j];
            if (x == h) continue;
            for (uint32_t r = 0; r < R; ++r) {
              if (std::find(on_e.begin(), on_e.end(), r) != on_e.end()) continue;
              for (uint32_t g : reps_on[r]) {
                const auto on_g = p->RanksOf(l, g);
                if (std::find(on_g.begin(), on_g.end(), x) != on_g.end()) continue;
                auto ne = on_e, ng = on_g;
                ne[j] = r;
                std::replace(ng.begin(), ng.end(), r, x);
                const double worst = peak_if(h, e, ne, g, ng);
                if (worst < best_peak) best_peak = worst, tr_e = e, tr_g = g, tr_x = x, tr_r = r;
              }
            }
          }
        }
      }
      if (tr_e != E) {
        add(tr_e, -1), add(tr_g, -1);
        auto& re = p->replicas[l][tr_e];
        std::replace(re.begin(), re.end(), tr_x, tr_r);
        auto& rg = p->replicas[l][tr_g];
        std::replace(rg.begin(), rg.end(), tr_r, tr_x);
        choice[tr_e] = ExpertMap::ChooseReplicas(p->RanksOf(l, tr_e), R, o.nodes);
        choice[tr_g] = ExpertMap::ChooseReplicas(p->RanksOf(l, tr_g), R, o.nodes);
        add(tr_e, +1), add(tr_g, +1);
      } else if (ex_e != E) {
        add(ex_e, -1), add(ex_f, -1);
        // Rewrite both experts' copies (primary in rank_of, the rest in replicas).
        for (uint32_t x : {ex_e, ex_f}) {
          const uint32_t from_rank = x == ex_e ? h : ex_r, to_rank = x == ex_e ? ex_r : h;
          if (p->rank_of[l][x] == from_rank) p->rank_of[l][x] = to_rank;
          auto& reps = p->replicas[l][x];
          std::replace(reps.begin(), reps.end(), from_rank, to_rank);
        }
        choice[ex_e] = ExpertMap::ChooseReplicas(p->RanksOf(l, ex_e), R, o.nodes);
        choice[ex_f] = ExpertMap::ChooseReplicas(p->RanksOf(l, ex_f), R, o.nodes);
        add(ex_e, +1), add(ex_f, +1);
        // Reached nodes alone change only where the exchange crosses nodes.
        if (replica_choice == ReplicaChoice::kReachedRank || h / per_node != ex_r / per_node) rebits({ex_e, ex_f});
      } else if (move_e != E) {
        add(move_e, -1);
        auto& reps = p->replicas[l][move_e];
        std::replace(reps.begin(), reps.end(), h, move_to);
        used[h]--, used[move_to]++;
        choice[move_e] = ExpertMap::ChooseReplicas(p->RanksOf(l, move_e), R, o.nodes);
        add(move_e, +1);
      } else {
        return false;  // no move lowers the peak from h
      }
      return true;
    };
    bool moved = false;
    for (uint32_t h : from_ranks)
      if ((moved = move_off(h))) break;
    if (!moved) break;
  }
}

// Token splits for layer l (ExpertMap's TokenSplit), after BalanceLoads.
// A flow is the tokens of a replicated expert from one source, which the
// replica rule sends whole to one copy; a split sends a share of them (by
// token key) to another copy. While the heaviest rank is above the mean,
// load moves off it along the cheapest path of such shifts to a rank below
// the mean (a shift from rank u to v moves part of a flow whose copy is u;
// a path lets a rank pass on load it receives, which one step cannot where
// every copy of the heaviest rank's experts is itself heavy). A shift's cost
// is the records (rank + node crossings) its tokens add per token, counted
// on the fitted trace from where each token's other experts go; paths
// adding more than kSplitMaxAdded per token are not taken. Loads are
// BalanceLoads' (ShrunkLoads spread over the sources as counted), so the
// shares follow expected loads rather than the fitted trace's noise. A flow
// whose tokens repeat rows (so share keys) is cut at its own tokens' keys,
// ties included, and left whole where no cut comes near the amount.
void SplitFlows(const RoutingTrace& t, uint32_t l, const std::vector<uint64_t>& shrunk, const PlacementOptions& o,
                const std::vector<uint32_t>& homes, Placement* p) {
  const uint32_t E = t.experts, R = p->ranks, K = t.topk, per_node = R / o.nodes;
  constexpr uint32_t kKeys = ExpertMap::kKeySpace;
  auto map_or = p->Map(l, o.nodes);
  if (!map_or.ok() || !map_or->replicated()) return;
  const ExpertMap& map = map_or.value();
  // Where each (token, slot) goes now, each token's key, and the slots of
  // every flow (e, s) of a replicated expert.
  std::vector<uint32_t> dest(size_t(t.tokens) * K, UINT32_MAX), key(t.tokens);
  std::vector<std::vector<uint32_t>> from(E, std::vector<uint32_t>(R, 0));
  std::vector<std::vector<std::vector<uint32_t>>> flow(E);
  std::vector<uint32_t> replicated;  // experts with more than one copy
  for (uint32_t e = 0; e < E; ++e)
    if (map.ranks_of(e).size() > 1) flow[e].resize(R), replicated.push_back(e);
  for (uint32_t tok = 0; tok < t.tokens; ++tok) {
    key[tok] = ExpertMap::TokenKey(&t.ids[(size_t(tok) * t.layers + l) * K], K);
    for (uint32_t k = 0; k < K; ++k) {
      const int e = t.at(tok, l, k);
      if (e < 0) continue;
      const uint32_t s = homes[tok];
      dest[size_t(tok) * K + k] = map.ChoiceFor(uint32_t(e), s);
      from[e][s]++;
      if (!flow[e].empty()) flow[e][s].push_back(tok * K + k);
    }
  }
  // Expected load of each flow and of each rank.
  std::vector<std::vector<double>> weight(E, std::vector<double>(R, 0.0));
  std::vector<double> load(R, 0.0);
  for (uint32_t e = 0; e < E; ++e) {
    const uint64_t counted = std::accumulate(from[e].begin(), from[e].end(), uint64_t(0));
    if (counted == 0) continue;
    const double scale = double(shrunk[e]) / double(counted);
    for (uint32_t s = 0; s < R; ++s) {
      weight[e][s] = double(from[e][s]) * scale;
      load[map.ChoiceFor(e, s)] += weight[e][s];
    }
  }
  const double mean = std::accumulate(load.begin(), load.end(), 0.0) / R;
  if (mean <= 0) return;
  const double high = mean * 1.01;
  // Records (rank + node) slot i's token adds if that slot went to rank `to`.
  auto added = [&](uint32_t i, uint32_t to) {
    const uint32_t tok = i / K, home = homes[tok], at = dest[i];
    bool to_rank = to == home, at_rank = at == home;
    bool to_node = to / per_node == home / per_node, at_node = at / per_node == home / per_node;
    for (uint32_t k = 0; k < K; ++k) {
      const uint32_t j = tok * K + k, d = dest[j];
      if (j == i || d == UINT32_MAX) continue;
      to_rank |= d == to, at_rank |= d == at;
      to_node |= d / per_node == to / per_node, at_node |= d / per_node == at / per_node;
    }
    return int(!to_rank) - int(!at_rank) + int(!to_node) - int(!at_node);
  };
  // Per flow: keys [0, carved) already moved to other copies; the cost per
  // token of moving the rest to each copy (cost[e][s][j]: to ranks_of(e)[j]),
  // refreshed when the flow is cut.
  std::vector<std::vector<uint32_t>> carved(E);
  std::vector<std::vector<std::vector<double>>> cost(E);
  auto price = [&](uint32_t e, uint32_t s) {
    const auto& on = map.ranks_of(e);
    cost[e][s].assign(on.size(), 0.0);
    uint32_t n = 0;
    for (uint32_t i : flow[e][s])
      if (key[i / K] >= carved[e][s]) {
        ++n;
        for (size_t j = 0; j < on.size(); ++j) cost[e][s][j] += added(i, on[j]);
      }
    for (double& c : cost[e][s]) c = n ? c / n : 0.0;
  };
  for (uint32_t e : replicated) {
    carved[e].assign(R, 0);
    cost[e].resize(R);
    for (uint32_t s = 0; s < R; ++s)
      if (!flow[e][s].empty()) price(e, s);
  }
  // Where a flow's rows differ, a share of the key space is that share of
  // its tokens in expectation (keys are uniform), on any trace of the same
  // routing. Tokens with equal rows have one key and move together (under
  // top-1 routing every source's tokens of an expert share one), so a flow
  // whose largest group of equal keys is above an eighth of it is cut where
  // its own tokens' keys fall (sorted[e][s]), ties included, which a trace
  // of the same routing repeats.
  std::vector<std::vector<std::vector<uint32_t>>> sorted(E);
  std::vector<std::vector<bool>> by_tokens(E);
  for (uint32_t e : replicated) {
    sorted[e].resize(R);
    by_tokens[e].assign(R, false);
    for (uint32_t s = 0; s < R; ++s) {
      auto& k = sorted[e][s];
      for (uint32_t i : flow[e][s]) k.push_back(key[i / K]);
      std::sort(k.begin(), k.end());
      size_t largest = 0;
      for (size_t a = 0, b = 0; a < k.size(); a = b) {
        while (b < k.size() && k[b] == k[a]) ++b;
        largest = std::max(largest, b - a);
      }
      by_tokens[e][s] = largest > std::max<size_t>(1, k.size() / 8);
    }
  }
  // Tokens of (e, s) not yet moved: keys from carved[e][s] on.
  auto first = [&](uint32_t e, uint32_t s) {
    return size_t(std::lower_bound(sorted[e][s].begin(), sorted[e][s].end(), carved[e][s]) - sorted[e][s].begin());
  };
  auto left = [&](uint32_t e, uint32_t s) {
    const size_t n = sorted[e][s].size();
    if (!by_tokens[e][s]) return weight[e][s] * double(kKeys - carved[e][s]) / kKeys;
    return n ? weight[e][s] * double(n - first(e, s)) / double(n) : 0.0;
  };
  // The cut moving about `amount` of (e, s): the key bound past the keys it
  // takes, and the load it moves.
  auto cut = [&](uint32_t e, uint32_t s, double amount) {
    if (!by_tokens[e][s]) {
      const uint32_t share =
          std::min(kKeys - carved[e][s], std::max<uint32_t>(1, uint32_t(std::lround(amount / weight[e][s] * kKeys))));
      return std::make_pair(carved[e][s] + share, weight[e][s] * share / kKeys);
    }
    const auto& k = sorted[e][s];
    const size_t n = k.size(), i0 = first(e, s);
    size_t i1 = i0 + std::max<size_t>(1, size_t(std::llround(amount / weight[e][s] * double(n))));
    uint32_t bound = kKeys;
    if (i1 < n) {
      bound = k[i1 - 1] + 1;
      i1 = size_t(std::upper_bound(k.begin(), k.end(), k[i1 - 1]) - k.begin());
      if (i1 == n) bound = kKeys;
    } else {
      i1 = n;
    }
    return std::make_pair(bound, weight[e][s] * double(i1 - i0) / double(n));
  };
  // Flows a path could not cut near its amount (tokens sharing keys):
  // skipped until a move changes the loads.
  std::vector<std::vector<bool>> blocked(E);
  for (uint32_t e : replicated) blocked[e].assign(R, false);
  // Replicated experts with a copy on each rank.
  std::vector<std::vector<uint32_t>> on_rank(R);
  for (uint32_t e : replicated)
    for (uint32_t r : map.ranks_of(e)) on_rank[r].push_back(e);

  std::vector<TokenSplit> splits;
  std::vector<std::vector<int32_t>> last(E);  // index in `splits` of (e, s)'s last split, or -1
  for (uint32_t e : replicated) last[e].assign(R, -1);
  struct Step {
    uint32_t e, s, from;
  };
  std::vector<double> dist(R);
  std::vector<Step> via(R);
  std::vector<bool> done(R);
  for (uint32_t iter = 0; iter < 16 * R; ++iter) {
    const uint32_t h = uint32_t(std::max_element(load.begin(), load.end()) - load.begin());
    if (load[h] <= high) break;
    // Cheapest paths from h (Dijkstra; a shift that saves records costs 0
    // here), stopping at the first rank below the mean.
    std::fill(dist.begin(), dist.end(), 1e300);
    std::fill(done.begin(), done.end(), false);
    dist[h] = 0;
    uint32_t target = R, lightest = R;
    for (;;) {
      uint32_t u = R;
      for (uint32_t r = 0; r < R; ++r)
        if (!done[r] && dist[r] <= kSplitMaxAdded && (u == R || dist[r] < dist[u])) u = r;
      if (u == R) break;
      done[u] = true;
      if (u != h && load[u] < mean - 1) {
        target = u;
        break;
      }
      if (u != h && (lightest == R || load[u] < load[lightest])) lightest = u;
      for (uint32_t e : on_rank[u]) {
        const auto& on = map.ranks_of(e);
        for (uint32_t s = 0; s < R; ++s) {
          if (map.ChoiceFor(e, s) != u || left(e, s) < 0.5 || blocked[e][s]) continue;
          for (size_t j = 0; j < on.size(); ++j) {
            const uint32_t v = on[j];
            const double d = dist[u] + std::max(0.0, cost[e][s][j]);
            if (v != u && !done[v] && d < dist[v]) dist[v] = d, via[v] = {e, s, u};
          }
        }
      }
    }
    // None below the mean within reach: halve the gap to the lightest.
    if (target == R && lightest != R && load[lightest] < load[h] - 2) target = lightest;
    if (target == R) break;
    double amount =
        std::min(load[h] - high, load[target] < mean - 1 ? mean - load[target] : (load[h] - load[target]) / 2);
    for (uint32_t v = target; v != h; v = via[v].from) amount = std::min(amount, left(via[v].e, via[v].s));
    if (amount < 0.5) break;
    // A flow whose tokens share keys may only be cut well past the amount:
    // skip it rather than overshoot.
    bool overshoots = false;
    for (uint32_t v = target; v != h; v = via[v].from)
      if (cut(via[v].e, via[v].s, amount).second > 1.5 * amount + 0.5)
        overshoots = true, blocked[via[v].e][via[v].s] = true;
    if (overshoots) continue;
    for (uint32_t e : replicated) std::fill(blocked[e].begin(), blocked[e].end(), false);
    for (uint32_t v = target; v != h; v = via[v].from) {
      const auto [e, s, u] = via[v];
      const auto [bound, moved] = cut(e, s, amount);
      const uint32_t share = bound - carved[e][s];
      load[u] -= moved, load[v] += moved;
      for (uint32_t i : flow[e][s])
        if (key[i / K] >= carved[e][s] && key[i / K] < carved[e][s] + share) dest[i] = v;
      carved[e][s] += share;
      if (last[e][s] >= 0 && splits[last[e][s]].rank == v) {
        splits[last[e][s]].share += share;
      } else {
        last[e][s] = int32_t(splits.size());
        splits.push_back({e, s, v, share});
      }
      price(e, s);
    }
  }
  if (splits.empty()) return;
  if (p->splits.empty()) p->splits.assign(t.layers, {});
  p->splits[l] = std::move(splits);
}

}  // namespace

// A replicated layer as dispatch would route the fitted trace: records
// (rank + node-level crossings) and the heavier of its rank and node
// imbalance (max load / mean), with `noise` the relative standard deviation
// of one rank's load from sampling alone (1 / sqrt(mean pairs per rank)).
struct LayerOutcome {
  bool ok = false;
  uint64_t records = 0;
  double peak = 0, noise = 0;
};
LayerOutcome Judge(const RoutingTrace& t, const Placement& p, const PlacementOptions& o, uint32_t l,
                   const std::vector<uint32_t>& homes) {
  std::vector<uint64_t> load;
  auto c = CountLayerRecords(t, p, CostOptions{o.nodes, o.home, /*hierarchical=*/true}, l, &load, &homes);
  if (!c.ok()) return {};
  const uint64_t sum = std::accumulate(load.begin(), load.end(), uint64_t(0));
  if (sum == 0) return {true, Objective(c.value()), 1.0, 0.0};
  const uint32_t R = p.ranks, per_node = R / o.nodes;
  std::vector<uint64_t> node(o.nodes, 0);
  for (uint32_t r = 0; r < R; ++r) node[r / per_node] += load[r];
  const double mean = double(sum) / R;
  const double peak = std::max(double(*std::max_element(load.begin(), load.end())) / mean,
                               double(*std::max_element(node.begin(), node.end())) * o.nodes / double(sum));
  return {true, Objective(c.value()), peak, 1.0 / std::sqrt(mean)};
}

Result<Placement> PlaceExperts(const RoutingTrace& trace, uint32_t ranks, const PlacementOptions& o) {
  TE_RETURN_IF_ERROR(trace.Validate());
  TE_RETURN_IF_ERROR(CheckShape(trace.experts, ranks, o.nodes));
  const uint32_t real = trace.experts, slots = PrimarySlots(real, ranks);
  if (uint64_t(slots) * ranks > kMaxPlacedExperts)
    return InvalidArgument("trace has " + std::to_string(real) + " experts, " + std::to_string(slots) +
                           " slots on each of " + std::to_string(ranks) + " ranks; the solver places at most " +
                           std::to_string(kMaxPlacedExperts));
  if (o.load_slack < 0) return InvalidArgument("load_slack " + std::to_string(o.load_slack) + " must be >= 0");
  // Experts that do not divide over the ranks fill ranks x slots with empty
  // experts (no token names them, they weigh nothing), placed like the rest
  // and dropped at the end: their slots are the ranks' free ones, where the
  // partition's balancing put them (on heavy ranks, which then hold fewer
  // experts). The padded copy of the trace is made only then.
  RoutingTrace padded;
  if (slots * ranks != real) {
    padded = trace;
    padded.experts = slots * ranks;
  }
  const RoutingTrace& t = slots * ranks != real ? padded : trace;
  // Statistics of a layer's loads (how skewed, how noisy) are of its real experts.
  auto real_part = [&](const std::vector<uint64_t>& v) { return std::vector<uint64_t>(v.begin(), v.begin() + real); };
  // With replicas the placement balances tightly, on loads shrunk to what
  // the trace shows beyond its noise; without, the cap is loose (load_slack)
  // and holds on the counts themselves. A layer whose loads do not differ
  // beyond that noise gets no replicas (LoadsAreSkewed).
  auto load = LayerLoads(t);
  const auto tokens_of = o.extra_slots > 0 ? TokensPerExpert(t) : std::vector<std::vector<uint64_t>>();
  std::vector<bool> replicated(t.layers, false);
  for (uint32_t l = 0; l < t.layers; ++l)
    if (o.extra_slots > 0 && LoadsAreSkewed(real_part(tokens_of[l]))) {
      replicated[l] = true;
      auto shrunk = ShrunkLoads(real_part(load[l]));
      std::copy(shrunk.begin(), shrunk.end(), load[l].begin());
    }
  // With replicas, primaries are balanced by their load per copy. A
  // replicated layer's copies fill the extra slots and the free primary
  // slots.
  std::vector<std::vector<uint32_t>> copies(t.layers);
  auto per_copy = load;
  for (uint32_t l = 0; l < t.layers; ++l) {
    copies[l] = Copies(load[l], ranks, replicated[l] ? uint64_t(ranks) * (o.extra_slots + slots) - real : 0);
    for (uint32_t e = 0; e < t.experts; ++e) per_copy[l][e] = (load[l][e] + copies[l][e] - 1) / copies[l][e];
  }
  const Placement rr = RoundRobinPlacement(t.layers, t.experts, ranks);
  Placement p = rr;
  for (uint32_t l = 0; l < t.layers; ++l) PlaceLayer(t, l, per_copy[l], o, replicated[l], &p);
  TE_RETURN_IF_ERROR(p.Validate());

  const CostOptions cost{o.nodes, o.home, /*hierarchical=*/true};
  auto mine = CountRecords(t, p, cost);
  auto base = CountRecords(t, rr, cost);
  if (!mine.ok()) return mine.status();
  if (!base.ok()) return base.status();
  if (o.home == TokenHome::kSource) {
    // Layers are independent: keep the better of each.
    for (uint32_t l = 0; l < t.layers; ++l)
      if (Objective(mine->layers[l]) > Objective(base->layers[l])) p.rank_of[l] = rr.rank_of[l];
  } else if (Objective(mine->total()) > Objective(base->total())) {
    p = rr;
  }
  // The empty experts leave: their slots are free for replicas.
  if (t.experts != real) {
    p.experts = real;
    for (auto& layer : p.rank_of) layer.resize(real);
  }
  if (o.extra_slots > 0) {
    p.replicas.assign(t.layers, {});
    // Every token's home at layer l, from the layers before it as finally
    // placed (kTop1), advanced once per layer.
    std::vector<uint32_t> homes(trace.tokens);
    for (uint32_t tok = 0; tok < trace.tokens; ++tok) homes[tok] = tok % ranks;
    auto advance = [&](uint32_t l) {
      if (o.home != TokenHome::kTop1) return;
      if (auto map = p.Map(l, o.nodes); map.ok()) AdvanceHomes(trace, map.value(), l, &homes);
    };
    for (uint32_t l = 0; l < t.layers; ++l) {
      if (!replicated[l]) {
        advance(l);
        continue;
      }
      const auto layer_load = real_part(load[l]);
      const auto layer_copies = std::vector<uint32_t>(copies[l].begin(), copies[l].begin() + real);
      const auto capacity = p.ReplicaSlots(l, o.extra_slots);
      // By source first (with token splits). Reached-node choice saves the
      // crossings a copy off a token's nodes costs, but its loads follow the
      // tokens' other experts: it is kept only where it sends fewer records
      // and the layer stays balanced on the fitted trace (within the
      // replicated cap, or within sampling noise of the by-source peak).
      // Tried on the same copies first (cheap: one count), then, where that
      // shows crossings to save, with copies placed and balanced for it.
      const std::vector<uint32_t> primaries = p.rank_of[l];
      if (p.choice.empty()) p.choice.assign(t.layers, ReplicaChoice::kBySource);
      auto build = [&](ReplicaChoice choice) {
        p.rank_of[l] = primaries;
        if (!p.splits.empty()) p.splits[l].clear();
        p.choice[l] = choice;
        Replicate(trace, l, layer_load, layer_copies, o, capacity, choice, homes, &p);
        BalanceLoads(trace, l, layer_load, o, capacity, choice, homes, &p);
        if (choice == ReplicaChoice::kBySource) SplitFlows(trace, l, layer_load, o, homes, &p);
        return Judge(trace, p, o, l, homes);
      };
      if (o.replica_choice) {
        build(*o.replica_choice);
        advance(l);
        continue;
      }
      struct Layer {
        std::vector<uint32_t> rank_of;
        std::vector<std::vector<uint32_t>> replicas;
        std::vector<TokenSplit> splits;
        ReplicaChoice choice;
        LayerOutcome outcome;
      };
      auto save = [&](const LayerOutcome& outcome) {
        return Layer{p.rank_of[l], p.replicas[l], p.splits.empty() ? std::vector<TokenSplit>{} : p.splits[l],
                     p.choice[l], outcome};
      };
      const Layer by_source = save(build(ReplicaChoice::kBySource));
      const double cap = 1.0 + std::min(o.load_slack, 0.05);
      auto acceptable = [&](const LayerOutcome& x) {
        return x.ok && x.records < by_source.outcome.records &&
               x.peak <= std::max(cap, by_source.outcome.peak + x.noise);
      };
      Layer best = by_source;
      // The same copies routed by reached rank and by reached node. Worth
      // placing copies for one where they save at least 5% of the layer's
      // records (and more than the fitted trace's noise): a build costs
      // about as much time as the by-source one, and where the flip saved
      // less (2-4% at 256 ranks in 32 nodes, one primary per rank) the
      // builds measured kept a third of it, often none.
      std::vector<std::pair<uint64_t, ReplicaChoice>> worth;  // (records saved, choice)
      for (ReplicaChoice choice : {ReplicaChoice::kReachedRank, ReplicaChoice::kReachedNode}) {
        p.choice[l] = choice;
        const LayerOutcome flipped = Judge(trace, p, o, l, homes);
        if (acceptable(flipped) && flipped.records < best.outcome.records) best = save(flipped);
        const uint64_t saves =
            flipped.ok && flipped.records < by_source.outcome.records ? by_source.outcome.records - flipped.records : 0;
        if (saves >= by_source.outcome.records / 20 && !WithinNoise(int64_t(saves), by_source.outcome.records))
          worth.emplace_back(saves, choice);
      }
      // The choice whose flip saved most first; the other where that build
      // was not kept (reached rank saves more, and piles more load onto the
      // ranks of popular single-copy experts, which balancing cannot always
      // undo).
      std::stable_sort(worth.begin(), worth.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
      for (const auto& [saves, choice] : worth) {
        const LayerOutcome reached = build(choice);
        if (acceptable(reached) && reached.records < best.outcome.records) {
          best = save(reached);
          break;
        }
      }
      p.rank_of[l] = best.rank_of;
      p.replicas[l] = best.replicas;
      if (!p.splits.empty()) p.splits[l] = best.splits;
      p.choice[l] = best.choice;
      advance(l);
    }
  }
  if (std::all_of(p.choice.begin(), p.choice.end(), [](ReplicaChoice c) { return c == ReplicaChoice::kBySource; }))
    p.choice.clear();
  TE_RETURN_IF_ERROR(p.Validate(o.extra_slots));
  return p;
}

}  // namespace te::moe
