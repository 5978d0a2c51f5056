#include "nic/local/local_domain.h"

#include "nic/local/cuda_ipc.h"
#include "nic/local/shared_memory.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <glog/logging.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace te::nic {
namespace {

// ---- The mailbox: a memfd shared with same-host peers ----

constexpr uint64_t kMagic = 0x3358424C41434F4Cull;  // "LOCALBX3"
constexpr uint32_t kSlots = 64;                     // initiators at once
constexpr uint32_t kRegions = 1u << 16;             // registrations at once
constexpr uint32_t kImmCapacity = 8192;             // immediates per slot (power of two)
constexpr uint64_t kMessageRing = 1u << 20;         // bytes of control messages per slot (power of two)
constexpr uint32_t kPadRecord = 0xffffffffu;        // a record that skips to the ring's end

// Slot states: free -> (claimer) initializing -> claimed -> (initiator
// leaving) released -> (target, once drained) free.
enum SlotState : uint32_t { kFree = 0, kInitializing = 1, kClaimed = 2, kReleased = 3 };

struct alignas(64) RegionEntry {
  // salt << 1 | live, the salt random per registration: a key names
  // (index, salt), so a guessed or stale key fails the check. A write
  // checks it before and after announcing itself in `writers`.
  std::atomic<uint64_t> state;
  uint64_t base;
  uint64_t length;
  std::atomic<uint32_t> writers;
  // Where the region lives when it is SharedMemory (shared_memory.h): the
  // target's memfd and the offset of `base` in it; fd -1 otherwise. Peers
  // map it and write with memcpy.
  int32_t fd;
  uint64_t fd_offset;
  // GPU memory (kind kCudaRegion): the CUDA IPC handle of the allocation
  // holding the region, and the offset of `base` in it. Peers open it and
  // copy on a stream (cuda_ipc.h).
  uint32_t kind;
  uint64_t ipc_offset;
  CudaIpcHandle ipc;
};
constexpr uint32_t kHostRegion = 0, kCudaRegion = 1;

// The local descriptor of a GPU registration (LocalRegistration::desc),
// which every write from it carries: its bytes are copied by the GPU (cuda_ipc.h).
int gpu_source_marker;
void* const kGpuSource = &gpu_source_marker;
bool FromGpu(const WriteOp& op) { return op.local_desc == kGpuSource; }

struct alignas(64) Slot {
  std::atomic<uint32_t> state;
  int32_t owner_pid;
  uint64_t owner_token;
  alignas(64) std::atomic<uint64_t> imm_tail;  // written by the initiator
  alignas(64) std::atomic<uint64_t> imm_head;  // written by the target
  alignas(64) std::atomic<uint64_t> msg_tail;  // bytes, by the initiator
  alignas(64) std::atomic<uint64_t> msg_head;  // bytes, by the target
  alignas(64) uint32_t imms[kImmCapacity];
  alignas(64) uint8_t messages[kMessageRing];
};

struct Mailbox {
  uint64_t magic;
  uint64_t token;  // from the address: a reused pid or fd is not mistaken for us
  int32_t pid;
  uint32_t slots, regions, imm_capacity;
  uint64_t message_ring;
  alignas(64) std::atomic<uint64_t> claimed_mask;  // slots the target must poll
  alignas(64) RegionEntry region[kRegions];
  Slot slot[kSlots];
};

// The address: what AddPeer gets from a peer (hostile bytes).
struct AddressBytes {
  uint64_t magic;
  uint64_t token;
  uint64_t boot;  // hash of this boot's id: same host
  int32_t pid;
  int32_t fd;
};
constexpr uint64_t kAddressMagic = 0x314C434F4C4554ull;  // "TELOCL1"

uint64_t BootHash() {
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::string id;
  std::getline(in, id);
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (char c : id) h = (h ^ uint8_t(c)) * 1099511628211ull;
  return h;
}

std::string Errno(const char* what) { return std::string(what) + ": " + strerror(errno); }

bool Alive(int32_t pid) { return pid > 0 && (kill(pid, 0) == 0 || errno == EPERM); }

uint64_t Key(uint32_t index, uint32_t salt) { return (uint64_t(salt) << 32) | index; }

// A target's registered SharedMemory as an initiator mapped it, for the
// registration `state` names; `base` null when it cannot be mapped (not
// shared memory, or refused): writes then take process_vm_writev.
struct Mapping {
  uint64_t state = 0;
  uint8_t* base = nullptr;  // the region's first byte in our mapping
  void* map = nullptr;      // what munmap takes
  size_t map_length = 0;
  uint64_t cuda_base = 0;    // a GPU region: its first byte, opened through CUDA IPC
  uint64_t cuda_opened = 0;  // what cuIpcCloseMemHandle takes
};

// A peer as the initiator holds it: the target's mailbox, mapped, and the
// slot claimed in it; mappings of its shared regions by region index
// (touched only by the thread that posts).
struct Peer {
  int32_t pid = 0;
  Mailbox* box = nullptr;
  Slot* slot = nullptr;
  bool same_process = false;
  std::vector<uint8_t> address;
  std::unordered_map<uint32_t, Mapping> mappings;
  // Writes through a mapping cannot see the target die (process_vm_writev
  // would fail with ESRCH): its liveness is checked at most every
  // kLivenessPeriod instead, by the coarse clock (CoarseNowNs).
  int64_t alive_at_ns = INT64_MIN / 2;
  // The target's imm_head as last read. The line is the target's (it writes
  // it per batch drained): reading it costs a transfer between cores, so it
  // is read again only when this copy shows the ring full. A stale copy
  // only understates the room.
  uint64_t imm_head_seen = 0;
};
constexpr std::chrono::milliseconds kLivenessPeriod{1};

// The monotonic clock at the kernel tick's resolution (1-4 ms): a fifth of
// the cost of steady_clock here, read on every run of writes. A liveness
// check "at most every kLivenessPeriod" then happens every period to a few
// ticks.
int64_t CoarseNowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

void Unmap(Mapping& m) {
  if (m.map) munmap(m.map, m.map_length);
  if (m.cuda_opened) CudaIpc::Get().Close(m.cuda_opened);
  m = Mapping{};
}

class LocalDomain final : public Domain {
 public:
  ~LocalDomain() override {
    if (box_) {
      // Closed: peers check the magic before every operation, and every
      // registration dies (the engine deregistered its regions already).
      box_->magic = 0;
      std::atomic_thread_fence(std::memory_order_seq_cst);
      for (RegionEntry& e : box_->region) e.state.store(0);
    }
    for (Peer& p : peers_) {
      for (auto& [index, m] : p.mappings) Unmap(m);
      if (p.slot) p.slot->state.store(kReleased, std::memory_order_release);
      if (p.box && p.box != box_) munmap(p.box, sizeof(Mailbox));
    }
    if (box_) munmap(box_, sizeof(Mailbox));
    if (fd_ >= 0) close(fd_);
  }

