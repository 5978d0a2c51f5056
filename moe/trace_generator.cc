#include "moe/trace_generator.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

namespace te::moe {
namespace {

// The model behind a trace: everything but the tokens, a function of
// (options, seed) only, so the generator and the oracle see the same one.
struct Model {
  std::vector<std::vector<double>> popularity;        // [layer][expert] Zipf weight
  std::vector<std::vector<int>> successor;            // [layer][expert] planted successor at layer + 1
  std::vector<std::vector<std::vector<int>>> groups;  // [layer][group] experts (groups model)
};

Model BuildModel(const TraceOptions& o) {
  Model m;
  std::mt19937_64 rng(o.seed);
  m.popularity.resize(o.layers);
  m.successor.resize(o.layers);
  for (uint32_t l = 0; l < o.layers; ++l) {
    std::vector<int> perm(o.experts);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    m.popularity[l].resize(o.experts);
    for (uint32_t r = 0; r < o.experts; ++r) m.popularity[l][perm[r]] = 1.0 / std::pow(double(r + 1), o.skew);
    m.successor[l].resize(o.experts);
    std::iota(m.successor[l].begin(), m.successor[l].end(), 0);
    std::shuffle(m.successor[l].begin(), m.successor[l].end(), rng);
  }
  if (o.model == TraceModel::kCoactivationGroups) {
    // Own stream, so adding groups leaves the other models' traces unchanged.
    std::mt19937_64 grng(o.seed ^ 0x6A09E667F3BCC909ull);
    m.groups.resize(o.layers);
    for (uint32_t l = 0; l < o.layers; ++l) {
      std::vector<int> perm(o.experts);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), grng);
      for (uint32_t g = 0; g < o.experts / o.group_size; ++g)
        m.groups[l].emplace_back(perm.begin() + g * o.group_size, perm.begin() + (g + 1) * o.group_size);
    }
  }
  return m;
}

Status CheckOptions(const TraceOptions& o) {
  if (o.affinity < 0 || o.affinity > 1)
    return InvalidArgument("affinity " + std::to_string(o.affinity) + " outside [0, 1]");
  if (o.skew < 0) return InvalidArgument("skew " + std::to_string(o.skew) + " is negative");
  if (o.model == TraceModel::kCoactivationGroups &&
      (o.group_size == 0 || o.group_size > o.experts || o.experts % o.group_size != 0))
    return InvalidArgument("group_size " + std::to_string(o.group_size) + " must divide experts " +
                           std::to_string(o.experts));
  return RoutingTrace{o.tokens, o.layers, o.topk, o.experts, {}}.ValidateShape();
}

}  // namespace

const char* TraceModelName(TraceModel model) {
  switch (model) {
    case TraceModel::kSuccessorChain:
      return "chain";
    case TraceModel::kCoactivationGroups:
      return "groups";
    case TraceModel::kPopularity:
      return "popularity";
  }
  return "?";
}

Result<TraceModel> ParseTraceModel(const std::string& name) {
  for (TraceModel m : {TraceModel::kSuccessorChain, TraceModel::kCoactivationGroups, TraceModel::kPopularity})
    if (name == TraceModelName(m)) return m;
  return InvalidArgument("trace model '" + name + "' is not one of chain, groups, popularity");
}

Result<RoutingTrace> GenerateTrace(const TraceOptions& o) {
  TE_RETURN_IF_ERROR(CheckOptions(o));
  const Model m = BuildModel(o);
  RoutingTrace t;
  t.tokens = o.tokens;
  t.layers = o.layers;
  t.topk = o.topk;
  t.experts = o.experts;
  t.ids.assign(size_t(o.tokens) * o.layers * o.topk, -1);
  std::vector<std::discrete_distribution<int>> popularity;
  for (const auto& w : m.popularity) popularity.emplace_back(w.begin(), w.end());
  // Per layer and group: popularity among the group's experts.
  std::vector<std::vector<std::discrete_distribution<int>>> in_group(m.groups.size());
  for (size_t l = 0; l < m.groups.size(); ++l)
    for (const auto& g : m.groups[l]) {
      std::vector<double> w;
      for (int e : g) w.push_back(m.popularity[l][e]);
      in_group[l].emplace_back(w.begin(), w.end());
    }
  // Tokens come from their own stream, so two sample seeds give two
  // independent traces of the same model.
  std::mt19937_64 rng(o.seed * 0x9E3779B97F4A7C15ull + o.sample_seed + 1);
  std::uniform_real_distribution<double> coin(0, 1);
  std::vector<int> chosen;
  auto taken = [&](int e) { return std::find(chosen.begin(), chosen.end(), e) != chosen.end(); };
  const uint32_t group_count = o.model == TraceModel::kCoactivationGroups ? o.experts / o.group_size : 0;
  for (uint32_t tok = 0; tok < o.tokens; ++tok) {
    // The token's latent group, for all layers (drawn only by that model, so
    // the other models' traces do not depend on it).
    const uint32_t group = group_count > 0 ? uint32_t(rng() % group_count) : 0;
    for (uint32_t l = 0; l < o.layers; ++l) {
      chosen.clear();
      for (uint32_t k = 0; k < o.topk; ++k) {
        int e = -1;
        if (o.model == TraceModel::kSuccessorChain && l > 0 && coin(rng) < o.affinity) {
          e = m.successor[l - 1][t.at(tok, l - 1, k)];
        } else if (o.model == TraceModel::kCoactivationGroups && coin(rng) < o.affinity) {
          // A few tries, then popularity: a group smaller than top-k runs out.
          for (int tries = 0; tries < 16 && (e < 0 || taken(e)); ++tries)
            e = m.groups[l][group][in_group[l][group](rng)];
        }
        while (e < 0 || taken(e)) e = popularity[l](rng);
        chosen.push_back(e);
        t.at(tok, l, k) = int16_t(e);
      }
    }
  }
  return t;
}

Result<Placement> OraclePlacement(const TraceOptions& o, uint32_t ranks, uint32_t nodes, bool follow_top1) {
  TE_RETURN_IF_ERROR(CheckOptions(o));
  TE_RETURN_IF_ERROR(CheckShape(o.experts, ranks, nodes));
  const Model m = BuildModel(o);
  Placement p = RoundRobinPlacement(o.layers, o.experts, ranks);
  const uint32_t per_rank = PrimarySlots(o.experts, ranks);
  if (o.model == TraceModel::kCoactivationGroups) {
    // Groups one after another; ranks of a node are consecutive.
    for (uint32_t l = 0; l < o.layers; ++l) {
      uint32_t slot = 0;
      for (const auto& g : m.groups[l])
        for (int e : g) p.rank_of[l][e] = slot++ / per_rank;
    }
  } else if (o.model == TraceModel::kSuccessorChain && follow_top1) {
    for (uint32_t l = 0; l + 1 < o.layers; ++l)
      for (uint32_t e = 0; e < o.experts; ++e) p.rank_of[l + 1][m.successor[l][e]] = p.rank_of[l][e];
  }
  TE_RETURN_IF_ERROR(p.Validate());
  return p;
}

}  // namespace te::moe
