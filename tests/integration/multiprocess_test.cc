// Sender in this process, receiver in a forked child: the provider carries the
// bytes between address spaces, as between hosts.
#include <gtest/gtest.h>

#include <thread>

#include "integration/peer_process.h"
#include "integration/test_support.h"

namespace te::testing {
namespace {

class MultiProcess : public ::testing::TestWithParam<std::string> {};

TEST_P(MultiProcess, LargeRegionCrossesProcessesByteExact) {
  constexpr size_t kBytes = 256ull << 20;
  PeerProcess peer(Options(GetParam(), 2), kBytes);
  auto desc = MrDescriptor::FromHex(peer.descriptor_hex());
  ASSERT_TRUE(desc.ok()) << peer.descriptor_hex();
  auto engine = TransferEngine::Create(Options(GetParam(), 2)).value();
  std::vector<uint8_t> src(kBytes);
  FillPattern(src.data(), src.size(), 42);
  auto mr = engine->RegisterMemory(src.data(), src.size()).value();
  auto dst = engine->Import(desc.value()).value();
  // The whole region in 16 MiB single writes, each sharded over 2 domains.
  constexpr size_t kChunk = 16 << 20;
  CompletionCounter done;
  uint64_t imms = 0;
  for (size_t off = 0; off < kBytes; off += kChunk) {
    SingleWrite w{mr, off, kChunk, dst, off, 0x1234};
    imms += engine->ExpectedImmCount(w).value();
    ASSERT_TRUE(engine->Submit(w, {.counter = &done}).ok());
  }
  WaitDone(done, kBytes / kChunk, 120s);
  ASSERT_EQ(peer.WaitImm(0x1234, imms, 60000), "OK");
  EXPECT_EQ(peer.Crc(0, kBytes), Crc32c(src.data(), kBytes));
  EXPECT_EQ(peer.Crc(12345, 777), Crc32c(src.data() + 12345, 777));
}

// tcp and local; not shm: libfabric 1.17's shm provider guards each peer's queue with a
// process-shared spinlock, and a peer killed while holding it leaves the
// sender spinning inside fi_writedata, beyond any timeout this engine can
// apply (docs/FAILURE.md).
class MultiProcessFailure : public ::testing::TestWithParam<std::string> {};

TEST_P(MultiProcessFailure, KilledTargetGivesErrorsWithinTheTimeout) {
  // "<provider>/shared": the target's region is SharedHostMemory, which
  // same-host initiators map (no system call per write sees the death).
  const std::string param = GetParam();
  const bool shared = param.ends_with("/shared");
  auto o = Options(shared ? param.substr(0, param.size() - 7) : param);
  o.request_timeout = 2000ms;
  PeerProcess peer(o, 64 << 20, shared ? PeerRegion::kSharedHost : PeerRegion::kHeap);
  // Forked before this process starts engine threads (fork after threads is
  // undefined for the child, and TSan refuses it).
  PeerProcess fresh(o, 1 << 20);
  auto engine = TransferEngine::Create(o).value();
  std::vector<uint8_t> src(64 << 20, 3);
  auto mr = engine->RegisterMemory(src.data(), src.size()).value();
  auto dst = engine->Import(MrDescriptor::FromHex(peer.descriptor_hex()).value()).value();

  // Stream writes; kill the target mid-stream; keep submitting after.
  CompletionCounter c;
  uint64_t submitted = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 400; ++i) {
    if (i == 100) peer.Kill();
    ASSERT_TRUE(engine->Submit(SingleWrite{mr, 0, 1 << 20, dst, uint64_t(i % 64) << 20, 9}, {.counter = &c}).ok());
    ++submitted;
    if (i % 50 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_TRUE(c.WaitFinished(submitted, std::chrono::seconds(15)))
      << "only " << c.finished() << " of " << submitted << " requests ended after the target died";
  EXPECT_GT(c.failed(), 0u);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(12));
  // The engine stays usable: a fresh target works.
  auto dst2 = engine->Import(MrDescriptor::FromHex(fresh.descriptor_hex()).value()).value();
  CompletionCounter ok;
  ASSERT_TRUE(engine->Submit(SingleWrite{mr, 0, 4096, dst2, 0, 1}, {.counter = &ok}).ok());
  WaitDone(ok, 1);
  EXPECT_EQ(fresh.WaitImm(1, 1, 5000), "OK");
  EXPECT_EQ(fresh.Crc(0, 4096), Crc32c(src.data(), 4096));
}

// "tcp+local": tcp domains with the same-host domain beside them; the peer
// is on this host, so the bytes take the same-host lane.
INSTANTIATE_TEST_SUITE_P(Providers, MultiProcess, ::testing::Values("tcp", "shm", "local", "tcp+local"));
INSTANTIATE_TEST_SUITE_P(Providers, MultiProcessFailure,
                         ::testing::Values("tcp", "local", "tcp+local", "local/shared", "tcp+local/shared"));

}  // namespace
}  // namespace te::testing
