#include "weightsync/weight_receiver.h"

#include <glog/logging.h>

#include <algorithm>
#include <cstdio>
#include <iterator>

#include "base/stop_and_join.h"

namespace te::weightsync {

Result<std::unique_ptr<WeightReceiver>> WeightReceiver::Create(TransferEngine* engine, const ShardLayout& dst,
                                                               uint32_t rank, uint32_t sources, WeightsMemory* memory,
                                                               const ReceiverOptions& options) {
  if (!engine || !memory) return InvalidArgument("WeightReceiver needs an engine and memory");
  if (rank >= dst.ranks())
    return InvalidArgument("receiver rank " + std::to_string(rank) + " outside [0, " + std::to_string(dst.ranks()) +
                           ")");
  if (sources == 0) return InvalidArgument("a weight update needs at least one source");
  if (memory->slot_bytes() < dst.RegionBytes(rank))
    return InvalidArgument("weights memory slot of " + std::to_string(memory->slot_bytes()) +
                           " bytes is smaller than rank " + std::to_string(rank) + "'s " +
                           std::to_string(dst.RegionBytes(rank)) + " bytes of shards");
  std::unique_ptr<WeightReceiver> r(new WeightReceiver(engine, rank, sources, dst.RegionBytes(rank), memory, options));
  TE_ASSIGN_OR_RETURN(LocalMr mr, engine->RegisterMemory(memory->slots(), 2 * memory->slot_bytes()));
  r->info_ = "tews1 " + std::to_string(rank) + " " + std::to_string(memory->slot_bytes()) + " " +
             engine->Describe(*mr).ToHex();
  r->mrs_.push_back(std::move(mr));
  return Start(std::move(r));
}

Result<std::unique_ptr<WeightReceiver>> WeightReceiver::CreateNamed(TransferEngine* engine, const ShardLayout& dst,
                                                                    uint32_t rank, uint32_t sources,
                                                                    const std::vector<TensorMap>& sets,
                                                                    const ReceiverOptions& options) {
  if (!engine) return InvalidArgument("WeightReceiver needs an engine");
  if (sources == 0) return InvalidArgument("a weight update needs at least one source");
  if (sets.size() != 1 && sets.size() != 2)
    return InvalidArgument(std::to_string(sets.size()) +
                           " sets of tensors; give 1 (in place) or 2 (double buffered: version v lands in set v % 2)");
  for (size_t s = 0; s < sets.size(); ++s)
    TE_RETURN_IF_ERROR(CheckTensorMap(dst, rank, sets[s]).WithContext("tensor set " + std::to_string(s)));
  // The header (published, begun, failed) lives in memory of our own.
  TE_ASSIGN_OR_RETURN(std::unique_ptr<WeightsMemory> header, WeightsMemory::Create("", 64));
  std::unique_ptr<WeightReceiver> r(
      new WeightReceiver(engine, rank, sources, dst.RegionBytes(rank), header.get(), options));
  r->own_memory_ = std::move(header);
  // "tews2 <rank> <slots> <extents> (<slot> <region offset> <length> <descriptor>)*":
  // each parameter shard is its own registered extent of the rank's region.
  std::string extents;
  size_t n = 0;
  const ModelSpec& model = dst.model();
  for (size_t s = 0; s < sets.size(); ++s)
    for (size_t p = 0; p < model.params.size(); ++p) {
      const uint64_t bytes = dst.ShardBytes(p, rank);
      if (bytes == 0) continue;
      const NamedTensor& t = sets[s].at(model.params[p].name);
      auto mr = engine->RegisterMemory(t.data, t.bytes, t.memory);
      if (!mr.ok()) return mr.status().WithContext("registering tensor '" + model.params[p].name + "'");
      extents += " " + std::to_string(s) + " " + std::to_string(dst.ParamOffset(p, rank)) + " " +
                 std::to_string(bytes) + " " + engine->Describe(**mr).ToHex();
      r->mrs_.push_back(std::move(*mr));
      ++n;
    }
  r->info_ = "tews2 " + std::to_string(rank) + " " + std::to_string(sets.size()) + " " + std::to_string(n) + extents;
  return Start(std::move(r));
}

Result<std::unique_ptr<WeightReceiver>> WeightReceiver::Start(std::unique_ptr<WeightReceiver> r) {
  WeightReceiver* self = r.get();
  TE_RETURN_IF_ERROR(r->engine_->ClaimRecvHandler(
      self, "WeightReceiver",
      [self](const EngineAddress& from, std::span<const uint8_t> data) { self->OnMessage(from, data); }));
  r->thread_ = std::thread([self] { self->Run(); });
  return r;
}

WeightReceiver::~WeightReceiver() {
  StopAndJoin(mu_, cv_, stop_, thread_);
  engine_->ReleaseRecvHandler(this);
}

std::string WeightReceiver::Info() const { return info_; }

// BEGIN -> READY or REFUSED (control_messages.h).
void WeightReceiver::OnMessage(const EngineAddress& from, std::span<const uint8_t> data) {
  // Rate-limited: a peer sending garbage must not flood the log.
  auto drop = [&](const std::string& why) {
    LOG_EVERY_N(WARNING, 100) << "weightsync receiver " << rank_ << ": dropped a control message (" << google::COUNTER
                              << " so far): " << why;
  };
  auto parsed = ParseBegin(data);
  if (!parsed.ok()) return drop(parsed.status().ToString());
  // What only this receiver can bound: a source it does not have, or more
  // writes than its shards have bytes, would hold the version open until
  // the timeout (or wrap the expected count).
  if (parsed->source >= sources_)
    return drop("BEGIN from source rank " + std::to_string(parsed->source) + "; this update has " +
                std::to_string(sources_) + " sources");
  if (parsed->writes > region_bytes_)
    return drop("BEGIN announces " + std::to_string(parsed->writes) + " writes into " + std::to_string(region_bytes_) +
                " bytes of shards");
  const Begin begin{*parsed, from};
  std::string reply;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // A later version waits until the one in flight is done: it will write
    // into the slot of the last complete version, which must stay readable
    // until its successor is complete.
    if (!pending_.empty() && pending_.begin()->first < begin.version) {
      if (!DeferLocked(begin))
        return drop("BEGIN of version " + std::to_string(begin.version) + ": " + std::to_string(deferred_.size()) +
                    " BEGINs of earlier versions already wait");
    } else {
      if (!pending_.count(begin.version) && pending_.size() >= kMaxPendingVersions &&
          !EvictHighestLocked(begin.version))
        return drop("BEGIN of version " + std::to_string(begin.version) + ": " + std::to_string(pending_.size()) +
                    " earlier versions already pending");
      reply = AcceptLocked(begin);
    }
  }
  cv_.notify_all();
  Reply(from, reply);
}

