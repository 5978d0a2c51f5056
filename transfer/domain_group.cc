#include "transfer/domain_group.h"

#include <glog/logging.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <thread>
#include <utility>

namespace te {
namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kTimeoutCheckInterval = std::chrono::milliseconds(1);
constexpr int kPollBatch = 64;
constexpr int kIntakeBatch = 256;

void FutexWait(std::atomic<uint32_t>* word, uint32_t expected, std::chrono::microseconds t) {
  timespec ts{static_cast<time_t>(t.count() / 1000000), static_cast<long>(t.count() % 1000000) * 1000};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, expected, &ts, nullptr, 0);
}

void FutexWake(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
}

thread_local bool on_worker_thread = false;

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

}  // namespace

bool DomainGroup::OnWorkerThread() { return on_worker_thread; }

DomainGroup::DomainGroup(const EngineOptions& options, std::vector<std::shared_ptr<nic::Domain>> domains)
    : options_(options),
      domains_(std::move(domains)),
      pending_(domains_.size()),
      pending_messages_(domains_.size()),
      inflight_(domains_.size(), 0),
      imm_counter_(options.max_imm_values),
      callbacks_(options.progress == ProgressMode::kThread),
      counters_(domains_.size()) {
  for (const auto& d : domains_) {
    size_t depth = d->info().tx_depth ? d->info().tx_depth : 1024;
    size_t limit = options_.max_inflight_per_domain ? options_.max_inflight_per_domain : std::min<size_t>(depth, 1024);
    max_inflight_.push_back(limit);
    max_write_bytes_ = std::min<uint64_t>(max_write_bytes_, d->info().max_write_bytes);
  }
  next_timeout_check_ = Clock::now();
}

void DomainGroup::Start() {
  if (options_.progress != ProgressMode::kThread) return;
  worker_ = std::thread([this] { WorkerLoop(); });
}

DomainGroup::~DomainGroup() {
  stop_.store(true);
  wake_word_.fetch_add(1);
  FutexWake(&wake_word_);
  if (worker_.joinable()) worker_.join();
  // The worker is gone: this thread owns the request state now. Everything
  // still queued or in flight fails with kCancelled, exactly once.
  now_fresh_ = false;
  while (MpscNode* n = submissions_.Pop()) Accept(static_cast<RequestState*>(n));
  for (RequestList* list : {&queued_, &live_, &zombies_}) {
    while (RequestState* r = list->head) {
      if (!r->failed) Fail(r, Cancelled("engine shut down with the request in flight"));
      r->list->Remove(r);  // Fail may have moved it to the zombie list
      delete r;
    }
  }
  FlushReady();
  callbacks_.Shutdown();
}

Status DomainGroup::Admit(size_t operations) {
  const size_t limit = options_.max_queued_operations;
  size_t cur = admitted_ops_.load(std::memory_order_relaxed);
  do {
    if (operations > limit || cur > limit - operations)
      return ResourceExhausted("request of " + std::to_string(operations) + " operations refused: " +
                               std::to_string(cur) + " are queued or in flight and max_queued_operations is " +
                               std::to_string(limit) + "; submit again as earlier requests finish");
  } while (!admitted_ops_.compare_exchange_weak(cur, cur + operations, std::memory_order_relaxed));
  return Status::Ok();
}

void DomainGroup::Enqueue(RequestState* request) {
  counters_.RequestSubmitted();
  submissions_.Push(request);
  // A driving thread picks the request up itself; one that just drove
  // will very likely be back within its lease.
  if (sleeping_.load() && drivers_.load() == 0 && !LeaseHeld()) WakeWorker();
}

bool DomainGroup::LeaseHeld() const {
  const int64_t until = lease_until_ns_.load(std::memory_order_relaxed);
  return until != 0 && NowNs() < until;
}

void DomainGroup::WakeWorker() {
  if (sleeping_.load()) {
    wake_word_.fetch_add(1);
    FutexWake(&wake_word_);
  }
}

void DomainGroup::Nap(std::chrono::microseconds nap) {
  uint32_t seen = wake_word_.load();
  sleeping_.store(true);
  if ((submissions_.LooksEmpty() || drivers_.load() > 0 || LeaseHeld()) && !stop_.load())
    FutexWait(&wake_word_, seen, nap);
  sleeping_.store(false);
}

