#include "kvcache/kv_prefiller.h"

#include <glog/logging.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <deque>
#include <set>

#include "base/checked_math.h"

namespace te::kvcache {

namespace {
using Clock = std::chrono::steady_clock;
}  // namespace

struct KvPrefiller::Dest {
  std::string peer_hex;
  PeerRef peer;
  RemoteMr remote;
  KvLayout layout;
  uint32_t rank = 0;
  std::vector<uint32_t> pages;
  uint32_t imm = 0;
  uint64_t context_offset = 0, context_bytes = 0;
  PageRuns runs;
  bool context_source = false;
  std::vector<bool> layer_sent;
  bool context_sent = false;
  uint64_t outstanding = 0;  // writes submitted, not completed
  uint64_t delivered = 0;    // immediates of writes that completed
  enum class State { kActive, kCancelling, kFailing, kDone } state = State::kActive;
  std::string why;  // kFailing: the reason sent in FAILED
};

struct KvPrefiller::Request {
  std::vector<uint32_t> pages;
  bool started = false;
  std::vector<bool> layer_done;
  bool finished = false;
  Clock::time_point finished_at;
  int64_t context_slot = -1;
  uint64_t context_len = 0;
  std::map<std::string, std::unique_ptr<Dest>> dests;  // by "<address hex>/<rank>"
  int64_t expected_dests = -1;                         // known from the first PULL
  Status status;                                       // first failure, reported by on_sent
  bool aborted = false;
  bool announced = false;  // on_pull ran
};

uint64_t KvPrefiller::MemoryBytes(const KvLayout& layout, const PrefillerOptions& options) {
  return layout.region_bytes() + uint64_t(options.context_slots) * options.context_bytes;
}

KvPrefiller::KvPrefiller(TransferEngine* engine, const KvLayout& layout, uint32_t rank, uint8_t* memory,
                         const PrefillerOptions& options)
    : engine_(engine), layout_(layout), rank_(rank), memory_(memory), options_(options) {}

Result<std::unique_ptr<KvPrefiller>> KvPrefiller::Create(TransferEngine* engine, const KvLayout& layout, uint32_t rank,
                                                         uint8_t* memory, const PrefillerOptions& options) {
  if (!engine || !memory) return InvalidArgument("KvPrefiller needs an engine and memory");
  if (engine->options().progress != ProgressMode::kThread)
    return InvalidArgument("KvPrefiller needs an engine in ProgressMode::kThread");
  TE_RETURN_IF_ERROR(layout.Validate().WithContext("prefill layout"));
  if (rank >= layout.tp)
    return InvalidArgument("prefill rank " + std::to_string(rank) + " outside [0, " + std::to_string(layout.tp) + ")");
  if (options.context_slots == 0 || options.context_bytes == 0)
    return InvalidArgument("PrefillerOptions: context_slots and context_bytes must be at least 1");
  std::unique_ptr<KvPrefiller> p(new KvPrefiller(engine, layout, rank, memory, options));
  TE_ASSIGN_OR_RETURN(p->mr_, engine->RegisterMemory(memory, MemoryBytes(layout, options)));
  for (uint32_t i = options.context_slots; i-- > 0;) p->free_context_slots_.push_back(i);
  KvPrefiller* self = p.get();
  TE_RETURN_IF_ERROR(engine->ClaimRecvHandler(
      self, "KvPrefiller",
      [self](const EngineAddress& from, std::span<const uint8_t> d) { self->OnMessage(from, d); }));
  p->thread_ = std::thread([self] { self->Run(); });
  return p;
}

KvPrefiller::~KvPrefiller() {
  engine_->ReleaseRecvHandler(this);
  std::unique_lock<std::mutex> lock(mu_);
  stop_ = true;
  cv_.notify_all();
  // Writes in flight call back into this object; the engine finishes or
  // fails each within its request timeout.
  auto outstanding = [&] {
    uint64_t n = 0;
    for (auto& [id, r] : requests_)
      for (auto& [k, d] : r->dests) n += d->outstanding;
    return n;
  };
  cv_.wait(lock, [&] { return outstanding() == 0; });
  lock.unlock();
  if (thread_.joinable()) thread_.join();
}

Status KvPrefiller::Start(uint64_t id, std::vector<uint32_t> pages) {
  if (pages.empty()) return InvalidArgument("request " + std::to_string(id) + ": Start with no pages");
  for (uint32_t p : pages)
    if (p >= layout_.pages)
      return InvalidArgument("request " + std::to_string(id) + ": page " + std::to_string(p) + " outside [0, " +
                             std::to_string(layout_.pages) + ")");
  std::lock_guard<std::mutex> lock(mu_);
  if (!requests_.count(id) && retired_.count(id))
    return Cancelled("request " + std::to_string(id) + " already ended here: its decode ranks cancelled or failed it");
  auto& slot = requests_[id];
  if (!slot) slot = std::make_unique<Request>();
  Request& r = *slot;
  if (r.started) return InvalidArgument("request " + std::to_string(id) + " was already started");
  r.pages = std::move(pages);
  r.started = true;
  r.layer_done.assign(layout_.layers, false);
  PumpLocked(id, r);
  return Status::Ok();
}

Status KvPrefiller::LayerDone(uint64_t id, uint32_t layer) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = requests_.find(id);
  if (it == requests_.end() || !it->second->started)
    return NotFound("request " + std::to_string(id) + " is not started on this prefill rank");
  if (layer >= layout_.layers)
    return InvalidArgument("request " + std::to_string(id) + ": layer " + std::to_string(layer) + " outside [0, " +
                           std::to_string(layout_.layers) + ")");
  it->second->layer_done[layer] = true;
  PumpLocked(id, *it->second);
  return Status::Ok();
}

