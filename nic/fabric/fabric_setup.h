// Opening a libfabric RDM endpoint with everything bound: shared by
// FabricDomain and the raw baseline loop. Internal to nic/fabric.
#pragma once

#include <netinet/in.h>
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "nic/fabric/fabric_options.h"

namespace te::nic {

// Owns the libfabric objects of one endpoint; closes them in reverse order.
struct FabricResources {
  fi_info* info = nullptr;
  fid_fabric* fabric = nullptr;
  fid_domain* domain = nullptr;
  fid_av* av = nullptr;
  fid_cq* cq = nullptr;
  fid_ep* ep = nullptr;

  FabricResources() = default;
  FabricResources(const FabricResources&) = delete;
  FabricResources& operator=(const FabricResources&) = delete;
  ~FabricResources();

  uint64_t mr_mode() const { return info->domain_attr->mr_mode; }
  std::string provider() const { return info->fabric_attr->prov_name; }
  std::string domain_name() const { return info->domain_attr->name; }
  std::vector<uint8_t> address() const;
};

// `thread_safe` selects FI_THREAD_SAFE (registration from any thread) over
// FI_THREAD_DOMAIN (one thread drives everything, as a bare loop does).
Result<std::unique_ptr<FabricResources>> OpenFabric(const FabricOptions& options, bool thread_safe, size_t cq_size);

// shm endpoints are named "te.<pid>.<n>" (address "fi_shm://te.<pid>.<n>").
inline constexpr const char* kShmAddressPrefix = "fi_shm://";
std::string ShmRegionName(pid_t pid, uint32_t n);
// The pid in an engine's shm region name or address; nullopt for any other.
std::optional<pid_t> ShmOwnerPid(std::string_view name);
// Unlinks regions in `dir` named by engines whose process no longer exists
// (killed processes cannot remove their own); returns how many.
int RemoveStaleShmRegions(const std::string& dir);

// The IPv4 address of network interface `iface` (port 0); NotFound names
// the interfaces there are.
Result<sockaddr_in> InterfaceAddress(const std::string& iface);
std::string FormatIPv4(in_addr a);

// "fi_writedata: Resource temporarily unavailable (-11)"
std::string FiErrorString(const char* call, ssize_t ret);

// Reads one CQ error entry and names the provider's own message.
Status ReadCqError(fid_cq* cq, const std::string& provider, void** op_context);

}  // namespace te::nic
