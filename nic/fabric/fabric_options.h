// FabricOptions: which libfabric provider and interface a domain opens.
#pragma once

#include <cstddef>
#include <string>

namespace te::nic {

struct FabricOptions {
  // Short names map to libfabric providers: "tcp" -> "tcp;ofi_rxm",
  // "verbs" -> "verbs;ofi_rxm", "shm", "efa". Any other string is passed to
  // fi_getinfo as a provider name unchanged.
  std::string provider = "tcp";
  // libfabric domain (interface) name. Empty means "lo" for tcp, so that the
  // embedded default never leaves the machine, and the provider's first
  // domain otherwise (e.g. "rdmap16s27-rdm" on EFA).
  std::string domain;
  // Control-message receive buffers kept posted, and their payload size.
  size_t recv_buffers = 64;
  size_t max_message_bytes = 64 * 1024;
  // Control-message send buffers (sends beyond this wait: back-pressure).
  size_t send_buffers = 64;
  // Request FI_HMEM (device memory registration). Opening fails with a clear
  // message if the provider lacks it.
  bool want_hmem = false;
};

// The libfabric provider string a short name stands for.
// The libfabric provider name fi_getinfo is given for `provider`
// (nic/backend.h's table).
std::string ResolveProviderName(const std::string& provider);

}  // namespace te::nic
