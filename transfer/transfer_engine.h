// TransferEngine: one-sided WriteImm transfers over a group of NICs.
//
//   te::EngineOptions opts;                       // provider "tcp" on lo by default
//   auto engine = te::TransferEngine::Create(opts).value();
//   auto mr = engine->RegisterMemory(buf, len).value();
//   std::string hex = engine->Describe(*mr).ToHex();     // send to a peer
//   ...
//   auto dst = engine->Import(te::MrDescriptor::FromHex(peer_hex).value()).value();
//   engine->Submit(te::SingleWrite{mr, 0, len, dst, 0, /*imm=*/7},
//                  {.on_done = [] {...}, .on_error = [](const te::Status&) {...}});
//   // on the peer:
//   peer_engine->ExpectImm(7, peer_engine->... count, [] { /* data is there */ });
//
// Guarantees:
//  - A request accepted by Submit completes exactly once: on_done after every
//    write of it completed on every domain, or on_error once with the first
//    error. A request refused by Submit (bad bounds, bad arguments) reports
//    nothing and was never posted.
//  - A write outside the bounds of the remote descriptor is refused at
//    Submit with an error naming offset, length and region size.
//  - Back-pressure never drops work: it waits in order and is posted as
//    completions free slots.
//  - Every error of a request says what the peer may have seen: kNotPosted
//    means none of its operations was posted (withdrawn from the queue after
//    request_timeout, or a peer known dead): safe to submit again. kTimeout
//    (not finished request_timeout after its first post), kIoError and
//    kCancelled (engine shut down) mean the outcome is unknown: some data and
//    immediates may have landed. Nothing hangs: a dead peer or NIC turns
//    into one of these within request_timeout.
//  - A local completion (on_done) means the provider finished the write on
//    this side. It is not proof of delivery: on some providers a write with a
//    stale or wrong key completes locally and lands nowhere
//    (docs/RELIABILITY.md). Receivers learn of data only by counting
//    immediates, and the data planes never treat on_done as delivery.
//  - Submit never queues without bound: beyond
//    EngineOptions::max_queued_operations it returns kResourceExhausted.
//  - No order between writes is assumed, on any provider.
//
// Threads: every method is safe to call from any thread. Callbacks run on
// one callback thread (kThread mode) or inside Progress() (kManual mode);
// callbacks declared cheap (Completion::on_worker, ImmDelivery::kOnWorker)
// run on the worker, or on a thread inside DriveUntil/WaitImm that holds the
// worker's role at that moment. Destroying the engine fails the requests
// still in flight with kCancelled (their callbacks run before the destructor
// returns, on the destroying thread). Never destroy it from a callback.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "transfer/completion.h"
#include "transfer/control_channel.h"
#include "transfer/engine_options.h"
#include "transfer/engine_stats.h"
#include "transfer/imm_counter.h"
#include "transfer/memory_region.h"
#include "transfer/mr_descriptor.h"
#include "transfer/remote_region.h"
#include "transfer/requests.h"

namespace te {

class DomainGroup;

class TransferEngine {
 public:
  // Receives a control message; `data` is valid only during the call.
  using RecvHandler = te::RecvHandler;

  static Result<std::unique_ptr<TransferEngine>> Create(const EngineOptions& options);
  // An engine over domains the caller opened (one per NIC, all of one
  // provider, and optionally a same-host domain, provider "local", last),
  // instead of those `options` name; the rest of `options` applies. For tests and benchmarks: tools/discard_domain.h
  // measures the engine's own cost with a domain that moves no data.
  static Result<std::unique_ptr<TransferEngine>> CreateOverDomains(const EngineOptions& options,
                                                                   std::vector<std::shared_ptr<nic::Domain>> domains);
  // The options Create() actually uses: with `gpu` set, fills domains,
  // domain_names and worker_cpu from the topology where not given.
  static Result<EngineOptions> ResolveOptions(const EngineOptions& options);
  ~TransferEngine();
  TransferEngine(const TransferEngine&) = delete;
  TransferEngine& operator=(const TransferEngine&) = delete;

  const EngineOptions& options() const { return options_; }
  // This engine's address; give it to peers (EngineAddress::ToHex).
  const EngineAddress& address() const { return address_; }
  // Domains in the group: the NIC domains (options().domains), then the
  // same-host domain when there is one (EngineOptions::same_host).
  size_t domain_count() const;
  bool has_same_host_domain() const;
  // Provider actually opened, e.g. "tcp;ofi_rxm".
  const std::string& provider() const { return address_.provider; }

  // ---- Memory ----
  // Registers [data, data + length) with every domain. The caller keeps the
  // memory alive while the region or a request using it lives. Refused with
  // kInvalidArgument: a null address, 0 bytes or more than kMaxRegionBytes
  // (base/checked_math.h, 64 TiB),
  // a range that wraps, and host memory whose first or last page is not
  // mapped in this process.
  Result<LocalMr> RegisterMemory(void* data, size_t length, Memory memory = Memory::Host());
  // `length` bytes of zeroed, page-aligned host memory, registered, and owned
  // by the region: freed when the last reference goes, the caller's and
  // those of requests still in flight. So a buffer whose writes failed
  // (kTimeout: some may still be posted) can be dropped at once; with
  // RegisterMemory the caller would have to outlive those writes itself.
  Result<LocalMr> AllocateMemory(size_t length);
  // What a peer needs to write into `region`.
  MrDescriptor Describe(const MemoryRegion& region) const;

