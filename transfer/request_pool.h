// RequestPool: RequestStates recycled from one request to the next, so that
// a warm engine's Submit allocates no request state and its vectors keep
// their capacity (a request's state, its operations and its destinations
// were three allocations and three frees per request, about a fifth of the
// engine's CPU per small write).
//
// Get and Put may be called from any thread; the worker returns finished
// requests in batches (PutAll) to take the lock once per progress pass. At
// most `max_cached` states are kept; states whose vectors grew large (a
// request of thousands of pages) are trimmed before they are kept, so the
// pool never holds more than a few hundred KiB.
#pragma once

#include <cstddef>
#include <memory>
#include <mutex>
#include <vector>

#include "transfer/request_state.h"

namespace te {

class RequestPool {
 public:
  // Returns a state to its pool when a submission gives up before handing
  // it to the worker.
  struct Returner {
    RequestPool* pool;
    void operator()(RequestState* r) const { pool->Put(r); }
  };
  using Ptr = std::unique_ptr<RequestState, Returner>;

  explicit RequestPool(size_t max_cached = kDefaultMaxCached) : max_cached_(max_cached) {}
#if defined(__SANITIZE_ADDRESS__)
  // Under AddressSanitizer every state is freed, so that a stale pointer to
  // a finished request is caught rather than landing in a recycled one.
  static constexpr size_t kDefaultMaxCached = 0;
#else
  static constexpr size_t kDefaultMaxCached = 4096;
#endif
  ~RequestPool();
  RequestPool(const RequestPool&) = delete;
  RequestPool& operator=(const RequestPool&) = delete;

  // A state with every field at its default, from the pool when it has one.
  Ptr Get();
  // Resets `r` and keeps it (or deletes it beyond max_cached).
  void Put(RequestState* r);
  // Put for each, under one lock; empties `batch`.
  void PutAll(std::vector<RequestState*>* batch);

 private:
  const size_t max_cached_;
  std::mutex mu_;
  std::vector<RequestState*> free_;
};

}  // namespace te
