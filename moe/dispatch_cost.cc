#include "moe/dispatch_cost.h"

#include <algorithm>
#include <string>

namespace te::moe {

const char* TokenHomeName(TokenHome home) { return home == TokenHome::kSource ? "source" : "top1"; }

Result<TokenHome> ParseTokenHome(const std::string& name) {
  for (TokenHome h : {TokenHome::kSource, TokenHome::kTop1})
    if (name == TokenHomeName(h)) return h;
  return InvalidArgument("token home '" + name + "' is not one of source, top1");
}

RecordCount DispatchCost::total() const {
  RecordCount sum;
  for (const auto& l : layers) {
    sum.rank += l.rank, sum.node += l.node, sum.relayed += l.relayed;
    sum.away_from_source += l.away_from_source;
    sum.merged += l.merged, sum.merged_node += l.merged_node;
  }
  return sum;
}

double DispatchCost::rank_per_token_layer() const {
  return layers.empty() || tokens == 0 ? 0 : double(total().rank) / (double(tokens) * layers.size());
}

double DispatchCost::node_per_token_layer() const {
  return layers.empty() || tokens == 0 ? 0 : double(total().node) / (double(tokens) * layers.size());
}

double DispatchCost::max_rank_imbalance() const {
  double worst = 0;
  for (const auto& per : rank_load) {
    uint64_t total = 0, top = 0;
    for (uint64_t v : per) total += v, top = std::max(top, v);
    if (total) worst = std::max(worst, double(top) * double(per.size()) / double(total));
  }
  return worst;
}

double DispatchCost::max_node_imbalance(uint32_t nodes) const {
  double worst = 0;
  for (const auto& per : rank_load) {
    if (nodes == 0 || per.size() % nodes) return 0;
    std::vector<uint64_t> node(nodes, 0);
    uint64_t total = 0;
    for (size_t r = 0; r < per.size(); ++r) node[r / (per.size() / nodes)] += per[r], total += per[r];
    if (total) worst = std::max(worst, double(*std::max_element(node.begin(), node.end())) * nodes / double(total));
  }
  return worst;
}

namespace {

// ExpertMap::TokenKey of token tok's row at layer l, as a dispatcher computes
// it from the same row.
uint32_t Key(const RoutingTrace& t, uint32_t tok, uint32_t l) {
  return ExpertMap::TokenKey(&t.ids[(size_t(tok) * t.layers + l) * t.topk], t.topk);
}

// Where each slot of token tok goes at layer l from `home` (ExpertMap::Route).
void RouteToken(const RoutingTrace& t, const ExpertMap& map, uint32_t tok, uint32_t l, uint32_t home, uint32_t* dest) {
  map.Route(&t.ids[(size_t(tok) * t.layers + l) * t.topk], t.topk, home, Key(t, tok, l), dest);
}

// Homes of every token at `layer`, given the maps of the layers before it.
std::vector<uint32_t> Homes(const RoutingTrace& t, const std::vector<ExpertMap>& maps, uint32_t ranks, TokenHome home,
                            uint32_t layer) {
  std::vector<uint32_t> homes(t.tokens), dest(t.topk);
  for (uint32_t tok = 0; tok < t.tokens; ++tok) {
    uint32_t h = tok % ranks;
    if (home == TokenHome::kTop1)
      for (uint32_t l = 0; l < layer; ++l)
        if (t.at(tok, l, 0) >= 0) RouteToken(t, maps[l], tok, l, h, dest.data()), h = dest[0];
    homes[tok] = h;
  }
  return homes;
}

Result<std::vector<ExpertMap>> Maps(const Placement& p, uint32_t nodes, uint32_t layers) {
  std::vector<ExpertMap> maps;
  for (uint32_t l = 0; l < layers; ++l) {
    auto m = p.Map(l, nodes);
    if (!m.ok()) return m.status();
    maps.push_back(std::move(m).value());
  }
  return maps;
}

Status CheckFits(const RoutingTrace& t, const Placement& p, const CostOptions& o) {
  if (p.layers != t.layers || p.experts != t.experts)
    return InvalidArgument("placement of " + std::to_string(p.layers) + " layers x " + std::to_string(p.experts) +
                           " experts does not fit a trace of " + std::to_string(t.layers) + " x " +
                           std::to_string(t.experts));
  return CheckShape(p.experts, p.ranks, o.nodes);
}

// Layer l's records and loads from `homes`; with kTop1, homes become the
// next layer's.
void CountLayer(const RoutingTrace& t, const ExpertMap& map, uint32_t l, const CostOptions& o,
                std::vector<uint32_t>* homes, RecordCount* c, std::vector<uint64_t>* rank_load) {
  const uint32_t R = map.ranks(), per_node = R / o.nodes;
  std::vector<uint32_t> rank_seen(R, UINT32_MAX), node_seen(o.nodes, UINT32_MAX), dest(t.topk);
  for (uint32_t tok = 0; tok < t.tokens; ++tok) {
    const uint32_t home = (*homes)[tok], home_node = home / per_node;
    c->away_from_source += home != tok % R;
    rank_seen[home] = tok;  // nothing goes to the own rank
    node_seen[home_node] = tok;
    RouteToken(t, map, tok, l, home, dest.data());
    for (uint32_t k = 0; k < t.topk; ++k) {
      if (t.at(tok, l, k) < 0) continue;
      const uint32_t r = dest[k], node = r / per_node;
      (*rank_load)[r]++;
      if (rank_seen[r] == tok) continue;
      rank_seen[r] = tok;
      c->rank++;
      const uint32_t relay = node == home_node ? home : node * per_node + home % per_node;
      if (o.hierarchical) c->relayed += r != relay;  // forwarded inside the node
      if (node == home_node) continue;
      if (!o.hierarchical) {
        c->node++;
      } else if (node_seen[node] != tok) {
        node_seen[node] = tok;
        c->node++;
        c->relayed++;  // to the node's relay
      }
    }
  }
  if (o.home != TokenHome::kTop1) return;
  std::fill(rank_seen.begin(), rank_seen.end(), UINT32_MAX);
  for (uint32_t tok = 0; tok < t.tokens; ++tok) {
    const uint32_t from = (*homes)[tok];
    RouteToken(t, map, tok, l, from, dest.data());
    if (t.at(tok, l, 0) >= 0) (*homes)[tok] = dest[0];
    const uint32_t merge = (*homes)[tok];
    rank_seen[merge] = tok;  // the merge rank's own partial stays
    for (uint32_t k = 0; k < t.topk; ++k) {
      if (t.at(tok, l, k) < 0) continue;
      const uint32_t r = dest[k];
      if (rank_seen[r] == tok) continue;
      rank_seen[r] = tok;
      c->merged++;
      c->merged_node += r / per_node != merge / per_node;
    }
  }
}

}  // namespace

std::vector<uint32_t> TokenHomes(const RoutingTrace& t, const Placement& p, TokenHome home, uint32_t layer,
                                 uint32_t nodes) {
  auto maps = Maps(p, nodes, home == TokenHome::kTop1 ? layer : 0);
  if (!maps.ok()) return std::vector<uint32_t>(t.tokens, 0);  // an invalid placement has no homes
  return Homes(t, maps.value(), p.ranks, home, layer);
}

Result<DispatchCost> CountRecords(const RoutingTrace& t, const Placement& p, const CostOptions& o) {
  TE_RETURN_IF_ERROR(CheckFits(t, p, o));
  auto maps_or = Maps(p, o.nodes, t.layers);
  if (!maps_or.ok()) return maps_or.status();
  DispatchCost cost;
  cost.tokens = t.tokens;
  cost.layers.resize(t.layers);
  cost.rank_load.assign(t.layers, std::vector<uint64_t>(p.ranks, 0));
  std::vector<uint32_t> homes(t.tokens);
  for (uint32_t tok = 0; tok < t.tokens; ++tok) homes[tok] = tok % p.ranks;
  for (uint32_t l = 0; l < t.layers; ++l)
    CountLayer(t, maps_or.value()[l], l, o, &homes, &cost.layers[l], &cost.rank_load[l]);
  return cost;
}

void AdvanceHomes(const RoutingTrace& t, const ExpertMap& map, uint32_t layer, std::vector<uint32_t>* homes) {
  std::vector<uint32_t> dest(t.topk);
  for (uint32_t tok = 0; tok < t.tokens && tok < homes->size(); ++tok)
    if (t.at(tok, layer, 0) >= 0) RouteToken(t, map, tok, layer, (*homes)[tok], dest.data()), (*homes)[tok] = dest[0];
}

Result<RecordCount> CountLayerRecords(const RoutingTrace& t, const Placement& p, const CostOptions& o, uint32_t layer,
                                      std::vector<uint64_t>* rank_load, const std::vector<uint32_t>* given) {
  TE_RETURN_IF_ERROR(CheckFits(t, p, o));
  if (layer >= t.layers)
    return InvalidArgument("layer " + std::to_string(layer) + " outside [0, " + std::to_string(t.layers) + ")");
  auto map = p.Map(layer, o.nodes);
  if (!map.ok()) return map.status();
  if (given && given->size() != t.tokens)
    return InvalidArgument("homes for " + std::to_string(given->size()) + " tokens; the trace has " +
                           std::to_string(t.tokens));
  if (given)
    for (uint32_t h : *given)
      if (h >= p.ranks)
        return InvalidArgument("home rank " + std::to_string(h) + " outside [0, " + std::to_string(p.ranks) + ")");
  std::vector<uint32_t> homes = given ? *given : TokenHomes(t, p, o.home, layer, o.nodes);
  RecordCount c;
  std::vector<uint64_t> load(p.ranks, 0);
  CountLayer(t, map.value(), layer, o, &homes, &c, &load);
  if (rank_load) *rank_load = std::move(load);
  return c;
}

}  // namespace te::moe
