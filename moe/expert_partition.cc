#include "moe/expert_partition.h"

#include <algorithm>
#include <numeric>

namespace te::moe {

void PartitionProblem::AddToken(const uint32_t* items_of_token, uint32_t n, int32_t home_part) {
  members.insert(members.end(), items_of_token, items_of_token + n);
  begin.push_back(uint32_t(members.size()));
  home.push_back(home_part);
}

bool PartitionProblem::WellFormed() const {
  if (parts == 0 || items % parts != 0 || load.size() != items) return false;
  if (begin.empty() || begin.front() != 0 || begin.size() != home.size() + 1 || begin.back() != members.size())
    return false;
  for (uint32_t t = 0; t < tokens(); ++t)
    if (begin[t + 1] < begin[t] || home[t] < -1 || home[t] >= int64_t(parts)) return false;
  std::vector<uint32_t> seen(items, UINT32_MAX);
  for (uint32_t t = 0; t < tokens(); ++t) {
    for (uint32_t i = begin[t]; i < begin[t + 1]; ++i) {
      if (members[i] >= items || seen[members[i]] == t) return false;
      seen[members[i]] = t;
    }
  }
  return true;
}

uint64_t PartitionCost(const PartitionProblem& p, const std::vector<uint32_t>& part_of) {
  if (!p.WellFormed() || part_of.size() != p.items) return UINT64_MAX;
  for (uint32_t q : part_of)
    if (q >= p.parts) return UINT64_MAX;
  uint64_t cost = 0;
  std::vector<uint32_t> seen(p.parts, UINT32_MAX);
  for (uint32_t t = 0; t < p.tokens(); ++t) {
    if (p.home[t] >= 0) {
      seen[p.home[t]] = t;
      ++cost;
    }
    for (uint32_t i = p.begin[t]; i < p.begin[t + 1]; ++i) {
      const uint32_t part = part_of[p.members[i]];
      if (seen[part] != t) seen[part] = t, ++cost;
    }
  }
  return cost;
}

namespace {

// Pairwise co-activation: tokens sharing two experts, each token's pairs
// weighted 1 / (members - 1) (a token's home pulls its experts toward the
// home part like one more member). Sparse rows.
struct Affinity {
  std::vector<std::vector<std::pair<uint32_t, double>>> near;  // [item] -> (item, weight)
  std::vector<double> home_pull;                               // [item * parts + part]
};

Affinity PairWeights(const PartitionProblem& p) {
  const uint32_t n = p.items, P = p.parts;
  Affinity a;
  a.near.resize(n);
  a.home_pull.assign(size_t(n) * P, 0.0);
  std::vector<double> w(size_t(n) * n, 0.0);
  for (uint32_t t = 0; t < p.tokens(); ++t) {
    const uint32_t b = p.begin[t], e = p.begin[t + 1], m = e - b + (p.home[t] >= 0);
    if (m < 2) continue;
    const double share = 1.0 / (m - 1);
    for (uint32_t i = b; i < e; ++i) {
      if (p.home[t] >= 0) a.home_pull[size_t(p.members[i]) * P + p.home[t]] += share;
      for (uint32_t j = i + 1; j < e; ++j) {
        w[size_t(p.members[i]) * n + p.members[j]] += share;
        w[size_t(p.members[j]) * n + p.members[i]] += share;
      }
    }
  }
  for (uint32_t i = 0; i < n; ++i)
    for (uint32_t j = 0; j < n; ++j)
      if (w[size_t(i) * n + j] > 0) a.near[i].emplace_back(j, w[size_t(i) * n + j]);
  return a;
}

// Heaviest first, each into the part whose placed experts share the most
// tokens with it, among parts with a free slot and room under the cap.
std::vector<uint32_t> GreedyByLoad(const PartitionProblem& p, const Affinity& a) {
  const uint32_t n = p.items, P = p.parts, slots = n / P;
  std::vector<double> pull = a.home_pull;  // [item * P + part]
  std::vector<uint32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](uint32_t x, uint32_t y) { return p.load[x] > p.load[y]; });
  std::vector<uint32_t> part_of(n, 0), used(P, 0);
  std::vector<uint64_t> load(P, 0);
  for (uint32_t i : order) {
    uint32_t best = P;
    bool best_fits = false;
    for (uint32_t q = 0; q < P; ++q) {
      if (used[q] == slots) continue;
      const bool fits = double(load[q] + p.load[i]) <= p.cap;
      if (best == P) {
        best = q, best_fits = fits;
        continue;
      }
      // Under the cap beats over it; then pull; then the lighter part.
      const double x = pull[size_t(i) * P + q], y = pull[size_t(i) * P + best];
      if (fits != best_fits ? fits : (x > y || (x == y && load[q] < load[best]))) best = q, best_fits = fits;
    }
    part_of[i] = best;
    used[best]++;
    load[best] += p.load[i];
    for (const auto& [j, w] : a.near[i]) pull[size_t(j) * P + best] += w;
  }
  return part_of;
}