Status KvPrefiller::Finish(uint64_t id, std::span<const uint8_t> context) {
  if (context.size() > options_.context_bytes)
    return InvalidArgument("request " + std::to_string(id) + ": context of " + std::to_string(context.size()) +
                           " bytes exceeds context_bytes " + std::to_string(options_.context_bytes));
  std::lock_guard<std::mutex> lock(mu_);
  auto it = requests_.find(id);
  if (it == requests_.end() || !it->second->started)
    return NotFound("request " + std::to_string(id) + " is not started on this prefill rank");
  Request& r = *it->second;
  if (r.finished) return InvalidArgument("request " + std::to_string(id) + " was already finished");
  for (uint32_t l = 0; l < layout_.layers; ++l)
    if (!r.layer_done[l])
      return InvalidArgument("request " + std::to_string(id) + ": Finish before layer " + std::to_string(l) +
                             " is done");
  if (free_context_slots_.empty())
    return Unavailable("all " + std::to_string(options_.context_slots) +
                       " context slots are in use; raise context_slots");
  r.context_slot = free_context_slots_.back();
  free_context_slots_.pop_back();
  r.context_len = context.size();
  if (!context.empty())
    std::memcpy(memory_ + layout_.region_bytes() + uint64_t(r.context_slot) * options_.context_bytes, context.data(),
                context.size());
  r.finished = true;
  r.finished_at = Clock::now();
  PumpLocked(id, r);
  return Status::Ok();
}

Status KvPrefiller::Abort(uint64_t id, const std::string& why) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = requests_.find(id);
  if (it == requests_.end()) return NotFound("request " + std::to_string(id) + " is not on this prefill rank");
  Request& r = *it->second;
  r.aborted = true;
  if (r.status.ok()) r.status = Cancelled("request " + std::to_string(id) + " aborted: " + why);
  for (auto& [k, d] : r.dests) FailDestLocked(*d, "prefill aborted the request: " + why);
  PumpLocked(id, r);
  cv_.notify_all();
  return Status::Ok();
}

void KvPrefiller::FailDestLocked(Dest& d, const std::string& why) {
  if (d.state == Dest::State::kActive || d.state == Dest::State::kCancelling) {
    d.state = Dest::State::kFailing;
    d.why = why;
  }
}

void KvPrefiller::SendLocked(const PeerRef& peer, const KvMessage& m) {
  auto bytes = m.Encode();
  // Best effort: a decoder that cannot hear is dead, and its side times out.
  Status sent = engine_->Send(peer, bytes, {});
  if (!sent.ok()) {
    LOG_EVERY_N(WARNING, 100) << "kv prefill rank " << rank_ << ": message not sent: " << sent.ToString();
  }
}

void KvPrefiller::OnMessage(const EngineAddress& from, std::span<const uint8_t> data) {
  auto m = KvMessage::Decode(data);
  if (!m.ok()) {
    // Rate-limited: a peer sending garbage must not flood the log.
    LOG_EVERY_N(WARNING, 100) << "kv prefill rank " << rank_ << ": ignoring a message (" << google::COUNTER
                              << " so far): " << m.status().ToString();
    return;
  }
  const std::string hex = from.ToHex();
  if (m->kind == KvMessage::Kind::kPull) return OnPull(from, std::move(m).value());
  std::lock_guard<std::mutex> lock(mu_);
  last_heard_[hex] = Clock::now();
  if (m->kind != KvMessage::Kind::kCancel) return;
  auto it = requests_.find(m->request);
  if (it == requests_.end()) return;  // already retired: its CANCELLED/FAILED or data went out
  auto d = it->second->dests.find(hex + "/" + std::to_string(m->rank));
  if (d == it->second->dests.end()) return;
  if (d->second->state == Dest::State::kActive) d->second->state = Dest::State::kCancelling;
  PumpLocked(m->request, *it->second);
  cv_.notify_all();
}

