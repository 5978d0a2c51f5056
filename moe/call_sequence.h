// CallSequence: the calling rules a dispatcher built from other dispatchers
// enforces (HierarchicalDispatcher, CoherentDispatcher): Connect first, then
// Dispatch and Combine strictly alternating, Combine with the handle of the
// pending dispatch, and after any failure nothing more (the group's
// immediate counts are out of step, so it must be rebuilt).
#pragma once

#include <cstdint>
#include <string>

#include "base/status.h"

namespace te::moe {

class CallSequence {
 public:
  void Connected() { connected_ = true; }

  // Checks a Dispatch may start now.
  Status CanDispatch() const {
    if (!connected_) return InvalidArgument("Dispatch/Combine before Connect");
    if (!failed_.ok()) return Unavailable("dispatcher failed earlier (" + failed_.ToString() + "); rebuild the group");
    if (pending_) return InvalidArgument("Dispatch called again before Combine of dispatch " + std::to_string(seq_));
    return Status::Ok();
  }
  // A dispatch succeeded: returns its sequence number, for its handle.
  uint64_t Dispatched() {
    pending_ = true;
    return ++seq_;
  }

  // Checks a Combine of the dispatch numbered `seq` may run now.
  Status CanCombine(uint64_t seq) const {
    if (!failed_.ok()) return Unavailable("dispatcher failed earlier (" + failed_.ToString() + "); rebuild the group");
    if (!pending_) return InvalidArgument("Combine without a pending Dispatch");
    if (seq != seq_)
      return InvalidArgument("Combine got the handle of dispatch " + std::to_string(seq) + "; the pending one is " +
                             std::to_string(seq_));
    return Status::Ok();
  }
  void Combined() { pending_ = false; }

  // Records the first failure (every later call is refused) and returns `s`.
  Status Fail(Status s) {
    if (failed_.ok()) failed_ = s;
    return s;
  }

 private:
  bool connected_ = false;
  bool pending_ = false;
  uint64_t seq_ = 0;  // dispatches done
  Status failed_;
};

}  // namespace te::moe
