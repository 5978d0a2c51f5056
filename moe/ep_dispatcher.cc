#include "moe/ep_dispatcher.h"

#include <glog/logging.h>

#include <algorithm>
#include <cstring>
#include <sstream>

#include "moe/engine_waits.h"
#include "moe/peer_info.h"

namespace te::moe {
namespace {

constexpr uint32_t kCountsImm = 0, kDataImm = 2, kCombineImm = 4;  // + parity

// Head of a count row; per_rank[R] follows.
struct CountRowHeader {
  uint64_t seq;
  uint32_t map_fingerprint;
  uint32_t tokens;
};

size_t Align(size_t n, size_t a) { return (n + a - 1) / a * a; }

}  // namespace

// Byte offsets in the two registered regions.
//   recv, per parity: count table [R rows] | private slots [R x C records] |
//                     overflow [O records] | combine rows [T x min(K, R)]
//   send:             count row | records [T x min(K, R)] | partial rows [R x T]
struct EpDispatcher::Layout {
  size_t record, row_bytes, hidden_bytes;
  uint64_t private_records, overflow_records, send_records, partial_rows;
  size_t counts_off, private_off, overflow_off, combine_off, parity_bytes, recv_bytes;
  size_t send_row_off, send_records_off, send_partials_off, send_bytes;

