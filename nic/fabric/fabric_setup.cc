#include "nic/fabric/fabric_setup.h"

#include "nic/backend.h"
#include "nic/fabric/provider_signals.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <optional>
#include <set>
#include <string_view>

namespace te::nic {

std::string ResolveProviderName(const std::string& provider) { return ParseProviderName(provider).fabric_provider; }

std::string FiErrorString(const char* call, ssize_t ret) {
  return std::string(call) + ": " + fi_strerror(static_cast<int>(-ret)) + " (" + std::to_string(ret) + ")";
}

FabricResources::~FabricResources() {
  if (ep) fi_close(&ep->fid);
  if (av) fi_close(&av->fid);
  if (cq) fi_close(&cq->fid);
  if (domain) fi_close(&domain->fid);
  if (fabric) fi_close(&fabric->fid);
  if (info) fi_freeinfo(info);
}

std::vector<uint8_t> FabricResources::address() const {
  size_t len = 0;
  fi_getname(&ep->fid, nullptr, &len);  // -FI_ETOOSMALL, sets len
  std::vector<uint8_t> addr(len);
  if (fi_getname(&ep->fid, addr.data(), &len) != 0) return {};
  addr.resize(len);
  return addr;
}

std::string FormatIPv4(in_addr a) {
  char buf[INET_ADDRSTRLEN] = {};
  inet_ntop(AF_INET, &a, buf, sizeof(buf));
  return buf;
}

std::string ShmRegionName(pid_t pid, uint32_t n) { return "te." + std::to_string(pid) + "." + std::to_string(n); }

std::optional<pid_t> ShmOwnerPid(std::string_view name) {
  // "[fi_shm://]te.<pid>.<n>[:<ep>:<n>]": the provider appends its own
  // endpoint numbers to the name it was given.
  if (name.rfind(kShmAddressPrefix, 0) == 0) name.remove_prefix(std::strlen(kShmAddressPrefix));
  if (name.rfind("te.", 0) != 0) return std::nullopt;
  name.remove_prefix(3);
  pid_t pid = 0;
  size_t i = 0;
  for (; i < name.size() && i < 9 && name[i] >= '0' && name[i] <= '9'; ++i) pid = pid * 10 + (name[i] - '0');
  if (i == 0 || i + 1 >= name.size() || name[i] != '.' || name[i + 1] < '0' || name[i + 1] > '9') return std::nullopt;
  if (pid <= 0) return std::nullopt;
  return pid;
}

int RemoveStaleShmRegions(const std::string& dir) {
  DIR* d = opendir(dir.c_str());
  if (!d) return 0;
  int removed = 0;
  while (dirent* e = readdir(d)) {
    const auto pid = ShmOwnerPid(e->d_name);
    if (!pid) continue;
    // ESRCH: no such process in this pid namespace. A live process (or one
    // we may not signal, EPERM) keeps its region.
    if (kill(*pid, 0) == 0 || errno != ESRCH) continue;
    if (unlinkat(dirfd(d), e->d_name, 0) == 0) ++removed;
  }
  closedir(d);
  return removed;
}

Result<sockaddr_in> InterfaceAddress(const std::string& iface) {
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) return IoError(std::string("getifaddrs: ") + strerror(errno));
  std::optional<sockaddr_in> found;
  std::set<std::string> names;
  for (ifaddrs* a = list; a; a = a->ifa_next) {
    if (a->ifa_name) names.insert(a->ifa_name);
    if (found || !a->ifa_addr || a->ifa_addr->sa_family != AF_INET || iface != a->ifa_name) continue;
    found = *reinterpret_cast<const sockaddr_in*>(a->ifa_addr);
  }
  freeifaddrs(list);
  if (found) {
    found->sin_port = 0;
    return *found;
  }
  std::string known;
  for (const auto& n : names) known += (known.empty() ? "" : ", ") + n;
  return NotFound("no network interface '" + iface + "' with an IPv4 address; interfaces here: " + known);
}