// Graph growing: part by part, seeded with the heaviest expert left, then
// the expert most tied to what the part holds (home pull included), under
// the cap where possible, until the part is full. Keeps a co-activated set
// together when it fits in a part, where load-first greedy may split it.
std::vector<uint32_t> GrowParts(const PartitionProblem& p, const Affinity& a) {
  const uint32_t n = p.items, P = p.parts, slots = n / P;
  std::vector<uint32_t> part_of(n, UINT32_MAX);
  std::vector<double> pull(n);
  for (uint32_t q = 0; q < P; ++q) {
    for (uint32_t i = 0; i < n; ++i) pull[i] = a.home_pull[size_t(i) * P + q];
    uint64_t load = 0;
    for (uint32_t k = 0; k < slots; ++k) {
      uint32_t best = n;
      bool best_fits = false;
      for (uint32_t i = 0; i < n; ++i) {
        if (part_of[i] != UINT32_MAX) continue;
        const bool fits = double(load + p.load[i]) <= p.cap;
        if (best == n) {
          best = i, best_fits = fits;
          continue;
        }
        const double x = pull[i], y = pull[best];
        if (fits != best_fits ? fits : (x > y || (x == y && p.load[i] > p.load[best]))) best = i, best_fits = fits;
      }
      part_of[best] = q;
      load += p.load[best];
      for (const auto& [j, w] : a.near[best]) pull[j] += w;
    }
  }
  return part_of;
}

// Swap refinement with exact gains. State per token and part: cnt (experts
// of the token there, home included); per expert: alone = tokens where it is
// the only one in its part, conn[x][q] = its tokens with something in q.
// Moving x to q saves alone[x] - tokens[x] + conn[x][q] records.
class Refiner {
 public:
  Refiner(const PartitionProblem& p, std::vector<uint32_t> part_of) : p_(p), P_(p.parts), part_(std::move(part_of)) {
    const uint32_t n = p.items, T = p.tokens();
    tok_begin_.assign(n + 1, 0);
    for (uint32_t x : p.members) tok_begin_[x + 1]++;
    for (uint32_t i = 0; i < n; ++i) tok_begin_[i + 1] += tok_begin_[i];
    toks_.resize(p.members.size());
    std::vector<uint32_t> fill(tok_begin_.begin(), tok_begin_.end() - 1);
    for (uint32_t t = 0; t < T; ++t)
      for (uint32_t i = p.begin[t]; i < p.begin[t + 1]; ++i) toks_[fill[p.members[i]]++] = t;
    cnt_.assign(size_t(T) * P_, 0);
    for (uint32_t t = 0; t < T; ++t) {
      if (p.home[t] >= 0) cnt_[size_t(t) * P_ + p.home[t]]++;
      for (uint32_t i = p.begin[t]; i < p.begin[t + 1]; ++i) cnt_[size_t(t) * P_ + part_[p.members[i]]]++;
    }
    alone_.assign(n, 0);
    conn_.assign(size_t(n) * P_, 0);
    for (uint32_t x = 0; x < n; ++x)
      for (uint32_t k = tok_begin_[x]; k < tok_begin_[x + 1]; ++k) {
        const uint16_t* c = &cnt_[size_t(toks_[k]) * P_];
        alone_[x] += c[part_[x]] == 1;
        for (uint32_t q = 0; q < P_; ++q) conn_[size_t(x) * P_ + q] += c[q] > 0;
      }
    load_.assign(P_, 0);
    for (uint32_t x = 0; x < n; ++x) load_[part_[x]] += p.load[x];
  }

