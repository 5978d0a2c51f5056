#include "nic/fabric/fabric_domain.h"

#include <poll.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <glog/logging.h>

#include "nic/fabric/fabric_setup.h"
#include "nic/fabric/process_life.h"

namespace te::nic {
namespace {

// Every context handed to libfabric starts with the provider's scratch space
// (FI_CONTEXT / FI_CONTEXT2), then says what it is.
enum class CtxKind : uint8_t { kWrite, kSend, kRecv };
struct CtxHeader {
  fi_context2 scratch;
  CtxKind kind;
};
struct OpCtx {
  CtxHeader h;
  void* user = nullptr;
  int send_buffer = -1;  // index into send buffers for kSend
};
struct RecvCtx {
  CtxHeader h;
  int index = 0;
};

// A registered slab of fixed-size buffers (control-message send or receive).
struct BufferSlab {
  std::vector<uint8_t> bytes;
  fid_mr* mr = nullptr;
  void* desc = nullptr;
  size_t buffer_size = 0;
  uint8_t* at(int i) { return bytes.data() + size_t(i) * buffer_size; }
};

// Unpredictable registration keys of the width the provider accepts
// (mr_key_size bytes), never 0, straight from the kernel's CSPRNG: a peer
// sees the keys of the regions it is given, and a seeded generator's later
// outputs follow from enough earlier ones. Registration is rare enough that
// a system call per key costs nothing.
class RandomKeys {
 public:
  void SetWidth(size_t key_bytes) {
    mask_ = key_bytes >= 8 || key_bytes == 0 ? ~uint64_t(0) : (uint64_t(1) << (8 * key_bytes)) - 1;
  }
  Result<uint64_t> Next() const {
    for (int attempt = 0; attempt < 16; ++attempt) {
      uint64_t k = 0;
      if (getrandom(&k, sizeof(k), 0) != ssize_t(sizeof(k)))
        return IoError(std::string("getrandom: ") + strerror(errno));
      if ((k &= mask_) != 0) return k;
    }
    return Internal("getrandom returned zero keys 16 times");
  }

 private:
  uint64_t mask_ = ~uint64_t(0);
};

class FabricDomain final : public Domain {
 public:
  explicit FabricDomain(std::unique_ptr<FabricResources> res, const FabricOptions& options)
      : res_(std::move(res)), options_(options) {}

  ~FabricDomain() override {
    // Closing the endpoint first means no completion can name a freed context.
    if (res_->ep) {
      fi_close(&res_->ep->fid);
      res_->ep = nullptr;
    }
    for (BufferSlab* s : {&recv_slab_, &send_slab_, &notify_slab_})
      if (s->mr) fi_close(&s->mr->fid);
    if (peer_pidfd_)
      for (size_t i = 0; i < kTrackedPeers; ++i)
        if (int fd = peer_pidfd_[i].load(); fd >= 0) close(fd);
  }

  Status Init() {
    const uint64_t mode = res_->mr_mode();
    info_.provider = res_->provider();
    info_.domain_name = res_->domain_name();
    info_.max_write_bytes = res_->info->ep_attr->max_msg_size;
    info_.max_message_bytes = options_.max_message_bytes;
    info_.tx_depth = res_->info->tx_attr->size;
    info_.virtual_addressing = mode & FI_MR_VIRT_ADDR;
    info_.provider_keys = mode & FI_MR_PROV_KEY;
    info_.local_descriptors = mode & FI_MR_LOCAL;
    info_.hmem = res_->info->caps & FI_HMEM;
    keys_.SetWidth(res_->info->domain_attr->mr_key_size);
    is_shm_ = info_.provider == "shm";
    peer_pidfd_ = std::make_unique<std::atomic<int>[]>(kTrackedPeers);
    peer_life_ = std::make_unique<std::atomic<const PeerLife*>[]>(kTrackedPeers);
    for (size_t i = 0; i < kTrackedPeers; ++i) peer_pidfd_[i].store(-1), peer_life_[i].store(nullptr);
    if (is_shm_) {
      // Peers read this process's liveness from its mark (process_life.h);
      // without one they ask by pidfd.
      const Status published = PublishProcessLife();
      if (!published.ok()) LOG(WARNING) << "shm: " << published.ToString() << "; peers check this process by pidfd";
    }
    if (options_.max_message_bytes == 0 || options_.recv_buffers == 0 || options_.send_buffers == 0) {
      return InvalidArgument("recv_buffers, send_buffers and max_message_bytes must be > 0");
    }
    if (options_.max_message_bytes > res_->info->ep_attr->max_msg_size) {
      return InvalidArgument("max_message_bytes " + std::to_string(options_.max_message_bytes) +
                             " exceeds the provider's max_msg_size " +
                             std::to_string(res_->info->ep_attr->max_msg_size));
    }
    address_ = res_->address();
    if (address_.empty()) return IoError("fi_getname returned no address");

    TE_RETURN_IF_ERROR(MakeSlab(&recv_slab_, options_.recv_buffers, options_.max_message_bytes));
    TE_RETURN_IF_ERROR(MakeSlab(&send_slab_, options_.send_buffers, options_.max_message_bytes));
    TE_RETURN_IF_ERROR(MakeSlab(&notify_slab_, 1, 64));
    recv_ctx_.resize(options_.recv_buffers);
    for (size_t i = 0; i < recv_ctx_.size(); ++i) {
      recv_ctx_[i].h.kind = CtxKind::kRecv;
      recv_ctx_[i].index = int(i);
      TE_RETURN_IF_ERROR(PostRecv(int(i)));
    }
    for (size_t i = 0; i < options_.send_buffers; ++i) free_send_.push_back(int(i));
    return Status::Ok();
  }

