#include "nic/topology/topology.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>

#include "base/checked_math.h"

namespace te::nic {
namespace fs = std::filesystem;

namespace {

std::string ReadTrimmed(const fs::path& p) {
  std::ifstream in(p);
  std::string s;
  std::getline(in, s);
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

bool IsBdf(const std::string& s) {
  static const std::regex kBdf("[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\\.[0-7]");
  return std::regex_match(s, kBdf);
}

// Reads one PCI function from its (symlink-resolved) sysfs directory.
PciFunction ReadPci(const fs::path& dir) {
  PciFunction f;
  std::error_code ec;
  fs::path real = fs::canonical(dir, ec);
  if (ec) real = dir;
  f.bdf = real.filename().string();
  bool in_devices = false;
  for (const auto& part : real) {
    const std::string s = part.string();
    if (s == "devices") {
      in_devices = true;
      f.pci_path.clear();
      continue;
    }
    if (in_devices && (IsBdf(s) || s.rfind("pci", 0) == 0)) f.pci_path.push_back(s);
  }
  f.vendor = ReadTrimmed(real / "vendor");
  f.device = ReadTrimmed(real / "device");
  const std::string numa = ReadTrimmed(real / "numa_node");
  f.numa_node = numa.empty() ? -1 : std::atoi(numa.c_str());
  auto cpus = ParseCpuList(ReadTrimmed(real / "local_cpulist"));
  if (cpus.ok()) f.local_cpus = cpus.value();
  return f;
}

size_t CommonDepth(const PciFunction& a, const PciFunction& b) {
  size_t n = 0;
  while (n < a.pci_path.size() && n < b.pci_path.size() && a.pci_path[n] == b.pci_path[n]) ++n;
  return n;
}

std::string Join(const std::vector<std::string>& v, const char* sep) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? sep : "") + v[i];
  return s;
}

std::string CpuRanges(const std::vector<int>& cpus) {
  std::string s;
  for (size_t i = 0; i < cpus.size();) {
    size_t j = i;
    while (j + 1 < cpus.size() && cpus[j + 1] == cpus[j] + 1) ++j;
    s += (s.empty() ? "" : ",") + std::to_string(cpus[i]) + (j > i ? "-" + std::to_string(cpus[j]) : "");
    i = j + 1;
  }
  return s.empty() ? "-" : s;
}

}  // namespace

Result<std::vector<int>> ParseCpuList(const std::string& list) {
  std::vector<int> out;
  std::stringstream ss(list);
  for (std::string part; std::getline(ss, part, ',');) {
    if (part.empty()) continue;
    static const std::regex kRange("\\s*(\\d+)(?:-(\\d+))?\\s*");
    std::smatch m;
    if (!std::regex_match(part, m, kRange)) return InvalidArgument("cpu list part '" + part + "' is not N or N-M");
    // Digits only, but as many as the file holds: parse without throwing.
    const auto first = ParseUint64(m[1].str());
    const auto last = m[2].matched ? ParseUint64(m[2].str()) : first;
    if (!first || !last || *first > (1u << 20) || *last > (1u << 20))
      return InvalidArgument("cpu list part '" + part + "' names a cpu beyond 2^20");
    const int lo = int(*first), hi = int(*last);
    if (hi < lo || hi - lo > 65536) return InvalidArgument("cpu range '" + part + "' is reversed or too large");
    // The whole list is bounded too: many parts must not add up to more
    // CPUs than the largest one named.
    if (out.size() + size_t(hi - lo) + 1 > (size_t(1) << 20))
      return InvalidArgument("cpu list names more than 2^20 cpus (at part '" + part + "')");
    for (int c = lo; c <= hi; ++c) out.push_back(c);
  }
  return out;
}

std::string FabricDomainName(const std::string& provider, const std::string& rdma_device) {
  if (provider == "efa") return rdma_device + "-rdm";
  return rdma_device;
}

const GpuPlacement* Topology::PlacementFor(int gpu) const {
  for (const auto& p : placements)
    if (p.gpu == gpu) return &p;
  return nullptr;
}

