// te-moe: expert placement from routing traces.
//
//   te-moe gen --out=trace.bin --tokens=8192 --layers=60 --experts=256 --topk=8 --affinity=0.8
//   te-moe place --trace=trace.bin --ranks=64 --nodes=8 [--extra_slots=1] [--json]
//
// `place` compares round-robin, random and affinity-aware placement: cross-
// rank and cross-node hops per token (a token's expert at layer l+1 on a
// rank/node that holds none of its experts at layer l) and per-rank load
// imbalance; with --extra_slots, EPLB-style replication of hot experts.
#include <gflags/gflags.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "moe/placement.h"
#include "moe/routing_trace.h"
#include "tools/tool_support.h"

DEFINE_string(out, "", "gen: trace file to write");
DEFINE_string(trace, "", "place: trace file to read");
DEFINE_uint32(tokens, 8192, "gen: tokens");
DEFINE_uint32(layers, 16, "gen: MoE layers");
DEFINE_uint32(experts, 64, "gen: experts per layer");
DEFINE_uint32(topk, 8, "gen: experts per token");
DEFINE_double(affinity, 0.8, "gen: probability a token follows its expert's planted successor");
DEFINE_double(skew, 0.5, "gen: Zipf exponent of expert popularity");
DEFINE_uint64(seed, 1, "gen: seed of the model (popularity, planted successors); place: seed of the random baseline");
DEFINE_uint64(sample_seed, 0, "gen: which tokens are drawn from the model (another value gives a held-out trace)");
DEFINE_string(eval_trace, "", "place: judge placements on this (held-out) trace instead of --trace");
DEFINE_uint32(ranks, 8, "place: EP ranks");
DEFINE_uint32(nodes, 1, "place: nodes the ranks are split into");
DEFINE_double(load_slack, 0.25, "place: rank load cap is (1 + slack) x mean, where feasible");
DEFINE_uint32(extra_slots, 0, "place: extra expert slots per rank for replication (EPLB)");
DEFINE_string(placement_out, "", "place: write the affinity placement (layer, expert, rank) as CSV");
DEFINE_bool(json, false, "Print JSON");

