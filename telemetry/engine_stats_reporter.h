// EngineStatsReporter: an engine reports its own health into a collector.
//
// A thread samples TransferEngine::stats() every `period` and appends one
// record to an append list through a Reporter: engine-wide counters, request
// latency percentiles, and per-domain (per-NIC) writes, bytes and errors.
// The collector runs nothing to ingest them; readers follow the ring and
// decode samples with DecodeEngineSample. Per-peer counters are included
// for the kMaxSamplePeers busiest peers. The observed engine may be the one
// that carries the writes.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

#include "telemetry/reporter.h"

namespace te::telemetry {

struct EngineSample {
  uint64_t time_ns = 0;  // steady clock of the observed process
  EngineStats stats;
};

// A sample carries at most this many peers (the busiest by bytes).
inline constexpr size_t kMaxSamplePeers = 16;
// Bytes a sample with `domains` domains and `peers` peers takes in a record;
// size the collector's record_bytes with EngineSampleBytes(domains, kMaxSamplePeers).
size_t EngineSampleBytes(size_t domains, size_t peers = kMaxSamplePeers);
std::vector<uint8_t> EncodeEngineSample(const EngineSample& sample);
Result<EngineSample> DecodeEngineSample(std::span<const uint8_t> record);

class EngineStatsReporter {
 public:
  // `reporter` is owned and used only by the sampling thread.
  static Result<std::unique_ptr<EngineStatsReporter>> Start(const TransferEngine* observed,
                                                            std::unique_ptr<Reporter> reporter, uint32_t list,
                                                            std::chrono::milliseconds period);
  ~EngineStatsReporter();  // takes a last sample, drains, stops

  uint64_t samples() const { return samples_.load(); }
  // The first error the sampling thread met (OK if none).
  Status status() const;

 private:
  EngineStatsReporter() = default;
  void Loop();
  Status SampleOnce();

  const TransferEngine* observed_ = nullptr;
  std::unique_ptr<Reporter> reporter_;
  uint32_t list_ = 0;
  std::chrono::milliseconds period_{};
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> samples_{0};
  mutable std::mutex mu_;
  std::condition_variable cv_;
  Status error_;
  std::thread thread_;
};

}  // namespace te::telemetry
