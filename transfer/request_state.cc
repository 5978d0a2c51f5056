#include "transfer/request_state.h"

namespace te {

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
