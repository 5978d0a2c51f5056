#include "nic/topology/topology.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <set>

#include "transfer/transfer_engine.h"
#include "unit/sysfs_fixture.h"

namespace te::testing {
namespace {

using nic::DiscoverTopology;

std::string Hex2(int v) {
  char b[8];
  snprintf(b, sizeof b, "%02x", v);
  return b;
}

// Two sockets (cores 0-47 and 48-95), two root complexes, four PCIe switches
// each; every switch holds one H100 and `nics_per_gpu` NICs.
void BuildEightGpuHost(SysfsFixture& fx, int nics_per_gpu, bool efa) {
  for (int g = 0; g < 8; ++g) {
    const int node = g / 4;
    const std::string rc = node == 0 ? "pci0000:00" : "pci0000:80";
    const int base = node * 0x80 + (g % 4) * 0x10;
    const std::string port = "0000:" + Hex2(node * 0x80) + ":0" + std::to_string(g % 4 + 1) + ".0";
    const std::string up = "0000:" + Hex2(base + 1) + ":00.0";
    const std::string cpus = node == 0 ? "0-47" : "48-95";
    // The GPU under its own downstream port.
    const std::string gdown = "0000:" + Hex2(base + 2) + ":00.0";
    const std::string gpu = "0000:" + Hex2(base + 3) + ":00.0";
    fx.AddPci({rc, port, up, gdown, gpu}, "0x10de", "0x2330", "0x030200", node, cpus);
    for (int k = 0; k < nics_per_gpu; ++k) {
      const std::string ndown = "0000:" + Hex2(base + 2) + ":0" + std::to_string(k + 1) + ".0";
      const std::string nic = "0000:" + Hex2(base + 4 + k) + ":00.0";
      fx.AddPci({rc, port, up, ndown, nic}, efa ? "0x1d0f" : "0x15b3", efa ? "0xefa1" : "0x1021", "0x020000", node,
                cpus);
      fx.AddRdmaDevice(efa ? "rdmap" + std::to_string(base + 4 + k) + "s0" : "mlx5_" + std::to_string(g),
                       {rc, port, up, ndown, nic});
    }
  }
}

TEST(Topology, EightGpusEightConnectX7OnePerGpuIgnoringTheManagementNic) {
  SysfsFixture fx;
  BuildEightGpuHost(fx, 1, /*efa=*/false);
  // A ConnectX-6 Lx management port on the root complex: another model.
  fx.AddPci({"pci0000:00", "0000:00:1c.0", "0000:70:00.0"}, "0x15b3", "0x101f", "0x020000", 0, "0-47");
  fx.AddRdmaDevice("mlx5_8", {"pci0000:00", "0000:00:1c.0", "0000:70:00.0"});

  auto t = DiscoverTopology(fx.root());
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ASSERT_EQ(t->gpus.size(), 8u);
  ASSERT_EQ(t->nics.size(), 9u);
  for (int g = 0; g < 8; ++g) {
    const auto* p = t->PlacementFor(g);
    ASSERT_NE(p, nullptr);
    EXPECT_EQ(p->nics, std::vector<std::string>{"mlx5_" + std::to_string(g)}) << "gpu " << g;
    EXPECT_EQ(p->numa_node, g / 4);
    ASSERT_EQ(p->cpus.size(), 12u);  // 48 cores of the node over its 4 GPUs
    EXPECT_EQ(p->cpus.front(), (g / 4) * 48 + (g % 4) * 12);
  }
  for (const auto& n : t->nics) EXPECT_EQ(n.main_model, n.name != "mlx5_8") << n.name;
  EXPECT_NE(t->ToTable().find("no (other model)"), std::string::npos);
  EXPECT_NE(t->ToJson().find("\"nics\":[\"mlx5_3\"]"), std::string::npos) << t->ToJson();
}

TEST(Topology, EightGpusThirtyTwoEfaFourPerGpu) {
  SysfsFixture fx;
  BuildEightGpuHost(fx, 4, /*efa=*/true);
  auto t = DiscoverTopology(fx.root());
  ASSERT_TRUE(t.ok());
  ASSERT_EQ(t->gpus.size(), 8u);
  ASSERT_EQ(t->nics.size(), 32u);
  std::set<std::string> seen;
  for (const auto& p : t->placements) {
    ASSERT_EQ(p.nics.size(), 4u) << "gpu " << p.gpu;
    for (const auto& n : p.nics) {
      EXPECT_TRUE(seen.insert(n).second) << n << " assigned twice";
      EXPECT_EQ(n.rfind("rdmap", 0), 0u);
    }
  }
  EXPECT_EQ(t->nics[0].kind, "efa");
}

TEST(Topology, HostWithoutGpuOrNicSaysSoPlainly) {
  SysfsFixture fx;
  auto t = DiscoverTopology(fx.root());
  ASSERT_TRUE(t.ok());
  EXPECT_TRUE(t->gpus.empty());
  EXPECT_TRUE(t->nics.empty());
  EXPECT_EQ(t->ToTable(), "no GPU, no RDMA NIC\n");
  EXPECT_FALSE(DiscoverTopology(fx.root() + "/does-not-exist").ok());
}

TEST(Topology, CpuListsParseAndRejectGarbage) {
  EXPECT_EQ(nic::ParseCpuList("0-3,8,10-11").value(), (std::vector<int>{0, 1, 2, 3, 8, 10, 11}));
  EXPECT_TRUE(nic::ParseCpuList("").value().empty());
  auto bad = nic::ParseCpuList("0-3,x");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("'x'"), std::string::npos);
  EXPECT_FALSE(nic::ParseCpuList("5-2").ok());
  // A sysfs file is input too: a number too large for any cpu is an error,
  // not an exception.
  EXPECT_FALSE(nic::ParseCpuList("0-99999999999999999999").ok());
  EXPECT_FALSE(nic::ParseCpuList("4294967296").ok());
  // Many parts cannot add up to an unbounded list: 17 ranges of 65,537.
  std::string many;
  for (int i = 0; i < 17; ++i) many += (i ? "," : "") + std::string("0-65536");
  auto too_many = nic::ParseCpuList(many);
  ASSERT_FALSE(too_many.ok());
  EXPECT_NE(too_many.status().message().find("2^20"), std::string::npos) << too_many.status().ToString();
  many.resize(many.rfind(','));  // 16 of them: 1,048,592 entries, still over
  EXPECT_FALSE(nic::ParseCpuList(many).ok());
  EXPECT_EQ(nic::ParseCpuList("0-65535,65536-131071").value().size(), 131072u);
}

TEST(Topology, EngineOptionsForAGpuPickItsNicsAndCores) {
  SysfsFixture fx;
  BuildEightGpuHost(fx, 4, /*efa=*/true);
  EngineOptions o;
  o.fabric.provider = "efa";
  o.gpu = 5;
  o.sysfs_root = fx.root();
  auto r = TransferEngine::ResolveOptions(o);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->domains, 4);
  ASSERT_EQ(r->domain_names.size(), 4u);
  for (const auto& d : r->domain_names) EXPECT_NE(d.find("-rdm"), std::string::npos) << d;
  ASSERT_TRUE(r->worker_cpu.has_value());
  EXPECT_EQ(*r->worker_cpu, 48 + 12);  // GPU 5: node 1, second GPU there

  // Explicit choices win over discovery.
  o.domain_names = {"rdmap999s0-rdm"};
  o.domains = 1;
  o.worker_cpu = 7;
  auto k = TransferEngine::ResolveOptions(o);
  ASSERT_TRUE(k.ok());
  EXPECT_EQ(k->domain_names, std::vector<std::string>{"rdmap999s0-rdm"});
  EXPECT_EQ(*k->worker_cpu, 7);

  o.gpu = 8;
  auto bad = TransferEngine::ResolveOptions(o);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("gpu 8"), std::string::npos) << bad.status().message();
}

}  // namespace
}  // namespace te::testing
