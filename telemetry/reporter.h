// Reporter: batches key-writes and list appends into one-sided writes
// without immediates, straight into a collector's region.
//
// Each batch is one ScatterWrite (one request, many writes) from a slice of
// a registered staging buffer; a slice is reused once its request finished.
// Calls block only when every slice is in flight (back-pressure). Not
// thread-safe: one Reporter per reporting thread.
#pragma once

#include <chrono>
#include <memory>
#include <vector>

#include "telemetry/collector.h"
#include "transfer/transfer_engine.h"

namespace te::telemetry {

struct ReporterOptions {
  uint32_t ring = 0;             // this reporter's ring in every append list
  size_t writes_per_batch = 64;  // slot or record writes per request
  size_t batches_in_flight = 8;  // staging slices
  std::chrono::milliseconds timeout{10000};
};

struct ReporterStats {
  uint64_t key_writes = 0;  // KeyWrite calls
  uint64_t appends = 0;     // Append calls
  uint64_t writes = 0;      // one-sided writes issued
  uint64_t batches = 0;
  uint64_t failed_batches = 0;
};

class Reporter {
 public:
  static Result<std::unique_ptr<Reporter>> Create(TransferEngine* engine, const CollectorInfo& info,
                                                  const ReporterOptions& options = {});
  ~Reporter();  // flushes and waits (bounded by the timeout)

  // Writes `value` under `key` into the key's N slots.
  Status KeyWrite(std::span<const uint8_t> key, std::span<const uint8_t> value);
  // Appends one record to list `list` (this reporter's ring).
  Status Append(uint32_t list, std::span<const uint8_t> record);
  // Submits the current batch.
  Status Flush();
  // Flushes and waits until every batch finished; the first failure, if any.
  Status Drain();

  const ReporterStats& stats() const { return stats_; }

 private:
  Reporter() = default;
  Status Reserve(size_t writes);  // makes room in the current batch
  Status WaitForSlice(size_t slice);

  TransferEngine* engine_ = nullptr;
  CollectorInfo info_;
  ReporterOptions options_;
  RemoteMr dst_;
  size_t write_bytes_ = 0;  // staging bytes per write
  LocalMr staging_mr_;
  std::vector<std::unique_ptr<CompletionCounter>> slice_done_;
  std::vector<uint64_t> slice_submitted_;
  size_t slice_ = 0;
  ScatterWrite batch_;
  std::vector<uint64_t> next_seq_;  // per list
  std::vector<uint8_t> scratch_;
  ReporterStats stats_;
};

}  // namespace te::telemetry
