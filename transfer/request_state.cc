#include "transfer/request_state.h"

namespace te {

void RequestState::Reset() {
  // A request of many pages leaves a large vector; keep only small ones.
  constexpr size_t kKeepWorks = 64, kKeepDsts = 64;
  if (works.capacity() > kKeepWorks)
    std::vector<Work>().swap(works);
  else
    works.clear();
  if (dsts.capacity() > kKeepDsts)
    std::vector<RemoteMr>().swap(dsts);
  else
    dsts.clear();
  outstanding = 0;
  posted = 0;
  failed = false;
  completion = Completion{};
  submitted = {};
  deadline = {};
  src = LocalMr{};
  peer = PeerRef{};
  prev = next = nullptr;
  list = nullptr;
  mpsc_next.store(nullptr, std::memory_order_relaxed);
}

void RequestList::PushBack(RequestState* r) {
  r->list = this;
  r->next = nullptr;
  r->prev = tail;
  if (tail)
    tail->next = r;
  else
    head = r;
  tail = r;
}

void RequestList::Remove(RequestState* r) {
  if (r->prev)
    r->prev->next = r->next;
  else
    head = r->next;
  if (r->next)
    r->next->prev = r->prev;
  else
    tail = r->prev;
  r->prev = r->next = nullptr;
  r->list = nullptr;
}

}  // namespace te
