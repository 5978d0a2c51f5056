// The staging path with the CUDA copy engine: device memory to device
// memory over tcp, through registered host buffers. Skips without a GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "integration/test_support.h"
#include "transfer/staging/cuda_copy_engine.h"
#include "transfer/staging/staged_transfer.h"

namespace te::testing {
namespace {

TEST(StagedTransferCuda, DeviceToDeviceOverTcpIsByteExact) {
  auto copies = MakeCudaCopyEngine(0);
  if (!copies.ok()) GTEST_SKIP() << "no GPU: " << copies.status().ToString();
  const size_t bytes = (64 << 20) + 4097;
  std::vector<uint8_t> host(bytes), back(bytes, 0);
  FillPattern(host.data(), bytes, 21);
  void *src = nullptr, *dst = nullptr;
  ASSERT_EQ(cudaMalloc(&src, bytes), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dst, bytes), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(src, host.data(), bytes, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemset(dst, 0, bytes), cudaSuccess);

  auto sender_engine = TransferEngine::Create(Options("tcp")).value();
  auto receiver_engine = TransferEngine::Create(Options("tcp")).value();
  std::vector<uint8_t> staging(bytes);
  auto staging_mr = receiver_engine->RegisterMemory(staging.data(), bytes).value();
  auto remote = sender_engine->Import(receiver_engine->Describe(*staging_mr)).value();
  auto sender = StagedSender::Create(sender_engine.get(), copies->get()).value();
  ASSERT_TRUE(sender->Write(src, bytes, remote, 0, 3).ok());
  auto receive_copies = MakeCudaCopyEngine(0).value();
  StagedReceiver receiver(receiver_engine.get(), receive_copies.get());
  ASSERT_TRUE(receiver.Receive(dst, staging.data(), bytes, 3, sender->ExpectedImms(bytes, remote).value(), 30s).ok());
  ASSERT_EQ(cudaMemcpy(back.data(), dst, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_TRUE(back == host);
  cudaFree(src);
  cudaFree(dst);
}

}  // namespace
}  // namespace te::testing
