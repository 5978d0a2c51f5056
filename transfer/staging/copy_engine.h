// CopyEngine: asynchronous copies between device memory and host memory.
//
// The staging path (staged_transfer.h) moves GPU memory over providers that
// cannot register it (Debian's libfabric is built without FI_HMEM, and tcp
// has no GPU support anywhere) by copying through registered host buffers.
// This interface is what it copies with:
//   - CudaCopyEngine (transfer/staging/cuda_copy_engine.h, built when nvcc is found):
//     cudaMemcpyAsync on its own stream, one event per copy;
//   - HostCopyEngine: memcpy, for host memory and for testing the pipeline
//     on machines without a GPU.
//
// Threads: one thread at a time per engine (the staged transfer's caller).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "base/status.h"

namespace te {

class CopyEngine {
 public:
  virtual ~CopyEngine() = default;
  // Starts copying `n` bytes from `src` to `dst` (either may be device
  // memory, as the engine's kind allows) and returns a ticket for Wait.
  virtual Result<uint64_t> Start(void* dst, const void* src, size_t n) = 0;
  // Blocks until copy `ticket` (and every copy started before it) is done.
  virtual Status Wait(uint64_t ticket) = 0;
  // Makes host memory fast to copy to and from (CUDA: page-locks it);
  // called once for a staging ring. Default: nothing to do.
  virtual Status PinHostMemory(void*, size_t) { return Status::Ok(); }
  virtual const char* name() const = 0;
};

// memcpy, done at Start.
std::unique_ptr<CopyEngine> MakeHostCopyEngine();

}  // namespace te
