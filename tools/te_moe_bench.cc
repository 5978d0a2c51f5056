// te-moe bench: MoE dispatch/combine latency over the transfer engine
// against the same dispatch/combine built on MPI_Alltoallv, in the same run.
//
//   te-moe bench --ep=2,4,8 [--shapes=large,small] [--payloads=bf16,fp8]
//   te-moe bench --ep=4 --trace=t.bin --placement=p.csv   # routing from a trace
//
// Without MPI around it, `bench` starts itself under mpirun once per EP size
// (one process per rank, on this host). Each rank runs one engine (provider
// --provider, loopback by default) and one EpDispatcher. Both paths pack,
// unpack and reduce with the same code (moe/dispatch_records.h); only the
// transport differs: one-sided writes with immediates, or MPI_Alltoall of the
// counts then MPI_Alltoallv of the records. Every iteration runs both paths,
// which goes first alternating; each phase starts after an MPI barrier and
// its time is the slowest rank's. The first pass over every layer checks
// that both paths give the same expert inputs and the same combined bytes.
#include <gflags/gflags.h>
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "base/checked_math.h"
#include "moe/coherent_dispatcher.h"
#include "moe/dispatch_cost.h"
#include "moe/dispatch_records.h"
#include "moe/ep_dispatcher.h"
#include "moe/hierarchical_dispatcher.h"
#include "moe/ll_dispatcher.h"
#include "moe/numeric_formats.h"
#include "moe/placement.h"
#include "moe/placement_file.h"
#include "moe/routing_trace.h"
#include "moe/synthetic_expert.h"
#include "tools/mpi_allgather.h"
#include "tools/mpi_launch.h"
#include "tools/tool_support.h"
#include "transfer/transfer_engine.h"

DEFINE_string(ep, "2,4", "bench: EP sizes (processes) to run, comma-separated");
DEFINE_string(shapes, "large,small",
              "bench: large = 7168 hidden, 256 experts, top-8; small = 2048 hidden, 64 experts, top-4");
DEFINE_string(payloads, "bf16,fp8", "bench: dispatch payloads");
DEFINE_uint32(bench_tokens, 128, "bench: tokens per rank per layer");
DEFINE_uint32(private_tokens, 0, "bench: private receive slot per source in tokens; 0 = all of them (no overflow)");
DEFINE_uint32(iters, 50, "bench: timed iterations per case and path");
DEFINE_uint32(warmup, 5, "bench: untimed iterations first (the first pass also verifies)");
DEFINE_string(provider, "tcp",
              "bench: engine provider (tcp = tcp;ofi_rxm on lo; shm; local = same host; +local after a NIC provider: "
              "same-host peers bypass it)");
DEFINE_string(progress, "manual", "bench: engine progress: manual (the rank's thread drives it) or thread");
DEFINE_string(bench_trace, "", "bench: routing trace (te-moe gen), replayed from each token's --home rank");
DEFINE_string(placement, "", "bench: placement CSV (te-moe place --placement_out) compared with round-robin");
DEFINE_string(mode, "normal",
              "bench: engine dispatch paths, comma-separated: normal (EpDispatcher), ll (low latency), hier "
              "(HierarchicalDispatcher: node-level deduplication over --nodes), coherent (CoherentDispatcher: combine "
              "merges on the top-1 rank; needs --bench_trace and --home=top1)");
DEFINE_uint32(kv_bytes, 1152,
              "bench, coherent mode: KV-cache bytes per token and layer (DeepSeek-V3's latent: 576 bf16), for the "
              "cost of keeping attention context where tokens now live");
DEFINE_string(mpirun, "mpirun", "bench: the launcher used when not already under MPI");
DEFINE_string(mpi_btl, "",
              "bench: MPI transport; empty matches --provider: tcp -> 'self,tcp' on lo, shm -> 'self,vader'");
DECLARE_bool(json);
DECLARE_string(home);
DECLARE_uint32(nodes);

namespace {

constexpr const char* kTool = "te-moe";
using te::tools::Die;
using te::tools::Must;
using te::tools::Percentile;
namespace moe = te::moe;

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

struct Shape {
  std::string name;
  uint32_t hidden, experts, topk;
};

Shape ShapeNamed(const std::string& name) {
  if (name == "large") return {name, 7168, 256, 8};
  if (name == "small") return {name, 2048, 64, 4};
  Die("unknown shape '" + name + "': use large or small");
}

// ---- The baseline: the same dispatch/combine over MPI_Alltoallv ----
struct MpiPath {
  moe::EpConfig c;
  std::vector<uint8_t> staging, recv;
  std::vector<uint16_t> partials, back;
  moe::SendPlan plan;
  std::vector<int> scount, sdispl, rcount, rdispl;

