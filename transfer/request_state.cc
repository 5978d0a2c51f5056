#include "transfer/request_state.h"

namespace te {

void RequestState::Reset() {
  // A request of many pages leaves a large vector; keep only small ones.
  constexpr size_t kKeepWorks = 64, kKeepDsts = 64;
  // Small vectors keep their elements too: the next Submit or Send assigns
  // every field of those it uses, instead of constructing each Work anew.
  // A control message's buffer is released here, whatever its size.
  if (works.capacity() > kKeepWorks) {
    std::vector<Work>().swap(works);
  } else {
    for (Work& w : works)
      if (w.is_send) {
        std::vector<uint8_t>().swap(w.message);
        w.is_send = false;
      }
  }
  if (dsts.capacity() > kKeepDsts)
    std::vector<RemoteMr>().swap(dsts);
  else
    dsts.clear();
  outstanding = 0;
  posted = 0;
  failed = false;
  // Field by field: assigning a whole Completion{} builds and destroys two
  // std::function temporaries per request.
  completion.on_done = nullptr;
  completion.on_error = nullptr;
  completion.counter = nullptr;
  completion.on_worker = false;
  submitted = {};
  deadline = {};
  src.reset();
  peer.reset();
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
