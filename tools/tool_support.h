// What every command-line tool shares: how it stops on an error it cannot
// go on from, how it builds engine options from its flags, and the summary
// statistics of its tables. Header-only; each tool keeps its own flags
// (defaults differ by tool: te-moe bench drives progress by hand, te-bench
// measures the default worker thread).
#pragma once

#include <errno.h>  // program_invocation_short_name

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "base/status.h"
#include "transfer/engine_options.h"

namespace te::tools {

// Prints "<tool>: <what>" and exits 1. The tool's name is its binary's.
[[noreturn]] inline void Die(const std::string& what) {
  fprintf(stderr, "%s: %s\n", program_invocation_short_name, what.c_str());
  exit(1);
}

// The value, or exit naming `step` and the error.
template <typename T>
T Must(te::Result<T> r, const std::string& step) {
  if (!r.ok()) Die(step + ": " + r.status().ToString());
  return std::move(r).value();
}
inline void Must(const te::Status& s, const std::string& step) {
  if (!s.ok()) Die(step + ": " + s.ToString());
}

// The engine-related flags a tool has; empty / default fields keep
// EngineOptions' defaults.
struct EngineFlags {
  std::string provider = "tcp";
  std::string iface;  // libfabric domain; empty: lo for tcp
  int domains = 1;
  std::string progress = "thread";               // thread or manual
  std::chrono::milliseconds request_timeout{0};  // 0: the engine's default
};

inline te::Result<te::EngineOptions> BuildEngineOptions(const EngineFlags& f) {
  te::EngineOptions o;
  // A tool measures the path it is told: a bare provider is that provider
  // alone, even where the library would add the same-host lane on its own
  // (SameHost::kAuto on verbs and efa); "+local" asks for the lane.
  o.same_host = te::SameHost::kNic;
  o.SetProvider(f.provider);
  o.fabric.domain = f.iface;
  if (f.domains < 1 || f.domains > 64)
    return te::InvalidArgument("--domains " + std::to_string(f.domains) + " is outside [1, 64]");
  o.domains = f.domains;
  if (f.progress == "manual")
    o.progress = te::ProgressMode::kManual;
  else if (f.progress != "thread")
    return te::InvalidArgument("--progress must be 'thread' or 'manual', not '" + f.progress + "'");
  if (f.request_timeout.count() > 0) o.request_timeout = f.request_timeout;
  return o;
}

// Whether `provider` (a --provider value) moves same-host bytes through
// memory (shm, local, a NIC provider with +local): the MPI baselines then
// use shared memory too (btl vader), else tcp.
inline bool SameHostMemoryPath(const std::string& provider) {
  te::EngineOptions o;
  o.SetProvider(provider);
  return o.backend == te::nic::Backend::kLocal || o.fabric.provider == "shm" || o.same_host == te::SameHost::kDirect;
}

// Nearest-rank percentile (p in [0, 1]) of `v`; 0 when empty.
inline double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double rank = std::clamp(p, 0.0, 1.0) * double(v.size() - 1);
  return v[std::min(v.size() - 1, size_t(rank + 0.5))];
}
inline double Median(std::vector<double> v) { return Percentile(std::move(v), 0.5); }

}  // namespace te::tools
