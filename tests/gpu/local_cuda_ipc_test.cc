// GPU memory through the same-host domain (CUDA IPC, nic/local/cuda_ipc.h):
// device to device, host to device and device to host-shared memory, with
// exact immediates, in one process and between two (the target a child
// process owning a cudaMalloc region, which the initiator opens through
// cuIpcOpenMemHandle). Skips without a GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "base/crc32c.h"
#include "integration/peer_process.h"
#include "integration/test_support.h"
#include "nic/local/cuda_ipc.h"
#include "transfer/shared_host_memory.h"

namespace te::testing {
namespace {

void* AllocateGpuRegion(size_t bytes) {
  void* p = nullptr;
  if (cudaMalloc(&p, bytes) != cudaSuccess) return nullptr;
  if (cudaMemset(p, 0, bytes) != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) return nullptr;
  return p;
}
bool ReadGpuRegion(void* host, const void* device, size_t bytes) {
  return cudaMemcpy(host, device, bytes, cudaMemcpyDeviceToHost) == cudaSuccess;
}
const GpuRegionHooks kGpuRegions{AllocateGpuRegion, ReadGpuRegion, 0};
// A child started for a GPU region serves from here (peer_process.h).
const bool kServedGpuChild = (PeerProcess::gpu_hooks = &kGpuRegions, PeerProcess::ServeIfChild());

bool HaveGpu() {
  int devices = 0;
  return cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
}

// A pattern of `bytes` on the host and a copy of it in device memory,
// registered with `engine`; freed (registration first) on scope exit.
struct GpuSource {
  GpuSource(TransferEngine* engine, size_t bytes, uint32_t salt) : host(bytes) {
    FillPattern(host.data(), bytes, salt);
    if (cudaMalloc(&device, bytes) != cudaSuccess) device = nullptr;
    if (device && cudaMemcpy(device, host.data(), bytes, cudaMemcpyHostToDevice) == cudaSuccess) {
      auto r = engine->RegisterMemory(device, bytes, Memory::Cuda(0));
      if (r.ok()) mr = std::move(r).value();
    }
  }
  ~GpuSource() {
    mr.reset();
    if (device) cudaFree(device);
  }
  std::vector<uint8_t> host;
  void* device = nullptr;
  LocalMr mr;  // null if any step failed
};

TEST(LocalCudaIpc, GpuRegionsTakeTheSameHostDomain) {
  if (!HaveGpu()) GTEST_SKIP() << "no GPU";
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

// Another process's GPU region: opened through CUDA IPC once per
// registration, written device to device and host to device (single and
// paged writes), byte-exact with exact immediates; a range past the region
// and a guessed key are refused by the target's table before any copy; a
// deregistered region is refused at the next write.
TEST(LocalCudaIpc, AnotherProcessesGpuRegionIsOpenedAndWritten) {
  if (!HaveGpu()) GTEST_SKIP() << "no GPU";
  constexpr size_t kBytes = (16 << 20) + 4096;
  PeerProcess peer(Options("local"), kBytes, PeerRegion::kGpu);
  ASSERT_EQ(peer.descriptor_hex().rfind("ERROR", 0), std::string::npos) << peer.descriptor_hex();
  auto engine = TransferEngine::Create(Options("local")).value();
  GpuSource source(engine.get(), kBytes, 41);
  ASSERT_TRUE(source.mr);
  std::vector<uint8_t>& host = source.host;
  const LocalMr& gpu_mr = source.mr;
  auto host_mr = engine->RegisterMemory(host.data(), kBytes).value();
  const MrDescriptor desc = MrDescriptor::FromHex(peer.descriptor_hex()).value();
  auto dst = engine->Import(desc).value();
  CompletionCounter done;
  const size_t half = kBytes / 2;
  ASSERT_TRUE(engine->Submit(SingleWrite{gpu_mr, 0, half, dst, 0, 0x41}, {.counter = &done}).ok());
  ASSERT_TRUE(engine->Submit(SingleWrite{host_mr, half, kBytes - half, dst, half, 0x41}, {.counter = &done}).ok());
  WaitDone(done, 2);
  ASSERT_EQ(peer.WaitImm(0x41, 2, 10000), "OK");
  EXPECT_EQ(peer.Crc(0, kBytes), Crc32c(host.data(), kBytes));
  // 64 pages from GPU memory in one request (one run of queued copies):
  // destination page (37 s + 5) mod 64 <- source page s.
  std::vector<uint32_t> src_pages(64), dst_pages(64);
  for (uint32_t i = 0; i < 64; ++i) src_pages[i] = i, dst_pages[i] = (37 * i + 5) % 64;
  PagedWrite pages{gpu_mr, src_pages, 4096, 0, dst, dst_pages, 4096, 0, 4096, 0x42};
  const uint64_t page_imms = engine->ExpectedImmCount(pages).value();
  ASSERT_TRUE(engine->Submit(pages, {.counter = &done}).ok());
  WaitDone(done, 3);
  ASSERT_EQ(peer.WaitImm(0x42, page_imms, 10000), "OK");
  for (uint32_t i = 0; i < 64; ++i)
    EXPECT_EQ(peer.Crc(dst_pages[i] * 4096, 4096), Crc32c(host.data() + src_pages[i] * 4096, 4096)) << "page " << i;

  // Past the region, and a guessed key: refused, nothing lands.
  MrDescriptor longer = desc;
  longer.length = kBytes * 2;
  auto forged = engine->Import(longer).value();
  MrDescriptor wrong_key = desc;
  wrong_key.keys.back().rkey ^= uint64_t(1) << 40;
  auto guessed = engine->Import(wrong_key).value();
  std::vector<uint8_t> zeros(8192, 0);
  auto zeros_mr = engine->RegisterMemory(zeros.data(), zeros.size()).value();
  CompletionCounter bad;
  ASSERT_TRUE(engine->Submit(SingleWrite{zeros_mr, 0, 8192, forged, kBytes - 4096, 0x43}, {.counter = &bad}).ok());
  ASSERT_TRUE(engine->Submit(SingleWrite{zeros_mr, 0, 4096, guessed, 4096, 0x43}, {.counter = &bad}).ok());
  ASSERT_TRUE(bad.WaitFinished(2, std::chrono::seconds(10)));
  EXPECT_EQ(bad.failed(), 2u);
  EXPECT_NE(peer.WaitImm(0x43, 1, 200), "OK");
  EXPECT_EQ(peer.Crc(kBytes - 4096, 4096), Crc32c(host.data() + kBytes - 4096, 4096));

  // Deregistered: refused at the next write.
  ASSERT_EQ(peer.Deregister(), "OK");
  CompletionCounter stale;
  ASSERT_TRUE(engine->Submit(SingleWrite{gpu_mr, 0, 4096, dst, 0, 0x44}, {.counter = &stale}).ok());
  ASSERT_TRUE(stale.WaitFinished(1, std::chrono::seconds(10)));
  EXPECT_EQ(stale.failed(), 1u);
}

// The immediate never overtakes the bytes: the target reads the last MiB of
// a 512 MiB device-to-device write the moment its immediate arrives (a copy
// returned before it landed would show the previous round's bytes there).
TEST(LocalCudaIpc, TheImmediateFollowsTheBytesOfALargeGpuWrite) {
  if (!HaveGpu()) GTEST_SKIP() << "no GPU";
  constexpr size_t kBytes = size_t(512) << 20, kTail = 1 << 20;
  PeerProcess peer(Options("local"), kBytes, PeerRegion::kGpu);
  ASSERT_EQ(peer.descriptor_hex().rfind("ERROR", 0), std::string::npos) << peer.descriptor_hex();
  auto engine = TransferEngine::Create(Options("local")).value();
  auto dst = engine->Import(MrDescriptor::FromHex(peer.descriptor_hex()).value()).value();
  std::vector<uint8_t> tail[2] = {std::vector<uint8_t>(kTail), std::vector<uint8_t>(kTail)};
  void* src[2] = {};
  LocalMr mr[2];
  for (int k = 0; k < 2; ++k) {
    ASSERT_EQ(cudaMalloc(&src[k], kBytes), cudaSuccess);
    ASSERT_EQ(cudaMemset(src[k], 0x30 + k, kBytes - kTail), cudaSuccess);
    FillPattern(tail[k].data(), kTail, 50 + k);
    ASSERT_EQ(cudaMemcpy(static_cast<uint8_t*>(src[k]) + kBytes - kTail, tail[k].data(), kTail, cudaMemcpyHostToDevice),
              cudaSuccess);
    mr[k] = engine->RegisterMemory(src[k], kBytes, Memory::Cuda(0)).value();
  }
  for (int round = 0; round < 6; ++round) {
    const int k = round % 2;
    SingleWrite w{mr[k], 0, kBytes, dst, 0, 0x61};
    const uint64_t imms = engine->ExpectedImmCount(w).value();
    peer.StartWaitCrc(0x61, imms, 20000, kBytes - kTail, kTail);
    CompletionCounter done;
    ASSERT_TRUE(engine->Submit(w, {.counter = &done}).ok());
    EXPECT_EQ(peer.FinishWaitCrc(), "OK " + std::to_string(Crc32c(tail[k].data(), kTail))) << "round " << round;
    WaitDone(done, 1);
  }
  for (int k = 0; k < 2; ++k) {
    mr[k].reset();
    cudaFree(src[k]);
  }
}

// GPU memory into another process's host memory: SharedHostMemory is mapped
// and copied into by the GPU; heap memory (cross-memory attach cannot
// read GPU memory) is refused naming why.
TEST(LocalCudaIpc, GpuSourceIntoAnotherProcessesHostMemory) {
  if (!HaveGpu()) GTEST_SKIP() << "no GPU";
  constexpr size_t kBytes = 4 << 20;
  PeerProcess shared(Options("local"), kBytes, PeerRegion::kSharedHost);
  PeerProcess heap(Options("local"), kBytes, PeerRegion::kHeap);
  auto engine = TransferEngine::Create(Options("local")).value();
  GpuSource source(engine.get(), kBytes, 43);
  ASSERT_TRUE(source.mr);
  const std::vector<uint8_t>& host = source.host;
  const LocalMr& gpu_mr = source.mr;
  auto to_shared = engine->Import(MrDescriptor::FromHex(shared.descriptor_hex()).value()).value();
  auto to_heap = engine->Import(MrDescriptor::FromHex(heap.descriptor_hex()).value()).value();
  CompletionCounter done;
  ASSERT_TRUE(engine->Submit(SingleWrite{gpu_mr, 0, kBytes, to_shared, 0, 0x51}, {.counter = &done}).ok());
  WaitDone(done, 1);
  ASSERT_EQ(shared.WaitImm(0x51, 1, 10000), "OK");
  EXPECT_EQ(shared.Crc(0, kBytes), Crc32c(host.data(), kBytes));
  CompletionCounter refused;
  ASSERT_TRUE(engine->Submit(SingleWrite{gpu_mr, 0, 4096, to_heap, 0, 0x52}, {.counter = &refused}).ok());
  ASSERT_TRUE(refused.WaitFinished(1, std::chrono::seconds(10)));
  EXPECT_EQ(refused.failed(), 1u);
  EXPECT_NE(refused.first_error().ToString().find("GPU"), std::string::npos) << refused.first_error().ToString();
  const std::vector<uint8_t> zeros(4096, 0);
  EXPECT_EQ(heap.Crc(0, 4096), Crc32c(zeros.data(), 4096));
}

// A GPU target killed mid-stream: the initiator's requests end with errors
// within the timeout, and the engine then writes to a fresh GPU target.
TEST(LocalCudaIpc, KilledGpuTargetGivesErrorsWithinTheTimeout) {
  if (!HaveGpu()) GTEST_SKIP() << "no GPU";
  auto o = Options("local");
  o.request_timeout = std::chrono::milliseconds(2000);
  constexpr size_t kBytes = 8 << 20;
  PeerProcess peer(o, kBytes, PeerRegion::kGpu);
  PeerProcess fresh(o, kBytes, PeerRegion::kGpu);
  auto engine = TransferEngine::Create(o).value();
  GpuSource source(engine.get(), kBytes, 47);
  ASSERT_TRUE(source.mr);
  const std::vector<uint8_t>& host = source.host;
  const LocalMr& gpu_mr = source.mr;
  auto dst = engine->Import(MrDescriptor::FromHex(peer.descriptor_hex()).value()).value();
  CompletionCounter c;
  uint64_t submitted = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 200; ++i) {
    if (i == 50) peer.Kill();
    ASSERT_TRUE(engine->Submit(SingleWrite{gpu_mr, 0, 1 << 20, dst, uint64_t(i % 8) << 20, 9}, {.counter = &c}).ok());
    ++submitted;
  }
  ASSERT_TRUE(c.WaitFinished(submitted, std::chrono::seconds(15)))
      << "only " << c.finished() << " of " << submitted << " requests ended after the target died";
  EXPECT_GT(c.failed(), 0u);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(12));
  auto dst2 = engine->Import(MrDescriptor::FromHex(fresh.descriptor_hex()).value()).value();
  CompletionCounter ok;
  ASSERT_TRUE(engine->Submit(SingleWrite{gpu_mr, 0, kBytes, dst2, 0, 1}, {.counter = &ok}).ok());
  WaitDone(ok, 1);
  EXPECT_EQ(fresh.WaitImm(1, 1, 5000), "OK");
  EXPECT_EQ(fresh.Crc(0, kBytes), Crc32c(host.data(), kBytes));
}

}  // namespace
}  // namespace te::testing
