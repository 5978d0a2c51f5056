// te-weightsync bench: S source processes push a synthetic model into D
// receiver processes (loopback), against the baseline that funnels the same
// model through rank 0 with MPI, in the same run.
//
//   te-weightsync bench --bench_sources=1,2,4 --receivers=2 --model_bytes=1G
//
// Engine path: every source pushes its shards on the static schedule
// (fsdp -> tp by default); an update ends when every receiver has published
// it. Baseline: the sources' shards are gathered to rank 0 (MPI_Gatherv),
// which broadcasts the whole model to the receivers (MPI_Bcast); the
// receivers' extraction of their shard is not counted. Each update starts
// after an MPI barrier and its time is the slowest process's. The engine
// path's last version is checked byte for byte on every receiver.
#include <gflags/gflags.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <sstream>
#include <thread>

#include "base/checked_math.h"
#include "tools/mpi_allgather.h"
#include "tools/mpi_launch.h"
#include "tools/tool_support.h"
#include "weightsync/schedule.h"
#include "weightsync/synthetic_weights.h"
#include "weightsync/weight_pusher.h"
#include "weightsync/weight_receiver.h"

DEFINE_string(bench_sources, "1,2,4", "bench: source process counts to run, comma-separated");
DEFINE_int32(receivers, 2, "bench: receiver processes");
DEFINE_int32(iters, 3, "bench: updates per path");
DEFINE_string(mpirun, "mpirun", "bench: the launcher used when not already under MPI");
DECLARE_string(src_layout);
DECLARE_string(layout);
DECLARE_string(provider);
DECLARE_bool(json);
DECLARE_uint64(bucket_mb);
DECLARE_uint64(staging_mb);
DECLARE_bool(zero_copy);
DECLARE_int32(timeout_ms);

te::weightsync::ModelSpec WeightsyncModelFromFlags();
te::weightsync::ModelSpec WeightsyncReceiverModel(const te::weightsync::ModelSpec& model);
std::unique_ptr<te::TransferEngine> WeightsyncEngineFromFlags();

