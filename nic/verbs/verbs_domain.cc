#include "nic/verbs/verbs_domain.h"

#include <arpa/inet.h>
#include <dlfcn.h>
#include <infiniband/verbs.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

namespace te::nic {

namespace {

using Clock = std::chrono::steady_clock;
constexpr uint32_t kQkey = 0x11111111;
constexpr uint32_t kUdDepth = 64;
constexpr size_t kUdBuffer = 40 + 1024;           // GRH + handshake
constexpr uint32_t kAddressMagic = 0x54455642;    // "TEVB"
constexpr uint32_t kHandshakeMagic = 0x54455648;  // "TEVH"

std::string S(uint64_t v) { return std::to_string(v); }

// What a peer needs to reach a domain (address()).
struct WireAddress {
  uint8_t infiniband = 0;
  uint8_t port = 1;
  uint16_t lid = 0;
  uint8_t gid[16] = {};
  uint32_t ud_qpn = 0;

  std::vector<uint8_t> Serialize() const {
    std::vector<uint8_t> out(4 + 1 + 1 + 2 + 16 + 4);
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
    if (b.size() != 28) return InvalidArgument("verbs address of " + S(b.size()) + " bytes; expected 28");
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
    if (infiniband) return "LID " + S(lid);
    char buf[64];
    inet_ntop(AF_INET6, gid, buf, sizeof(buf));
    return std::string("GID ") + buf;
  }
};

// CONNECT / ACCEPT, carried over UD.
struct Handshake {
  uint32_t type = 0;  // 1 CONNECT, 2 ACCEPT
  uint32_t rc_qpn = 0;
  std::vector<uint8_t> from;  // sender's address()

  std::vector<uint8_t> Serialize() const {
    std::vector<uint8_t> out(12 + from.size());
    std::memcpy(out.data(), &kHandshakeMagic, 4);
    std::memcpy(out.data() + 4, &type, 4);
    std::memcpy(out.data() + 8, &rc_qpn, 4);
    std::memcpy(out.data() + 12, from.data(), from.size());
    return out;
  }
  static bool Parse(std::span<const uint8_t> b, Handshake* h) {
    uint32_t magic = 0;
    if (b.size() < 12) return false;
    std::memcpy(&magic, b.data(), 4);
    if (magic != kHandshakeMagic) return false;
    std::memcpy(&h->type, b.data() + 4, 4);
    std::memcpy(&h->rc_qpn, b.data() + 8, 4);
    h->from.assign(b.begin() + 12, b.end());
    return h->type == 1 || h->type == 2;
  }
};

// GPU memory through dmabuf: the CUDA driver exports the range as a dmabuf
// file descriptor and the NIC maps that (no nvidia-peermem module needed).
// libcuda is opened at run time, so nothing links against it and machines
// without a GPU driver run the rest unchanged.
ibv_mr* RegisterDmabuf(ibv_pd* pd, void* ptr, size_t length, int access, std::string* why) {
  using GetHandle = int (*)(void* handle, unsigned long long dptr, size_t size, int type, unsigned long long flags);
  static GetHandle get_handle = [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    return lib ? reinterpret_cast<GetHandle>(dlsym(lib, "cuMemGetHandleForAddressRange")) : nullptr;
  }();
  if (!get_handle) {
    *why = "dmabuf: libcuda.so.1 with cuMemGetHandleForAddressRange not found";
    return nullptr;
  }
  const uint64_t page = uint64_t(sysconf(_SC_PAGESIZE));
  const uint64_t start = reinterpret_cast<uint64_t>(ptr), base = start & ~(page - 1);
  const uint64_t end = (start + length + page - 1) & ~(page - 1);
  int fd = -1;
  constexpr int kDmaBufFd = 1;  // CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD
  if (int rc = get_handle(&fd, base, size_t(end - base), kDmaBufFd, 0); rc != 0 || fd < 0) {
    *why = "dmabuf: cuMemGetHandleForAddressRange failed (CUresult " + S(uint64_t(rc)) + ")";
    return nullptr;
  }
  ibv_mr* mr = ibv_reg_dmabuf_mr(pd, start - base, length, start, fd, access);
  if (!mr) *why = std::string("dmabuf: ibv_reg_dmabuf_mr failed: ") + strerror(errno);
  close(fd);
  return mr;
}

enum class OpKind { kWrite, kSend, kRecv, kUdRecv, kUdSend };

struct OpCtx {
  OpKind kind;
  void* user = nullptr;  // the engine's context
  PeerAddr peer = 0;
  ibv_qp* qp = nullptr;
  int buffer = -1;  // send / receive slot
};

// A registered slab of equal buffers.
struct Slab {
  std::vector<uint8_t> bytes;
  ibv_mr* mr = nullptr;
  size_t size = 0;
  uint8_t* at(int i) { return bytes.data() + size_t(i) * size; }
};

class VerbsDomain final : public Domain {
 public:
  explicit VerbsDomain(const VerbsOptions& o) : options_(o) {}
  ~VerbsDomain() override;