  const DomainInfo& info() const override { return info_; }
  std::vector<uint8_t> address() const override { return address_; }

  Result<PeerAddr> AddPeer(std::span<const uint8_t> address) override {
    // Lengths differ by provider (shm names are strings); libfabric checks
    // the format itself.
    if (address.empty() || address.size() > 1024) {
      return InvalidArgument("peer address of " + std::to_string(address.size()) + " bytes; valid range is 1..1024");
    }
    std::string key(reinterpret_cast<const char*>(address.data()), address.size());
    std::lock_guard<std::mutex> lock(av_mu_);
    if (auto it = peers_.find(key); it != peers_.end()) return it->second;
    // shm: an engine's address names its process. A peer that is not
    // running is refused here (a stale address), and its life mark (else a
    // pidfd) tells the worker, before every run of posts, whether it still
    // runs: libfabric's shm
    // provider spins forever on the queue lock of a process that died
    // holding it, so the only safe post to a dead peer is none.
    int pidfd = -1;
    const PeerLife* life = nullptr;
    if (is_shm_) {
      if (auto pid = ShmOwnerPid(key)) {
        pidfd = int(syscall(SYS_pidfd_open, *pid, 0));
        if (pidfd < 0 && errno == ESRCH)
          return NotFound("shm peer process " + std::to_string(*pid) + " is not running (stale address)");
        life = LifeOf(*pid);
      }
    }
    fi_addr_t addr = FI_ADDR_UNSPEC;
    int ret = fi_av_insert(res_->av, address.data(), 1, &addr, 0, nullptr);
    if (ret != 1) {
      if (pidfd >= 0) close(pidfd);
      return ResourceExhausted(FiErrorString("fi_av_insert", ret) + ": the provider's peer table holds " +
                               std::to_string(peers_.size()) + " peers and took no more");
    }
    peers_.emplace(std::move(key), addr);
    if (addr < kTrackedPeers) {
      const int old = peer_pidfd_[addr].exchange(pidfd);
      if (old >= 0) close(old);
      peer_life_[addr].store(life, std::memory_order_release);
    } else if (pidfd >= 0) {
      close(pidfd);
    }
    return PeerAddr(addr);
  }

  Status RemovePeer(PeerAddr peer) override {
    std::lock_guard<std::mutex> lock(av_mu_);
    auto it = std::find_if(peers_.begin(), peers_.end(), [&](const auto& e) { return e.second == peer; });
    if (it == peers_.end()) return NotFound("peer " + std::to_string(peer) + " is not in the address vector");
    fi_addr_t addr = peer;
    int ret = fi_av_remove(res_->av, &addr, 1, 0);
    if (ret != 0) return IoError(FiErrorString("fi_av_remove", ret));
    peers_.erase(it);
    if (peer < kTrackedPeers) {
      const int old = peer_pidfd_[peer].exchange(-1);
      if (old >= 0) close(old);
      peer_life_[peer].store(nullptr, std::memory_order_release);
    }
    return Status::Ok();
  }