namespace {

constexpr const char* kTool = "te-weightsync";
using te::tools::Die;
using te::tools::Median;
using te::tools::Must;
using namespace te::weightsync;

double Slowest(double v) {
  double m;
  MPI_Allreduce(&v, &m, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return m;
}

int Worker() {
  MPI_Init(nullptr, nullptr);
  int w, n;
  MPI_Comm_rank(MPI_COMM_WORLD, &w);
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  const int D = FLAGS_receivers, S = n - D;
  if (S < 1) Die("need at least one source besides " + std::to_string(D) + " receivers");
  const bool source = w < S;
  const ModelSpec model = WeightsyncModelFromFlags();
  const ShardLayout src = Must(ShardLayout::Named(model, S, FLAGS_src_layout), "--src_layout");
  const ShardLayout dst = Must(ShardLayout::Named(WeightsyncReceiverModel(model), D, FLAGS_layout), "--layout");
  ScheduleOptions so;
  so.max_transfer_bytes = std::min<uint64_t>(4 << 20, FLAGS_bucket_mb << 20);
  const Schedule schedule = Must(Schedule::Build(src, dst, so), "schedule");
  auto engine = WeightsyncEngineFromFlags();

  // ---- Engine path ----
  std::unique_ptr<WeightsMemory> memory;
  std::unique_ptr<WeightReceiver> receiver;
  std::vector<uint8_t> region;
  std::unique_ptr<WeightPusher> pusher;
  std::string info;
  if (!source) {
    memory = Must(WeightsMemory::Create("", dst.RegionBytes(w - S)), "weights memory");
    ReceiverOptions ro;
    ro.timeout = std::chrono::milliseconds(FLAGS_timeout_ms);
    receiver = Must(WeightReceiver::Create(engine.get(), dst, w - S, S, memory.get(), ro), "receiver");
    info = receiver->Info();
  }
  const std::vector<std::string> infos = te::tools::AllGatherStrings(info, n);
  if (source) {
    region.assign(src.RegionBytes(w), 0);
    PusherOptions po;
    po.bucket_bytes = FLAGS_bucket_mb << 20;
    po.staging_bytes = FLAGS_staging_mb << 20;
    po.zero_copy = FLAGS_zero_copy;
    po.ready_timeout = std::chrono::milliseconds(FLAGS_timeout_ms / 2);
    pusher = Must(WeightPusher::Create(engine.get(), schedule, src, w, region.data(), po), "pusher");
    for (int d = 0; d < D; ++d) Must(pusher->SetReceiver(d, infos[S + d]), "receiver info");
  }
  std::vector<double> te_s;
  uint64_t missed = 0;
  double quantize_s = 0;  // the slowest source's, summed over versions
  for (int v = 1; v <= FLAGS_iters; ++v) {
    if (source) FillShards(src, w, v, region.data());
    MPI_Barrier(MPI_COMM_WORLD);
    const auto t0 = std::chrono::steady_clock::now();
    if (source) {
      auto r = Must(pusher->Push(v), "push");
      missed += r.missed.size();
      quantize_s += r.quantize_seconds;
    } else {
      const auto end = t0 + std::chrono::seconds(120);
      while (memory->published() < uint64_t(v) && std::chrono::steady_clock::now() < end)
        std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    te_s.push_back(Slowest(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()));
  }
  uint64_t wrong = source ? 0 : CountWrong(dst, w - S, FLAGS_iters, memory->slot(FLAGS_iters), schedule.wire_params());
  quantize_s = Slowest(quantize_s) / FLAGS_iters;
  if (!source && memory->published() != uint64_t(FLAGS_iters)) wrong += 1;
  uint64_t all_wrong = 0, all_missed = 0;
  MPI_Reduce(&wrong, &all_wrong, 1, MPI_UINT64_T, MPI_SUM, 0, MPI_COMM_WORLD);
  MPI_Reduce(&missed, &all_missed, 1, MPI_UINT64_T, MPI_SUM, 0, MPI_COMM_WORLD);
  receiver.reset();
  pusher.reset();

  // ---- Baseline: gather to rank 0, broadcast the whole model ----
  MPI_Comm sources_comm, bcast_comm;
  MPI_Comm_split(MPI_COMM_WORLD, source ? 0 : MPI_UNDEFINED, w, &sources_comm);
  MPI_Comm_split(MPI_COMM_WORLD, (w == 0 || !source) ? 0 : MPI_UNDEFINED, w, &bcast_comm);
  std::vector<int> counts(S), displ(S);
  uint64_t total = 0;
  for (int s = 0; s < S; ++s) {
    if (src.RegionBytes(s) > (1ull << 31) - 1)
      Die("a source shard over 2 GiB: lower --model_bytes for the MPI baseline");
    counts[s] = int(src.RegionBytes(s));
    displ[s] = int(total);
    total += src.RegionBytes(s);
  }
  if (total > (1ull << 31) - 1) Die("the MPI baseline's gather is limited to 2 GiB: lower --model_bytes");
  std::vector<uint8_t> full((w == 0 || !source) ? total : 0);
  std::vector<double> mpi_s;
  for (int v = 1; v <= FLAGS_iters; ++v) {
    MPI_Barrier(MPI_COMM_WORLD);
    const auto t0 = std::chrono::steady_clock::now();
    if (source)
      MPI_Gatherv(region.data(), int(region.size()), MPI_BYTE, full.data(), counts.data(), displ.data(), MPI_BYTE, 0,
                  sources_comm);
    if (w == 0 || !source)
      for (uint64_t at = 0; at < total; at += 256u << 20)
        MPI_Bcast(full.data() + at, int(std::min<uint64_t>(256u << 20, total - at)), MPI_BYTE, 0, bcast_comm);
    mpi_s.push_back(Slowest(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()));
  }
  if (w == 0) {
    const double te = Median(te_s), mpi = Median(mpi_s);
    const double gbs = double(schedule.total_bytes()) / te / 1e9;
    if (FLAGS_json)
      printf(
          "{\"sources\":%d,\"receivers\":%d,\"model_bytes\":%lu,\"delivered_bytes\":%lu,\"provider\":\"%s\","
          "\"te_seconds\":%.4f,\"te_aggregate_gbs\":%.3f,\"mpi_seconds\":%.4f,\"speedup_vs_mpi\":%.3f,"
          "\"fp8\":%s,\"quantize_seconds\":%.4f,\"missed\":%lu,\"verified\":%s}\n",
          S, D, (unsigned long)model.bytes(), (unsigned long)schedule.total_bytes(), engine->provider().c_str(), te,
          gbs, mpi, mpi / te, schedule.converts() ? "true" : "false", quantize_s, (unsigned long)all_missed,
          all_wrong == 0 && all_missed == 0 ? "true" : "false");
    else
      printf("%7d %9d %10.1f %12.1f %10.3f %10.3f %10.2f %10.3f %8.2fx %s\n", S, D, double(model.bytes()) / (1 << 20),
             double(schedule.total_bytes()) / (1 << 20), te, quantize_s, gbs, mpi, mpi / te,
             all_wrong == 0 && all_missed == 0 ? "ok" : "MISMATCH");
    fflush(stdout);
  }
  if (sources_comm != MPI_COMM_NULL) MPI_Comm_free(&sources_comm);
  if (bcast_comm != MPI_COMM_NULL) MPI_Comm_free(&bcast_comm);
  engine.reset();
  MPI_Finalize();
  return all_wrong == 0 && all_missed == 0 ? 0 : 1;
}

std::vector<int> Counts(const std::string& s) {
  std::vector<int> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ','))
    if (!item.empty()) {
      const auto n = te::ParseUint64(item);  // 99999999999 must be refused, not thrown
      if (!n || *n < 1 || *n > 32) Die("--bench_sources entry '" + item + "' must be a number in [1, 32]");
      out.push_back(int(*n));
    }
  return out;
}

}  // namespace

int Bench(int argc, char** argv) {
  if (te::tools::UnderMpi()) return Worker();
  if (FLAGS_receivers < 1 || FLAGS_receivers > 32) Die("--receivers must be in [1, 32]");
  if (!FLAGS_json)
    printf("%7s %9s %10s %12s %10s %10s %10s %10s %9s %s\n", "sources", "receivers", "model MiB", "delivered MiB",
           "engine s", "quant s", "GB/s", "MPI s", "speedup", "check");
  fflush(stdout);
  for (int s : Counts(FLAGS_bench_sources)) {
    const std::string btl =
        te::tools::SameHostMemoryPath(FLAGS_provider) ? "self,vader" : "self,tcp --mca btl_tcp_if_include lo";
    te::tools::RunUnderMpirun(FLAGS_mpirun, s + FLAGS_receivers, btl, argc, argv, {}, "");
  }
  return 0;
}
