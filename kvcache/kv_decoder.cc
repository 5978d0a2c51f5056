#include "kvcache/kv_decoder.h"

#include <glog/logging.h>

#include <algorithm>
#include <cstdio>
#include <set>

#include "kvcache/kv_plan.h"

namespace te::kvcache {

namespace {
using Clock = std::chrono::steady_clock;
constexpr uint32_t kTagBits = 24;
constexpr uint32_t kTagMask = (1u << kTagBits) - 1;
}  // namespace

uint64_t KvDecoder::MemoryBytes(const KvLayout& layout, const DecoderOptions& options) {
  return layout.region_bytes() + uint64_t(options.context_slots) * options.context_bytes;
}

KvDecoder::KvDecoder(TransferEngine* engine, const KvLayout& layout, uint32_t rank, uint8_t* memory,
                     const DecoderOptions& options)
    : engine_(engine), layout_(layout), rank_(rank), memory_(memory), options_(options) {}

Result<std::unique_ptr<KvDecoder>> KvDecoder::Create(TransferEngine* engine, const KvLayout& layout, uint32_t rank,
                                                     uint8_t* memory, const DecoderOptions& options) {
  if (!engine || !memory) return InvalidArgument("KvDecoder needs an engine and memory");
  if (engine->options().progress != ProgressMode::kThread)
    return InvalidArgument("KvDecoder needs an engine in ProgressMode::kThread");
  TE_RETURN_IF_ERROR(layout.Validate().WithContext("decode layout"));
  if (rank >= layout.tp)
    return InvalidArgument("decode rank " + std::to_string(rank) + " outside [0, " + std::to_string(layout.tp) + ")");
  if (options.imm_base & kTagMask)
    return InvalidArgument("DecoderOptions.imm_base " + std::to_string(options.imm_base) +
                           " has bits in the low 24, which carry the request tag");
  if (options.context_slots == 0 || options.context_bytes == 0)
    return InvalidArgument("DecoderOptions: context_slots and context_bytes must be at least 1");
  std::unique_ptr<KvDecoder> d(new KvDecoder(engine, layout, rank, memory, options));
  TE_ASSIGN_OR_RETURN(d->mr_, engine->RegisterMemory(memory, MemoryBytes(layout, options)));
  d->descriptor_hex_ = engine->Describe(*d->mr_).ToHex();
  for (uint32_t i = options.context_slots; i-- > 0;) d->free_context_slots_.push_back(i);
  KvDecoder* self = d.get();
  TE_RETURN_IF_ERROR(engine->ClaimRecvHandler(
      self, "KvDecoder", [self](const EngineAddress& from, std::span<const uint8_t> b) { self->OnMessage(from, b); }));
  d->thread_ = std::thread([self] { self->Run(); });
  return d;
}

KvDecoder::~KvDecoder() {
  guard_.Close();  // engine callbacks still queued find the decoder gone
  engine_->ReleaseRecvHandler(this);
  std::vector<std::pair<Request, uint64_t>> left;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    for (auto& [id, r] : requests_) {
      KvMessage c;
      c.kind = KvMessage::Kind::kCancel;
      c.request = id;
      c.rank = rank_;
      // Best effort at shutdown: a source that misses the CANCEL stops on
      // its own when this rank's heartbeats end (peer_timeout).
      for (auto& [rank, s] : r.sources) (void)engine_->Send(s.peer, c.Encode(), {});
      engine_->ForgetImm(imm(r.tag));
      r.outcome = Cancelled("decoder shut down with request " + std::to_string(id) + " in flight");
      left.emplace_back(std::move(r), id);
    }
    requests_.clear();
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  for (auto& due : due_) left.push_back(std::move(due));
  for (auto& [r, id] : left) r.on_ready(id, r.outcome, {});
}

std::span<const uint8_t> KvDecoder::ContextOf(uint32_t slot) const {
  return {memory_ + layout_.region_bytes() + uint64_t(slot) * options_.context_bytes, options_.context_bytes};
}

Status KvDecoder::Receive(uint64_t id, const KvInstanceInfo& prefill, std::vector<uint32_t> pages,
                          ReadyCallback on_ready) {
  if (!on_ready) return InvalidArgument("request " + std::to_string(id) + ": Receive needs an on_ready callback");
  if (pages.empty()) return InvalidArgument("request " + std::to_string(id) + ": no pages to receive into");
  TE_RETURN_IF_ERROR(CheckCompatible(prefill.layout, layout_));
  if (prefill.ranks.size() != prefill.layout.tp)
    return InvalidArgument("prefill instance '" + prefill.name + "' lists " + std::to_string(prefill.ranks.size()) +
                           " ranks for tp " + std::to_string(prefill.layout.tp));
  std::set<uint32_t> seen;
  for (uint32_t p : pages) {
    if (p >= layout_.pages)
      return InvalidArgument("request " + std::to_string(id) + ": page " + std::to_string(p) + " outside [0, " +
                             std::to_string(layout_.pages) + ")");
    if (!seen.insert(p).second)
      return InvalidArgument("request " + std::to_string(id) + ": page " + std::to_string(p) + " given twice");
  }
  TE_ASSIGN_OR_RETURN(uint64_t expected, ExpectedImms(prefill.layout, layout_, rank_, pages.size()));
  const auto source_ranks = SourceRanks(prefill.layout, layout_, rank_);

  Request r;
  r.expected = expected;
  r.on_ready = std::move(on_ready);
  std::vector<std::pair<uint32_t, PeerRef>> idle;
  for (uint32_t s = 0; s < prefill.layout.tp; ++s) {
    TE_ASSIGN_OR_RETURN(auto peer, engine_->Connect(prefill.ranks[s]));
    if (std::find(source_ranks.begin(), source_ranks.end(), s) == source_ranks.end())
      idle.emplace_back(s, peer);
    else
      r.sources[s] = Source{peer, prefill.ranks[s].ToHex()};
  }
  KvMessage pull;
  pull.kind = KvMessage::Kind::kPull;
  pull.request = id;
  pull.rank = rank_;
  pull.context_bytes = options_.context_bytes;
  pull.layout = layout_;
  pull.descriptor_hex = descriptor_hex_;
  pull.pages = std::move(pages);
  pull.source_layout = prefill.layout;
  pull.source_rank = source_ranks.empty() ? 0 : source_ranks.back();  // the longest PULL, for the size check

  std::lock_guard<std::mutex> lock(mu_);
  if (stop_) return Cancelled("decoder is shutting down");
  if (requests_.count(id)) return InvalidArgument("request " + std::to_string(id) + " is already in flight here");
  if (free_context_slots_.empty())
    return Unavailable("all " + std::to_string(options_.context_slots) + " context slots are in use; " +
                       std::to_string(requests_.size()) + " requests in flight");
  if (tags_.size() >= kTagMask) return Unavailable("every request tag is in flight");
  while (next_tag_ == 0 || tags_.count(next_tag_)) next_tag_ = (next_tag_ + 1) & kTagMask;
  r.tag = next_tag_;
  next_tag_ = (next_tag_ + 1) & kTagMask;
  r.context_slot = free_context_slots_.back();
  pull.imm = imm(r.tag);
  pull.context_offset = layout_.region_bytes() + uint64_t(r.context_slot) * options_.context_bytes;
  const auto bytes = pull.Encode();
  if (bytes.size() > engine_->max_message_bytes())
    return InvalidArgument("request " + std::to_string(id) + ": " + std::to_string(pull.pages.size()) +
                           " pages make a " + std::to_string(bytes.size()) + "-byte PULL, over the engine's " +
                           std::to_string(engine_->max_message_bytes()) + "-byte messages");
  free_context_slots_.pop_back();
  tags_[r.tag] = id;
  const uint32_t tag = r.tag;
  const auto now = Clock::now();
  r.created = now;
  // A PULL that cannot be delivered fails the request at once, rather than
  // after the first-contact grace: through on_error when it fails on the
  // way, or here when the engine refuses it outright (no callback then).
  std::vector<std::pair<uint32_t, Status>> refused;
  for (auto& [s, src] : r.sources) {
    pull.source_rank = s;
    Status sent = engine_->Send(src.peer, pull.Encode(),
                                {.on_error = [this, t = guard_.token(), id, tag, s = s](const Status& e) {
                                  CallbackGuard::Run(t, [&] { OnPullFailed(id, tag, s, e); });
                                }});
    if (!sent.ok()) refused.emplace_back(s, sent);
  }
  // The other prefill ranks hear that this rank needs nothing from them, so
  // they know when the request is served everywhere. Best effort: a rank
  // that misses it keeps the request until its own pull_timeout.
  pull.pages.clear();
  for (auto& [s, peer] : idle) {
    pull.source_rank = s;
    Status sent = engine_->Send(peer, pull.Encode(), {});
    if (!sent.ok()) {
      LOG_EVERY_N(WARNING, 100) << "kv decode rank " << rank_ << ": " << sent.ToString();
    }
  }
  auto& placed = requests_.emplace(id, std::move(r)).first->second;
  for (auto& [source, why] : refused) {
    auto& src = placed.sources[source];
    src.confirmed = src.silent = true;
    StopLocked(id, placed,
               Unavailable("cannot reach prefill rank " + std::to_string(source) + " for request " +
                           std::to_string(id) + ": " + why.ToString()));
  }
  Status s = engine_->ExpectImm(
      imm(tag), expected, [this, t = guard_.token(), id, tag] { CallbackGuard::Run(t, [&] { OnArrived(id, tag); }); });
  if (!s.ok()) StopLocked(id, requests_.at(id), s);
  return Status::Ok();
}

void KvDecoder::OnPullFailed(uint64_t id, uint32_t tag, uint32_t source, const Status& e) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = requests_.find(id);
  if (it == requests_.end() || it->second.tag != tag) return;
  auto& src = it->second.sources[source];
  src.confirmed = src.silent = true;
  StopLocked(id, it->second,
             Unavailable("cannot reach prefill rank " + std::to_string(source) + " for request " + std::to_string(id) +
                         ": " + e.ToString()));
  SweepLocked();
}

