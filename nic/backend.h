// Backend: which implementation of nic::Domain an engine opens, and the one
// place where the names users type (--provider=..., Engine(provider=...))
// map to it.
//
//   name            backend      libfabric provider
//   tcp             kLibfabric   tcp;ofi_rxm
//   verbs           kLibfabric   verbs;ofi_rxm
//   shm, efa, ...   kLibfabric   the name itself
//   verbs-native    kVerbs       (libibverbs RC queue pairs, nic/verbs)
//   local           kLocal       (same-host peers: cross-memory attach, nic/local)
#pragma once

#include <string>

namespace te::nic {

enum class Backend {
  kLibfabric,  // nic/fabric: any libfabric RDM provider
  kVerbs,      // nic/verbs: libibverbs directly
  kLocal,      // nic/local: peers on this host, process_vm_writev + shared rings
};

struct ProviderChoice {
  Backend backend = Backend::kLibfabric;
  std::string fabric_provider;  // kLibfabric: the name fi_getinfo is given
};

inline ProviderChoice ParseProviderName(const std::string& name) {
  if (name == "verbs-native") return {Backend::kVerbs, ""};
  if (name == "local") return {Backend::kLocal, ""};
  if (name == "tcp") return {Backend::kLibfabric, "tcp;ofi_rxm"};
  if (name == "verbs") return {Backend::kLibfabric, "verbs;ofi_rxm"};
  return {Backend::kLibfabric, name};
}

inline const char* BackendName(Backend b) {
  return b == Backend::kVerbs ? "verbs-native" : b == Backend::kLocal ? "local" : "libfabric";
}

}  // namespace te::nic
