// Topology: which RDMA NICs and CPU cores are near which GPU, read from sysfs.
//
// GPUs are NVIDIA PCI display/3D controllers, numbered in PCI bus order (the
// order CUDA uses with CUDA_DEVICE_ORDER=PCI_BUS_ID). RDMA NICs are the
// entries of /sys/class/infiniband (ConnectX "mlx5_*", EFA "rdmap*" ...).
// A GPU's NICs are those of the host's main NIC model that share the deepest
// PCIe ancestor with it (the same switch); NICs of another model, such as a
// management port, are listed but never assigned. A GPU's cores are its NUMA
// node's CPUs, split evenly among the GPUs on that node.
//
// The sysfs root is a parameter, so tests read fixture trees shaped like the
// real thing.
#pragma once

#include <string>
#include <vector>

#include "base/status.h"

namespace te::nic {

struct PciFunction {
  std::string bdf;                    // "0000:1a:00.0"
  std::vector<std::string> pci_path;  // root complex .. bridges .. bdf
  std::string vendor, device;         // "0x10de", "0x2330"
  int numa_node = -1;                 // -1: not reported
  std::vector<int> local_cpus;
};

struct Gpu {
  int index = 0;
  PciFunction pci;
};

struct RdmaNic {
  std::string name;  // ibverbs device name: "mlx5_0", "rdmap16s27"
  std::string kind;  // "efa", "mlx5", or the vendor id
  PciFunction pci;
  bool main_model = false;  // of the host's most common NIC model
};

struct GpuPlacement {
  int gpu = 0;
  std::vector<std::string> nics;  // RdmaNic names, nearest first
  int numa_node = -1;
  std::vector<int> cpus;  // this GPU's share of its node's cores
};

struct Topology {
  std::vector<Gpu> gpus;
  std::vector<RdmaNic> nics;
  std::vector<GpuPlacement> placements;  // one per GPU

  const GpuPlacement* PlacementFor(int gpu) const;
  std::string ToTable() const;
  std::string ToJson() const;
};

// Reads `sysfs_root` (normally "/sys"). A root without GPUs or NICs gives an
// empty topology, not an error; an unreadable root is an error.
Result<Topology> DiscoverTopology(const std::string& sysfs_root = "/sys");

// "0-3,8,10-11" -> {0,1,2,3,8,10,11}; kInvalidArgument naming the bad part.
Result<std::vector<int>> ParseCpuList(const std::string& list);

// The libfabric domain name of an ibverbs device for a provider:
// efa "rdmap16s27" -> "rdmap16s27-rdm"; verbs "mlx5_0" -> "mlx5_0".
std::string FabricDomainName(const std::string& provider, const std::string& rdma_device);

}  // namespace te::nic
