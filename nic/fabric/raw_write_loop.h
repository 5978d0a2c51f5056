// RawWriteLoop: a bare libfabric loop on one endpoint, the baseline that
// te-bench measures the engine against in the same run.
//
// It is what a tuned provider benchmark does: fi_inject_writedata for
// payloads up to the provider's inject size (shm: 4 KiB), fi_writedata with
// the whole window posted before completions are read otherwise, fi_cq_read
// 32 entries at a time, all in one thread: no queues, no threads, no
// bookkeeping beyond timestamps. It opens its own endpoint with the same
// provider and options as the engine's domains.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "base/status.h"
#include "nic/fabric/fabric_options.h"

namespace te::nic {

class RawWriteLoop {
 public:
  struct Op {
    uint64_t local_offset = 0;
    uint64_t remote_offset = 0;
    uint64_t length = 0;
  };
  struct RunStats {
    double seconds = 0;                    // first post .. peer's ack
    std::vector<double> batch_latency_us;  // first post .. last completion of a batch
  };

  static Result<std::unique_ptr<RawWriteLoop>> Open(const FabricOptions& options, size_t buffer_bytes);
  ~RawWriteLoop();

  std::vector<uint8_t> address() const;
  uint64_t rkey() const;
  uint64_t remote_base() const;  // what the peer adds offsets to
  uint8_t* buffer();
  size_t buffer_bytes() const;

  Status Connect(std::span<const uint8_t> peer_address, uint64_t peer_rkey, uint64_t peer_remote_base);

  // Posts `ops` in order, at most `window` outstanding, each carrying `imm`;
  // `batch` consecutive ops are one latency sample. Then waits for the peer's
  // zero-byte `ack_imm`.
  Result<RunStats> RunWrites(std::span<const Op> ops, size_t window, size_t batch, uint32_t imm, uint32_t ack_imm,
                             std::chrono::milliseconds timeout);
  // Peer side of RunWrites: waits for `expected` arrivals of `imm`, then
  // writes `ack_imm` back.
  Status Serve(uint64_t expected, uint32_t imm, uint32_t ack_imm, std::chrono::milliseconds timeout);

  // Zero-byte round trips: Ping sends `imm` and waits for one back, per
  // iteration, returning each round trip in microseconds; Pong answers.
  Result<std::vector<double>> Ping(int iterations, uint32_t imm, std::chrono::milliseconds timeout);
  Status Pong(int iterations, uint32_t imm, std::chrono::milliseconds timeout);

 private:
  struct Impl;
  explicit RawWriteLoop(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace te::nic
