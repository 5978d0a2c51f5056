#include "transfer/engine_stats.h"

#include <algorithm>

namespace te {

EngineCounters::EngineCounters(size_t domains)
    : domain_count_(domains), domains_(std::make_unique<DomainCounters[]>(domains)) {}

void EngineCounters::RequestLatency(std::chrono::steady_clock::duration latency) {
  const auto us = std::chrono::duration_cast<std::chrono::microseconds>(latency).count();
  int b = 0;
  while (b < kLatencyBuckets - 1 && (uint64_t(1) << b) <= uint64_t(us)) ++b;
  latency_[b].fetch_add(1, std::memory_order_relaxed);
}

namespace {
// Counters with one writer (the worker) and any number of readers: a plain
// load and store, not a locked read-modify-write, per posted write.
void Bump(std::atomic<uint64_t>& c, uint64_t n) {
  c.store(c.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
}
}  // namespace

void EngineCounters::Posted(size_t domain, uint64_t peer, bool is_write, uint64_t bytes) {
  // Runs of writes go to one peer: remember the last one's entry (element
  // references in an unordered_map survive rehashing).
  if (last_peer_ == nullptr || last_peer_id_ != peer) {
    last_peer_ = &peers_[peer];
    last_peer_id_ = peer;
  }
  PeerStats& ps = *last_peer_;
  peers_dirty_ = true;
  if (!is_write) return;
  ps.writes_posted++;
  ps.bytes_written += bytes;
  Bump(writes_, 1);
  Bump(bytes_, bytes);
  Bump(domains_[domain].writes, 1);
  Bump(domains_[domain].bytes, bytes);
}

void EngineCounters::WorkFailed(size_t domain, uint64_t peer) {
  domains_[domain].errors.fetch_add(1, std::memory_order_relaxed);
  peers_[peer].errors++;
  peers_dirty_ = true;
}

void EngineCounters::MaybePublishPeers(std::chrono::steady_clock::time_point now) {
  if (!peers_dirty_ || now < next_peer_publish_) return;
  next_peer_publish_ = now + std::chrono::milliseconds(10);
  std::vector<PeerStats> snap;
  snap.reserve(peers_.size());
  for (const auto& [id, ps] : peers_) {
    snap.push_back(ps);
    snap.back().peer_id = id;
  }
  std::sort(snap.begin(), snap.end(),
            [](const PeerStats& a, const PeerStats& b) { return a.bytes_written > b.bytes_written; });
  std::lock_guard<std::mutex> lock(published_mu_);
  published_peers_ = std::move(snap);
  peers_dirty_ = false;
}

EngineStats EngineCounters::Snapshot(uint64_t imms_dropped) const {
  EngineStats s;
  s.requests_submitted = submitted_.load();
  s.requests_done = done_.load();
  s.requests_failed = failed_.load();
  s.writes_posted = writes_.load();
  s.bytes_written = bytes_.load();
  s.imms_received = imms_.load();
  s.imms_dropped = imms_dropped;
  s.messages_received = messages_.load();
  s.messages_dropped = dropped_.load();
  s.slow_worker_callbacks = slow_callbacks_.load();
  for (size_t d = 0; d < domain_count_; ++d)
    s.domains.push_back({domains_[d].writes.load(), domains_[d].bytes.load(), domains_[d].errors.load()});
  uint64_t hist[kLatencyBuckets], total = 0;
  for (int b = 0; b < kLatencyBuckets; ++b) total += hist[b] = latency_[b].load();
  auto percentile = [&](double p) -> uint64_t {
    if (total == 0) return 0;
    uint64_t seen = 0;
    for (int b = 0; b < kLatencyBuckets; ++b) {
      seen += hist[b];
      if (double(seen) >= p * double(total)) return uint64_t(1) << b;
    }
    return uint64_t(1) << (kLatencyBuckets - 1);
  };
  {
    std::lock_guard<std::mutex> lock(published_mu_);
    s.peers = published_peers_;
  }
  s.latency_p50_us = percentile(0.5);
  s.latency_p99_us = percentile(0.99);
  return s;
}

}  // namespace te