  Result<LocalRegistration> Register(void* ptr, size_t length, MemoryKind kind) override {
    if (ptr == nullptr || length == 0) {
      return InvalidArgument("cannot register ptr=" + std::to_string(reinterpret_cast<uintptr_t>(ptr)) +
                             " length=" + std::to_string(length) + ": need a non-null pointer and length > 0");
    }
    fid_mr* mr = nullptr;
    TE_RETURN_IF_ERROR(RegisterRaw(ptr, length, kind, kRemoteWritable, &mr));
    LocalRegistration reg;
    reg.mr = mr;
    reg.desc = fi_mr_desc(mr);
    reg.rkey = fi_mr_key(mr);
    if (reg.rkey == FI_KEY_NOTAVAIL) {
      fi_close(&mr->fid);
      return Unimplemented("provider " + info_.provider +
                           " needs raw (FI_MR_RAW) keys, which this engine does not carry");
    }
    reg.remote_base = info_.virtual_addressing ? reinterpret_cast<uint64_t>(ptr) : 0;
    return reg;
  }

  Status Deregister(const LocalRegistration& reg) override {
    if (reg.mr == nullptr) return InvalidArgument("deregistering an empty registration");
    int ret = fi_close(&static_cast<fid_mr*>(reg.mr)->fid);
    return ret == 0 ? Status::Ok() : IoError(FiErrorString("fi_close(mr)", ret));
  }

  Status PostWrite(const WriteOp& op) override {
    TE_RETURN_IF_ERROR(CheckPeerAlive(op.peer));
    return PostOne(op);
  }

  // A run to one peer checks that peer's liveness once: the check is a
  // system call (about 0.36 us here), more than the rest of a small write.
  Status PostWrites(std::span<const WriteOp> ops, size_t* posted) override {
    *posted = 0;
    for (size_t i = 0; i < ops.size(); ++i) {
      if (i == 0 || ops[i].peer != ops[i - 1].peer) TE_RETURN_IF_ERROR(CheckPeerAlive(ops[i].peer));
      TE_RETURN_IF_ERROR(PostOne(ops[i]));
      ++*posted;
    }
    return Status::Ok();
  }

  // One write, its peer already checked.
  Status PostOne(const WriteOp& op) {
    const void* local = op.local;
    void* desc = op.local_desc;
    if (op.length == 0) {
      // A zero-byte notification still carries a valid local iov: EFA
      // rejects one without.
      local = notify_slab_.at(0);
      desc = notify_slab_.desc;
    }
    OpCtx* ctx = AllocCtx(CtxKind::kWrite, op.context);
    ssize_t ret =
        op.has_imm
            ? fi_writedata(res_->ep, local, op.length, desc, op.imm, op.peer, op.remote_addr, op.rkey, &ctx->h.scratch)
            : fi_write(res_->ep, local, op.length, desc, op.peer, op.remote_addr, op.rkey, &ctx->h.scratch);
    if (ret == 0) return Status::Ok();
    FreeCtx(ctx);
    if (ret == -FI_EAGAIN) return Unavailable("send queue full");
    return IoError(FiErrorString(op.has_imm ? "fi_writedata" : "fi_write", ret));
  }

  Status PostSend(PeerAddr peer, std::span<const uint8_t> data, void* context) override {
    if (data.size() > options_.max_message_bytes) {
      return InvalidArgument("control message of " + std::to_string(data.size()) + " bytes exceeds max_message_bytes " +
                             std::to_string(options_.max_message_bytes));
    }
    TE_RETURN_IF_ERROR(CheckPeerAlive(peer));
    if (free_send_.empty()) return Unavailable("all control send buffers in use");
    int b = free_send_.back();
    std::memcpy(send_slab_.at(b), data.data(), data.size());
    OpCtx* ctx = AllocCtx(CtxKind::kSend, context);
    ctx->send_buffer = b;
    ssize_t ret = fi_send(res_->ep, send_slab_.at(b), data.size(), send_slab_.desc, peer, &ctx->h.scratch);
    if (ret == 0) {
      free_send_.pop_back();
      return Status::Ok();
    }
    FreeCtx(ctx);
    if (ret == -FI_EAGAIN) return Unavailable("send queue full");
    return IoError(FiErrorString("fi_send", ret));
  }

  int Poll(CompletionHandler& handler, int max) override {
    constexpr int kBatch = 32;
    fi_cq_data_entry entries[kBatch];
    int total = 0;
    while (total < max) {
      const int asked = std::min(kBatch, max - total);
      ssize_t n = fi_cq_read(res_->cq, entries, asked);
      if (n == -FI_EAGAIN) break;
      if (n == -FI_EAVAIL) {
        HandleError(handler);
        ++total;
        continue;
      }
      if (n < 0) {
        handler.OnDomainError(IoError(FiErrorString("fi_cq_read", n)));
        break;
      }
      for (ssize_t i = 0; i < n; ++i) HandleEntry(entries[i], handler);
      total += int(n);
      if (n < asked) break;  // the CQ is drained
    }
    return total;
  }

