#include "transfer/staging/cuda_copy_engine.h"

#include <cuda_runtime.h>

#include <deque>
#include <string>

namespace te {

namespace {

Status CudaError(const char* what, cudaError_t e) {
  return Unavailable(std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

class CudaCopyEngine final : public CopyEngine {
 public:
  explicit CudaCopyEngine(int device) : device_(device) {}
  ~CudaCopyEngine() override {
    cudaSetDevice(device_);
    for (auto& [ticket, ev] : events_) cudaEventDestroy(ev);
    for (void* p : pinned_) cudaHostUnregister(p);
    if (stream_) cudaStreamDestroy(stream_);
  }
  Status Init() {
    if (cudaError_t e = cudaSetDevice(device_); e != cudaSuccess) return CudaError("cudaSetDevice", e);
    if (cudaError_t e = cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking); e != cudaSuccess)
      return CudaError("cudaStreamCreate", e);
    return Status::Ok();
  }
  Result<uint64_t> Start(void* dst, const void* src, size_t n) override {
    cudaSetDevice(device_);
    if (cudaError_t e = cudaMemcpyAsync(dst, src, n, cudaMemcpyDefault, stream_); e != cudaSuccess)
      return CudaError("cudaMemcpyAsync", e);
    cudaEvent_t ev;
    if (cudaError_t e = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming); e != cudaSuccess)
      return CudaError("cudaEventCreate", e);
    cudaEventRecord(ev, stream_);
    events_.emplace_back(++tickets_, ev);
    return tickets_;
  }
  Status Wait(uint64_t ticket) override {
    // Copies on one stream finish in order: waiting for `ticket` retires it
    // and everything before it.
    Status result;
    while (!events_.empty() && events_.front().first <= ticket) {
      if (cudaError_t e = cudaEventSynchronize(events_.front().second); e != cudaSuccess && result.ok())
        result = CudaError("cudaEventSynchronize", e);
      cudaEventDestroy(events_.front().second);
      events_.pop_front();
    }
    return result;
  }
  Status PinHostMemory(void* p, size_t n) override {
    if (cudaError_t e = cudaHostRegister(p, n, cudaHostRegisterDefault); e != cudaSuccess)
      return CudaError("cudaHostRegister", e);
    pinned_.push_back(p);
    return Status::Ok();
  }
  const char* name() const override { return "cuda stream"; }

 private:
  int device_;
  cudaStream_t stream_ = nullptr;
  uint64_t tickets_ = 0;
  std::deque<std::pair<uint64_t, cudaEvent_t>> events_;
  std::deque<void*> pinned_;
};

}  // namespace

Result<std::unique_ptr<CopyEngine>> MakeCudaCopyEngine(int device) {
  int count = 0;
  if (cudaError_t e = cudaGetDeviceCount(&count); e != cudaSuccess) return CudaError("cudaGetDeviceCount", e);
  if (device < 0 || device >= count)
    return Unavailable("CUDA device " + std::to_string(device) + " outside [0, " + std::to_string(count) + ")");
  auto engine = std::make_unique<CudaCopyEngine>(device);
  TE_RETURN_IF_ERROR(engine->Init());
  return std::unique_ptr<CopyEngine>(std::move(engine));
}

}  // namespace te