  Status Open();
  const DomainInfo& info() const override { return info_; }
  std::vector<uint8_t> address() const override { return local_.Serialize(); }
  Result<PeerAddr> AddPeer(std::span<const uint8_t> address) override;
  Result<LocalRegistration> Register(void* ptr, size_t length, MemoryKind kind) override;
  Status Deregister(const LocalRegistration& reg) override;
  Status PostWrite(const WriteOp& op) override {
    size_t posted = 0;
    return PostWrites({&op, 1}, &posted);
  }
  Status PostWrites(std::span<const WriteOp> ops, size_t* posted) override;
  Status PostSend(PeerAddr peer, std::span<const uint8_t> data, void* context) override;
  int Poll(CompletionHandler& handler, int max) override;

 private:
  enum class State { kNone, kConnecting, kConnected };
  struct Peer {
    WireAddress addr;
    std::vector<uint8_t> raw;
    ibv_ah* ah = nullptr;
    ibv_qp* qp = nullptr;
    State state = State::kNone;
    uint32_t remote_qpn = 0;
    Clock::time_point connect_sent{};
  };

  Result<PeerAddr> AddPeerLocked(std::span<const uint8_t> address);
  Status NewQpLocked(Peer& p);
  Status ConnectQpLocked(Peer& p, uint32_t remote_qpn);
  void RetireQpLocked(Peer& p);
  void SendHandshakeLocked(Peer& p, uint32_t type);
  // Connected: OK. Otherwise starts (or nudges) the handshake: kUnavailable.
  Status ReadyLocked(Peer& p);
  void OnHandshake(const Handshake& h);
  OpCtx* NewCtx(OpKind kind, void* user, PeerAddr peer, ibv_qp* qp, int buffer);
  void FreeCtx(OpCtx* c);
  Status PostReceive(OpKind kind, int buffer);
  void QpOpDone(ibv_qp* qp);

  VerbsOptions options_;
  DomainInfo info_;
  WireAddress local_;
  ibv_context* ctx_ = nullptr;
  ibv_pd* pd_ = nullptr;
  ibv_cq* cq_ = nullptr;
  ibv_srq* srq_ = nullptr;
  ibv_qp* ud_ = nullptr;
  int access_ = 0;
  int gid_index_ = 0;
  Slab recv_, send_, ud_recv_, ud_send_;
  std::vector<int> free_send_, free_ud_send_;

