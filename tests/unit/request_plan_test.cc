#include "transfer/request_plan.h"

#include <gtest/gtest.h>

#include <map>
#include <numeric>

namespace te {
namespace {

// Regions need no NIC to be planned against: build them directly.
LocalMr Src(size_t len) {
  static std::vector<uint8_t> backing(64 << 20);
  return std::make_shared<MemoryRegion>(backing.data(), len, Memory::Host(),
                                        std::vector<std::shared_ptr<nic::Domain>>{},
                                        std::vector<nic::LocalRegistration>{});
}
RemoteMr Dst(uint64_t len, int domains = 1) {
  MrDescriptor d;
  d.owner.provider = "tcp;ofi_rxm";
  d.length = len;
  for (int i = 0; i < domains; ++i) {
    d.owner.domains.push_back({uint8_t(i)});
    d.keys.push_back({uint64_t(i), 0});
  }
  return std::make_shared<RemoteRegion>(d, nullptr);
}

TEST(RequestPlan, RefusesOutOfBoundsWriteNamingOffsetLengthAndSize) {
  SingleWrite w{Src(1 << 20), 0, 8192, Dst(8192), 4096, 1};
  auto r = PlanRequest(w, PlanLimits{});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kOutOfRange);
  EXPECT_NE(r.status().message().find("dst_offset 4096 + length 8192 exceeds dst region size 8192"), std::string::npos)
      << r.status().message();
}

TEST(RequestPlan, RefusesOffsetOverflow) {
  SingleWrite w{Src(1 << 20), 0, 16, Dst(1 << 20), ~0ull - 4, 1};
  EXPECT_EQ(PlanRequest(w, PlanLimits{}).status().code(), StatusCode::kOutOfRange);
  SingleWrite s{Src(1024), 1000, 100, Dst(1 << 20), 0, 1};
  auto r = PlanRequest(s, PlanLimits{});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("src_offset 1000"), std::string::npos);
}

TEST(RequestPlan, SingleWriteGivesEveryDomainAShardAndCoversEveryByte) {
  for (size_t domains : {1, 2, 3, 4}) {
    for (uint64_t len : {0ull, 1ull, 4095ull, 65536ull, 100000ull, 1ull << 20, (1ull << 24) + 7}) {
      SingleWrite w{Src(32 << 20), 5, len, Dst(32 << 20), 11, 42};
      PlanLimits l;
      l.domains = domains;
      auto r = PlanRequest(w, l);
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      ASSERT_EQ(r->size(), domains) << "len " << len;  // one imm per domain, zero-length too
      EXPECT_EQ(CountImms(*r), domains);
      uint64_t covered = 0;
      for (size_t i = 0; i < r->size(); ++i) {
        const auto& p = (*r)[i];
        EXPECT_EQ(p.domain, i);
        EXPECT_EQ(p.src_offset - 5, p.dst_offset - 11);
        EXPECT_EQ(p.dst_offset, 11 + covered);  // contiguous, in order
        covered += p.length;
        EXPECT_TRUE(p.has_imm);
        EXPECT_EQ(p.imm, 42u);
      }
      EXPECT_EQ(covered, len);
    }
  }
}

TEST(RequestPlan, ShardsAreAlignedAndNotTooSmall) {
  SingleWrite w{Src(32 << 20), 0, (8 << 20) + 100, Dst(32 << 20), 0, std::nullopt};
  PlanLimits l;
  l.domains = 4;
  auto r = PlanRequest(w, l);
  ASSERT_TRUE(r.ok());
  for (size_t i = 0; i + 1 < r->size(); ++i) EXPECT_EQ((*r)[i].length % kShardAlignment, 0u);
  SingleWrite small{Src(1 << 20), 0, 10000, Dst(1 << 20), 0, std::nullopt};
  auto s = PlanRequest(small, l);
  ASSERT_TRUE(s.ok());
  ASSERT_EQ(s->size(), 1u);  // without an imm, empty shards are not posted
  EXPECT_EQ((*s)[0].length, 10000u);
}

