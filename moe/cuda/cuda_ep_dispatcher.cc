#include "moe/cuda/cuda_ep_dispatcher.h"

#include <atomic>
#include <chrono>
#include <cstring>
#include <string>

#include "base/stop_and_join.h"
#include "moe/dispatch_records.h"

namespace te::moe {
namespace {

Status CudaCheck(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::Ok();
  return IoError(std::string(what) + ": " + cudaGetErrorString(e));
}
#define TE_CUDA(call) TE_RETURN_IF_ERROR(CudaCheck((call), #call))

uint64_t LoadAcquire(uint64_t* p) { return std::atomic_ref<uint64_t>(*p).load(std::memory_order_acquire); }
void StoreRelease(uint64_t* p, uint64_t v) { std::atomic_ref<uint64_t>(*p).store(v, std::memory_order_release); }

}  // namespace

CudaEpDispatcher::CudaEpDispatcher(EpDispatcher* host, int device, uint32_t capacity)
    : host_(host), device_(device), capacity_(capacity) {}

Result<std::unique_ptr<CudaEpDispatcher>> CudaEpDispatcher::Create(EpDispatcher* host, int device,
                                                                   uint32_t expert_capacity) {
  if (!host) return InvalidArgument("CudaEpDispatcher needs an EpDispatcher");
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) return Unavailable("no CUDA device");
  if (device < 0 || device >= count)
    return InvalidArgument("CUDA device " + std::to_string(device) + " outside [0, " + std::to_string(count) + ")");
  const EpConfig& c = host->config();
  if (c.token_bytes() % 4) return InvalidArgument("token bytes must be a multiple of 4 for the CUDA path");
  const uint32_t capacity = expert_capacity ? expert_capacity : c.max_tokens * c.ranks;
  std::unique_ptr<CudaEpDispatcher> d(new CudaEpDispatcher(host, device, capacity));
  TE_RETURN_IF_ERROR(d->Init());
  return d;
}

Status CudaEpDispatcher::Init() {
  TE_CUDA(cudaSetDevice(device_));
  const EpConfig& c = host_->config();
  for (const auto& b : host_->host_buffers()) {
    TE_CUDA(cudaHostRegister(b.data, b.bytes, cudaHostRegisterMapped));
    mapped_.push_back(b);
  }
  TE_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&control_), sizeof(Control), cudaHostAllocMapped));
  std::memset(control_, 0, sizeof(Control));
  // One copy per (received row, local expert): at most every token of every
  // rank times top-k.
  max_ops_ = c.max_tokens * c.ranks * c.topk;
  TE_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&ops_), sizeof(cuda::CopyOp) * max_ops_, cudaHostAllocMapped));
  // Expert buffers are sized for the largest local expert count a map may
  // give this rank: all experts.
  const size_t rows = size_t(c.experts) * capacity_;
  TE_CUDA(cudaMalloc(&expert_data_, rows * c.token_bytes()));
  if (c.scale_count()) TE_CUDA(cudaMalloc(&expert_scales_, rows * c.scale_count() * sizeof(float)));
  TE_CUDA(cudaMalloc(&row_token_, sizeof(uint32_t) * c.max_tokens * std::min(c.topk, c.ranks)));
  TE_CUDA(cudaMalloc(&index_, sizeof(uint32_t) * (size_t(c.max_tokens) * c.ranks * (c.topk + 1) + 2)));
  TE_CUDA(cudaMalloc(&terms_, sizeof(cuda::RowTerm) * max_ops_));
  proxy_ = std::thread([this] {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait(lock, [&] { return stop_ || !job_done_; });
      if (stop_) return;
      auto job = std::move(job_);
      lock.unlock();
      Status s = job();
      lock.lock();
      job_status_ = s;
      job_done_ = true;
      cv_.notify_all();
    }
  });
  return Status::Ok();
}

CudaEpDispatcher::~CudaEpDispatcher() {
  StopAndJoin(mu_, cv_, stop_, proxy_);
  for (const auto& b : mapped_) cudaHostUnregister(b.data);
  cudaFreeHost(control_);
  cudaFreeHost(ops_);
  cudaFree(expert_data_);
  cudaFree(expert_scales_);
  cudaFree(row_token_);
  cudaFree(index_);
  cudaFree(terms_);
}

void CudaEpDispatcher::StartProxy(std::function<Status()> job) {
  std::lock_guard<std::mutex> lock(mu_);
  job_ = std::move(job);
  job_done_ = false;
  cv_.notify_all();
}

