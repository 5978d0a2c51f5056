// A software RC NIC for tests: the libibverbs entry points the native verbs
// backend (nic/verbs) calls, implemented over in-process queue pairs. A test
// binary links this file and gets these definitions instead of
// libibverbs'; the backend is the unmodified production code.
//
// What it models (see docs/ARCHITECTURE.md, "verbs backend"):
//  - two devices: softrc0 (RoCE: Ethernet link layer, GID table with a
//    link-local RoCE v1 entry at 0 and an IPv4-mapped RoCE v2 entry at 1)
//    and softrc1 (InfiniBand: LID addressing);
//  - PDs, MRs with lkey/rkey and access flags; a write is checked against
//    the responder's MR (key, PD, REMOTE_WRITE, bounds): a violation
//    completes the request with IBV_WC_REM_ACCESS_ERR and puts both QPs in
//    the error state;
//  - RC QPs with the RESET -> INIT -> RTR -> RTS state machine and its
//    required attributes enforced; posting sends before RTS is refused;
//    a QP in error flushes what is posted (IBV_WC_WR_FLUSH_ERR);
//  - WRITE, WRITE_WITH_IMM (consumes a receive, delivers the immediate),
//    SEND/RECV, signalled and unsignalled completions, send-queue depth;
//  - RNR: a WRITE_WITH_IMM or SEND finding no receive posted is retried
//    (rnr_retry 7 = forever) and otherwise fails with
//    IBV_WC_RNR_RETRY_EXC_ERR; a peer QP that does not exist (gone) fails
//    with IBV_WC_RETRY_EXC_ERR after retry_cnt retries;
//  - SRQs, and UD QPs with address handles (40-byte GRH in front of every
//    receive, datagrams dropped when no receive is posted);
//  - completions of different QPs interleaved: a "wire" thread executes one
//    work request at a time from a randomly chosen QP (in order within a
//    QP, as RC guarantees);
//  - CQ overflow: the CQ breaks (poll returns -1) and its QPs go to error.
// Everything runs under one mutex: correctness, not speed.
#include <arpa/inet.h>
#include <infiniband/verbs.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#undef ibv_reg_mr
#undef ibv_query_port

namespace {

using Clock = std::chrono::steady_clock;

struct SoftDevice {
  ibv_device dev;
  bool infiniband;
  uint16_t lid;
  ibv_gid gids[2];
};

struct SoftMr {
  ibv_mr mr;
  int access;
  uint64_t iova;  // what remote addresses are relative to
};

struct SoftCq {
  ibv_cq cq;
  std::deque<ibv_wc> entries;
  int capacity;
  bool broken = false;
};

struct RecvWr {
  uint64_t wr_id;
  std::vector<ibv_sge> sge;
};

struct SoftSrq {
  ibv_srq srq;
  std::deque<RecvWr> wrs;
  uint32_t max_wr;
};

struct SendWr {
  ibv_send_wr wr;
  std::vector<ibv_sge> sge;
  std::vector<uint8_t> inline_data;
  bool has_inline = false;
  int attempts = 0;
  Clock::time_point not_before{};
};

struct SoftQp {
  ibv_qp qp;
  SoftCq* send_cq;
  SoftCq* recv_cq;
  SoftSrq* srq;
  uint32_t max_send_wr, max_recv_wr;
  bool sq_sig_all;
  std::deque<SendWr> sq;  // posted, not yet executed
  uint32_t sq_used = 0;   // slots held (executed unsignalled ones until the next signalled)
  uint32_t unsignaled_done = 0;
  std::deque<RecvWr> rq;
  // Connection (RC) and retry settings.
  uint32_t dest_qpn = 0;
  ibv_ah_attr av{};
  uint8_t timeout = 0, retry_cnt = 0, rnr_retry = 0, min_rnr_timer = 0;
  uint32_t qkey = 0;
  int port = 0;
};

struct SoftAh {
  ibv_ah ah;
  ibv_ah_attr attr;
};

// The whole "fabric": every device, MR and QP of the process.
struct Fabric {
  std::mutex mu;
  std::condition_variable cv;
  SoftDevice devices[2];
  ibv_device* list[3];
  std::map<uint32_t, SoftQp*> qps;
  std::map<uint32_t, SoftMr*> mrs_by_rkey, mrs_by_lkey;
  uint32_t next_qpn = 0x100, next_key = 0x1000;
  std::mt19937 rng{12345};
  std::thread wire;
  bool stop = false;
  int contexts = 0;