 private:
  // Access of a registration: user regions are written by peers; the
  // engine's own control buffers are only sent from and received into, so a
  // peer can never write into them with a guessed key.
  static constexpr uint64_t kRemoteWritable = FI_WRITE | FI_REMOTE_WRITE | FI_SEND | FI_RECV;
  static constexpr uint64_t kLocalOnly = FI_WRITE | FI_SEND | FI_RECV;

  Status RegisterRaw(void* ptr, size_t length, MemoryKind kind, uint64_t access, fid_mr** out) {
    iovec iov{ptr, length};
    fi_mr_attr attr{};
    attr.mr_iov = &iov;
    attr.iov_count = 1;
    attr.access = access;
    if (kind.type == MemoryKind::Type::kCuda) {
      if (!info_.hmem) {
        return Unimplemented("provider " + info_.provider +
                             " cannot register CUDA memory (no FI_HMEM in this build of "
                             "libfabric); register host memory instead");
      }
      attr.iface = FI_HMEM_CUDA;
      attr.device.cuda = kind.device;
    }
    // Where the engine picks keys (no FI_MR_PROV_KEY), they are random, not
    // 1, 2, 3...: a peer that was never given a region cannot guess its key.
    // A collision with a live key (-FI_ENOKEY) draws again.
    int ret = 0;
    for (int attempt = 0; attempt < 8; ++attempt) {
      if (!info_.provider_keys) {
        TE_ASSIGN_OR_RETURN(attr.requested_key, keys_.Next());
      }
      ret = fi_mr_regattr(res_->domain, &attr, 0, out);
      if (ret != -FI_ENOKEY) break;
    }
    if (ret != 0) return IoError(FiErrorString("fi_mr_regattr", ret));
    if (res_->mr_mode() & FI_MR_ENDPOINT) {
      if ((ret = fi_mr_bind(*out, &res_->ep->fid, 0)) != 0 || (ret = fi_mr_enable(*out)) != 0) {
        fi_close(&(*out)->fid);
        return IoError(FiErrorString("fi_mr_bind/enable", ret));
      }
    }
    return Status::Ok();
  }

  // kNotPosted when an shm peer's process has exited (its pidfd turned
  // readable); OK for live and untracked peers.
  Status CheckPeerAlive(PeerAddr peer) const {
    if (!is_shm_ || peer >= kTrackedPeers) return Status::Ok();
    if (const PeerLife* life = peer_life_[peer].load(std::memory_order_acquire)) {
      if (life->alive()) return Status::Ok();
      return NotPosted("shm peer " + std::to_string(peer) + ": its process has exited; nothing was posted to it");
    }
    const int fd = peer_pidfd_[peer].load(std::memory_order_relaxed);
    if (fd < 0) return Status::Ok();
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 0) <= 0) return Status::Ok();
    return NotPosted("shm peer " + std::to_string(peer) + ": its process has exited; nothing was posted to it");
  }

  Status MakeSlab(BufferSlab* slab, size_t count, size_t size) {
    slab->buffer_size = size;
    slab->bytes.assign(count * size, 0);
    TE_RETURN_IF_ERROR(RegisterRaw(slab->bytes.data(), slab->bytes.size(), MemoryKind{}, kLocalOnly, &slab->mr));
    slab->desc = fi_mr_desc(slab->mr);
    return Status::Ok();
  }

  Status PostRecv(int i) {
    ssize_t ret;
    do {
      ret = fi_recv(res_->ep, recv_slab_.at(i), recv_slab_.buffer_size, recv_slab_.desc, FI_ADDR_UNSPEC,
                    &recv_ctx_[i].h.scratch);
      if (ret == -FI_EAGAIN) fi_cq_read(res_->cq, nullptr, 0);  // drive progress
    } while (ret == -FI_EAGAIN);
    return ret == 0 ? Status::Ok() : IoError(FiErrorString("fi_recv", ret));
  }

  // The mark of process `pid`, mapped on first use; nullptr when it has
  // none. av_mu_ is held.
  const PeerLife* LifeOf(pid_t pid) {
    auto it = lives_.find(pid);
    if (it != lives_.end() && it->second->alive()) return it->second.get();
    auto life = PeerLife::Open(pid);
    if (!life.ok()) return nullptr;
    if (it != lives_.end()) {
      // A new process with a dead one's pid: keep the old mark mapped, the
      // worker may still be reading it for the dead process's entries.
      retired_lives_.push_back(std::move(it->second));
      it->second = std::move(*life);
      return it->second.get();
    }
    return lives_.emplace(pid, std::move(*life)).first->second.get();
  }