  void Run(int max_sweeps) {
    const uint32_t n = p_.items;
    std::vector<uint32_t> stamp(p_.tokens(), UINT32_MAX);
    for (int sweep = 0; sweep < max_sweeps; ++sweep) {
      bool improved = false;
      for (uint32_t e = 0; e < n; ++e) {
        for (uint32_t k = tok_begin_[e]; k < tok_begin_[e + 1]; ++k) stamp[toks_[k]] = e;
        for (uint32_t f = e + 1; f < n; ++f) {
          const uint32_t a = part_[e], b = part_[f];
          if (a == b) continue;
          if (Saving(e, b) + Saving(f, a) <= 0) continue;  // an upper bound: shared tokens only lower it
          if (SwapGain(e, f, stamp) <= 0) continue;
          const uint64_t na = load_[a] - p_.load[e] + p_.load[f], nb = load_[b] - p_.load[f] + p_.load[e];
          const uint64_t worst_now = std::max(load_[a], load_[b]), worst_new = std::max(na, nb);
          if (double(worst_new) > p_.cap && worst_new > worst_now) continue;
          Swap(e, f);
          improved = true;
        }
      }
      if (!improved) break;
    }
  }

  // Brings every part under the cap where swaps can: while the heaviest part
  // is over it, the swap of one of its experts with a lighter one elsewhere
  // that keeps the other part under the cap, scored below by the records it
  // adds (exact) per unit of excess removed, or, where none keeps it under,
  // the swap that lowers the heaviest part most. With `upper` (the same items and tokens, its parts groups of
  // `per_group` of these: ranks in nodes) the groups are held under upper's
  // cap as well and records count at both levels. Each swap lowers the
  // heaviest part or the count of parts at that load, so the loop ends; it is
  // also bounded. Run() only swaps towards fewer records and never past the
  // cap, so it cannot undo this.
  void Repair(Refiner* upper = nullptr, uint32_t per_group = 1) {
    const uint32_t n = p_.items;
    std::vector<uint32_t> stamp(p_.tokens(), UINT32_MAX), heavy;
    auto group = [&](uint32_t q) { return q / per_group; };
    for (uint32_t iter = 0; iter < 4 * n; ++iter) {
      const uint32_t a = uint32_t(std::max_element(load_.begin(), load_.end()) - load_.begin());
      if (double(load_[a]) <= p_.cap) return;
      // Among swaps that fit, the fewest records added per unit of excess
      // removed, each swap charged one record more than it adds: without
      // that charge, swaps of tiny loads that add nothing win one by one and
      // the loop takes thousands of steps where one swap of about the same
      // cost clears the excess (thousands of light experts).
      const double excess = double(load_[a]) - p_.cap;
      struct Pick {
        uint32_t e, f;
        bool fits;
        double score;
        int64_t gain;
        uint64_t peak;
      };
      Pick best{n, n, false, 0, 0, load_[a]};
      auto better = [](const Pick& c, const Pick& b) {
        if (c.fits != b.fits) return c.fits;
        if (!c.fits) return c.peak < b.peak || (c.peak == b.peak && c.gain > b.gain);
        return c.score > b.score;
      };
      // The part's 32 heaviest experts are the ones to swap out (a swap
      // removes the difference of two loads); that bounds a step at 32 x
      // items pairs where a part holds thousands.
      heavy.clear();
      for (uint32_t e = 0; e < n; ++e)
        if (part_[e] == a) heavy.push_back(e);
      const size_t keep = std::min<size_t>(heavy.size(), 32);
      std::partial_sort(heavy.begin(), heavy.begin() + keep, heavy.end(), [&](uint32_t x, uint32_t y) {
        return p_.load[x] != p_.load[y] ? p_.load[x] > p_.load[y] : x < y;
      });
      heavy.resize(keep);
      for (uint32_t e : heavy) {
        for (uint32_t k = tok_begin_[e]; k < tok_begin_[e + 1]; ++k) stamp[toks_[k]] = e;
        for (uint32_t f = 0; f < n; ++f) {
          const uint32_t b = part_[f];
          if (b == a || p_.load[f] >= p_.load[e]) continue;
          const uint64_t d = p_.load[e] - p_.load[f], nb = load_[b] + d;
          const bool crosses = upper != nullptr && group(a) != group(b);
          const uint64_t group_b = crosses ? upper->load_[group(b)] + d : 0;
          bool fits = double(nb) <= p_.cap;
          if (crosses) {
            fits &= double(group_b) <= upper->p_.cap;
            // Never the heaviest group: b's group stays under the cap or a's.
            if (double(group_b) > std::max(upper->p_.cap, double(upper->load_[group(a)]))) continue;
          }
          Pick c{e, f, fits, 0, 0, std::max(load_[a] - d, nb)};
          if (!fits && (best.fits || c.peak >= best.peak)) continue;
          const double progress = std::min(double(d), excess);
          if (fits && best.fits) {
            // Shared tokens only lower a gain below this bound.
            int64_t bound = Saving(e, b) + Saving(f, a);
            if (crosses) bound += upper->Saving(e, group(b)) + upper->Saving(f, group(a));
            if (double(bound - 1) / progress <= best.score) continue;
          }
          c.gain = SwapGain(e, f, stamp);
          if (crosses) c.gain += upper->SwapGain(e, f, stamp);
          c.score = double(c.gain - 1) / progress;
          if (best.e == n || better(c, best)) best = c;
        }
      }
      const uint32_t best_e = best.e, best_f = best.f;
      if (best_e == n) return;  // no swap lowers the heaviest part
      Swap(best_e, best_f);
      if (upper != nullptr && group(a) != group(part_[best_e])) upper->Swap(best_e, best_f);
    }
  }