  std::mutex mu_;
  std::vector<Peer> peers_;
  std::map<std::string, PeerAddr> by_address_;  // by address bytes
  std::map<ibv_qp*, uint32_t> qp_outstanding_;  // work posted on each QP, retired ones included
  std::vector<ibv_qp*> retired_;                // in error: destroyed once their work is back
  std::vector<std::unique_ptr<OpCtx>> all_ctx_;
  std::vector<OpCtx*> ctx_pool_;       // free ones
  std::vector<ibv_send_wr> chain_wr_;  // scratch of PostWrites
  std::vector<ibv_sge> chain_sge_;
};

VerbsDomain::~VerbsDomain() {
  for (auto& p : peers_) {
    if (p.qp) ibv_destroy_qp(p.qp);
    if (p.ah) ibv_destroy_ah(p.ah);
  }
  for (ibv_qp* q : retired_) ibv_destroy_qp(q);
  if (ud_) ibv_destroy_qp(ud_);
  if (srq_) ibv_destroy_srq(srq_);
  if (cq_) ibv_destroy_cq(cq_);
  for (Slab* s : {&recv_, &send_, &ud_recv_, &ud_send_})
    if (s->mr) ibv_dereg_mr(s->mr);
  if (pd_) ibv_dealloc_pd(pd_);
  if (ctx_) ibv_close_device(ctx_);
}

Status VerbsDomain::Open() {
  if (options_.send_depth == 0 || options_.recv_depth == 0 || options_.max_message_bytes == 0)
    return InvalidArgument("verbs-native: send_depth, recv_depth and max_message_bytes must be > 0");
  int n = 0;
  ibv_device** list = ibv_get_device_list(&n);
  if (!list || n == 0) {
    if (list) ibv_free_device_list(list);
    return Unavailable("verbs-native: no RDMA device on this machine");
  }
  ibv_device* dev = nullptr;
  std::string names;
  for (int i = 0; i < n; ++i) {
    names += std::string(i ? ", " : "") + ibv_get_device_name(list[i]);
    if (options_.device.empty() ? i == 0 : options_.device == ibv_get_device_name(list[i])) dev = list[i];
  }
  if (!dev) {
    ibv_free_device_list(list);
    return NotFound("verbs-native: no RDMA device '" + options_.device + "'; devices: " + names);
  }
  info_.domain_name = ibv_get_device_name(dev);
  ctx_ = ibv_open_device(dev);
  ibv_free_device_list(list);
  const std::string where = "verbs-native " + info_.domain_name + " port " + S(options_.port);
  if (!ctx_) return IoError(where + ": ibv_open_device failed: " + strerror(errno));

  ibv_port_attr port{};
  if (ibv_query_port(ctx_, uint8_t(options_.port), &port))
    return InvalidArgument(where + ": ibv_query_port failed (no such port?)");
  if (port.state != IBV_PORT_ACTIVE) return Unavailable(where + " is not active (state " + S(port.state) + ")");
  local_.port = uint8_t(options_.port);
  local_.infiniband = port.link_layer != IBV_LINK_LAYER_ETHERNET;
  local_.lid = port.lid;
  if (!local_.infiniband || options_.gid_index >= 0) {
    int index = options_.gid_index;
    if (index < 0) {  // RoCE v2 by default: IPv4-mapped first, then any v2
      int v2 = -1;
      for (int i = 0; i < port.gid_tbl_len; ++i) {
        ibv_gid_entry e{};
        if (ibv_query_gid_ex(ctx_, uint32_t(options_.port), uint32_t(i), &e, 0)) continue;
        if (e.gid_type != IBV_GID_TYPE_ROCE_V2) continue;
        const bool v4 = e.gid.raw[10] == 0xff && e.gid.raw[11] == 0xff;
        if (v4) {
          index = i;
          break;
        }
        if (v2 < 0) v2 = i;
      }
      if (index < 0) index = v2;
      if (index < 0) return NotFound(where + ": no RoCE v2 GID; set gid_index");
    }
    ibv_gid gid{};
    if (ibv_query_gid(ctx_, uint8_t(options_.port), index, &gid))
      return InvalidArgument(where + ": GID index " + S(index) + " is not in the port's table of " +
                             S(port.gid_tbl_len));
    std::memcpy(local_.gid, gid.raw, 16);
    gid_index_ = index;
  }

  pd_ = ibv_alloc_pd(ctx_);
  if (!pd_) return IoError(where + ": ibv_alloc_pd failed");
  access_ = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ;
  if (options_.relaxed_ordering) access_ |= IBV_ACCESS_RELAXED_ORDERING;
  // Every send is signalled and at most send_depth are outstanding (the
  // engine's window), so the CQ cannot overflow.
  const int cqe = int(options_.send_depth + options_.recv_depth + 2 * kUdDepth);
  cq_ = ibv_create_cq(ctx_, cqe, nullptr, nullptr, 0);
  if (!cq_) return IoError(where + ": ibv_create_cq(" + S(cqe) + ") failed");
  ibv_srq_init_attr sa{};
  sa.attr.max_wr = options_.recv_depth;
  sa.attr.max_sge = 1;
  srq_ = ibv_create_srq(pd_, &sa);
  if (!srq_) return IoError(where + ": ibv_create_srq failed");

  auto make_slab = [&](Slab& s, size_t count, size_t size) -> Status {
    s.size = size;
    s.bytes.assign(count * size, 0);
    s.mr = ibv_reg_mr(pd_, s.bytes.data(), s.bytes.size(), IBV_ACCESS_LOCAL_WRITE);
    return s.mr ? Status::Ok() : IoError(where + ": registering buffers failed");
  };
  TE_RETURN_IF_ERROR(make_slab(recv_, options_.recv_depth, options_.max_message_bytes));
  TE_RETURN_IF_ERROR(make_slab(send_, options_.send_depth, options_.max_message_bytes));
  TE_RETURN_IF_ERROR(make_slab(ud_recv_, kUdDepth, kUdBuffer));
  TE_RETURN_IF_ERROR(make_slab(ud_send_, kUdDepth, kUdBuffer));
  for (int i = int(options_.send_depth); i-- > 0;) free_send_.push_back(i);
  for (int i = int(kUdDepth); i-- > 0;) free_ud_send_.push_back(i);
  for (uint32_t i = 0; i < options_.recv_depth; ++i) TE_RETURN_IF_ERROR(PostReceive(OpKind::kRecv, int(i)));

  ibv_qp_init_attr qa{};
  qa.send_cq = qa.recv_cq = cq_;
  qa.qp_type = IBV_QPT_UD;
  qa.cap.max_send_wr = kUdDepth;
  qa.cap.max_recv_wr = kUdDepth;
  qa.cap.max_send_sge = qa.cap.max_recv_sge = 1;
  ud_ = ibv_create_qp(pd_, &qa);
  if (!ud_) return IoError(where + ": creating the UD queue pair failed");
  ibv_qp_attr a{};
  a.qp_state = IBV_QPS_INIT;
  a.port_num = uint8_t(options_.port);
  a.qkey = kQkey;
  if (ibv_modify_qp(ud_, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_QKEY))
    return IoError(where + ": UD QP to INIT failed");
  for (uint32_t i = 0; i < kUdDepth; ++i) TE_RETURN_IF_ERROR(PostReceive(OpKind::kUdRecv, int(i)));
  a = {};
  a.qp_state = IBV_QPS_RTR;
  if (ibv_modify_qp(ud_, &a, IBV_QP_STATE)) return IoError(where + ": UD QP to RTR failed");
  a.qp_state = IBV_QPS_RTS;
  a.sq_psn = 0;
  if (ibv_modify_qp(ud_, &a, IBV_QP_STATE | IBV_QP_SQ_PSN)) return IoError(where + ": UD QP to RTS failed");
  local_.ud_qpn = ud_->qp_num;

  info_.provider = "verbs-native";
  info_.max_write_bytes = size_t(1) << 30;
  info_.max_message_bytes = options_.max_message_bytes;
  info_.tx_depth = options_.send_depth;
  info_.virtual_addressing = true;
  info_.provider_keys = true;
  info_.local_descriptors = true;
  info_.hmem = false;
  return Status::Ok();
}

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
    ah.grh.hop_limit = 64;
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
  a.path_mtu = IBV_MTU_1024;
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
    a.ah_attr.grh.hop_limit = 64;
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
    SendHandshakeLocked(p, 1);
  } else if (Clock::now() - p.connect_sent > std::chrono::milliseconds(100)) {
    SendHandshakeLocked(p, 1);  // UD may drop it: ask again
  }
  return Unavailable("connecting to peer " + p.addr.Name());
}