bool DomainGroup::DriveUntil(const std::function<bool()>& done, Clock::time_point until) {
  if (done()) return true;
  drivers_.fetch_add(1);
  const bool was_on_worker = on_worker_thread;
  bool ok = false;
  for (int polls = 0;; ++polls) {
    if (progress_mu_.try_lock()) {
      on_worker_thread = true;  // cheap callbacks may run here
      ProgressOnce();
      on_worker_thread = was_on_worker;
      progress_mu_.unlock();
    } else {
      std::this_thread::yield();  // another driver, or the worker finishing its pass
    }
    if ((ok = done())) break;
    if ((polls & 15) == 15 && Clock::now() >= until) break;
  }
  // The last driver out hands the role back. When the wait ended without
  // its event the worker is needed at once. After a success the worker
  // resumes at the end of the lease (kDriverLease), or on a submission after
  // it: that saves a wake-up per round trip, and costs a lone Submit just
  // after a wait up to the lease.
  if (ok) lease_until_ns_.store(NowNs() + std::chrono::nanoseconds(kDriverLease).count(), std::memory_order_relaxed);
  if (drivers_.fetch_sub(1) == 1 && !ok) WakeWorker();
  return ok;
}

void DomainGroup::WorkerLoop() {
  on_worker_thread = true;
  if (options_.worker_cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(*options_.worker_cpu, &set);
    if (pthread_setaffinity_np(pthread_self(), sizeof(set), &set) != 0)
      LOG(WARNING) << "could not pin the worker to CPU " << *options_.worker_cpu;
  }
  auto last_active = Clock::now();
  int idle_polls = 0;
  while (!stop_.load(std::memory_order_relaxed)) {
    if (drivers_.load(std::memory_order_relaxed) > 0) {
      // A waiting thread drives progress (DriveUntil): stay off its core.
      Nap(options_.idle_sleep);
      last_active = Clock::now();
      continue;
    }
    if (int64_t until = lease_until_ns_.load(std::memory_order_relaxed); until != 0) {
      if (const int64_t left = until - NowNs(); left > 0) {
        Nap(std::chrono::microseconds(left / 1000 + 1));
        last_active = Clock::now();
        continue;
      }
      // Expired: cleared, so that idle passes read no clock for it (a
      // driver may have renewed it meanwhile; then it stays).
      lease_until_ns_.compare_exchange_strong(until, 0, std::memory_order_relaxed);
    }
    bool active;
    {
      std::lock_guard<std::mutex> lock(progress_mu_);
      active = ProgressOnce();
    }
    if (active) {
      last_active = Clock::now();
      idle_polls = 0;
      continue;
    }
    if (options_.busy_poll) continue;
    if (++idle_polls % 64 == 0) {
      // Spinning shares the core with the application on small machines.
      if (Clock::now() - last_active < options_.idle_spin) {
        sched_yield();
        continue;
      }
      const auto idle = Clock::now() - last_active;
      Nap(idle < options_.idle_deep ? options_.idle_sleep : options_.idle_sleep_max);
    }
  }
}

bool DomainGroup::Progress() {
  bool active = ProgressOnce();
  active |= callbacks_.RunPending();
  return active;
}

bool DomainGroup::ProgressOnce() {
  bool active = false;
  now_fresh_ = false;
  for (int i = 0; i < kIntakeBatch; ++i) {
    MpscNode* n = submissions_.Pop();
    if (!n) break;
    Accept(static_cast<RequestState*>(n));
    active = true;
  }
  for (size_t d = 0; d < domains_.size(); ++d) active |= PostPending(d);
  for (size_t d = 0; d < domains_.size(); ++d) {
    if (domains_[d]->Poll(*this, kPollBatch) > 0) active = true;
  }
  if (!imm_batch_.empty()) {
    counters_.ImmsReceived(imm_batch_.size());
    imm_counter_.Add(imm_batch_, &ready_, &worker_ready_);
    imm_batch_.clear();
    if (const uint64_t dropped = imm_counter_.dropped(); dropped != imms_dropped_seen_) {
      LOG(WARNING) << (dropped - imms_dropped_seen_) << " immediates dropped: " << options_.max_imm_values
                   << " distinct values are already tracked (max_imm_values); "
                   << "a peer is sending values nobody expects";
      imms_dropped_seen_ = dropped;
    }
  }
  // An idle pass reads no clock (a clock read costs as much as the rest of
  // an idle pass on some virtual machines); every 64th looks at the time.
  if (active || (++idle_passes_ & 63) == 0) {
    const auto now = Now();
    if (now >= next_timeout_check_) {
      CheckTimeouts(now);
      next_timeout_check_ = now + kTimeoutCheckInterval;
    }
    counters_.MaybePublishPeers(now);
  }
  FlushReady();
  return active;
}

