// Peer and RemoteRegion: a remote engine, and a region of it, resolved once
// against this engine's domains so that requests name them without lookups.
//
// Made by TransferEngine::Connect and TransferEngine::Import; immutable and
// shared, so any thread may use them in requests.
#pragma once

#include <memory>
#include <vector>

#include "nic/domain.h"
#include "transfer/mr_descriptor.h"

namespace te {

class Peer {
 public:
  Peer(EngineAddress address, std::vector<nic::PeerAddr> via_domain, const void* resolver);

  const EngineAddress& address() const { return address_; }
  // A stable 64-bit name for the peer (a hash of its address), the same in
  // every process: what per-peer statistics are keyed by.
  uint64_t id() const { return id_; }
  size_t remote_domains() const { return address_.domains.size(); }
  // Local domain d reaches remote domain d % remote_domains() through this
  // address-vector entry.
  nic::PeerAddr via(size_t local_domain) const { return via_domain_[local_domain]; }
  // The engine that resolved this peer; address-vector entries mean nothing
  // to any other engine.
  const void* resolver() const { return resolver_; }

 private:
  EngineAddress address_;
  std::vector<nic::PeerAddr> via_domain_;
  const void* resolver_;
  uint64_t id_;
};
using PeerRef = std::shared_ptr<const Peer>;

class RemoteRegion {
 public:
  RemoteRegion(MrDescriptor descriptor, PeerRef peer) : descriptor_(std::move(descriptor)), peer_(std::move(peer)) {}

  uint64_t length() const { return descriptor_.length; }
  const MrDescriptor& descriptor() const { return descriptor_; }
  const PeerRef& peer() const { return peer_; }

  // Remote domain a write from `local_domain` lands on, and its key.
  size_t remote_domain(size_t local_domain) const { return local_domain % descriptor_.keys.size(); }
  const MrDescriptor::DomainKey& key_for(size_t local_domain) const {
    return descriptor_.keys[remote_domain(local_domain)];
  }

 private:
  MrDescriptor descriptor_;
  PeerRef peer_;
};
using RemoteMr = std::shared_ptr<const RemoteRegion>;

}  // namespace te
