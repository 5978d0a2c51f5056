// te-telemetry: DART-style telemetry on the transfer engine.
//
//   te-telemetry collector [--baseline]     # serve a region (or, baseline, a receive loop)
//   te-telemetry report --reporters=4 --keys=200000
//   te-telemetry query --flow=17            # reads the region file; the collector does nothing
//   te-telemetry stats --keys=200000        # measured query success against the formula
//   te-telemetry bench --reporters=1,2,4    # one-sided vs two-sided collector, same run
//   te-telemetry math --keys=1000000        # memory per key for a target success
//
// Flow records: 13-byte 5-tuple keys, 5-hop path traces (20-byte values).
#include <gflags/gflags.h>
#include <glog/logging.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "base/checked_math.h"
#include "telemetry/collector.h"
#include "telemetry/flow_records.h"
#include "telemetry/reporter.h"
#include "tools/tool_support.h"

DEFINE_string(provider, "tcp",
              "provider: tcp, shm, local (same host), or another libfabric name; +local after a NIC provider: "
              "same-host peers bypass it");
DEFINE_string(iface, "", "libfabric domain / interface (default lo for tcp)");
DEFINE_string(region_file, "/dev/shm/te-telemetry",
              "Collector region file (info in <file>.info); empty: SharedHostMemory, which same-host reporters "
              "write with memcpy, and which only the collector itself can query (stdin STATS)");
DEFINE_bool(bench_file, false,
            "bench: the one-sided collector's region in --region_file (process_vm_writev on the local domain) "
            "instead of SharedHostMemory");
DEFINE_uint64(slots, 1 << 20, "Key-write store slots (M)");
DEFINE_uint32(hashes, 3, "Slots per key (N)");
DEFINE_uint64(seed, 1, "Hash and flow seed");
DEFINE_uint32(rings, 8, "Reporters per append list");
DEFINE_uint32(ring_records, 4096, "Records per ring");
DEFINE_uint32(record_bytes, 64, "Largest append record");
DEFINE_bool(baseline, false, "collector: receive two-sided messages and insert into a hash map");
DEFINE_string(reporters, "1", "report: reporter processes; bench: comma-separated list");
DEFINE_uint64(keys, 100000, "Flow records to write (report, bench) or to check (stats)");
DEFINE_uint32(batch, 64, "Reports per request (one-sided) or per message (baseline)");
DEFINE_uint64(flow, 0, "query: flow index");
DEFINE_string(info, "", "report: collector info line (default: read <region_file>.info)");
DEFINE_string(baseline_address, "", "report: send to this baseline collector instead");
DEFINE_bool(json, false, "Print JSON");

