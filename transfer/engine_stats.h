// Engine statistics: what TransferEngine::stats() returns, and the counters
// behind it.
//
// EngineCounters is written on the hot path, so every counter is a relaxed
// atomic any thread may bump, except the per-peer table: the worker owns it
// and publishes a snapshot at most every 10 ms, which readers copy under a
// lock. Snapshot() may run on any thread at any time.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace te {

// Per-domain (per-NIC) counters.
struct DomainStats {
  uint64_t writes_posted = 0;
  uint64_t bytes_written = 0;
  uint64_t errors = 0;  // writes and sends that completed with an error
};

// Per-peer counters (writes and control messages to that peer).
struct PeerStats {
  uint64_t peer_id = 0;  // Peer::id()
  uint64_t writes_posted = 0;
  uint64_t bytes_written = 0;
  uint64_t errors = 0;
};

// Per-engine counters, read at any time.
struct EngineStats {
  uint64_t requests_submitted = 0;
  uint64_t requests_done = 0;
  uint64_t requests_failed = 0;
  uint64_t writes_posted = 0;
  uint64_t bytes_written = 0;
  uint64_t imms_received = 0;
  uint64_t imms_dropped = 0;  // beyond EngineOptions::max_imm_values distinct values
  uint64_t messages_received = 0;
  uint64_t messages_dropped = 0;
  // Rounds of callbacks declared cheap (Completion::on_worker, ExpectImm on
  // the worker; those ready at one pass) that ran longer than
  // EngineOptions::slow_worker_callback: one of them blocked.
  uint64_t slow_worker_callbacks = 0;
  std::vector<DomainStats> domains;
  // Per peer, as of the worker's last snapshot (taken every 10 ms).
  std::vector<PeerStats> peers;
  // Submit-to-completion time of successful requests, sampled (one in 16 of
  // each submitting thread, its first included; every control message),
  // from a histogram with power-of-two microsecond buckets: each figure is
  // its bucket's upper bound.
  uint64_t latency_p50_us = 0;
  uint64_t latency_p99_us = 0;
};

class EngineCounters {
 public:
  explicit EngineCounters(size_t domains);

  // Any thread.
  void RequestSubmitted() { submitted_.fetch_add(1, std::memory_order_relaxed); }
  void RequestFailed() { failed_.fetch_add(1, std::memory_order_relaxed); }
  void RequestDone() { done_.fetch_add(1, std::memory_order_relaxed); }
  // A sampled request's Submit-to-completion time.
  void RequestLatency(std::chrono::steady_clock::duration latency);
  void ImmsReceived(uint64_t n) { imms_.fetch_add(n, std::memory_order_relaxed); }
  void MessageReceived() { messages_.fetch_add(1, std::memory_order_relaxed); }
  void MessageDropped() { dropped_.fetch_add(1, std::memory_order_relaxed); }
  void SlowWorkerCallback() { slow_callbacks_.fetch_add(1, std::memory_order_relaxed); }

  // The worker only.
  void Posted(size_t domain, uint64_t peer, bool is_write, uint64_t bytes);
  void WorkFailed(size_t domain, uint64_t peer);
  // Publishes the per-peer table if it changed and 10 ms passed since the
  // last time.
  void MaybePublishPeers(std::chrono::steady_clock::time_point now);

  // `imms_dropped` comes from the ImmCounter, which owns that count.
  EngineStats Snapshot(uint64_t imms_dropped) const;

 private:
  static constexpr int kLatencyBuckets = 40;  // bucket b: latency < 2^b us
  struct DomainCounters {
    std::atomic<uint64_t> writes{0}, bytes{0}, errors{0};
  };

  std::atomic<uint64_t> submitted_{0}, done_{0}, failed_{0}, writes_{0}, bytes_{0}, imms_{0}, messages_{0}, dropped_{0},
      slow_callbacks_{0};
  std::atomic<uint64_t> latency_[kLatencyBuckets] = {};
  size_t domain_count_;
  std::unique_ptr<DomainCounters[]> domains_;

  // Worker-owned per-peer table and its published copy.
  std::unordered_map<uint64_t, PeerStats> peers_;
  PeerStats* last_peer_ = nullptr;
  uint64_t last_peer_id_ = 0;
  bool peers_dirty_ = false;
  std::chrono::steady_clock::time_point next_peer_publish_;
  mutable std::mutex published_mu_;
  std::vector<PeerStats> published_peers_;
};

}  // namespace te
