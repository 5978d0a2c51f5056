// RC queue pairs to peers: creation, the UD handshake, INIT/RTR/RTS, retirement.
#include "nic/verbs/verbs_domain_impl.h"

namespace te::nic::verbs_internal {

Result<PeerAddr> VerbsDomain::AddPeer(std::span<const uint8_t> address) {
  std::lock_guard<std::mutex> lock(mu_);
  return AddPeerLocked(address);
}

Result<PeerAddr> VerbsDomain::AddPeerLocked(std::span<const uint8_t> address) {
  const std::string key(address.begin(), address.end());
  auto it = by_address_.find(key);
  if (it != by_address_.end()) return it->second;
  TE_ASSIGN_OR_RETURN(WireAddress a, WireAddress::Parse(address));
  if (bool(a.infiniband) != bool(local_.infiniband))
    return InvalidArgument("verbs-native: peer " + a.Name() + " is on " + (a.infiniband ? "InfiniBand" : "Ethernet") +
                           " but this port is " + (local_.infiniband ? "InfiniBand" : "Ethernet"));
  Peer p;
  p.addr = a;
  p.raw.assign(address.begin(), address.end());
  ibv_ah_attr ah{};
  ah.port_num = uint8_t(options_.port);
  if (local_.infiniband) {
    ah.dlid = a.lid;
  } else {
    ah.is_global = 1;
    std::memcpy(ah.grh.dgid.raw, a.gid, 16);
    ah.grh.sgid_index = uint8_t(gid_index_);
    ah.grh.hop_limit = kHopLimit;
  }
  p.ah = ibv_create_ah(pd_, &ah);
  if (!p.ah) return IoError("verbs-native: ibv_create_ah for peer " + a.Name() + " failed");
  peers_.push_back(std::move(p));
  const PeerAddr id = peers_.size() - 1;
  by_address_[key] = id;
  return id;
}

Status VerbsDomain::NewQpLocked(Peer& p) {
  ibv_qp_init_attr qa{};
  qa.send_cq = qa.recv_cq = cq_;
  qa.srq = srq_;
  qa.qp_type = IBV_QPT_RC;
  qa.cap.max_send_wr = options_.send_depth;
  qa.cap.max_send_sge = 1;
  p.qp = ibv_create_qp(pd_, &qa);
  if (!p.qp) return IoError("verbs-native: creating an RC QP for peer " + p.addr.Name() + " failed");
  ibv_qp_attr a{};
  a.qp_state = IBV_QPS_INIT;
  a.port_num = uint8_t(options_.port);
  a.qp_access_flags = IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_LOCAL_WRITE;
  if (ibv_modify_qp(p.qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS)) {
    ibv_destroy_qp(p.qp);
    p.qp = nullptr;
    return IoError("verbs-native: RC QP to INIT failed for peer " + p.addr.Name());
  }
  qp_outstanding_[p.qp] = 0;
  p.state = State::kConnecting;
  return Status::Ok();
}

Status VerbsDomain::ConnectQpLocked(Peer& p, uint32_t remote_qpn) {
  ibv_qp_attr a{};
  a.qp_state = IBV_QPS_RTR;
  a.path_mtu = path_mtu_;
  a.dest_qp_num = remote_qpn;
  a.rq_psn = 0;
  a.max_dest_rd_atomic = 1;
  a.min_rnr_timer = options_.min_rnr_timer;
  a.ah_attr.port_num = uint8_t(options_.port);
  if (local_.infiniband) {
    a.ah_attr.dlid = p.addr.lid;
  } else {
    a.ah_attr.is_global = 1;
    std::memcpy(a.ah_attr.grh.dgid.raw, p.addr.gid, 16);
    a.ah_attr.grh.sgid_index = uint8_t(gid_index_);
    a.ah_attr.grh.hop_limit = kHopLimit;
  }
  if (ibv_modify_qp(p.qp, &a,
                    IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                        IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER))
    return IoError("verbs-native: RC QP to RTR failed for peer " + p.addr.Name());
  a = {};
  a.qp_state = IBV_QPS_RTS;
  a.timeout = options_.timeout;
  a.retry_cnt = options_.retry_cnt;
  a.rnr_retry = options_.rnr_retry;
  a.sq_psn = 0;
  a.max_rd_atomic = 1;
  if (ibv_modify_qp(p.qp, &a,
                    IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
                        IBV_QP_MAX_QP_RD_ATOMIC))
    return IoError("verbs-native: RC QP to RTS failed for peer " + p.addr.Name());
  p.remote_qpn = remote_qpn;
  p.state = State::kConnected;
  return Status::Ok();
}

void VerbsDomain::RetireQpLocked(Peer& p) {
  if (!p.qp) return;
  ibv_qp_attr a{};
  a.qp_state = IBV_QPS_ERR;
  ibv_modify_qp(p.qp, &a, IBV_QP_STATE);  // flushes what is posted
  if (qp_outstanding_[p.qp] == 0) {
    qp_outstanding_.erase(p.qp);
    ibv_destroy_qp(p.qp);
  } else {
    retired_.push_back(p.qp);
  }
  p.qp = nullptr;
  p.state = State::kNone;
  p.remote_qpn = 0;
}

void VerbsDomain::QpOpDone(ibv_qp* qp) {
  auto it = qp_outstanding_.find(qp);
  if (it == qp_outstanding_.end()) return;
  if (--it->second == 0) {
    auto r = std::find(retired_.begin(), retired_.end(), qp);
    if (r != retired_.end()) {
      retired_.erase(r);
      qp_outstanding_.erase(it);
      ibv_destroy_qp(qp);
    }
  }
}

void VerbsDomain::SendHandshakeLocked(Peer& p, uint32_t type) {
  if (free_ud_send_.empty()) return;  // retried on a later post
  Handshake h;
  h.type = type;
  h.rc_qpn = p.qp ? p.qp->qp_num : 0;
  h.from = local_.Serialize();
  const auto bytes = h.Serialize();
  const int b = free_ud_send_.back();
  std::memcpy(ud_send_.at(b), bytes.data(), bytes.size());
  ibv_sge sge{reinterpret_cast<uint64_t>(ud_send_.at(b)), uint32_t(bytes.size()), ud_send_.mr->lkey};
  ibv_send_wr wr{};
  wr.wr_id = reinterpret_cast<uint64_t>(NewCtx(OpKind::kUdSend, nullptr, 0, nullptr, b));
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = IBV_WR_SEND;
  wr.send_flags = IBV_SEND_SIGNALED;
  wr.wr.ud.ah = p.ah;
  wr.wr.ud.remote_qpn = p.addr.ud_qpn;
  wr.wr.ud.remote_qkey = kQkey;
  ibv_send_wr* bad = nullptr;
  if (ibv_post_send(ud_, &wr, &bad) == 0)
    free_ud_send_.pop_back();
  else
    FreeCtx(reinterpret_cast<OpCtx*>(wr.wr_id));
  p.connect_sent = Clock::now();
}

Status VerbsDomain::ReadyLocked(Peer& p) {
  if (p.state == State::kConnected) return Status::Ok();
  if (p.state == State::kNone) {
    TE_RETURN_IF_ERROR(NewQpLocked(p));
    SendHandshakeLocked(p, kHandshakeConnect);
  } else if (Clock::now() - p.connect_sent > std::chrono::milliseconds(100)) {
    SendHandshakeLocked(p, kHandshakeConnect);  // UD may drop it: ask again
  }
  return Unavailable("connecting to peer " + p.addr.Name());
}

void VerbsDomain::OnHandshake(const Handshake& h) {
  auto id = AddPeerLocked(h.from);
  if (!id.ok()) return;
  Peer& p = peers_[*id];
  if (h.type == kHandshakeConnect) {  // CONNECT: a new QP of the peer (first contact, or after an error)
    if (p.state == State::kConnected && p.remote_qpn != h.rc_qpn) RetireQpLocked(p);
    if (p.state == State::kNone && !NewQpLocked(p).ok()) return;
    if (p.state == State::kConnecting && !ConnectQpLocked(p, h.rc_qpn).ok()) {
      RetireQpLocked(p);
      return;
    }
    SendHandshakeLocked(p, kHandshakeAccept);
  } else if (p.state == State::kConnecting) {  // ACCEPT of our CONNECT
    if (!ConnectQpLocked(p, h.rc_qpn).ok()) RetireQpLocked(p);
  }
}

}  // namespace te::nic::verbs_internal