namespace {

using Clock = std::chrono::steady_clock;
namespace tl = te::telemetry;

using te::tools::Die;
using te::tools::Must;

te::EngineOptions Engine() {
  return Must(te::tools::BuildEngineOptions({FLAGS_provider, FLAGS_iface}), "engine flags");
}

tl::CollectorInfo Layout() {
  tl::CollectorInfo c;
  c.store = {FLAGS_slots, uint32_t(tl::kPathValueBytes), FLAGS_hashes, FLAGS_seed};
  c.lists = {1, FLAGS_rings, FLAGS_ring_records, FLAGS_record_bytes};
  return c;
}

// A --reporters value: 1..256 processes.
uint32_t ReporterCount(const std::string& s) {
  const auto n = te::ParseUint64(s);
  if (!n || *n < 1 || *n > 256) Die("--reporters value '" + s + "' is not a count in 1..256");
  return uint32_t(*n);
}

double CpuSeconds(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string s((std::istreambuf_iterator<char>(in)), {});
  auto p = s.rfind(')');
  std::istringstream f(s.substr(p + 2));
  std::string tok;
  unsigned long long ut = 0, st = 0;
  for (int i = 3; i <= 15 && f >> tok; ++i) {
    if (i == 14) ut = te::ParseUint64(tok).value_or(0);
    if (i == 15) st = te::ParseUint64(tok).value_or(0);
  }
  return double(ut + st) / double(sysconf(_SC_CLK_TCK));
}

// ---- stats ----
struct StatsResult {
  uint64_t keys = 0, found = 0, wrong = 0, conflicts = 0;
  double measured = 0, expected = 0;
};

// The success rates of counted keys: measured, and the formula's.
StatsResult WithRates(StatsResult s, const tl::CollectorInfo& info) {
  s.measured = s.keys ? double(s.found) / s.keys : 1;
  s.expected = tl::ExpectedSuccess(info.store.slots, s.keys, info.store.hashes);
  return s;
}

// Queries every flow of --keys through `query` (a RegionView's or the
// collector's own).
template <typename Q>
StatsResult StatsOf(const tl::CollectorInfo& info, const Q& query) {
  StatsResult s;
  s.keys = FLAGS_keys;
  for (uint64_t f = 0; f < FLAGS_keys; ++f) {
    auto q = Must(query(tl::FlowKey(FLAGS_seed, f)), "query");
    if (!q.found) continue;
    auto want = tl::PathTrace(FLAGS_seed, f);
    if (q.value == std::vector<uint8_t>(want.begin(), want.end()))
      ++s.found;
    else
      ++s.wrong;
    s.conflicts += q.conflict;
  }
  return WithRates(s, info);
}

// ---- collector ----
// Reads commands on stdin: COUNT (baseline: reports ingested), STATS (keys
// found wrong conflicts, queried in this process), EXIT.
int RunCollector() {
  auto engine = Must(te::TransferEngine::Create(Engine()), "creating the engine");
  std::unique_ptr<tl::Collector> collector;
  std::mutex mu;
  std::unordered_map<std::string, std::string> table;  // baseline store
  uint64_t ingested = 0;
  if (FLAGS_baseline) {
    // The conventional collector: every report arrives as a message, is parsed
    // and inserted by this process's CPU.
    engine->SetRecvHandler([&](const te::EngineAddress&, std::span<const uint8_t> d) {
      const size_t rec = tl::kFlowKeyBytes + tl::kPathValueBytes;
      std::lock_guard<std::mutex> l(mu);
      for (size_t off = 0; off + rec <= d.size(); off += rec) {
        table[std::string((const char*)d.data() + off, tl::kFlowKeyBytes)] =
            std::string((const char*)d.data() + off + tl::kFlowKeyBytes, tl::kPathValueBytes);
        ++ingested;
      }
    });
    printf("TE-TELEMETRY-BASELINE %s\n", engine->address().ToHex().c_str());
  } else {
    collector = Must(tl::Collector::Create(engine.get(), Layout(), FLAGS_region_file), "creating the collector");
    const std::string info = collector->info().Serialize();
    if (!FLAGS_region_file.empty()) std::ofstream(FLAGS_region_file + ".info") << info << "\n";
    printf("TE-TELEMETRY %s\n", info.c_str());
  }
  fflush(stdout);
  char line[64];
  while (fgets(line, sizeof line, stdin)) {
    if (strncmp(line, "COUNT", 5) == 0) {
      std::lock_guard<std::mutex> l(mu);
      printf("%llu\n", (unsigned long long)ingested);
    } else if (strncmp(line, "STATS", 5) == 0 && collector) {
      const StatsResult st = StatsOf(collector->info(), [&](auto key) { return collector->Query(key); });
      printf("%llu %llu %llu %llu\n", (unsigned long long)st.keys, (unsigned long long)st.found,
             (unsigned long long)st.wrong, (unsigned long long)st.conflicts);
    } else if (strncmp(line, "EXIT", 4) == 0) {
      break;
    }
    fflush(stdout);
  }
  return 0;
}

// ---- report ----
struct ReportResult {
  uint64_t reports = 0;
  double seconds = 0;
  double cpu_seconds = 0;  // ReportMany: the reporter processes' CPU, all threads
};

ReportResult ReportOne(uint32_t index, uint32_t count, const tl::CollectorInfo* info, const std::string& baseline_hex) {
  auto engine = Must(te::TransferEngine::Create(Engine()), "creating the engine");
  const uint64_t lo = FLAGS_keys * index / count, hi = FLAGS_keys * (index + 1) / count;
  ReportResult r;
  if (!baseline_hex.empty()) {
    auto peer = Must(engine->Connect(Must(te::EngineAddress::FromHex(baseline_hex), "baseline address")), "connect");
    te::CompletionCounter sent;
    uint64_t messages = 0;
    std::vector<uint8_t> msg;
    const auto t0 = Clock::now();
    for (uint64_t f = lo; f < hi; ++f) {
      auto k = tl::FlowKey(FLAGS_seed, f);
      auto v = tl::PathTrace(FLAGS_seed, f);
      msg.insert(msg.end(), k.begin(), k.end());
      msg.insert(msg.end(), v.begin(), v.end());
      if ((f - lo + 1) % FLAGS_batch == 0 || f + 1 == hi) {
        // Bounded in flight, like the one-sided reporter's staging slices.
        while (messages - sent.finished() >= 8) std::this_thread::yield();
        Must(engine->Send(peer, msg, {.counter = &sent}), "send");
        ++messages;
        msg.clear();
      }
    }
    if (!sent.WaitFinished(messages, std::chrono::seconds(60)) || sent.failed())
      Die("baseline messages failed: " + sent.first_error().ToString());
    r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  } else {
    tl::ReporterOptions ro;
    ro.ring = index % info->lists.rings;
    ro.writes_per_batch = FLAGS_batch * info->store.hashes;
    auto rep = Must(tl::Reporter::Create(engine.get(), *info, ro), "creating the reporter");
    const auto t0 = Clock::now();
    for (uint64_t f = lo; f < hi; ++f) {
      auto k = tl::FlowKey(FLAGS_seed, f);
      auto v = tl::PathTrace(FLAGS_seed, f);
      Must(rep->KeyWrite(k, v), "key write");
    }
    Must(rep->Drain(), "draining");
    r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  }
  r.reports = hi - lo;
  return r;
}

// Forks `count` reporter processes; returns total reports and the slowest time.
ReportResult ReportMany(uint32_t count, const tl::CollectorInfo* info, const std::string& baseline_hex) {
  std::vector<pid_t> pids;
  std::vector<int> fds;
  for (uint32_t i = 0; i < count; ++i) {
    int p[2];
    if (pipe(p)) Die("pipe");
    pid_t pid = fork();
    if (pid == 0) {
      close(p[0]);
      ReportResult r = ReportOne(i, count, info, baseline_hex);
      dprintf(p[1], "%llu %.9f\n", (unsigned long long)r.reports, r.seconds);
      _exit(0);
    }
    close(p[1]);
    pids.push_back(pid);
    fds.push_back(p[0]);
  }
  ReportResult total;
  for (size_t i = 0; i < pids.size(); ++i) {
    char buf[128] = {0};
    ssize_t n = read(fds[i], buf, sizeof buf - 1);
    close(fds[i]);
    int st = 0;
    struct rusage ru {};
    wait4(pids[i], &st, 0, &ru);
    total.cpu_seconds +=
        double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
    unsigned long long reports = 0;
    double secs = 0;
    if (n <= 0 || sscanf(buf, "%llu %lf", &reports, &secs) != 2 || !WIFEXITED(st) || WEXITSTATUS(st))
      Die("reporter " + std::to_string(i) + " failed");
    total.reports += reports;
    total.seconds = std::max(total.seconds, secs);
  }
  return total;
}

tl::CollectorInfo ReadInfo() {
  std::string text = FLAGS_info;
  if (text.empty()) {
    std::ifstream in(FLAGS_region_file + ".info");
    if (!std::getline(in, text)) Die("no collector info: start a collector or pass --info");
  }
  return Must(tl::CollectorInfo::Parse(text), "collector info");
}

StatsResult Stats(const tl::CollectorInfo& info) {
  auto view = Must(tl::RegionView::Open(FLAGS_region_file, info), "opening the region");
  return StatsOf(info, [&](auto key) { return view->Query(key); });
}

// ---- bench ----
struct Child {
  pid_t pid = -1;
  FILE* in = nullptr;   // its stdin
  FILE* out = nullptr;  // its stdout
  std::string first_line;
};

Child SpawnCollector(bool baseline, const std::string& region_file) {
  int to[2], from[2];
  if (pipe(to) || pipe(from)) Die("pipe");
  Child c;
  c.pid = fork();
  if (c.pid == 0) {
    dup2(to[0], 0);
    dup2(from[1], 1);
    close(to[1]);
    close(from[0]);
    std::vector<std::string> args = {"/proc/self/exe",
                                     "collector",
                                     "--provider=" + FLAGS_provider,
                                     "--iface=" + FLAGS_iface,
                                     "--region_file=" + region_file,
                                     "--slots=" + std::to_string(FLAGS_slots),
                                     "--hashes=" + std::to_string(FLAGS_hashes),
                                     "--seed=" + std::to_string(FLAGS_seed),
                                     "--keys=" + std::to_string(FLAGS_keys),
                                     std::string("--baseline=") + (baseline ? "true" : "false")};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv("/proc/self/exe", argv.data());
    _exit(127);
  }
  close(to[0]);
  close(from[1]);
  c.in = fdopen(to[1], "w");
  c.out = fdopen(from[0], "r");
  char buf[8192];
  if (!fgets(buf, sizeof buf, c.out)) Die("the collector did not start");
  c.first_line = buf;
  while (!c.first_line.empty() && c.first_line.back() == '\n') c.first_line.pop_back();
  return c;
}

std::string Ask(Child& c, const char* cmd) {
  fprintf(c.in, "%s\n", cmd);
  fflush(c.in);
  char buf[256];
  std::string line = fgets(buf, sizeof buf, c.out) ? std::string(buf) : "";
  while (!line.empty() && isspace(static_cast<unsigned char>(line.back()))) line.pop_back();
  return line;
}

// The baseline collector's COUNT answer; a child that answers anything else
// is broken.
uint64_t AskCount(Child& c) {
  const std::string answer = Ask(c, "COUNT");
  const auto n = te::ParseUint64(answer);
  if (!n) Die("baseline collector answered '" + answer + "' to COUNT");
  return *n;
}

// The one-sided collector's own STATS answer (a SharedHostMemory region has
// no file for this process to map).
StatsResult AskStats(Child& c, const tl::CollectorInfo& info) {
  const std::string answer = Ask(c, "STATS");
  StatsResult s;
  unsigned long long k = 0, f = 0, w = 0, x = 0;
  if (sscanf(answer.c_str(), "%llu %llu %llu %llu", &k, &f, &w, &x) != 4 || k != FLAGS_keys)
    Die("collector answered '" + answer + "' to STATS");
  s.keys = k, s.found = f, s.wrong = w, s.conflicts = x;
  return WithRates(s, info);
}

void Stop(Child& c) {
  fprintf(c.in, "EXIT\n");
  fflush(c.in);
  waitpid(c.pid, nullptr, 0);
  fclose(c.in);
  fclose(c.out);
}

int RunBench() {
  std::vector<uint32_t> counts;
  std::stringstream ss(FLAGS_reporters);
  for (std::string s; std::getline(ss, s, ',');) counts.push_back(ReporterCount(s));
  if (!FLAGS_json)
    printf("%-9s %14s %12s %12s %9s %9s %14s %12s  %s\n", "reporters", "reports/s", "reporter_cpu", "collector_cpu",
           "success", "formula", "base_reports/s", "base_cpu", "ratio");
  for (uint32_t r : counts) {
    fprintf(stderr, "[bench] %u reporter(s): one-sided ...\n", r);
    // One-sided: reporters write into the collector's memory.
    Child col = SpawnCollector(false, FLAGS_bench_file ? FLAGS_region_file : "");
    const auto info = Must(tl::CollectorInfo::Parse(col.first_line.substr(strlen("TE-TELEMETRY "))), "info");
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // let its worker go idle
    double cpu0 = CpuSeconds(col.pid);
    ReportResult one = ReportMany(r, &info, "");
    double cpu_one = CpuSeconds(col.pid) - cpu0;
    StatsResult st = FLAGS_bench_file ? Stats(info) : AskStats(col, info);
    Stop(col);
    // Two-sided baseline: the same reports as messages into a hash map.
    fprintf(stderr, "[bench] %u reporter(s): two-sided baseline ...\n", r);
    Child base = SpawnCollector(true, FLAGS_region_file);
    const std::string addr = base.first_line.substr(strlen("TE-TELEMETRY-BASELINE "));
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    cpu0 = CpuSeconds(base.pid);
    const auto t0 = Clock::now();
    ReportResult two = ReportMany(r, nullptr, addr);
    // Ingested means inserted by the collector, not merely sent.
    while (AskCount(base) < two.reports) {
      if (Clock::now() - t0 > std::chrono::seconds(120)) Die("baseline collector never ingested everything");
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    const double two_secs = std::chrono::duration<double>(Clock::now() - t0).count();
    double cpu_two = CpuSeconds(base.pid) - cpu0;
    Stop(base);
    const double one_rate = one.reports / one.seconds, two_rate = two.reports / two_secs;
    if (FLAGS_json) {
      printf(
          "{\"reporters\":%u,\"keys\":%llu,\"provider\":\"%s\",\"reports_per_s\":%.0f,"
          "\"reporter_cpu_s\":%.3f,\"collector_cpu_s\":%.3f,\"success\":%.5f,\"formula\":%.5f,\"wrong\":%llu,"
          "\"baseline_reports_per_s\":%.0f,\"baseline_cpu_s\":%.3f,\"ratio\":%.3f}\n",
          r, (unsigned long long)FLAGS_keys, FLAGS_provider.c_str(), one_rate, one.cpu_seconds, cpu_one, st.measured,
          st.expected, (unsigned long long)st.wrong, two_rate, cpu_two, one_rate / two_rate);
    } else {
      printf("%-9u %14.0f %11.3fs %12.3fs %9.5f %9.5f %14.0f %11.3fs  %.2f%s\n", r, one_rate, one.cpu_seconds, cpu_one,
             st.measured, st.expected, two_rate, cpu_two, one_rate / two_rate, st.wrong ? "  WRONG VALUES" : "");
    }
    fflush(stdout);
    if (st.wrong) return 2;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  gflags::SetUsageMessage("te-telemetry collector|report|query|stats|bench|math [flags]");
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  FLAGS_logtostderr = true;
  google::InitGoogleLogging(argv[0]);
  if (argc < 2) Die("name a command: collector, report, query, stats, bench or math");
  const std::string cmd = argv[1];
  if (cmd == "collector") return RunCollector();
  if (cmd == "bench") return RunBench();
  if (cmd == "math") {
    // Memory per key for 99.9% (and 99%) query success, N = 1..8, from the
    // formula that the unit tests hold measured stores to.
    const size_t slot = Layout().store.slot_bytes();
    if (!FLAGS_json)
      printf("keys %llu, slot %zu bytes (4-byte checksum + %zu-byte path trace)\n%-3s %14s %14s %12s\n",
             (unsigned long long)FLAGS_keys, slot, tl::kPathValueBytes, "N", "bytes/key@99%", "bytes/key@99.9%",
             "slots/key");
    for (uint32_t n = 1; n <= 8; ++n) {
      const double b99 = tl::BytesPerKeyForTarget(FLAGS_keys, n, 0.99, slot);
      const double b999 = tl::BytesPerKeyForTarget(FLAGS_keys, n, 0.999, slot);
      if (FLAGS_json)
        printf(
            "{\"hashes\":%u,\"keys\":%llu,\"slot_bytes\":%zu,\"bytes_per_key_99\":%.1f,\"bytes_per_key_999\":%.1f}\n",
            n, (unsigned long long)FLAGS_keys, slot, b99, b999);
      else
        printf("%-3u %14.1f %14.1f %12.2f\n", n, b99, b999, b999 / slot);
    }
    return 0;
  }
  if (cmd == "report") {
    const uint32_t n = ReporterCount(FLAGS_reporters);
    tl::CollectorInfo info;
    if (FLAGS_baseline_address.empty()) info = ReadInfo();
    ReportResult r = ReportMany(n, FLAGS_baseline_address.empty() ? &info : nullptr, FLAGS_baseline_address);
    if (FLAGS_json)
      printf("{\"reporters\":%u,\"reports\":%llu,\"seconds\":%.4f,\"reports_per_s\":%.0f}\n", n,
             (unsigned long long)r.reports, r.seconds, r.reports / r.seconds);
    else
      printf("%u reporter(s) wrote %llu reports in %.3f s: %.0f reports/s\n", n, (unsigned long long)r.reports,
             r.seconds, r.reports / r.seconds);
    return 0;
  }
  const tl::CollectorInfo info = ReadInfo();
  if (cmd == "query") {
    auto view = Must(tl::RegionView::Open(FLAGS_region_file, info), "opening the region");
    auto key = tl::FlowKey(FLAGS_seed, FLAGS_flow);
    auto q = Must(view->Query(key), "query");
    std::string hops;
    for (size_t h = 0; q.found && h < tl::kPathHops; ++h) {
      uint32_t sw;
      memcpy(&sw, q.value.data() + 4 * h, 4);
      hops += (h ? "," : "") + std::to_string(sw);
    }
    if (FLAGS_json)
      printf("{\"flow\":%llu,\"found\":%s,\"matching_slots\":%u,\"conflict\":%s,\"path\":[%s]}\n",
             (unsigned long long)FLAGS_flow, q.found ? "true" : "false", q.matching_slots,
             q.conflict ? "true" : "false", hops.c_str());
    else if (q.found)
      printf("flow %llu: path %s (%u of %u slots match%s)\n", (unsigned long long)FLAGS_flow, hops.c_str(),
             q.matching_slots, info.store.hashes, q.conflict ? ", conflicting" : "");
    else
      printf("flow %llu: not found\n", (unsigned long long)FLAGS_flow);
    return q.found ? 0 : 3;
  }
  if (cmd == "stats") {
    StatsResult s = Stats(info);
    const double bpk =
        tl::BytesPerKeyForTarget(std::max<uint64_t>(s.keys, 1), info.store.hashes, 0.999, info.store.slot_bytes());
    if (FLAGS_json)
      printf(
          "{\"keys\":%llu,\"found\":%llu,\"wrong\":%llu,\"conflicts\":%llu,\"measured\":%.5f,"
          "\"formula\":%.5f,\"bytes_per_key_999\":%.1f}\n",
          (unsigned long long)s.keys, (unsigned long long)s.found, (unsigned long long)s.wrong,
          (unsigned long long)s.conflicts, s.measured, s.expected, bpk);
    else
      printf(
          "keys %llu  found %llu  wrong %llu  measured %.5f  formula %.5f  "
          "(99.9%% needs %.0f bytes/key at N=%u)\n",
          (unsigned long long)s.keys, (unsigned long long)s.found, (unsigned long long)s.wrong, s.measured, s.expected,
          bpk, info.store.hashes);
    return s.wrong ? 2 : 0;
  }
  Die("unknown command '" + cmd + "': use collector, report, query, stats, bench or math");
}
