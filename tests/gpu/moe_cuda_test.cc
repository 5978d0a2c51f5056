// The CUDA path of MoE dispatch/combine against the reference, bit for bit:
// EP ranks as threads sharing one GPU, each with its own engine (tcp on
// loopback). Skips, saying so, where there is no GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <barrier>
#include <thread>

#include "integration/moe_group.h"
#include "integration/test_support.h"
#include "moe/cuda/cuda_ep_dispatcher.h"

namespace te::testing {
namespace {

bool HaveGpu(std::string* why) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess)
    *why = std::string("no usable CUDA device: ") + cudaGetErrorString(e);
  else if (n == 0)
    *why = "no CUDA device on this machine";
  return e == cudaSuccess && n > 0;
}

// Host to device on `stream` (null for an empty vector).
template <typename T>
T* ToDevice(const std::vector<T>& v, cudaStream_t stream) {
  T* d = nullptr;
  if (v.empty() || cudaMalloc(&d, v.size() * sizeof(T)) != cudaSuccess) return nullptr;
  cudaMemcpyAsync(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice, stream);
  return d;
}
template <typename T>
bool ToHost(std::vector<T>* v, const void* device, cudaStream_t stream) {
  return cudaMemcpyAsync(v->data(), device, v->size() * sizeof(T), cudaMemcpyDeviceToHost, stream) == cudaSuccess &&
         cudaStreamSynchronize(stream) == cudaSuccess;
}

// One rank's inputs of one layer, in device memory.
struct DeviceBatch {
  uint8_t* data;
  float* scales;
  int32_t* idx;
  float* weights;
};

// One EP rank on the GPU, for `layers` layers. Ranks share the GPU (threads
// of this process): every allocation happens before `sync` lets any rank
// dispatch, and the run uses only its own non-blocking stream, because a
// device-wide synchronizing call (cudaMalloc/cudaFree, the legacy default
// stream) would wait for another rank's exchange kernel while that rank
// waits for this one (cuda_ep_dispatcher.h).
std::string RunCudaRank(moe::EpDispatcher& host, const moe::ExpertMap& map, const std::vector<uint32_t>& tokens,
                        uint32_t layers, std::barrier<>& sync) {
  const moe::EpConfig& c = host.config();
  std::string err;
  cudaStream_t stream = nullptr;
  if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) err = "stream";
  auto dev = moe::CudaEpDispatcher::Create(&host, 0);
  if (err.empty() && !dev.ok()) err = dev.status().ToString();
  std::vector<ReferenceLayer> refs;
  std::vector<DeviceBatch> inputs;
  for (uint32_t l = 0; l < layers; ++l) {
    refs.push_back(RunReference(c, map, Routing::kRandom, tokens, 5, l));
    const BatchData& b = refs.back().batches[c.rank];
    inputs.push_back(
        {ToDevice(b.data, stream), ToDevice(b.scales, stream), ToDevice(b.idx, stream), ToDevice(b.weights, stream)});
  }
  // Expert outputs [local expert][capacity][hidden] for at most every expert.
  const size_t output_elems = size_t(c.experts) * c.max_tokens * c.ranks * c.hidden;
  uint16_t *d_out = nullptr, *d_combined = nullptr;
  if (cudaMalloc(&d_out, output_elems * 2) != cudaSuccess ||
      cudaMalloc(&d_combined, size_t(c.max_tokens) * c.hidden * 2 + 2) != cudaSuccess ||
      cudaStreamSynchronize(stream) != cudaSuccess)
    err = "device buffers";
  sync.arrive_and_wait();

  for (uint32_t l = 0; l < layers && err.empty(); ++l) {
    const ReferenceLayer& ref = refs[l];
    const BatchData& b = ref.batches[c.rank];
    const DeviceBatch& in = inputs[l];
    moe::CudaDispatchOutput out;
    Status s = (*dev)->Dispatch({b.tokens, in.data, in.scales, in.idx, in.weights}, map, stream, &out);
    if (!s.ok()) err = "dispatch: " + s.ToString();
    for (size_t e = 0; err.empty() && e < out.counts.size(); ++e) {
      const auto& want = ref.dispatched[c.rank][e];
      if (out.counts[e] != want.count) {
        err = "expert " + std::to_string(want.expert) + " count " + std::to_string(out.counts[e]);
        break;
      }
      std::vector<uint8_t> got(size_t(want.count) * c.token_bytes());
      if (!ToHost(&got, out.data + e * size_t(out.capacity) * c.token_bytes(), stream)) err = "copy back";
      if (got != want.data) err = "expert " + std::to_string(want.expert) + " token bytes differ";
      if (c.scale_count()) {
        std::vector<float> sc(size_t(want.count) * c.scale_count());
        if (!ToHost(&sc, out.scales + e * size_t(out.capacity) * c.scale_count(), stream)) err = "copy back";
        if (sc != want.scales) err = "expert " + std::to_string(want.expert) + " scales differ";
      }
    }
    if (err.empty()) {
      std::vector<uint16_t> outputs(out.counts.size() * size_t(out.capacity) * c.hidden, 0);
      for (size_t e = 0; e < out.counts.size(); ++e)
        std::copy(ref.outputs[c.rank][e].begin(), ref.outputs[c.rank][e].end(),
                  outputs.begin() + e * size_t(out.capacity) * c.hidden);
      if (outputs.size() > output_elems ||
          cudaMemcpyAsync(d_out, outputs.data(), outputs.size() * 2, cudaMemcpyHostToDevice, stream) != cudaSuccess)
        err = "expert outputs";
      if (err.empty()) s = (*dev)->Combine(d_out, out, d_combined, stream);
      if (err.empty() && !s.ok()) err = "combine: " + s.ToString();
      std::vector<uint16_t> combined(size_t(b.tokens) * c.hidden);
      if (err.empty() && !ToHost(&combined, d_combined, stream)) err = "copy back";
      if (err.empty() && combined != ref.combined[c.rank]) err = "combined output differs from the reference";
    }
    if (!err.empty()) err = "layer " + std::to_string(l) + ": " + err;
  }

  sync.arrive_and_wait();  // no rank's exchange is in flight any more
  dev = Status(Unavailable("released"));
  for (const DeviceBatch& in : inputs) cudaFree(in.data), cudaFree(in.scales), cudaFree(in.idx), cudaFree(in.weights);
  cudaFree(d_out);
  cudaFree(d_combined);
  if (stream) cudaStreamDestroy(stream);
  return err;
}