Status CudaEpDispatcher::JoinProxy() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return job_done_; });
  return job_status_;
}

template <typename T>
T* CudaEpDispatcher::Device(const void* host_ptr) const {
  for (const auto& b : mapped_) {
    const uint8_t* p = static_cast<const uint8_t*>(host_ptr);
    if (p >= b.data && p < b.data + b.bytes) {
      void* base = nullptr;
      if (cudaHostGetDevicePointer(&base, b.data, 0) != cudaSuccess) return nullptr;
      return reinterpret_cast<T*>(static_cast<uint8_t*>(base) + (p - b.data));
    }
  }
  void* d = nullptr;
  if (cudaHostGetDevicePointer(&d, const_cast<void*>(host_ptr), 0) != cudaSuccess) return nullptr;
  return static_cast<T*>(d);
}

// Waits (on the proxy) for the GPU's flag: the payloads are in place.
static Status AwaitPacked(uint64_t* flag, uint64_t seq, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (LoadAcquire(flag) < seq) {
    if (std::chrono::steady_clock::now() > deadline)
      return Timeout("GPU did not finish packing step " + std::to_string(seq) + " in " +
                     std::to_string(timeout.count()) + " ms");
    std::this_thread::yield();
  }
  return Status::Ok();
}

Status CudaEpDispatcher::Dispatch(const TokenBatch& batch, const ExpertMap& map, cudaStream_t stream,
                                  CudaDispatchOutput* out) {
  const EpConfig& c = host_->config();
  if (!out) return InvalidArgument("Dispatch needs an output");
  TE_CUDA(cudaSetDevice(device_));
  // The routing, on the host, to plan the records.
  std::vector<int32_t> idx(size_t(batch.tokens) * c.topk);
  std::vector<float> weights(idx.size());
  if (batch.tokens > 0) {
    if (!batch.topk_idx || !batch.topk_weights) return InvalidArgument("topk_idx and topk_weights must be given");
    TE_CUDA(cudaMemcpyAsync(idx.data(), batch.topk_idx, idx.size() * 4, cudaMemcpyDeviceToHost, stream));
    TE_CUDA(cudaMemcpyAsync(weights.data(), batch.topk_weights, weights.size() * 4, cudaMemcpyDeviceToHost, stream));
    TE_CUDA(cudaStreamSynchronize(stream));
  }
  const TokenBatch host_view{batch.tokens, batch.data, batch.scales, idx.data(), weights.data()};
  TE_RETURN_IF_ERROR(ValidateBatch(c, map, host_view));
  TE_RETURN_IF_ERROR(host_->PrepareDispatch());
  const uint64_t seq = ++seq_;
  ResetResult(c, map, &out->meta);
  std::vector<uint32_t> row_token;
  PackRecords(c, map, host_view, host_->send_records(), &plan_, &out->meta.handle, /*copy_payload=*/false, &row_token);

  // GPU: payloads into the mapped staging, then the flag.
  TE_CUDA(cudaMemcpyAsync(row_token_, row_token.data(), row_token.size() * 4, cudaMemcpyHostToDevice, stream));
  TE_CUDA(cuda::LaunchGatherPayloads(batch.data, batch.scales, row_token_, uint32_t(row_token.size()),
                                     Device<uint8_t>(host_->send_records()), RecordBytes(c), RecordPayloadOffset(c),
                                     c.token_bytes(), uint32_t(c.scale_count()), stream));
  TE_CUDA(cuda::LaunchRaiseFlag(&Device<Control>(control_)->packed, seq, stream));

  // Proxy: the exchange, then the copy list, then the GPU's flag.
  const uint8_t* recv_host = mapped_[0].data;
  StartProxy([&, seq]() -> Status {
    Status s = AwaitPacked(&control_->packed, seq, c.timeout);
    std::vector<const uint8_t*> rows;
    if (s.ok()) s = host_->DispatchPacked(plan_, map, batch.tokens, &out->meta, &rows);
    uint32_t n = 0;
    if (s.ok()) {
      const auto& h = out->meta.handle;
      for (size_t q = 0; q < rows.size(); ++q)
        for (uint32_t i = h.row_begin[q]; i < h.row_begin[q + 1]; ++i) {
          const RowEntry& e = h.entries[i];
          if (e.position >= capacity_) {
            s = Unavailable("local expert " + std::to_string(e.local_expert) + " received more than its capacity " +
                            std::to_string(capacity_) + " tokens");
            break;
          }
          const uint64_t row = uint64_t(e.local_expert) * capacity_ + e.position;
          ops_[n++] = {uint64_t(rows[q] - recv_host) + RecordPayloadOffset(c), row * c.token_bytes(),
                       row * c.scale_count()};
        }
    }
    control_->ops = s.ok() ? n : 0;
    StoreRelease(&control_->ready, seq);  // releases the GPU even on failure
    return s;
  });
  // The proxy's job refers to this frame: always join it before returning.
  Status launched = CudaCheck(
      cuda::LaunchAwaitFlag(&Device<Control>(control_)->ready, seq, uint64_t(c.timeout.count() + 1000) * 1000000ull,
                            &Device<Control>(control_)->timed_out, stream),
      "await kernel");
  if (launched.ok())
    launched =
        CudaCheck(cuda::LaunchScatterPayloads(
                      Device<uint8_t>(recv_host), Device<cuda::CopyOp>(ops_), &Device<Control>(control_)->ops,
                      c.token_bytes(), uint32_t(c.scale_count()), expert_data_, expert_scales_, max_ops_, stream),
                  "unpack kernel");
  Status proxied = JoinProxy();
  TE_CUDA(cudaStreamSynchronize(stream));
  TE_RETURN_IF_ERROR(proxied);
  TE_RETURN_IF_ERROR(launched);
  if (control_->timed_out) return Timeout("GPU gave up waiting for the dispatch exchange");
  out->data = expert_data_;
  out->scales = expert_scales_;
  out->capacity = capacity_;
  out->counts.clear();
  for (const auto& e : out->meta.experts) out->counts.push_back(e.count);
  return Status::Ok();
}

