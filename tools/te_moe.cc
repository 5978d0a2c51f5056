// te-moe: expert placement from routing traces.
//
//   te-moe gen --out=fit.bin --model=groups --tokens=8192 --layers=32 --experts=256 --topk=8
//   te-moe gen --out=held.bin --model=groups ... --sample_seed=1 --ranks=64 --nodes=8 --oracle_out=oracle.csv
//   te-moe place --trace=fit.bin --eval_trace=held.bin --ranks=64 --nodes=8 --oracle=oracle.csv [--json]
//
// `place` fits a placement to --trace (moe/placement_solver.h) and judges it,
// with round-robin, random and an optional given placement (--oracle), on
// --eval_trace: the records dispatch sends across ranks and across nodes per
// token and layer (moe/dispatch_cost.h; combine returns as many), inter-
// layer hops, and per-rank and per-node load imbalance.
#include <gflags/gflags.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "moe/dispatch_cost.h"
#include "moe/placement.h"
#include "moe/placement_file.h"
#include "moe/placement_solver.h"
#include "moe/routing_trace.h"
#include "moe/trace_generator.h"
#include "tools/tool_support.h"

DEFINE_string(out, "", "gen: trace file to write");
DEFINE_string(trace, "", "place: trace file to fit the placement to");
DEFINE_string(model, "chain",
              "gen: trace model: chain (inter-layer successors), groups (co-activation groups), "
              "popularity (skew only)");
DEFINE_uint32(tokens, 8192, "gen: tokens");
DEFINE_uint32(layers, 16, "gen: MoE layers");
DEFINE_uint32(experts, 64, "gen: experts per layer");
DEFINE_uint32(topk, 8, "gen: experts per token");
DEFINE_double(affinity, 0.8, "gen: chain: P(follow the planted successor); groups: P(draw from the token's group)");
DEFINE_double(skew, 0.5, "gen: Zipf exponent of expert popularity");
DEFINE_uint32(group_size, 16, "gen: groups: experts per co-activation group");
DEFINE_uint64(seed, 1, "gen: seed of the model; place: seed of the random baseline");
DEFINE_uint64(sample_seed, 0, "gen: which tokens are drawn from the model (another value gives a held-out trace)");
DEFINE_string(oracle_out, "",
              "gen: also write the placement the model's structure suggests (--ranks, --nodes, --home)");
DEFINE_string(eval_trace, "", "place: judge placements on this (held-out) trace instead of --trace");
DEFINE_string(oracle, "", "place: also judge this placement CSV (e.g. te-moe gen --oracle_out)");
DEFINE_uint32(ranks, 8, "EP ranks");
DEFINE_uint32(nodes, 1, "nodes the ranks are split into (ranks r of node r / (ranks / nodes))");
DEFINE_string(home, "source",
              "where a token is dispatched from: source (rank t % ranks, the normal mode) or top1 "
              "(its previous top-1 expert's rank, context-coherent)");
DEFINE_double(load_slack, 0.25, "place: node and rank load cap is (1 + slack) x mean, where feasible");
DEFINE_uint32(extra_slots, 0,
              "place: replica slots per rank beyond its ceil(experts / ranks) primary slots (hot experts, placed "
              "by affinity; a skewed layer also fills the primary slots left free)");
DEFINE_string(placement_out, "", "place: write the fitted placement (layer, expert, rank) as CSV");
DEFINE_string(replica_choice, "auto",
              "place: how dispatch picks among copies: auto (per layer, the best on the fitted trace), source, "
              "reached_node, reached_rank (moe/expert_map.h)");
DEFINE_bool(json, false, "Print JSON");

