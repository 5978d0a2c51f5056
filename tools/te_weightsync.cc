// te-weightsync: RL weight updates from trainer ranks into inference memory.
//
//   te-weightsync serve   --registry=HOST:PORT --rank=0 --ranks=2 --sources=2 [--shm=PATH]
//   te-weightsync push    --registry=HOST:PORT --rank=0 --sources=2 --ranks=2 [--versions=3]
//   te-weightsync status  --rendezvous=DIR | --registry=HOST:PORT
//   te-weightsync schedule [--sources=8 --src_layout=fsdp --ranks=4 --layout=tp] [--print=20]
//   te-weightsync bench   --sources=1,2,4 --receivers=2 [--model_bytes=1G]
//   te-weightsync quant-bench [--model_bytes=1G]   (fp8 block quantization on one core)
//
// serve: an inference-side receiver. Owns the weights in a shared-memory
//   file (two version slots and a header, weightsync/weights_memory.h) that
//   the inference engine maps; announces itself in the rendezvous directory
//   and prints every version it completes or fails.
// push: a trainer-side source. Holds its shards of the model (synthetic
//   weights, weightsync/synthetic_weights.h) and pushes versions on the
//   static schedule to every receiver in the rendezvous.
// The model is --model (a preset: moe, dense, tiny) scaled to --model_bytes,
// or --model_json=FILE. Ranks come from --rank or $RANK; --sources/--ranks
// default to $WORLD_SIZE. Sources and receivers meet through the Redis
// registry at --registry (default $TE_REGISTRY: "host:port" or
// "unix:/path"), under the job name --job (weightsync/weight_registry.h);
// receivers may join and leave between versions. Without a registry they
// meet in --rendezvous, a directory every rank can see (this host, or a
// shared filesystem).
// --fp8 (give it to every rank): the receivers hold parameters as fp8 with
// 128 x 128 block scales, which the sources quantize from their bf16 shards
// on the way (weightsync/fp8_conversion.h); `bench --fp8` reports the time
// the slowest source spent quantizing.
#include <gflags/gflags.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tools/tool_support.h"
#include "transfer/transfer_engine.h"
#include "weightsync/fp8_block_quant.h"
#include "weightsync/schedule.h"
#include "weightsync/synthetic_weights.h"
#include "weightsync/weight_pusher.h"
#include "weightsync/weight_receiver.h"
#include "weightsync/weight_registry.h"

DEFINE_string(registry, "", "Redis registry (host:port or unix:/path) where ranks meet (default $TE_REGISTRY)");
DEFINE_string(job, "tews", "registry: the job's key prefix (one per weight-update job)");
DEFINE_int32(registry_ttl_ms, 3000, "registry: an entry outlives a dead process this long");
DEFINE_string(rendezvous, "/tmp/te-weightsync", "without a registry: directory where receivers announce themselves");
DEFINE_int32(rank, -1, "this process's rank on its side (default $RANK)");
DEFINE_int32(sources, -1, "trainer (source) ranks (default $WORLD_SIZE)");
DEFINE_int32(ranks, -1, "inference (receiver) ranks (default $WORLD_SIZE)");
DEFINE_string(src_layout, "fsdp", "how sources hold the model: fsdp, tp, replicated");
DEFINE_string(layout, "tp", "how receivers hold the model: tp, fsdp, replicated");
DEFINE_string(model, "moe", "preset: moe, dense, tiny");
DEFINE_string(model_bytes, "256M", "preset size (K, M, G suffixes)");
DEFINE_string(model_json, "", "model description file (JSON parameter list) instead of a preset");
DEFINE_string(fp8, "",
              "receivers serve in fp8 (e4m3, 128x128 block scales, quantized by the sources): 'default' (every bf16 "
              "matrix but embeddings and head) or comma-separated parameter names; give the same to every rank");
DEFINE_string(shm, "", "serve: weights file (default /dev/shm/te-weights-<rank>)");
DEFINE_uint64(versions, 3, "push: versions to push");
DEFINE_uint64(first_version, 1, "push: first version number");
DEFINE_uint64(interval_ms, 0, "push: pause between versions");
DEFINE_uint64(bucket_mb, 16, "push: bucket size (MiB)");
DEFINE_uint64(staging_mb, 256, "push: staging watermark (MiB)");
DEFINE_bool(zero_copy, true, "push: write contiguous transfers straight from the registered source region");
DEFINE_int32(timeout_ms, 10000, "receiver progress timeout; sources wait half of it for READY");
DEFINE_string(provider, "tcp",
              "engine provider (tcp = tcp;ofi_rxm on lo; shm; local = same host; +local after a NIC provider: "
              "same-host peers bypass it)");