  Fabric() {
    for (int i = 0; i < 2; ++i) {
      SoftDevice& d = devices[i];
      std::memset(&d.dev, 0, sizeof(d.dev));
      snprintf(d.dev.name, sizeof(d.dev.name), "softrc%d", i);
      snprintf(d.dev.dev_name, sizeof(d.dev.dev_name), "usoftrc%d", i);
      d.dev.node_type = IBV_NODE_CA;
      d.dev.transport_type = IBV_TRANSPORT_IB;
      d.infiniband = i == 1;
      d.lid = d.infiniband ? uint16_t(1 + i) : 0;
      std::memset(d.gids, 0, sizeof(d.gids));
      d.gids[0].raw[0] = 0xfe;  // fe80::(i+1): link-local, RoCE v1
      d.gids[0].raw[1] = 0x80;
      d.gids[0].raw[15] = uint8_t(i + 1);
      d.gids[1].raw[10] = d.gids[1].raw[11] = 0xff;  // ::ffff:10.77.0.(i+1): RoCE v2
      d.gids[1].raw[12] = 10;
      d.gids[1].raw[13] = 77;
      d.gids[1].raw[15] = uint8_t(i + 1);
      list[i] = &d.dev;
    }
    list[2] = nullptr;
  }
  ~Fabric() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stop = true;
    }
    cv.notify_all();
    if (wire.joinable()) wire.join();
  }
  void StartWireLocked() {
    if (!wire.joinable()) wire = std::thread([this] { Run(); });
  }
  void Run();
  bool StepLocked(Clock::time_point now, Clock::time_point* next_due);
};

Fabric& F() {
  static Fabric fabric;
  return fabric;
}

SoftDevice* DeviceOf(ibv_context* ctx) {
  for (auto& d : F().devices)
    if (&d.dev == ctx->device) return &d;
  return nullptr;
}

void PushLocked(SoftCq* cq, const ibv_wc& wc);

// Every posted send and (own) receive of a QP in error completes in error.
void FlushLocked(SoftQp* q);

void MoveToErrorLocked(SoftQp* q) {
  if (q->qp.state == IBV_QPS_ERR) return;
  q->qp.state = IBV_QPS_ERR;
  FlushLocked(q);
}

void FlushLocked(SoftQp* q) {
  while (!q->sq.empty()) {
    ibv_wc wc{};
    wc.wr_id = q->sq.front().wr.wr_id;
    wc.status = IBV_WC_WR_FLUSH_ERR;
    wc.qp_num = q->qp.qp_num;
    PushLocked(q->send_cq, wc);
    q->sq.pop_front();
  }
  q->sq_used = 0;
  while (!q->rq.empty()) {
    ibv_wc wc{};
    wc.wr_id = q->rq.front().wr_id;
    wc.status = IBV_WC_WR_FLUSH_ERR;
    wc.qp_num = q->qp.qp_num;
    wc.opcode = IBV_WC_RECV;
    PushLocked(q->recv_cq, wc);
    q->rq.pop_front();
  }
}

void PushLocked(SoftCq* cq, const ibv_wc& wc) {
  if (cq->broken) return;
  if (int(cq->entries.size()) >= cq->capacity) {
    // Overflow: the CQ is unusable and every QP on it goes to error.
    cq->broken = true;
    cq->entries.clear();
    for (auto& [n, q] : F().qps)
      if (q->send_cq == cq || q->recv_cq == cq) MoveToErrorLocked(q);
    return;
  }
  cq->entries.push_back(wc);
}

SoftMr* FindMrLocked(std::map<uint32_t, SoftMr*>& m, uint32_t key) {
  auto it = m.find(key);
  return it == m.end() ? nullptr : it->second;
}

