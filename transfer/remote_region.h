// Peer and RemoteRegion: a remote engine, and a region of it, resolved once
// against this engine's domains so that requests name them without lookups.
//
// Lanes. An engine's domains are its NIC domains, 0 .. n-1, and possibly a
// same-host domain after them (EngineOptions::same_host). A peer on this
// host that both engines can reach directly gets that one lane; any other
// peer is reached over the NIC domains, local domain d to remote NIC domain
// d % (its NIC domains). Requests choose lanes per destination
// (request_plan.h), so one request may reach peers of both kinds.
//
// Made by TransferEngine::Connect and TransferEngine::Import; immutable and
// shared, so any thread may use them in requests.
#pragma once

#include <memory>
#include <optional>
#include <vector>

#include "nic/domain.h"
#include "transfer/mr_descriptor.h"

namespace te {

class Peer {
 public:
  // `via_domain` has an entry per local domain; `same_host_lane`, when set,
  // is the local same-host domain through which this peer was resolved.
  Peer(EngineAddress address, std::vector<nic::PeerAddr> via_domain, const void* resolver,
       std::optional<uint32_t> same_host_lane = std::nullopt);

  const EngineAddress& address() const { return address_; }
  // A stable 64-bit name for the peer (a hash of its address), the same in
  // every process: what per-peer statistics are keyed by.
  uint64_t id() const { return id_; }
  size_t remote_domains() const { return address_.domains.size(); }
  // The address-vector entry through which local domain d reaches the peer.
  nic::PeerAddr via(size_t local_domain) const { return via_domain_[local_domain]; }
  // The local same-host domain that reaches this peer directly, if any.
  const std::optional<uint32_t>& same_host_lane() const { return same_host_lane_; }
  // The remote domain a write from `local_domain` lands on: the peer's
  // same-host domain from ours, else NIC domain d % (its NIC domains).
  size_t remote_domain(size_t local_domain) const {
    if (same_host_lane_ && local_domain == *same_host_lane_) return address_.domains.size() - 1;
    return local_domain % address_.nic_domains();
  }
  // The lane control messages take (Send).
  uint32_t message_lane() const { return same_host_lane_.value_or(0); }
  // The engine that resolved this peer; address-vector entries mean nothing
  // to any other engine.
  const void* resolver() const { return resolver_; }

 private:
  EngineAddress address_;
  std::vector<nic::PeerAddr> via_domain_;
  const void* resolver_;
  std::optional<uint32_t> same_host_lane_;
  uint64_t id_;
};
using PeerRef = std::shared_ptr<const Peer>;

class RemoteRegion {
 public:
  RemoteRegion(MrDescriptor descriptor, PeerRef peer) : descriptor_(std::move(descriptor)), peer_(std::move(peer)) {
    // The same-host lane serves this region only where the owner registered
    // it there (a zero key marks GPU memory it could not share).
    if (peer_ && peer_->same_host_lane() && descriptor_.keys.size() == peer_->remote_domains() &&
        descriptor_.keys.back().rkey != 0)
      same_host_lane_ = peer_->same_host_lane();
    // Checked once here, not per request (the check builds strings).
    valid_ = descriptor_.Validate().ok();
  }

  uint64_t length() const { return descriptor_.length; }
  const MrDescriptor& descriptor() const { return descriptor_; }
  // Whether descriptor().Validate() passed (it is immutable).
  bool valid() const { return valid_; }
  const PeerRef& peer() const { return peer_; }

  // The local domain that writes into this region go through when the
  // peer is on this host and the region is registered for it; otherwise
  // writes take the NIC domains.
  const std::optional<uint32_t>& same_host_lane() const { return same_host_lane_; }

  // Remote domain a write from `local_domain` lands on, and its key.
  size_t remote_domain(size_t local_domain) const {
    return peer_ ? peer_->remote_domain(local_domain) : local_domain % descriptor_.keys.size();
  }
  const MrDescriptor::DomainKey& key_for(size_t local_domain) const {
    return descriptor_.keys[remote_domain(local_domain)];
  }

 private:
  MrDescriptor descriptor_;
  PeerRef peer_;
  std::optional<uint32_t> same_host_lane_;
  bool valid_ = false;
};
using RemoteMr = std::shared_ptr<const RemoteRegion>;

}  // namespace te
