#include "moe/placement_file.h"

#include <algorithm>
#include <fstream>
#include <sstream>
#include <string_view>

#include "base/checked_math.h"

namespace te::moe {

Status WritePlacementCsv(const Placement& p, const std::string& path) {
  std::ofstream out(path);
  out << "layer,expert,rank\n";
  for (uint32_t l = 0; l < p.layers; ++l)
    for (uint32_t e = 0; e < p.experts; ++e)
      for (uint32_t r : p.RanksOf(l, e)) out << l << "," << e << "," << r << "\n";
  for (uint32_t l = 0; l < p.splits.size(); ++l)
    for (const TokenSplit& x : p.splits[l])
      out << l << "," << x.expert << "," << x.rank << "," << x.source << "," << x.share << "\n";
  for (uint32_t l = 0; l < p.choice.size(); ++l)
    if (p.choice[l] != ReplicaChoice::kBySource) out << l << "," << int(p.choice[l]) << "\n";
  out.flush();
  if (!out) return IoError("cannot write placement to '" + path + "'");
  return Status::Ok();
}

Result<Placement> ParsePlacementCsv(const std::string& text, uint32_t layers, uint32_t experts, uint32_t ranks) {
  if (layers == 0 || experts == 0 || ranks == 0)
    return InvalidArgument("placement shape " + std::to_string(layers) + " x " + std::to_string(experts) + " over " +
                           std::to_string(ranks) + " ranks has a zero");
  Placement p{layers, experts, ranks, {}, {}, {}, {}};
  p.rank_of.assign(layers, std::vector<uint32_t>(experts, UINT32_MAX));
  std::istringstream in(text);
  std::string line;
  if (!std::getline(in, line) || line != "layer,expert,rank")
    return InvalidArgument("placement CSV must start with the header 'layer,expert,rank'");
  for (size_t number = 2; std::getline(in, line); ++number) {
    if (line.empty()) continue;
    const auto bad = [&](const std::string& why) {
      return InvalidArgument("placement line " + std::to_string(number) + " '" + line.substr(0, 64) + "': " + why);
    };
    const size_t fields = size_t(std::count(line.begin(), line.end(), ',')) + 1;
    if (fields != 2 && fields != 3 && fields != 5)
      return bad("expected layer,expert,rank or layer,expert,rank,source,share or layer,choice");
    std::string_view rest(line);
    uint64_t v[5];
    for (size_t i = 0; i < fields; ++i) {
      const size_t comma = i + 1 < fields ? rest.find(',') : rest.size();
      const auto n = ParseUint64(rest.substr(0, comma));
      if (!n) return bad("'" + std::string(rest.substr(0, comma)) + "' is not a number");
      v[i] = *n;
      rest = comma < rest.size() ? rest.substr(comma + 1) : std::string_view();
    }
    if (v[0] >= layers) return bad("layer outside [0, " + std::to_string(layers) + ")");
    if (fields == 2) {
      // The layer's replica choice (ExpertMap's ReplicaChoice).
      if (v[1] > uint64_t(ReplicaChoice::kReachedRank))
        return bad("replica choice is not 0 (by source), 1 (reached node) or 2 (reached rank)");
      if (p.choice.empty()) p.choice.assign(layers, ReplicaChoice::kBySource);
      p.choice[v[0]] = ReplicaChoice(v[1]);
      continue;
    }
    if (v[1] >= experts) return bad("expert outside [0, " + std::to_string(experts) + ")");
    if (v[2] >= ranks) return bad("rank outside [0, " + std::to_string(ranks) + ")");
    if (fields == 5) {
      // A token split: checked against the layer's copies once all are read.
      if (v[3] >= ranks) return bad("source outside [0, " + std::to_string(ranks) + ")");
      if (v[4] == 0 || v[4] > ExpertMap::kKeySpace)
        return bad("share outside [1, " + std::to_string(ExpertMap::kKeySpace) + "]");
      if (p.splits.empty()) p.splits.assign(layers, {});
      p.splits[v[0]].push_back({uint32_t(v[1]), uint32_t(v[3]), uint32_t(v[2]), uint32_t(v[4])});
      continue;
    }
    uint32_t& primary = p.rank_of[v[0]][v[1]];
    if (primary == UINT32_MAX) {
      primary = uint32_t(v[2]);
      continue;
    }
    // A later line for the same expert is a replica.
    if (p.replicas.empty()) p.replicas.assign(layers, std::vector<std::vector<uint32_t>>(experts));
    auto& reps = p.replicas[v[0]][v[1]];
    if (primary == v[2] || std::find(reps.begin(), reps.end(), uint32_t(v[2])) != reps.end())
      return bad("expert given twice on one rank");
    if (reps.size() + 1 >= ranks) return bad("more copies than ranks");
    reps.push_back(uint32_t(v[2]));
  }
  for (uint32_t l = 0; l < layers; ++l)
    for (uint32_t e = 0; e < experts; ++e)
      if (p.rank_of[l][e] == UINT32_MAX)
        return InvalidArgument("placement has no rank for layer " + std::to_string(l) + " expert " + std::to_string(e));
  // Splits name ranks holding their expert, and their shares fit.
  for (uint32_t l = 0; l < p.splits.size(); ++l)
    if (!p.splits[l].empty())
      if (auto m = p.Map(l, 1); !m.ok())
        return InvalidArgument("placement token splits of layer " + std::to_string(l) + ": " + m.status().message());
  return p;
}

Result<Placement> ReadPlacementCsv(const std::string& path, uint32_t layers, uint32_t experts, uint32_t ranks) {
  std::ifstream in(path);
  if (!in) return NotFound("cannot open placement '" + path + "'");
  std::stringstream text;
  text << in.rdbuf();
  auto p = ParsePlacementCsv(text.str(), layers, experts, ranks);
  if (!p.ok()) return p.status().WithContext("reading '" + path + "'");
  return p;
}

}  // namespace te::moe