void KvPrefiller::OnPull(const EngineAddress& from, KvMessage m) {
  auto dest = std::make_unique<Dest>();
  dest->peer_hex = from.ToHex();
  // Every decode rank PULLs from every prefill rank; one that needs nothing
  // from this rank sends no pages, so that this rank knows when a request
  // has been served everywhere.
  const bool idle = m.pages.empty();
  std::string refuse;
  auto peer = engine_->Connect(from);
  if (!peer.ok()) {
    LOG_EVERY_N(WARNING, 100) << "kv prefill rank " << rank_
                              << ": cannot reach a decoder: " << peer.status().ToString();
    return;
  }
  dest->peer = *peer;
  dest->layout = m.layout;
  dest->rank = m.rank;
  dest->pages = std::move(m.pages);
  dest->imm = m.imm;
  dest->context_offset = m.context_offset;
  dest->context_bytes = m.context_bytes;
  auto runs = PlanPageRuns(layout_, rank_, m.layout, m.rank);
  auto desc = MrDescriptor::FromHex(m.descriptor_hex);
  if (m.source_rank != rank_ || m.source_layout.Serialize() != layout_.Serialize())
    refuse = "decoder assumed prefill rank " + std::to_string(m.source_rank) + " with layout " +
             m.source_layout.Describe() + "; this is rank " + std::to_string(rank_) + " with layout " +
             layout_.Describe();
  else if (!runs.ok())
    refuse = runs.status().message();
  else if (idle != (runs->runs() == 0))
    refuse = "decode rank " + std::to_string(m.rank) +
             (idle ? " sent no pages but needs heads of" : " asked for pages but needs nothing from") +
             " prefill rank " + std::to_string(rank_);
  else if (!desc.ok())
    refuse = desc.status().message();
  else if (!(desc->owner == from))
    // A PULL names the sender's own cache: a descriptor of anyone else's
    // memory would make this rank write KV data where the sender chose.
    refuse = "the PULL's descriptor belongs to another engine than the decoder that sent it";
  if (refuse.empty()) {
    dest->runs = *runs;
    auto remote = engine_->Import(*desc);
    if (!remote.ok())
      refuse = remote.status().message();
    else
      dest->remote = *remote;
  }
  if (refuse.empty() && dest->remote->length() < m.layout.region_bytes())
    refuse = "decode cache descriptor of " + std::to_string(dest->remote->length()) +
             " bytes is smaller than its layout's " + std::to_string(m.layout.region_bytes());
  if (refuse.empty() && !RangeWithin(dest->context_offset, dest->context_bytes, dest->remote->length()))
    refuse = "context slot [" + std::to_string(dest->context_offset) + ", +" + std::to_string(dest->context_bytes) +
             ") outside the decode region of " + std::to_string(dest->remote->length()) + " bytes";
  for (uint32_t p : dest->pages)
    if (refuse.empty() && p >= m.layout.pages)
      refuse = "decode page " + std::to_string(p) + " outside [0, " + std::to_string(m.layout.pages) + ")";
  const size_t npages = dest->pages.size();
  bool announce = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    announce = AcceptPullLocked(m, std::move(dest), refuse);
  }
  if (announce && options_.on_pull) options_.on_pull(m.request, npages);
}