  std::vector<uint32_t> parts() && { return std::move(part_); }
  uint32_t part(uint32_t x) const { return part_[x]; }

 private:
  // Records saved by exchanging the parts of e and f, exactly; `stamp[t] ==
  // e` marks e's tokens (the same tokens in every level's problem).
  int64_t SwapGain(uint32_t e, uint32_t f, const std::vector<uint32_t>& stamp) const {
    const uint32_t a = part_[e], b = part_[f];
    int64_t shared = 0;  // tokens holding both keep their parts
    for (uint32_t k = tok_begin_[f]; k < tok_begin_[f + 1]; ++k) {
      const uint32_t t = toks_[k];
      if (stamp[t] == e) shared += (cnt_[size_t(t) * P_ + a] == 1) + (cnt_[size_t(t) * P_ + b] == 1);
    }
    return Saving(e, b) + Saving(f, a) - shared;
  }

  void Swap(uint32_t e, uint32_t f) {
    const uint32_t a = part_[e], b = part_[f];
    const uint64_t le = p_.load[e], lf = p_.load[f];
    Move(e, b);
    Move(f, a);
    load_[a] = load_[a] - le + lf;
    load_[b] = load_[b] - lf + le;
  }

  int64_t Saving(uint32_t x, uint32_t q) const {
    return int64_t(alone_[x]) - int64_t(tok_begin_[x + 1] - tok_begin_[x]) + int64_t(conn_[size_t(x) * P_ + q]);
  }

  // The other member of token t in part q, if a real one is there (not x, not
  // the home); called when q holds exactly one besides x or exactly one.
  void AdjustLone(uint32_t t, uint32_t x, uint32_t q, int delta) {
    for (uint32_t i = p_.begin[t]; i < p_.begin[t + 1]; ++i) {
      const uint32_t y = p_.members[i];
      if (y != x && part_[y] == q) {
        alone_[y] += delta;
        return;
      }
    }
  }

