#include "transfer/request_pool.h"

namespace te {

RequestPool::~RequestPool() {
  for (RequestState* r : free_) delete r;
}

RequestPool::Ptr RequestPool::Get() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!free_.empty()) {
      RequestState* r = free_.back();
      free_.pop_back();
      return Ptr(r, Returner{this});
    }
  }
  return Ptr(new RequestState, Returner{this});
}

void RequestPool::Put(RequestState* r) {
  r->Reset();  // outside the lock: it releases callbacks and region references
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.size() < max_cached_) {
      free_.push_back(r);
      return;
    }
  }
  delete r;
}

void RequestPool::PutAll(std::vector<RequestState*>* batch) {
  if (batch->empty()) return;
  for (RequestState* r : *batch) r->Reset();
  size_t kept = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    while (kept < batch->size() && free_.size() < max_cached_) free_.push_back((*batch)[kept++]);
  }
  for (size_t i = kept; i < batch->size(); ++i) delete (*batch)[i];
  batch->clear();
}

}  // namespace te