  OpCtx* AllocCtx(CtxKind kind, void* user) {
    OpCtx* ctx;
    if (free_ctx_.empty()) {
      ctx_storage_.push_back(std::make_unique<OpCtx>());
      ctx = ctx_storage_.back().get();
    } else {
      ctx = free_ctx_.back();
      free_ctx_.pop_back();
    }
    ctx->h.kind = kind;
    ctx->user = user;
    ctx->send_buffer = -1;
    return ctx;
  }
  void FreeCtx(OpCtx* ctx) { free_ctx_.push_back(ctx); }

  void HandleEntry(const fi_cq_data_entry& e, CompletionHandler& handler) {
    if (e.flags & FI_REMOTE_CQ_DATA) {
      // op_context is undefined here (shm leaves provider data in it). We do
      // not accept FI_RX_CQ_DATA mode, so a remote write never consumes one
      // of our receives.
      handler.OnImm(static_cast<uint32_t>(e.data));
      return;
    }
    if (e.op_context == nullptr) return;  // remote write without data: nothing to do
    auto* h = static_cast<CtxHeader*>(e.op_context);
    if (h->kind == CtxKind::kRecv) {
      int i = reinterpret_cast<RecvCtx*>(h)->index;
      handler.OnRecv({recv_slab_.at(i), e.len});
      Repost(i, handler);
      return;
    }
    auto* ctx = reinterpret_cast<OpCtx*>(h);
    if (ctx->send_buffer >= 0) free_send_.push_back(ctx->send_buffer);
    void* user = ctx->user;
    FreeCtx(ctx);
    handler.OnSendDone(user);
  }

  void HandleError(CompletionHandler& handler) {
    void* op_context = nullptr;
    Status st = ReadCqError(res_->cq, info_.provider, &op_context);
    if (op_context == nullptr) {
      handler.OnDomainError(st);
      return;
    }
    auto* h = static_cast<CtxHeader*>(op_context);
    if (h->kind == CtxKind::kRecv) {
      Repost(reinterpret_cast<RecvCtx*>(h)->index, handler);
      handler.OnDomainError(st.WithContext("receive failed"));
      return;
    }
    auto* ctx = reinterpret_cast<OpCtx*>(h);
    if (ctx->send_buffer >= 0) free_send_.push_back(ctx->send_buffer);
    void* user = ctx->user;
    FreeCtx(ctx);
    handler.OnSendError(user, st);
  }

  void Repost(int i, CompletionHandler& handler) {
    Status st = PostRecv(i);
    if (!st.ok()) handler.OnDomainError(st.WithContext("reposting a control receive"));
  }

  std::unique_ptr<FabricResources> res_;
  FabricOptions options_;
  DomainInfo info_;
  std::vector<uint8_t> address_;
  RandomKeys keys_;

  std::mutex av_mu_;
  std::unordered_map<std::string, fi_addr_t> peers_;
  // shm: a pidfd per peer (by address-vector index), -1 when untracked.
  static constexpr size_t kTrackedPeers = 4096;
  bool is_shm_ = false;
  std::unique_ptr<std::atomic<int>[]> peer_pidfd_;
  // shm: the peer's life mark where it published one (nullptr: ask the
  // pidfd). Marks are mapped once per process and kept until the domain
  // closes, so the worker never reads one being unmapped.
  std::unique_ptr<std::atomic<const PeerLife*>[]> peer_life_;
  std::unordered_map<pid_t, std::unique_ptr<PeerLife>> lives_;  // under av_mu_
  std::vector<std::unique_ptr<PeerLife>> retired_lives_;        // under av_mu_

  // Posting thread only (see nic/domain.h).
  std::vector<std::unique_ptr<OpCtx>> ctx_storage_;
  std::vector<OpCtx*> free_ctx_;
  std::vector<int> free_send_;

  BufferSlab recv_slab_, send_slab_, notify_slab_;
  std::vector<RecvCtx> recv_ctx_;
};

}  // namespace

Result<std::unique_ptr<Domain>> OpenFabricDomain(const FabricOptions& options) {
  // CQ sized for a full send queue plus a burst of remote notifications.
  TE_ASSIGN_OR_RETURN(auto res, OpenFabric(options, /*thread_safe=*/true, 16384));
  auto domain = std::make_unique<FabricDomain>(std::move(res), options);
  TE_RETURN_IF_ERROR(domain->Init());
  return std::unique_ptr<Domain>(std::move(domain));
}

}  // namespace te::nic
