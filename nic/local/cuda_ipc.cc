#include "nic/local/cuda_ipc.h"

#include <dlfcn.h>

#include <cstring>
#include <mutex>
#include <string>

namespace te::nic {

// The few driver entry points used, declared here so that no CUDA header is
// needed to build (their types are fixed by the driver's ABI).
struct CudaIpc::Driver {
  using CUresult = int;
  using CUdevice = int;
  using CUcontext = void*;
  using CUdeviceptr = unsigned long long;
  struct CUipcMemHandle {
    char reserved[64];
  };
  CUresult (*cuInit)(unsigned int);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*cuCtxSetCurrent)(CUcontext);
  CUresult (*cuMemGetAddressRange)(CUdeviceptr*, size_t*, CUdeviceptr);
  CUresult (*cuIpcGetMemHandle)(CUipcMemHandle*, CUdeviceptr);
  CUresult (*cuIpcOpenMemHandle)(CUdeviceptr*, CUipcMemHandle, unsigned int);
  CUresult (*cuIpcCloseMemHandle)(CUdeviceptr);
  using CUstream = void*;
  CUresult (*cuStreamCreate)(CUstream*, unsigned int);
  CUresult (*cuStreamSynchronize)(CUstream);
  CUresult (*cuStreamDestroy)(CUstream);
  CUresult (*cuMemcpyAsync)(CUdeviceptr, CUdeviceptr, size_t, CUstream);
  CUresult (*cuGetErrorString)(CUresult, const char**);
  static constexpr unsigned int kStreamNonBlocking = 1;  // CU_STREAM_NON_BLOCKING

  std::mutex mu;
  CUcontext contexts[64] = {};  // primary contexts retained, by device ordinal

  std::string Error(const char* call, CUresult r) {
    const char* text = nullptr;
    if (cuGetErrorString == nullptr || cuGetErrorString(r, &text) != 0 || text == nullptr) text = "unknown error";
    return std::string(call) + " failed: " + text + " (" + std::to_string(r) + ")";
  }
  // Makes `device`'s primary context current on this thread.
  Status Use(int device) {
    if (device < 0 || device >= 64)
      return InvalidArgument("CUDA device " + std::to_string(device) + " outside [0, 64)");
    CUcontext ctx;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (contexts[device] == nullptr) {
        CUdevice dev;
        if (CUresult r = cuDeviceGet(&dev, device); r != 0) return IoError(Error("cuDeviceGet", r));
        if (CUresult r = cuDevicePrimaryCtxRetain(&contexts[device], dev); r != 0)
          return IoError(Error("cuDevicePrimaryCtxRetain", r));
      }
      ctx = contexts[device];
    }
    if (CUresult r = cuCtxSetCurrent(ctx); r != 0) return IoError(Error("cuCtxSetCurrent", r));
    return Status::Ok();
  }
};

CudaIpc::CudaIpc() : driver_(nullptr) {
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    status_ = Unimplemented("CUDA IPC: no CUDA driver (libcuda.so.1 not found)");
    return;
  }
  auto* d = new Driver();
  bool ok = true;
  auto load = [&](auto** fn, const char* name) {
    *reinterpret_cast<void**>(fn) = dlsym(lib, name);
    ok = ok && *fn != nullptr;
  };
  load(&d->cuInit, "cuInit");
  load(&d->cuDeviceGet, "cuDeviceGet");
  load(&d->cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
  load(&d->cuCtxSetCurrent, "cuCtxSetCurrent");
  load(&d->cuMemGetAddressRange, "cuMemGetAddressRange_v2");
  load(&d->cuIpcGetMemHandle, "cuIpcGetMemHandle");
  load(&d->cuIpcOpenMemHandle, "cuIpcOpenMemHandle_v2");
  load(&d->cuIpcCloseMemHandle, "cuIpcCloseMemHandle");
  load(&d->cuStreamCreate, "cuStreamCreate");
  load(&d->cuStreamSynchronize, "cuStreamSynchronize");
  load(&d->cuStreamDestroy, "cuStreamDestroy_v2");
  load(&d->cuMemcpyAsync, "cuMemcpyAsync");
  load(&d->cuGetErrorString, "cuGetErrorString");
  if (!ok) {
    delete d;
    status_ = Unimplemented("CUDA IPC: the CUDA driver lacks an IPC entry point");
    return;
  }
  if (Driver::CUresult r = d->cuInit(0); r != 0) {
    status_ = Unimplemented("CUDA IPC: " + d->Error("cuInit", r));
    delete d;
    return;
  }
  driver_ = d;  // kept for the process's life, like the library
}

CudaIpc& CudaIpc::Get() {
  static CudaIpc* instance = new CudaIpc();
  return *instance;
}

