#include "transfer/imm_counter.h"

namespace te {

void ImmCounter::Serve(Entry& e, std::vector<Callback>* ready, std::vector<Callback>* worker_ready) {
  size_t served = 0;
  while (served < e.expectations.size() && e.available >= e.expectations[served].count) {
    Entry::Expectation& x = e.expectations[served];
    e.available -= x.count;
    (x.on_worker && worker_ready ? worker_ready : ready)->push_back(std::move(x.callback));
    ++served;
  }
  e.expectations.erase(e.expectations.begin(), e.expectations.begin() + served);
}

ImmCounter::Map::iterator ImmCounter::FindOrTrack(uint32_t imm) {
  auto it = entries_.find(imm);
  if (it != entries_.end() || entries_.size() >= max_values_) return it;
  return entries_.emplace(imm, Entry{}).first;
}

void ImmCounter::EraseIfIdle(Map::iterator it) {
  if (it->second.idle()) entries_.erase(it);
}

void ImmCounter::Add(std::span<const uint32_t> imms, std::vector<Callback>* ready,
                     std::vector<Callback>* worker_ready) {
  if (imms.empty()) return;
  std::lock_guard<std::mutex> lock(mu_);
  for (uint32_t imm : imms) {
    auto it = FindOrTrack(imm);
    if (it == entries_.end()) {
      dropped_.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    ++it->second.available;
    Serve(it->second, ready, worker_ready);
    EraseIfIdle(it);
  }
  if (blocked_waiters_ > 0) cv_.notify_all();
}

void ImmCounter::Add(uint32_t imm, uint64_t count, std::vector<Callback>* ready, std::vector<Callback>* worker_ready) {
  if (count == 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = FindOrTrack(imm);
  if (it == entries_.end()) {
    dropped_.fetch_add(count, std::memory_order_relaxed);
    return;
  }
  it->second.available += count;
  Serve(it->second, ready, worker_ready);
  EraseIfIdle(it);
  if (blocked_waiters_ > 0) cv_.notify_all();
}

Status ImmCounter::Expect(uint32_t imm, uint64_t count, Callback callback, std::vector<Callback>* ready,
                          bool on_worker) {
  if (count == 0)
    return InvalidArgument("expected count for imm " + std::to_string(imm) + " is 0; it must be at least 1");
  if (!callback) return InvalidArgument("expectation for imm " + std::to_string(imm) + " has no callback");
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.try_emplace(imm).first;  // the caller's own expectations are not capped
  it->second.expectations.push_back({count, std::move(callback), on_worker});
  Serve(it->second, ready, nullptr);
  EraseIfIdle(it);
  return Status::Ok();
}

Status ImmCounter::Wait(uint32_t imm, uint64_t count, std::chrono::nanoseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  ++blocked_waiters_;
  // unordered_map keeps element addresses and iterators stable across
  // rehashing, and an entry with a waiter is never erased.
  auto it = entries_.try_emplace(imm).first;
  Entry* e = &it->second;
  ++e->waiters;
  bool ok = cv_.wait_for(lock, timeout, [&] { return e->available >= count; });
  --blocked_waiters_;
  --e->waiters;
  const uint64_t seen = e->available;
  if (ok) e->available -= count;
  EraseIfIdle(it);
  if (!ok) {
    return Timeout("waited for " + std::to_string(count) + " arrivals of imm " + std::to_string(imm) + "; " +
                   std::to_string(seen) + " arrived within the timeout");
  }
  return Status::Ok();
}

bool ImmCounter::TryConsume(uint32_t imm, uint64_t count) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(imm);
  if (it == entries_.end() || it->second.available < count) return false;
  it->second.available -= count;
  EraseIfIdle(it);
  return true;
}

uint64_t ImmCounter::Available(uint32_t imm) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(imm);
  return it == entries_.end() ? 0 : it->second.available;
}

uint64_t ImmCounter::dropped() const { return dropped_.load(std::memory_order_relaxed); }

size_t ImmCounter::tracked() const {
  std::lock_guard<std::mutex> lock(mu_);
  return entries_.size();
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
