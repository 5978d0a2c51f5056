// Expert placement from Python (moe/placement_solver.h, moe/dispatch_cost.h,
// moe/placement_file.h).
//
// Routing comes as an integer array [tokens, layers, topk] of expert ids,
// -1 for an empty slot: what a serving or training loop records from its
// router. It is checked (shape, every id in [-1, experts)) and copied once
// into the solver's trace. Solving and counting release the GIL.
#include "py_placement.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "moe/dispatch_cost.h"
#include "moe/expert_map.h"
#include "moe/placement.h"
#include "moe/placement_file.h"
#include "moe/placement_solver.h"
#include "moe/routing_trace.h"
#include "status_error.h"

namespace py = pybind11;
using namespace te::moe;

namespace tepy {
namespace {

using RoutingArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

RoutingTrace TraceOf(const RoutingArray& ids, uint32_t experts) {
  if (ids.ndim() != 3)
    Throw(te::InvalidArgument("routing has " + std::to_string(ids.ndim()) +
                              " dimensions; expected [tokens, layers, topk]"));
  for (py::ssize_t d = 0; d < 3; ++d)
    if (ids.shape(d) <= 0 || uint64_t(ids.shape(d)) > UINT32_MAX)
      Throw(te::InvalidArgument("routing dimension " + std::to_string(d) + " is " + std::to_string(ids.shape(d)) +
                                "; valid range 1.." + std::to_string(UINT32_MAX)));
  RoutingTrace t;
  t.tokens = uint32_t(ids.shape(0));
  t.layers = uint32_t(ids.shape(1));
  t.topk = uint32_t(ids.shape(2));
  t.experts = experts;
  Check(t.ValidateShape());  // experts <= 32767, topk <= experts, a bounded total
  const int64_t* p = ids.data();
  const size_t n = size_t(ids.size());
  t.ids.resize(n);
  for (size_t i = 0; i < n; ++i) {
    if (p[i] < -1 || p[i] >= int64_t(experts))
      Throw(te::InvalidArgument("routing id " + std::to_string(p[i]) + " at flat index " + std::to_string(i) +
                                " outside [-1, " + std::to_string(experts) + ")"));
    t.ids[i] = int16_t(p[i]);
  }
  return t;
}

TokenHome HomeOf(const std::string& name) { return Unwrap(ParseTokenHome(name)); }

void CheckLayer(const Placement& p, uint32_t layer) {
  if (layer >= p.layers)
    Throw(te::InvalidArgument("layer " + std::to_string(layer) + " outside [0, " + std::to_string(p.layers) + ")"));
}

}  // namespace

void BindPlacement(py::module_& m) {
  py::class_<Placement>(m, "Placement",
                        "Each layer's experts on ranks (primaries, replicas, token splits): moe/placement.h.")
      .def_static(
          "round_robin",
          [](uint32_t layers, uint32_t experts, uint32_t ranks) {
            if (layers == 0) Throw(te::InvalidArgument("a placement needs at least one layer"));
            Placement p = RoundRobinPlacement(layers, experts, ranks);
            Check(p.Validate());  // ranks > 0
            return p;
          },
          py::arg("layers"), py::arg("experts"), py::arg("ranks"), "Expert e of every layer on rank e % ranks.")
      .def_static(
          "read_csv",
          [](const std::string& path, uint32_t layers, uint32_t experts, uint32_t ranks) {
            return Unwrap(ReadPlacementCsv(path, layers, experts, ranks));
          },
          py::arg("path"), py::arg("layers"), py::arg("experts"), py::arg("ranks"),
          "A placement written by write_csv or `te-moe place --placement_out`, checked.")
      .def(
          "write_csv", [](const Placement& p, const std::string& path) { Check(WritePlacementCsv(p, path)); },
          py::arg("path"), "layer,expert,rank lines (a later line for an expert is a replica), then token splits.")
      .def_readonly("layers", &Placement::layers)
      .def_readonly("experts", &Placement::experts)
      .def_readonly("ranks", &Placement::ranks)
      .def(
          "ranks_of",
          [](const Placement& p, uint32_t layer, uint32_t expert) {
            CheckLayer(p, layer);
            if (expert >= p.experts)
              Throw(te::InvalidArgument("expert " + std::to_string(expert) + " outside [0, " +
                                        std::to_string(p.experts) + ")"));
            return p.RanksOf(layer, expert);
          },
          py::arg("layer"), py::arg("expert"), "The ranks holding the expert at this layer, primary first.")
      .def(
          "expert_map",
          [](const Placement& p, uint32_t layer, uint32_t nodes) {
            CheckLayer(p, layer);
            return Unwrap(p.Map(layer, nodes));
          },
          py::arg("layer"), py::arg("nodes") = 1,
          "The layer as the ExpertMap dispatch takes (ranks r of node r // (ranks // nodes)).")
      .def(
          "replica_choice",
          [](const Placement& p, uint32_t layer) {
            CheckLayer(p, layer);
            return te::moe::ReplicaChoiceName(layer < p.choice.size() ? p.choice[layer]
                                                                      : te::moe::ReplicaChoice::kBySource);
          },
          py::arg("layer"),
          "How the layer's dispatch chooses among copies: 'source', 'reached_node' or 'reached_rank'.")
      .def("__repr__", [](const Placement& p) {
        size_t copies = 0;
        for (uint32_t l = 0; l < p.layers; ++l)
          for (uint32_t e = 0; e < p.experts; ++e) copies += p.RanksOf(l, e).size() - 1;
        return "<Placement " + std::to_string(p.layers) + " layers x " + std::to_string(p.experts) + " experts on " +
               std::to_string(p.ranks) + " ranks, " + std::to_string(copies) + " replicas>";
      });

  m.def(
      "place_experts",
      [](const RoutingArray& routing, uint32_t experts, uint32_t ranks, uint32_t nodes, uint32_t extra_slots,
         const std::string& home, double load_slack, const std::string& replica_choice) {
        const RoutingTrace t = TraceOf(routing, experts);
        PlacementOptions o;
        o.nodes = nodes;
        o.extra_slots = extra_slots;
        o.home = HomeOf(home);
        o.load_slack = load_slack;
        if (replica_choice != "auto") o.replica_choice = Unwrap(te::moe::ParseReplicaChoice(replica_choice));
        te::Result<Placement> p = [&] {
          py::gil_scoped_release release;
          return PlaceExperts(t, ranks, o);
        }();
        return Unwrap(std::move(p));
      },
      py::arg("routing"), py::arg("experts"), py::arg("ranks"), py::kw_only(), py::arg("nodes") = 1,
      py::arg("extra_slots") = 0, py::arg("home") = "source", py::arg("load_slack") = 0.25,
      py::arg("replica_choice") = "auto",
      "Fits a placement to recorded routing [tokens, layers, topk] (expert ids, -1 empty) so that dispatch and "
      "combine send the fewest records across ranks and nodes under a load cap of (1 + load_slack) x the mean; "
      "extra_slots replica slots per rank for skewed layers (with the slots left free where ranks do not divide "
      "the experts); home 'source' or 'top1' (context-coherent); replica_choice 'auto' (per layer, the best on "
      "the fitted trace), 'source', 'reached_node' or 'reached_rank' (moe/placement_solver.h).");

  m.def(
      "count_records",
      [](const RoutingArray& routing, const Placement& placement, uint32_t nodes, const std::string& home,
         bool hierarchical) {
        const RoutingTrace t = TraceOf(routing, placement.experts);
        const CostOptions o{nodes, HomeOf(home), hierarchical};
        te::Result<DispatchCost> c = [&] {
          py::gil_scoped_release release;
          return CountRecords(t, placement, o);
        }();
        const DispatchCost cost = Unwrap(std::move(c));
        const RecordCount total = cost.total();
        py::dict d;
        d["rank"] = total.rank;
        d["node"] = total.node;
        d["relayed"] = total.relayed;
        d["merged"] = total.merged;
        d["merged_node"] = total.merged_node;
        d["away_from_source"] = total.away_from_source;
        d["max_rank_imbalance"] = cost.max_rank_imbalance();
        d["max_node_imbalance"] = cost.max_node_imbalance(nodes);
        py::list layers;
        for (const RecordCount& l : cost.layers) layers.append(py::make_tuple(l.rank, l.node));
        d["layers"] = layers;
        return d;
      },
      py::arg("routing"), py::arg("placement"), py::kw_only(), py::arg("nodes") = 1, py::arg("home") = "source",
      py::arg("hierarchical") = false,
      "The records dispatch sends for this routing under the placement, counted as the dispatchers send them: "
      "rank (to other ranks), node (of those, between nodes; with hierarchical, one per remote node), relayed, "
      "merged (top1 homes), per-layer (rank, node), and the worst layer's load imbalance per rank and node.");
}

}  // namespace tepy