void VerbsDomain::OnHandshake(const Handshake& h) {
  auto id = AddPeerLocked(h.from);
  if (!id.ok()) return;
  Peer& p = peers_[*id];
  if (h.type == 1) {  // CONNECT: a new QP of the peer (first contact, or after an error)
    if (p.state == State::kConnected && p.remote_qpn != h.rc_qpn) RetireQpLocked(p);
    if (p.state == State::kNone && !NewQpLocked(p).ok()) return;
    if (p.state == State::kConnecting && !ConnectQpLocked(p, h.rc_qpn).ok()) {
      RetireQpLocked(p);
      return;
    }
    SendHandshakeLocked(p, 2);
  } else if (p.state == State::kConnecting) {  // ACCEPT of our CONNECT
    if (!ConnectQpLocked(p, h.rc_qpn).ok()) RetireQpLocked(p);
  }
}

Result<LocalRegistration> VerbsDomain::Register(void* ptr, size_t length, MemoryKind kind) {
  // CUDA memory: dmabuf first; else plain ibv_reg_mr, which takes device
  // memory where the peer-memory module (nvidia-peermem) is loaded.
  std::string dmabuf_why;
  ibv_mr* mr = nullptr;
  const bool cuda = kind.type == MemoryKind::Type::kCuda;
  if (cuda) mr = RegisterDmabuf(pd_, ptr, length, access_, &dmabuf_why);
  if (!mr) mr = ibv_reg_mr(pd_, ptr, length, access_);
  if (!mr)
    return IoError("verbs-native: registering " + S(length) + " bytes of " + (cuda ? "CUDA" : "host") +
                   " memory failed: " + (cuda ? dmabuf_why + "; peer memory: " : "") +
                   "ibv_reg_mr: " + strerror(errno));
  LocalRegistration r;
  r.mr = mr;
  r.desc = mr;
  r.rkey = mr->rkey;
  r.remote_base = reinterpret_cast<uint64_t>(ptr);
  return r;
}