TEST(RequestPlan, SplitsWritesLargerThanTheProviderLimit) {
  SingleWrite w{Src(1 << 20), 0, 1000000, Dst(1 << 20), 0, 3};
  PlanLimits l;
  l.max_write_bytes = 300000;
  auto r = PlanRequest(w, l);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->size(), 4u);
  EXPECT_EQ(CountImms(*r), 4u);
}

TEST(RequestPlan, ZeroLengthWithoutImmIsRefused) {
  SingleWrite w{Src(1 << 20), 0, 0, Dst(1 << 20), 0, std::nullopt};
  auto r = PlanRequest(w, PlanLimits{});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
}

TEST(RequestPlan, PagedWriteSpreadsContiguousBlocksAndChecksEveryPage) {
  PagedWrite p;
  p.src = Src(1 << 20);
  p.dst = Dst(1 << 20);
  p.page_length = 1000;
  p.src_stride = p.dst_stride = 1024;
  p.src_offset = 3;
  p.dst_offset = 7;
  p.imm = 9;
  for (uint32_t i = 0; i < 10; ++i) {
    p.src_pages.push_back(i);
    p.dst_pages.push_back(9 - i);
  }
  PlanLimits l;
  l.domains = 3;
  auto r = PlanRequest(p, l);
  ASSERT_TRUE(r.ok());
  ASSERT_EQ(r->size(), 10u);
  EXPECT_EQ(CountImms(*r), 10u);
  std::map<uint32_t, int> per_domain;
  uint32_t last_domain = 0;
  for (size_t i = 0; i < r->size(); ++i) {
    const auto& w = (*r)[i];
    EXPECT_EQ(w.src_offset, 3 + i * 1024);
    EXPECT_EQ(w.dst_offset, 7 + (9 - i) * 1024);
    EXPECT_GE(w.domain, last_domain);  // blocks, not round robin
    last_domain = w.domain;
    per_domain[w.domain]++;
  }
  EXPECT_EQ(per_domain.size(), 3u);

  p.dst_pages[4] = 2000;  // 2000 * 1024 + 7 + 1000 > 1 MiB
  auto bad = PlanRequest(p, l);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kOutOfRange);
  EXPECT_NE(bad.status().message().find("destination page 2000 (entry 4)"), std::string::npos)
      << bad.status().message();

  p.dst_pages.pop_back();
  EXPECT_EQ(PlanRequest(p, l).status().code(), StatusCode::kInvalidArgument);
}

TEST(RequestPlan, ScatterAndBarrierCountOnePerTarget) {
  auto a = Dst(1 << 20), b = Dst(1 << 20), c = Dst(4096);
  ScatterWrite s{Src(1 << 20), {{a, 0, 0, 4096}, {b, 4096, 0, 4096}, {c, 0, 0, 0}}, 5};
  PlanLimits l;
  l.domains = 2;
  auto r = PlanRequest(s, l);
  ASSERT_TRUE(r.ok());
  ASSERT_EQ(r->size(), 3u);
  EXPECT_EQ((*r)[0].dst, a.get());
  EXPECT_EQ((*r)[1].domain, 1u);
  EXPECT_EQ((*r)[2].length, 0u);  // zero-length target still notifies
  s.targets[2].dst_offset = 1;
  s.targets[2].length = 4096;
  auto bad = PlanRequest(s, l);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("ScatterWrite target 2"), std::string::npos);

  Barrier bar{{a, b, c}, 77};
  auto br = PlanRequest(bar, l);
  ASSERT_TRUE(br.ok());
  EXPECT_EQ(CountImms(*br), 3u);
  auto io = PlanRequest(ImmOnly{a, 1}, l);
  ASSERT_TRUE(io.ok());
  EXPECT_EQ(io->size(), 1u);
  EXPECT_EQ(PlanRequest(ImmOnly{nullptr, 1}, l).status().code(), StatusCode::kInvalidArgument);
}

