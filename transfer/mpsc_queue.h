// A lock-free multi-producer, single-consumer intrusive queue (Vyukov):
// the submission path from application threads to the worker. Push is one
// atomic exchange; nothing allocates.
#pragma once

#include <atomic>

namespace te {

struct MpscNode {
  std::atomic<MpscNode*> mpsc_next{nullptr};
};

class MpscQueue {
 public:
  MpscQueue() : head_(&stub_), tail_(&stub_) {}

  // Any thread.
  void Push(MpscNode* node) {
    node->mpsc_next.store(nullptr, std::memory_order_relaxed);
    MpscNode* prev = head_.exchange(node, std::memory_order_acq_rel);
    prev->mpsc_next.store(node, std::memory_order_release);
  }

  // One consumer at a time (the engine: whoever holds the worker's role,
  // under a mutex). Returns nullptr when empty (or when a producer is
  // between its two steps; the node shows up on a later call).
  MpscNode* Pop() {
    MpscNode* tail = tail_.load(std::memory_order_relaxed);
    MpscNode* next = tail->mpsc_next.load(std::memory_order_acquire);
    if (tail == &stub_) {
      if (next == nullptr) return nullptr;
      tail_.store(next, std::memory_order_relaxed);
      tail = next;
      next = next->mpsc_next.load(std::memory_order_acquire);
    }
    if (next != nullptr) {
      tail_.store(next, std::memory_order_relaxed);
      return tail;
    }
    if (tail != head_.load(std::memory_order_acquire)) return nullptr;
    Push(&stub_);
    next = tail->mpsc_next.load(std::memory_order_acquire);
    if (next != nullptr) {
      tail_.store(next, std::memory_order_relaxed);
      return tail;
    }
    return nullptr;
  }

  // A hint for an idle check, from any thread (it may be stale).
  bool LooksEmpty() const {
    return tail_.load(std::memory_order_relaxed) == &stub_ &&
           stub_.mpsc_next.load(std::memory_order_acquire) == nullptr;
  }

 private:
  std::atomic<MpscNode*> head_;
  // Written by the consumer only; atomic so that LooksEmpty may read it
  // from another thread.
  std::atomic<MpscNode*> tail_;
  MpscNode stub_;
};

}  // namespace te