bool KvPrefiller::AcceptPullLocked(const KvMessage& m, std::unique_ptr<Dest> dest, std::string refuse) {
  const bool idle = dest->pages.empty();
  last_heard_[dest->peer_hex] = Clock::now();
  auto& slot = requests_[m.request];
  if (!slot) {
    if (refuse.empty() && retired_.count(m.request))
      refuse = "request " + std::to_string(m.request) + " already left this rank";
    slot = std::make_unique<Request>();
  }
  Request& r = *slot;
  if (refuse.empty() && !idle && r.started && r.pages.size() != dest->pages.size())
    refuse = "decode rank " + std::to_string(m.rank) + " gave " + std::to_string(dest->pages.size()) +
             " pages for a request of " + std::to_string(r.pages.size());
  if (!refuse.empty()) {
    KvMessage f;
    f.kind = KvMessage::Kind::kFailed;
    f.request = m.request;
    f.rank = m.source_rank;
    f.reason = refuse;
    SendLocked(dest->peer, f);
    if (!r.started && r.dests.empty()) requests_.erase(m.request);
    return false;
  }
  bool announce = false;
  if (!idle && !r.started && !r.announced) r.announced = announce = true;
  dest->context_source = ContextSource(layout_, m.layout, m.rank) == rank_;
  dest->layer_sent.assign(layout_.layers, false);
  if (idle) dest->state = Dest::State::kDone;
  r.expected_dests = int64_t(m.layout.tp);
  const std::string key = dest->peer_hex + "/" + std::to_string(m.rank);
  if (r.dests.count(key)) return false;  // a duplicate PULL
  // An immediate heartbeat: the decoder knows from now on that this rank is
  // alive, and times its silence from here.
  KvMessage hb;
  hb.rank = rank_;
  SendLocked(dest->peer, hb);
  r.dests[key] = std::move(dest);
  PumpLocked(m.request, r);
  return announce;
}

void KvPrefiller::SubmitLocked(uint64_t id, Request& r, Dest& d, bool context, uint32_t layer) {
  uint64_t imms = 0, bytes = 0;
  te::Request request;
  if (context) {
    if (r.context_len > d.context_bytes) {
      FailDestLocked(d, "context of " + std::to_string(r.context_len) + " bytes exceeds the decoder's slot of " +
                            std::to_string(d.context_bytes));
      return;
    }
    if (r.context_len == 0) {
      request = ImmOnly{d.remote, d.imm};
    } else {
      ScatterWrite w;
      w.src = mr_;
      w.targets.push_back({d.remote, layout_.region_bytes() + uint64_t(r.context_slot) * options_.context_bytes,
                           d.context_offset, r.context_len});
      w.imm = d.imm;
      request = std::move(w);
    }
    imms = 1;
    bytes = r.context_len;
    d.context_sent = true;
  } else {
    LayerWrites lw;
    BuildLayerWrites(d.runs, layout_, d.layout, layer, r.pages, d.pages, &lw);
    d.layer_sent[layer] = true;
    PagedWrite p;
    p.src = mr_;
    p.src_pages = std::move(lw.src_units);
    p.src_stride = lw.unit_bytes;
    p.dst = d.remote;
    p.dst_pages = std::move(lw.dst_units);
    p.dst_stride = lw.unit_bytes;
    p.page_length = lw.run_bytes;
    p.imm = d.imm;
    imms = p.src_pages.size();
    bytes = imms * lw.run_bytes;
    request = std::move(p);
  }
  Dest* dp = &d;
  Status s = engine_->Submit(std::move(request), {.on_done =
                                                      [this, id, dp, imms, bytes] {
                                                        std::lock_guard<std::mutex> lock(mu_);
                                                        --dp->outstanding;
                                                        dp->delivered += imms;
                                                        last_heard_[dp->peer_hex] =
                                                            Clock::now();  // a completed write: the decoder is alive
                                                        stats_.writes++;
                                                        stats_.bytes += bytes;
                                                        auto it = requests_.find(id);
                                                        if (it != requests_.end()) PumpLocked(id, *it->second);
                                                        cv_.notify_all();
                                                      },
                                                  .on_error =
                                                      [this, id, dp](const Status& e) {
                                                        std::lock_guard<std::mutex> lock(mu_);
                                                        --dp->outstanding;
                                                        FailDestLocked(*dp, "write failed: " + e.ToString());
                                                        auto it = requests_.find(id);
                                                        if (it != requests_.end()) PumpLocked(id, *it->second);
                                                        cv_.notify_all();
                                                      }});
  if (!s.ok())
    FailDestLocked(d, "write refused: " + s.ToString());
  else
    ++d.outstanding;
}