// Gathers a send WR's payload; false on a local protection error.
bool GatherLocked(SoftQp* q, const SendWr& w, std::vector<uint8_t>* out) {
  out->clear();
  if (w.has_inline) {
    *out = w.inline_data;
    return true;
  }
  for (const ibv_sge& s : w.sge) {
    SoftMr* mr = FindMrLocked(F().mrs_by_lkey, s.lkey);
    const uint64_t base = reinterpret_cast<uint64_t>(mr ? mr->mr.addr : nullptr);
    if (!mr || mr->mr.pd != q->qp.pd || s.addr < base || s.addr + s.length > base + mr->mr.length) return false;
    const auto* p = reinterpret_cast<const uint8_t*>(s.addr);
    out->insert(out->end(), p, p + s.length);
  }
  return true;
}

// The QP this RC QP is connected to, as the fabric routes it.
SoftQp* PeerLocked(SoftQp* q) {
  auto it = F().qps.find(q->dest_qpn);
  if (it == F().qps.end()) return nullptr;
  SoftQp* r = it->second;
  // Routing: the address vector must name the device the peer QP is on.
  SoftDevice* rd = DeviceOf(r->qp.context);
  if (q->av.is_global) {
    if (std::memcmp(q->av.grh.dgid.raw, rd->gids[0].raw, 16) != 0 &&
        std::memcmp(q->av.grh.dgid.raw, rd->gids[1].raw, 16) != 0)
      return nullptr;
  } else if (!rd->infiniband || q->av.dlid != rd->lid) {
    return nullptr;
  }
  if (r->qp.qp_type != IBV_QPT_RC || (r->qp.state != IBV_QPS_RTR && r->qp.state != IBV_QPS_RTS) ||
      r->dest_qpn != q->qp.qp_num)
    return nullptr;
  return r;
}

bool TakeRecvLocked(SoftQp* r, RecvWr* out) {
  std::deque<RecvWr>& from = r->srq ? r->srq->wrs : r->rq;
  if (from.empty()) return false;
  *out = std::move(from.front());
  from.pop_front();
  return true;
}

void CompleteSendLocked(SoftQp* q, const SendWr& w, ibv_wc_status status, ibv_wc_opcode op, uint32_t len) {
  const bool signaled = q->sq_sig_all || (w.wr.send_flags & IBV_SEND_SIGNALED) || status != IBV_WC_SUCCESS;
  if (signaled) {
    ibv_wc wc{};
    wc.wr_id = w.wr.wr_id;
    wc.status = status;
    wc.opcode = op;
    wc.byte_len = len;
    wc.qp_num = q->qp.qp_num;
    q->sq_used -= 1 + q->unsignaled_done;
    q->unsignaled_done = 0;
    PushLocked(q->send_cq, wc);
  } else {
    ++q->unsignaled_done;
  }
}