DEFINE_string(iface, "", "libfabric domain / interface (default lo for tcp)");
DEFINE_bool(verify, false, "serve: check every completed version against the synthetic weights push sends");
DEFINE_int32(print, 0, "schedule: print this many transfers");
DEFINE_bool(json, false, "print JSON lines");
DEFINE_uint64(serve_seconds, 0, "serve: exit after this long (0 = until SIGINT/SIGTERM)");

namespace {

constexpr const char* kTool = "te-weightsync";
using te::tools::Die;
using te::tools::Must;
using namespace te::weightsync;

volatile sig_atomic_t g_stop = 0;

uint64_t ParseBytes(const std::string& s) {
  char* end = nullptr;
  double v = strtod(s.c_str(), &end);
  const std::string unit = end ? end : "";
  const uint64_t m = unit == "K" ? 1ull << 10 : unit == "M" ? 1ull << 20 : unit == "G" ? 1ull << 30 : 1;
  if (v <= 0 || (!unit.empty() && m == 1)) Die("size '" + s + "' is not a number with K, M or G");
  return uint64_t(v * double(m));
}

int FromEnv(int flag, const char* var, const char* what) {
  if (flag >= 0) return flag;
  const char* v = getenv(var);
  if (!v) Die(std::string("give --") + what + " or set $" + var);
  return atoi(v);
}

ModelSpec Model() {
  if (!FLAGS_model_json.empty()) return Must(ReadModelJson(FLAGS_model_json), "read --model_json");
  return Must(ModelPreset(FLAGS_model, ParseBytes(FLAGS_model_bytes)), "--model");
}

// The receivers' model: the sources' one, or with --fp8 parameters as fp8
// plus their scales.
ModelSpec ReceiverModel(const ModelSpec& model) {
  if (FLAGS_fp8.empty()) return model;
  std::vector<std::string> names;
  if (FLAGS_fp8 != "default") {
    std::stringstream in(FLAGS_fp8);
    for (std::string n; std::getline(in, n, ',');)
      if (!n.empty()) names.push_back(n);
    if (names.empty()) Die("--fp8 names no parameter");
  }
  return Must(Fp8Model(model, names), "--fp8");
}

std::unique_ptr<te::TransferEngine> Engine() {
  const te::EngineOptions o = Must(te::tools::BuildEngineOptions({FLAGS_provider, FLAGS_iface, 1, "thread",
                                                                  std::chrono::milliseconds(FLAGS_timeout_ms)}),
                                   "engine flags");
  return Must(te::TransferEngine::Create(o), "engine");
}

std::string ReceiverFile(int rank) { return FLAGS_rendezvous + "/receiver-" + std::to_string(rank); }

// The registry named by --registry or $TE_REGISTRY; null for the directory.
std::unique_ptr<WeightRegistry> Registry() {
  std::string address = FLAGS_registry;
  if (address.empty())
    if (const char* env = getenv("TE_REGISTRY")) address = env;
  if (address.empty()) return nullptr;
  if (FLAGS_registry_ttl_ms < 3) Die("--registry_ttl_ms must be at least 3");
  return Must(WeightRegistry::Connect(address, FLAGS_job), "--registry");
}

void WriteAtomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp" + std::to_string(getpid());
  std::ofstream(tmp) << text;
  if (rename(tmp.c_str(), path.c_str()) != 0) Die("cannot write " + path);
}

