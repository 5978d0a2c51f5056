// Same-host lanes: an engine whose group holds NIC domains (tcp here) and
// the same-host domain beside them reaches each peer by the right one,
// chosen per peer from its address, with no change in the caller's code.
// Peers run in child processes, so the same-host lane crosses address
// spaces (process_vm_writev) as between real processes.
#include <gtest/gtest.h>

#include "integration/peer_process.h"
#include "integration/test_support.h"

namespace te::testing {
namespace {

TEST(SameHostLanes, OnlyADirectGroupOpensTheSameHostDomain) {
  EngineOptions automatic = Options("tcp", 2);
  automatic.same_host = SameHost::kAuto;  // the library's default: no same-host domain on a software provider
  auto plain = TransferEngine::Create(automatic).value();
  EXPECT_FALSE(plain->has_same_host_domain());
  EXPECT_EQ(plain->domain_count(), 2u);
  EXPECT_EQ(plain->address().same_host_domains, 0);
  auto o = Options("tcp+local", 2);
  auto direct = TransferEngine::Create(o).value();
  EXPECT_TRUE(direct->has_same_host_domain());
  EXPECT_EQ(direct->domain_count(), 3u);
  EXPECT_EQ(direct->options().domains, 2);  // the NIC domains, as asked
  EXPECT_EQ(direct->address().same_host_domains, 1);
  EXPECT_EQ(direct->address().nic_domains(), 2u);
  o.same_host = SameHost::kNic;
  EXPECT_FALSE(TransferEngine::Create(o).value()->has_same_host_domain());
}

// The address of `hex`'s owner, claiming another host: its same-host
// domain's boot id hash (bytes 16..23 of a local-domain address) differs.
MrDescriptor ElsewhereCopy(const std::string& hex) {
  MrDescriptor d = MrDescriptor::FromHex(hex).value();
  EXPECT_EQ(d.owner.same_host_domains, 1);
  d.owner.domains.back().at(16) ^= 0xff;
  return d;
}

TEST(SameHostLanes, OneScatterWriteReachesSameHostAndNicPeersWithExactCounts) {
  constexpr size_t kRegion = 1 << 20;
  PeerProcess near(Options("tcp+local", 2), kRegion);  // on this host, direct
  PeerProcess far(Options("tcp", 2), kRegion);         // opted out: tcp only
  auto engine = TransferEngine::Create(Options("tcp+local", 2)).value();
  std::vector<uint8_t> src(kRegion);
  FillPattern(src.data(), src.size(), 31);
  auto mr = engine->RegisterMemory(src.data(), src.size()).value();
  auto to_near = engine->Import(MrDescriptor::FromHex(near.descriptor_hex()).value()).value();
  auto to_far = engine->Import(MrDescriptor::FromHex(far.descriptor_hex()).value()).value();
  // The near peer's region again, as a peer on another host would present
  // it: the same-host domain refuses it, and the NICs carry its bytes.
  auto to_near_by_nic = engine->Import(ElsewhereCopy(near.descriptor_hex())).value();
  EXPECT_EQ(to_near->same_host_lane(), std::optional<uint32_t>(2));
  EXPECT_FALSE(to_far->same_host_lane().has_value());
  EXPECT_FALSE(to_near_by_nic->same_host_lane().has_value());

  // SingleWrite: one immediate per lane.
  EXPECT_EQ(engine->ExpectedImmCount(SingleWrite{mr, 0, kRegion, to_near, 0, 1}).value(), 1u);
  EXPECT_EQ(engine->ExpectedImmCount(SingleWrite{mr, 0, kRegion, to_far, 0, 1}).value(), 2u);
  EXPECT_EQ(engine->ExpectedImmCount(SingleWrite{mr, 0, kRegion, to_near_by_nic, 0, 1}).value(), 2u);

  const EngineStats before = engine->stats();
  ScatterWrite s{mr,
                 {{to_near, 0, 0, 64 << 10},
                  {to_far, 0, 0, 64 << 10},
                  {to_near_by_nic, 128 << 10, 128 << 10, 64 << 10},
                  {to_near, 256 << 10, 256 << 10, 4096},
                  {to_far, 256 << 10, 256 << 10, 4096}},
                 0x51};
  EXPECT_EQ(engine->ExpectedImmCount(s).value(), 5u);
  CompletionCounter done;
  ASSERT_TRUE(engine->Submit(s, {.counter = &done}).ok());
  WaitDone(done, 1);
  // Exact counts: each peer gets its targets' immediates, and no more.
  ASSERT_EQ(near.WaitImm(0x51, 3, 10000), "OK");
  ASSERT_EQ(far.WaitImm(0x51, 2, 10000), "OK");
  EXPECT_NE(near.WaitImm(0x51, 1, 300), "OK");
  EXPECT_NE(far.WaitImm(0x51, 1, 300), "OK");
  for (uint64_t off : {uint64_t(0), uint64_t(128 << 10)})
    EXPECT_EQ(near.Crc(off, 64 << 10), Crc32c(src.data() + off, 64 << 10)) << off;
  EXPECT_EQ(near.Crc(256 << 10, 4096), Crc32c(src.data() + (256 << 10), 4096));
  EXPECT_EQ(far.Crc(0, 64 << 10), Crc32c(src.data(), 64 << 10));
  EXPECT_EQ(far.Crc(256 << 10, 4096), Crc32c(src.data() + (256 << 10), 4096));
  EXPECT_EQ(near.Crc(64 << 10, 64 << 10), Crc32c(std::vector<uint8_t>(64 << 10, 0).data(), 64 << 10));

  // The bytes went where the lanes say: the same-host domain (2) carried
  // the near peer's direct targets, the tcp domains the rest.
  const EngineStats after = engine->stats();
  ASSERT_EQ(after.domains.size(), 3u);
  auto bytes = [&](size_t d) { return after.domains[d].bytes_written - before.domains[d].bytes_written; };
  EXPECT_EQ(bytes(2), (64u << 10) + 4096);
  EXPECT_EQ(bytes(0) + bytes(1), (64u << 10) + 4096 + (64u << 10));
}

TEST(SameHostLanes, BarriersReachPeersOfBothKinds) {
  PeerProcess near(Options("tcp+local", 1), 4096);
  PeerProcess far(Options("tcp", 1), 4096);
  auto engine = TransferEngine::Create(Options("tcp+local", 1)).value();
  auto to_near = engine->Import(MrDescriptor::FromHex(near.descriptor_hex()).value()).value();
  auto to_far = engine->Import(MrDescriptor::FromHex(far.descriptor_hex()).value()).value();
  CompletionCounter done;
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(engine->Submit(Barrier{{to_near, to_far}, 0x99}, {.counter = &done}).ok());
  WaitDone(done, 3);
  EXPECT_EQ(near.WaitImm(0x99, 3, 10000), "OK");
  EXPECT_EQ(far.WaitImm(0x99, 3, 10000), "OK");
  EXPECT_NE(near.WaitImm(0x99, 1, 200), "OK");
}

// tests/netns/same_host_and_remote.sh runs this in network namespace A with
// a veth to namespace B: a peer in A on this host (same-host lane) and a
// tcp peer in B across the veth, in one ScatterWrite. Skipped elsewhere.
TEST(SameHostLanesNetns, OneScatterWriteOverTheSameHostLaneAndAVeth) {
  const char* remote_ns = getenv("TE_NETNS_REMOTE");
  const char* iface = getenv("TE_NETNS_IFACE");
  const char* remote_iface = getenv("TE_NETNS_REMOTE_IFACE");
  if (!remote_ns || !iface || !remote_iface) GTEST_SKIP() << "run by tests/netns/same_host_and_remote.sh";
  constexpr size_t kRegion = 1 << 20;
  auto here = Options("tcp+local", 2);
  here.fabric.domain = iface;
  auto there = Options("tcp", 2);  // another host's engine: no same-host domain
  there.fabric.domain = remote_iface;
  PeerProcess near(here, kRegion, PeerRegion::kSharedHost);
  PeerProcess far(there, kRegion, PeerRegion::kHeap, remote_ns);
  ASSERT_FALSE(far.descriptor_hex().starts_with("ERROR")) << far.descriptor_hex();
  auto engine = TransferEngine::Create(here).value();
  std::vector<uint8_t> src(kRegion);
  FillPattern(src.data(), src.size(), 5);
  auto mr = engine->RegisterMemory(src.data(), src.size()).value();
  auto to_near = engine->Import(MrDescriptor::FromHex(near.descriptor_hex()).value()).value();
  auto to_far = engine->Import(MrDescriptor::FromHex(far.descriptor_hex()).value()).value();
  EXPECT_TRUE(to_near->same_host_lane().has_value());
  EXPECT_FALSE(to_far->same_host_lane().has_value());
  ScatterWrite s{mr, {}, 0x61};
  for (uint64_t i = 0; i < 8; ++i) s.targets.push_back({i % 2 ? to_far : to_near, i << 16, i << 16, 64 << 10});
  CompletionCounter done;
  ASSERT_TRUE(engine->Submit(s, {.counter = &done}).ok());
  WaitDone(done, 1);
  ASSERT_EQ(near.WaitImm(0x61, 4, 10000), "OK");
  ASSERT_EQ(far.WaitImm(0x61, 4, 10000), "OK");
  EXPECT_NE(near.WaitImm(0x61, 1, 200), "OK");
  EXPECT_NE(far.WaitImm(0x61, 1, 200), "OK");
  for (uint64_t i = 0; i < 8; ++i) {
    PeerProcess& p = i % 2 ? far : near;
    EXPECT_EQ(p.Crc(i << 16, 64 << 10), Crc32c(src.data() + (i << 16), 64 << 10)) << "target " << i;
  }
  const EngineStats st = engine->stats();
  EXPECT_EQ(st.domains[2].bytes_written, 4u * (64 << 10));                                // the same-host lane
  EXPECT_EQ(st.domains[0].bytes_written + st.domains[1].bytes_written, 4u * (64 << 10));  // the veth
}

}  // namespace
}  // namespace te::testing