void KvDecoder::OnArrived(uint64_t id, uint32_t tag) {
  Request r;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = requests_.find(id);
    if (it == requests_.end() || it->second.tag != tag) return;  // already reported
    r = std::move(it->second);
    requests_.erase(it);
    tags_.erase(tag);
    engine_->ForgetImm(imm(tag));
    stats_.requests_ready++;
  }
  r.on_ready(id, Status::Ok(), ContextOf(r.context_slot));
  std::lock_guard<std::mutex> lock(mu_);
  free_context_slots_.push_back(r.context_slot);
}

Status KvDecoder::Cancel(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = requests_.find(id);
  if (it == requests_.end()) return NotFound("request " + std::to_string(id) + " is not in flight here");
  StopLocked(id, it->second, Cancelled("request " + std::to_string(id) + " cancelled"));
  SweepLocked();
  return Status::Ok();
}

void KvDecoder::StopLocked(uint64_t id, Request& r, Status outcome) {
  if (r.stopping) return;
  r.stopping = true;
  r.outcome = std::move(outcome);
  r.stop_since = Clock::now();
  KvMessage c;
  c.kind = KvMessage::Kind::kCancel;
  c.request = id;
  c.rank = rank_;
  const auto bytes = c.Encode();
  // Best effort: a source that cannot hear the CANCEL is silent, and
  // silence confirms it after peer_timeout (SweepLocked).
  for (auto& [rank, s] : r.sources)
    if (!s.confirmed) (void)engine_->Send(s.peer, bytes, {});
}