Clock::time_point DomainGroup::Now() {
  if (!now_fresh_) {
    now_ = Clock::now();
    now_fresh_ = true;
  }
  return now_;
}

void DomainGroup::FlushReady() {
  // One atomic update per pass rather than one per request: the counter's
  // line is shared with every submitting thread (Admit).
  if (finished_ops_ != 0) {
    admitted_ops_.fetch_sub(finished_ops_, std::memory_order_relaxed);
    finished_ops_ = 0;
  }
  RunOnWorker();
  if (!ready_.empty()) callbacks_.Post(&ready_);
  pool_.PutAll(&finished_);  // their callbacks were moved out above
}

void DomainGroup::RunOnWorker() {
  // A cheap callback may submit more work and so complete more requests
  // before this returns (manual mode, a failed Submit): run in rounds.
  // A round is timed as a whole, not each callback: a clock read costs
  // about as much as a cheap callback, and cheap callbacks are sub-microsecond
  // work, so a round over slow_worker_callback (milliseconds) means one of
  // them blocked.
  while (!worker_ready_.empty()) {
    running_.swap(worker_ready_);
    const auto t0 = Clock::now();
    for (auto& cb : running_) cb();
    const auto took = Clock::now() - t0;
    if (took > options_.slow_worker_callback) {
      counters_.SlowWorkerCallback();
      LOG_EVERY_N(WARNING, 100) << "callbacks declared cheap (on_worker) ran for "
                                << std::chrono::duration_cast<std::chrono::microseconds>(took).count() << " us ("
                                << running_.size() << " of them) on the engine's worker, longer than "
                                << "slow_worker_callback (" << options_.slow_worker_callback.count()
                                << " us); every request waited. Run blocking work on the callback thread instead.";
    }
    running_.clear();
  }
}

void DomainGroup::Accept(RequestState* r) {
  r->outstanding = static_cast<uint32_t>(r->works.size());
  // The queued deadline counts from here, by this pass's clock: Submit
  // reads no clock (a submission waits here a pass at most).
  r->deadline = Now() + options_.request_timeout;
  queued_.PushBack(r);
  for (Work& w : r->works) (w.is_send ? pending_messages_ : pending_)[w.domain].push_back(&w);
}

bool DomainGroup::PostPending(size_t d) {
  // Control messages first: a heartbeat must not wait behind a peer's
  // backlog of queued writes. Nothing orders messages with writes.
  bool posted = PostQueue(d, pending_messages_[d]);
  return PostQueue(d, pending_[d]) || posted;
}

bool DomainGroup::PostQueue(size_t d, std::deque<Work*>& queue) {
  bool posted = false;
  // Back-pressure from one peer (an unreachable peer whose connection is
  // still being attempted keeps answering EAGAIN) must not hold up work for
  // the others: that peer's work waits in place, keeping its own order, and
  // work behind it for other peers goes ahead. Nothing assumes an order
  // between writes. A few blocked peers in a row mean the domain itself is
  // full, so the scan stops there.
  constexpr size_t kMaxBlockedPeers = 4, kMaxScan = 256;
  uint64_t blocked[kMaxBlockedPeers];
  size_t nblocked = 0;
  size_t i = 0;
  while (i < queue.size() && i < kMaxScan && inflight_[d] < max_inflight_[d]) {
    Work* w = queue[i];
    if (w->req->failed) {  // timed out or failed elsewhere: do not post the rest
      queue.erase(queue.begin() + i);
      CompleteWork(w, Status::Ok());
      continue;
    }
    if (std::find(blocked, blocked + nblocked, w->peer_id) != blocked + nblocked) {
      ++i;
      continue;
    }
    // A run of queued writes to one peer goes as one chain where the
    // provider can (verbs: one ibv_post_send); a message goes alone.
    chain_ops_.clear();
    chain_works_.clear();
    const size_t room = std::min(kMaxChain, max_inflight_[d] - inflight_[d]);
    for (size_t j = i; j < queue.size() && chain_works_.size() < room; ++j) {
      Work* x = queue[j];
      if (x->is_send || x->req->failed || x->peer_id != w->peer_id) break;
      x->op.context = x;
      chain_ops_.push_back(x->op);
      chain_works_.push_back(x);
    }
    size_t went = 0;
    Status st;
    if (w->is_send) {
      st = domains_[d]->PostSend(w->send_peer, w->message, w);
      went = st.ok() ? 1 : 0;
      chain_works_.assign(1, w);
    } else {
      st = domains_[d]->PostWrites(chain_ops_, &went);
    }
    for (size_t k = 0; k < went; ++k) Posted(d, chain_works_[k]);
    queue.erase(queue.begin() + i, queue.begin() + i + went);
    posted |= went > 0;
    if (st.ok()) continue;
    if (st.code() == StatusCode::kUnavailable) {  // back-pressure: poll, retry later
      if (nblocked == kMaxBlockedPeers) break;
      blocked[nblocked++] = w->peer_id;
      ++i;
      continue;
    }
    Work* bad = chain_works_[went];  // the first that did not go, now at i
    queue.erase(queue.begin() + i);
    posted = true;
    CompleteWork(bad, st.WithContext("posting on domain " + std::to_string(d)));
  }
  return posted;
}

