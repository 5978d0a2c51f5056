// ImmCounter: counts arrivals per 32-bit immediate at the receiver.
//
// The receiver learns of data only through immediates: a write's payload is
// visible once its immediate is counted. Nothing assumes an order between
// writes, so a count is all a receiver needs ("4 shards of request 7 have
// landed").
//
// Counts are consumed: Expect(imm, n, cb) fires once when n arrivals are
// available and takes them; Wait and TryConsume do the same for blocking and
// polling callers. Arrivals before any expectation are kept, never lost,
// up to max_values distinct values tracked at once (see the constructor).
// Expectations on one immediate are served in the order registered. Use one
// style (callbacks, or Wait/TryConsume) per immediate value.
//
// Thread-safe. Callbacks are never run inside ImmCounter: they are handed
// back to the caller, which runs them on its callback thread, or on its
// worker for expectations registered as cheap (`on_worker`).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <span>
#include <unordered_map>
#include <vector>

#include "base/status.h"

namespace te {

class ImmCounter {
 public:
  using Callback = std::function<void()>;

  // Immediates come from peers: a peer could send every one of 2^32 values
  // once. At most `max_values` distinct values are tracked at a time (an
  // entry lives while it has unconsumed arrivals, expectations or waiters);
  // arrivals of a new value beyond that are dropped and counted (dropped()).
  explicit ImmCounter(size_t max_values = kDefaultMaxValues) : max_values_(max_values) {}
  static constexpr size_t kDefaultMaxValues = size_t(1) << 16;

  // Records arrivals; expectations they satisfy move their callbacks into
  // `ready`, or into `worker_ready` (when given) for those registered with
  // on_worker.
  void Add(std::span<const uint32_t> imms, std::vector<Callback>* ready, std::vector<Callback>* worker_ready = nullptr);
  void Add(uint32_t imm, uint64_t count, std::vector<Callback>* ready, std::vector<Callback>* worker_ready = nullptr);

  // Registers an expectation of `count` arrivals (count >= 1). If already
  // satisfied, its callback goes straight to `ready` (whatever `on_worker`
  // says: the caller's thread is not the worker).
  Status Expect(uint32_t imm, uint64_t count, Callback callback, std::vector<Callback>* ready, bool on_worker = false);

  // Blocks until `count` arrivals are available and consumes them, or
  // returns kTimeout naming how many had arrived.
  Status Wait(uint32_t imm, uint64_t count, std::chrono::nanoseconds timeout);

  // Consumes `count` arrivals if available; never blocks.
  bool TryConsume(uint32_t imm, uint64_t count);

  // Arrivals not yet consumed.
  uint64_t Available(uint32_t imm) const;
  // Drops everything known about `imm`: its pending expectations (their
  // callbacks never run) and its unconsumed arrivals, whose number it
  // returns. For a receiver abandoning an immediate it will not reuse (a
  // cancelled transfer), so that the table does not grow with such values.
  // A Wait blocked on `imm` keeps running and sees later arrivals only.
  uint64_t Forget(uint32_t imm);
  // Arrivals dropped because max_values distinct values were tracked.
  uint64_t dropped() const;
  // Distinct values tracked now.
  size_t tracked() const;

 private:
  struct Entry {
    uint64_t available = 0;
    int waiters = 0;  // Wait calls blocked on this entry: it must stay
    // Usually zero or one: a vector costs no allocation until used (a
    // deque allocates 512 bytes up front).
    struct Expectation {
      uint64_t count;
      Callback callback;
      bool on_worker;
    };
    std::vector<Expectation> expectations;
    bool idle() const { return available == 0 && waiters == 0 && expectations.empty(); }
  };
  using Map = std::unordered_map<uint32_t, Entry>;
  void Serve(Entry& e, std::vector<Callback>* ready, std::vector<Callback>* worker_ready);
  // Erases `it` if nothing refers to it any more, so the table holds only
  // live values.
  void EraseIfIdle(Map::iterator it);
  // The entry of an arriving value, made if fewer than max_values_ are
  // tracked; end() when the arrival must be dropped.
  Map::iterator FindOrTrack(uint32_t imm);

  const size_t max_values_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  int blocked_waiters_ = 0;
  std::atomic<uint64_t> dropped_{0};  // written under mu_, read without it
  Map entries_;
};

}  // namespace te
