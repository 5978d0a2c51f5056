// VerbsOptions: how the native verbs backend (nic/verbs) opens a device.
// Kept apart from verbs_domain.h so that EngineOptions carries them without
// the backend's interface.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace te::nic {

struct VerbsOptions {
  std::string device;  // e.g. "mlx5_0"; empty: the first device
  int port = 1;
  int gid_index = -1;         // -1: RoCE v2 by default on Ethernet; unused on InfiniBand
  uint32_t send_depth = 256;  // outstanding writes and sends per domain (and per QP)
  uint32_t recv_depth = 128;  // receives kept posted on the SRQ
  size_t max_message_bytes = 64 * 1024;
  // Path MTU of the RC queue pairs, in bytes: 256, 512, 1024, 2048 or 4096,
  // at most the port's active MTU; 0 takes the port's active MTU. 1024 is
  // safe on any RoCE network; 4096 is faster where every switch carries it.
  uint32_t path_mtu = 1024;
  // RC transport settings (ibv_modify_qp): ack timeout exponent, transport
  // retries, RNR retries (7 = forever), minimum RNR NAK timer.
  uint8_t timeout = 14;
  uint8_t retry_cnt = 7;
  uint8_t rnr_retry = 7;
  uint8_t min_rnr_timer = 12;
  // IBV_ACCESS_RELAXED_ORDERING on registrations (PCIe relaxed ordering;
  // matters for GPU memory), where the library defines it.
  bool relaxed_ordering = true;
};

}  // namespace te::nic
