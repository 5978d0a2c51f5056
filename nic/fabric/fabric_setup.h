// Opening a libfabric RDM endpoint with everything bound: shared by
// FabricDomain and the raw baseline loop. Internal to nic/fabric.
#pragma once

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

#include <memory>
#include <string>
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
Result<std::unique_ptr<FabricResources>> OpenFabric(const FabricOptions& options,
                                                    bool thread_safe, size_t cq_size);

// "fi_writedata: Resource temporarily unavailable (-11)"
std::string FiErrorString(const char* call, ssize_t ret);

// Reads one CQ error entry and names the provider's own message.
Status ReadCqError(fid_cq* cq, const std::string& provider, void** op_context);

}  // namespace te::nic
