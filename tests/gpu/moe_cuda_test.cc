// The CUDA path of MoE dispatch/combine against the reference, bit for bit:
// EP ranks as threads sharing one GPU, each with its own engine (tcp on
// loopback). Skips, saying so, where there is no GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

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

template <typename T>
T* ToDevice(const std::vector<T>& v) {
  T* d = nullptr;
  if (v.empty()) return nullptr;
  cudaMalloc(&d, v.size() * sizeof(T));
  cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

std::string RunCudaRank(moe::EpDispatcher& host, const moe::ExpertMap& map, const std::vector<uint32_t>& tokens,
                        uint32_t layers) {
  const moe::EpConfig& c = host.config();
  auto dev = moe::CudaEpDispatcher::Create(&host, 0);
  if (!dev.ok()) return dev.status().ToString();
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  std::string err;
  for (uint32_t l = 0; l < layers && err.empty(); ++l) {
    ReferenceLayer ref = RunReference(c, map, Routing::kRandom, tokens, 5, l);
    const BatchData& b = ref.batches[c.rank];
    uint8_t* d_data = ToDevice(b.data);
    float* d_scales = ToDevice(b.scales);
    int32_t* d_idx = ToDevice(b.idx);
    float* d_w = ToDevice(b.weights);
    moe::CudaDispatchOutput out;
    Status s = (*dev)->Dispatch({b.tokens, d_data, d_scales, d_idx, d_w}, map, stream, &out);
    if (!s.ok()) err = "dispatch: " + s.ToString();
    for (size_t e = 0; err.empty() && e < out.counts.size(); ++e) {
      const auto& want = ref.dispatched[c.rank][e];
      if (out.counts[e] != want.count) {
        err = "expert " + std::to_string(want.expert) + " count " + std::to_string(out.counts[e]);
        break;
      }
      std::vector<uint8_t> got(size_t(want.count) * c.token_bytes());
      cudaMemcpy(got.data(), out.data + e * size_t(out.capacity) * c.token_bytes(), got.size(), cudaMemcpyDeviceToHost);
      if (got != want.data) err = "expert " + std::to_string(want.expert) + " token bytes differ";
      if (c.scale_count()) {
        std::vector<float> sc(size_t(want.count) * c.scale_count());
        cudaMemcpy(sc.data(), out.scales + e * size_t(out.capacity) * c.scale_count(), sc.size() * 4,
                   cudaMemcpyDeviceToHost);
        if (sc != want.scales) err = "expert " + std::to_string(want.expert) + " scales differ";
      }
    }
    if (err.empty()) {
      // Expert outputs laid out [local expert][capacity][hidden].
      std::vector<uint16_t> outputs(out.counts.size() * size_t(out.capacity) * c.hidden, 0);
      for (size_t e = 0; e < out.counts.size(); ++e)
        std::copy(ref.outputs[c.rank][e].begin(), ref.outputs[c.rank][e].end(),
                  outputs.begin() + e * size_t(out.capacity) * c.hidden);
      uint16_t* d_out = ToDevice(outputs);
      uint16_t* d_combined = nullptr;
      cudaMalloc(&d_combined, size_t(b.tokens) * c.hidden * 2 + 2);
      s = (*dev)->Combine(d_out, out, d_combined, stream);
      if (!s.ok()) err = "combine: " + s.ToString();
      std::vector<uint16_t> combined(size_t(b.tokens) * c.hidden);
      cudaMemcpy(combined.data(), d_combined, combined.size() * 2, cudaMemcpyDeviceToHost);
      if (err.empty() && combined != ref.combined[c.rank]) err = "combined output differs from the reference";
      cudaFree(d_out);
      cudaFree(d_combined);
    }
    cudaFree(d_data), cudaFree(d_scales), cudaFree(d_idx), cudaFree(d_w);
    if (!err.empty()) err = "layer " + std::to_string(l) + ": " + err;
  }
  cudaStreamDestroy(stream);
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
  for (uint32_t r = 0; r < 2; ++r)
    threads.emplace_back([&, r] { errors[r] = RunCudaRank(*ranks[r], map, {32, 19}, 3); });
  for (auto& t : threads) t.join();
  for (uint32_t r = 0; r < 2; ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

INSTANTIATE_TEST_SUITE_P(Payloads, MoeCuda, ::testing::Values(moe::Payload::kBf16, moe::Payload::kFp8E4M3));

}  // namespace
}  // namespace te::testing
