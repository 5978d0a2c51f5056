// What native verbs domains exchange: the wire address a domain publishes
// (address()) and the UD handshake that connects two RC queue pairs
// (CONNECT / ACCEPT). Both are fixed-size, checked on decode.
#pragma once

#include <arpa/inet.h>

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"

namespace te::nic::verbs_internal {

// The Q_Key every domain's UD queue pair uses for handshakes.
constexpr uint32_t kQkey = 0x11111111;
constexpr uint32_t kAddressMagic = 0x54455642;    // "TEVB"
constexpr uint32_t kHandshakeMagic = 0x54455648;  // "TEVH"
constexpr size_t kWireAddressBytes = 28;          // magic, IB flag, port, LID, GID, UD QPN
constexpr size_t kHandshakeHeaderBytes = 12;      // magic, type, RC QPN; then the sender's address
constexpr uint32_t kHandshakeConnect = 1;
constexpr uint32_t kHandshakeAccept = 2;

// What a peer needs to reach a domain (address()).
struct WireAddress {
  uint8_t infiniband = 0;
  uint8_t port = 1;
  uint16_t lid = 0;
  uint8_t gid[16] = {};
  uint32_t ud_qpn = 0;

  std::vector<uint8_t> Serialize() const {
    std::vector<uint8_t> out(kWireAddressBytes);
    uint8_t* p = out.data();
    std::memcpy(p, &kAddressMagic, 4);
    p[4] = infiniband;
    p[5] = port;
    std::memcpy(p + 6, &lid, 2);
    std::memcpy(p + 8, gid, 16);
    std::memcpy(p + 24, &ud_qpn, 4);
    return out;
  }
  static Result<WireAddress> Parse(std::span<const uint8_t> b) {
    uint32_t magic = 0;
    if (b.size() != kWireAddressBytes)
      return InvalidArgument("verbs address of " + std::to_string(b.size()) + " bytes; expected " +
                             std::to_string(kWireAddressBytes));
    std::memcpy(&magic, b.data(), 4);
    if (magic != kAddressMagic) return InvalidArgument("not a verbs-native address (wrong magic)");
    WireAddress a;
    a.infiniband = b[4];
    a.port = b[5];
    std::memcpy(&a.lid, b.data() + 6, 2);
    std::memcpy(a.gid, b.data() + 8, 16);
    std::memcpy(&a.ud_qpn, b.data() + 24, 4);
    return a;
  }
  std::string Name() const {
    if (infiniband) return "LID " + std::to_string(lid);
    char buf[64];
    inet_ntop(AF_INET6, gid, buf, sizeof(buf));
    return std::string("GID ") + buf;
  }
};

// CONNECT / ACCEPT, carried over UD.
struct Handshake {
  uint32_t type = 0;  // kHandshakeConnect or kHandshakeAccept
  uint32_t rc_qpn = 0;
  std::vector<uint8_t> from;  // sender's address()

  std::vector<uint8_t> Serialize() const {
    std::vector<uint8_t> out(kHandshakeHeaderBytes + from.size());
    std::memcpy(out.data(), &kHandshakeMagic, 4);
    std::memcpy(out.data() + 4, &type, 4);
    std::memcpy(out.data() + 8, &rc_qpn, 4);
    if (!from.empty()) std::memcpy(out.data() + kHandshakeHeaderBytes, from.data(), from.size());
    return out;
  }
  static bool Parse(std::span<const uint8_t> b, Handshake* h) {
    uint32_t magic = 0;
    if (b.size() < kHandshakeHeaderBytes) return false;
    std::memcpy(&magic, b.data(), 4);
    if (magic != kHandshakeMagic) return false;
    std::memcpy(&h->type, b.data() + 4, 4);
    std::memcpy(&h->rc_qpn, b.data() + 8, 4);
    h->from.assign(b.begin() + kHandshakeHeaderBytes, b.end());
    return h->type == kHandshakeConnect || h->type == kHandshakeAccept;
  }
};

}  // namespace te::nic::verbs_internal