  explicit Layout(const EpConfig& c) {
    record = RecordBytes(c);
    row_bytes = Align(sizeof(CountRowHeader) + 4 * size_t(c.ranks), 64);
    hidden_bytes = size_t(c.hidden) * 2;
    private_records = c.private_slot_tokens();
    overflow_records = c.overflow_slot_tokens();
    send_records = uint64_t(c.max_tokens) * std::min(c.topk, c.ranks);
    partial_rows = std::min<uint64_t>(uint64_t(c.ranks) * c.max_tokens, c.ranks * private_records + overflow_records);
    counts_off = 0;
    private_off = Align(counts_off + c.ranks * row_bytes, 4096);
    overflow_off = Align(private_off + c.ranks * private_records * record, 4096);
    combine_off = Align(overflow_off + overflow_records * record, 4096);
    parity_bytes = Align(combine_off + send_records * hidden_bytes, 4096);
    recv_bytes = 2 * parity_bytes;
    send_row_off = 0;
    send_records_off = Align(row_bytes, 4096);
    send_partials_off = Align(send_records_off + send_records * record, 4096);
    send_bytes = Align(send_partials_off + partial_rows * hidden_bytes, 4096);
  }
  size_t Counts(uint32_t b, uint32_t s) const { return b * parity_bytes + counts_off + s * row_bytes; }
  size_t Private(uint32_t b, uint32_t s) const { return b * parity_bytes + private_off + s * private_records * record; }
  size_t Overflow(uint32_t b, uint64_t i) const { return b * parity_bytes + overflow_off + i * record; }
  size_t Combine(uint32_t b, uint64_t row) const { return b * parity_bytes + combine_off + row * hidden_bytes; }
};

EpDispatcher::EpDispatcher(TransferEngine* engine, const EpConfig& config)
    : engine_(engine), config_(config), layout_(std::make_unique<Layout>(config)) {}

Result<std::unique_ptr<EpDispatcher>> EpDispatcher::Create(TransferEngine* engine, const EpConfig& config) {
  if (!engine) return InvalidArgument("EpDispatcher needs an engine");
  TE_RETURN_IF_ERROR(config.Validate());
  std::unique_ptr<EpDispatcher> d(new EpDispatcher(engine, config));
  TE_RETURN_IF_ERROR(d->Init());
  return d;
}

Status EpDispatcher::Init() {
  // Owned by the regions: a write still posted after its request failed
  // keeps the send buffer alive past this dispatcher (AllocateMemory).
  TE_ASSIGN_OR_RETURN(recv_mr_, engine_->AllocateMemory(layout_->recv_bytes));
  TE_ASSIGN_OR_RETURN(send_mr_, engine_->AllocateMemory(layout_->send_bytes));
  overflow_offset_.assign(config_.ranks, 0);
  return Status::Ok();
}

EpDispatcher::~EpDispatcher() {
  // The engine counts our requests' ends into the counters: they must not
  // outlive them. Each ends within request_timeout, so the wait is bounded.
  (void)WaitForSends(engine_, dispatch_sends_, dispatch_submitted_, ShutdownWait(engine_), "shutdown");
  (void)WaitForSends(engine_, combine_sends_, combine_submitted_, ShutdownWait(engine_), "shutdown");
  if (dispatch_sends_.finished() < dispatch_submitted_ || combine_sends_.finished() < combine_submitted_)
    LOG(ERROR) << "EpDispatcher: requests unfinished at shutdown, past the engine's request_timeout";
}

size_t EpDispatcher::buffer_bytes() const { return layout_->recv_bytes + layout_->send_bytes; }

std::string EpDispatcher::LocalInfo() const {
  const EpConfig& c = config_;
  std::ostringstream s;
  s << "temoe1 " << c.ranks << ' ' << c.rank << ' ' << c.experts << ' ' << c.topk << ' ' << c.hidden << ' '
    << c.max_tokens << ' ' << PayloadName(c.payload) << ' ' << layout_->private_records << ' '
    << layout_->overflow_records << ' ' << c.imm_base << ' ' << layout_->recv_bytes << ' '
    << engine_->Describe(*recv_mr_).ToHex();
  return s.str();
}

Status EpDispatcher::Connect(const std::vector<std::string>& infos) {
  const EpConfig& c = config_;
  if (infos.size() != c.ranks)
    return InvalidArgument("Connect got " + std::to_string(infos.size()) + " infos for " + std::to_string(c.ranks) +
                           " ranks");
  const std::string mine = LocalInfo();
  std::vector<RemoteMr> peers(c.ranks);
  for (uint32_t r = 0; r < c.ranks; ++r) {
    TE_ASSIGN_OR_RETURN(
        std::string hex,
        MatchPeerInfo(infos[r], mine, r,
                      "ranks rank experts topk hidden max_tokens payload private overflow imm_base bytes"));
    if (r == c.rank) continue;
    TE_ASSIGN_OR_RETURN(MrDescriptor desc, MrDescriptor::FromHex(hex));
    TE_ASSIGN_OR_RETURN(peers[r], engine_->Import(desc));
  }
  peers_ = std::move(peers);
  connected_ = true;
  return Status::Ok();
}

Status EpDispatcher::Fail(Status s) {
  if (failed_.ok()) failed_ = s;
  return s;
}

Status EpDispatcher::WaitImms(uint32_t imm, uint64_t count, const char* what) {
  return WaitForImms(engine_, imm, count, config_.timeout, "dispatch " + std::to_string(seq_) + ": " + what);
}

Status EpDispatcher::WaitSends(CompletionCounter& counter, uint64_t submitted, const char* what) {
  return WaitForSends(engine_, counter, submitted, config_.timeout + std::chrono::seconds(1), what);
}

Status EpDispatcher::CheckCallable(bool dispatch) const {
  if (!connected_) return InvalidArgument("Dispatch/Combine before Connect");
  if (!failed_.ok()) return Unavailable("dispatcher failed earlier (" + failed_.ToString() + "); rebuild the group");
  if (dispatch && combine_pending_)
    return InvalidArgument("Dispatch called again before Combine of dispatch " + std::to_string(seq_));
  if (!dispatch && !combine_pending_) return InvalidArgument("Combine without a pending Dispatch");
  return Status::Ok();
}

Status EpDispatcher::PrepareDispatch() {
  TE_RETURN_IF_ERROR(CheckCallable(true));
  // The staging still feeds the previous dispatch's writes until they finish.
  if (Status s = WaitSends(dispatch_sends_, dispatch_submitted_, "previous dispatch's writes"); !s.ok()) return Fail(s);
  return Status::Ok();
}

Status EpDispatcher::Dispatch(const TokenBatch& batch, const ExpertMap& map, DispatchResult* out) {
  TE_RETURN_IF_ERROR(CheckCallable(true));
  if (!out) return InvalidArgument("Dispatch needs a result to fill");
  TE_RETURN_IF_ERROR(ValidateBatch(config_, map, batch));
  TE_RETURN_IF_ERROR(PrepareDispatch());
  ResetResult(config_, map, out);
  PackRecords(config_, map, batch, send_records(), &plan_, &out->handle);
  return Exchange(plan_, map, batch.tokens, out, /*copy_payload=*/true, nullptr);
}

Status EpDispatcher::DispatchPacked(const SendPlan& plan, const ExpertMap& map, uint32_t tokens, DispatchResult* out,
                                    std::vector<const uint8_t*>* row_records, bool copy_payload) {
  TE_RETURN_IF_ERROR(CheckCallable(true));
  if (!out) return InvalidArgument("DispatchPacked needs a result to fill");
  if (plan.per_rank.size() != config_.ranks || plan.per_expert.size() != config_.experts)
    return InvalidArgument("DispatchPacked: plan is not one of this group (PackRecords fills it)");
  return Exchange(plan, map, tokens, out, copy_payload, row_records);
}

Status EpDispatcher::Exchange(const SendPlan& plan, const ExpertMap& map, uint32_t tokens, DispatchResult* out,
                              bool copy_payload, std::vector<const uint8_t*>* row_records) {
  const EpConfig& c = config_;
  const Layout& L = *layout_;
  const uint32_t R = c.ranks, p = c.rank, b = uint32_t((seq_ + 1) & 1);
  const uint64_t C = L.private_records;
  ++seq_;
  uint8_t* recv = recv_mr_->data();
  uint8_t* send = send_mr_->data();
  DispatchHandle& h = out->handle;
  h.seq = seq_;

  // 1. Count row, to everyone.
  CountRowHeader head{seq_, map.fingerprint(), tokens};
  std::memcpy(send + L.send_row_off, &head, sizeof head);
  std::memcpy(send + L.send_row_off + sizeof head, plan.per_rank.data(), 4 * R);
  std::memcpy(recv + L.Counts(b, p), send + L.send_row_off, L.row_bytes);
  const Completion sent{.counter = &dispatch_sends_};
  if (R > 1) {
    ScatterWrite counts{send_mr_, {}, c.imm_base + kCountsImm + b};
    for (uint32_t d = 0; d < R; ++d)
      if (d != p) counts.targets.push_back({peers_[d], L.send_row_off, L.Counts(b, p), L.row_bytes});
    if (Status s = engine_->Submit(std::move(counts), sent); !s.ok()) return Fail(s.WithContext("dispatch counts"));
    ++dispatch_submitted_;
  }

  // 2. Private slots, at once.
  ScatterWrite priv{send_mr_, {}, c.imm_base + kDataImm + b};
  for (uint32_t d = 0; d < R; ++d) {
    const uint64_t n = std::min<uint64_t>(plan.per_rank[d], C);
    if (n == 0) continue;
    const size_t src = L.send_records_off + size_t(plan.rank_offset[d]) * L.record;
    if (d == p)
      std::memcpy(recv + L.Private(b, p), send + src, n * L.record);
    else
      priv.targets.push_back({peers_[d], src, L.Private(b, p), n * L.record});
  }
  if (!priv.targets.empty()) {
    if (Status s = engine_->Submit(std::move(priv), sent); !s.ok()) return Fail(s.WithContext("dispatch data"));
    ++dispatch_submitted_;
  }

  // 3. Everyone's counts: the whole matrix.
  if (Status s = WaitImms(c.imm_base + kCountsImm + b, R - 1, "count rows from peers"); !s.ok()) return Fail(s);
  h.matrix.assign(size_t(R) * R, 0);
  for (uint32_t s = 0; s < R; ++s) {
    CountRowHeader row;
    std::memcpy(&row, recv + L.Counts(b, s), sizeof row);
    if (row.seq != seq_)
      return Fail(Internal("rank " + std::to_string(s) + " is at dispatch " + std::to_string(row.seq) +
                           ", this rank at " + std::to_string(seq_) + ": ranks must dispatch every layer"));
    if (row.map_fingerprint != map.fingerprint())
      return Fail(InvalidArgument("rank " + std::to_string(s) + " uses another expert map for dispatch " +
                                  std::to_string(seq_)));
    std::memcpy(&h.matrix[size_t(s) * R], recv + L.Counts(b, s) + sizeof row, 4 * R);
  }
  auto N = [&](uint32_t s, uint32_t d) { return uint64_t(h.matrix[size_t(s) * R + d]); };
  auto overflow = [&](uint32_t s, uint32_t d) { return N(s, d) > C ? N(s, d) - C : 0; };

  // Overflow placement: source-rank prefix at each destination. Every rank
  // checks every destination, so all fail alike.
  for (uint32_t d = 0; d < R; ++d) {
    uint64_t total = 0;
    for (uint32_t s = 0; s < R; ++s) {
      if (s == p) overflow_offset_[d] = total;
      total += overflow(s, d);
    }
    if (total > L.overflow_records)
      return Fail(Unavailable("dispatch " + std::to_string(seq_) + ": rank " + std::to_string(d) + " receives " +
                              std::to_string(total) + " tokens beyond its private slots, overflow region holds " +
                              std::to_string(L.overflow_records) + " (EpConfig::overflow_tokens)"));
  }
  ScatterWrite over{send_mr_, {}, c.imm_base + kDataImm + b};
  for (uint32_t d = 0; d < R; ++d) {
    const uint64_t n = overflow(p, d);
    if (n == 0) continue;
    const size_t src = L.send_records_off + (plan.rank_offset[d] + C) * L.record;
    if (d == p)
      std::memcpy(recv + L.Overflow(b, overflow_offset_[d]), send + src, n * L.record);
    else
      over.targets.push_back({peers_[d], src, L.Overflow(b, overflow_offset_[d]), n * L.record});
    overflow_sent_ += n;
  }
  if (!over.targets.empty()) {
    if (Status s = engine_->Submit(std::move(over), sent); !s.ok()) return Fail(s.WithContext("dispatch overflow"));
    ++dispatch_submitted_;
  }

  // 4. Exactly the data the matrix implies.
  uint64_t expected = 0;
  for (uint32_t s = 0; s < R; ++s)
    if (s != p) expected += (N(s, p) > 0) + (N(s, p) > C);
  if (Status s = WaitImms(c.imm_base + kDataImm + b, expected, "token records from peers"); !s.ok()) return Fail(s);
  uint64_t overflow_at = 0;
  for (uint32_t s = 0; s < R; ++s) {
    const uint64_t n = N(s, p), in_private = std::min(n, C);
    if (Status st = UnpackRecords(c, s, recv + L.Private(b, s), uint32_t(in_private), out, copy_payload, row_records);
        !st.ok())
      return Fail(st);
    if (n > C)
      if (Status st =
              UnpackRecords(c, s, recv + L.Overflow(b, overflow_at), uint32_t(n - C), out, copy_payload, row_records);
          !st.ok())
        return Fail(st);
    overflow_at += overflow(s, p);
  }
  // With manual progress nothing moves our writes while the caller computes:
  // finish them before handing back, or peers would stall on us.
  if (engine_->options().progress == ProgressMode::kManual)
    if (Status s = WaitSends(dispatch_sends_, dispatch_submitted_, "dispatch writes"); !s.ok()) return Fail(s);
  combine_pending_ = true;
  return Status::Ok();
}

Status EpDispatcher::Combine(const ExpertOutputs& outputs, const DispatchResult& dispatched, uint16_t* out) {
  TE_RETURN_IF_ERROR(CheckCallable(false));
  TE_RETURN_IF_ERROR(ValidateOutputs(dispatched, outputs));
  if (!out && dispatched.handle.tokens > 0)
    return InvalidArgument("Combine needs an output for " + std::to_string(dispatched.handle.tokens) + " tokens");
  auto rows = ReturnPartials(dispatched.handle, &outputs);
  if (!rows.ok()) return rows.status();
  SumPartials(config_, dispatched.handle, *rows, out);
  combine_pending_ = false;
  return Status::Ok();
}

Status EpDispatcher::EndWithoutCombine(const DispatchResult& dispatched) {
  TE_RETURN_IF_ERROR(CheckCallable(false));
  if (dispatched.handle.seq != seq_)
    return InvalidArgument("EndWithoutCombine got the handle of dispatch " + std::to_string(dispatched.handle.seq) +
                           "; the pending one is " + std::to_string(seq_));
  combine_pending_ = false;
  return Status::Ok();
}

Result<const uint16_t*> EpDispatcher::CombinePacked(const DispatchResult& dispatched) {
  TE_RETURN_IF_ERROR(CheckCallable(false));
  auto rows = ReturnPartials(dispatched.handle, nullptr);
  if (rows.ok()) combine_pending_ = false;
  return rows;
}

Result<const uint16_t*> EpDispatcher::ReturnPartials(const DispatchHandle& h, const ExpertOutputs* outputs) {
  const EpConfig& c = config_;
  const Layout& L = *layout_;
  if (h.seq != seq_)
    return InvalidArgument("Combine got the handle of dispatch " + std::to_string(h.seq) + "; the pending one is " +
                           std::to_string(seq_));
  if (Status s = WaitSends(combine_sends_, combine_submitted_, "previous combine's writes"); !s.ok()) return Fail(s);

  const uint32_t R = c.ranks, p = c.rank, b = uint32_t(seq_ & 1);
  uint8_t* recv = recv_mr_->data();
  uint8_t* send = send_mr_->data();
  auto N = [&](uint32_t s, uint32_t d) { return uint64_t(h.matrix[size_t(s) * R + d]); };
  const Completion sent{.counter = &combine_sends_};
  // Partial sums per source, each written back as soon as it is ready.
  uint64_t first = 0;
  for (uint32_t s = 0; s < R; ++s) {
    const uint64_t n = N(s, p);
    if (n == 0) continue;
    const size_t src = L.send_partials_off + first * L.hidden_bytes;
    if (outputs) ReduceRows(c, h, *outputs, uint32_t(first), uint32_t(n), reinterpret_cast<uint16_t*>(send + src));
    uint64_t at = 0;  // rows of s's combine region before ours
    for (uint32_t r = 0; r < p; ++r) at += N(s, r);
    if (s == p) {
      std::memcpy(recv + L.Combine(b, at), send + src, n * L.hidden_bytes);
    } else {
      ScatterWrite back{
          send_mr_, {{peers_[s], src, L.Combine(b, at), n * L.hidden_bytes}}, c.imm_base + kCombineImm + b};
      if (Status st = engine_->Submit(std::move(back), sent); !st.ok()) return Fail(st.WithContext("combine"));
      ++combine_submitted_;
    }
    first += n;
  }
  uint64_t expected = 0;
  for (uint32_t r = 0; r < R; ++r)
    if (r != p && N(p, r) > 0) ++expected;
  if (Status s = WaitImms(c.imm_base + kCombineImm + b, expected, "combine rows from peers"); !s.ok()) return Fail(s);
  if (engine_->options().progress == ProgressMode::kManual)
    if (Status s = WaitSends(combine_sends_, combine_submitted_, "combine writes"); !s.ok()) return Fail(s);
  return reinterpret_cast<const uint16_t*>(recv + L.Combine(b, 0));
}

uint8_t* EpDispatcher::send_records() const { return send_mr_->data() + layout_->send_records_off; }
uint16_t* EpDispatcher::send_partials() const {
  return reinterpret_cast<uint16_t*>(send_mr_->data() + layout_->send_partials_off);
}
std::vector<EpDispatcher::HostBuffer> EpDispatcher::host_buffers() const {
  return {{recv_mr_->data(), layout_->recv_bytes}, {send_mr_->data(), layout_->send_bytes}};
}

}  // namespace te::moe
