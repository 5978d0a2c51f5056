// The same-host domain (nic/local) where it differs from a NIC: the target's
// registration table refuses forged and stale descriptors before any byte
// moves, a peer on another host is refused, and an initiator killed while
// writing costs the target nothing.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

#include <fstream>

#include "integration/peer_process.h"
#include "integration/test_support.h"
#include "nic/local/cuda_ipc.h"
#include "transfer/shared_host_memory.h"

namespace te::testing {
namespace {

struct Pair {
  std::unique_ptr<TransferEngine> target, initiator;
};
Pair MakePair() {
  auto o = Options("local");
  o.request_timeout = std::chrono::milliseconds(5000);
  return {TransferEngine::Create(o).value(), TransferEngine::Create(o).value()};
}

// The region is the middle of a buffer with guard bytes on both sides.
TEST(LocalDomain, ForgedAndStaleDescriptorsAreRefusedBeforeAnyByteMoves) {
  Pair p = MakePair();
  std::vector<uint8_t> buffer(3 * 4096, 0), src(2 * 4096, 0xAB);
  auto mr = p.target->RegisterMemory(buffer.data() + 4096, 4096).value();
  auto src_mr = p.initiator->RegisterMemory(src.data(), src.size()).value();
  const MrDescriptor d = p.target->Describe(*mr);
  auto submit = [&](const MrDescriptor& desc, uint64_t offset, uint64_t length) {
    auto remote = p.initiator->Import(desc).value();
    CompletionCounter c;
    EXPECT_TRUE(p.initiator->Submit(SingleWrite{src_mr, 0, length, remote, offset, 0x55}, {.counter = &c}).ok());
    EXPECT_TRUE(c.WaitFinished(1, std::chrono::seconds(20)));
    return c.failed() == 0 ? Status::Ok() : c.first_error();
  };
  // A longer region than registered: the engine's check passes (it trusts
  // the descriptor), the target's table refuses.
  MrDescriptor longer = d;
  longer.length = 2 * 4096;
  Status s = submit(longer, 4096, 4096);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_NE(s.message().find("outside the peer's region"), std::string::npos) << s.ToString();
  // A wrong key (the salt), and a neighbouring registration slot.
  for (uint64_t flip : {uint64_t(1) << 40, uint64_t(1)}) {
    MrDescriptor forged = d;
    forged.keys[0].rkey ^= flip;
    s = submit(forged, 0, 4096);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  }
  // The real descriptor works, and only the region changed.
  ASSERT_TRUE(submit(d, 0, 4096).ok());
  EXPECT_TRUE(p.target->WaitImm(0x55, 1, std::chrono::seconds(5)).ok());
  EXPECT_EQ(std::count(buffer.begin(), buffer.begin() + 4096, 0), 4096);
  EXPECT_EQ(std::count(buffer.begin() + 4096, buffer.begin() + 8192, 0xAB), 4096);
  EXPECT_EQ(std::count(buffer.begin() + 8192, buffer.end(), 0), 4096);
  // After deregistration the same descriptor is stale.
  mr.reset();
  std::fill(buffer.begin(), buffer.end(), 0);
  s = submit(d, 0, 4096);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_EQ(std::count(buffer.begin(), buffer.end(), 0), ptrdiff_t(buffer.size()));
  EXPECT_FALSE(p.target->WaitImm(0x55, 1, std::chrono::milliseconds(200)).ok());
}

// The target's immediate ring holds 8,192 entries per initiator. With the
// target not polling, the initiator posts until the ring is full and holds
// the rest back (queued, not failed); as the target drains, the rest go, and
// every immediate arrives exactly once.
TEST(LocalDomain, AFullImmediateRingHoldsWritesBackUntilTheTargetDrainsIt) {
  auto to = Options("local");
  to.progress = ProgressMode::kManual;  // nothing drains the ring unless the test does
  auto target = TransferEngine::Create(to).value();
  auto io = Options("local");
  io.request_timeout = std::chrono::milliseconds(60000);
  auto initiator = TransferEngine::Create(io).value();
  std::vector<uint8_t> buffer(4096, 0);
  auto mr = target->RegisterMemory(buffer.data(), buffer.size()).value();
  auto remote = initiator->Import(target->Describe(*mr)).value();
  constexpr uint64_t kRing = 8192, kWrites = 3 * kRing + 123;
  constexpr uint32_t kImm = 0x77;
  CompletionCounter c;
  for (uint64_t i = 0; i < kWrites; ++i) ASSERT_TRUE(initiator->Submit(ImmOnly{remote, kImm}, {.counter = &c}).ok());
  // The ring fills, and no more than the ring is posted while it stays full.
  ASSERT_TRUE(WaitUntil([&] { return initiator->stats().writes_posted >= kRing; }, std::chrono::seconds(30)))
      << initiator->stats().writes_posted << " posted";
  EXPECT_EQ(initiator->stats().writes_posted, kRing);
  EXPECT_EQ(c.failed(), 0u);
  // Draining lets the rest through; the count is exact.
  // DriveUntil on a manual engine: Progress() in a loop until the condition
  // holds or the deadline passes.
  ASSERT_TRUE(target->DriveUntil([&] { return target->stats().imms_received >= kWrites; }, std::chrono::seconds(60)))
      << target->stats().imms_received << " of " << kWrites << " arrived";
  ASSERT_TRUE(c.WaitFinished(kWrites, std::chrono::seconds(30)));
  EXPECT_EQ(c.failed(), 0u) << c.first_error().ToString();
  target->Progress();
  EXPECT_EQ(target->stats().imms_received, kWrites);
  EXPECT_TRUE(target->WaitImm(kImm, kWrites, std::chrono::seconds(5)).ok());
  EXPECT_FALSE(target->WaitImm(kImm, 1, std::chrono::milliseconds(0)).ok()) << "an immediate arrived twice";
}

TEST(LocalDomain, APeerOnAnotherHostIsRefused) {
  Pair p = MakePair();
  EngineAddress a = p.target->address();
  ASSERT_EQ(a.domains.size(), 1u);
  ASSERT_GE(a.domains[0].size(), 24u);
  a.domains[0][16] ^= 0xff;  // the boot id's hash
  auto peer = p.initiator->Connect(a);
  ASSERT_FALSE(peer.ok());
  EXPECT_NE(peer.status().message().find("another host"), std::string::npos) << peer.status().ToString();
  a = p.target->address();
  a.domains[0].resize(7);
  EXPECT_FALSE(p.initiator->Connect(a).ok());
}

// A child process writes into this one in a loop and is SIGKILLed: the
// target keeps serving, and a new initiator's writes land.
TEST(LocalDomain, AKilledInitiatorCostsTheTargetNothing) {
  int to_child[2], from_child[2];
  ASSERT_EQ(pipe(to_child), 0);
  ASSERT_EQ(pipe(from_child), 0);
  // Forked before this process starts engine threads.
  const pid_t child = fork();
  if (child == 0) {
    close(to_child[1]);
    close(from_child[0]);
    char hex[8192] = {};
    size_t got = 0;
    while (got < sizeof hex - 1) {
      const ssize_t n = read(to_child[0], hex + got, sizeof hex - 1 - got);
      if (n <= 0) _exit(2);
      got += size_t(n);
      if (hex[got - 1] == '\n') break;
    }
    hex[got - 1] = 0;
    auto engine = TransferEngine::Create(Options("local")).value();
    std::vector<uint8_t> src(1 << 20, 7);
    auto mr = engine->RegisterMemory(src.data(), src.size()).value();
    auto dst = engine->Import(MrDescriptor::FromHex(hex).value()).value();
    if (write(from_child[1], "go\n", 3) != 3) _exit(3);
    for (uint64_t i = 0;; ++i) {  // until killed
      CompletionCounter c;
      if (!engine->Submit(SingleWrite{mr, 0, src.size(), dst, 0, 0x66}, {.counter = &c}).ok()) _exit(4);
      c.WaitFinished(1, std::chrono::seconds(5));
    }
  }
  close(to_child[0]);
  close(from_child[1]);
  auto o = Options("local");
  auto target = TransferEngine::Create(o).value();
  std::vector<uint8_t> region(1 << 20, 0);
  auto mr = target->RegisterMemory(region.data(), region.size()).value();
  const std::string hex = target->Describe(*mr).ToHex() + "\n";
  ASSERT_EQ(write(to_child[1], hex.data(), hex.size()), ssize_t(hex.size()));
  char go[4] = {};
  ASSERT_EQ(read(from_child[0], go, 3), 3);
  ASSERT_TRUE(target->WaitImm(0x66, 20, std::chrono::seconds(20)).ok()) << "the child's writes did not arrive";
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  EXPECT_EQ(std::count(region.begin(), region.end(), 7), ptrdiff_t(region.size()));
  // A new initiator (this process) writes; the target polls on as before.
  auto initiator = TransferEngine::Create(o).value();
  std::vector<uint8_t> src(4096, 9);
  auto src_mr = initiator->RegisterMemory(src.data(), src.size()).value();
  auto dst = initiator->Import(target->Describe(*mr)).value();
  CompletionCounter c;
  ASSERT_TRUE(initiator->Submit(SingleWrite{src_mr, 0, 4096, dst, 0, 0x67}, {.counter = &c}).ok());
  WaitDone(c, 1);
  EXPECT_TRUE(target->WaitImm(0x67, 1, std::chrono::seconds(5)).ok());
  EXPECT_EQ(region[0], 9);
  close(to_child[1]);
  close(from_child[0]);
}

TEST(SharedHostMemory, AllocationsAreFoundByRangeAndSealedAgainstShrinking) {
  auto a = AllocateSharedHostMemory(10000).value();
  EXPECT_EQ(a->size() % 4096, 0u);
  EXPECT_GE(a->size(), 10000u);
  auto* p = static_cast<uint8_t*>(a->data());
  EXPECT_EQ(std::count(p, p + a->size(), 0), ptrdiff_t(a->size()));  // zero-filled
  auto inside = SharedHostMemory::Find(p + 100, 500);
  ASSERT_TRUE(inside.has_value());
  EXPECT_EQ(inside->offset, 100u);
  EXPECT_FALSE(SharedHostMemory::Find(p + 100, a->size()).has_value());  // runs past the end
  std::vector<uint8_t> heap(64);
  EXPECT_FALSE(SharedHostMemory::Find(heap.data(), heap.size()).has_value());
  // The owner itself cannot shrink it: a peer's mapping never faults.
  EXPECT_NE(ftruncate(inside->fd, 0), 0);
  EXPECT_FALSE(AllocateSharedHostMemory(0).ok());
  const int fd = inside->fd;
  a.reset();
  EXPECT_FALSE(SharedHostMemory::Find(p + 100, 500).has_value());
  EXPECT_EQ(fcntl(fd, F_GETFD), -1);  // closed with it
}

// Mappings of memfd:te-shared-memory in this process.
int SharedMappings() {
  std::ifstream maps("/proc/self/maps");
  int n = 0;
  for (std::string line; std::getline(maps, line);) n += line.find("te-shared-memory") != std::string::npos;
  return n;
}

// A target in another process whose region is SharedHostMemory: the
// initiator maps it and copies with memcpy (the mapping shows in its
// /proc/self/maps), byte-exact with exact immediates; the table's checks
// still come first (a forged key or range moves nothing), and a
// deregistered region's mapping is dropped at the next write.
TEST(SharedHostMemory, AnotherProcessMapsTheRegionAndTheTableStillDecides) {
  for (const char* provider : {"local", "tcp+local"}) {
    SCOPED_TRACE(provider);
    constexpr size_t kBytes = 4 << 20;
    PeerProcess peer(Options(provider), kBytes, PeerRegion::kSharedHost);
    auto engine = TransferEngine::Create(Options(provider)).value();
    std::vector<uint8_t> src(kBytes);
    FillPattern(src.data(), src.size(), 17);
    auto mr = engine->RegisterMemory(src.data(), src.size()).value();
    const MrDescriptor desc = MrDescriptor::FromHex(peer.descriptor_hex()).value();
    auto dst = engine->Import(desc).value();
    const int before = SharedMappings();
    CompletionCounter done;
    uint64_t imms = 0;
    for (uint64_t off = 0; off < 3 << 20; off += 256 << 10) {  // pages go to the last MiB
      SingleWrite w{mr, off, 256 << 10, dst, off, 0x31};
      imms += engine->ExpectedImmCount(w).value();
      ASSERT_TRUE(engine->Submit(w, {.counter = &done}).ok());
    }
    PagedWrite pages{mr, {0, 1, 2, 3}, 4096, 0, dst, {7, 5, 3, 1}, 4096, 3 << 20, 4096, 0x32};
    ASSERT_TRUE(engine->Submit(pages, {.counter = &done}).ok());
    WaitDone(done, 12 + 1);
    ASSERT_EQ(peer.WaitImm(0x31, imms, 10000), "OK");
    ASSERT_EQ(peer.WaitImm(0x32, 4, 10000), "OK");
    EXPECT_NE(peer.WaitImm(0x31, 1, 200), "OK");
    EXPECT_EQ(peer.Crc(0, 1 << 20), Crc32c(src.data(), 1 << 20));
    EXPECT_EQ(peer.Crc((3 << 20) + 4096, 4096), Crc32c(src.data() + 3 * 4096, 4096));  // dst page 1 <- src page 3
    EXPECT_EQ(peer.Crc((3 << 20) + 7 * 4096, 4096), Crc32c(src.data(), 4096));         // dst page 7 <- src page 0
    EXPECT_EQ(peer.Crc(1 << 20, 2 << 20), Crc32c(src.data() + (1 << 20), 2 << 20));
    EXPECT_EQ(SharedMappings(), before + 1) << "the initiator did not map the target's shared region";

    // A forged range and a forged key are refused by the table first.
    MrDescriptor longer = desc;
    longer.length = kBytes * 2;
    auto forged = engine->Import(longer).value();
    CompletionCounter bad;
    ASSERT_TRUE(engine->Submit(SingleWrite{mr, 0, 4096, forged, kBytes, 0x33}, {.counter = &bad}).ok());
    MrDescriptor wrong_key = desc;
    wrong_key.keys.back().rkey ^= uint64_t(1) << 40;
    auto guessed = engine->Import(wrong_key).value();
    ASSERT_TRUE(engine->Submit(SingleWrite{mr, 0, 4096, guessed, 0, 0x33}, {.counter = &bad}).ok());
    ASSERT_TRUE(bad.WaitFinished(2, std::chrono::seconds(10)));
    EXPECT_EQ(bad.failed(), 2u);
    EXPECT_NE(peer.WaitImm(0x33, 1, 200), "OK");
    EXPECT_EQ(peer.Crc(0, 4096), Crc32c(src.data(), 4096));  // unchanged

    // Deregistered: the next write is refused and the mapping goes.
    ASSERT_EQ(peer.Deregister(), "OK");
    CompletionCounter stale;
    ASSERT_TRUE(engine->Submit(SingleWrite{mr, 0, 4096, dst, 0, 0x34}, {.counter = &stale}).ok());
    ASSERT_TRUE(stale.WaitFinished(1, std::chrono::seconds(10)));
    EXPECT_EQ(stale.failed(), 1u);
    EXPECT_EQ(SharedMappings(), before);
  }
}

// Without a CUDA driver (this machine) GPU memory is refused by the
// same-host domain, naming why; tests/gpu runs the CUDA IPC path on a GPU.
TEST(LocalDomain, GpuMemoryWithoutACudaDriverIsRefusedNamingWhy) {
  if (nic::CudaIpc::Get().Available().ok()) GTEST_SKIP() << "a CUDA driver is present: tests/gpu covers it";
  auto engine = TransferEngine::Create(Options("local")).value();
  std::vector<uint8_t> not_gpu(4096);
  auto mr = engine->RegisterMemory(not_gpu.data(), not_gpu.size(), Memory::Cuda(0));
  ASSERT_FALSE(mr.ok());
  EXPECT_EQ(mr.status().code(), StatusCode::kUnimplemented) << mr.status().ToString();
  EXPECT_NE(mr.status().message().find("CUDA driver"), std::string::npos) << mr.status().ToString();
}

}  // namespace
}  // namespace te::testing
