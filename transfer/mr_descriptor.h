// EngineAddress and MrDescriptor: the bytes peers exchange to reach an engine
// and to write into one of its registered regions.
//
// Both serialize to a versioned, checksummed byte string (and hex for
// command lines and logs). Decoding validates everything: magic, version,
// counts, lengths, trailing bytes and the CRC-32C, and says which check
// failed. A descriptor is only data; it grants nothing by itself beyond what
// the remote key already grants on the NIC.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"

namespace te {

// How to reach every domain (NIC) of one engine.
struct EngineAddress {
  std::string provider;                       // e.g. "tcp;ofi_rxm": the NIC domains' provider
  std::vector<std::vector<uint8_t>> domains;  // per-domain endpoint address
  // 1 when the last entry of `domains` is a same-host domain (provider
  // "local", nic/local/local_domain.h) beside the NIC domains: peers on this
  // host reach the engine through it. 0 otherwise. Encoded as version 2;
  // addresses without one keep version 1's bytes.
  uint8_t same_host_domains = 0;

  // Domains a peer on another host reaches: all but the same-host one.
  size_t nic_domains() const { return domains.size() - same_host_domains; }

  // Counts and sizes within what Serialize() can encode.
  Status Validate() const;

  std::vector<uint8_t> Serialize() const;
  std::string ToHex() const;
  static Result<EngineAddress> Deserialize(std::span<const uint8_t> bytes);
  static Result<EngineAddress> FromHex(const std::string& hex);

  bool operator==(const EngineAddress&) const = default;
};

// Everything a peer needs to write into one registered region: the owner's
// address, and per domain the remote key and the base that offsets are added
// to (a virtual address on FI_MR_VIRT_ADDR providers, 0 on offset-addressed
// ones such as tcp).
struct MrDescriptor {
  struct DomainKey {
    uint64_t rkey = 0;
    uint64_t remote_base = 0;
    bool operator==(const DomainKey&) const = default;
  };
  EngineAddress owner;
  std::vector<DomainKey> keys;  // one per owner domain
  uint64_t length = 0;          // writable bytes: offsets [0, length)

  // What Deserialize checks beyond the encoding, for descriptors built in
  // memory: a valid owner address, one key per owner domain, length > 0,
  // and base + length within 64 bits for every key.
  Status Validate() const;

  std::vector<uint8_t> Serialize() const;
  std::string ToHex() const;
  static Result<MrDescriptor> Deserialize(std::span<const uint8_t> bytes);
  static Result<MrDescriptor> FromHex(const std::string& hex);

  bool operator==(const MrDescriptor&) const = default;
};

// Hex helpers shared by the tools.
std::string ToHex(std::span<const uint8_t> bytes);
Result<std::vector<uint8_t>> FromHex(const std::string& hex);

}  // namespace te
