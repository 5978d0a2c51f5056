#include "telemetry/engine_stats_reporter.h"

#include <algorithm>
#include <cstring>

#include "base/stop_and_join.h"

namespace te::telemetry {
namespace {

// Record layout (little-endian u64 words):
//   version(1), time_ns, submitted, done, failed, writes, bytes, imms,
//   p50_us, p99_us, n_domains, n_peers, then n_domains x (writes, bytes,
//   errors), then n_peers x (peer_id, writes, bytes, errors)
constexpr uint64_t kSampleVersion = 2;
constexpr size_t kHeaderWords = 12;

}  // namespace

size_t EngineSampleBytes(size_t domains, size_t peers) {
  return 8 * (kHeaderWords + 3 * domains + 4 * std::min(peers, kMaxSamplePeers));
}

std::vector<uint8_t> EncodeEngineSample(const EngineSample& s) {
  const auto& t = s.stats;
  std::vector<uint64_t> w = {kSampleVersion,   s.time_ns,         t.requests_submitted,
                             t.requests_done,  t.requests_failed, t.writes_posted,
                             t.bytes_written,  t.imms_received,   t.latency_p50_us,
                             t.latency_p99_us, t.domains.size(),  std::min(t.peers.size(), kMaxSamplePeers)};
  for (const auto& d : t.domains) {
    w.push_back(d.writes_posted);
    w.push_back(d.bytes_written);
    w.push_back(d.errors);
  }
  for (size_t i = 0; i < std::min(t.peers.size(), kMaxSamplePeers); ++i) {
    const auto& p = t.peers[i];  // busiest first
    w.push_back(p.peer_id);
    w.push_back(p.writes_posted);
    w.push_back(p.bytes_written);
    w.push_back(p.errors);
  }
  std::vector<uint8_t> out(w.size() * 8);
  std::memcpy(out.data(), w.data(), out.size());
  return out;
}

Result<EngineSample> DecodeEngineSample(std::span<const uint8_t> rec) {
  if (rec.size() < kHeaderWords * 8 || rec.size() % 8 != 0)
    return InvalidArgument("engine sample of " + std::to_string(rec.size()) +
                           " bytes; expected a multiple of 8, at least " + std::to_string(kHeaderWords * 8));
  std::vector<uint64_t> w(rec.size() / 8);
  std::memcpy(w.data(), rec.data(), rec.size());
  if (w[0] != kSampleVersion)
    return InvalidArgument("engine sample version " + std::to_string(w[0]) + "; this build reads " +
                           std::to_string(kSampleVersion));
  if (w[10] > 64 || w[11] > kMaxSamplePeers || w.size() != kHeaderWords + 3 * w[10] + 4 * w[11])
    return InvalidArgument("engine sample names " + std::to_string(w[10]) + " domains and " + std::to_string(w[11]) +
                           " peers but holds " + std::to_string(w.size()) + " words");
  EngineSample s;
  s.time_ns = w[1];
  auto& t = s.stats;
  t.requests_submitted = w[2];
  t.requests_done = w[3];
  t.requests_failed = w[4];
  t.writes_posted = w[5];
  t.bytes_written = w[6];
  t.imms_received = w[7];
  t.latency_p50_us = w[8];
  t.latency_p99_us = w[9];
  for (size_t d = 0; d < w[10]; ++d)
    t.domains.push_back({w[kHeaderWords + 3 * d], w[kHeaderWords + 3 * d + 1], w[kHeaderWords + 3 * d + 2]});
  const size_t p0 = kHeaderWords + 3 * w[10];
  for (size_t p = 0; p < w[11]; ++p)
    t.peers.push_back({w[p0 + 4 * p], w[p0 + 4 * p + 1], w[p0 + 4 * p + 2], w[p0 + 4 * p + 3]});
  return s;
}

Result<std::unique_ptr<EngineStatsReporter>> EngineStatsReporter::Start(const TransferEngine* observed,
                                                                        std::unique_ptr<Reporter> reporter,
                                                                        uint32_t list,
                                                                        std::chrono::milliseconds period) {
  if (!observed || !reporter) return InvalidArgument("EngineStatsReporter needs an engine and a reporter");
  if (period.count() <= 0) return InvalidArgument("sampling period must be positive");
  std::unique_ptr<EngineStatsReporter> r(new EngineStatsReporter());
  r->observed_ = observed;
  r->reporter_ = std::move(reporter);
  r->list_ = list;
  r->period_ = period;
  // One sample up front: a collector too small for the records says so now.
  TE_RETURN_IF_ERROR(r->SampleOnce());
  r->thread_ = std::thread([p = r.get()] { p->Loop(); });
  return r;
}

EngineStatsReporter::~EngineStatsReporter() {
  StopAndJoin(mu_, cv_, stop_, thread_);
  (void)SampleOnce();
  (void)reporter_->Drain();
}

Status EngineStatsReporter::status() const {
  std::lock_guard<std::mutex> l(mu_);
  return error_;
}

Status EngineStatsReporter::SampleOnce() {
  EngineSample s;
  s.time_ns =
      uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
                   .count());
  s.stats = observed_->stats();
  const auto bytes = EncodeEngineSample(s);
  TE_RETURN_IF_ERROR(reporter_->Append(list_, bytes));
  TE_RETURN_IF_ERROR(reporter_->Flush());
  ++samples_;
  return Status::Ok();
}

void EngineStatsReporter::Loop() {
  std::unique_lock<std::mutex> l(mu_);
  while (!cv_.wait_for(l, period_, [&] { return stop_.load(); })) {
    l.unlock();
    Status st = SampleOnce();
    l.lock();
    if (!st.ok() && error_.ok()) error_ = st;
  }
}

}  // namespace te::telemetry
