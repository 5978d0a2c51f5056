// CudaEpDispatcher: MoE dispatch/combine for tokens in GPU memory, on top of
// an EpDispatcher (same protocol, same group, same bits as the host path).
//
// Where the work happens:
//  - The GPU, on the caller's stream: a pack kernel gathers token payloads
//    from device memory straight into the EpDispatcher's registered send
//    staging (host memory mapped into the GPU), then raises a host-mapped
//    flag; after the exchange, an unpack kernel copies received payloads into
//    per-expert device buffers. Combine: a kernel reduces expert outputs into
//    partial rows in mapped host memory; another sums the rows that came back.
//  - A proxy thread on the host: waits for the flag, runs the exchange
//    (counts, writes, immediates; EpDispatcher::DispatchPacked /
//    CombinePacked), writes the copy list into mapped memory and raises the
//    flag the GPU waits on.
// Routing (topk_idx, weights: a few KiB) is copied to the host to plan the
// records. Any provider works, since the NIC only ever touches host memory;
// a GPU-direct variant would register device memory instead.
//
// Dispatch and Combine block until their results are in device memory.
//
// Streams: during an exchange, `stream` holds a kernel that waits for the
// proxy, and the proxy waits for the other ranks. One rank per process (the
// normal deployment) needs nothing more. Several ranks in one process on one
// GPU must give each its own non-blocking stream
// (cudaStreamCreateWithFlags(..., cudaStreamNonBlocking)) and keep device-wide
// synchronizing calls (cudaMalloc, cudaFree, cudaHostRegister, anything on
// the legacy default stream) out of the time another rank may be in an
// exchange: such a call waits for that rank's kernel, and if that rank in
// turn waits for this one, both stop until the dispatcher's timeout. The
// GPU must also run both ranks' kernels at once: under compute-sanitizer,
// which serializes a process's kernels, two ranks of one process wait for
// each other after their first layer.
//
// Verified on an H200 (tests/gpu/moe_cuda_test.cc); this repository's CI
// has no GPU: see docs/ARCHITECTURE.md for what has been verified where.
#pragma once

#include <cuda_runtime.h>

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "base/status.h"
#include "moe/cuda/dispatch_kernels.h"
#include "moe/ep_dispatcher.h"

namespace te::moe {

// Dispatch results in device memory: local expert e's tokens are rows
// [e * capacity, e * capacity + counts[e]) of `data` (token_bytes each) and,
// for fp8, of `scales` (hidden / 128 floats each). Owned by the dispatcher,
// valid until the next Dispatch.
struct CudaDispatchOutput {
  uint8_t* data = nullptr;
  float* scales = nullptr;
  uint32_t capacity = 0;
  std::vector<uint32_t> counts;
  DispatchResult meta;  // sources, weights and the combine handle (host)
};

class CudaEpDispatcher {
 public:
  // `host` (connected, not used directly while this one is) and `device`;
  // expert_capacity: rows per local expert, 0 = max_tokens x ranks.
  static Result<std::unique_ptr<CudaEpDispatcher>> Create(EpDispatcher* host, int device, uint32_t expert_capacity = 0);
  ~CudaEpDispatcher();

  // `batch` pointers are device memory.
  Status Dispatch(const TokenBatch& batch, const ExpertMap& map, cudaStream_t stream, CudaDispatchOutput* out);
  // expert_outputs: device [local experts][capacity][hidden] bf16; out: device [tokens][hidden] bf16.
  Status Combine(const uint16_t* expert_outputs, const CudaDispatchOutput& dispatched, uint16_t* out,
                 cudaStream_t stream);

 private:
  CudaEpDispatcher(EpDispatcher* host, int device, uint32_t capacity);
  Status Init();
  // Runs `job` on the proxy thread and waits for it.
  void StartProxy(std::function<Status()> job);
  Status JoinProxy();
  template <typename T>
  T* Device(const void* host_ptr) const;  // device address of mapped host memory

  EpDispatcher* host_;
  int device_;
  uint32_t capacity_;
  std::vector<EpDispatcher::HostBuffer> mapped_;
  // Host-mapped control block: flags, copy-op count, timeout marker.
  struct Control {
    uint64_t packed;  // GPU -> proxy: payloads for dispatch/combine seq are in the staging
    uint64_t ready;   // proxy -> GPU: exchange for seq is done
    uint32_t ops;     // copy ops the unpack kernel runs
    uint32_t timed_out;
  };
  Control* control_ = nullptr;
  cuda::CopyOp* ops_ = nullptr;  // mapped host, capacity max_ops_
  uint32_t max_ops_ = 0;
  uint8_t* expert_data_ = nullptr;
  float* expert_scales_ = nullptr;
  uint32_t* row_token_ = nullptr;   // device
  uint32_t* index_ = nullptr;       // device: row_begin / token rows for the combine kernels
  cuda::RowTerm* terms_ = nullptr;  // device
  uint64_t seq_ = 0;
  SendPlan plan_;

  std::thread proxy_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::function<Status()> job_;
  bool job_done_ = true, stop_ = false;
  Status job_status_;
};

}  // namespace te::moe
