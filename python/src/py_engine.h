// The engine as Python sees it: PyEngine over te::TransferEngine, and the
// objects it hands out (Region, RemoteRegion, Peer, Handle).
//
// The rule that shapes this file: no Python code ever runs on an engine
// thread, and no Python object is touched there. A completion callback only
// flips its handle's state under the engine's mutex, moves the handle from
// `pending_` to `finished_`, wakes waiters and (when asked) an eventfd. The
// Python objects a request keeps alive (the registered objects behind its
// regions) are released later, with the GIL held, when a Python call reaps
// `finished_`. So memory under DMA is never freed: not when the caller drops
// a handle, not when an asyncio future is cancelled.
#pragma once

#include <pybind11/pybind11.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "memory_view.h"
#include "transfer/transfer_engine.h"

namespace tepy {

class PyEngine;

// A registered region (Python: Region). Deregistered explicitly, or when the
// last reference goes (the Python object and every request that used it).
struct RegionState {
  std::shared_ptr<PyEngine> engine;
  te::LocalMr mr;
  MemoryView view;
  // Requests using this region that have not finished; written by engine
  // threads (decrement), read with the GIL.
  std::atomic<int64_t> inflight{0};
  ~RegionState();
};

// A peer's region, imported from its descriptor bytes (Python: RemoteRegion).
struct RemoteState {
  std::shared_ptr<PyEngine> engine;
  te::RemoteMr remote;
  std::string descriptor;  // the bytes it came from
};

// A peer engine (Python: Peer).
struct PeerState {
  std::shared_ptr<PyEngine> engine;
  te::PeerRef peer;
};

// One request's end (Python: Handle). `state` and `status` are written once,
// under the engine's mutex.
struct HandleState {
  enum State : int { kPending = 0, kDone = 1, kFailed = 2 };
  uint64_t id = 0;
  std::atomic<int> state{kPending};
  te::Status status;
  uint32_t remaining = 1;                             // engine requests still to finish (batches have more)
  bool watched = false;                               // an asyncio future waits on it
  std::vector<std::shared_ptr<RegionState>> regions;  // released with the GIL
  std::string payload;                                // what the request produced (KV context), if anything
  std::string kind;                                   // "write", "paged", ... for repr
};

struct Message {
  std::string from;  // sender's address bytes
  std::string data;
};

class PyEngine : public std::enable_shared_from_this<PyEngine> {
 public:
  explicit PyEngine(const te::EngineOptions& options);  // raises TransferError
  ~PyEngine();

  // The engine, or TransferError(CANCELLED) after close().
  te::TransferEngine* engine() const;
  void Close();
  bool closed() const { return engine_ == nullptr; }
  int fileno();

  // Registers `view` (consumed). GIL held.
  std::shared_ptr<RegionState> Register(MemoryView view);
  void Deregister(RegionState& region);

  // Starts a handle for a request that will finish `parts` times; the
  // regions' in-flight counts go up. GIL held.
  std::shared_ptr<HandleState> Begin(const char* kind, std::vector<std::shared_ptr<RegionState>> regions,
                                     uint32_t parts = 1);
  // The completion that finishes one part of `h`.
  te::Completion CompletionFor(HandleState* h);
  // Finishes one part of `h` (engine thread or caller).
  void Finish(HandleState* h, const te::Status& status);
  // Starts a handle and hands its completion to `post` (run with the GIL
  // released), which gives it to the engine. When `post` refuses, nothing
  // will call back: the handle ends and TransferError is raised.
  template <typename Post>
  std::shared_ptr<HandleState> Start(const char* kind, std::vector<std::shared_ptr<RegionState>> regions, Post post);
  // Start() for a request.
  std::shared_ptr<HandleState> Submit(const char* kind, te::Request request,
                                      std::vector<std::shared_ptr<RegionState>> regions);
  // Start() for an expectation of `count` arrivals of `imm`.
  std::shared_ptr<HandleState> ExpectImm(const char* kind, uint32_t imm, uint64_t count);
  // Releases finished handles' Python references. GIL held.
  size_t Reap();

  // Blocks until `h` finished or `timeout` (nullopt: forever) passed;
  // Ctrl-C raises KeyboardInterrupt. False on timeout. GIL held on entry.
  bool Wait(const HandleState& h, std::optional<double> timeout);
  // The same for every handle in `hs`.
  bool WaitAll(const std::vector<std::shared_ptr<HandleState>>& hs, std::optional<double> timeout);
  // kManual: one Progress() round. Returns handles finished since the last
  // poll (count).
  size_t Poll();

  // asyncio: marks `h` watched; its id shows up in DrainWatched() once
  // finished, and the eventfd is written.
  void Watch(const std::shared_ptr<HandleState>& h);
  std::vector<uint64_t> DrainWatched();

  // Received control messages (the engine's receive handler, unless a KV
  // plane took it over).
  std::optional<Message> TryRecv();
  std::optional<Message> Recv(std::optional<double> timeout);
  uint64_t messages_dropped() const;

  // A data plane (KvPrefiller, KvDecoder) takes over the receive handler and
  // holds the engine open; when the last one closes, recv() gets it back.
  void AttachPlane() { planes_.fetch_add(1); }
  void DetachPlane();

 private:
  void OnMessage(const te::EngineAddress& from, std::span<const uint8_t> data);
  void SignalLocked();
  // Waits for `done()` with the GIL released, in slices, checking signals.
  // With `spin`, first drives the engine on this thread for a short while,
  // polling `done()` (it must then be safe to call without the mutex).
  template <typename Pred>
  bool WaitFor(Pred done, std::optional<double> timeout, bool spin);

  std::unique_ptr<te::TransferEngine> engine_;
  bool manual_ = false;
  std::atomic<int> planes_{0};

  mutable std::mutex mu_;
  std::condition_variable cv_;
  uint64_t next_id_ = 1;
  std::unordered_map<uint64_t, std::shared_ptr<HandleState>> pending_;
  std::vector<std::shared_ptr<HandleState>> finished_;  // to reap with the GIL
  std::vector<uint64_t> watched_ready_;
  uint64_t finished_since_poll_ = 0;
  std::deque<Message> inbox_;
  size_t inbox_bytes_ = 0;
  uint64_t inbox_dropped_ = 0;
  int efd_ = -1;
  bool notify_ = false;  // write the eventfd on completions and messages
};

void BindEngine(pybind11::module_& m);

}  // namespace tepy