  Status Open(const LocalOptions& options) {
    if (options.max_message_bytes == 0 || options.max_message_bytes > kMessageRing / 4)
      return InvalidArgument("local domain: max_message_bytes " + std::to_string(options.max_message_bytes) +
                             " outside [1, " + std::to_string(kMessageRing / 4) + "]");
    fd_ = memfd_create("te-local-mailbox", MFD_CLOEXEC);
    if (fd_ < 0) return IoError(Errno("local domain: memfd_create"));
    if (ftruncate(fd_, sizeof(Mailbox)) != 0) return IoError(Errno("local domain: sizing the mailbox"));
    void* m = mmap(nullptr, sizeof(Mailbox), PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
    if (m == MAP_FAILED) return IoError(Errno("local domain: mapping the mailbox"));
    box_ = static_cast<Mailbox*>(m);  // zero-filled: every slot free, every region dead
    std::random_device rd;
    token_ = (uint64_t(rd()) << 32) ^ rd() ^ uint64_t(getpid());
    rng_.seed((uint64_t(rd()) << 32) ^ rd());
    box_->token = token_;
    box_->pid = getpid();
    box_->slots = kSlots;
    box_->regions = kRegions;
    box_->imm_capacity = kImmCapacity;
    box_->message_ring = kMessageRing;
    std::atomic_thread_fence(std::memory_order_release);
    box_->magic = kMagic;
    for (uint32_t i = kRegions; i > 0; --i) free_regions_.push_back(i - 1);
    info_.provider = "local";
    info_.domain_name = "host";
    info_.max_write_bytes = size_t(1) << 30;
    info_.max_message_bytes = options.max_message_bytes;
    info_.tx_depth = kImmCapacity;
    info_.virtual_addressing = true;
    info_.provider_keys = true;
    info_.hmem = CudaIpc::Get().Available().ok();
    AddressBytes a{kAddressMagic, token_, BootHash(), getpid(), fd_};
    address_.assign(reinterpret_cast<const uint8_t*>(&a), reinterpret_cast<const uint8_t*>(&a) + sizeof a);
    return Status::Ok();
  }

  const DomainInfo& info() const override { return info_; }
  std::vector<uint8_t> address() const override { return address_; }

  Result<PeerAddr> AddPeer(std::span<const uint8_t> bytes) override {
    std::lock_guard<std::mutex> lock(peers_mu_);
    for (size_t i = 0; i < peers_.size(); ++i)
      if (peers_[i].address.size() == bytes.size() && std::equal(bytes.begin(), bytes.end(), peers_[i].address.begin()))
        return PeerAddr(i);
    AddressBytes a;
    if (bytes.size() != sizeof a) return InvalidArgument("local address of " + std::to_string(bytes.size()) + " bytes");
    std::memcpy(&a, bytes.data(), sizeof a);
    if (a.magic != kAddressMagic || a.pid <= 0 || a.fd < 0) return InvalidArgument("not a local-domain address");
    if (a.boot != BootHash())
      return InvalidArgument(
          "peer is on another host (its boot id differs): the local provider reaches this host "
          "only; use a NIC provider");
    Peer p;
    p.pid = a.pid;
    p.address.assign(bytes.begin(), bytes.end());
    if (a.pid == getpid() && a.token == token_) {
      p.box = box_;
    } else {
      const std::string path = "/proc/" + std::to_string(a.pid) + "/fd/" + std::to_string(a.fd);
      const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
      if (fd < 0)
        return IoError(Errno(("local domain: opening peer " + std::to_string(a.pid) +
                              "'s mailbox (dead, another user, or a ptrace policy that forbids it)")
                                 .c_str()));
      struct stat st;
      const bool sized = fstat(fd, &st) == 0 && uint64_t(st.st_size) == sizeof(Mailbox);
      void* m = sized ? mmap(nullptr, sizeof(Mailbox), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : MAP_FAILED;
      close(fd);
      if (m == MAP_FAILED) return InvalidArgument("peer " + std::to_string(a.pid) + "'s fd is not a local mailbox");
      p.box = static_cast<Mailbox*>(m);
      if (p.box->magic != kMagic || p.box->token != a.token || p.box->slots != kSlots || p.box->regions != kRegions ||
          p.box->imm_capacity != kImmCapacity || p.box->message_ring != kMessageRing) {
        munmap(m, sizeof(Mailbox));
        return InvalidArgument("peer " + std::to_string(a.pid) + "'s mailbox does not match its address");
      }
    }
    p.same_process = a.pid == getpid();
    p.slot = Claim(p.box);
    if (!p.slot) {
      if (p.box != box_) munmap(p.box, sizeof(Mailbox));
      return Unavailable("peer " + std::to_string(a.pid) + " has all " + std::to_string(kSlots) +
                         " initiator slots taken by live processes");
    }
    peers_.push_back(std::move(p));
    return PeerAddr(peers_.size() - 1);
  }

  Result<LocalRegistration> Register(void* ptr, size_t length, MemoryKind kind) override {
    if (!ptr || length == 0) return InvalidArgument("local domain: registering empty memory");
    CudaIpc::Export cuda{};
    if (kind.type == MemoryKind::Type::kCuda) {
      auto e = CudaIpc::Get().ExportRange(ptr, length, kind.device);
      if (!e.ok()) return e.status().WithContext("local domain: registering GPU memory");
      cuda = e.value();
      cuda_device_.store(kind.device, std::memory_order_relaxed);
    }
    std::lock_guard<std::mutex> lock(regions_mu_);
    if (free_regions_.empty())
      return Unavailable("local domain: all " + std::to_string(kRegions) + " registrations are in use");
    const uint32_t i = free_regions_.back();
    free_regions_.pop_back();
    RegionEntry& e = box_->region[i];
    uint32_t salt = 0;
    while (salt == 0) salt = uint32_t(rng_());
    e.base = reinterpret_cast<uint64_t>(ptr);
    e.length = length;
    e.writers.store(0);
    const auto shared = kind.type == MemoryKind::Type::kHost ? SharedMemory::Find(ptr, length) : std::nullopt;
    e.fd = shared ? shared->fd : -1;
    e.fd_offset = shared ? shared->offset : 0;
    e.kind = kind.type == MemoryKind::Type::kCuda ? kCudaRegion : kHostRegion;
    e.ipc_offset = cuda.offset;
    e.ipc = cuda.handle;
    e.state.store(uint64_t(salt) << 1 | 1, std::memory_order_release);
    LocalRegistration r;
    r.rkey = Key(i, salt);
    r.remote_base = e.base;
    if (kind.type == MemoryKind::Type::kCuda) r.desc = kGpuSource;
    r.mr = reinterpret_cast<void*>(uintptr_t(i) + 1);
    return r;
  }

  Status Deregister(const LocalRegistration& reg) override {
    const uint32_t i = uint32_t(reg.rkey & 0xffffffffu);
    if (i >= kRegions) return InvalidArgument("local domain: not a registration");
    RegionEntry& e = box_->region[i];
    if (e.state.load() != (reg.rkey >> 32 << 1 | 1)) return InvalidArgument("local domain: not a live registration");
    // Dead first, then wait for writes already checked in. A writer killed
    // mid-write never checks out: bounded wait.
    e.state.store(0, std::memory_order_seq_cst);
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(1);
    while (e.writers.load(std::memory_order_seq_cst) != 0 && std::chrono::steady_clock::now() < end)
      std::this_thread::yield();
    std::lock_guard<std::mutex> lock(regions_mu_);
    free_regions_.push_back(i);
    return Status::Ok();
  }

  Status PostWrite(const WriteOp& op) override {
    size_t posted = 0;
    return PostWrites(std::span<const WriteOp>(&op, 1), &posted);
  }

  // A run of writes to one peer: every write checked against the target's
  // table, all copied in one system call, then their immediates pushed.
  Status PostWrites(std::span<const WriteOp> ops, size_t* posted) override {
    *posted = 0;
    if (ops.empty()) return Status::Ok();
    Peer* p = PeerAt(ops[0].peer);
    if (!p) return InvalidArgument("local domain: unknown peer " + std::to_string(ops[0].peer));
    if (p->box->magic != kMagic) return NotPosted("local peer " + std::to_string(p->pid) + " closed its domain");
    if (!p->same_process && !p->mappings.empty()) {
      const int64_t now = CoarseNowNs();
      if (now - p->alive_at_ns >= std::chrono::nanoseconds(kLivenessPeriod).count()) {
        if (!Alive(p->pid)) return NotPosted("local peer " + std::to_string(p->pid) + " is dead");
        p->alive_at_ns = now;
      }
    }
    Slot& s = *p->slot;
    // Room for the immediates first: back-pressure before any byte moves.
    const uint64_t tail = s.imm_tail.load(std::memory_order_relaxed);
    uint64_t t = tail;  // the tail after the immediates accepted so far
    size_t n = 0;
    Status refused;
    checked_.clear();
    for (; n < ops.size() && n < kMaxRun; ++n) {
      const WriteOp& op = ops[n];
      if (op.peer != ops[0].peer) break;
      if (op.has_imm && t - p->imm_head_seen == kImmCapacity) {
        // Full by this copy of the head: read the target's line once more.
        p->imm_head_seen = s.imm_head.load(std::memory_order_acquire);
        if (t - p->imm_head_seen == kImmCapacity) break;
      }
      if (op.length > 0) {
        RegionEntry* e = CheckIn(*p, op, &refused);
        if (!e) break;
        checked_.push_back(e);
      }
      t += op.has_imm;
    }
    Status copied = n > 0 ? Copy(*p, ops.first(n), checked_) : Status::Ok();
    for (RegionEntry* e : checked_) CheckOut(e);
    if (!copied.ok()) return copied;  // the first write of the run fails; the rest are posted again
    uint64_t at = tail;
    for (size_t k = 0; k < n; ++k)
      if (ops[k].has_imm) s.imms[at++ % kImmCapacity] = ops[k].imm;
    s.imm_tail.store(at, std::memory_order_release);  // after the data
    {
      std::lock_guard<std::mutex> lock(done_mu_);
      for (size_t k = 0; k < n; ++k) done_.push_back(ops[k].context);
    }
    *posted = n;
    if (!refused.ok()) return refused;
    if (n < ops.size() && ops[n].peer == ops[0].peer && n < kMaxRun)
      return Unavailable("local domain: the peer's immediate ring is full");
    return Status::Ok();
  }

  Status PostSend(PeerAddr peer, std::span<const uint8_t> data, void* context) override {
    Peer* p = PeerAt(peer);
    if (!p) return InvalidArgument("local domain: unknown peer " + std::to_string(peer));
    if (data.size() > info_.max_message_bytes)
      return InvalidArgument("control message of " + std::to_string(data.size()) + " bytes; the limit is " +
                             std::to_string(info_.max_message_bytes));
    if (p->box->magic != kMagic) return NotPosted("local peer " + std::to_string(p->pid) + " closed its domain");
    if (!p->same_process && !Alive(p->pid)) return NotPosted("local peer " + std::to_string(p->pid) + " is dead");
    Slot& s = *p->slot;
    const uint64_t tail = s.msg_tail.load(std::memory_order_relaxed);
    const uint64_t head = s.msg_head.load(std::memory_order_acquire);
    const uint64_t record = (4 + data.size() + 7) & ~uint64_t(7);
    const uint64_t at = tail % kMessageRing;
    const uint64_t pad = at + record > kMessageRing ? kMessageRing - at : 0;  // records never wrap
    if (tail + pad + record - head > kMessageRing) return Unavailable("local domain: the peer's message ring is full");
    uint64_t t = tail;
    if (pad) {
      std::memcpy(s.messages + at, &kPadRecord, 4);
      t += pad;
    }
    const uint32_t len = uint32_t(data.size());
    std::memcpy(s.messages + t % kMessageRing, &len, 4);
    if (!data.empty()) std::memcpy(s.messages + t % kMessageRing + 4, data.data(), data.size());
    s.msg_tail.store(t + record, std::memory_order_release);
    std::lock_guard<std::mutex> lock(done_mu_);
    done_.push_back(context);
    return Status::Ok();
  }

  int Poll(CompletionHandler& handler, int max) override {
    int n = 0;
    {
      std::unique_lock<std::mutex> lock(done_mu_);
      while (!done_.empty() && n < max) {
        void* c = done_.front();
        done_.pop_front();
        lock.unlock();
        handler.OnSendDone(c);
        ++n;
        lock.lock();
      }
    }
    uint64_t mask = box_->claimed_mask.load(std::memory_order_acquire);
    while (mask && n < max) {
      const int i = __builtin_ctzll(mask);
      mask &= mask - 1;
      n += Drain(box_->slot[i], uint32_t(i), handler, max - n);
    }
    return n;
  }

 private:
  Peer* PeerAt(PeerAddr a) {
    std::lock_guard<std::mutex> lock(peers_mu_);
    return a < peers_.size() ? &peers_[a] : nullptr;
  }

  // A free slot of `box`, or one whose owner died; claimed for this process.
  Slot* Claim(Mailbox* box) {
    for (int pass = 0; pass < 2; ++pass)
      for (uint32_t i = 0; i < kSlots; ++i) {
        Slot& s = box->slot[i];
        uint32_t st = s.state.load(std::memory_order_acquire);
        const bool take = st == kFree || (pass == 1 && (st == kClaimed || st == kReleased) && !Alive(s.owner_pid));
        if (!take || !s.state.compare_exchange_strong(st, kInitializing)) continue;
        s.owner_pid = getpid();
        s.owner_token = token_;
        s.imm_head.store(0);
        s.imm_tail.store(0);
        s.msg_head.store(0);
        s.msg_tail.store(0);
        s.state.store(kClaimed, std::memory_order_release);
        box->claimed_mask.fetch_or(uint64_t(1) << i, std::memory_order_release);
        return &s;
      }
    return nullptr;
  }

  // Checks a write against the target's registration table and announces
  // it in the entry's writer count; the caller checks out (CheckOut) after
  // copying. Null with *error set when refused.
  RegionEntry* CheckIn(Peer& p, const WriteOp& op, Status* error) {
    const uint32_t i = uint32_t(op.rkey & 0xffffffffu);
    const uint64_t want = (op.rkey >> 32) << 1 | 1;
    if (i >= kRegions) {
      *error = InvalidArgument("local write: key names region " + std::to_string(i));
      return nullptr;
    }
    RegionEntry& e = p.box->region[i];
    auto live = [&] { return e.state.load(std::memory_order_seq_cst) == want; };
    if (!live()) {
      // A mapping of an earlier registration there keeps its pages alive:
      // drop it.
      if (auto it = p.mappings.find(i); it != p.mappings.end()) {
        Unmap(it->second);
        p.mappings.erase(it);
      }
      *error = InvalidArgument("local write: the key is not a live registration of the peer");
      return nullptr;
    }
    e.writers.fetch_add(1, std::memory_order_seq_cst);
    const uint64_t base = e.base, length = e.length;
    if (!live()) {
      *error = InvalidArgument("local write: the peer deregistered the region");
    } else if (op.remote_addr < base || op.length > length || op.remote_addr - base > length - op.length) {
      *error = InvalidArgument("local write of " + std::to_string(op.length) + " bytes at " +
                               std::to_string(op.remote_addr) + " outside the peer's region [" + std::to_string(base) +
                               ", +" + std::to_string(length) + ")");
    } else {
      return &e;
    }
    e.writers.fetch_sub(1, std::memory_order_release);
    return nullptr;
  }
  static void CheckOut(RegionEntry* e) { e->writers.fetch_sub(1, std::memory_order_release); }

  // Copies checked writes into the peer: a memcpy in this process, else one
  // process_vm_writev for the whole run (resumed after a partial copy); GPU
  // copies are queued on this thread's stream and waited for once, at the
  // end of the run (a run of pages costs one wait, not one per page).
  // `entries` are the checked-in entries of the writes with data, in order.
  // Returns once every byte of the run has landed, or failed.
  Status Copy(Peer& p, std::span<const WriteOp> ops, std::span<RegionEntry* const> entries) {
    bool gpu_queued = false;
    Status s = CopyRun(p, ops, entries, &gpu_queued);
    // Also after a failure: the caller may free a source the GPU still reads.
    if (gpu_queued) {
      Status landed = CudaIpc::Get().Wait(cuda_device_.load(std::memory_order_relaxed));
      if (s.ok()) s = landed;
    }
    return s;
  }
  Status QueueGpuCopy(uint64_t dst, const void* src, size_t length, bool* queued) {
    *queued = true;
    return CudaIpc::Get().CopyAsync(dst, src, length, cuda_device_.load(std::memory_order_relaxed));
  }
  Status CopyRun(Peer& p, std::span<const WriteOp> ops, std::span<RegionEntry* const> entries, bool* gpu_queued) {
    if (p.same_process) {
      size_t k = 0;
      for (const WriteOp& op : ops) {
        if (op.length == 0) continue;
        if (entries[k++]->kind == kCudaRegion || FromGpu(op)) {
          TE_RETURN_IF_ERROR(QueueGpuCopy(op.remote_addr, op.local, op.length, gpu_queued));
        } else {
          std::memcpy(reinterpret_cast<void*>(op.remote_addr), op.local, op.length);
        }
      }
      return Status::Ok();
    }
    iovs_l_.clear();
    iovs_r_.clear();
    size_t k = 0;
    for (const WriteOp& op : ops) {
      if (op.length == 0) continue;
      RegionEntry* e = entries[k++];
      // Checked in: the entry is live under this key, its fields stable.
      if (e->kind == kCudaRegion) {
        TE_RETURN_IF_ERROR(CopyToGpu(p, *e, (op.rkey >> 32) << 1 | 1, op, gpu_queued));
        continue;
      }
      if (const Mapping& m = MappingFor(p, *e, (op.rkey >> 32) << 1 | 1); m.base) {
        uint8_t* dst = m.base + (op.remote_addr - e->base);
        if (FromGpu(op))
          TE_RETURN_IF_ERROR(QueueGpuCopy(reinterpret_cast<uintptr_t>(dst), op.local, op.length, gpu_queued));
        else
          std::memcpy(dst, op.local, op.length);
        continue;
      }
      if (FromGpu(op))
        return Unimplemented(
            "local write from GPU memory into peer " + std::to_string(p.pid) +
            "'s heap memory: cross-memory attach cannot read GPU memory; the peer registers GPU memory or "
            "SharedHostMemory");
      iovs_l_.push_back({const_cast<void*>(op.local), op.length});
      iovs_r_.push_back({reinterpret_cast<void*>(op.remote_addr), op.length});
    }
    size_t first = 0;
    while (first < iovs_l_.size()) {
      const size_t n = std::min<size_t>(iovs_l_.size() - first, 1024);  // IOV_MAX
      const ssize_t w = process_vm_writev(p.pid, &iovs_l_[first], n, &iovs_r_[first], n, 0);
      if (w < 0) {
        if (errno == EINTR) continue;
        if (errno == ESRCH) return IoError("local write: peer " + std::to_string(p.pid) + " is dead");
        if (errno == EPERM)
          return IoError("local write: process_vm_writev into peer " + std::to_string(p.pid) +
                         " not permitted (another user, or kernel.yama.ptrace_scope > 0: use a NIC provider, or "
                         "allow ptrace between the processes)");
        return IoError(Errno("local write: process_vm_writev"));
      }
      if (w == 0) return IoError("local write: process_vm_writev copied nothing");
      // Skip what was copied; a partially copied piece continues where it stopped.
      size_t left = size_t(w);
      while (left > 0 && first < iovs_l_.size()) {
        const size_t k = std::min(left, iovs_l_[first].iov_len);
        iovs_l_[first].iov_base = static_cast<uint8_t*>(iovs_l_[first].iov_base) + k;
        iovs_l_[first].iov_len -= k;
        iovs_r_[first].iov_base = static_cast<uint8_t*>(iovs_r_[first].iov_base) + k;
        iovs_r_[first].iov_len -= k;
        left -= k;
        if (iovs_l_[first].iov_len == 0) ++first;
      }
    }
    return Status::Ok();
  }

  // The mapping of `e` (a checked-in entry of p's table, live as `state`),
  // made on first use and remade when the registration changed. A region
  // that is not SharedMemory, or whose memfd is not what the entry claims
  // (the entry is the peer's: hostile), gets an empty mapping.
  const Mapping& MappingFor(Peer& p, const RegionEntry& e, uint64_t state) {
    const uint32_t index = uint32_t(&e - p.box->region);
    Mapping& m = p.mappings[index];
    if (m.state == state) return m;
    Unmap(m);
    m.state = state;
    const int32_t fd = e.fd;
    const uint64_t offset = e.fd_offset, length = e.length;
    if (fd < 0 || length == 0) return m;
    const std::string path = "/proc/" + std::to_string(p.pid) + "/fd/" + std::to_string(fd);
    const int mine = open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (mine < 0) return m;
    struct stat st;
    const uint64_t page = uint64_t(sysconf(_SC_PAGESIZE));
    const uint64_t start = offset / page * page;
    uint64_t end = 0;
    // Sealed against shrinking: the owner cannot make our mapping fault.
    const int seals = fcntl(mine, F_GET_SEALS);
    const bool ok = fstat(mine, &st) == 0 && S_ISREG(st.st_mode) && seals >= 0 && (seals & F_SEAL_SHRINK) &&
                    !__builtin_add_overflow(offset, length, &end) && end <= uint64_t(st.st_size);
    if (ok) {
      void* map = mmap(nullptr, end - start, PROT_READ | PROT_WRITE, MAP_SHARED, mine, off_t(start));
      if (map != MAP_FAILED) {
        m.map = map;
        m.map_length = end - start;
        m.base = static_cast<uint8_t*>(map) + (offset - start);
      }
    }
    close(mine);
    return m;
  }

  // A write into a peer's GPU region: its allocation opened through CUDA
  // IPC once per registration, the range checked against the allocation's
  // size (the handle and offset are the peer's: hostile), then the copy is
  // queued.
  Status CopyToGpu(Peer& p, const RegionEntry& e, uint64_t state, const WriteOp& op, bool* queued) {
    const uint32_t index = uint32_t(&e - p.box->region);
    Mapping& m = p.mappings[index];
    const int device = cuda_device_.load(std::memory_order_relaxed);
    if (m.state != state || !m.cuda_opened) {
      Unmap(m);
      m.state = state;
      auto opened = CudaIpc::Get().Open(e.ipc, device);
      if (!opened.ok()) return opened.status().WithContext("local write into peer " + std::to_string(p.pid) + "'s GPU");
      uint64_t end = 0;
      if (__builtin_add_overflow(e.ipc_offset, e.length, &end) || end > opened->size) {
        CudaIpc::Get().Close(opened->base);
        return InvalidArgument("local write: peer " + std::to_string(p.pid) + "'s GPU region of " +
                               std::to_string(e.length) + " bytes at " + std::to_string(e.ipc_offset) +
                               " lies outside its allocation of " + std::to_string(opened->size));
      }
      m.cuda_opened = opened->base;
      m.cuda_base = opened->base + e.ipc_offset;
    }
    return QueueGpuCopy(m.cuda_base + (op.remote_addr - e.base), op.local, op.length, queued);
  }

  // Immediates and messages of one initiator's slot; a released slot is
  // freed once empty.
  int Drain(Slot& s, uint32_t index, CompletionHandler& handler, int max) {
    const uint32_t st = s.state.load(std::memory_order_acquire);
    if (st != kClaimed && st != kReleased) return 0;
    int n = 0;
    uint64_t head = s.imm_head.load(std::memory_order_relaxed);
    const uint64_t tail = s.imm_tail.load(std::memory_order_acquire);
    if (tail - head > kImmCapacity) return Abandon(s, index, "its immediate ring indices are corrupt");
    // The head is published once per batch: the initiator reads it only
    // when its copy shows no room (Peer::imm_head_seen).
    const uint64_t first = head;
    while (head != tail && n < max) {
      handler.OnImm(s.imms[head++ % kImmCapacity]);
      ++n;
    }
    if (head != first) s.imm_head.store(head, std::memory_order_release);
    uint64_t mhead = s.msg_head.load(std::memory_order_relaxed);
    const uint64_t mtail = s.msg_tail.load(std::memory_order_acquire);
    if (mtail - mhead > kMessageRing) return Abandon(s, index, "its message ring indices are corrupt");
    while (mhead != mtail && n < max) {
      const uint64_t at = mhead % kMessageRing;
      uint32_t len = 0;
      if (at + 4 > kMessageRing) return Abandon(s, index, "a message record straddles the ring's end");
      std::memcpy(&len, s.messages + at, 4);
      if (len == kPadRecord) {
        mhead += kMessageRing - at;
      } else {
        const uint64_t record = (4 + uint64_t(len) + 7) & ~uint64_t(7);
        if (len > info_.max_message_bytes || at + record > kMessageRing || mtail - mhead < record)
          return Abandon(s, index, "a message record of " + std::to_string(len) + " bytes is malformed");
        rx_.assign(s.messages + at + 4, s.messages + at + 4 + len);
        mhead += record;
        s.msg_head.store(mhead, std::memory_order_release);
        handler.OnRecv(rx_);
        ++n;
        continue;
      }
      s.msg_head.store(mhead, std::memory_order_release);
    }
    if (st == kReleased && head == s.imm_tail.load(std::memory_order_acquire) &&
        mhead == s.msg_tail.load(std::memory_order_acquire)) {
      uint32_t expected = kReleased;
      if (s.state.compare_exchange_strong(expected, kFree))
        box_->claimed_mask.fetch_and(~(uint64_t(1) << index), std::memory_order_release);
    }
    return n;
  }

  // A slot whose contents cannot be trusted: ignored from now on (the
  // initiator's writes then time out at its engine).
  int Abandon(Slot& s, uint32_t index, const std::string& why) {
    box_->claimed_mask.fetch_and(~(uint64_t(1) << index), std::memory_order_release);
    s.state.store(kFree, std::memory_order_release);
    LOG_EVERY_N(WARNING, 100) << "local domain: dropped initiator slot " << index << " of process " << s.owner_pid
                              << ": " << why;
    return 0;
  }

  int fd_ = -1;
  Mailbox* box_ = nullptr;
  uint64_t token_ = 0;
  DomainInfo info_;
  std::vector<uint8_t> address_;
  std::mutex regions_mu_;
  std::vector<uint32_t> free_regions_;
  std::mt19937_64 rng_;  // registration salts
  std::mutex peers_mu_;
  std::deque<Peer> peers_;  // stable addresses: PeerAt's pointers outlive the lock
  std::mutex done_mu_;
  std::deque<void*> done_;  // completed operations' contexts, reported by Poll
  std::vector<uint8_t> rx_;
  // PostWrites' scratch (posting is serialized by the engine's progress role).
  static constexpr size_t kMaxRun = 1024;
  std::vector<RegionEntry*> checked_;
  std::vector<iovec> iovs_l_, iovs_r_;
  // The device whose context opens peers' GPU regions: that of the last
  // GPU memory registered here, else 0.
  std::atomic<int> cuda_device_{0};
};

}  // namespace

Result<std::unique_ptr<Domain>> OpenLocalDomain(const LocalOptions& options) {
  auto d = std::make_unique<LocalDomain>();
  TE_RETURN_IF_ERROR(d->Open(options));
  return std::unique_ptr<Domain>(std::move(d));
}

}  // namespace te::nic