  // ---- Peers ----
  // Resolves a peer engine (cached: the same address gives the same Peer).
  // A provider's peer table may be bounded (shm: 256 peers): when it is
  // full, peers no PeerRef, RemoteMr or request holds are forgotten to make
  // room; kResourceExhausted when all of them are in use.
  Result<PeerRef> Connect(const EngineAddress& address);
  // Resolves a descriptor a peer sent; connects to its owner.
  Result<RemoteMr> Import(const MrDescriptor& descriptor);

  // ---- Requests ----
  Status Submit(Request request, Completion completion);
  // How many immediates `request` delivers (see requests.h); validates it.
  Result<uint64_t> ExpectedImmCount(const Request& request) const;

  // ---- Receiving ----
  // Fires `callback` once `count` arrivals of `imm` are available, consuming
  // them. Arrivals before the call count. With kOnWorker the callback is
  // declared cheap and runs on the worker as the arrival is read (the rules
  // of Completion::on_worker apply), saving the hop to the callback thread:
  // for responders such as a pong or an ack. An expectation already met
  // when registered runs on the callback thread either way.
  enum class ImmDelivery { kCallbackThread, kOnWorker };
  Status ExpectImm(uint32_t imm, uint64_t count, std::function<void()> callback,
                   ImmDelivery delivery = ImmDelivery::kCallbackThread);
  // Blocking and polling forms of the same. WaitImm polls for
  // EngineOptions::wait_spin before it sleeps; called on the worker (from a
  // cheap callback) it returns kInvalidArgument, since it would wait on
  // itself.
  Status WaitImm(uint32_t imm, uint64_t count, std::chrono::nanoseconds timeout);
  bool TryConsumeImm(uint32_t imm, uint64_t count);
  uint64_t ImmAvailable(uint32_t imm) const;
  // Drops the expectations and unconsumed arrivals of `imm` (see
  // ImmCounter::Forget); returns how many arrivals were dropped.
  uint64_t ForgetImm(uint32_t imm);

  // ---- Control plane ----
  // Two-sided message of at most max_message_bytes() to `peer`. Completes
  // like a request (delivered to the peer's provider, not its handler).
  // Messages are posted ahead of queued writes: a message may overtake
  // writes submitted before it, so never infer from a message that earlier
  // writes have landed (count their immediates).
  Status Send(const PeerRef& peer, std::span<const uint8_t> data, Completion completion);
  size_t max_message_bytes() const;
  // Messages that arrived before a handler was set are delivered to it.
  // Returns once no call of the handler it replaces is still running
  // (except one on this very thread: a handler may replace itself), so
  // whatever that handler used may be destroyed right after.
  void SetRecvHandler(RecvHandler handler);

  // ---- Data planes ----
  // One data plane per engine owns its receive handler. KvPrefiller,
  // KvDecoder, WeightPusher and WeightReceiver claim it when created and
  // release it when destroyed; a second plane's claim fails (kUnavailable,
  // naming the holder), so two planes never take each other's messages.
  // MoE dispatch and telemetry send no control messages and may share an
  // engine with one plane; immediates are split by transfer/imm_ranges.h.
  // `owner` identifies the claim (the plane object); releasing a claim one
  // does not hold does nothing.
  Status ClaimRecvHandler(const void* owner, const std::string& plane, RecvHandler handler);
  void ReleaseRecvHandler(const void* owner);

  // ---- Progress ----
  // kManual mode: posts, polls and runs ready callbacks once; returns true
  // if anything happened. Not to be called in kThread mode.
  bool Progress();
  // Runs the engine's progress on the calling thread until `done()` holds
  // or `timeout` passes; returns done(). For a thread about to wait for
  // something microseconds away (a round trip, the last completions of a
  // window): it takes the worker's role meanwhile (posts, polls, runs the
  // cheap callbacks of Completion::on_worker), and the worker naps, so no
  // thread hand-off or wake-up sits on the path and the two threads do not
  // both spin. Keep `timeout` short (tens of microseconds) and sleep after
  // it. After a successful drive the role stays with the caller for 20 us
  // (the worker naps on), so that a caller that submits and drives again
  // wakes nobody: work other threads submit just then may wait that long.
  // kManual mode: the same as calling Progress() in a loop. On the worker
  // itself (a cheap callback) it only evaluates done().
  bool DriveUntil(const std::function<bool()>& done, std::chrono::nanoseconds timeout);

  EngineStats stats() const;

 private:
  TransferEngine(const EngineOptions& options, std::unique_ptr<DomainGroup> group, EngineAddress address);

  // RegisterMemory; `storage` (AllocateMemory's) goes to the region.
  Result<LocalMr> Register(void* data, size_t length, Memory memory, std::shared_ptr<void> storage);
  struct PeerCache;
  // Forgets cached peers nobody else holds; the cache's lock is held.
  size_t EvictUnusedPeersLocked();

  EngineOptions options_;
  std::unique_ptr<DomainGroup> group_;
  EngineAddress address_;
  std::unique_ptr<PeerCache> peer_cache_;
  std::mutex plane_mu_;
  const void* plane_owner_ = nullptr;  // the data plane holding the receive handler
  std::string plane_name_;
};

}  // namespace te
