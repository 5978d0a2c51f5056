// RequestState: one accepted request as the worker tracks it, and the
// operations (Work) it was planned into.
//
// Ownership: a RequestState is taken from the group's RequestPool by
// TransferEngine::Submit (or Send), handed to the worker through the MPSC
// queue, and from then on touched only by the worker, which returns it to
// the pool once every operation it posted came back (a timed-out request
// whose operations never return is freed at shutdown).
#pragma once

#include <chrono>
#include <cstdint>
#include <vector>

#include "nic/domain.h"
#include "transfer/completion.h"
#include "transfer/memory_region.h"
#include "transfer/mpsc_queue.h"
#include "transfer/remote_region.h"

namespace te {

struct RequestState;

// One operation on one domain: a write, or a control message.
struct Work {
  RequestState* req = nullptr;
  uint32_t domain = 0;
  bool is_send = false;
  nic::WriteOp op;               // writes
  nic::PeerAddr send_peer = 0;   // sends
  uint64_t peer_id = 0;          // Peer::id(), for per-peer statistics
  std::vector<uint8_t> message;  // sends: header + payload
};

// Submit records the time of one request in this many per submitting thread
// (its first included) for the latency statistics.
inline constexpr uint32_t kLatencySampleEvery = 16;

struct RequestState : MpscNode {
  std::vector<Work> works;
  uint32_t outstanding = 0;  // works not yet back (queued or posted)
  uint32_t posted = 0;       // works the domains accepted
  bool failed = false;       // on_error already reported
  Completion completion;
  // When Submit took it, for the latency statistics; only sampled requests
  // carry one (the epoch otherwise).
  std::chrono::steady_clock::time_point submitted;
  // Until the first work is posted: request_timeout after the worker took
  // the request in, after which it is withdrawn (kNotPosted). From then on:
  // first post + request_timeout, after which the outcome is unknown
  // (kTimeout).
  std::chrono::steady_clock::time_point deadline;
  // Keep what the writes point at alive until they are back.
  LocalMr src;
  std::vector<RemoteMr> dsts;
  PeerRef peer;
  // Intrusive list links (queued, live or zombie list), worker only.
  RequestState* prev = nullptr;
  RequestState* next = nullptr;
  struct RequestList* list = nullptr;

  // Every field back to its default, keeping the vectors' capacity unless
  // it grew large (RequestPool). `works` keeps its elements (stale, not
  // sends): whoever takes the state sizes it and assigns every field of
  // each Work it uses.
  void Reset();
};

struct RequestList {
  RequestState* head = nullptr;
  RequestState* tail = nullptr;
  void PushBack(RequestState* r);
  void Remove(RequestState* r);
};

}  // namespace te