// The queues are bounded, and a full one keeps the lowest versions: the
// sources of a job push versions in order, one ahead of the receiver at
// most, so what is far ahead is a peer misbehaving, and what the next
// update needs is never the one pushed out.
bool WeightReceiver::DeferLocked(const Begin& b) {
  for (const Begin& d : deferred_)
    if (d.version == b.version && d.source == b.source) return true;  // a repeat: the first one stands
  if (deferred_.size() < MaxDeferredBegins()) {
    deferred_.push_back(b);
    return true;
  }
  auto highest = std::max_element(deferred_.begin(), deferred_.end(),
                                  [](const Begin& x, const Begin& y) { return x.version < y.version; });
  if (highest->version <= b.version) return false;
  *highest = b;
  return true;
}

bool WeightReceiver::EvictHighestLocked(uint64_t version) {
  // Never the lowest: Run may be waiting for its writes.
  if (pending_.size() < 2) return false;
  auto highest = std::prev(pending_.end());
  if (highest->first <= version) return false;
  LOG_EVERY_N(WARNING, 100) << "weightsync receiver " << rank_ << ": gave up pending version " << highest->first
                            << " for version " << version << " (" << kMaxPendingVersions << " pending at most)";
  pending_.erase(highest);
  return true;
}

std::string WeightReceiver::AcceptLocked(const Begin& b) {
  WeightsHeader* h = memory_->header();
  const uint64_t published = h->published.load();
  if (b.version <= published)
    return EncodeAnswer({.ready = false, .version = b.version, .rank = rank_, .published = published});
  // Raise `begun` before anyone may write: readers of slot v % 2 retry.
  uint64_t begun = h->begun.load();
  while (begun < b.version && !h->begun.compare_exchange_weak(begun, b.version, std::memory_order_release)) {
  }
  Pending& p = pending_[b.version];
  if (p.sources.empty()) p.first_begin = std::chrono::steady_clock::now();
  // Saturating: each count is bounded by the shards' bytes, their sum by
  // nothing a peer chooses.
  if (p.sources.insert(b.source).second)
    p.expected = b.writes > ~uint64_t(0) - p.expected ? ~uint64_t(0) : p.expected + b.writes;
  return EncodeAnswer({.ready = true, .version = b.version, .rank = rank_});
}