  explicit MpiPath(const moe::EpConfig& config) : c(config) {
    const size_t rec = moe::RecordBytes(c);
    staging.resize(size_t(c.max_tokens) * std::min(c.topk, c.ranks) * rec);
    recv.resize(size_t(c.ranks) * c.max_tokens * rec);
    partials.resize(size_t(c.ranks) * c.max_tokens * c.hidden);
    back.resize(size_t(c.max_tokens) * std::min(c.topk, c.ranks) * c.hidden);
    scount.resize(c.ranks), sdispl.resize(c.ranks), rcount.resize(c.ranks), rdispl.resize(c.ranks);
  }
  // counts (elements of `unit` bytes) -> byte counts and displacements
  static void Layout(const std::vector<uint32_t>& n, size_t unit, std::vector<int>* count, std::vector<int>* displ) {
    int at = 0;
    for (size_t r = 0; r < n.size(); ++r) {
      (*count)[r] = int(n[r] * unit);
      (*displ)[r] = at;
      at += (*count)[r];
    }
  }
  te::Status Dispatch(const moe::TokenBatch& b, const moe::ExpertMap& map, moe::DispatchResult* out) {
    TE_RETURN_IF_ERROR(moe::ValidateBatch(c, map, b));
    const size_t rec = moe::RecordBytes(c);
    moe::ResetResult(c, map, out);
    moe::PackRecords(c, map, b, staging.data(), &plan, &out->handle);
    std::vector<uint32_t> incoming(c.ranks);
    MPI_Alltoall(plan.per_rank.data(), 1, MPI_UINT32_T, incoming.data(), 1, MPI_UINT32_T, MPI_COMM_WORLD);
    Layout(plan.per_rank, rec, &scount, &sdispl);
    Layout(incoming, rec, &rcount, &rdispl);
    MPI_Alltoallv(staging.data(), scount.data(), sdispl.data(), MPI_BYTE, recv.data(), rcount.data(), rdispl.data(),
                  MPI_BYTE, MPI_COMM_WORLD);
    for (uint32_t s = 0; s < c.ranks; ++s)
      TE_RETURN_IF_ERROR(moe::UnpackRecords(c, s, recv.data() + rdispl[s], incoming[s], out));
    return te::Status::Ok();
  }
  te::Status Combine(const moe::ExpertOutputs& outputs, const moe::DispatchResult& d, uint16_t* out) {
    TE_RETURN_IF_ERROR(moe::ValidateOutputs(d, outputs));
    const auto& h = d.handle;
    uint32_t rows = 0;
    for (uint32_t n : h.recv_from) rows += n;
    moe::ReduceRows(c, h, outputs, 0, rows, partials.data());
    const size_t row = size_t(c.hidden) * 2;
    Layout(h.recv_from, row, &scount, &sdispl);
    Layout(h.sent_to, row, &rcount, &rdispl);
    MPI_Alltoallv(partials.data(), scount.data(), sdispl.data(), MPI_BYTE, back.data(), rcount.data(), rdispl.data(),
                  MPI_BYTE, MPI_COMM_WORLD);
    moe::SumPartials(c, h, back.data(), out);
    return te::Status::Ok();
  }
};

// ---- Inputs ----
struct Layer {
  moe::ExpertMap map;
  std::vector<uint8_t> data;
  std::vector<float> scales, weights;
  std::vector<int32_t> idx;
  std::vector<uint32_t> ids;  // trace tokens
  uint32_t tokens = 0;
  // Synthetic expert outputs, per local expert, for the rows as each path
  // delivered them (the hierarchical path orders them by relay).
  std::vector<std::vector<uint16_t>> outputs, mpi_outputs;
  moe::TokenBatch view() const {
    return {tokens, data.data(), scales.empty() ? nullptr : scales.data(), idx.data(), weights.data()};
  }
};

void FillTokens(const moe::EpConfig& c, std::mt19937_64& rng, Layer* l) {
  l->data.resize(size_t(l->tokens) * c.token_bytes());
  if (c.payload == moe::Payload::kBf16) {
    for (size_t i = 0; i < size_t(l->tokens) * c.hidden; ++i) {
      uint16_t v = moe::FloatToBf16(float(int(rng() % 2001) - 1000) / 256.0f);
      memcpy(&l->data[i * 2], &v, 2);
    }
  } else {
    for (auto& x : l->data) x = moe::FloatToFp8E4M3(float(int(rng() % 801) - 400) / 64.0f);
    l->scales.resize(size_t(l->tokens) * c.scale_count());
    for (auto& s : l->scales) s = float(1 + rng() % 16) / 8.0f;
  }
  l->weights.resize(size_t(l->tokens) * c.topk);
  for (auto& w : l->weights) w = float(1 + rng() % 64) / 64.0f;
}

// Uniform routing: top-k distinct experts per token, experts contiguous on ranks.
std::vector<Layer> RandomLayers(const moe::EpConfig& c, uint32_t count) {
  std::vector<Layer> layers;
  for (uint32_t l = 0; l < count; ++l) {
    std::mt19937_64 rng(1000 * l + c.rank + 1);
    Layer x{Must(moe::ExpertMap::Contiguous(c.experts, c.ranks), "expert map")};
    x.tokens = c.max_tokens;
    FillTokens(c, rng, &x);
    std::vector<uint32_t> perm(c.experts);
    for (uint32_t t = 0; t < x.tokens; ++t) {
      for (uint32_t e = 0; e < c.experts; ++e) perm[e] = e;
      for (uint32_t k = 0; k < c.topk; ++k) {
        std::swap(perm[k], perm[k + rng() % (c.experts - k)]);
        x.idx.push_back(int32_t(perm[k]));
      }
    }
    layers.push_back(std::move(x));
  }
  return layers;
}

// The first bench_tokens x ranks tokens of a trace: what the bench replays.
moe::RoutingTrace ReplayedTokens(const moe::EpConfig& c, const moe::RoutingTrace& t) {
  moe::RoutingTrace used = t;
  used.tokens = std::min(t.tokens, FLAGS_bench_tokens * c.ranks);
  used.ids.resize(size_t(used.tokens) * t.layers * t.topk);
  return used;
}

moe::TokenHome HomeFlag() { return Must(moe::ParseTokenHome(FLAGS_home), "--home"); }

// Trace routing: token t is dispatched from its home rank (moe/dispatch_cost.h:
// rank t % ranks, or with --home=top1 its previous top-1 expert's rank).
std::vector<Layer> TraceLayers(const moe::EpConfig& c, const moe::RoutingTrace& used, const moe::Placement& p) {
  std::vector<Layer> layers;
  for (uint32_t l = 0; l < used.layers; ++l) {
    std::mt19937_64 rng(1000 * l + c.rank + 1);
    Layer x{Must(p.Map(l, FLAGS_nodes), "expert map")};
    const auto homes = moe::TokenHomes(used, p, HomeFlag(), l, FLAGS_nodes);
    for (uint32_t i = 0; i < used.tokens; ++i)
      if (homes[i] == c.rank) {
        x.ids.push_back(i);
        for (uint32_t k = 0; k < c.topk; ++k) x.idx.push_back(used.at(i, l, k));
      }
    x.tokens = uint32_t(x.idx.size() / c.topk);
    FillTokens(c, rng, &x);
    layers.push_back(std::move(x));
  }
  return layers;
}

// The btl list mpirun was given (it exports MCA settings to the ranks).
std::string MpiTransport() {
  const char* btl = getenv("OMPI_MCA_btl");
  return btl ? btl : "default";
}

enum class Mode { kNormal, kLowLatency, kHierarchical, kCoherent };

const char* ModeSuffix(Mode m) {
  return m == Mode::kLowLatency ? " ll" : m == Mode::kHierarchical ? " hier" : m == Mode::kCoherent ? " coh" : "";
}

// The coherent path's check: every token merged here, against the MPI path's
// combined output at the rank that dispatched it (gathered from all ranks).
// ids[r]: rank r's tokens at this layer, ascending.
uint64_t MergedMismatches(const moe::EpConfig& c, const moe::MergedTokens& merged, const std::vector<uint16_t>& mpi_out,
                          const std::vector<std::vector<uint32_t>>& ids, uint64_t expected) {
  std::vector<int> counts(c.ranks), displs(c.ranks);
  int at = 0;
  for (uint32_t r = 0; r < c.ranks; ++r) counts[r] = int(ids[r].size() * c.hidden), displs[r] = at, at += counts[r];
  std::vector<uint16_t> all(static_cast<size_t>(at));
  MPI_Allgatherv(mpi_out.data(), counts[c.rank], MPI_UINT16_T, all.data(), counts.data(), displs.data(), MPI_UINT16_T,
                 MPI_COMM_WORLD);
  uint64_t bad = merged.count != expected;
  for (uint32_t k = 0; k < merged.count && !bad; ++k) {
    const auto& from = ids.at(merged.from_rank[k]);
    const auto it = std::lower_bound(from.begin(), from.end(), merged.ids[k]);
    if (it == from.end() || *it != merged.ids[k]) return bad + 1;
    const size_t row = size_t(displs[merged.from_rank[k]]) + size_t(it - from.begin()) * c.hidden;
    const size_t bytes = size_t(c.hidden) * 2;
    bad += row + c.hidden > all.size() || memcmp(&merged.data[size_t(k) * c.hidden], &all[row], bytes) != 0;
  }
  return bad;
}

// The hierarchical path delivers an expert's tokens grouped by relay: the
// same rows as the flat path, in another order.
std::vector<std::vector<uint8_t>> SortedRows(const moe::EpConfig& c, const moe::ExpertTokens& x) {
  std::vector<std::vector<uint8_t>> rows;
  const size_t tb = c.token_bytes();
  for (uint32_t i = 0; i < x.count; ++i) {
    rows.emplace_back(x.data.begin() + i * tb, x.data.begin() + (i + 1) * tb);
    const auto* w = reinterpret_cast<const uint8_t*>(&x.weights[i]);
    rows.back().insert(rows.back().end(), w, w + sizeof(float));
  }
  // Rows are all tb + 4 bytes: order them by their bytes. (std::sort's
  // default vector comparison trips a false -Wstringop-overread in g++ 12.)
  std::sort(rows.begin(), rows.end(),
            [](const auto& a, const auto& b) { return std::memcmp(a.data(), b.data(), a.size()) < 0; });
  return rows;
}

// What the hierarchical path must return, from the MPI path's partial rows
// (one per token and destination rank, rank order): each node's rank
// partials summed in rank order into a bf16 node partial, then the node
// partials in node order (HierarchicalDispatcher's arithmetic).
std::vector<uint16_t> SumByNode(const moe::EpConfig& c, const moe::DispatchHandle& h, const uint16_t* rows,
                                uint32_t per_node) {
  std::vector<uint32_t> first(c.ranks + 1, 0);  // rows of rank r: [first[r], first[r + 1])
  for (uint32_t r = 0; r < c.ranks; ++r) first[r + 1] = first[r] + h.sent_to[r];
  std::vector<uint16_t> out(size_t(h.tokens) * c.hidden, 0);
  std::vector<float> total(c.hidden), node(c.hidden);
  for (uint32_t t = 0; t < h.tokens; ++t) {
    std::fill(total.begin(), total.end(), 0.0f);
    std::fill(node.begin(), node.end(), 0.0f);
    uint32_t node_of = UINT32_MAX;
    auto flush = [&] {
      if (node_of == UINT32_MAX) return;
      for (uint32_t j = 0; j < c.hidden; ++j) total[j] += moe::Bf16ToFloat(moe::FloatToBf16(node[j]));
      std::fill(node.begin(), node.end(), 0.0f);
    };
    for (uint32_t i = h.token_row_begin[t]; i < h.token_row_begin[t + 1]; ++i) {
      const uint32_t row = h.token_rows[i];
      const uint32_t r = uint32_t(std::upper_bound(first.begin(), first.end(), row) - first.begin()) - 1;
      if (r / per_node != node_of) flush(), node_of = r / per_node;
      for (uint32_t j = 0; j < c.hidden; ++j) node[j] += moe::Bf16ToFloat(rows[size_t(row) * c.hidden + j]);
    }
    flush();
    for (uint32_t j = 0; j < c.hidden; ++j) out[size_t(t) * c.hidden + j] = moe::FloatToBf16(total[j]);
  }
  return out;
}

struct Timing {
  std::vector<double> dispatch_us, combine_us;
};

// Runs one case on every rank; rank 0 prints its rows.
void RunCase(te::TransferEngine* engine, const Shape& shape, moe::Payload payload, const std::string& routing,
             Mode mode, const moe::RoutingTrace* trace, const moe::Placement* placement, int rank, int ranks) {
  moe::EpConfig c;
  c.ranks = ranks;
  c.rank = rank;
  c.experts = trace ? trace->experts : shape.experts;
  c.topk = trace ? trace->topk : shape.topk;
  c.hidden = shape.hidden;
  c.payload = payload;
  // Trace routing moves tokens between ranks: size for all of them landing on one.
  c.max_tokens = trace ? FLAGS_bench_tokens * ranks : FLAGS_bench_tokens;
  c.private_tokens = std::min(c.max_tokens, FLAGS_private_tokens ? FLAGS_private_tokens : FLAGS_bench_tokens);
  // The engine path: EpDispatcher, or with --mode=ll the low-latency one.
  std::unique_ptr<moe::EpDispatcher> d;
  std::unique_ptr<moe::LowLatencyDispatcher> ll;
  std::unique_ptr<moe::HierarchicalDispatcher> hier;
  std::unique_ptr<moe::CoherentDispatcher> coh;
  if (mode == Mode::kCoherent && (!trace || HomeFlag() != moe::TokenHome::kTop1))
    Die("--mode=coherent needs --bench_trace and --home=top1 (tokens live where their last top-1 expert ran)");
  if (mode == Mode::kLowLatency) {
    ll = Must(moe::LowLatencyDispatcher::Create(engine, c), "low-latency dispatcher");
    Must(ll->Connect(te::tools::AllGatherStrings(ll->LocalInfo(), ranks)), "connect the group");
  } else if (mode == Mode::kCoherent) {
    coh = Must(moe::CoherentDispatcher::Create(engine, c), "coherent dispatcher");
    Must(coh->Connect(te::tools::AllGatherStrings(coh->LocalInfo(), ranks)), "connect the group");
  } else if (mode == Mode::kHierarchical) {
    hier = Must(moe::HierarchicalDispatcher::Create(engine, c, FLAGS_nodes), "hierarchical dispatcher");
    Must(hier->Connect(te::tools::AllGatherStrings(hier->LocalInfo(), ranks)), "connect the group");
  } else {
    d = Must(moe::EpDispatcher::Create(engine, c), "dispatcher");
    Must(d->Connect(te::tools::AllGatherStrings(d->LocalInfo(), ranks)), "connect the group");
  }
  moe::MergedTokens merged;
  auto te_dispatch = [&](const Layer& L, moe::DispatchResult* out) {
    const moe::TokenBatch b = L.view();
    if (coh) return coh->Dispatch(b, L.ids.data(), L.map, out);
    return ll ? ll->Dispatch(b, L.map, out) : hier ? hier->Dispatch(b, L.map, out) : d->Dispatch(b, L.map, out);
  };
  auto te_combine = [&](const moe::ExpertOutputs& o, const moe::DispatchResult& r, uint16_t* out) {
    if (coh) return coh->Combine(o, r, &merged);
    return ll ? ll->Combine(o, r, out) : hier ? hier->Combine(o, r, out) : d->Combine(o, r, out);
  };
  const std::string routing_name = routing + ModeSuffix(mode);
  MpiPath mpi(c);

  const moe::RoutingTrace used = trace ? ReplayedTokens(c, *trace) : moe::RoutingTrace{};
  std::vector<Layer> layers = trace ? TraceLayers(c, used, *placement) : RandomLayers(c, 4);
  // Records crossing ranks as moe/dispatch_cost.h predicts them (-1: no trace).
  const uint32_t nodes = FLAGS_nodes, per_node = uint32_t(ranks) / nodes;
  int64_t predicted = -1;
  if (trace) {
    const bool relayed = mode == Mode::kHierarchical;
    const auto total = Must(moe::CountRecords(used, *placement, {nodes, HomeFlag(), relayed}), "count records").total();
    predicted = int64_t(relayed ? total.relayed : total.rank);
    if (mode == Mode::kCoherent) predicted += int64_t(total.merged);
  }
  moe::DispatchResult te_result, mpi_result;
  std::vector<uint16_t> te_out, mpi_out;
  Timing te_t, mpi_t;
  uint64_t mismatches = 0, cross_bytes = 0, node_bytes = 0, records = 0, passes = 0;
  const size_t rec = moe::RecordBytes(c);
  auto now = [] { return std::chrono::steady_clock::now(); };
  auto us = [](auto a, auto b) { return std::chrono::duration<double, std::micro>(b - a).count(); };
  auto slowest = [](double v) {
    double m;
    MPI_Allreduce(&v, &m, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    return m;
  };

  const uint32_t first_pass = std::max<uint32_t>(uint32_t(layers.size()), FLAGS_warmup);
  for (uint32_t i = 0; i < first_pass + FLAGS_iters; ++i) {
    Layer& L = layers[i % layers.size()];
    const bool timed = i >= first_pass;
    // Both paths, in alternating order: a fixed order would hand one path
    // whatever the other leaves behind (caches, socket buffers, the
    // scheduler's view of who ran last).
    double te_d = 0, te_c = 0, mpi_d = 0, mpi_c = 0;
    // One path: timed dispatch, its experts (computed once per layer,
    // outside the timing), timed combine into `out`.
    auto run_path = [&](const std::string& name, auto&& dispatch, auto&& combine, moe::DispatchResult& result,
                        std::vector<std::vector<uint16_t>>& outputs, std::vector<uint16_t>& out, double* d_us,
                        double* c_us) {
      MPI_Barrier(MPI_COMM_WORLD);
      auto t0 = now();
      Must(dispatch(&result), name + "dispatch");
      auto t1 = now();
      if (outputs.empty()) {
        outputs.resize(result.experts.size());
        for (size_t e = 0; e < outputs.size(); ++e) moe::SyntheticExpert(c, result.experts[e], &outputs[e]);
      }
      moe::ExpertOutputs outs;
      for (auto& o : outputs) outs.push_back(o.data());
      out.assign(size_t(L.tokens) * c.hidden, 0);
      MPI_Barrier(MPI_COMM_WORLD);
      auto t2 = now();
      Must(combine(outs, result, out.data()), name + "combine");
      auto t3 = now();
      *d_us = slowest(us(t0, t1)), *c_us = slowest(us(t2, t3));
    };
    auto engine_path = [&] {
      run_path(
          "", [&](moe::DispatchResult* r) { return te_dispatch(L, r); }, te_combine, te_result, L.outputs, te_out,
          &te_d, &te_c);
    };
    auto mpi_path = [&] {
      run_path(
          "MPI ", [&](moe::DispatchResult* r) { return mpi.Dispatch(L.view(), L.map, r); },
          [&](const moe::ExpertOutputs& o, const moe::DispatchResult& r, uint16_t* out) {
            return mpi.Combine(o, r, out);
          },
          mpi_result, L.mpi_outputs, mpi_out, &mpi_d, &mpi_c);
    };
    if (i % 2 == 0)
      engine_path(), mpi_path();
    else
      mpi_path(), engine_path();
    if (i < layers.size()) {          // first pass: both paths agree, and what crosses ranks
      if (mode == Mode::kCoherent) {  // rows name tokens by id; merged tokens against MPI's at their source
        std::vector<std::vector<uint32_t>> ids(ranks);
        const auto homes = moe::TokenHomes(used, *placement, moe::TokenHome::kTop1, uint32_t(i), nodes);
        const auto next = moe::TokenHomes(used, *placement, moe::TokenHome::kTop1, uint32_t(i) + 1, nodes);
        uint64_t here = 0;
        for (uint32_t t = 0; t < used.tokens; ++t) ids[homes[t]].push_back(t), here += next[t] == uint32_t(rank);
        for (size_t e = 0; e < te_result.experts.size(); ++e) {
          const auto& x = mpi_result.experts[e];
          std::vector<uint32_t> named(x.count);
          for (uint32_t j = 0; j < x.count; ++j) named[j] = ids[x.src_rank[j]][x.src_token[j]];
          mismatches += te_result.experts[e].data != x.data || te_result.experts[e].src_token != named;
        }
        mismatches += MergedMismatches(c, merged, mpi_out, ids, here);
      } else if (mode == Mode::kHierarchical) {  // same rows in relay order; sums grouped by node
        for (size_t e = 0; e < te_result.experts.size(); ++e)
          mismatches += SortedRows(c, te_result.experts[e]) != SortedRows(c, mpi_result.experts[e]);
        mismatches += te_out != SumByNode(c, mpi_result.handle, mpi.back.data(), per_node);
      } else {
        for (size_t e = 0; e < te_result.experts.size(); ++e)
          mismatches += te_result.experts[e].data != mpi_result.experts[e].data ||
                        te_result.experts[e].src_token != mpi_result.experts[e].src_token;
        mismatches += te_out != mpi_out;
      }
      for (int r = 0; r < ranks; ++r) {
        if (r == rank) continue;
        uint64_t bytes = te_result.handle.sent_to[r] * rec + te_result.handle.recv_from[r] * size_t(c.hidden) * 2;
        records += te_result.handle.sent_to[r];
        if (coh) {  // combine sends merge records, not returned rows
          bytes = te_result.handle.sent_to[r] * rec + coh->last_merge_sent_to()[r] * coh->merge_record_bytes();
          records += coh->last_merge_sent_to()[r];
        }
        cross_bytes += bytes;
        if (uint32_t(r) / per_node != uint32_t(rank) / per_node) node_bytes += bytes;
      }
      ++passes;
    }
    if (timed) {
      te_t.dispatch_us.push_back(te_d), te_t.combine_us.push_back(te_c);
      mpi_t.dispatch_us.push_back(mpi_d), mpi_t.combine_us.push_back(mpi_c);
    }
    if (rank == 0 && !FLAGS_json && (i + 1) % 50 == 0)
      fprintf(stderr, "  ep %d %s %s %s: %u/%u\r", ranks, shape.name.c_str(), moe::PayloadName(payload),
              routing_name.c_str(), i + 1, first_pass + FLAGS_iters);
  }
  uint64_t all_mismatches = 0, all_cross = 0, all_node = 0, all_records = 0;
  MPI_Reduce(&mismatches, &all_mismatches, 1, MPI_UINT64_T, MPI_SUM, 0, MPI_COMM_WORLD);
  MPI_Reduce(&cross_bytes, &all_cross, 1, MPI_UINT64_T, MPI_SUM, 0, MPI_COMM_WORLD);
  MPI_Reduce(&node_bytes, &all_node, 1, MPI_UINT64_T, MPI_SUM, 0, MPI_COMM_WORLD);
  MPI_Reduce(&records, &all_records, 1, MPI_UINT64_T, MPI_SUM, 0, MPI_COMM_WORLD);
  if (rank != 0) return;
  // The first pass replays each layer once, so its records are the trace's.
  if (predicted >= 0 && all_records != uint64_t(predicted))
    ++all_mismatches,
        fprintf(stderr, "records sent %llu, predicted %lld\n", (unsigned long long)all_records, (long long)predicted);
  const double cross_per_layer = double(all_cross) / double(std::max<uint64_t>(passes, 1));
  const double node_per_layer = double(all_node) / double(std::max<uint64_t>(passes, 1));
  // What makes the coherent mode legal: each step's new KV entry of every
  // token on every other rank (replicated context), since a token may be
  // dispatched from any rank at its next layer. 0 for the other modes.
  const double context_per_layer =
      mode == Mode::kCoherent ? double(used.tokens) * double(ranks - 1) * double(FLAGS_kv_bytes) : 0.0;
  const double te_d50 = Percentile(te_t.dispatch_us, .5), te_c50 = Percentile(te_t.combine_us, .5);
  const double mpi_d50 = Percentile(mpi_t.dispatch_us, .5), mpi_c50 = Percentile(mpi_t.combine_us, .5);
  if (FLAGS_json) {
    printf(
        "{\"ep\":%d,\"shape\":\"%s\",\"hidden\":%u,\"experts\":%u,\"topk\":%u,\"tokens_per_rank\":%u,"
        "\"payload\":\"%s\",\"routing\":\"%s\",\"provider\":\"%s\",\"mpi_btl\":\"%s\",\"progress\":\"%s\",\"iters\":%u,"
        "\"te_dispatch_p50_us\":%.1f,\"te_dispatch_p99_us\":%.1f,\"te_combine_p50_us\":%.1f,"
        "\"te_combine_p99_us\":%.1f,\"mpi_dispatch_p50_us\":%.1f,\"mpi_dispatch_p99_us\":%.1f,"
        "\"mpi_combine_p50_us\":%.1f,\"mpi_combine_p99_us\":%.1f,\"cross_rank_bytes_per_layer\":%.0f,"
        "\"cross_node_bytes_per_layer\":%.0f,\"nodes\":%u,\"home\":\"%s\",\"records_sent\":%llu,"
        "\"records_predicted\":%lld,\"context_bytes_per_layer\":%.0f,\"verified\":%s}\n",
        ranks, shape.name.c_str(), c.hidden, c.experts, c.topk, FLAGS_bench_tokens, moe::PayloadName(payload),
        routing_name.c_str(), engine->provider().c_str(), MpiTransport().c_str(), FLAGS_progress.c_str(), FLAGS_iters,
        te_d50, Percentile(te_t.dispatch_us, .99), te_c50, Percentile(te_t.combine_us, .99), mpi_d50,
        Percentile(mpi_t.dispatch_us, .99), mpi_c50, Percentile(mpi_t.combine_us, .99), cross_per_layer, node_per_layer,
        nodes, FLAGS_home.c_str(), (unsigned long long)all_records, (long long)predicted, context_per_layer,
        all_mismatches == 0 ? "true" : "false");
  } else {
    printf("%3d %-6s %-5s %-16s %9.0f %9.0f %9.0f %9.0f %6.2f | %9.0f %9.0f %9.0f %9.0f %6.2f | %9.2f %9.2f %s\n",
           ranks, shape.name.c_str(), moe::PayloadName(payload), routing_name.c_str(), te_d50,
           Percentile(te_t.dispatch_us, .99), mpi_d50, Percentile(mpi_t.dispatch_us, .99), te_d50 / mpi_d50, te_c50,
           Percentile(te_t.combine_us, .99), mpi_c50, Percentile(mpi_t.combine_us, .99), te_c50 / mpi_c50,
           cross_per_layer / 1e6, node_per_layer / 1e6, all_mismatches == 0 ? "ok" : "MISMATCH");
    if (mode == Mode::kCoherent)
      printf("%39scontext coherence, replicated KV (%u B per token and layer): %.2f MB per layer besides the above\n",
             "", FLAGS_kv_bytes, context_per_layer / 1e6);
  }
  fflush(stdout);
  if (all_mismatches) Die("engine and MPI paths disagree on " + std::to_string(all_mismatches) + " checks");
}

// --mode: which engine paths to run.
std::vector<Mode> Modes() {
  std::vector<Mode> modes;
  for (const std::string& m : Split(FLAGS_mode)) {
    if (m != "normal" && m != "ll" && m != "hier" && m != "coherent")
      Die("--mode entry '" + m + "': use normal, ll, hier or coherent");
    modes.push_back(m == "ll"         ? Mode::kLowLatency
                    : m == "hier"     ? Mode::kHierarchical
                    : m == "coherent" ? Mode::kCoherent
                                      : Mode::kNormal);
  }
  return modes;
}

int Worker() {
  MPI_Init(nullptr, nullptr);
  int rank, ranks;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  if (FLAGS_nodes == 0 || uint32_t(ranks) % FLAGS_nodes != 0)
    Die("--nodes=" + std::to_string(FLAGS_nodes) + " must divide the EP size " + std::to_string(ranks));
  const te::EngineOptions o =
      Must(te::tools::BuildEngineOptions({FLAGS_provider, "", 1, FLAGS_progress}), "engine flags");
  auto engine = Must(te::TransferEngine::Create(o), "engine");

  if (rank == 0 && !FLAGS_json) {
    printf(
        "EP %d, engine on %s, %s progress, MPI on %s, %u tokens per rank; latency in us (p50, p99 of the slowest rank "
        "per "
        "iteration, %u iterations)\n",
        ranks, engine->provider().c_str(), FLAGS_progress.c_str(), MpiTransport().c_str(), FLAGS_bench_tokens,
        FLAGS_iters);
    printf("%3s %-6s %-5s %-16s %9s %9s %9s %9s %6s | %9s %9s %9s %9s %6s | %9s %9s %s\n", "ep", "shape", "load",
           "routing", "te p50", "te p99", "mpi p50", "mpi p99", "ratio", "te p50", "te p99", "mpi p50", "mpi p99",
           "ratio", "MB x-rank", "MB x-node", "check");
    printf("%39s%s%s\n", "", "dispatch -------------------------------------------  ",
           "combine --------------------------------------------");
  }
  for (const std::string& p : Split(FLAGS_payloads)) {
    if (p != "bf16" && p != "fp8") Die("unknown payload '" + p + "': use bf16 or fp8");
    const moe::Payload payload = p == "bf16" ? moe::Payload::kBf16 : moe::Payload::kFp8E4M3;
    if (FLAGS_bench_trace.empty()) {
      for (const std::string& s : Split(FLAGS_shapes))
        for (Mode mode : Modes())
          RunCase(engine.get(), ShapeNamed(s), payload, "uniform", mode, nullptr, nullptr, rank, ranks);
      continue;
    }
    auto trace = Must(moe::ReadTrace(FLAGS_bench_trace), "read --bench_trace");
    Shape shape = ShapeNamed(Split(FLAGS_shapes).at(0));
    auto rr = moe::RoundRobinPlacement(trace.layers, trace.experts, ranks);
    for (Mode mode : Modes()) RunCase(engine.get(), shape, payload, "round-robin", mode, &trace, &rr, rank, ranks);
    if (!FLAGS_placement.empty()) {
      auto placed = Must(moe::ReadPlacementCsv(FLAGS_placement, trace.layers, trace.experts, ranks), "--placement");
      for (Mode mode : Modes()) RunCase(engine.get(), shape, payload, "placement", mode, &trace, &placed, rank, ranks);
    }
  }
  engine.reset();
  MPI_Finalize();
  return 0;
}

// Not under MPI: run this very command under mpirun once per EP size.
int Launch(int argc, char** argv) {
  for (const std::string& ep : Split(FLAGS_ep)) {
    const auto n = te::ParseUint64(ep);  // 99999999999 must be refused, not thrown
    if (!n || *n < 2 || *n > 64) Die("--ep entry '" + ep + "' must be a number in [2, 64]");
    std::string btl = FLAGS_mpi_btl;
    if (btl.empty())
      btl = te::tools::SameHostMemoryPath(FLAGS_provider) ? "self,vader" : "self,tcp --mca btl_tcp_if_include lo";
    te::tools::RunUnderMpirun(FLAGS_mpirun, int(*n), btl, argc, argv, {"ep"}, "--ep=" + ep);
  }
  return 0;
}

}  // namespace

int Bench(int argc, char** argv) {
  if (te::tools::UnderMpi()) return Worker();
  return Launch(argc, argv);
}