// A destination on this host reached through the same-host domain (local
// domain 2 beside NIC domains 0 and 1): its writes take that lane alone,
// other destinations the NIC domains, within one request.
RemoteMr SameHostDst(uint64_t len, uint64_t local_key = 9) {
  MrDescriptor d;
  d.owner.provider = "tcp;ofi_rxm";
  d.owner.domains = {{1}, {2}, {3}};
  d.owner.same_host_domains = 1;
  d.keys = {{1, 0}, {2, 0}, {local_key, 0x1000}};
  d.length = len;
  auto peer = std::make_shared<const Peer>(d.owner, std::vector<nic::PeerAddr>{0, 0, 0}, nullptr, uint32_t(2));
  return std::make_shared<RemoteRegion>(d, peer);
}

TEST(RequestPlan, SameHostDestinationsTakeTheirLaneAndOthersTheNics) {
  PlanLimits l;
  l.domains = 2;
  l.min_shard_bytes = 4096;
  auto near = SameHostDst(1 << 20);
  ASSERT_TRUE(near->same_host_lane().has_value());
  EXPECT_EQ(near->remote_domain(2), 2u);
  auto w = PlanRequest(SingleWrite{Src(1 << 20), 0, 1 << 20, near, 0, 5}, l).value();
  ASSERT_EQ(w.size(), 1u);  // one lane: one write, one immediate
  EXPECT_EQ(w[0].domain, 2u);
  EXPECT_EQ(w[0].length, 1u << 20);
  auto far = Dst(1 << 20, 2);
  ScatterWrite s{Src(1 << 20), {{near, 0, 0, 100}, {far, 0, 0, 100}, {near, 0, 200, 100}, {far, 0, 200, 100}}, 7};
  auto ws = PlanRequest(s, l).value();
  ASSERT_EQ(ws.size(), 4u);
  EXPECT_EQ(ws[0].domain, 2u);
  EXPECT_EQ(ws[1].domain, 1u);  // target 1 over NIC lane 1 % 2
  EXPECT_EQ(ws[2].domain, 2u);
  EXPECT_EQ(ws[3].domain, 1u);
  EXPECT_EQ(CountImms(ws), 4u);
  auto wb = PlanRequest(Barrier{{near, far}, 3}, l).value();
  ASSERT_EQ(wb.size(), 2u);
  EXPECT_EQ(wb[0].domain, 2u);
  EXPECT_EQ(wb[1].domain, 1u);
  // Paged: every page on the one lane.
  auto wp =
      PlanRequest(PagedWrite{Src(1 << 20), {0, 1, 2, 3}, 4096, 0, near, {3, 2, 1, 0}, 4096, 0, 4096, 1}, l).value();
  for (const auto& p : wp) EXPECT_EQ(p.domain, 2u);
}

TEST(RequestPlan, DeviceSourcesAndUnregisteredSameHostRegionsTakeTheNics) {
  PlanLimits l;
  l.domains = 2;
  l.min_shard_bytes = 4096;
  // The owner could not register the region on its same-host domain (key 0).
  auto device_region = SameHostDst(1 << 20, /*local_key=*/0);
  EXPECT_FALSE(device_region->same_host_lane().has_value());
  auto w = PlanRequest(SingleWrite{Src(1 << 20), 0, 1 << 20, device_region, 0, 5}, l).value();
  ASSERT_EQ(w.size(), 2u);
  EXPECT_EQ(w[0].domain, 0u);
  EXPECT_EQ(w[1].domain, 1u);
  // A source not registered on the same-host domain (GPU memory it could not share).
  l.same_host_source = false;
  w = PlanRequest(SingleWrite{Src(1 << 20), 0, 1 << 20, SameHostDst(1 << 20), 0, 5}, l).value();
  ASSERT_EQ(w.size(), 2u);
  EXPECT_EQ(w[0].domain, 0u);
  // A notification moves no source bytes: it keeps the same-host lane.
  auto n = PlanRequest(ImmOnly{SameHostDst(4096), 1}, l).value();
  ASSERT_EQ(n.size(), 1u);
  EXPECT_EQ(n[0].domain, 2u);
}

}  // namespace
}  // namespace te