void WeightReceiver::Reply(const EngineAddress& to, const std::string& reply) {
  if (reply.empty()) return;
  auto peer = engine_->Connect(to);
  if (!peer.ok()) return;
  std::vector<uint8_t> bytes(reply.begin(), reply.end());
  // Best effort: a source that never hears READY fails the version on its
  // own deadline, and the last complete version stays readable.
  Status sent = engine_->Send(*peer, bytes, {});
  if (!sent.ok()) {
    LOG_EVERY_N(WARNING, 100) << "weightsync receiver " << rank_ << ": reply not sent: " << sent.ToString();
  }
}

// Waits for `expected` immediates of `version`. The timeout is on progress
// (no new write for that long), not on the whole update, which may take
// longer than the timeout when the model is large.
Status WeightReceiver::AwaitWrites(uint64_t version, uint64_t expected) {
  const uint32_t imm = options_.imm_base | uint32_t(version & 0xffff);
  uint64_t seen = engine_->ImmAvailable(imm);
  auto last_progress = std::chrono::steady_clock::now();
  while (true) {
    const Status s = engine_->WaitImm(imm, expected, std::chrono::milliseconds(5));
    if (s.ok()) return s;
    if (s.code() != StatusCode::kTimeout) return s.WithContext("version " + std::to_string(version));
    const uint64_t now_seen = engine_->ImmAvailable(imm);
    if (now_seen != seen) {
      seen = now_seen;
      last_progress = std::chrono::steady_clock::now();
    } else if (std::chrono::steady_clock::now() - last_progress > options_.timeout) {
      return Timeout("version " + std::to_string(version) + ": " + std::to_string(seen) + " of " +
                     std::to_string(expected) + " writes arrived, none in the last " +
                     std::to_string(options_.timeout.count()) + " ms");
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return Cancelled("receiver shutting down");
  }
}

void WeightReceiver::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    if (pending_.empty()) {
      cv_.wait_for(lock, std::chrono::milliseconds(100));
      continue;
    }
    auto it = pending_.begin();
    const uint64_t version = it->first;
    Status result;
    if (it->second.sources.size() < sources_) {
      // Wait for the other sources' BEGIN, up to the timeout.
      if (std::chrono::steady_clock::now() - it->second.first_begin < options_.timeout) {
        cv_.wait_for(lock, std::chrono::milliseconds(20));
        continue;
      }
      result = Timeout("version " + std::to_string(version) + ": " + std::to_string(it->second.sources.size()) +
                       " of " + std::to_string(sources_) + " sources began within " +
                       std::to_string(options_.timeout.count()) + " ms");
    } else {
      const uint64_t expected = it->second.expected;
      lock.unlock();
      result = AwaitWrites(version, expected);
      lock.lock();
    }
    WeightsHeader* h = memory_->header();
    if (result.ok()) {
      h->published.store(version, std::memory_order_release);
      h->updates.fetch_add(1);
    } else {
      h->failed.store(version);
    }
    pending_.erase(version);
    // Deferred BEGINs of later versions may go ahead now.
    std::vector<std::pair<EngineAddress, std::string>> replies;
    for (auto d = deferred_.begin(); d != deferred_.end();) {
      if (pending_.empty() || pending_.begin()->first >= d->version) {
        replies.emplace_back(d->from, AcceptLocked(*d));
        d = deferred_.erase(d);
      } else {
        ++d;
      }
    }
    lock.unlock();
    for (const auto& [to, reply] : replies) Reply(to, reply);
    if (options_.on_version) options_.on_version(version, result);
    lock.lock();
  }
}

}  // namespace te::weightsync