// Executes the head of q's send queue if it is due; true if it did something.
bool ExecuteHeadLocked(SoftQp* q, Clock::time_point now, Clock::time_point* next_due) {
  SendWr& w = q->sq.front();
  if (w.not_before > now) {
    *next_due = std::min(*next_due, w.not_before);
    return false;
  }
  std::vector<uint8_t> payload;
  const ibv_wr_opcode op = w.wr.opcode;
  const ibv_wc_opcode wc_op = op == IBV_WR_SEND ? IBV_WC_SEND : IBV_WC_RDMA_WRITE;
  auto fail = [&](ibv_wc_status st) {
    SendWr done = std::move(q->sq.front());
    q->sq.pop_front();
    CompleteSendLocked(q, done, st, wc_op, 0);
    MoveToErrorLocked(q);
    return true;
  };
  if (!GatherLocked(q, w, &payload)) return fail(IBV_WC_LOC_PROT_ERR);

  if (q->qp.qp_type == IBV_QPT_UD) {
    SoftAh* ah = reinterpret_cast<SoftAh*>(w.wr.wr.ud.ah);
    auto it = F().qps.find(w.wr.wr.ud.remote_qpn);
    RecvWr rw;
    if (it != F().qps.end() && it->second->qp.qp_type == IBV_QPT_UD && it->second->qkey == w.wr.wr.ud.remote_qkey &&
        it->second->qp.state >= IBV_QPS_RTR && it->second->qp.state != IBV_QPS_ERR && ah &&
        TakeRecvLocked(it->second, &rw)) {
      SoftQp* r = it->second;
      uint64_t room = 0;
      for (auto& s : rw.sge) room += s.length;
      ibv_wc wc{};
      wc.wr_id = rw.wr_id;
      wc.qp_num = r->qp.qp_num;
      wc.src_qp = q->qp.qp_num;
      wc.opcode = IBV_WC_RECV;
      if (room < 40 + payload.size() || rw.sge.empty()) {
        wc.status = IBV_WC_LOC_LEN_ERR;
      } else {
        std::vector<uint8_t> grh(40, 0);
        std::memcpy(grh.data() + 8, DeviceOf(q->qp.context)->gids[1].raw, 16);
        grh.insert(grh.end(), payload.begin(), payload.end());
        size_t off = 0;
        for (auto& s : rw.sge) {
          const size_t n = std::min<size_t>(s.length, grh.size() - off);
          std::memcpy(reinterpret_cast<void*>(s.addr), grh.data() + off, n);
          off += n;
        }
        wc.status = IBV_WC_SUCCESS;
        wc.byte_len = uint32_t(grh.size());
        wc.wc_flags = IBV_WC_GRH;
      }
      PushLocked(r->recv_cq, wc);
    }  // else: a datagram with nowhere to go is dropped, as UD does
    SendWr done = std::move(q->sq.front());
    q->sq.pop_front();
    CompleteSendLocked(q, done, IBV_WC_SUCCESS, IBV_WC_SEND, uint32_t(payload.size()));
    return true;
  }

  SoftQp* r = PeerLocked(q);
  if (!r) {  // nobody answers: transport retries, then gives up
    if (w.attempts++ < q->retry_cnt) {
      const double us = 4.096 * double(uint64_t(1) << std::min<int>(q->timeout, 20));
      w.not_before = now + std::chrono::microseconds(int64_t(std::min(us, 50000.0)));
      *next_due = std::min(*next_due, w.not_before);
      return false;
    }
    return fail(IBV_WC_RETRY_EXC_ERR);
  }
  const bool needs_recv = op == IBV_WR_SEND || op == IBV_WR_RDMA_WRITE_WITH_IMM;
  uint8_t* target = nullptr;  // where a write's payload goes
  if (op == IBV_WR_RDMA_WRITE || op == IBV_WR_RDMA_WRITE_WITH_IMM) {
    if (!payload.empty()) {
      SoftMr* mr = FindMrLocked(F().mrs_by_rkey, w.wr.wr.rdma.rkey);
      const uint64_t base = mr ? mr->iova : 0;
      const uint64_t addr = w.wr.wr.rdma.remote_addr;
      if (!mr || mr->mr.pd != r->qp.pd || !(mr->access & IBV_ACCESS_REMOTE_WRITE) || addr < base ||
          addr + payload.size() > base + mr->mr.length) {
        MoveToErrorLocked(r);  // the responder detects the violation too
        return fail(IBV_WC_REM_ACCESS_ERR);
      }
      target = static_cast<uint8_t*>(mr->mr.addr) + (addr - base);
    }
  } else if (op != IBV_WR_SEND) {
    return fail(IBV_WC_REM_INV_REQ_ERR);
  }
  RecvWr rw;
  if (needs_recv && !TakeRecvLocked(r, &rw)) {  // receiver not ready
    if (q->rnr_retry == 7 || w.attempts++ < q->rnr_retry) {
      w.not_before = now + std::chrono::microseconds(200);
      *next_due = std::min(*next_due, w.not_before);
      return false;
    }
    return fail(IBV_WC_RNR_RETRY_EXC_ERR);
  }
  ibv_wc rwc{};
  rwc.qp_num = r->qp.qp_num;
  rwc.src_qp = q->qp.qp_num;
  rwc.status = IBV_WC_SUCCESS;
  if (op == IBV_WR_SEND) {
    uint64_t room = 0;
    for (auto& s : rw.sge) room += s.length;
    if (room < payload.size()) {
      rwc.wr_id = rw.wr_id;
      rwc.status = IBV_WC_LOC_LEN_ERR;
      rwc.opcode = IBV_WC_RECV;
      PushLocked(r->recv_cq, rwc);
      MoveToErrorLocked(r);
      return fail(IBV_WC_REM_INV_REQ_ERR);
    }
    size_t off = 0;
    for (auto& s : rw.sge) {
      const size_t n = std::min<size_t>(s.length, payload.size() - off);
      if (n) std::memcpy(reinterpret_cast<void*>(s.addr), payload.data() + off, n);
      off += n;
    }
    rwc.opcode = IBV_WC_RECV;
  } else {
    if (!payload.empty()) std::memcpy(target, payload.data(), payload.size());
    rwc.opcode = IBV_WC_RECV_RDMA_WITH_IMM;
  }
  if (needs_recv) {
    rwc.wr_id = rw.wr_id;
    rwc.byte_len = uint32_t(payload.size());
    if (op == IBV_WR_RDMA_WRITE_WITH_IMM) {
      rwc.wc_flags = IBV_WC_WITH_IMM;
      rwc.imm_data = w.wr.imm_data;
    }
    PushLocked(r->recv_cq, rwc);
  }
  SendWr done = std::move(q->sq.front());
  q->sq.pop_front();
  CompleteSendLocked(q, done, IBV_WC_SUCCESS, wc_op, uint32_t(payload.size()));
  return true;
}