void DomainGroup::Posted(size_t d, Work* w) {
  ++inflight_[d];
  RequestState* r = w->req;
  if (r->posted++ == 0 && r->list == &queued_) {
    // The in-flight clock starts now: time spent queued behind
    // back-pressure does not count against a healthy peer.
    queued_.Remove(r);
    r->deadline = Now() + options_.request_timeout;
    live_.PushBack(r);
  }
  counters_.Posted(d, w->peer_id, !w->is_send, w->is_send ? 0 : w->op.length);
}

void DomainGroup::OnSendDone(void* context) {
  Work* w = static_cast<Work*>(context);
  --inflight_[w->domain];
  CompleteWork(w, Status::Ok());
}

void DomainGroup::OnSendError(void* context, const Status& status) {
  Work* w = static_cast<Work*>(context);
  --inflight_[w->domain];
  CompleteWork(w, status.WithContext(std::string(w->is_send ? "control message" : "write") + " on domain " +
                                     std::to_string(w->domain)));
}

void DomainGroup::CompleteWork(Work* w, const Status& status) {
  RequestState* r = w->req;
  if (!status.ok()) {
    counters_.WorkFailed(w->domain, w->peer_id);
  }
  if (!status.ok() && !r->failed) Fail(r, status);
  if (--r->outstanding == 0) Finish(r);
}

void DomainGroup::Fail(RequestState* r, const Status& given) {
  // "Never posted" is a promise about the whole request: once any of its
  // operations went out, the outcome is unknown.
  const Status status =
      given.code() == StatusCode::kNotPosted && r->posted > 0
          ? IoError(given.message() + "; " + std::to_string(r->posted) + " of the request's " +
                    std::to_string(r->works.size()) + " operations were already posted: outcome unknown")
          : given;
  r->failed = true;
  counters_.RequestFailed();
  if (r->completion.counter) r->completion.counter->MarkFailed(status);
  if (r->completion.on_error) {
    (r->completion.on_worker ? worker_ready_ : ready_).push_back([cb = std::move(r->completion.on_error), status] {
      cb(status);
    });
  }
  r->completion.on_done = nullptr;
  if (r->list == &live_ || r->list == &queued_) {
    r->list->Remove(r);
    zombies_.PushBack(r);
  }
}

void DomainGroup::Finish(RequestState* r) {
  if (!r->failed) {
    counters_.RequestDone();
    if (r->submitted != Clock::time_point{}) {
      const auto now = Now();  // as of this progress pass
      counters_.RequestLatency(std::max(now, r->submitted) - r->submitted);
    }
    if (r->completion.counter) r->completion.counter->MarkDone();
    if (r->completion.on_done)
      (r->completion.on_worker ? worker_ready_ : ready_).push_back(std::move(r->completion.on_done));
  }
  if (r->list) r->list->Remove(r);
  finished_ops_ += r->works.size();  // given back to Admit once per pass (FlushReady)
  finished_.push_back(r);
}

void DomainGroup::CheckTimeouts(Clock::time_point now) {
  // Each list is in deadline order, so only its head can be due.
  auto ms = [&] { return std::to_string(options_.request_timeout.count()); };
  while (RequestState* r = queued_.head) {
    if (r->deadline > now) break;
    // Its works are still in the pending queues; PostQueue drops works of a
    // failed request instead of posting them.
    Fail(r, NotPosted("request withdrawn after waiting " + ms() + " ms in the queue: none of its " +
                      std::to_string(r->works.size()) +
                      " operations was posted, nothing reached the peer (safe to submit again)"));
  }
  while (RequestState* r = live_.head) {
    if (r->deadline > now) break;
    Fail(r, Timeout("request not finished " + ms() + " ms after its first operation was posted: " +
                    std::to_string(r->posted) + " of " + std::to_string(r->works.size()) + " operations posted, " +
                    std::to_string(r->outstanding) + " outstanding; outcome unknown (peer unreachable or dead?)"));
  }
}