Result<Topology> DiscoverTopology(const std::string& sysfs_root) {
  const fs::path root(sysfs_root);
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return NotFound("sysfs root '" + sysfs_root + "' is not a readable directory");
  Topology t;

  const fs::path pci_dir = root / "bus/pci/devices";
  if (fs::is_directory(pci_dir, ec)) {
    std::vector<PciFunction> gpus;
    for (const auto& e : fs::directory_iterator(pci_dir, ec)) {
      const std::string vendor = ReadTrimmed(e.path() / "vendor");
      const std::string cls = ReadTrimmed(e.path() / "class");
      // NVIDIA, class 0x0300 (VGA) or 0x0302 (3D controller).
      if (vendor == "0x10de" && (cls.rfind("0x0300", 0) == 0 || cls.rfind("0x0302", 0) == 0))
        gpus.push_back(ReadPci(e.path()));
    }
    std::sort(gpus.begin(), gpus.end(), [](auto& a, auto& b) { return a.bdf < b.bdf; });
    for (size_t i = 0; i < gpus.size(); ++i) t.gpus.push_back({int(i), gpus[i]});
  }

  const fs::path ib_dir = root / "class/infiniband";
  if (fs::is_directory(ib_dir, ec)) {
    for (const auto& e : fs::directory_iterator(ib_dir, ec)) {
      RdmaNic nic;
      nic.name = e.path().filename().string();
      nic.pci = ReadPci(e.path() / "device");
      nic.kind = nic.pci.vendor == "0x1d0f" ? "efa" : nic.pci.vendor == "0x15b3" ? "mlx5" : nic.pci.vendor;
      t.nics.push_back(std::move(nic));
    }
    std::sort(t.nics.begin(), t.nics.end(), [](auto& a, auto& b) { return a.pci.bdf < b.pci.bdf; });
  }

  // The host's main NIC model: the most common vendor:device pair.
  std::map<std::string, int> models;
  for (const auto& n : t.nics) models[n.pci.vendor + ":" + n.pci.device]++;
  int best = 0;
  for (const auto& [m, c] : models) best = std::max(best, c);
  for (auto& n : t.nics) n.main_model = models[n.pci.vendor + ":" + n.pci.device] == best;

  // GPUs per NUMA node, to split each node's cores among them.
  std::map<int, std::vector<int>> gpus_on_node;
  for (const auto& g : t.gpus) gpus_on_node[g.pci.numa_node].push_back(g.index);

  for (const auto& g : t.gpus) {
    GpuPlacement p;
    p.gpu = g.index;
    p.numa_node = g.pci.numa_node;
    // Nearest main-model NICs: deepest common PCIe ancestor; below the root
    // complex only (depth >= 2), else fall back to NICs on the same node.
    size_t deepest = 0;
    for (const auto& n : t.nics)
      if (n.main_model) deepest = std::max(deepest, CommonDepth(g.pci, n.pci));
    for (const auto& n : t.nics) {
      if (!n.main_model) continue;
      const bool near = deepest >= 2 ? CommonDepth(g.pci, n.pci) == deepest : n.pci.numa_node == g.pci.numa_node;
      if (near) p.nics.push_back(n.name);
    }
    const auto& peers = gpus_on_node[g.pci.numa_node];
    const size_t slot = std::find(peers.begin(), peers.end(), g.index) - peers.begin();
    const auto& cpus = g.pci.local_cpus;
    const size_t share = peers.empty() ? 0 : cpus.size() / peers.size();
    if (share > 0)
      p.cpus.assign(cpus.begin() + slot * share, cpus.begin() + (slot + 1) * share);
    else
      p.cpus = cpus;
    t.placements.push_back(std::move(p));
  }
  return t;
}

std::string Topology::ToTable() const {
  std::ostringstream o;
  if (gpus.empty() && nics.empty()) {
    o << "no GPU, no RDMA NIC\n";
    return o.str();
  }
  if (gpus.empty()) o << "no GPU\n";
  if (nics.empty()) o << "no RDMA NIC\n";
  if (!gpus.empty()) {
    o << "gpu  pci           numa  nics                                      cpus\n";
    for (const auto& p : placements) {
      const auto& g = gpus[p.gpu];
      char line[512];
      snprintf(line, sizeof line, "%-4d %-13s %4d  %-41s %s\n", g.index, g.pci.bdf.c_str(), p.numa_node,
               p.nics.empty() ? "-" : Join(p.nics, ",").c_str(), CpuRanges(p.cpus).c_str());
      o << line;
    }
  }
  if (!nics.empty()) {
    o << "\nnic            kind  pci           numa  model            assigned\n";
    for (const auto& n : nics) {
      char line[256];
      snprintf(line, sizeof line, "%-15s %-5s %-13s %4d  %-16s %s\n", n.name.c_str(), n.kind.c_str(), n.pci.bdf.c_str(),
               n.pci.numa_node, (n.pci.vendor + ":" + n.pci.device).c_str(), n.main_model ? "yes" : "no (other model)");
      o << line;
    }
  }
  return o.str();
}

std::string Topology::ToJson() const {
  std::ostringstream o;
  auto str_list = [](const std::vector<std::string>& v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i) s += (i ? ",\"" : "\"") + v[i] + "\"";
    return s + "]";
  };
  auto int_list = [](const std::vector<int>& v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
    return s + "]";
  };
  o << "{\"gpus\":[";
  for (size_t i = 0; i < placements.size(); ++i) {
    const auto& p = placements[i];
    o << (i ? "," : "") << "{\"gpu\":" << p.gpu << ",\"pci\":\"" << gpus[p.gpu].pci.bdf << "\",\"numa\":" << p.numa_node
      << ",\"nics\":" << str_list(p.nics) << ",\"cpus\":" << int_list(p.cpus) << "}";
  }
  o << "],\"nics\":[";
  for (size_t i = 0; i < nics.size(); ++i) {
    const auto& n = nics[i];
    o << (i ? "," : "") << "{\"name\":\"" << n.name << "\",\"kind\":\"" << n.kind << "\",\"pci\":\"" << n.pci.bdf
      << "\",\"numa\":" << n.pci.numa_node << ",\"model\":\"" << n.pci.vendor << ":" << n.pci.device
      << "\",\"assigned\":" << (n.main_model ? "true" : "false") << "}";
  }
  o << "]}";
  return o.str();
}

}  // namespace te::nic