bool Fabric::StepLocked(Clock::time_point now, Clock::time_point* next_due) {
  std::vector<SoftQp*> ready;
  for (auto& [n, q] : qps)
    if (!q->sq.empty() && q->qp.state == IBV_QPS_RTS) ready.push_back(q);
  if (ready.empty()) return false;
  // One work request from a random QP: completions of different QPs
  // interleave in no particular order.
  std::shuffle(ready.begin(), ready.end(), rng);
  for (SoftQp* q : ready)
    if (ExecuteHeadLocked(q, now, next_due)) return true;
  return false;
}

void Fabric::Run() {
  std::unique_lock<std::mutex> lock(mu);
  while (!stop) {
    auto next_due = Clock::now() + std::chrono::milliseconds(50);
    int steps = 0;
    while (steps < 64 && StepLocked(Clock::now(), &next_due)) ++steps;
    if (steps == 64) {
      lock.unlock();  // let posters and pollers in
      std::this_thread::yield();
      lock.lock();
      continue;
    }
    cv.wait_until(lock, next_due);
  }
}

// ---- The verbs entry points ----

int PollCq(ibv_cq* cq, int n, ibv_wc* wc) {
  std::lock_guard<std::mutex> lock(F().mu);
  SoftCq* c = reinterpret_cast<SoftCq*>(cq);
  if (c->broken) return -1;
  int i = 0;
  for (; i < n && !c->entries.empty(); ++i) {
    wc[i] = c->entries.front();
    c->entries.pop_front();
  }
  return i;
}

std::atomic<uint64_t> g_post_send_calls{0}, g_posted_send_wrs{0};

int PostSend(ibv_qp* qp, ibv_send_wr* wr, ibv_send_wr** bad) {
  std::lock_guard<std::mutex> lock(F().mu);
  SoftQp* q = reinterpret_cast<SoftQp*>(qp);
  ++g_post_send_calls;
  for (; wr; wr = wr->next) {
    if (q->qp.state != IBV_QPS_RTS && q->qp.state != IBV_QPS_ERR) {
      *bad = wr;
      return EINVAL;
    }
    if (q->sq_used >= q->max_send_wr) {
      *bad = wr;
      return ENOMEM;
    }
    SendWr w;
    w.wr = *wr;
    w.wr.next = nullptr;
    w.sge.assign(wr->sg_list, wr->sg_list + wr->num_sge);
    w.wr.sg_list = nullptr;
    if (wr->send_flags & IBV_SEND_INLINE) {
      w.has_inline = true;
      for (const auto& s : w.sge) {
        const auto* p = reinterpret_cast<const uint8_t*>(s.addr);
        w.inline_data.insert(w.inline_data.end(), p, p + s.length);
      }
    }
    ++q->sq_used;
    ++g_posted_send_wrs;
    q->sq.push_back(std::move(w));
    if (q->qp.state == IBV_QPS_ERR) FlushLocked(q);  // completes in error at once
  }
  F().cv.notify_all();
  return 0;
}