Status CudaEpDispatcher::Combine(const uint16_t* expert_outputs, const CudaDispatchOutput& d, uint16_t* out,
                                 cudaStream_t stream) {
  const EpConfig& c = host_->config();
  const DispatchHandle& h = d.meta.handle;
  TE_CUDA(cudaSetDevice(device_));
  const uint64_t seq = ++seq_;
  // The reduction's terms, on the device.
  std::vector<cuda::RowTerm> terms;
  for (const RowEntry& e : h.entries)
    terms.push_back({(uint64_t(e.local_expert) * capacity_ + e.position) * c.hidden, e.weight, 0});
  const uint32_t rows = uint32_t(h.row_begin.size() - 1);
  std::vector<uint32_t> index(h.row_begin);
  const size_t token_begin_at = index.size();
  index.insert(index.end(), h.token_row_begin.begin(), h.token_row_begin.end());
  const size_t token_rows_at = index.size();
  index.insert(index.end(), h.token_rows.begin(), h.token_rows.end());
  TE_CUDA(cudaMemcpyAsync(terms_, terms.data(), terms.size() * sizeof(cuda::RowTerm), cudaMemcpyHostToDevice, stream));
  TE_CUDA(cudaMemcpyAsync(index_, index.data(), index.size() * 4, cudaMemcpyHostToDevice, stream));
  TE_CUDA(cuda::LaunchReducePartials(expert_outputs, index_, terms_, rows, c.hidden,
                                     Device<uint16_t>(host_->send_partials()), stream));
  TE_CUDA(cuda::LaunchRaiseFlag(&Device<Control>(control_)->packed, seq, stream));
  const uint16_t* back = nullptr;
  StartProxy([&, seq]() -> Status {
    Status s = AwaitPacked(&control_->packed, seq, c.timeout);
    if (s.ok()) {
      auto r = host_->CombinePacked(d.meta);
      if (r.ok())
        back = *r;
      else
        s = r.status();
    }
    StoreRelease(&control_->ready, seq);
    return s;
  });
  Status launched = CudaCheck(
      cuda::LaunchAwaitFlag(&Device<Control>(control_)->ready, seq, uint64_t(c.timeout.count() + 1000) * 1000000ull,
                            &Device<Control>(control_)->timed_out, stream),
      "await kernel");
  Status proxied = JoinProxy();  // always: the job refers to this frame
  if (!proxied.ok() || !launched.ok()) {
    cudaStreamSynchronize(stream);
    return proxied.ok() ? launched : proxied;
  }
  TE_CUDA(cuda::LaunchSumPartials(Device<uint16_t>(back), index_ + token_begin_at, index_ + token_rows_at, h.tokens,
                                  c.hidden, out, stream));
  TE_CUDA(cudaStreamSynchronize(stream));
  if (control_->timed_out) return Timeout("GPU gave up waiting for the combine exchange");
  return Status::Ok();
}

}  // namespace te::moe