namespace {

using te::tools::Die;
using te::tools::Must;
namespace moe = te::moe;

moe::TokenHome HomeFlag() { return Must(moe::ParseTokenHome(FLAGS_home), "--home"); }

int Gen() {
  if (FLAGS_out.empty()) Die("gen needs --out=FILE");
  const auto model = moe::ParseTraceModel(FLAGS_model);
  if (!model.ok()) Die(model.status().ToString());
  moe::TraceOptions o;
  o.tokens = FLAGS_tokens;
  o.layers = FLAGS_layers;
  o.topk = FLAGS_topk;
  o.experts = FLAGS_experts;
  o.model = model.value();
  o.affinity = FLAGS_affinity;
  o.skew = FLAGS_skew;
  o.group_size = FLAGS_group_size;
  o.seed = FLAGS_seed;
  o.sample_seed = FLAGS_sample_seed;
  auto t = moe::GenerateTrace(o);
  if (!t.ok()) Die(t.status().ToString());
  if (auto st = moe::WriteTrace(t.value(), FLAGS_out); !st.ok()) Die(st.ToString());
  printf("wrote %s: %s model, %u tokens x %u layers x top-%u of %u experts (affinity %.2f, skew %.2f)\n",
         FLAGS_out.c_str(), moe::TraceModelName(o.model), o.tokens, o.layers, o.topk, o.experts, o.affinity, o.skew);
  if (!FLAGS_oracle_out.empty()) {
    auto oracle = moe::OraclePlacement(o, FLAGS_ranks, FLAGS_nodes, HomeFlag() == moe::TokenHome::kTop1);
    if (!oracle.ok()) Die(oracle.status().ToString());
    if (auto st = moe::WritePlacementCsv(oracle.value(), FLAGS_oracle_out); !st.ok()) Die(st.ToString());
    printf("wrote %s: the model's own placement on %u ranks in %u node(s)\n", FLAGS_oracle_out.c_str(), FLAGS_ranks,
           FLAGS_nodes);
  }
  return 0;
}

struct Row {
  std::string name;
  moe::DispatchCost flat, hier;
  moe::PlacementStats stats;
};

Row Judge(const std::string& name, const moe::RoutingTrace& t, const moe::Placement& p) {
  const moe::TokenHome home = HomeFlag();
  auto flat = moe::CountRecords(t, p, {FLAGS_nodes, home, false});
  auto hier = moe::CountRecords(t, p, {FLAGS_nodes, home, true});
  if (!flat.ok()) Die(flat.status().ToString());
  if (!hier.ok()) Die(hier.status().ToString());
  return {name, std::move(flat).value(), std::move(hier).value(), moe::Evaluate(t, p, FLAGS_nodes)};
}

double Reduction(double base, double value) { return base > 0 ? 1.0 - value / base : 0.0; }

int Place() {
  if (FLAGS_trace.empty()) Die("place needs --trace=FILE (make one with te-moe gen)");
  auto trace = moe::ReadTrace(FLAGS_trace);
  if (!trace.ok()) Die(trace.status().ToString());
  const auto& t = trace.value();
  moe::RoutingTrace eval_trace;
  if (!FLAGS_eval_trace.empty()) {
    auto e = moe::ReadTrace(FLAGS_eval_trace);
    if (!e.ok()) Die(e.status().ToString());
    eval_trace = std::move(e).value();
    if (eval_trace.layers != t.layers || eval_trace.experts != t.experts)
      Die("--eval_trace has " + std::to_string(eval_trace.layers) + " layers x " + std::to_string(eval_trace.experts) +
          " experts; --trace has " + std::to_string(t.layers) + " x " + std::to_string(t.experts));
  }
  const auto& judged = FLAGS_eval_trace.empty() ? t : eval_trace;
  if (auto st = moe::CheckShape(t.experts, FLAGS_ranks, FLAGS_nodes); !st.ok()) Die(st.ToString());
  moe::PlacementOptions po;
  po.nodes = FLAGS_nodes;
  po.home = HomeFlag();
  po.load_slack = FLAGS_load_slack;
  po.extra_slots = FLAGS_extra_slots;
  if (FLAGS_replica_choice != "auto") {
    auto choice = moe::ParseReplicaChoice(FLAGS_replica_choice);
    if (!choice.ok()) Die("--replica_choice: " + choice.status().message() + " (or auto)");
    po.replica_choice = *choice;
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto placed = moe::PlaceExperts(t, FLAGS_ranks, po);
  if (!placed.ok()) Die(placed.status().ToString());
  const double solve_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // Without replicas, for comparison (the same solver, no extra slots).
  moe::Placement primaries = placed.value();
  if (FLAGS_extra_slots > 0) {
    po.extra_slots = 0;
    auto plain = moe::PlaceExperts(t, FLAGS_ranks, po);
    if (!plain.ok()) Die(plain.status().ToString());
    primaries = std::move(plain).value();
  }

  std::vector<Row> rows;
  rows.push_back(Judge("round-robin", judged, moe::RoundRobinPlacement(t.layers, t.experts, FLAGS_ranks)));
  rows.push_back(Judge("random", judged, moe::RandomPlacement(t.layers, t.experts, FLAGS_ranks, FLAGS_seed)));
  rows.push_back(Judge("solver", judged, primaries));
  if (FLAGS_extra_slots > 0) rows.push_back(Judge("+replicas", judged, placed.value()));
  if (!FLAGS_oracle.empty()) {
    auto oracle = moe::ReadPlacementCsv(FLAGS_oracle, t.layers, t.experts, FLAGS_ranks);
    if (!oracle.ok()) Die(oracle.status().ToString());
    rows.push_back(Judge("oracle", judged, oracle.value()));
  }
  const Row& rr = rows[0];
  const double rr_rank = rr.hier.rank_per_token_layer(), rr_node = rr.hier.node_per_token_layer();
  if (!FLAGS_json) {
    printf("%u tokens x %u layers x top-%u of %u experts; %u ranks in %u node(s); home %s; solved in %.2f s%s\n",
           t.tokens, t.layers, t.topk, t.experts, FLAGS_ranks, FLAGS_nodes, FLAGS_home.c_str(), solve_s,
           FLAGS_eval_trace.empty() ? " (judged on the fitted trace)" : "; judged on the held-out --eval_trace");
    printf("records per token and layer (dispatch; combine returns as many)\n");
    printf("%-12s %10s %8s %10s %8s %10s %10s %9s %9s\n", "placement", "x-rank", "vs rr", "x-node", "vs rr", "x-node",
           "hops", "imbal.", "imbal.");
    printf("%-12s %10s %8s %10s %8s %10s %10s %9s %9s\n", "", "", "", "(hier.)", "", "(flat)", "x-rank", "rank",
           "node");
  }
  for (const auto& r : rows) {
    const double rank = r.hier.rank_per_token_layer(), node = r.hier.node_per_token_layer();
    const double flat_node = r.flat.node_per_token_layer();
    if (FLAGS_json) {
      printf(
          "{\"placement\":\"%s\",\"ranks\":%u,\"nodes\":%u,\"home\":\"%s\",\"tokens\":%u,\"layers\":%u,"
          "\"rank_records\":%llu,\"node_records_hierarchical\":%llu,\"node_records_flat\":%llu,"
          "\"rank_records_per_token_layer\":%.4f,\"node_records_per_token_layer\":%.4f,"
          "\"rank_reduction_vs_round_robin\":%.4f,\"node_reduction_vs_round_robin\":%.4f,"
          "\"cross_rank_hops_per_token\":%.3f,\"max_rank_load_imbalance\":%.3f,\"max_node_load_imbalance\":%.3f,"
          "\"merge_records\":%llu,\"merge_node_records\":%llu,\"solve_seconds\":%.3f}\n",
          r.name.c_str(), FLAGS_ranks, FLAGS_nodes, FLAGS_home.c_str(), judged.tokens, judged.layers,
          (unsigned long long)r.hier.total().rank, (unsigned long long)r.hier.total().node,
          (unsigned long long)r.flat.total().node, rank, node, Reduction(rr_rank, rank), Reduction(rr_node, node),
          r.stats.cross_rank_hops_per_token, r.hier.max_rank_imbalance(), r.hier.max_node_imbalance(FLAGS_nodes),
          (unsigned long long)r.flat.total().merged, (unsigned long long)r.flat.total().merged_node, solve_s);
    } else {
      printf("%-12s %10.3f %7.1f%% %10.3f %7.1f%% %10.3f %10.2f %9.3f %9.3f\n", r.name.c_str(), rank,
             100 * Reduction(rr_rank, rank), node, 100 * Reduction(rr_node, node), flat_node,
             r.stats.cross_rank_hops_per_token, r.hier.max_rank_imbalance(), r.hier.max_node_imbalance(FLAGS_nodes));
    }
  }
  if (po.home == moe::TokenHome::kTop1 && !FLAGS_json) {
    // What context-coherent dispatch needs besides the records: a token away
    // from its source must find its attention context (KV cache) there.
    // Replicated context: every new token's KV goes to the other ranks each
    // step, ranks - 1 copies per token and layer; moved context: the tokens
    // away from their source pull it.
    const auto& solver = rows[2].hier;
    const double away = double(solver.total().away_from_source) / (double(solver.tokens) * solver.layers.size());
    printf(
        "context: %.3f of tokens per layer are away from their source rank (solver); replicated context costs %u "
        "KV copies per token and layer, against the %.3f records per token and layer saved over round-robin\n",
        away, FLAGS_ranks - 1, rr_rank - solver.rank_per_token_layer());
    // Combine merging on the next home (CoherentDispatcher) instead of
    // returning to the dispatching rank.
    const auto& merge = rows[2].flat;
    const double per = double(merge.tokens) * merge.layers.size();
    printf(
        "combine merging on the top-1 rank (CoherentDispatcher): %.3f records per token and layer across ranks, "
        "%.3f across nodes (solver), against %.3f / %.3f returning to the dispatching rank\n",
        double(merge.total().merged) / per, double(merge.total().merged_node) / per, merge.rank_per_token_layer(),
        merge.node_per_token_layer());
  }
  if (!FLAGS_oracle.empty() && !FLAGS_json) {
    // How much of the oracle's saving against round-robin the solver reaches.
    const auto share = [&](const char* what, double rr_v, double solver, double oracle) {
      if (rr_v - oracle > 1e-12)
        printf("solver reaches %.1f%% of the oracle's saving %s\n", 100 * (rr_v - solver) / (rr_v - oracle), what);
      else
        printf("the oracle saves nothing %s against round-robin (no structure to exploit)\n", what);
    };
    share("across ranks", rr_rank, rows[2].hier.rank_per_token_layer(), rows.back().hier.rank_per_token_layer());
    share("across nodes", rr_node, rows[2].hier.node_per_token_layer(), rows.back().hier.node_per_token_layer());
    if (FLAGS_extra_slots > 0) {
      const auto with = [&](const char* what, double rr_v, double rep, double oracle) {
        if (rr_v - oracle > 1e-12)
          printf("with replicas: %.1f%% of the oracle's saving %s\n", 100 * (rr_v - rep) / (rr_v - oracle), what);
      };
      with("across ranks", rr_rank, rows[3].hier.rank_per_token_layer(), rows.back().hier.rank_per_token_layer());
      with("across nodes", rr_node, rows[3].hier.node_per_token_layer(), rows.back().hier.node_per_token_layer());
    }
  }
  if (FLAGS_extra_slots > 0 && !FLAGS_json) {
    const auto& p = placed.value();
    uint32_t replicated = 0, by[3] = {0, 0, 0};
    for (uint32_t l = 0; l < p.layers; ++l) {
      bool any = false;
      for (uint32_t e = 0; e < p.experts && !any; ++e) any = p.RanksOf(l, e).size() > 1;
      replicated += any;
      if (any) by[l < p.choice.size() ? uint32_t(p.choice[l]) : 0]++;
    }
    printf("replicas on %u of %u layers; %u of them route by reached rank, %u by reached node, %u by source\n",
           replicated, p.layers, by[2], by[1], by[0]);
  }
  if (!FLAGS_placement_out.empty())
    if (auto st = moe::WritePlacementCsv(placed.value(), FLAGS_placement_out); !st.ok()) Die(st.ToString());
  return 0;
}

}  // namespace

#ifdef TE_HAVE_MPI
int Bench(int argc, char** argv);  // te_moe_bench.cc
#else
int Bench(int, char**) { Die("bench needs MPI: install libopenmpi-dev (scripts/install-deps.sh) and rebuild"); }
#endif

int main(int argc, char** argv) {
  gflags::SetUsageMessage("te-moe gen|place|bench [flags]");
  const std::vector<std::string> original(argv, argv + argc);
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  if (argc < 2) Die("name a command: gen, place or bench");
  const std::string cmd = argv[1];
  if (cmd == "gen") return Gen();
  if (cmd == "place") return Place();
  if (cmd == "bench") {
    std::vector<char*> args;
    for (const auto& a : original) args.push_back(const_cast<char*>(a.c_str()));
    return Bench(int(args.size()), args.data());
  }
  Die("unknown command '" + cmd + "': use gen, place or bench");
}