int PostRecv(ibv_qp* qp, ibv_recv_wr* wr, ibv_recv_wr** bad) {
  std::lock_guard<std::mutex> lock(F().mu);
  SoftQp* q = reinterpret_cast<SoftQp*>(qp);
  for (; wr; wr = wr->next) {
    if (q->srq || q->qp.state == IBV_QPS_RESET || q->rq.size() >= q->max_recv_wr) {
      *bad = wr;
      return q->srq || q->qp.state == IBV_QPS_RESET ? EINVAL : ENOMEM;
    }
    q->rq.push_back({wr->wr_id, std::vector<ibv_sge>(wr->sg_list, wr->sg_list + wr->num_sge)});
  }
  F().cv.notify_all();
  return 0;
}

int PostSrqRecv(ibv_srq* srq, ibv_recv_wr* wr, ibv_recv_wr** bad) {
  std::lock_guard<std::mutex> lock(F().mu);
  SoftSrq* s = reinterpret_cast<SoftSrq*>(srq);
  for (; wr; wr = wr->next) {
    if (s->wrs.size() >= s->max_wr) {
      *bad = wr;
      return ENOMEM;
    }
    s->wrs.push_back({wr->wr_id, std::vector<ibv_sge>(wr->sg_list, wr->sg_list + wr->num_sge)});
  }
  F().cv.notify_all();
  return 0;
}

}  // namespace