void KvDecoder::SweepLocked() {
  const auto now = Clock::now();
  for (auto it = requests_.begin(); it != requests_.end();) {
    Request& r = it->second;
    bool release = false;
    if (r.stopping) {
      bool all = true, silent = false;
      uint64_t delivered = 0;
      for (auto& [rank, s] : r.sources) {
        all = all && s.confirmed;
        silent = silent || s.silent;
        delivered += s.delivered;
      }
      // Every write a source reported delivered must have landed before the
      // pages are handed back; a silent source reports nothing.
      if (all && (silent || engine_->ImmAvailable(imm(r.tag)) >= delivered))
        release = true;
      else if (all && now - r.stop_since > options_.peer_timeout) {
        r.outcome = r.outcome.WithContext("only " + std::to_string(engine_->ImmAvailable(imm(r.tag))) + " of " +
                                          std::to_string(delivered) + " delivered writes landed within the timeout");
        release = true;
      }
    }
    if (!release) {
      ++it;
      continue;
    }
    engine_->ForgetImm(imm(r.tag));
    tags_.erase(r.tag);
    if (r.outcome.code() == StatusCode::kCancelled)
      stats_.requests_cancelled++;
    else
      stats_.requests_failed++;
    due_.emplace_back(std::move(r), it->first);
    it = requests_.erase(it);
  }
  if (!due_.empty()) cv_.notify_all();
}

