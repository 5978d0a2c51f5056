// Builds directory trees shaped like /sys for topology tests: PCI functions
// under devices/pciDDDD:BB/..., bus/pci/devices symlinks, and
// class/infiniband/<name>/device symlinks, all relative as in the kernel's.
#pragma once

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace te::testing {

class SysfsFixture {
 public:
  SysfsFixture() {
    root_ = std::filesystem::temp_directory_path() /
            ("te-sysfs-" + std::to_string(::getpid()) + "-" + std::to_string(counter_++));
    std::filesystem::create_directories(root_ / "bus/pci/devices");
    std::filesystem::create_directories(root_ / "class/infiniband");
  }
  ~SysfsFixture() { std::filesystem::remove_all(root_); }

  std::string root() const { return root_.string(); }

  // `chain`: root complex then BDFs down to the function, e.g.
  // {"pci0000:00", "0000:00:01.0", "0000:01:00.0"}.
  void AddPci(const std::vector<std::string>& chain, const std::string& vendor, const std::string& device,
              const std::string& cls, int numa, const std::string& cpulist) {
    std::filesystem::path rel = "devices";
    for (const auto& c : chain) rel /= c;
    const auto dir = root_ / rel;
    std::filesystem::create_directories(dir);
    Write(dir / "vendor", vendor);
    Write(dir / "device", device);
    Write(dir / "class", cls);
    Write(dir / "numa_node", std::to_string(numa));
    Write(dir / "local_cpulist", cpulist);
    std::filesystem::create_directory_symlink("../../.." / rel, root_ / "bus/pci/devices" / chain.back());
  }

  void AddRdmaDevice(const std::string& name, const std::vector<std::string>& chain) {
    std::filesystem::path rel = "devices";
    for (const auto& c : chain) rel /= c;
    const auto dir = root_ / "class/infiniband" / name;
    std::filesystem::create_directories(dir);
    std::filesystem::create_directory_symlink("../../.." / rel, dir / "device");
  }

 private:
  static void Write(const std::filesystem::path& p, const std::string& s) { std::ofstream(p) << s << "\n"; }
  static inline int counter_ = 0;
  std::filesystem::path root_;
};

}  // namespace te::testing
