// CudaIpc: GPU memory shared between processes of one host (CUDA IPC), for
// the same-host domain (nic/local/local_domain.h).
//
// The target exports the allocation that holds a registered range
// (cuIpcGetMemHandle); an initiator opens it once (cuIpcOpenMemHandle) and
// copies into it on a stream of its own, from host or device memory
// (unified addressing), over NVLink or PCIe, with no NIC; the engine waits
// for a run's copies before it sends the run's immediates.
//
// The CUDA driver is loaded at run time (dlopen of libcuda.so.1): nothing is
// linked, so this builds everywhere, and without a driver (this build
// machine) every call returns kUnimplemented naming why. Memory from
// cudaMalloc works; memory that legacy IPC cannot export (VMM allocations
// such as PyTorch's expandable segments) is refused at Export, and the
// engine then reaches that region over the NICs.
//
// Verified on an H200 between two processes (tests/gpu/local_cuda_ipc_test.cc);
// see docs/ARCHITECTURE.md ("What is verified where").
// Thread-safe; calls run on the caller's thread with the primary context of
// the device they name made current.
#pragma once

#include <cstddef>
#include <cstdint>

#include "base/status.h"

namespace te::nic {

struct CudaIpcHandle {
  uint8_t bytes[64];
};

class CudaIpc {
 public:
  // The process-wide instance (the driver loaded on first use).
  static CudaIpc& Get();

  // Ok when the driver is loaded and initialized.
  Status Available();

  struct Export {
    CudaIpcHandle handle;
    uint64_t offset;  // of the range's first byte in the exported allocation
  };
  // The handle of the allocation holding [ptr, ptr + length) on `device`.
  Result<Export> ExportRange(const void* ptr, size_t length, int device);

  // Opens a peer's handle in `device`'s context: the allocation's base in
  // this process, and its size (what the peer's offsets are checked against).
  struct Opened {
    uint64_t base;
    uint64_t size;
  };
  Result<Opened> Open(const CudaIpcHandle& handle, int device);
  void Close(uint64_t base);

  // Queues a copy of `length` bytes from `src` (host or device) to `dst`
  // (device, or host memory mapped here) on the calling thread's own
  // non-blocking stream for `device`. The bytes have landed only once Wait
  // returns: it waits for every copy the thread queued for `device` (or
  // names the first failure). Both on the same thread.
  Status CopyAsync(uint64_t dst, const void* src, size_t length, int device);
  Status Wait(int device);

 private:
  CudaIpc();
  Result<void*> ThreadStream(int device);
  struct Driver;
  Driver* driver_;  // null when no driver could be loaded
  Status status_;
};

}  // namespace te::nic