void KvDecoder::OnMessage(const EngineAddress& from, std::span<const uint8_t> data) {
  auto m = KvMessage::Decode(data);
  if (!m.ok()) {
    // Rate-limited: a peer sending garbage must not flood the log.
    LOG_EVERY_N(WARNING, 100) << "kv decode rank " << rank_ << ": ignoring a message (" << google::COUNTER
                              << " so far): " << m.status().ToString();
    return;
  }
  const std::string hex = from.ToHex();
  std::lock_guard<std::mutex> lock(mu_);
  last_heard_[hex] = Clock::now();
  if (m->kind != KvMessage::Kind::kCancelled && m->kind != KvMessage::Kind::kFailed) return;
  auto it = requests_.find(m->request);
  if (it == requests_.end()) return;
  Request& r = it->second;
  auto s = r.sources.find(m->rank);
  if (s == r.sources.end() || s->second.peer_hex != hex) return;
  s->second.confirmed = true;
  s->second.delivered = m->delivered;
  if (m->kind == KvMessage::Kind::kFailed)
    StopLocked(m->request, r,
               Unavailable("prefill rank " + std::to_string(m->rank) + " failed request " + std::to_string(m->request) +
                           ": " + m->reason));
  else
    StopLocked(
        m->request, r,
        Cancelled("request " + std::to_string(m->request) + " cancelled by prefill rank " + std::to_string(m->rank)));
  SweepLocked();
}

void KvDecoder::Run() {
  auto next_beat = Clock::now();
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    cv_.wait_until(lock, next_beat, [&] { return stop_ || !due_.empty(); });
    if (stop_) break;
    if (!due_.empty()) {
      auto due = std::move(due_);
      due_.clear();
      lock.unlock();
      for (auto& [r, id] : due) r.on_ready(id, r.outcome, {});
      lock.lock();
      for (auto& [r, id] : due) free_context_slots_.push_back(r.context_slot);
      continue;
    }
    if (Clock::now() < next_beat) continue;
    next_beat = Clock::now() + options_.heartbeat_interval;
    const auto now = Clock::now();
    std::set<std::string> beaten;
    KvMessage hb;
    hb.rank = rank_;
    const auto hb_bytes = hb.Encode();
    for (auto& [id, r] : requests_) {
      // Data landing proves its senders alive, even when their heartbeats
      // queue behind a long backlog of writes.
      const uint64_t arrived = engine_->ImmAvailable(imm(r.tag));
      if (arrived != r.arrived) {
        r.arrived = arrived;
        for (auto& [rank, s] : r.sources) last_heard_[s.peer_hex] = now;
      }
      for (auto& [rank, s] : r.sources) {
        if (s.confirmed) continue;
        // A heartbeat that cannot go is what the peer's timeout is for.
        if (beaten.insert(s.peer_hex).second) (void)engine_->Send(s.peer, hb_bytes, {});
        // Alive: heard from lately; or, not heard from since this request
        // began, still within the first-contact grace (a first connection
        // can be slow to set up; an unreachable one fails the PULL).
        auto heard = last_heard_.find(s.peer_hex);
        const bool heard_since = heard != last_heard_.end() && heard->second >= r.created;
        if (heard != last_heard_.end() && now - heard->second <= options_.peer_timeout) continue;
        if (!heard_since && now - r.created <= std::max(options_.peer_timeout, engine_->options().request_timeout))
          continue;
        s.confirmed = s.silent = true;
        StopLocked(id, r,
                   Unavailable("prefill rank " + std::to_string(rank) + " silent for more than " +
                               std::to_string(options_.peer_timeout.count()) + " ms; request " + std::to_string(id) +
                               " failed"));
      }
    }
    SweepLocked();
  }
}

DecoderStats KvDecoder::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

size_t KvDecoder::active_requests() const {
  std::lock_guard<std::mutex> lock(mu_);
  return requests_.size();
}

}  // namespace te::kvcache