extern "C" {

ibv_device** ibv_get_device_list(int* num) {
  if (num) *num = 2;
  return F().list;
}
void ibv_free_device_list(ibv_device**) {}
const char* ibv_get_device_name(ibv_device* device) { return device->name; }

ibv_context* ibv_open_device(ibv_device* device) {
  auto* ctx = new ibv_context{};
  ctx->device = device;
  ctx->ops.poll_cq = PollCq;
  ctx->ops.post_send = PostSend;
  ctx->ops.post_recv = PostRecv;
  ctx->ops.post_srq_recv = PostSrqRecv;
  ctx->cmd_fd = ctx->async_fd = -1;
  ctx->abi_compat = nullptr;  // not an extended context: no _ex fast paths
  std::lock_guard<std::mutex> lock(F().mu);
  ++F().contexts;
  F().StartWireLocked();
  return ctx;
}
int ibv_close_device(ibv_context* ctx) {
  delete ctx;
  return 0;
}

int ibv_query_port(ibv_context* ctx, uint8_t port, struct _compat_ibv_port_attr* compat) {
  if (port != 1) return EINVAL;
  auto* attr = reinterpret_cast<ibv_port_attr*>(compat);
  SoftDevice* d = DeviceOf(ctx);
  attr->state = IBV_PORT_ACTIVE;
  attr->max_mtu = attr->active_mtu = IBV_MTU_4096;
  attr->gid_tbl_len = 2;
  attr->lid = d->lid;
  attr->link_layer = d->infiniband ? IBV_LINK_LAYER_INFINIBAND : IBV_LINK_LAYER_ETHERNET;
  return 0;
}

int ibv_query_gid(ibv_context* ctx, uint8_t port, int index, ibv_gid* gid) {
  if (port != 1 || index < 0 || index > 1) return EINVAL;
  *gid = DeviceOf(ctx)->gids[index];
  return 0;
}

int _ibv_query_gid_ex(ibv_context* ctx, uint32_t port, uint32_t index, ibv_gid_entry* e, uint32_t, size_t) {
  if (port != 1 || index > 1) return EINVAL;
  SoftDevice* d = DeviceOf(ctx);
  e->gid = d->gids[index];
  e->gid_index = index;
  e->port_num = port;
  e->gid_type = d->infiniband ? IBV_GID_TYPE_IB : index == 0 ? IBV_GID_TYPE_ROCE_V1 : IBV_GID_TYPE_ROCE_V2;
  e->ndev_ifindex = 0;
  return 0;
}

ibv_pd* ibv_alloc_pd(ibv_context* ctx) {
  auto* pd = new ibv_pd{};
  pd->context = ctx;
  return pd;
}
int ibv_dealloc_pd(ibv_pd* pd) {
  delete pd;
  return 0;
}

ibv_mr* ibv_reg_mr_iova2(ibv_pd* pd, void* addr, size_t length, uint64_t iova, unsigned int access) {
  if (!addr && length) {
    errno = EINVAL;
    return nullptr;
  }
  auto* m = new SoftMr{};
  std::lock_guard<std::mutex> lock(F().mu);
  m->mr.context = pd->context;
  m->mr.pd = pd;
  m->mr.addr = addr;
  m->mr.length = length;
  m->mr.lkey = F().next_key++;
  m->mr.rkey = F().next_key++;
  m->access = int(access);
  m->iova = iova;
  F().mrs_by_lkey[m->mr.lkey] = m;
  F().mrs_by_rkey[m->mr.rkey] = m;
  return &m->mr;
}

// The software NIC cannot map dmabufs: callers fall back (or fail).
ibv_mr* ibv_reg_dmabuf_mr(ibv_pd*, uint64_t, size_t, uint64_t, int, int) {
  errno = EOPNOTSUPP;
  return nullptr;
}

ibv_mr* ibv_reg_mr(ibv_pd* pd, void* addr, size_t length, int access) {
  return ibv_reg_mr_iova2(pd, addr, length, reinterpret_cast<uint64_t>(addr), unsigned(access));
}
int ibv_dereg_mr(ibv_mr* mr) {
  std::lock_guard<std::mutex> lock(F().mu);
  F().mrs_by_lkey.erase(mr->lkey);
  F().mrs_by_rkey.erase(mr->rkey);
  delete reinterpret_cast<SoftMr*>(mr);
  return 0;
}

ibv_cq* ibv_create_cq(ibv_context* ctx, int cqe, void*, ibv_comp_channel*, int) {
  if (cqe < 1) {
    errno = EINVAL;
    return nullptr;
  }
  auto* c = new SoftCq{};
  c->cq.context = ctx;
  c->cq.cqe = cqe;
  c->capacity = cqe;
  return &c->cq;
}
int ibv_destroy_cq(ibv_cq* cq) {
  std::lock_guard<std::mutex> lock(F().mu);
  for (auto& [n, q] : F().qps)
    if (&q->send_cq->cq == cq || &q->recv_cq->cq == cq) return EBUSY;
  delete reinterpret_cast<SoftCq*>(cq);
  return 0;
}

ibv_srq* ibv_create_srq(ibv_pd* pd, ibv_srq_init_attr* attr) {
  auto* s = new SoftSrq{};
  s->srq.context = pd->context;
  s->srq.pd = pd;
  s->max_wr = attr->attr.max_wr;
  return &s->srq;
}
int ibv_destroy_srq(ibv_srq* srq) {
  delete reinterpret_cast<SoftSrq*>(srq);
  return 0;
}

ibv_qp* ibv_create_qp(ibv_pd* pd, ibv_qp_init_attr* attr) {
  if ((attr->qp_type != IBV_QPT_RC && attr->qp_type != IBV_QPT_UD) || !attr->send_cq || !attr->recv_cq ||
      attr->cap.max_send_wr == 0) {
    errno = EINVAL;
    return nullptr;
  }
  auto* q = new SoftQp{};
  q->qp.context = pd->context;
  q->qp.pd = pd;
  q->qp.qp_type = attr->qp_type;
  q->qp.state = IBV_QPS_RESET;
  q->qp.send_cq = attr->send_cq;
  q->qp.recv_cq = attr->recv_cq;
  q->qp.srq = attr->srq;
  q->send_cq = reinterpret_cast<SoftCq*>(attr->send_cq);
  q->recv_cq = reinterpret_cast<SoftCq*>(attr->recv_cq);
  q->srq = reinterpret_cast<SoftSrq*>(attr->srq);
  q->max_send_wr = attr->cap.max_send_wr;
  q->max_recv_wr = attr->cap.max_recv_wr;
  q->sq_sig_all = attr->sq_sig_all;
  std::lock_guard<std::mutex> lock(F().mu);
  q->qp.qp_num = F().next_qpn++;
  F().qps[q->qp.qp_num] = q;
  return &q->qp;
}

int ibv_modify_qp(ibv_qp* qp, ibv_qp_attr* a, int mask) {
  std::lock_guard<std::mutex> lock(F().mu);
  SoftQp* q = reinterpret_cast<SoftQp*>(qp);
  if (!(mask & IBV_QP_STATE)) return EINVAL;
  const ibv_qp_state from = q->qp.state, to = a->qp_state;
  const bool rc = q->qp.qp_type == IBV_QPT_RC;
  auto has = [&](int bits) { return (mask & bits) == bits; };
  if (to == IBV_QPS_ERR) {
    MoveToErrorLocked(q);
    return 0;
  }
  if (to == IBV_QPS_RESET) {
    q->sq.clear();
    q->rq.clear();
    q->sq_used = q->unsignaled_done = 0;
    q->qp.state = IBV_QPS_RESET;
    return 0;
  }
  if (from == IBV_QPS_RESET && to == IBV_QPS_INIT) {
    if (!has(IBV_QP_PKEY_INDEX | IBV_QP_PORT) || (rc && !has(IBV_QP_ACCESS_FLAGS)) || (!rc && !has(IBV_QP_QKEY)))
      return EINVAL;
    if (a->port_num != 1) return EINVAL;
    q->port = a->port_num;
    if (!rc) q->qkey = a->qkey;
  } else if (from == IBV_QPS_INIT && to == IBV_QPS_RTR) {
    if (rc) {
      if (!has(IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC |
               IBV_QP_MIN_RNR_TIMER))
        return EINVAL;
      SoftDevice* d = DeviceOf(q->qp.context);
      // RoCE needs a GRH (GID addressing); InfiniBand routes by LID.
      if (!d->infiniband && !a->ah_attr.is_global) return EINVAL;
      q->dest_qpn = a->dest_qp_num;
      q->av = a->ah_attr;
      q->min_rnr_timer = a->min_rnr_timer;
    }
  } else if (from == IBV_QPS_RTR && to == IBV_QPS_RTS) {
    if (!has(IBV_QP_SQ_PSN) ||
        (rc && !has(IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_MAX_QP_RD_ATOMIC)))
      return EINVAL;
    if (rc) {
      q->timeout = a->timeout;
      q->retry_cnt = a->retry_cnt;
      q->rnr_retry = a->rnr_retry;
    }
  } else {
    return EINVAL;  // not a transition the state machine allows
  }
  q->qp.state = to;
  F().cv.notify_all();
  return 0;
}

int ibv_destroy_qp(ibv_qp* qp) {
  std::lock_guard<std::mutex> lock(F().mu);
  F().qps.erase(qp->qp_num);
  delete reinterpret_cast<SoftQp*>(qp);
  return 0;
}

ibv_ah* ibv_create_ah(ibv_pd* pd, ibv_ah_attr* attr) {
  auto* a = new SoftAh{};
  a->ah.context = pd->context;
  a->ah.pd = pd;
  a->attr = *attr;
  return &a->ah;
}
int ibv_destroy_ah(ibv_ah* ah) {
  delete reinterpret_cast<SoftAh*>(ah);
  return 0;
}

}  // extern "C"

// ---- Test hooks (tests/soft_rc/soft_rc.h) ----

namespace softrc {
// ibv_post_send calls, and the work requests they carried (chains).
uint64_t PostSendCalls() { return g_post_send_calls.load(); }
uint64_t PostedSendWrs() { return g_posted_send_wrs.load(); }
}  // namespace softrc
