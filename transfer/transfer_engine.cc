#include "transfer/transfer_engine.h"

#include <glog/logging.h>

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>
#include <unordered_map>

#include "base/aligned_buffer.h"
#include "base/checked_math.h"
#include "base/crc32c.h"
#include "nic/fabric/fabric_domain.h"
#include "nic/local/local_domain.h"
#include "nic/topology/topology.h"
#include "nic/verbs/verbs_domain.h"
#include "transfer/domain_group.h"
#include "transfer/request_plan.h"

namespace te {

// ---- MemoryRegion ----

MemoryRegion::MemoryRegion(void* data, size_t length, Memory memory, std::vector<std::shared_ptr<nic::Domain>> domains,
                           std::vector<nic::LocalRegistration> registrations, std::shared_ptr<void> storage)
    : data_(data),
      length_(length),
      memory_(memory),
      domains_(std::move(domains)),
      regs_(std::move(registrations)),
      storage_(std::move(storage)) {}

MemoryRegion::~MemoryRegion() {
  for (size_t i = 0; i < regs_.size(); ++i) {
    if (!Registered(regs_[i])) continue;
    Status st = domains_[i]->Deregister(regs_[i]);
    if (!st.ok()) LOG(WARNING) << "deregistering a region: " << st.ToString();
  }
}

// ---- Peer ----

Peer::Peer(EngineAddress address, std::vector<nic::PeerAddr> via_domain, const void* resolver,
           std::optional<uint32_t> same_host_lane)
    : address_(std::move(address)),
      via_domain_(std::move(via_domain)),
      resolver_(resolver),
      same_host_lane_(same_host_lane) {
  // FNV-1a, not a CRC: the serialized address ends with its own CRC, and a
  // CRC over data followed by its CRC is the same constant for every peer.
  uint64_t h = 0xcbf29ce484222325ull;
  for (uint8_t b : address_.Serialize()) h = (h ^ b) * 0x100000001b3ull;
  id_ = h;
}

// ---- Peer cache ----

struct TransferEngine::PeerCache {
  std::mutex mu;
  std::unordered_map<std::string, PeerRef> peers;  // by serialized address
};

// ---- TransferEngine ----

namespace {

// Whether Create opens a same-host domain beside the NIC domains.
bool WantsSameHostDomain(const EngineOptions& o) {
  if (o.backend == nic::Backend::kLocal) return false;  // every domain is one already
  switch (o.same_host) {
    case SameHost::kDirect:
      return true;
    case SameHost::kNic:
      return false;
    case SameHost::kAuto:
      return o.backend == nic::Backend::kVerbs || o.fabric.provider == "efa";
  }
  return false;
}

constexpr const char* kLocalProvider = "local";

}  // namespace

Result<EngineOptions> TransferEngine::ResolveOptions(const EngineOptions& requested) {
  EngineOptions o = requested;
  if (!o.gpu) return o;
  TE_ASSIGN_OR_RETURN(nic::Topology topo, nic::DiscoverTopology(o.sysfs_root));
  const nic::GpuPlacement* p = topo.PlacementFor(*o.gpu);
  if (p == nullptr)
    return NotFound("gpu " + std::to_string(*o.gpu) + " not found: sysfs root " + o.sysfs_root + " lists " +
                    std::to_string(topo.gpus.size()) + " GPUs");
  if (o.domain_names.empty()) {
    if (p->nics.empty())
      return NotFound("gpu " + std::to_string(*o.gpu) +
                      " has no RDMA NIC near it; "
                      "name the domains explicitly (domain_names)");
    for (const auto& n : p->nics) o.domain_names.push_back(nic::FabricDomainName(o.fabric.provider, n));
    o.domains = int(o.domain_names.size());
  }
  if (!o.worker_cpu && !p->cpus.empty()) o.worker_cpu = p->cpus.front();
  return o;
}

Result<std::unique_ptr<TransferEngine>> TransferEngine::Create(const EngineOptions& requested) {
  TE_ASSIGN_OR_RETURN(EngineOptions options, ResolveOptions(requested));
  if (options.domains < 1 || options.domains > 64)
    return InvalidArgument("domains = " + std::to_string(options.domains) + "; valid range is 1..64");
  if (!options.domain_names.empty() && int(options.domain_names.size()) != options.domains)
    return InvalidArgument("domain_names lists " + std::to_string(options.domain_names.size()) + " names for " +
                           std::to_string(options.domains) + " domains");

  if (options.backend == nic::Backend::kLibfabric &&
      nic::ParseProviderName(options.fabric.provider).backend != nic::Backend::kLibfabric)
    return InvalidArgument("fabric.provider '" + options.fabric.provider +
                           "' is not a libfabric provider but a backend of its own: call SetProvider(\"" +
                           options.fabric.provider + "\") (or set EngineOptions::backend)");
  std::vector<std::shared_ptr<nic::Domain>> domains;
  for (int i = 0; i < options.domains; ++i) {
    nic::FabricOptions f = options.fabric;
    if (!options.domain_names.empty()) f.domain = options.domain_names[i];
    Result<std::unique_ptr<nic::Domain>> d = Unavailable("");
    if (options.backend == nic::Backend::kVerbs) {
      nic::VerbsOptions v = options.verbs;
      if (!f.domain.empty()) v.device = f.domain;
      v.max_message_bytes = f.max_message_bytes;
      d = nic::OpenVerbsDomain(v);
    } else if (options.backend == nic::Backend::kLocal) {
      d = nic::OpenLocalDomain({f.max_message_bytes});
    } else {
      d = nic::OpenFabricDomain(f);
    }
    if (!d.ok()) return d.status().WithContext("opening domain " + std::to_string(i));
    domains.push_back(std::move(d).value());
  }
  if (WantsSameHostDomain(options)) {
    auto local = nic::OpenLocalDomain({options.fabric.max_message_bytes});
    if (local.ok()) {
      domains.push_back(std::move(local).value());
    } else if (options.same_host == SameHost::kDirect) {
      return local.status().WithContext("opening the same-host domain (same_host = kDirect)");
    } else {
      LOG(WARNING) << "no same-host domain, peers on this host go through the NICs: " << local.status().ToString();
    }
  }
  return CreateOverDomains(options, std::move(domains));
}

Result<std::unique_ptr<TransferEngine>> TransferEngine::CreateOverDomains(
    const EngineOptions& given, std::vector<std::shared_ptr<nic::Domain>> domains) {
  EngineOptions options = given;
  if (domains.empty() || domains.size() > 64)
    return InvalidArgument(std::to_string(domains.size()) + " domains; valid range is 1..64");
  if (options.request_timeout.count() <= 0) return InvalidArgument("request_timeout must be positive");
  if (options.max_queued_operations == 0) return InvalidArgument("max_queued_operations must be at least 1");
  EngineAddress address;
  for (size_t i = 0; i < domains.size(); ++i) {
    if (!domains[i]) return InvalidArgument("domain " + std::to_string(i) + " is null");
    const auto& info = domains[i]->info();
    if (i == 0) address.provider = info.provider;
    // NIC domains of one provider, then at most one same-host domain.
    const bool same_host =
        i > 0 && i + 1 == domains.size() && info.provider == kLocalProvider && address.provider != kLocalProvider;
    if (same_host) {
      address.same_host_domains = 1;
    } else if (info.provider != address.provider) {
      return InvalidArgument("domain " + std::to_string(i) + " opened provider " + info.provider +
                             " but domain 0 opened " + address.provider +
                             " (only the last domain may differ, as the same-host domain \"local\")");
    }
    address.domains.push_back(domains[i]->address());
  }
  TE_RETURN_IF_ERROR(address.Validate());
  options.domains = int(address.nic_domains());
  auto group = std::make_unique<DomainGroup>(options, std::move(domains));
  group->set_local_address(address.Serialize());
  auto engine = std::unique_ptr<TransferEngine>(new TransferEngine(options, std::move(group), std::move(address)));
  engine->group_->Start();
  return engine;
}

TransferEngine::TransferEngine(const EngineOptions& options, std::unique_ptr<DomainGroup> group, EngineAddress address)
    : options_(options),
      group_(std::move(group)),
      address_(std::move(address)),
      peer_cache_(std::make_unique<PeerCache>()) {}

TransferEngine::~TransferEngine() = default;

size_t TransferEngine::domain_count() const { return group_->domains().size(); }

bool TransferEngine::has_same_host_domain() const { return address_.same_host_domains > 0; }

namespace {

// What every backend relies on, checked before any of them sees the range.
// Providers that register lazily (tcp, shm) accept any pointer and would
// fault on the first write from it, so host memory must also be mapped at
// both ends (mincore fails with ENOMEM on an unmapped page; two calls, not
// one per page, so a large region costs nothing more).
Status CheckRegistrable(const void* data, size_t length, const Memory& memory) {
  const uintptr_t start = reinterpret_cast<uintptr_t>(data);
  if (data == nullptr || length == 0 || length > kMaxRegionBytes || start > UINTPTR_MAX - length)
    return InvalidArgument("cannot register " + std::to_string(length) + " bytes at address " + std::to_string(start) +
                           ": need a non-null address, 1.." + std::to_string(kMaxRegionBytes) +
                           " bytes, and a range that does not wrap");
  if (memory.kind.type != nic::MemoryKind::Type::kHost) return Status::Ok();
  static const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  for (uintptr_t at : {start, start + length - 1}) {
    unsigned char resident;
    if (mincore(reinterpret_cast<void*>(at & ~(page - 1)), 1, &resident) != 0 && errno == ENOMEM)
      return InvalidArgument("cannot register " + std::to_string(length) + " bytes at address " +
                             std::to_string(start) + ": address " + std::to_string(at) +
                             " is not mapped in this process");
  }
  return Status::Ok();
}

}  // namespace

Result<LocalMr> TransferEngine::RegisterMemory(void* data, size_t length, Memory memory) {
  return Register(data, length, memory, nullptr);
}

Result<LocalMr> TransferEngine::Register(void* data, size_t length, Memory memory, std::shared_ptr<void> storage) {
  TE_RETURN_IF_ERROR(CheckRegistrable(data, length, memory));
  std::vector<nic::LocalRegistration> regs;
  const auto& domains = group_->domains();
  for (size_t i = 0; i < domains.size(); ++i) {
    auto reg = domains[i]->Register(data, length, memory.kind);
    if (!reg.ok() && i >= address_.nic_domains() && memory.kind.type != nic::MemoryKind::Type::kHost) {
      // GPU memory the same-host domain cannot share (no CUDA driver, or
      // memory CUDA IPC cannot export): peers on this host reach it over
      // the NICs (its descriptor key stays 0).
      VLOG(1) << "GPU region not on the same-host domain: " << reg.status().ToString();
      regs.emplace_back();
      continue;
    }
    if (!reg.ok()) {
      for (size_t j = 0; j < regs.size(); ++j)
        if (MemoryRegion::Registered(regs[j])) (void)domains[j]->Deregister(regs[j]);
      return reg.status().WithContext("registering " + std::to_string(length) + " bytes on domain " +
                                      std::to_string(i));
    }
    regs.push_back(reg.value());
  }
  return LocalMr(std::make_shared<MemoryRegion>(data, length, memory, domains, std::move(regs), std::move(storage)));
}

Result<LocalMr> TransferEngine::AllocateMemory(size_t length) {
  if (length == 0 || length > kMaxRegionBytes)
    return InvalidArgument("AllocateMemory of " + std::to_string(length) + " bytes; valid range is 1.." +
                           std::to_string(kMaxRegionBytes));
  TE_ASSIGN_OR_RETURN(AlignedBuffer buffer, AlignedBuffer::Allocate(length));
  auto storage = std::make_shared<AlignedBuffer>(std::move(buffer));
  void* data = storage->data();
  return Register(data, length, Memory::Host(), std::move(storage));
}

MrDescriptor TransferEngine::Describe(const MemoryRegion& region) const {
  MrDescriptor d;
  d.owner = address_;
  d.length = region.length();
  for (size_t i = 0; i < domain_count(); ++i) {
    const auto& reg = region.registration(i);
    d.keys.push_back({reg.rkey, reg.remote_base});
  }
  return d;
}

Result<PeerRef> TransferEngine::Connect(const EngineAddress& address) {
  TE_RETURN_IF_ERROR(address.Validate());
  if (address.provider != address_.provider)
    return InvalidArgument("peer runs provider '" + address.provider + "' but this engine runs '" + address_.provider +
                           "'");
  const auto bytes = address.Serialize();
  std::string key(bytes.begin(), bytes.end());
  PeerCache& cache = *peer_cache_;
  std::lock_guard<std::mutex> lock(cache.mu);
  if (auto it = cache.peers.find(key); it != cache.peers.end()) return it->second;
  const auto& domains = group_->domains();
  const size_t nics = address_.nic_domains();
  std::optional<uint32_t> same_host_lane;
  // Resolves on every NIC domain, or on none; then, when both engines have
  // a same-host domain, on ours (a peer on another host, or one whose
  // mailbox we may not open, stays on the NICs).
  auto resolve = [&]() -> Result<std::vector<nic::PeerAddr>> {
    std::vector<nic::PeerAddr> via;
    for (size_t d = 0; d < nics; ++d) {
      auto p = domains[d]->AddPeer(address.domains[d % address.nic_domains()]);
      if (!p.ok()) {
        for (size_t j = 0; j < via.size(); ++j) (void)domains[j]->RemovePeer(via[j]);  // best effort
        return p.status().WithContext("resolving peer on domain " + std::to_string(d));
      }
      via.push_back(p.value());
    }
    via.resize(domains.size(), nic::PeerAddr(0));
    same_host_lane.reset();
    if (nics < domains.size() && address.same_host_domains > 0) {
      auto p = domains[nics]->AddPeer(address.domains.back());
      if (p.ok()) {
        via[nics] = p.value();
        same_host_lane = uint32_t(nics);
      } else {
        LOG(WARNING) << "peer through the NICs, not the same-host domain: " << p.status().ToString();
      }
    }
    return via;
  };
  auto via = resolve();
  if (!via.ok() && via.status().code() == StatusCode::kResourceExhausted) {
    // A provider's peer table is bounded (shm: 256). Peers nobody holds any
    // more (no descriptor, request or PeerRef outside this cache) are
    // forgotten to make room: a process that met many short-lived peers, or
    // was sent many addresses, does not run out.
    const size_t evicted = EvictUnusedPeersLocked();
    if (evicted > 0) via = resolve();
    if (!via.ok())
      return via.status().WithContext(std::to_string(cache.peers.size()) + " peers in use, " + std::to_string(evicted) +
                                      " unused ones evicted");
  }
  if (!via.ok()) return via.status();
  auto peer = std::make_shared<const Peer>(address, std::move(via).value(), this, same_host_lane);
  cache.peers.emplace(std::move(key), peer);
  return PeerRef(peer);
}

size_t TransferEngine::EvictUnusedPeersLocked() {
  const auto& domains = group_->domains();
  size_t evicted = 0;
  for (auto it = peer_cache_->peers.begin(); it != peer_cache_->peers.end();) {
    // Only the cache holds it: nothing queued or in flight names it, and
    // nobody can submit to it without connecting again.
    if (it->second.use_count() == 1) {
      const Peer& p = *it->second;
      for (size_t d = 0; d < address_.nic_domains(); ++d) (void)domains[d]->RemovePeer(p.via(d));
      if (p.same_host_lane()) (void)domains[*p.same_host_lane()]->RemovePeer(p.via(*p.same_host_lane()));
      it = peer_cache_->peers.erase(it);
      ++evicted;
    } else {
      ++it;
    }
  }
  return evicted;
}

Result<RemoteMr> TransferEngine::Import(const MrDescriptor& descriptor) {
  // The same checks as MrDescriptor::Deserialize: a descriptor built in
  // memory is as untrusted as one read off the wire.
  TE_RETURN_IF_ERROR(descriptor.Validate().WithContext("Import"));
  TE_ASSIGN_OR_RETURN(PeerRef peer, Connect(descriptor.owner));
  return RemoteMr(std::make_shared<const RemoteRegion>(descriptor, std::move(peer)));
}

namespace {

// What the writes point at, held until they are back.
// Moves the request's destinations into `out`: Submit owns its copy of the
// request, and moving spares two atomic reference counts per region.
void TakeDestinations(Request& request, std::vector<RemoteMr>* out) {
  if (auto* r = std::get_if<SingleWrite>(&request)) return out->push_back(std::move(r->dst));
  if (auto* r = std::get_if<PagedWrite>(&request)) return out->push_back(std::move(r->dst));
  if (auto* r = std::get_if<ImmOnly>(&request)) return out->push_back(std::move(r->dst));
  if (auto* r = std::get_if<Barrier>(&request)) {
    for (RemoteMr& p : r->peers) out->push_back(std::move(p));
    return;
  }
  for (auto& t : std::get<ScatterWrite>(request).targets) out->push_back(std::move(t.dst));
}

// A RemoteRegion can be built by hand (its constructor is public): only one
// this engine imported is safe to post to.
Status CheckDestination(const RemoteRegion* dst, const TransferEngine* engine) {
  if (!dst) return InvalidArgument("request names a null destination region");
  if (!dst->peer()) return InvalidArgument("destination region has no peer; Import() its descriptor");
  if (dst->peer()->resolver() != engine)
    return InvalidArgument(
        "destination region was imported by another engine (or built by hand); "
        "Import() its descriptor on this one");
  if (!dst->valid()) return dst->descriptor().Validate().WithContext("destination region");
  if (dst->descriptor().keys.size() != dst->peer()->remote_domains())
    return InvalidArgument("destination region has " + std::to_string(dst->descriptor().keys.size()) +
                           " keys for a peer of " + std::to_string(dst->peer()->remote_domains()) +
                           " domains; Import() its descriptor");
  return Status::Ok();
}

// A lower bound on the operations a request plans into (one per page,
// target or peer).
size_t MinOperations(const Request& request) {
  if (auto* r = std::get_if<PagedWrite>(&request)) return r->src_pages.size();
  if (auto* r = std::get_if<ScatterWrite>(&request)) return r->targets.size();
  if (auto* r = std::get_if<Barrier>(&request)) return r->peers.size();
  return 1;
}

const LocalMr* SourceOf(const Request& request) {
  if (auto* r = std::get_if<SingleWrite>(&request)) return &r->src;
  if (auto* r = std::get_if<PagedWrite>(&request)) return &r->src;
  if (auto* r = std::get_if<ScatterWrite>(&request)) return &r->src;
  return nullptr;
}
LocalMr* SourceOf(Request& request) { return const_cast<LocalMr*>(SourceOf(std::as_const(request))); }

PlanLimits LimitsOf(const DomainGroup& group, const EngineOptions& options, const EngineAddress& address,
                    const LocalMr* src) {
  PlanLimits l;
  l.domains = address.nic_domains();
  l.max_write_bytes = group.max_write_bytes();
  l.min_shard_bytes = options.min_shard_bytes;
  // A source takes the same-host lane only if it is registered there (GPU
  // memory may not be: RegisterMemory).
  l.same_host_source = address.same_host_domains == 0 || !src || !*src || !(*src)->RegisteredOn(group.domains()) ||
                       MemoryRegion::Registered((*src)->registration(address.nic_domains()));
  return l;
}

}  // namespace

Result<uint64_t> TransferEngine::ExpectedImmCount(const Request& request) const {
  TE_ASSIGN_OR_RETURN(auto writes, PlanRequest(request, LimitsOf(*group_, options_, address_, SourceOf(request))));
  return CountImms(writes);
}

Status TransferEngine::Submit(Request request, Completion completion) {
  // A request larger than the whole queue bound is refused before planning
  // allocates its operations.
  if (const size_t n = MinOperations(request); n > options_.max_queued_operations)
    return ResourceExhausted("request of at least " + std::to_string(n) + " operations exceeds max_queued_operations " +
                             std::to_string(options_.max_queued_operations) + "; split it");
  // One plan vector per submitting thread, reused: no allocation per
  // request (trimmed after a request of thousands of pages).
  thread_local std::vector<PlannedWrite> writes;
  struct Trim {
    ~Trim() {
      if (writes.capacity() > 4096) std::vector<PlannedWrite>().swap(writes);
    }
  } trim;
  LocalMr* const src = SourceOf(request);
  TE_RETURN_IF_ERROR(PlanRequestInto(request, LimitsOf(*group_, options_, address_, src), &writes));
  if (src && *src && !(*src)->RegisteredOn(group_->domains()))
    return InvalidArgument("source region was registered by another engine; register it on this one");
  for (size_t i = 0; i < writes.size(); ++i)
    if (i == 0 || writes[i].dst != writes[i - 1].dst) TE_RETURN_IF_ERROR(CheckDestination(writes[i].dst, this));
  if (src && *src && (*src)->memory().kind.type != nic::MemoryKind::Type::kHost) {
    for (const PlannedWrite& pw : writes)
      if (pw.length > 0 && !group_->domains()[pw.domain]->info().hmem)
        return Unimplemented("source region is device memory but domain " + std::to_string(pw.domain) + " (" +
                             group_->domains()[pw.domain]->info().provider + ") cannot read device memory (" +
                             (pw.domain < address_.nic_domains() ? "no FI_HMEM support" : "no CUDA IPC") + ")");
  }
  // Checked: the request's regions move into the state that keeps them
  // alive until its writes are back (the plan points into them).
  auto r = group_->request_pool().Get();
  if (src) r->src = std::move(*src);
  TakeDestinations(request, &r->dsts);
  // A pooled state keeps its Work elements (RequestState::Reset), so
  // resize constructs only those beyond the last request's count; every
  // field is assigned below (zeroing each Work first cost a tenth of a page).
  r->works.resize(writes.size());
  for (size_t i = 0; i < writes.size(); ++i) {
    const PlannedWrite& pw = writes[i];
    const Peer& peer = *pw.dst->peer();
    Work& w = r->works[i];
    w.req = r.get();
    w.domain = pw.domain;
    w.is_send = false;
    w.send_peer = 0;
    w.message.clear();
    w.op.length = pw.length;
    if (r->src && pw.length > 0) {
      w.op.local = r->src->data() + pw.src_offset;
      w.op.local_desc = r->src->registration(pw.domain).desc;
    } else {
      w.op.local = nullptr;
      w.op.local_desc = nullptr;
    }
    w.op.peer = peer.via(pw.domain);
    w.peer_id = peer.id();
    const auto& key = pw.dst->key_for(pw.domain);
    w.op.remote_addr = key.remote_base + pw.dst_offset;
    w.op.rkey = key.rkey;
    w.op.has_imm = pw.has_imm;
    w.op.imm = pw.imm;
    w.op.context = nullptr;
  }
  TE_RETURN_IF_ERROR(group_->Admit(r->works.size()));
  r->completion = std::move(completion);
  // Latency is sampled: a clock read costs a tenth of a small write here.
  thread_local uint32_t submissions = 0;
  if (submissions++ % kLatencySampleEvery == 0) r->submitted = std::chrono::steady_clock::now();
  group_->Enqueue(r.release());
  return Status::Ok();
}

Status TransferEngine::ExpectImm(uint32_t imm, uint64_t count, std::function<void()> callback, ImmDelivery delivery) {
  std::vector<ImmCounter::Callback> ready;
  TE_RETURN_IF_ERROR(
      group_->imm_counter().Expect(imm, count, std::move(callback), &ready, delivery == ImmDelivery::kOnWorker));
  group_->callbacks().Post(&ready);
  return Status::Ok();
}

Status TransferEngine::WaitImm(uint32_t imm, uint64_t count, std::chrono::nanoseconds timeout) {
  if (options_.progress == ProgressMode::kManual) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!group_->imm_counter().TryConsume(imm, count)) {
      if (std::chrono::steady_clock::now() >= deadline)
        return Timeout("waited for " + std::to_string(count) + " arrivals of imm " + std::to_string(imm) + "; " +
                       std::to_string(group_->imm_counter().Available(imm)) + " arrived within the timeout");
      Progress();
    }
    return Status::Ok();
  }
  if (DomainGroup::OnWorkerThread())
    return InvalidArgument("WaitImm(imm " + std::to_string(imm) +
                           ") called on the engine's worker thread (from a callback declared cheap): it would "
                           "wait for arrivals that only this thread can read; use ExpectImm instead");
  // Drive progress on this thread for wait_spin: the arrival is usually
  // microseconds away. Then sleep while the worker carries on.
  const auto start = std::chrono::steady_clock::now();
  const auto spin = std::min<std::chrono::nanoseconds>(options_.wait_spin, timeout);
  if (spin.count() > 0 && DriveUntil([&] { return group_->imm_counter().TryConsume(imm, count); }, spin))
    return Status::Ok();
  const auto left = timeout - (std::chrono::steady_clock::now() - start);
  return group_->imm_counter().Wait(imm, count, std::max<std::chrono::nanoseconds>(left, std::chrono::nanoseconds(0)));
}