int Serve() {
  const int rank = FromEnv(FLAGS_rank, "RANK", "rank");
  const int ranks = FromEnv(FLAGS_ranks, "WORLD_SIZE", "ranks");
  const int sources = FromEnv(FLAGS_sources, "WORLD_SIZE", "sources");
  const ModelSpec model = Model();
  const ShardLayout dst = Must(ShardLayout::Named(ReceiverModel(model), ranks, FLAGS_layout), "--layout");
  if (rank < 0 || rank >= ranks) Die("--rank " + std::to_string(rank) + " outside [0, --ranks)");
  // What each destination parameter holds (for --verify).
  const std::vector<WireParam> wire =
      Must(PlanFp8Conversion(Must(ShardLayout::Named(model, std::max(sources, 1), FLAGS_src_layout), "--src_layout"),
                             dst.model()),
           "--fp8")
          .params;
  const std::string shm = FLAGS_shm.empty() ? "/dev/shm/te-weights-" + std::to_string(rank) : FLAGS_shm;
  // Everything that can fail without side effects goes first: no exception
  // escapes, and a failed start leaves no weights file behind.
  auto registry = Registry();
  if (!registry) {
    std::error_code ec;
    std::filesystem::create_directories(FLAGS_rendezvous, ec);
    if (ec || access(FLAGS_rendezvous.c_str(), W_OK) != 0)
      Die("--rendezvous=" + FLAGS_rendezvous + " is not a writable directory" + (ec ? " (" + ec.message() + ")" : ""));
    unlink(ReceiverFile(rank).c_str());  // a previous incarnation's entry is stale from now on
  }
  auto engine = Engine();
  auto memory = Must(WeightsMemory::Create(shm, dst.RegionBytes(rank)), "weights file");
  auto must = [&](auto result, const char* step) {
    if (!result.ok()) {
      memory.reset();
      unlink(shm.c_str());
      Die(std::string(step) + ": " + result.status().ToString());
    }
    return std::move(result).value();
  };
  ReceiverOptions ro;
  ro.timeout = std::chrono::milliseconds(FLAGS_timeout_ms);
  const auto started = std::chrono::steady_clock::now();
  ro.on_version = [&](uint64_t v, const te::Status& st) {
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    te::Status s = st;
    if (s.ok() && FLAGS_verify) {
      // Read as the inference engine would: a version read while the next
      // update overtook it is read again.
      uint64_t wrong = 0, seen = 0;
      const te::Status r = memory->Read([&](uint64_t pv, const uint8_t* slot) {
        seen = pv;
        wrong = CountWrong(dst, rank, pv, slot, wire);
      });
      if (!r.ok())
        s = r.WithContext("verify");
      else if (wrong)
        s = te::Internal(std::to_string(wrong) + " bytes of version " + std::to_string(seen) +
                         " differ from the synthetic weights (MISMATCH)");
    }
    if (FLAGS_json)
      printf("{\"rank\":%d,\"version\":%lu,\"ok\":%s,\"at_s\":%.3f,\"error\":\"%s\"}\n", rank, (unsigned long)v,
             s.ok() ? "true" : "false", t, s.ok() ? "" : s.message().c_str());
    else if (s.ok())
      printf("receiver %d: version %lu complete%s (%.3f s)\n", rank, (unsigned long)v, FLAGS_verify ? ", verified" : "",
             t);
    else
      printf("receiver %d: version %lu FAILED: %s; version %lu stays readable\n", rank, (unsigned long)v,
             s.ToString().c_str(), (unsigned long)memory->published());
    fflush(stdout);
  };
  auto receiver = must(WeightReceiver::Create(engine.get(), dst, rank, sources, memory.get(), ro), "receiver");
  std::unique_ptr<te::registry::RegistryLease> lease;
  if (registry)
    lease =
        must(registry->AnnounceReceiver(rank, receiver->Info(), shm, std::chrono::milliseconds(FLAGS_registry_ttl_ms)),
             "announcing in the registry");
  else
    WriteAtomically(ReceiverFile(rank), receiver->Info() + "\n" + shm + "\n");
  if (!FLAGS_json)
    printf("receiver %d of %d: %s of %s, %.1f MiB per slot in %s; waiting for %d source(s)\n", rank, ranks,
           dst.Describe().c_str(), FLAGS_model_json.empty() ? FLAGS_model.c_str() : FLAGS_model_json.c_str(),
           double(dst.RegionBytes(rank)) / (1 << 20), shm.c_str(), sources);
  fflush(stdout);
  signal(SIGINT, [](int) { g_stop = 1; });
  signal(SIGTERM, [](int) { g_stop = 1; });
  while (!g_stop) {
    if (FLAGS_serve_seconds && std::chrono::steady_clock::now() - started > std::chrono::seconds(FLAGS_serve_seconds))
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (lease) {
    if (te::Status st = lease->Stop(); !st.ok())
      fprintf(stderr, "%s: leaving the registry: %s\n", kTool, st.ToString().c_str());
  } else {
    unlink(ReceiverFile(rank).c_str());
  }
  return 0;
}

int Push() {
  const int rank = FromEnv(FLAGS_rank, "RANK", "rank");
  const int sources = FromEnv(FLAGS_sources, "WORLD_SIZE", "sources");
  const int ranks = FromEnv(FLAGS_ranks, "WORLD_SIZE", "ranks");
  const ModelSpec model = Model();
  const ShardLayout src = Must(ShardLayout::Named(model, sources, FLAGS_src_layout), "--src_layout");
  const ShardLayout dst = Must(ShardLayout::Named(ReceiverModel(model), ranks, FLAGS_layout), "--layout");
  if (rank < 0 || rank >= sources) Die("--rank " + std::to_string(rank) + " outside [0, --sources)");
  ScheduleOptions so;
  so.max_transfer_bytes = std::min<uint64_t>(4 << 20, FLAGS_bucket_mb << 20);
  const Schedule schedule = Must(Schedule::Build(src, dst, so), "schedule");
  Must(schedule.Verify(src, dst), "schedule check");
  std::vector<uint8_t> region(src.RegionBytes(rank));
  auto engine = Engine();
  PusherOptions po;
  po.bucket_bytes = FLAGS_bucket_mb << 20;
  po.staging_bytes = FLAGS_staging_mb << 20;
  po.zero_copy = FLAGS_zero_copy;
  po.ready_timeout = std::chrono::milliseconds(FLAGS_timeout_ms / 2);
  auto pusher = Must(WeightPusher::Create(engine.get(), schedule, src, rank, region.data(), po), "pusher");
  auto registry = Registry();
  std::unique_ptr<te::registry::RegistryLease> lease;
  if (registry)
    lease = Must(
        registry->AnnounceSource(rank, engine->address().ToHex(), std::chrono::milliseconds(FLAGS_registry_ttl_ms)),
        "announcing in the registry");
  for (uint64_t v = FLAGS_first_version; v < FLAGS_first_version + FLAGS_versions; ++v) {
    // Receivers may come and go: read the registry (or the rendezvous
    // directory) before every version; this version goes to those present.
    if (registry) {
      std::map<uint32_t, std::string> refused;
      if (te::Status s = registry->SyncReceivers(pusher.get(), uint32_t(ranks), &refused); !s.ok()) {
        fprintf(stderr, "%s: reading the registry: %s; every receiver counts as absent\n", kTool, s.ToString().c_str());
        for (int d = 0; d < ranks; ++d) (void)pusher->SetReceiver(d, "");
      }
      for (const auto& [d, why] : refused) fprintf(stderr, "%s: receiver %u: %s\n", kTool, d, why.c_str());
    }
    for (int d = 0; d < ranks && !registry; ++d) {
      std::ifstream in(ReceiverFile(d));
      std::string info;
      std::getline(in, info);
      if (te::Status s = pusher->SetReceiver(d, info); !s.ok()) {
        fprintf(stderr, "%s: receiver %d: %s\n", kTool, d, s.ToString().c_str());
        (void)pusher->SetReceiver(d, "");
      }
    }
    FillShards(src, rank, v, region.data());
    auto r = Must(pusher->Push(v), "push");
    if (FLAGS_json) {
      printf("{\"source\":%d,\"version\":%lu,\"bytes\":%lu,\"writes\":%lu,\"seconds\":%.4f,\"missed\":[", rank,
             (unsigned long)v, (unsigned long)r.bytes, (unsigned long)r.writes, r.seconds);
      bool first = true;
      for (const auto& [d, why] : r.missed) printf("%s%u", first ? "" : ",", d), first = false;
      printf("]}\n");
    } else {
      printf("source %d: version %lu: %.1f MiB in %lu writes, %.3f s, %.2f GB/s", rank, (unsigned long)v,
             double(r.bytes) / (1 << 20), (unsigned long)r.writes, r.seconds, double(r.bytes) / r.seconds / 1e9);
      for (const auto& [d, why] : r.missed)
        printf("\n  receiver %u missed version %lu: %s", d, (unsigned long)v, why.c_str());
      printf("\n");
    }
    fflush(stdout);
    if (FLAGS_interval_ms) std::this_thread::sleep_for(std::chrono::milliseconds(FLAGS_interval_ms));
  }
  return 0;
}

int StatusCmd() {
  // (rank, weights location) of every receiver, from the registry or the
  // rendezvous directory.
  std::vector<std::pair<int, std::string>> receivers;
  std::string where;
  if (auto registry = Registry()) {
    where = "the registry (job " + FLAGS_job + ")";
    for (const auto& m : Must(registry->Receivers(), "reading the registry"))
      receivers.emplace_back(m.rank, m.location);
    if (!FLAGS_json) {
      const auto sources = Must(registry->Sources(), "reading the registry");
      printf("%zu source(s) registered%s", sources.size(), sources.empty() ? "\n" : ":");
      for (const auto& m : sources) printf(" %u", m.rank);
      if (!sources.empty()) printf("\n");
    }
  } else {
    where = FLAGS_rendezvous;
    std::vector<std::string> files;
    std::error_code ec;  // the non-throwing forms: an unreadable directory is an error, not an abort
    for (std::filesystem::directory_iterator it(FLAGS_rendezvous, ec), end; !ec && it != end; it.increment(ec))
      if (it->path().filename().string().rfind("receiver-", 0) == 0 && it->path().extension() != ".tmp")
        files.push_back(it->path().string());
    if (ec && ec != std::errc::no_such_file_or_directory)
      Die("cannot read --rendezvous=" + FLAGS_rendezvous + ": " + ec.message());
    std::sort(files.begin(), files.end());
    for (const auto& f : files) {
      std::ifstream in(f);
      std::string info, shm;
      std::getline(in, info);
      std::getline(in, shm);
      std::istringstream parse(info);
      std::string magic;
      int rank = -1;
      parse >> magic >> rank;
      receivers.emplace_back(rank, shm);
    }
  }
  if (receivers.empty()) {
    printf("no receivers in %s\n", where.c_str());
    return 0;
  }
  if (!FLAGS_json)
    printf("%-8s %10s %10s %10s %8s  %s\n", "receiver", "published", "begun", "failed", "updates", "weights");
  for (const auto& [rank, shm] : receivers) {
    auto m = WeightsMemory::Open(shm);
    if (!m.ok()) {
      printf("%-8d %s\n", rank, m.status().ToString().c_str());
      continue;
    }
    const WeightsHeader* h = (*m)->header();
    if (FLAGS_json)
      printf("{\"receiver\":%d,\"published\":%lu,\"begun\":%lu,\"failed\":%lu,\"updates\":%lu,\"weights\":\"%s\"}\n",
             rank, (unsigned long)h->published.load(), (unsigned long)h->begun.load(), (unsigned long)h->failed.load(),
             (unsigned long)h->updates.load(), shm.c_str());
    else
      printf("%-8d %10lu %10lu %10lu %8lu  %s\n", rank, (unsigned long)h->published.load(),
             (unsigned long)h->begun.load(), (unsigned long)h->failed.load(), (unsigned long)h->updates.load(),
             shm.c_str());
  }
  return 0;
}

int ScheduleCmd() {
  const ModelSpec model = Model();
  const int S = FLAGS_sources > 0 ? FLAGS_sources : 8, D = FLAGS_ranks > 0 ? FLAGS_ranks : 4;
  const ShardLayout src = Must(ShardLayout::Named(model, S, FLAGS_src_layout), "--src_layout");
  const ShardLayout dst = Must(ShardLayout::Named(ReceiverModel(model), D, FLAGS_layout), "--layout");
  const auto t0 = std::chrono::steady_clock::now();
  const Schedule s = Must(Schedule::Build(src, dst), "schedule");
  const double build_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const te::Status check = s.Verify(src, dst);
  printf("model: %zu parameters, %.1f MiB; %s -> %s; built in %.3f s; check: %s\n", model.params.size(),
         double(model.bytes()) / (1 << 20), src.Describe().c_str(), dst.Describe().c_str(), build_s,
         check.ok() ? "every destination byte written exactly once" : check.ToString().c_str());
  printf("%s", s.Summary().c_str());
  if (FLAGS_print > 0) s.Print(stdout, size_t(FLAGS_print));
  return check.ok() ? 0 : 1;
}

}  // namespace

