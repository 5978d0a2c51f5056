// The native libibverbs implementation of nic::Domain (engine provider
// "verbs-native"): reliable-connected queue pairs on a ConnectX-class NIC,
// without libfabric's RDM emulation.
//
// One domain = one device port: a PD, one CQ, one shared receive queue kept
// filled with message-sized receives (a WRITE_WITH_IMM consumes one and
// delivers its immediate; a SEND delivers a control message), and one RC QP
// per peer, brought up lazily on first use.
//
// Connection set-up needs no side channel: a domain's address() carries its
// port's LID and GID and the number of a UD queue pair. The first post to a
// peer creates an RC QP and sends CONNECT (its QP number) over UD; the peer
// connects its own QP to it and answers ACCEPT. Posts to the peer answer
// kUnavailable until then, which the engine treats as back-pressure; both
// sides connecting at once meet in the middle. A QP whose work completes in
// error (remote access error, retry exceeded, RNR, flush) fails those
// requests with the status and the peer named, is torn down, and the next
// post to that peer connects afresh.
//
// Addressing: InfiniBand ports route by LID; Ethernet (RoCE) ports by GID,
// RoCE v2 (IPv4-mapped, else IPv6) chosen by default.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "base/status.h"
#include "nic/domain.h"
#include "nic/verbs/verbs_options.h"

namespace te::nic {

// Opens `options.device` (or the first device). Errors name the device and
// what failed; "no RDMA device" where there is none.
Result<std::unique_ptr<Domain>> OpenVerbsDomain(const VerbsOptions& options);

}  // namespace te::nic