bool TransferEngine::DriveUntil(const std::function<bool()>& done, std::chrono::nanoseconds timeout) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  if (options_.progress == ProgressMode::kManual) {
    while (!done()) {
      if (std::chrono::steady_clock::now() >= until) return false;
      Progress();
    }
    return true;
  }
  if (DomainGroup::OnWorkerThread()) return done();
  return group_->DriveUntil(done, until);
}

bool TransferEngine::TryConsumeImm(uint32_t imm, uint64_t count) {
  return group_->imm_counter().TryConsume(imm, count);
}

uint64_t TransferEngine::ImmAvailable(uint32_t imm) const { return group_->imm_counter().Available(imm); }

uint64_t TransferEngine::ForgetImm(uint32_t imm) { return group_->imm_counter().Forget(imm); }

size_t TransferEngine::max_message_bytes() const {
  return options_.fabric.max_message_bytes - group_->message_header_bytes();
}

Status TransferEngine::Send(const PeerRef& peer, std::span<const uint8_t> data, Completion completion) {
  if (!peer) return InvalidArgument("Send to a null peer");
  if (peer->resolver() != this)
    return InvalidArgument("peer was connected by another engine; Connect() it on this one");
  if (data.size() > max_message_bytes())
    return InvalidArgument("control message of " + std::to_string(data.size()) + " bytes exceeds max_message_bytes " +
                           std::to_string(max_message_bytes()));
  auto r = group_->request_pool().Get();
  r->works.resize(1);
  Work& w = r->works[0];  // a pooled element: every field is assigned
  w.req = r.get();
  w.domain = peer->message_lane();
  w.is_send = true;
  w.op = nic::WriteOp{};
  w.send_peer = peer->via(w.domain);
  w.peer_id = peer->id();
  w.message = EncodeControlFrame(group_->local_address(), data);
  r->peer = peer;
  TE_RETURN_IF_ERROR(group_->Admit(1));
  r->completion = std::move(completion);
  r->submitted = std::chrono::steady_clock::now();
  group_->Enqueue(r.release());
  return Status::Ok();
}