namespace {

using te::tools::Die;

int Gen() {
  if (FLAGS_out.empty()) Die("gen needs --out=FILE");
  te::moe::TraceOptions o{FLAGS_tokens,   FLAGS_layers, FLAGS_topk, FLAGS_experts,
                          FLAGS_affinity, FLAGS_skew,   FLAGS_seed, FLAGS_sample_seed};
  auto t = te::moe::GenerateTrace(o);
  if (!t.ok()) Die(t.status().ToString());
  auto st = te::moe::WriteTrace(t.value(), FLAGS_out);
  if (!st.ok()) Die(st.ToString());
  printf("wrote %s: %u tokens x %u layers x top-%u of %u experts (affinity %.2f, skew %.2f)\n", FLAGS_out.c_str(),
         o.tokens, o.layers, o.topk, o.experts, o.affinity, o.skew);
  return 0;
}

int Place() {
  if (FLAGS_trace.empty()) Die("place needs --trace=FILE (make one with te-moe gen)");
  auto trace = te::moe::ReadTrace(FLAGS_trace);
  if (!trace.ok()) Die(trace.status().ToString());
  const auto& t = trace.value();
  te::moe::RoutingTrace eval_trace;
  if (!FLAGS_eval_trace.empty()) {
    auto e = te::moe::ReadTrace(FLAGS_eval_trace);
    if (!e.ok()) Die(e.status().ToString());
    eval_trace = std::move(e).value();
    if (eval_trace.layers != t.layers || eval_trace.experts != t.experts)
      Die("--eval_trace has " + std::to_string(eval_trace.layers) + " layers x " + std::to_string(eval_trace.experts) +
          " experts; --trace has " + std::to_string(t.layers) + " x " + std::to_string(t.experts));
  }
  const auto& judged = FLAGS_eval_trace.empty() ? t : eval_trace;
  if (auto st = te::moe::CheckShape(t.experts, FLAGS_ranks, FLAGS_nodes); !st.ok()) Die(st.ToString());
  if (auto st = te::moe::ExpertAffinity::CheckSize(t.layers, t.experts); !st.ok()) Die(st.ToString());
  const auto t0 = std::chrono::steady_clock::now();
  const auto affinity = te::moe::ExpertAffinity::FromTrace(t);
  te::moe::PlacementOptions po;
  po.nodes = FLAGS_nodes;
  po.load_slack = FLAGS_load_slack;
  auto placed = te::moe::AffinityPlacement(affinity, FLAGS_ranks, po);
  if (!placed.ok()) Die(placed.status().ToString());
  const double solve_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  struct Row {
    const char* name;
    te::moe::PlacementStats s;
  };
  std::vector<Row> rows = {
      {"round-robin", Evaluate(judged, te::moe::RoundRobinPlacement(t.layers, t.experts, FLAGS_ranks), FLAGS_nodes)},
      {"random", Evaluate(judged, te::moe::RandomPlacement(t.layers, t.experts, FLAGS_ranks, FLAGS_seed), FLAGS_nodes)},
      {"affinity", Evaluate(judged, placed.value(), FLAGS_nodes)}};
  const double base = rows[0].s.cross_rank_hops_per_token;
  if (!FLAGS_json) {
    printf("trace: %u tokens x %u layers x top-%u of %u experts; %u ranks in %u node(s); solved in %.2f s%s\n",
           t.tokens, t.layers, t.topk, t.experts, FLAGS_ranks, FLAGS_nodes, solve_s,
           FLAGS_eval_trace.empty() ? "" : "; judged on the held-out --eval_trace");
    printf("%-12s %18s %18s %14s %16s\n", "placement", "cross-rank/token", "cross-node/token", "vs round-robin",
           "load imbalance");
  }
  for (const auto& r : rows) {
    const double reduction = base > 0 ? 1.0 - r.s.cross_rank_hops_per_token / base : 0;
    if (FLAGS_json)
      printf(
          "{\"placement\":\"%s\",\"ranks\":%u,\"nodes\":%u,\"cross_rank_hops_per_token\":%.3f,"
          "\"cross_node_hops_per_token\":%.3f,\"reduction_vs_round_robin\":%.4f,\"max_load_imbalance\":%.3f,"
          "\"solve_seconds\":%.3f}\n",
          r.name, FLAGS_ranks, FLAGS_nodes, r.s.cross_rank_hops_per_token, r.s.cross_node_hops_per_token, reduction,
          r.s.max_load_imbalance, solve_s);
    else
      printf("%-12s %18.2f %18.2f %13.1f%% %16.3f\n", r.name, r.s.cross_rank_hops_per_token,
             r.s.cross_node_hops_per_token, 100 * reduction, r.s.max_load_imbalance);
  }
  if (FLAGS_extra_slots > 0) {
    double before = 0, after = 0;
    for (uint32_t l = 0; l < t.layers; ++l) {
      before = std::max(before, te::moe::LoadImbalance(affinity.load[l], placed->rank_of[l], FLAGS_ranks));
      auto rep =
          te::moe::ReplicateHotExperts(affinity.load[l], FLAGS_ranks, t.experts / FLAGS_ranks + FLAGS_extra_slots);
      if (!rep.ok()) Die(rep.status().ToString());
      after = std::max(after, rep->imbalance);
    }
    if (FLAGS_json)
      printf("{\"replication_extra_slots\":%u,\"imbalance_before\":%.3f,\"imbalance_after\":%.3f}\n", FLAGS_extra_slots,
             before, after);
    else
      printf("EPLB replication, %u extra slot(s) per rank: worst-layer load imbalance %.3f -> %.3f\n",
             FLAGS_extra_slots, before, after);
  }
  if (!FLAGS_placement_out.empty()) {
    std::ofstream out(FLAGS_placement_out);
    out << "layer,expert,rank\n";
    for (uint32_t l = 0; l < t.layers; ++l)
      for (uint32_t e = 0; e < t.experts; ++e) out << l << "," << e << "," << placed->rank_of[l][e] << "\n";
  }
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
