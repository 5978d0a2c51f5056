// DomainGroup: the domains (NICs) serving one GPU and the worker that posts
// and polls them. Internal to transfer/; the public face is TransferEngine.
// Requests arrive as RequestStates (request_state.h, which says who owns
// them); control messages leave and arrive as frames (control_channel.h);
// counters live in EngineCounters (engine_stats.h).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "nic/domain.h"
#include "transfer/callback_executor.h"
#include "transfer/control_channel.h"
#include "transfer/engine_options.h"
#include "transfer/engine_stats.h"
#include "transfer/imm_counter.h"
#include "transfer/mpsc_queue.h"
#include "transfer/mr_descriptor.h"
#include "transfer/request_pool.h"
#include "transfer/request_state.h"

namespace te {

class DomainGroup final : private nic::CompletionHandler {
 public:
  DomainGroup(const EngineOptions& options, std::vector<std::shared_ptr<nic::Domain>> domains);
  ~DomainGroup() override;

  void Start();  // starts the worker (kThread mode)

  const std::vector<std::shared_ptr<nic::Domain>>& domains() const { return domains_; }
  // The largest single write every domain takes, at most 1 GiB (well inside
  // every provider's limit). Fixed at construction: Submit reads it per
  // request.
  uint64_t max_write_bytes() const { return max_write_bytes_; }

  // Reserves room for `operations` more queued or in-flight operations;
  // kResourceExhausted when EngineOptions::max_queued_operations would be
  // exceeded. Every reservation is released when its request finishes.
  Status Admit(size_t operations);
  // Hands a fully planned (and admitted) request to the worker.
  void Enqueue(RequestState* request);

  // Where Submit and Send take their RequestStates; the worker gives them
  // back as requests finish.
  RequestPool& request_pool() { return pool_; }
  ImmCounter& imm_counter() { return imm_counter_; }
  CallbackExecutor& callbacks() { return callbacks_; }

  void set_local_address(std::vector<uint8_t> serialized) { local_address_ = std::move(serialized); }
  const std::vector<uint8_t>& local_address() const { return local_address_; }
  // Replaces the receive handler (nullptr: none; messages wait in a bounded
  // backlog). Returns once no call of the handler it replaces is running,
  // except a call on this very thread (a handler replacing itself).
  void SetRecvHandler(RecvHandler handler);

  bool Progress();  // kManual mode

  // kThread mode: the calling thread takes the worker's role while it waits,
  // for at most `until`: it posts, polls and runs ready cheap callbacks
  // itself, and the worker steps aside (naps) meanwhile. A thread about to
  // wait for an event microseconds away then needs no wake-up, and the two
  // threads do not both spin on a small host. Returns as soon as `done()`
  // holds (true), or false at `until`; the worker resumes after.
  bool DriveUntil(const std::function<bool()>& done, std::chrono::steady_clock::time_point until);
  // True on a thread that holds the worker's role right now (the worker of
  // any engine, or a driver): what must not block there is refused instead
  // (TransferEngine::WaitImm).
  static bool OnWorkerThread();
  EngineStats stats() const;

  // Bytes the control frame adds to every message (control_channel.h).
  size_t message_header_bytes() const { return ControlOverhead(local_address_.size()); }

 private:
  bool ProgressOnce();
  void WorkerLoop();
  void Nap(std::chrono::microseconds nap);  // the worker sleeps until woken or `nap` passed
  void WakeWorker();
  void Accept(RequestState* r);
  bool PostPending(size_t d);
  bool PostQueue(size_t d, std::deque<Work*>& queue);
  void Posted(size_t d, Work* w);  // counts a work the domain accepted
  void CompleteWork(Work* w, const Status& status);
  void Fail(RequestState* r, const Status& status);
  void Finish(RequestState* r);
  void CheckTimeouts(std::chrono::steady_clock::time_point now);
  std::chrono::steady_clock::time_point Now();
  void DeliverMessage(EngineAddress from, std::vector<uint8_t> payload);
  void FlushReady();
  void RunOnWorker();  // the cheap callbacks in worker_ready_, timed
  // True while a driver's lease runs; reads the clock only when one was taken.
  bool LeaseHeld() const;