// For te_weightsync_bench.cc: the model and engine the flags describe.
te::weightsync::ModelSpec WeightsyncModelFromFlags() { return Model(); }
te::weightsync::ModelSpec WeightsyncReceiverModel(const te::weightsync::ModelSpec& m) { return ReceiverModel(m); }
std::unique_ptr<te::TransferEngine> WeightsyncEngineFromFlags() { return Engine(); }

#ifdef TE_HAVE_MPI
int Bench(int argc, char** argv);  // te_weightsync_bench.cc
#else
int Bench(int, char**) { Die("bench needs MPI: install libopenmpi-dev (scripts/install-deps.sh) and rebuild"); }
#endif

// fp8 quantization cost on one core: bf16 matrices of the moe preset's
// largest shape quantized into 128 x 128 blocks, against memcpy of the same
// bytes in the same run.
int QuantBench() {
  const uint64_t bytes = ParseBytes(FLAGS_model_bytes);
  const uint64_t rows = 2048, cols = 7168, per = rows * cols;  // one expert projection
  const uint64_t matrices = std::max<uint64_t>(1, bytes / (per * 2));
  std::vector<uint16_t> src(per * matrices);
  for (uint64_t i = 0; i < src.size(); ++i)
    src[i] = FloatToBf16(float(int64_t((i * 0x9E3779B97F4A7C15ull) >> 44) - 524288) * 1e-7f);
  std::vector<uint8_t> codes(src.size()), copy(src.size() * 2);
  std::vector<float> scales(matrices * 16 * 56);
  const Fp8BlockShape shape{matrices, rows, cols};
  double quant_s = 1e9, copy_s = 1e9;
  for (int rep = 0; rep < 3; ++rep) {  // best of three, alternating
    auto t0 = std::chrono::steady_clock::now();
    Must(QuantizeBf16ToFp8Blocks(src.data(), shape, codes.data(), scales.data()), "quantize");
    auto t1 = std::chrono::steady_clock::now();
    std::memcpy(copy.data(), src.data(), copy.size());
    auto t2 = std::chrono::steady_clock::now();
    quant_s = std::min(quant_s, std::chrono::duration<double>(t1 - t0).count());
    copy_s = std::min(copy_s, std::chrono::duration<double>(t2 - t1).count());
  }
  const double gb = double(src.size() * 2) / 1e9;
  if (FLAGS_json)
    printf(
        "{\"bf16_bytes\":%lu,\"quant_s_per_gb\":%.4f,\"quant_gbs\":%.3f,\"memcpy_gbs\":%.3f,\"ns_per_element\":%.3f}\n",
        (unsigned long)(src.size() * 2), quant_s / gb, gb / quant_s, gb / copy_s, quant_s * 1e9 / double(src.size()));
  else
    printf(
        "fp8 e4m3, 128x128 blocks, %lu matrices of %lux%lu bf16 (%.2f GB): %.3f s per GB of bf16 (%.2f GB/s, "
        "%.2f ns per element); memcpy of the same bytes %.2f GB/s (quantization = %.1fx a copy)\n",
        (unsigned long)matrices, (unsigned long)rows, (unsigned long)cols, gb, quant_s / gb, gb / quant_s,
        quant_s * 1e9 / double(src.size()), gb / copy_s, quant_s / copy_s);
  return 0;
}

int main(int argc, char** argv) {
  gflags::SetUsageMessage("te-weightsync serve|push|status|schedule|bench|quant-bench [flags]");
  const std::vector<std::string> original(argv, argv + argc);
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  if (argc < 2) Die("name a command: serve, push, status, schedule, bench or quant-bench");
  const std::string cmd = argv[1];
  if (cmd == "serve") return Serve();
  if (cmd == "push") return Push();
  if (cmd == "status") return StatusCmd();
  if (cmd == "schedule") return ScheduleCmd();
  if (cmd == "quant-bench") return QuantBench();
  if (cmd == "bench") {
    std::vector<char*> args;
    for (const auto& a : original) args.push_back(const_cast<char*>(a.c_str()));
    return Bench(int(args.size()), args.data());
  }
  Die("unknown command '" + cmd + "': use serve, push, status, schedule, bench or quant-bench");
}