Status CudaIpc::Available() { return driver_ ? Status::Ok() : status_; }

Result<CudaIpc::Export> CudaIpc::ExportRange(const void* ptr, size_t length, int device) {
  if (!driver_) return status_;
  TE_RETURN_IF_ERROR(driver_->Use(device));
  const auto p = Driver::CUdeviceptr(reinterpret_cast<uintptr_t>(ptr));
  Driver::CUdeviceptr base = 0;
  size_t size = 0;
  if (Driver::CUresult r = driver_->cuMemGetAddressRange(&base, &size, p); r != 0)
    return InvalidArgument(driver_->Error("cuMemGetAddressRange", r) + ": not device memory of device " +
                           std::to_string(device));
  if (p - base > size || length > size - (p - base))
    return InvalidArgument("CUDA IPC: the range of " + std::to_string(length) +
                           " bytes spans more than one allocation");
  Driver::CUipcMemHandle h;
  if (Driver::CUresult r = driver_->cuIpcGetMemHandle(&h, base); r != 0)
    return Unimplemented(driver_->Error("cuIpcGetMemHandle", r) +
                         " (memory legacy CUDA IPC cannot export, e.g. a VMM allocation)");
  Export e;
  std::memcpy(e.handle.bytes, h.reserved, sizeof h.reserved);
  e.offset = p - base;
  return e;
}

Result<CudaIpc::Opened> CudaIpc::Open(const CudaIpcHandle& handle, int device) {
  if (!driver_) return status_;
  TE_RETURN_IF_ERROR(driver_->Use(device));
  Driver::CUipcMemHandle h;
  std::memcpy(h.reserved, handle.bytes, sizeof h.reserved);
  Driver::CUdeviceptr base = 0;
  constexpr unsigned int kLazyEnablePeerAccess = 1;
  if (Driver::CUresult r = driver_->cuIpcOpenMemHandle(&base, h, kLazyEnablePeerAccess); r != 0)
    return IoError(driver_->Error("cuIpcOpenMemHandle", r));
  Driver::CUdeviceptr start = 0;
  size_t size = 0;
  if (Driver::CUresult r = driver_->cuMemGetAddressRange(&start, &size, base); r != 0 || start != base) {
    driver_->cuIpcCloseMemHandle(base);
    return IoError("CUDA IPC: the opened allocation has no address range");
  }
  return Opened{uint64_t(base), uint64_t(size)};
}

void CudaIpc::Close(uint64_t base) {
  if (driver_ && base) driver_->cuIpcCloseMemHandle(Driver::CUdeviceptr(base));
}

// The calling thread's copy stream for `device` (made current): a copy
// waits for its own stream only, not for another thread's copies, and not
// for the application's work (non-blocking: not for the legacy default
// stream either).
Result<void*> CudaIpc::ThreadStream(int device) {
  if (!driver_) return status_;
  TE_RETURN_IF_ERROR(driver_->Use(device));  // checks `device` too
  struct ThreadStreams {
    Driver* driver = nullptr;
    void* streams[64] = {};
    ~ThreadStreams() {
      for (void* s : streams)
        if (s && driver) driver->cuStreamDestroy(s);
    }
  };
  thread_local ThreadStreams mine;
  mine.driver = driver_;
  void*& stream = mine.streams[device];
  if (stream == nullptr) {
    if (Driver::CUresult r = driver_->cuStreamCreate(&stream, Driver::kStreamNonBlocking); r != 0) {
      stream = nullptr;
      return IoError(driver_->Error("cuStreamCreate", r));
    }
  }
  return stream;
}

// Not cuMemcpy: it returns before a device-to-device copy (or one from
// pageable host memory) has landed, and the immediate that follows a write
// must not overtake its bytes; hence a stream, and Wait.
Status CudaIpc::CopyAsync(uint64_t dst, const void* src, size_t length, int device) {
  auto stream = ThreadStream(device);
  if (!stream.ok()) return stream.status();
  const auto from = Driver::CUdeviceptr(reinterpret_cast<uintptr_t>(src));
  if (Driver::CUresult r = driver_->cuMemcpyAsync(Driver::CUdeviceptr(dst), from, length, *stream); r != 0)
    return IoError(driver_->Error("cuMemcpyAsync", r));
  return Status::Ok();
}

Status CudaIpc::Wait(int device) {
  auto stream = ThreadStream(device);
  if (!stream.ok()) return stream.status();
  if (Driver::CUresult r = driver_->cuStreamSynchronize(*stream); r != 0)
    return IoError(driver_->Error("cuStreamSynchronize", r));
  return Status::Ok();
}

}  // namespace te::nic