  void Move(uint32_t x, uint32_t to) {
    const uint32_t from = part_[x];
    for (uint32_t k = tok_begin_[x]; k < tok_begin_[x + 1]; ++k) {
      const uint32_t t = toks_[k];
      uint16_t& c = cnt_[size_t(t) * P_ + from];
      --c;
      if (c == 0) {
        alone_[x]--;
        for (uint32_t i = p_.begin[t]; i < p_.begin[t + 1]; ++i) conn_[size_t(p_.members[i]) * P_ + from]--;
      } else if (c == 1) {
        AdjustLone(t, x, from, +1);
      }
    }
    part_[x] = to;
    for (uint32_t k = tok_begin_[x]; k < tok_begin_[x + 1]; ++k) {
      const uint32_t t = toks_[k];
      uint16_t& c = cnt_[size_t(t) * P_ + to];
      ++c;
      if (c == 1) {
        alone_[x]++;
        for (uint32_t i = p_.begin[t]; i < p_.begin[t + 1]; ++i) conn_[size_t(p_.members[i]) * P_ + to]++;
      } else if (c == 2) {
        AdjustLone(t, x, to, -1);
      }
    }
  }

  const PartitionProblem& p_;
  const uint32_t P_;
  std::vector<uint32_t> part_;
  std::vector<uint32_t> tok_begin_, toks_;  // tokens of each expert
  std::vector<uint16_t> cnt_;               // [token * P + part]
  std::vector<uint32_t> alone_, conn_;
  std::vector<uint64_t> load_;
};

}  // namespace

std::vector<uint32_t> SolvePartition(const PartitionProblem& p, int max_sweeps) {
  if (!p.WellFormed()) return {};
  if (p.parts <= 1) return std::vector<uint32_t>(p.items, 0);
  // Two constructions, each refined. The winner is the one furthest under
  // the cap (neither over it counts as equal), then the cheaper.
  const Affinity a = PairWeights(p);
  std::vector<uint32_t> best;
  double best_over = 0;
  uint64_t best_cost = UINT64_MAX;
  for (auto start : {GreedyByLoad(p, a), GrowParts(p, a)}) {
    Refiner r(p, std::move(start));
    r.Run(max_sweeps);
    r.Repair();
    r.Run(max_sweeps);
    auto parts = std::move(r).parts();
    std::vector<uint64_t> load(p.parts, 0);
    for (uint32_t x = 0; x < p.items; ++x) load[parts[x]] += p.load[x];
    const double over = std::max(0.0, double(*std::max_element(load.begin(), load.end())) - p.cap);
    const uint64_t cost = PartitionCost(p, parts);
    if (best.empty() || over < best_over || (over == best_over && cost < best_cost))
      best_over = over, best_cost = cost, best = std::move(parts);
  }
  return best;
}

std::vector<uint32_t> RepairLoads(const PartitionProblem& p, std::vector<uint32_t> part_of,
                                  const PartitionProblem* groups) {
  if (!p.WellFormed() || part_of.size() != p.items) return {};
  for (uint32_t q : part_of)
    if (q >= p.parts) return {};
  if (groups != nullptr && (!groups->WellFormed() || groups->items != p.items || groups->tokens() != p.tokens() ||
                            groups->members != p.members || p.parts % groups->parts != 0))
    return {};
  if (p.parts <= 1) return part_of;
  Refiner r(p, std::move(part_of));
  if (groups == nullptr || groups->parts <= 1) {
    r.Repair();
    return std::move(r).parts();
  }
  const uint32_t per_group = p.parts / groups->parts;
  std::vector<uint32_t> group_of(p.items);
  for (uint32_t x = 0; x < p.items; ++x) group_of[x] = r.part(x) / per_group;
  Refiner g(*groups, std::move(group_of));
  r.Repair(&g, per_group);
  return std::move(r).parts();
}

}  // namespace te::moe
