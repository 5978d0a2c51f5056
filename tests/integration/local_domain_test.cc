// The same-host domain (nic/local) where it differs from a NIC: the target's
// registration table refuses forged and stale descriptors before any byte
// moves, a peer on another host is refused, and an initiator killed while
// writing costs the target nothing.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

#include "integration/test_support.h"

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

}  // namespace
}  // namespace te::testing