class MoeCuda : public ::testing::TestWithParam<moe::Payload> {};

TEST_P(MoeCuda, TwoRanksMatchTheReference) {
  std::string why;
  if (!HaveGpu(&why)) GTEST_SKIP() << why << "; the CUDA path is built but not run here";
  moe::EpConfig shape;
  shape.ranks = 2;
  shape.experts = 8;
  shape.topk = 3;
  shape.hidden = 256;
  shape.max_tokens = 32;
  shape.payload = GetParam();
  shape.private_tokens = 4;  // the overflow region too
  std::vector<std::unique_ptr<TransferEngine>> engines;
  std::vector<std::unique_ptr<moe::EpDispatcher>> ranks;
  std::vector<std::string> infos;
  for (uint32_t r = 0; r < 2; ++r) {
    engines.push_back(TransferEngine::Create(Options("tcp")).value());
    shape.rank = r;
    ranks.push_back(moe::EpDispatcher::Create(engines.back().get(), shape).value());
    infos.push_back(ranks.back()->LocalInfo());
  }
  for (auto& d : ranks) ASSERT_TRUE(d->Connect(infos).ok());
  const moe::ExpertMap map = moe::ExpertMap::Contiguous(8, 2).value();
  std::vector<std::string> errors(2);
  std::vector<std::thread> threads;
  std::barrier sync(2);
  for (uint32_t r = 0; r < 2; ++r)
    threads.emplace_back([&, r] { errors[r] = RunCudaRank(*ranks[r], map, {32, 19}, 3, sync); });
  for (auto& t : threads) t.join();
  for (uint32_t r = 0; r < 2; ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

INSTANTIATE_TEST_SUITE_P(Payloads, MoeCuda, ::testing::Values(moe::Payload::kBf16, moe::Payload::kFp8E4M3));

}  // namespace
}  // namespace te::testing