  // nic::CompletionHandler, called from Poll on the worker.
  void OnSendDone(void* context) override;
  void OnSendError(void* context, const Status& status) override;
  void OnImm(uint32_t imm) override;
  void OnRecv(std::span<const uint8_t> data) override;
  void OnDomainError(const Status& status) override;

  const EngineOptions options_;
  std::vector<std::shared_ptr<nic::Domain>> domains_;
  std::vector<size_t> max_inflight_;
  uint64_t max_write_bytes_ = uint64_t(1) << 30;
  std::vector<uint8_t> local_address_;

  RequestPool pool_;  // declared before (so destroyed after) the lists that point into it
  MpscQueue submissions_;
  // The worker's role: whoever holds it runs ProgressOnce and owns the
  // worker-only state below (the worker thread, or a thread in DriveUntil).
  std::mutex progress_mu_;
  std::atomic<int> drivers_{0};  // threads in DriveUntil: the worker naps
  // After a successful drive the role stays with the application for a few
  // microseconds (steady-clock ns): a caller that answers and waits again
  // (a ping-pong) keeps driving, and its Submit wakes nobody.
  std::atomic<int64_t> lease_until_ns_{0};  // 0: no lease
  static constexpr std::chrono::microseconds kDriverLease{20};
  std::atomic<bool> stop_{false};
  std::atomic<uint32_t> wake_word_{0};
  std::atomic<bool> sleeping_{false};
  std::thread worker_;

  // Worker-only state.
  static constexpr size_t kMaxChain = 32;  // writes posted in one call
  std::vector<nic::WriteOp> chain_ops_;    // scratch of PostQueue
  std::vector<Work*> chain_works_;
  std::vector<std::deque<Work*>> pending_;           // writes, per domain
  std::vector<std::deque<Work*>> pending_messages_;  // control messages, posted first
  std::vector<size_t> inflight_;
  // Every list is in deadline order: queued_ by submission, live_ by first
  // post, and deadlines add the same timeout to both.
  RequestList queued_;   // accepted, nothing posted yet
  RequestList live_;     // at least one work posted
  RequestList zombies_;  // failed, waiting for posted writes to come back
  // The time as of this progress pass, read at most once per pass (Now()).
  std::chrono::steady_clock::time_point now_;
  bool now_fresh_ = false;
  uint32_t idle_passes_ = 0;
  std::atomic<size_t> admitted_ops_{0};
  size_t finished_ops_ = 0;                       // worker: operations of requests finished in this pass
  std::atomic<size_t> pending_message_bytes_{0};  // received, not yet handed to the handler
  std::vector<uint32_t> imm_batch_;
  uint64_t imms_dropped_seen_ = 0;
  std::vector<ImmCounter::Callback> ready_;         // for the callback thread
  std::vector<ImmCounter::Callback> worker_ready_;  // declared cheap: run here
  std::vector<ImmCounter::Callback> running_;       // scratch of RunOnWorker
  std::vector<RequestState*> finished_;             // back to pool_ at the end of the pass
  std::chrono::steady_clock::time_point next_timeout_check_;

  ImmCounter imm_counter_;
  CallbackExecutor callbacks_;

  // The receive handler and the calls of it running now: SetRecvHandler
  // returns only once the handler it replaces has no call left running, so
  // a plane that released it may be destroyed at once.
  struct RecvSlot {
    RecvHandler handler;
    int calls = 0;  // under recv_mu_
  };
  std::mutex recv_mu_;
  std::condition_variable recv_idle_;
  std::shared_ptr<RecvSlot> recv_handler_;
  std::deque<std::pair<EngineAddress, std::vector<uint8_t>>> recv_backlog_;

  EngineCounters counters_;
};

}  // namespace te