Status VerbsDomain::Deregister(const LocalRegistration& reg) {
  if (ibv_dereg_mr(static_cast<ibv_mr*>(reg.mr))) return IoError("verbs-native: ibv_dereg_mr failed");
  return Status::Ok();
}

// Each run of writes to one peer is one chain of work requests, posted with
// one ibv_post_send (one doorbell).
Status VerbsDomain::PostWrites(std::span<const WriteOp> ops, size_t* posted) {
  *posted = 0;
  std::lock_guard<std::mutex> lock(mu_);
  while (*posted < ops.size()) {
    const WriteOp& first = ops[*posted];
    if (first.peer >= peers_.size()) return InvalidArgument("verbs-native: unknown peer " + S(first.peer));
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
    return InvalidArgument("control message of " + S(data.size()) + " bytes exceeds max_message_bytes " +
                           S(options_.max_message_bytes));
  std::lock_guard<std::mutex> lock(mu_);
  if (peer >= peers_.size()) return InvalidArgument("verbs-native: unknown peer " + S(peer));
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
          if (wc.status == IBV_WC_SUCCESS && wc.byte_len > 40 &&
              Handshake::Parse({ud_recv_.at(b) + 40, wc.byte_len - 40}, &h))
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
                      " failed: " + ibv_wc_status_str(wc.status) + " (status " + S(wc.status) + ")";
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

}  // namespace

Result<std::unique_ptr<Domain>> OpenVerbsDomain(const VerbsOptions& options) {
  auto d = std::make_unique<VerbsDomain>(options);
  TE_RETURN_IF_ERROR(d->Open());
  return std::unique_ptr<Domain>(std::move(d));
}

}  // namespace te::nic