void KvPrefiller::PumpLocked(uint64_t id, Request& r) {
  bool all_done = true;
  for (auto& [key, dp] : r.dests) {
    Dest& d = *dp;
    if (d.state == Dest::State::kActive && r.started) {
      for (uint32_t l = 0; l < layout_.layers && d.state == Dest::State::kActive; ++l)
        if (r.layer_done[l] && !d.layer_sent[l]) SubmitLocked(id, r, d, false, l);
      if (r.finished && d.context_source && !d.context_sent && d.state == Dest::State::kActive)
        SubmitLocked(id, r, d, true, 0);
      if (d.state == Dest::State::kActive && r.finished && d.outstanding == 0 && (d.context_sent || !d.context_source))
        d.state = Dest::State::kDone;
    }
    // Cancelled or failed, with nothing in flight: say how many immediates
    // were delivered, and nothing more goes to this decode rank.
    const bool cancelled = d.state == Dest::State::kCancelling;
    if (d.outstanding == 0 && (cancelled || d.state == Dest::State::kFailing)) {
      KvMessage m;
      m.kind = cancelled ? KvMessage::Kind::kCancelled : KvMessage::Kind::kFailed;
      m.request = id;
      m.rank = rank_;
      m.delivered = d.delivered;
      if (!cancelled) m.reason = d.why;
      SendLocked(d.peer, m);
      d.state = Dest::State::kDone;
      if (r.status.ok())
        r.status = cancelled
                       ? Cancelled("decode rank " + std::to_string(d.rank) + " cancelled request " + std::to_string(id))
                       : Unavailable("request " + std::to_string(id) + " to decode rank " + std::to_string(d.rank) +
                                     ": " + d.why);
    }
    all_done = all_done && d.state == Dest::State::kDone;
  }
  // Retire once every decode rank has asked and is done, with nothing in
  // flight: after Finish when all went well (so the prefill engine's calls
  // stay valid to the end, also on a rank that serves nobody), at once when
  // a decode rank cancelled or failed (LayerDone then says kNotFound: stop),
  // or when the request was aborted.
  const bool everyone = r.expected_dests >= 0 && int64_t(r.dests.size()) == r.expected_dests;
  if (!all_done || !(r.aborted || (everyone && (r.finished || !r.status.ok())))) return;
  if (r.context_slot >= 0) free_context_slots_.push_back(uint32_t(r.context_slot));
  if (r.status.ok())
    stats_.requests_sent++;
  else
    stats_.requests_failed++;
  sent_.emplace_back(id, r.status);
  retired_.insert(id);
  retired_order_.push_back(id);
  if (retired_order_.size() > 4096) {
    retired_.erase(retired_order_.front());
    retired_order_.pop_front();
  }
  requests_.erase(id);  // r is gone from here on
  cv_.notify_all();
}

void KvPrefiller::Run() {
  auto next_beat = Clock::now();
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    cv_.wait_until(lock, next_beat, [&] { return stop_ || !sent_.empty(); });
    if (!sent_.empty()) {
      auto due = std::move(sent_);
      sent_.clear();
      lock.unlock();
      if (options_.on_sent)
        for (auto& [id, s] : due) options_.on_sent(id, s);
      lock.lock();
      continue;
    }
    if (Clock::now() < next_beat) continue;
    next_beat = Clock::now() + options_.heartbeat_interval;
    // Heartbeats to every decoder with work here; silent ones are dropped.
    std::set<std::string> beaten;
    std::vector<uint64_t> touched;
    const auto now = Clock::now();
    for (auto& [id, r] : requests_) {
      bool touch = false;
      for (auto& [key, d] : r->dests) {
        if (d->state == Dest::State::kDone) continue;
        if (beaten.insert(d->peer_hex).second) {
          KvMessage hb;
          hb.rank = rank_;
          SendLocked(d->peer, hb);
        }
        // Only a decoder still owed data is watched: once everything is
        // submitted, the writes themselves complete or fail (engine timeout).
        const bool owed = !r->finished ||
                          std::find(d->layer_sent.begin(), d->layer_sent.end(), false) != d->layer_sent.end() ||
                          (d->context_source && !d->context_sent);
        auto heard = last_heard_.find(d->peer_hex);
        if (owed && (heard == last_heard_.end() || now - heard->second > options_.peer_timeout)) {
          FailDestLocked(*d, "decoder silent for more than " + std::to_string(options_.peer_timeout.count()) + " ms");
          touch = true;
        }
      }
      // A finished request some decode rank never asked for.
      if (r->finished && now - r->finished_at > options_.pull_timeout &&
          int64_t(r->dests.size()) != r->expected_dests && !r->aborted) {
        r->aborted = true;
        if (r->status.ok())
          r->status = Timeout("request " + std::to_string(id) + ": not every decode rank asked within " +
                              std::to_string(options_.pull_timeout.count()) + " ms of the last layer");
        touch = true;
      }
      if (touch) touched.push_back(id);
    }
    for (uint64_t id : touched) {
      auto it = requests_.find(id);
      if (it != requests_.end()) PumpLocked(id, *it->second);
    }
  }
}

PrefillerStats KvPrefiller::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

size_t KvPrefiller::active_requests() const {
  std::lock_guard<std::mutex> lock(mu_);
  return requests_.size();
}

}  // namespace te::kvcache