void DomainGroup::OnImm(uint32_t imm) { imm_batch_.push_back(imm); }

void DomainGroup::OnRecv(std::span<const uint8_t> data) {
  auto frame = DecodeControlFrame(data);
  if (!frame.ok()) {
    counters_.MessageDropped();
    LOG_EVERY_N(WARNING, 100) << "dropped a malformed control message of " << data.size() << " bytes ("
                              << google::COUNTER << " so far): " << frame.status().ToString();
    return;
  }
  // Messages wait on the callback thread for the handler: a peer sending
  // faster than the handler keeps up must not grow that queue without bound.
  const size_t bytes = data.size();
  if (pending_message_bytes_.load(std::memory_order_relaxed) + bytes > options_.max_pending_message_bytes) {
    counters_.MessageDropped();
    LOG_EVERY_N(WARNING, 100) << "dropped a control message: " << options_.max_pending_message_bytes
                              << " bytes of messages already wait for the receive handler (" << google::COUNTER
                              << " dropped so far)";
    return;
  }
  pending_message_bytes_.fetch_add(bytes, std::memory_order_relaxed);
  counters_.MessageReceived();
  std::vector<uint8_t> payload(frame->payload.begin(), frame->payload.end());
  ready_.push_back([this, bytes, from = std::move(frame->from), payload = std::move(payload)]() mutable {
    pending_message_bytes_.fetch_sub(bytes, std::memory_order_relaxed);
    DeliverMessage(std::move(from), std::move(payload));
  });
}

namespace {
// The receive handler slot whose call this thread is running, if any.
thread_local const void* running_recv_slot = nullptr;
}  // namespace

void DomainGroup::DeliverMessage(EngineAddress from, std::vector<uint8_t> payload) {
  std::shared_ptr<RecvSlot> slot;
  {
    std::lock_guard<std::mutex> lock(recv_mu_);
    slot = recv_handler_;
    if (!slot) {
      if (recv_backlog_.size() < options_.recv_backlog) {
        recv_backlog_.emplace_back(std::move(from), std::move(payload));
      } else {
        counters_.MessageDropped();
        LOG_EVERY_N(WARNING, 100) << "no receive handler set and the backlog of " << options_.recv_backlog
                                  << " messages is full; dropping";
      }
      return;
    }
    ++slot->calls;
  }
  const void* outer = running_recv_slot;
  running_recv_slot = slot.get();
  slot->handler(from, payload);
  running_recv_slot = outer;
  std::lock_guard<std::mutex> lock(recv_mu_);
  if (--slot->calls == 0) recv_idle_.notify_all();
}

void DomainGroup::SetRecvHandler(RecvHandler handler) {
  auto slot = handler ? std::make_shared<RecvSlot>(RecvSlot{std::move(handler)}) : nullptr;
  std::deque<std::pair<EngineAddress, std::vector<uint8_t>>> backlog;
  {
    std::unique_lock<std::mutex> lock(recv_mu_);
    std::shared_ptr<RecvSlot> old = std::exchange(recv_handler_, slot);
    if (slot) backlog.swap(recv_backlog_);
    // A call of the old handler may have begun just before the exchange:
    // its owner may go once this returns, so wait it out (but not a call
    // on this thread, which is the one replacing it).
    if (old) {
      const int mine = running_recv_slot == old.get() ? 1 : 0;
      recv_idle_.wait(lock, [&] { return old->calls <= mine; });
    }
  }
  if (!backlog.empty()) {
    // Through DeliverMessage, in order: by the time this runs the handler
    // may have been replaced or cleared again.
    callbacks_.Post([this, backlog = std::move(backlog)]() mutable {
      for (auto& [from, payload] : backlog) DeliverMessage(std::move(from), std::move(payload));
    });
  }
}

void DomainGroup::OnDomainError(const Status& status) { LOG(WARNING) << "domain error: " << status.ToString(); }

EngineStats DomainGroup::stats() const { return counters_.Snapshot(imm_counter_.dropped()); }

}  // namespace te
