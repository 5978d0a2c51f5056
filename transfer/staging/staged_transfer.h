// Staged transfers: device memory sent and received through registered
// host buffers, for providers that cannot register device memory.
//
// Sender (StagedSender::Write): the source is cut into chunks; chunk k is
// copied into a slot of a registered host ring (CopyEngine) while chunks
// k-1, k-2, ... are on the wire as SingleWrites into the peer's region, each
// carrying `imm`. A slot is reused only after its write completed. Write
// returns once every write completed, or with the first error.
//
// Receiver (StagedReceiver::Receive): the peer writes into a registered host
// region; once the sender's immediates have all arrived, the region is
// copied to device memory chunk by chunk.
//
// Counting: a chunk is one SingleWrite, so it delivers one immediate per
// lane the sender uses to reach the destination (transfer/requests.h);
// ExpectedImms() says how many a Write of `length` bytes to `dst` delivers.
//
// Threads: a sender owns one staging ring, so one thread at a time calls its
// Write (use one sender per thread). Receive blocks its caller and keeps no
// state between calls: any number of threads may call it, each with its own
// staging memory. Both run their copies on the calling thread's CopyEngine.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "base/status.h"
#include "transfer/staging/copy_engine.h"
#include "transfer/transfer_engine.h"

namespace te {

struct StagingOptions {
  size_t chunk_bytes = 4 << 20;              // bytes per copy and per write
  int depth = 3;                             // slots in the ring: chunks in flight
  std::chrono::milliseconds timeout{30000};  // per chunk's write
};

class StagedSender {
 public:
  // Allocates and registers depth x chunk_bytes of host memory on `engine`.
  // `engine` and `copies` outlive the sender.
  static Result<std::unique_ptr<StagedSender>> Create(TransferEngine* engine, CopyEngine* copies,
                                                      const StagingOptions& options = {});

  Status Write(const void* src, size_t length, const RemoteMr& dst, uint64_t dst_offset, uint32_t imm);
  // Immediates a Write of `length` bytes to `dst` delivers to the receiver.
  Result<uint64_t> ExpectedImms(size_t length, const RemoteMr& dst) const;
  // The same for a destination reached over the NIC domains (not through
  // the same-host domain, where a chunk delivers one).
  [[deprecated("pass the destination: ExpectedImms(length, dst)")]] uint64_t ExpectedImms(size_t length) const {
    return (length + options_.chunk_bytes - 1) / options_.chunk_bytes * uint64_t(engine_->options().domains);
  }

 private:
  StagedSender(TransferEngine* engine, CopyEngine* copies, const StagingOptions& options)
      : engine_(engine), copies_(copies), options_(options) {}
  TransferEngine* engine_;
  CopyEngine* copies_;
  StagingOptions options_;
  LocalMr ring_mr_;
};

class StagedReceiver {
 public:
  // `staging` is host memory registered on `engine` (what the sender
  // writes into); `copies` moves it to device memory.
  StagedReceiver(TransferEngine* engine, CopyEngine* copies, const StagingOptions& options = {})
      : engine_(engine), copies_(copies), options_(options) {}

  // Waits (up to `timeout`) for `expected` arrivals of `imm`, then copies
  // `length` bytes from `staging` to `dst`.
  Status Receive(void* dst, const void* staging, size_t length, uint32_t imm, uint64_t expected,
                 std::chrono::milliseconds timeout);

 private:
  TransferEngine* engine_;
  CopyEngine* copies_;
  StagingOptions options_;
};

}  // namespace te
