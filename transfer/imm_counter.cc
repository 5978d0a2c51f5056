#include "transfer/imm_counter.h"

namespace te {

void ImmCounter::Serve(Entry& e, std::vector<Callback>* ready) {
  while (!e.expectations.empty() && e.available >= e.expectations.front().first) {
    e.available -= e.expectations.front().first;
    ready->push_back(std::move(e.expectations.front().second));
    e.expectations.pop_front();
  }
}

void ImmCounter::Add(std::span<const uint32_t> imms, std::vector<Callback>* ready) {
  if (imms.empty()) return;
  std::lock_guard<std::mutex> lock(mu_);
  for (uint32_t imm : imms) {
    Entry& e = entries_[imm];
    ++e.available;
    Serve(e, ready);
  }
  if (blocked_waiters_ > 0) cv_.notify_all();
}

void ImmCounter::Add(uint32_t imm, uint64_t count, std::vector<Callback>* ready) {
  std::lock_guard<std::mutex> lock(mu_);
  Entry& e = entries_[imm];
  e.available += count;
  Serve(e, ready);
  if (blocked_waiters_ > 0) cv_.notify_all();
}

Status ImmCounter::Expect(uint32_t imm, uint64_t count, Callback callback,
                          std::vector<Callback>* ready) {
  if (count == 0) return InvalidArgument("expected count for imm " + std::to_string(imm) +
                                         " is 0; it must be at least 1");
  if (!callback) return InvalidArgument("expectation for imm " + std::to_string(imm) +
                                        " has no callback");
  std::lock_guard<std::mutex> lock(mu_);
  Entry& e = entries_[imm];
  e.expectations.emplace_back(count, std::move(callback));
  Serve(e, ready);
  return Status::Ok();
}

Status ImmCounter::Wait(uint32_t imm, uint64_t count, std::chrono::nanoseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  ++blocked_waiters_;
  Entry* e = &entries_[imm];
  ++e->waiters;
  // unordered_map keeps element addresses stable across rehashing.
  bool ok = cv_.wait_for(lock, timeout, [&] { return e->available >= count; });
  --blocked_waiters_;
  --e->waiters;
  if (!ok) {
    return Timeout("waited for " + std::to_string(count) + " arrivals of imm " +
                   std::to_string(imm) + "; " + std::to_string(e->available) +
                   " arrived within the timeout");
  }
  e->available -= count;
  return Status::Ok();
}

bool ImmCounter::TryConsume(uint32_t imm, uint64_t count) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(imm);
  if (it == entries_.end() || it->second.available < count) return false;
  it->second.available -= count;
  return true;
}

uint64_t ImmCounter::Available(uint32_t imm) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(imm);
  return it == entries_.end() ? 0 : it->second.available;
}

uint64_t ImmCounter::Forget(uint32_t imm) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(imm);
  if (it == entries_.end()) return 0;
  const uint64_t dropped = it->second.available;
  if (it->second.waiters > 0) {
    it->second.available = 0;
    it->second.expectations.clear();
  } else {
    entries_.erase(it);
  }
  return dropped;
}

}  // namespace te
