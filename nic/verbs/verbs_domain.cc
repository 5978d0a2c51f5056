// The native verbs domain's data path: posting writes and sends, polling
// the completion queue. The rest of it: verbs_domain_impl.h.
#include "nic/verbs/verbs_domain_impl.h"

namespace te::nic::verbs_internal {

OpCtx* VerbsDomain::NewCtx(OpKind kind, void* user, PeerAddr peer, ibv_qp* qp, int buffer) {
  OpCtx* c;
  if (ctx_pool_.empty()) {
    // Owned by all_ctx_: contexts of receives still posted when the domain
    // closes never come back through the CQ.
    all_ctx_.push_back(std::make_unique<OpCtx>());
    c = all_ctx_.back().get();
  } else {
    c = ctx_pool_.back();
    ctx_pool_.pop_back();
  }
  *c = OpCtx{kind, user, peer, qp, buffer};
  return c;
}

void VerbsDomain::FreeCtx(OpCtx* c) { ctx_pool_.push_back(c); }

// Receives go to the SRQ (control messages and immediates) or to the UD
// QP (handshakes); `slab` holds the buffers.

Status VerbsDomain::PostReceive(OpKind kind, int buffer) {
  Slab& slab = kind == OpKind::kRecv ? recv_ : ud_recv_;
  ibv_sge sge{reinterpret_cast<uint64_t>(slab.at(buffer)), uint32_t(slab.size), slab.mr->lkey};
  ibv_recv_wr wr{};
  wr.wr_id = reinterpret_cast<uint64_t>(NewCtx(kind, nullptr, 0, nullptr, buffer));
  wr.sg_list = &sge;
  wr.num_sge = 1;
  ibv_recv_wr* bad = nullptr;
  const int rc = kind == OpKind::kRecv ? ibv_post_srq_recv(srq_, &wr, &bad) : ibv_post_recv(ud_, &wr, &bad);
  if (rc) {
    FreeCtx(reinterpret_cast<OpCtx*>(wr.wr_id));
    return IoError("verbs-native: posting a receive failed: " + std::string(strerror(rc)));
  }
  return Status::Ok();
}

Status VerbsDomain::PostWrites(std::span<const WriteOp> ops, size_t* posted) {
  *posted = 0;
  std::lock_guard<std::mutex> lock(mu_);
  while (*posted < ops.size()) {
    const WriteOp& first = ops[*posted];
    if (first.peer >= peers_.size()) return InvalidArgument("verbs-native: unknown peer " + std::to_string(first.peer));
    Peer& p = peers_[first.peer];
    TE_RETURN_IF_ERROR(ReadyLocked(p));
    size_t n = 0;
    while (*posted + n < ops.size() && ops[*posted + n].peer == first.peer) ++n;
    chain_sge_.resize(n);
    chain_wr_.assign(n, ibv_send_wr{});
    for (size_t k = 0; k < n; ++k) {
      const WriteOp& op = ops[*posted + k];
      chain_sge_[k] = {reinterpret_cast<uint64_t>(op.local), uint32_t(op.length),
                       op.local_desc ? static_cast<ibv_mr*>(op.local_desc)->lkey : 0};
      ibv_send_wr& wr = chain_wr_[k];
      wr.wr_id = reinterpret_cast<uint64_t>(NewCtx(OpKind::kWrite, op.context, op.peer, p.qp, -1));
      wr.sg_list = op.length ? &chain_sge_[k] : nullptr;
      wr.num_sge = op.length ? 1 : 0;
      wr.opcode = op.has_imm ? IBV_WR_RDMA_WRITE_WITH_IMM : IBV_WR_RDMA_WRITE;
      wr.send_flags = IBV_SEND_SIGNALED;
      wr.imm_data = htonl(op.imm);
      wr.wr.rdma.remote_addr = op.remote_addr;
      wr.wr.rdma.rkey = uint32_t(op.rkey);
      wr.next = k + 1 < n ? &chain_wr_[k + 1] : nullptr;
    }
    ibv_send_wr* bad = nullptr;
    const int rc = ibv_post_send(p.qp, chain_wr_.data(), &bad);
    // Everything before `bad` went; `bad` and after did not.
    const size_t went = rc ? size_t(bad - chain_wr_.data()) : n;
    for (size_t k = went; k < n; ++k) FreeCtx(reinterpret_cast<OpCtx*>(chain_wr_[k].wr_id));
    qp_outstanding_[p.qp] += uint32_t(went);
    *posted += went;
    if (rc == ENOMEM) return Unavailable("send queue full");
    if (rc) return IoError("verbs-native: ibv_post_send to peer " + p.addr.Name() + " failed: " + strerror(rc));
  }
  return Status::Ok();
}

Status VerbsDomain::PostSend(PeerAddr peer, std::span<const uint8_t> data, void* context) {
  if (data.size() > options_.max_message_bytes)
    return InvalidArgument("control message of " + std::to_string(data.size()) + " bytes exceeds max_message_bytes " +
                           std::to_string(options_.max_message_bytes));
  std::lock_guard<std::mutex> lock(mu_);
  if (peer >= peers_.size()) return InvalidArgument("verbs-native: unknown peer " + std::to_string(peer));
  Peer& p = peers_[peer];
  TE_RETURN_IF_ERROR(ReadyLocked(p));
  if (free_send_.empty()) return Unavailable("all control send buffers in use");
  const int b = free_send_.back();
  std::memcpy(send_.at(b), data.data(), data.size());
  ibv_sge sge{reinterpret_cast<uint64_t>(send_.at(b)), uint32_t(data.size()), send_.mr->lkey};
  ibv_send_wr wr{};
  OpCtx* c = NewCtx(OpKind::kSend, context, peer, p.qp, b);
  wr.wr_id = reinterpret_cast<uint64_t>(c);
  wr.sg_list = &sge;
  wr.num_sge = 1;
  wr.opcode = IBV_WR_SEND;
  wr.send_flags = IBV_SEND_SIGNALED;
  ibv_send_wr* bad = nullptr;
  if (int rc = ibv_post_send(p.qp, &wr, &bad)) {
    FreeCtx(c);
    if (rc == ENOMEM) return Unavailable("send queue full");
    return IoError("verbs-native: ibv_post_send to peer " + p.addr.Name() + " failed: " + strerror(rc));
  }
  free_send_.pop_back();
  ++qp_outstanding_[p.qp];
  return Status::Ok();
}

int VerbsDomain::Poll(CompletionHandler& handler, int max) {
  constexpr int kBatch = 32;
  ibv_wc wcs[kBatch];
  int total = 0;
  while (total < max) {
    const int n = ibv_poll_cq(cq_, std::min(kBatch, max - total), wcs);
    if (n < 0) {
      handler.OnDomainError(IoError("verbs-native " + info_.domain_name + ": the completion queue failed (overflow?)"));
      return total;
    }
    if (n == 0) break;
    for (int i = 0; i < n; ++i) {
      const ibv_wc& wc = wcs[i];
      auto* c = reinterpret_cast<OpCtx*>(wc.wr_id);
      std::unique_lock<std::mutex> lock(mu_);
      switch (c->kind) {
        case OpKind::kRecv: {
          const int b = c->buffer;
          FreeCtx(c);
          if (wc.status != IBV_WC_SUCCESS) {
            lock.unlock();
            if (wc.status != IBV_WC_WR_FLUSH_ERR)
              handler.OnDomainError(
                  IoError("verbs-native: a receive completed with " + std::string(ibv_wc_status_str(wc.status))));
            break;
          }
          lock.unlock();
          if (wc.opcode == IBV_WC_RECV_RDMA_WITH_IMM)
            handler.OnImm(ntohl(wc.imm_data));
          else
            handler.OnRecv({recv_.at(b), wc.byte_len});
          lock.lock();
          if (Status s = PostReceive(OpKind::kRecv, b); !s.ok()) {
            lock.unlock();
            handler.OnDomainError(s);
          }
          break;
        }
        case OpKind::kUdRecv: {
          const int b = c->buffer;
          FreeCtx(c);
          Handshake h;
          if (wc.status == IBV_WC_SUCCESS && wc.byte_len > kGrhBytes &&
              Handshake::Parse({ud_recv_.at(b) + kGrhBytes, wc.byte_len - kGrhBytes}, &h))
            OnHandshake(h);
          if (wc.status != IBV_WC_WR_FLUSH_ERR) (void)PostReceive(OpKind::kUdRecv, b);
          break;
        }
        case OpKind::kUdSend:
          free_ud_send_.push_back(c->buffer);
          FreeCtx(c);
          break;
        case OpKind::kWrite:
        case OpKind::kSend: {
          void* user = c->user;
          const PeerAddr peer = c->peer;
          ibv_qp* qp = c->qp;
          const bool send = c->kind == OpKind::kSend;
          if (send) free_send_.push_back(c->buffer);
          FreeCtx(c);
          std::string failure;
          if (wc.status != IBV_WC_SUCCESS) {
            Peer& p = peers_[peer];
            failure = std::string(send ? "send" : "write") + " to peer " + p.addr.Name() +
                      " failed: " + ibv_wc_status_str(wc.status) + " (status " + std::to_string(wc.status) + ")";
            // The QP is in error: tear it down; the next post reconnects.
            if (p.qp == qp) RetireQpLocked(p);
          }
          QpOpDone(qp);
          lock.unlock();
          if (failure.empty())
            handler.OnSendDone(user);
          else
            handler.OnSendError(user, IoError(failure));
          break;
        }
      }
    }
    total += n;
  }
  return total;
}

}  // namespace te::nic::verbs_internal

namespace te::nic {

Result<std::unique_ptr<Domain>> OpenVerbsDomain(const VerbsOptions& options) {
  auto d = std::make_unique<verbs_internal::VerbsDomain>(options);
  TE_RETURN_IF_ERROR(d->Open());
  return std::unique_ptr<Domain>(std::move(d));
}

}  // namespace te::nic