void TransferEngine::SetRecvHandler(RecvHandler handler) { group_->SetRecvHandler(std::move(handler)); }

Status TransferEngine::ClaimRecvHandler(const void* owner, const std::string& plane, RecvHandler handler) {
  {
    std::lock_guard<std::mutex> lock(plane_mu_);
    if (plane_owner_ != nullptr && plane_owner_ != owner)
      return Unavailable(plane + " cannot take this engine's receive handler: " + plane_name_ +
                         " holds it (one data plane per engine; give each plane its own engine)");
    plane_owner_ = owner;
    plane_name_ = plane;
  }
  SetRecvHandler(std::move(handler));
  return Status::Ok();
}

void TransferEngine::ReleaseRecvHandler(const void* owner) {
  {
    std::lock_guard<std::mutex> lock(plane_mu_);
    if (plane_owner_ != owner || owner == nullptr) return;
    plane_owner_ = nullptr;
    plane_name_.clear();
  }
  SetRecvHandler(nullptr);
}

bool TransferEngine::Progress() {
  if (options_.progress != ProgressMode::kManual) {
    LOG(DFATAL) << "TransferEngine::Progress() called in kThread mode";
    return false;
  }
  return group_->Progress();
}

EngineStats TransferEngine::stats() const { return group_->stats(); }

}  // namespace te
