// GPU memory through the same-host domain (CUDA IPC, nic/local/cuda_ipc.h):
// device to device, host to device and device to host-shared memory, with
// exact immediates. Skips without a GPU (and then nothing here has run: the
// path is labelled untested in docs/ARCHITECTURE.md until it does).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "integration/test_support.h"
#include "nic/local/cuda_ipc.h"
#include "transfer/shared_host_memory.h"

namespace te::testing {
namespace {

TEST(LocalCudaIpc, GpuRegionsTakeTheSameHostDomain) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) GTEST_SKIP() << "no GPU";
  ASSERT_TRUE(nic::CudaIpc::Get().Available().ok()) << nic::CudaIpc::Get().Available().ToString();
  constexpr size_t kBytes = (8 << 20) + 4096;
  std::vector<uint8_t> host(kBytes), back(kBytes, 0);
  FillPattern(host.data(), kBytes, 3);
  void *src = nullptr, *dst = nullptr;
  ASSERT_EQ(cudaMalloc(&src, kBytes), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dst, kBytes), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(src, host.data(), kBytes, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemset(dst, 0, kBytes), cudaSuccess);
  auto a = TransferEngine::Create(Options("local")).value();
  auto b = TransferEngine::Create(Options("local")).value();
  auto src_mr = a->RegisterMemory(src, kBytes, Memory::Cuda(0)).value();
  auto dst_mr = b->RegisterMemory(dst, kBytes, Memory::Cuda(0)).value();
  auto host_mr = a->RegisterMemory(host.data(), kBytes).value();
  auto remote = a->Import(b->Describe(*dst_mr)).value();
  CompletionCounter done;
  // Device to device (first half) and host to device (second half).
  ASSERT_TRUE(a->Submit(SingleWrite{src_mr, 0, kBytes / 2, remote, 0, 0x71}, {.counter = &done}).ok());
  ASSERT_TRUE(
      a->Submit(SingleWrite{host_mr, kBytes / 2, kBytes / 2, remote, kBytes / 2, 0x71}, {.counter = &done}).ok());
  WaitDone(done, 2);
  ASSERT_TRUE(b->WaitImm(0x71, 2, std::chrono::seconds(10)).ok());
  ASSERT_EQ(cudaMemcpy(back.data(), dst, kBytes, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_TRUE(back == host);
  // Device to host SharedHostMemory.
  auto shared = AllocateSharedHostMemory(kBytes).value();
  auto shared_mr = b->RegisterMemory(shared->data(), kBytes).value();
  auto to_shared = a->Import(b->Describe(*shared_mr)).value();
  ASSERT_TRUE(a->Submit(SingleWrite{src_mr, 0, kBytes, to_shared, 0, 0x72}, {.counter = &done}).ok());
  WaitDone(done, 3);
  ASSERT_TRUE(b->WaitImm(0x72, 1, std::chrono::seconds(10)).ok());
  EXPECT_EQ(0, memcmp(shared->data(), host.data(), kBytes));
  src_mr.reset();
  dst_mr.reset();
  cudaFree(src);
  cudaFree(dst);
}

}  // namespace
}  // namespace te::testing