Result<std::unique_ptr<FabricResources>> OpenFabric(const FabricOptions& options, bool thread_safe, size_t cq_size) {
  const std::string prov = ResolveProviderName(options.provider);
  std::string domain_name = options.domain;
  if (domain_name.empty() && prov == "tcp;ofi_rxm") domain_name = "lo";

  // tcp binds its listeners to the hints' source address; without one the
  // rxm layer picks the first interface (eth0) whatever the domain name
  // says. Pin it to the interface's IPv4 address.
  sockaddr_in src{};
  const bool pin_source = prov.rfind("tcp", 0) == 0;
  if (pin_source) {
    TE_ASSIGN_OR_RETURN(src, InterfaceAddress(domain_name));
  }

  fi_info* hints = fi_allocinfo();
  if (!hints) return Internal("fi_allocinfo failed");
  if (pin_source) {
    hints->src_addr = malloc(sizeof(src));  // fi_freeinfo frees it
    std::memcpy(hints->src_addr, &src, sizeof(src));
    hints->src_addrlen = sizeof(src);
  }
  hints->ep_attr->type = FI_EP_RDM;
  hints->caps = FI_MSG | FI_RMA | FI_WRITE | FI_REMOTE_WRITE | FI_SEND | FI_RECV;
  if (options.want_hmem) hints->caps |= FI_HMEM;
  // Context space for providers that ask for it (EFA asks for FI_CONTEXT2).
  hints->mode = FI_CONTEXT | FI_CONTEXT2;
  // The modes this code handles; the provider answers with what it requires.
  hints->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT;
  if (options.want_hmem) hints->domain_attr->mr_mode |= FI_MR_HMEM;
  hints->domain_attr->threading = thread_safe ? FI_THREAD_SAFE : FI_THREAD_DOMAIN;
  hints->domain_attr->resource_mgmt = FI_RM_ENABLED;
  hints->fabric_attr->prov_name = strdup(prov.c_str());
  if (!domain_name.empty()) hints->domain_attr->name = strdup(domain_name.c_str());
  // IPv4 keeps tcp on 127.0.0.1 (or the veth address) rather than ::1.
  if (prov.rfind("tcp", 0) == 0) hints->addr_format = FI_SOCKADDR_IN;
  if (prov == "shm") {
    // Name the endpoint's /dev/shm region ourselves ("te.<pid>.<n>"): a
    // killed process leaves its region behind, and the name says whose it
    // was, so the next engine can remove it (RemoveStaleShmRegions) and tell
    // from a peer's address whether that process still runs.
    static std::atomic<uint32_t> counter{0};
    const std::string name = std::string(kShmAddressPrefix) + ShmRegionName(getpid(), counter.fetch_add(1));
    hints->addr_format = FI_ADDR_STR;
    hints->src_addr = strdup(name.c_str());
    hints->src_addrlen = name.size() + 1;
  }

  if (prov == "shm") RemoveStaleShmRegions("/dev/shm");
  auto res = std::make_unique<FabricResources>();
  ReleaseSignalsTakenByProviders();  // Ctrl-C stays the application's (provider_signals.h)
  int ret = fi_getinfo(FI_VERSION(1, 14), nullptr, nullptr, 0, hints, &res->info);
  fi_freeinfo(hints);
  if (ret != 0 || res->info == nullptr) {
    return Unavailable(
        "no libfabric provider '" + prov + "'" + (domain_name.empty() ? "" : " on domain '" + domain_name + "'") +
        " offers an RDM endpoint with RMA writes and remote CQ data" + (options.want_hmem ? " and FI_HMEM" : "") +
        " (" + FiErrorString("fi_getinfo", ret) + "); valid providers include tcp, shm, efa, verbs");
  }
  fi_info* info = res->info;
  if (info->domain_attr->cq_data_size < 4) {
    return Unimplemented("provider " + res->provider() + " carries " + std::to_string(info->domain_attr->cq_data_size) +
                         " bytes of CQ data; 4 are needed for 32-bit immediates");
  }

  if ((ret = fi_fabric(info->fabric_attr, &res->fabric, nullptr)) != 0) return IoError(FiErrorString("fi_fabric", ret));
  if ((ret = fi_domain(res->fabric, info, &res->domain, nullptr)) != 0) return IoError(FiErrorString("fi_domain", ret));

  fi_cq_attr cq_attr{};
  cq_attr.format = FI_CQ_FORMAT_DATA;
  cq_attr.wait_obj = FI_WAIT_NONE;
  cq_attr.size = cq_size;
  if ((ret = fi_cq_open(res->domain, &cq_attr, &res->cq, nullptr)) != 0)
    return IoError(FiErrorString("fi_cq_open", ret));

  fi_av_attr av_attr{};
  av_attr.type = info->domain_attr->av_type != FI_AV_UNSPEC ? info->domain_attr->av_type : FI_AV_TABLE;
  if ((ret = fi_av_open(res->domain, &av_attr, &res->av, nullptr)) != 0)
    return IoError(FiErrorString("fi_av_open", ret));

  if ((ret = fi_endpoint(res->domain, info, &res->ep, nullptr)) != 0) return IoError(FiErrorString("fi_endpoint", ret));
  if ((ret = fi_ep_bind(res->ep, &res->av->fid, 0)) != 0) return IoError(FiErrorString("fi_ep_bind(av)", ret));
  if ((ret = fi_ep_bind(res->ep, &res->cq->fid, FI_TRANSMIT | FI_RECV)) != 0)
    return IoError(FiErrorString("fi_ep_bind(cq)", ret));
  if ((ret = fi_enable(res->ep)) != 0) return IoError(FiErrorString("fi_enable", ret));
  if (pin_source) {
    // Check what the provider actually bound: traffic goes only where the
    // caller said.
    const std::vector<uint8_t> name = res->address();
    sockaddr_in bound{};
    if (name.size() < sizeof(bound)) return IoError("tcp endpoint has no IPv4 address");
    std::memcpy(&bound, name.data(), sizeof(bound));
    if (bound.sin_family != AF_INET || bound.sin_addr.s_addr != src.sin_addr.s_addr)
      return IoError("tcp endpoint bound to " + FormatIPv4(bound.sin_addr) + ", not to interface '" + domain_name +
                     "' (" + FormatIPv4(src.sin_addr) + ")");
  }
  return res;
}

Status ReadCqError(fid_cq* cq, const std::string& provider, void** op_context) {
  fi_cq_err_entry err{};
  ssize_t ret = fi_cq_readerr(cq, &err, 0);
  *op_context = nullptr;
  if (ret < 0) return IoError(FiErrorString("fi_cq_readerr", ret));
  *op_context = err.op_context;
  const char* prov_msg = fi_cq_strerror(cq, err.prov_errno, err.err_data, nullptr, 0);
  return IoError("provider " + provider + ": " + fi_strerror(err.err) +
                 (prov_msg ? std::string(" (") + prov_msg + ")" : std::string()));
}

}  // namespace te::nic
