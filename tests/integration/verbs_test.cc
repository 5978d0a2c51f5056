// The native verbs backend (nic/verbs) against the software RC NIC
// (tests/soft_rc): first the NIC's own faithfulness through raw verbs, then
// the backend's error handling. The engine's own tests run against it too
// (engine_test.cc, built into this binary for provider "verbs-native").
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <infiniband/verbs.h>

#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "nic/verbs/verbs_domain.h"
#include "support/wait_until.h"
#include "transfer/transfer_engine.h"

namespace softrc {
uint64_t PostSendCalls();
uint64_t PostedSendWrs();
}  // namespace softrc

namespace te::testing {
namespace {

using namespace std::chrono_literals;

// ---- The software NIC, through raw verbs ----

struct Raw {
  ibv_context* ctx = nullptr;
  ibv_pd* pd = nullptr;
  ibv_gid gid{};
  Raw() {
    int n = 0;
    ibv_device** list = ibv_get_device_list(&n);
    ctx = ibv_open_device(list[0]);  // softrc0: RoCE
    ibv_free_device_list(list);
    pd = ibv_alloc_pd(ctx);
    ibv_query_gid(ctx, 1, 1, &gid);
  }
  ~Raw() {
    ibv_dealloc_pd(pd);
    ibv_close_device(ctx);
  }
  ibv_qp* Qp(ibv_cq* cq, ibv_srq* srq = nullptr, uint32_t depth = 64) {
    ibv_qp_init_attr a{};
    a.send_cq = a.recv_cq = cq;
    a.srq = srq;
    a.qp_type = IBV_QPT_RC;
    a.cap.max_send_wr = depth;
    a.cap.max_recv_wr = depth;
    a.cap.max_send_sge = a.cap.max_recv_sge = 1;
    return ibv_create_qp(pd, &a);
  }
  int Init(ibv_qp* q) {
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_INIT;
    a.port_num = 1;
    a.qp_access_flags = IBV_ACCESS_REMOTE_WRITE;
    return ibv_modify_qp(q, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS);
  }
  int Connect(ibv_qp* q, uint32_t remote, uint8_t rnr_retry = 7) {
    ibv_qp_attr a{};
    a.qp_state = IBV_QPS_RTR;
    a.path_mtu = IBV_MTU_1024;
    a.dest_qp_num = remote;
    a.max_dest_rd_atomic = 1;
    a.min_rnr_timer = 1;
    a.ah_attr.is_global = 1;
    a.ah_attr.grh.dgid = gid;
    a.ah_attr.grh.sgid_index = 1;
    a.ah_attr.port_num = 1;
    if (int rc = ibv_modify_qp(q, &a,
                               IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                                   IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER))
      return rc;
    a = {};
    a.qp_state = IBV_QPS_RTS;
    a.timeout = 1;
    a.retry_cnt = 2;
    a.rnr_retry = rnr_retry;
    a.max_rd_atomic = 1;
    return ibv_modify_qp(
        q, &a,
        IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC);
  }
  // A connected pair a <-> b.
  void Pair(ibv_qp* a, ibv_qp* b, uint8_t rnr_retry = 7) {
    ASSERT_EQ(Init(a), 0);
    ASSERT_EQ(Init(b), 0);
    ASSERT_EQ(Connect(a, b->qp_num, rnr_retry), 0);
    ASSERT_EQ(Connect(b, a->qp_num, rnr_retry), 0);
  }
  static int Write(ibv_qp* q, ibv_mr* local, uint64_t remote, uint32_t rkey, uint32_t len, uint64_t id,
                   bool imm = false) {
    ibv_sge sge{reinterpret_cast<uint64_t>(local->addr), len, local->lkey};
    ibv_send_wr wr{};
    wr.wr_id = id;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = imm ? IBV_WR_RDMA_WRITE_WITH_IMM : IBV_WR_RDMA_WRITE;
    wr.send_flags = IBV_SEND_SIGNALED;
    wr.imm_data = htonl(uint32_t(id));
    wr.wr.rdma.remote_addr = remote;
    wr.wr.rdma.rkey = rkey;
    ibv_send_wr* bad = nullptr;
    return ibv_post_send(q, &wr, &bad);
  }
  // Polls until `n` completions or 5 s.
  static std::vector<ibv_wc> Drain(ibv_cq* cq, size_t n) {
    std::vector<ibv_wc> out;
    const auto end = std::chrono::steady_clock::now() + 5s;
    while (out.size() < n && std::chrono::steady_clock::now() < end) {
      ibv_wc wc[16];
      int k = ibv_poll_cq(cq, 16, wc);
      if (k < 0) break;
      out.insert(out.end(), wc, wc + k);
      if (k == 0) std::this_thread::sleep_for(100us);
    }
    return out;
  }
};

TEST(SoftRc, QpStateMachineIsEnforced) {
  Raw r;
  ibv_cq* cq = ibv_create_cq(r.ctx, 64, nullptr, nullptr, 0);
  ibv_qp* q = r.Qp(cq);
  std::vector<uint8_t> buf(64);
  ibv_mr* mr = ibv_reg_mr(r.pd, buf.data(), buf.size(), IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
  EXPECT_EQ(Raw::Write(q, mr, 0, 0, 8, 1), EINVAL);  // RESET: nothing may be posted
  ibv_qp_attr a{};
  a.qp_state = IBV_QPS_RTR;
  EXPECT_EQ(ibv_modify_qp(q, &a, IBV_QP_STATE), EINVAL);  // RESET -> RTR skips INIT
  a.qp_state = IBV_QPS_INIT;
  a.port_num = 1;
  EXPECT_EQ(ibv_modify_qp(q, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT), EINVAL);  // no access flags
  ASSERT_EQ(r.Init(q), 0);
  EXPECT_EQ(Raw::Write(q, mr, 0, 0, 8, 1), EINVAL);  // INIT: still no sends
  a = {};
  a.qp_state = IBV_QPS_RTR;
  EXPECT_EQ(ibv_modify_qp(q, &a, IBV_QP_STATE | IBV_QP_DEST_QPN), EINVAL);  // RTR needs the path
  ibv_dereg_mr(mr);
  ibv_destroy_qp(q);
  ibv_destroy_cq(cq);
}

TEST(SoftRc, BadKeyOrBoundsIsARemoteAccessErrorAndFlushesTheRest) {
  Raw r;
  ibv_cq* cq = ibv_create_cq(r.ctx, 64, nullptr, nullptr, 0);
  std::vector<uint8_t> src(4096, 7), dst(4096, 0);
  ibv_mr* s = ibv_reg_mr(r.pd, src.data(), src.size(), IBV_ACCESS_LOCAL_WRITE);
  ibv_mr* d = ibv_reg_mr(r.pd, dst.data(), dst.size(), IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
  ibv_mr* ro = ibv_reg_mr(r.pd, dst.data(), dst.size(), IBV_ACCESS_LOCAL_WRITE);  // no remote write
  const uint64_t base = reinterpret_cast<uint64_t>(dst.data());
  struct Case {
    uint64_t addr;
    uint32_t rkey, len;
  } cases[] = {{base, d->rkey + 1000, 64}, {base + 4000, d->rkey, 97}, {base - 1, d->rkey, 8}, {base, ro->rkey, 8}};
  for (const Case& c : cases) {
    ibv_qp* a = r.Qp(cq);
    ibv_qp* b = r.Qp(cq);
    r.Pair(a, b);
    ASSERT_EQ(Raw::Write(a, s, c.addr, c.rkey, c.len, 1), 0);
    ASSERT_EQ(Raw::Write(a, s, base, d->rkey, 8, 2), 0);  // behind the bad one
    auto wc = Raw::Drain(cq, 2);
    ASSERT_EQ(wc.size(), 2u);
    EXPECT_EQ(wc[0].wr_id, 1u);
    EXPECT_EQ(wc[0].status, IBV_WC_REM_ACCESS_ERR) << ibv_wc_status_str(wc[0].status);
    EXPECT_EQ(wc[1].status, IBV_WC_WR_FLUSH_ERR);
    EXPECT_EQ(a->state, IBV_QPS_ERR);
    EXPECT_EQ(b->state, IBV_QPS_ERR);
    ibv_destroy_qp(a);
    ibv_destroy_qp(b);
  }
  EXPECT_EQ(dst, std::vector<uint8_t>(4096, 0));  // nothing landed
  ibv_dereg_mr(ro);
  ibv_dereg_mr(d);
  ibv_dereg_mr(s);
  ibv_destroy_cq(cq);
}

TEST(SoftRc, WriteWithImmNeedsAReceiveOrItIsRnr) {
  Raw r;
  ibv_cq* cq = ibv_create_cq(r.ctx, 64, nullptr, nullptr, 0);
  ibv_srq_init_attr sa{};
  sa.attr.max_wr = 4;
  ibv_srq* srq = ibv_create_srq(r.pd, &sa);
  std::vector<uint8_t> src(64, 1), dst(64, 0);
  ibv_mr* s = ibv_reg_mr(r.pd, src.data(), src.size(), IBV_ACCESS_LOCAL_WRITE);
  ibv_mr* d = ibv_reg_mr(r.pd, dst.data(), dst.size(), IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
  ibv_qp* a = r.Qp(cq);
  ibv_qp* b = r.Qp(cq, srq);
  r.Pair(a, b, /*rnr_retry=*/0);
  ASSERT_EQ(Raw::Write(a, s, reinterpret_cast<uint64_t>(dst.data()), d->rkey, 64, 5, true), 0);
  auto wc = Raw::Drain(cq, 1);
  ASSERT_EQ(wc.size(), 1u);
  EXPECT_EQ(wc[0].status, IBV_WC_RNR_RETRY_EXC_ERR) << ibv_wc_status_str(wc[0].status);

  // With a receive posted the same write delivers its immediate.
  ibv_qp* a2 = r.Qp(cq);
  ibv_qp* b2 = r.Qp(cq, srq);
  r.Pair(a2, b2, 0);
  ibv_recv_wr rw{};
  rw.wr_id = 77;
  ibv_recv_wr* bad = nullptr;
  ASSERT_EQ(ibv_post_srq_recv(srq, &rw, &bad), 0);
  ASSERT_EQ(Raw::Write(a2, s, reinterpret_cast<uint64_t>(dst.data()), d->rkey, 64, 6, true), 0);
  wc = Raw::Drain(cq, 2);
  ASSERT_EQ(wc.size(), 2u);
  for (const ibv_wc& w : wc) {
    EXPECT_EQ(w.status, IBV_WC_SUCCESS);
    if (w.opcode == IBV_WC_RECV_RDMA_WITH_IMM) {
      EXPECT_EQ(w.wr_id, 77u);
      EXPECT_EQ(ntohl(w.imm_data), 6u);
      EXPECT_EQ(w.byte_len, 64u);
    }
  }
  EXPECT_EQ(dst, src);
  for (ibv_qp* q : {a, b, a2, b2}) ibv_destroy_qp(q);
  ibv_dereg_mr(d);
  ibv_dereg_mr(s);
  ibv_destroy_srq(srq);
  ibv_destroy_cq(cq);
}

TEST(SoftRc, CompletionsOfDifferentQpsInterleaveInOrderWithinEach) {
  Raw r;
  ibv_cq* cq = ibv_create_cq(r.ctx, 1024, nullptr, nullptr, 0);
  std::vector<uint8_t> src(64), dst(64);
  ibv_mr* s = ibv_reg_mr(r.pd, src.data(), src.size(), IBV_ACCESS_LOCAL_WRITE);
  ibv_mr* d = ibv_reg_mr(r.pd, dst.data(), dst.size(), IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
  ibv_cq* other = ibv_create_cq(r.ctx, 1024, nullptr, nullptr, 0);
  ibv_qp *a1 = r.Qp(cq, nullptr, 256), *b1 = r.Qp(other), *a2 = r.Qp(cq, nullptr, 256), *b2 = r.Qp(other);
  r.Pair(a1, b1);
  r.Pair(a2, b2);
  for (uint64_t i = 0; i < 200; ++i) {
    ASSERT_EQ(Raw::Write(a1, s, reinterpret_cast<uint64_t>(dst.data()), d->rkey, 8, i), 0);
    ASSERT_EQ(Raw::Write(a2, s, reinterpret_cast<uint64_t>(dst.data()), d->rkey, 8, 1000 + i), 0);
  }
  auto wc = Raw::Drain(cq, 400);
  ASSERT_EQ(wc.size(), 400u);
  uint64_t next1 = 0, next2 = 1000;
  int switches = 0;
  for (size_t i = 0; i < wc.size(); ++i) {
    ASSERT_EQ(wc[i].status, IBV_WC_SUCCESS);
    if (wc[i].qp_num == a1->qp_num)
      EXPECT_EQ(wc[i].wr_id, next1++);  // RC: in order within a QP
    else
      EXPECT_EQ(wc[i].wr_id, next2++);
    if (i && wc[i].qp_num != wc[i - 1].qp_num) ++switches;
  }
  EXPECT_GT(switches, 20) << "completions of the two QPs did not interleave";
  for (ibv_qp* q : {a1, b1, a2, b2}) ibv_destroy_qp(q);
  ibv_dereg_mr(d);
  ibv_dereg_mr(s);
  ibv_destroy_cq(cq);
  ibv_destroy_cq(other);
}

TEST(SoftRc, CqOverflowBreaksTheCqAndItsQps) {
  Raw r;
  ibv_cq* cq = ibv_create_cq(r.ctx, 4, nullptr, nullptr, 0);
  ibv_cq* other = ibv_create_cq(r.ctx, 64, nullptr, nullptr, 0);
  std::vector<uint8_t> buf(64);
  ibv_mr* m = ibv_reg_mr(r.pd, buf.data(), buf.size(), IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
  ibv_qp* a = r.Qp(cq);
  ibv_qp* b = r.Qp(other);
  r.Pair(a, b);
  for (uint64_t i = 0; i < 8; ++i)
    ASSERT_EQ(Raw::Write(a, m, reinterpret_cast<uint64_t>(buf.data()), m->rkey, 8, i), 0);
  // Polls for zero entries: asks whether the CQ broke without draining it
  // (draining could keep it below its capacity).
  ibv_wc wc;
  EXPECT_TRUE(WaitUntil([&] { return ibv_poll_cq(cq, 0, &wc) < 0; }, 20s)) << "an overflowed CQ still polls";
  EXPECT_LT(ibv_poll_cq(cq, 1, &wc), 0);
  EXPECT_EQ(a->state, IBV_QPS_ERR);
  ibv_destroy_qp(a);
  ibv_destroy_qp(b);
  ibv_dereg_mr(m);
  ibv_destroy_cq(cq);
  ibv_destroy_cq(other);
}

// ---- The backend's error handling ----

struct Events : nic::CompletionHandler {
  std::vector<void*> done;
  std::vector<std::pair<void*, Status>> errors;
  std::vector<uint32_t> imms;
  std::vector<std::string> messages;
  std::vector<Status> domain_errors;
  void OnSendDone(void* c) override { done.push_back(c); }
  void OnSendError(void* c, const Status& s) override { errors.emplace_back(c, s); }
  void OnImm(uint32_t imm) override { imms.push_back(imm); }
  void OnRecv(std::span<const uint8_t> d) override { messages.emplace_back(d.begin(), d.end()); }
  void OnDomainError(const Status& s) override { domain_errors.push_back(s); }
};

struct DomainPair {
  std::unique_ptr<nic::Domain> a, b;
  Events ea, eb;
  nic::PeerAddr b_from_a = 0;
  std::vector<uint8_t> src = std::vector<uint8_t>(1 << 16, 3), dst = std::vector<uint8_t>(1 << 16, 0);
  nic::LocalRegistration src_reg, dst_reg;

  explicit DomainPair(nic::VerbsOptions oa = {}, nic::VerbsOptions ob = {}) {
    a = nic::OpenVerbsDomain(oa).value();
    b = nic::OpenVerbsDomain(ob).value();
    b_from_a = a->AddPeer(b->address()).value();
    src_reg = a->Register(src.data(), src.size(), {}).value();
    dst_reg = b->Register(dst.data(), dst.size(), {}).value();
  }
  ~DomainPair() {
    if (a) (void)a->Deregister(src_reg);
    if (b) (void)b->Deregister(dst_reg);
  }
  void PollBoth() {
    a->Poll(ea, 64);
    b->Poll(eb, 64);
  }
  nic::WriteOp Op(uint64_t offset, size_t len, uint32_t imm, void* ctx, uint64_t rkey_delta = 0) {
    nic::WriteOp op;
    op.local = src.data();
    op.local_desc = src_reg.desc;
    op.length = len;
    op.peer = b_from_a;
    op.remote_addr = dst_reg.remote_base + offset;
    op.rkey = dst_reg.rkey + rkey_delta;
    op.has_imm = true;
    op.imm = imm;
    op.context = ctx;
    return op;
  }
  // Posts like the engine does: back-pressure (connecting) means poll and retry.
  Status Post(const nic::WriteOp& op) {
    Status s;
    const bool went = WaitUntil([&] { return (s = a->PostWrite(op)).code() != StatusCode::kUnavailable; }, kDeadline,
                                [&] { PollBoth(); });
    return went ? s : Timeout("never connected");
  }
  template <typename Pred>
  bool PollUntil(Pred p) {
    return WaitUntil(p, kDeadline, [&] { PollBoth(); });
  }
  static constexpr std::chrono::milliseconds kDeadline{20000};
};

TEST(VerbsDomain, OpensRoceAndInfinibandPortsAndNamesBadDevices) {
  nic::VerbsOptions o;
  auto roce = nic::OpenVerbsDomain(o);
  ASSERT_TRUE(roce.ok()) << roce.status().ToString();
  EXPECT_EQ((*roce)->info().provider, "verbs-native");
  EXPECT_EQ((*roce)->info().domain_name, "softrc0");
  o.device = "softrc1";
  auto ib = nic::OpenVerbsDomain(o);
  ASSERT_TRUE(ib.ok()) << ib.status().ToString();
  auto cross = (*roce)->AddPeer((*ib)->address());
  EXPECT_FALSE(cross.ok());
  EXPECT_NE(cross.status().message().find("InfiniBand"), std::string::npos) << cross.status().ToString();
  o.device = "mlx5_9";
  auto none = nic::OpenVerbsDomain(o);
  EXPECT_EQ(none.status().code(), StatusCode::kNotFound);
  EXPECT_NE(none.status().message().find("softrc0, softrc1"), std::string::npos) << none.status().ToString();
  o.device = "softrc0";
  o.gid_index = 5;
  EXPECT_FALSE(nic::OpenVerbsDomain(o).ok());
}

TEST(VerbsDomain, InfinibandPortsConnectByLid) {
  nic::VerbsOptions o;
  o.device = "softrc1";
  DomainPair p(o, o);
  int ctx = 0;
  ASSERT_TRUE(p.Post(p.Op(0, 4096, 42, &ctx)).ok());
  ASSERT_TRUE(p.PollUntil([&] { return !p.ea.done.empty() && !p.eb.imms.empty(); }));
  EXPECT_EQ(p.eb.imms[0], 42u);
  EXPECT_EQ(std::vector<uint8_t>(p.dst.begin(), p.dst.begin() + 4096), std::vector<uint8_t>(4096, 3));
}

TEST(VerbsDomain, RemoteAccessErrorNamesStatusAndPeerAndTheNextWriteReconnects) {
  DomainPair p;
  int good = 0, bad = 0, after = 0;
  ASSERT_TRUE(p.Post(p.Op(0, 64, 1, &good)).ok());
  ASSERT_TRUE(p.PollUntil([&] { return p.ea.done.size() == 1; }));
  ASSERT_TRUE(p.Post(p.Op(0, 64, 2, &bad, /*rkey_delta=*/99)).ok());
  ASSERT_TRUE(p.PollUntil([&] { return p.ea.errors.size() == 1; }));
  EXPECT_EQ(p.ea.errors[0].first, &bad);
  const std::string m = p.ea.errors[0].second.message();
  EXPECT_NE(m.find("remote access error"), std::string::npos) << m;
  EXPECT_NE(m.find("::ffff:10.77.0.1"), std::string::npos) << m;  // the peer, by GID
  // The QP was torn down; the next write sets up a new one and lands.
  ASSERT_TRUE(p.Post(p.Op(128, 64, 3, &after)).ok());
  ASSERT_TRUE(p.PollUntil([&] { return p.ea.done.size() == 2; }));
  EXPECT_EQ(p.ea.done[1], &after);
  ASSERT_TRUE(p.PollUntil([&] { return p.eb.imms.size() == 2; }));
  EXPECT_EQ(p.eb.imms[1], 3u);
}

TEST(VerbsDomain, RnrRetryExceededWhenTheReceiverPostsNoReceives) {
  nic::VerbsOptions oa, ob;
  oa.rnr_retry = 0;
  ob.recv_depth = 1;  // one receive, and b is not polled to re-post it
  DomainPair p(oa, ob);
  int first = 0, second = 0;
  ASSERT_TRUE(p.Post(p.Op(0, 8, 1, &first)).ok());  // connects (polls both), then takes the one receive
  WaitUntil([&] { return !p.ea.done.empty(); }, 20s, [&] { p.a->Poll(p.ea, 64); });
  ASSERT_EQ(p.ea.done.size(), 1u);
  ASSERT_TRUE(p.a->PostWrite(p.Op(0, 8, 2, &second)).ok());
  WaitUntil([&] { return !p.ea.errors.empty(); }, 20s, [&] { p.a->Poll(p.ea, 64); });
  ASSERT_EQ(p.ea.errors.size(), 1u);
  EXPECT_NE(p.ea.errors[0].second.message().find("RNR retry counter exceeded"), std::string::npos)
      << p.ea.errors[0].second.ToString();
}

TEST(VerbsDomain, AVanishedPeerIsATransportRetryError) {
  DomainPair p;
  int first = 0, second = 0;
  ASSERT_TRUE(p.Post(p.Op(0, 64, 1, &first)).ok());
  ASSERT_TRUE(p.PollUntil([&] { return p.ea.done.size() == 1; }));
  ASSERT_TRUE(p.b->Deregister(p.dst_reg).ok());
  p.b.reset();  // its QPs are gone: nothing answers any more
  ASSERT_TRUE(p.a->PostWrite(p.Op(0, 64, 2, &second)).ok());
  WaitUntil([&] { return !p.ea.errors.empty(); }, 20s, [&] { p.a->Poll(p.ea, 64); });
  ASSERT_EQ(p.ea.errors.size(), 1u);
  EXPECT_EQ(p.ea.errors[0].first, &second);
  EXPECT_NE(p.ea.errors[0].second.message().find("transport retry counter exceeded"), std::string::npos)
      << p.ea.errors[0].second.ToString();
}

TEST(VerbsDomain, CudaRegistrationFallsBackFromDmabufToPeerMemory) {
  // No GPU driver here and the software NIC maps no dmabufs: the CUDA path
  // must fall back to ibv_reg_mr (how nvidia-peermem hosts register). Host
  // memory stands in for the device buffer; only the fallback is tested.
  auto d = nic::OpenVerbsDomain({}).value();
  std::vector<uint8_t> buf(1 << 16);
  nic::MemoryKind cuda;
  cuda.type = nic::MemoryKind::Type::kCuda;
  auto reg = d->Register(buf.data(), buf.size(), cuda);
  ASSERT_TRUE(reg.ok()) << reg.status().ToString();
  EXPECT_EQ(reg->remote_base, reinterpret_cast<uint64_t>(buf.data()));
  EXPECT_TRUE(d->Deregister(*reg).ok());
  auto none = d->Register(nullptr, 4096, cuda);  // both paths fail: both reasons named
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.status().message().find("dmabuf"), std::string::npos) << none.status().ToString();
  EXPECT_NE(none.status().message().find("ibv_reg_mr"), std::string::npos) << none.status().ToString();
}

// On a hardware NIC provider the library's default (SameHost::kAuto) puts
// the same-host domain beside the NIC: a peer on this host takes it.
TEST(VerbsDomain, SameHostPeersBypassTheNicByDefault) {
  EngineOptions eo;
  eo.SetProvider("verbs-native");
  ASSERT_EQ(eo.same_host, SameHost::kAuto);
  auto sender = TransferEngine::Create(eo).value();
  auto receiver = TransferEngine::Create(eo).value();
  EXPECT_TRUE(sender->has_same_host_domain());
  std::vector<uint8_t> src(64 << 10, 7), dst(64 << 10, 0);
  auto smr = sender->RegisterMemory(src.data(), src.size()).value();
  auto dmr = receiver->RegisterMemory(dst.data(), dst.size()).value();
  auto remote = sender->Import(receiver->Describe(*dmr)).value();
  EXPECT_TRUE(remote->same_host_lane().has_value());
  CompletionCounter done;
  ASSERT_TRUE(sender->Submit(SingleWrite{smr, 0, src.size(), remote, 0, 4}, {.counter = &done}).ok());
  ASSERT_TRUE(done.WaitFinished(1, std::chrono::seconds(10)));
  ASSERT_EQ(done.failed(), 0u) << done.first_error().ToString();
  ASSERT_TRUE(receiver->WaitImm(4, 1, std::chrono::seconds(10)).ok());
  EXPECT_TRUE(src == dst);
  const EngineStats st = sender->stats();
  ASSERT_EQ(st.domains.size(), 2u);
  EXPECT_EQ(st.domains[0].bytes_written, 0u);  // not through the (software) RC NIC
  EXPECT_EQ(st.domains[1].bytes_written, src.size());
}

TEST(VerbsDomain, PagedWritesGoAsChainsOfWorkRequests) {
  EngineOptions eo;
  eo.SetProvider("verbs-native");
  eo.same_host = SameHost::kNic;  // both engines are on this host: exercise the NIC
  auto sender = TransferEngine::Create(eo).value();
  auto receiver = TransferEngine::Create(eo).value();
  std::vector<uint8_t> src(256 * 4096, 5), dst(256 * 4096, 0);
  auto smr = sender->RegisterMemory(src.data(), src.size()).value();
  auto dmr = receiver->RegisterMemory(dst.data(), dst.size()).value();
  auto remote = sender->Import(receiver->Describe(*dmr)).value();
  PagedWrite w;
  w.src = smr;
  w.dst = remote;
  w.page_length = 4096;
  w.src_stride = w.dst_stride = 4096;
  for (uint32_t i = 0; i < 256; ++i) {
    w.src_pages.push_back(i);
    w.dst_pages.push_back(255 - i);
  }
  w.imm = 9;
  CompletionCounter warm, done;  // the first request also connects
  ASSERT_TRUE(sender->Submit(SingleWrite{smr, 0, 8, remote, 0, 8}, {.counter = &warm}).ok());
  ASSERT_TRUE(warm.WaitFinished(1, 10s));
  const uint64_t calls = softrc::PostSendCalls(), wrs = softrc::PostedSendWrs();
  ASSERT_TRUE(sender->Submit(w, {.counter = &done}).ok());
  ASSERT_TRUE(done.WaitFinished(1, 10s));
  ASSERT_EQ(done.failed(), 0u);
  ASSERT_TRUE(receiver->WaitImm(9, 256, 10s).ok());
  EXPECT_EQ(dst, src);
  const uint64_t c = softrc::PostSendCalls() - calls, n = softrc::PostedSendWrs() - wrs;
  EXPECT_EQ(n, 256u);
  EXPECT_LE(c * 4, n) << c << " ibv_post_send calls for " << n << " work requests";
}

TEST(VerbsDomain, ControlMessagesAndBadAddresses) {
  DomainPair p;
  const std::string hello = "hello over RC";
  const auto b_to_a = p.b->AddPeer(p.a->address()).value();
  Status s;
  // Connecting answers kUnavailable until the handshake is done; how long
  // that takes depends on the machine's load, so wait by the clock.
  WaitUntil(
      [&] {
        s = p.b->PostSend(b_to_a, {reinterpret_cast<const uint8_t*>(hello.data()), hello.size()}, nullptr);
        return s.code() != StatusCode::kUnavailable;
      },
      20s, [&] { p.PollBoth(); });
  ASSERT_TRUE(s.ok()) << s.ToString();
  ASSERT_TRUE(p.PollUntil([&] { return !p.ea.messages.empty(); }));
  EXPECT_EQ(p.ea.messages[0], hello);
  std::vector<uint8_t> junk(5, 1);
  EXPECT_FALSE(p.a->AddPeer(junk).ok());
  std::vector<uint8_t> big(70000);
  EXPECT_EQ(p.b->PostSend(b_to_a, big, nullptr).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace te::testing
