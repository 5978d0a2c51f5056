#include "moe/ll_dispatcher.h"

#include <glog/logging.h>

#include <cstring>
#include <sstream>

#include "moe/engine_waits.h"
#include "moe/peer_info.h"

namespace te::moe {
namespace {

constexpr uint32_t kDispatchImm = 6, kCombineImm = 8;  // + parity

// First row of every dispatch block.
struct BlockHeader {
  uint64_t seq;
  uint32_t count;
  uint32_t map_fingerprint;
};

size_t Align(size_t n, size_t a) { return (n + a - 1) / a * a; }

}  // namespace

// Byte offsets. A slot is max_tokens + 1 rows: the header row, then records
// (dispatch) or partial rows (combine; its first row unused, so record i and
// partial row i share an index). The block header sits at the end of its row,
// so a block is one contiguous write of the header and the records after it,
// not a whole record row of header: at one token per rank that row would
// double the bytes on the wire.
//   recv, per parity: dispatch slots [R sources] | combine slots [R destinations]
//   send:             dispatch blocks [R destinations] | partial rows [R sources]
struct LowLatencyDispatcher::Layout {
  size_t record, hidden_bytes, rows, combine_off, parity_bytes, recv_bytes, partials_off, send_bytes;
  explicit Layout(const EpConfig& c) {
    record = RecordBytes(c);
    hidden_bytes = size_t(c.hidden) * 2;
    rows = size_t(c.max_tokens) + 1;
    combine_off = Align(c.ranks * rows * record, 4096);
    parity_bytes = Align(combine_off + c.ranks * rows * hidden_bytes, 4096);
    recv_bytes = 2 * parity_bytes;
    partials_off = Align(c.ranks * rows * record, 4096);
    send_bytes = Align(partials_off + c.ranks * rows * hidden_bytes, 4096);
  }
  size_t Slot(uint32_t b, uint32_t s) const { return b * parity_bytes + s * rows * record; }
  size_t CombineSlot(uint32_t b, uint32_t d) const { return b * parity_bytes + combine_off + d * rows * hidden_bytes; }
  size_t Block(uint32_t d) const { return d * rows * record; }
  // Where a block's header (and so its write) starts, from its slot or block.
  size_t HeaderAt(size_t row0) const { return row0 + record - sizeof(BlockHeader); }
  size_t BlockBytes(uint32_t records) const { return sizeof(BlockHeader) + size_t(records) * record; }
  size_t Partials(uint32_t s) const { return partials_off + (s * rows + 1) * hidden_bytes; }
};

LowLatencyDispatcher::LowLatencyDispatcher(TransferEngine* engine, const EpConfig& config)
    : engine_(engine), config_(config), layout_(std::make_unique<Layout>(config)) {}

Result<std::unique_ptr<LowLatencyDispatcher>> LowLatencyDispatcher::Create(TransferEngine* engine,
                                                                           const EpConfig& config) {
  if (!engine) return InvalidArgument("LowLatencyDispatcher needs an engine");
  TE_RETURN_IF_ERROR(config.Validate());
  if (config.max_tokens > 4096)
    return InvalidArgument("LowLatencyDispatcher: max_tokens " + std::to_string(config.max_tokens) +
                           " outside [1, 4096]; larger batches belong to EpDispatcher");
  std::unique_ptr<LowLatencyDispatcher> d(new LowLatencyDispatcher(engine, config));
  TE_RETURN_IF_ERROR(d->Init());
  return d;
}

Status LowLatencyDispatcher::Init() {
  // Destination d's records start one row (its header's) into its block.
  first_row_.resize(config_.ranks);
  for (uint32_t d = 0; d < config_.ranks; ++d) first_row_[d] = uint32_t(d * layout_->rows + 1);
  // Owned by the regions: a write still posted after its request failed
  // keeps the send buffer alive past this dispatcher (AllocateMemory).
  TE_ASSIGN_OR_RETURN(recv_mr_, engine_->AllocateMemory(layout_->recv_bytes));
  TE_ASSIGN_OR_RETURN(send_mr_, engine_->AllocateMemory(layout_->send_bytes));
  return Status::Ok();
}

LowLatencyDispatcher::~LowLatencyDispatcher() {
  // The engine counts our requests' ends into sends_: it must not outlive
  // them. Each ends within request_timeout, so this wait is bounded.
  if (!WaitForSends(engine_, sends_, submitted_, ShutdownWait(engine_), "shutdown").ok() &&
      sends_.finished() < submitted_)
    LOG(ERROR) << "LowLatencyDispatcher: " << submitted_ - sends_.finished()
               << " requests unfinished at shutdown, past the engine's request_timeout";
}

size_t LowLatencyDispatcher::buffer_bytes() const { return layout_->recv_bytes + layout_->send_bytes; }

std::string LowLatencyDispatcher::LocalInfo() const {
  const EpConfig& c = config_;
  std::ostringstream s;
  s << "temoell1 " << c.ranks << ' ' << c.rank << ' ' << c.experts << ' ' << c.topk << ' ' << c.hidden << ' '
    << c.max_tokens << ' ' << PayloadName(c.payload) << ' ' << c.imm_base << ' ' << layout_->recv_bytes << ' '
    << engine_->Describe(*recv_mr_).ToHex();
  return s.str();
}

Status LowLatencyDispatcher::Connect(const std::vector<std::string>& infos) {
  const EpConfig& c = config_;
  if (infos.size() != c.ranks)
    return InvalidArgument("Connect got " + std::to_string(infos.size()) + " infos for " + std::to_string(c.ranks) +
                           " ranks");
  const std::string mine = LocalInfo();
  std::vector<RemoteMr> peers(c.ranks);
  for (uint32_t r = 0; r < c.ranks; ++r) {
    TE_ASSIGN_OR_RETURN(
        std::string hex,
        MatchPeerInfo(infos[r], mine, r, "ranks rank experts topk hidden max_tokens payload imm_base bytes"));
    if (r == c.rank) continue;
    TE_ASSIGN_OR_RETURN(MrDescriptor desc, MrDescriptor::FromHex(hex));
    TE_ASSIGN_OR_RETURN(peers[r], engine_->Import(desc));
  }
  peers_ = std::move(peers);
  connected_ = true;
  return Status::Ok();
}

Status LowLatencyDispatcher::Fail(Status s) {
  if (failed_.ok()) failed_ = s;
  return s;
}

Status LowLatencyDispatcher::Expect(Phase phase, const char* call) const {
  static const char* kNext[] = {"SendDispatch", "RecvDispatch", "SendCombine", "RecvCombine"};
  if (!connected_) return InvalidArgument(std::string(call) + " before Connect");
  if (!failed_.ok()) return Unavailable("dispatcher failed earlier (" + failed_.ToString() + "); rebuild the group");
  if (phase_ != phase)
    return InvalidArgument(std::string(call) + " out of order: the next call must be " + kNext[int(phase_)]);
  return Status::Ok();
}

Status LowLatencyDispatcher::WaitImms(uint32_t imm, uint64_t count, const char* what) {
  return WaitForImms(engine_, imm, count, config_.timeout,
                     "low-latency dispatch " + std::to_string(seq_) + ": " + what);
}

Status LowLatencyDispatcher::WaitSends(uint64_t submitted, const char* what) {
  return WaitForSends(engine_, sends_, submitted, config_.timeout + std::chrono::seconds(1), what);
}

void LowLatencyDispatcher::PostNow() {
  // A kManual engine posts what was submitted on its next Progress(); without
  // this the writes would wait for the Recv call, and nothing would move
  // while the caller computes between Send and Recv.
  if (engine_->options().progress == ProgressMode::kManual) engine_->Progress();
}

Status LowLatencyDispatcher::SendDispatch(const TokenBatch& batch, const ExpertMap& map) {
  TE_RETURN_IF_ERROR(Expect(Phase::kIdle, "SendDispatch"));
  TE_RETURN_IF_ERROR(ValidateBatch(config_, map, batch));
  // The blocks still feed the previous layer's writes until they finish.
  if (Status s = WaitSends(submitted_, "previous writes"); !s.ok()) return Fail(s);
  const EpConfig& c = config_;
  const Layout& L = *layout_;
  const uint32_t R = c.ranks, p = c.rank;
  ++seq_;
  const uint32_t b = uint32_t(seq_ & 1);
  fingerprint_ = map.fingerprint();
  uint8_t* send = send_mr_->data();
  PackRecords(c, map, batch, send, &plan_, &sent_, /*copy_payload=*/true, nullptr, &first_row_);
  sent_.seq = seq_;
  ScatterWrite blocks{send_mr_, {}, c.imm_base + kDispatchImm + b};
  // Destinations from p + 1 round: were every rank to start at rank 0, all
  // first writes would queue at one receiver while the others idle.
  for (uint32_t k = 0; k < R; ++k) {
    const uint32_t d = (p + 1 + k) % R;
    if (d == p) continue;  // RecvDispatch reads this rank's own records from its block here
    const BlockHeader head{seq_, plan_.per_rank[d], fingerprint_};
    std::memcpy(send + L.HeaderAt(L.Block(d)), &head, sizeof head);
    blocks.targets.push_back(
        {peers_[d], L.HeaderAt(L.Block(d)), L.HeaderAt(L.Slot(b, p)), L.BlockBytes(plan_.per_rank[d])});
  }
  if (!blocks.targets.empty()) {
    if (Status s = engine_->Submit(std::move(blocks), {.counter = &sends_}); !s.ok())
      return Fail(s.WithContext("dispatch"));
    ++submitted_;
    PostNow();
  }
  map_local_ = map.local_experts(p);
  phase_ = Phase::kDispatchSent;
  return Status::Ok();
}

Status LowLatencyDispatcher::RecvDispatch(DispatchResult* out) {
  TE_RETURN_IF_ERROR(Expect(Phase::kDispatchSent, "RecvDispatch"));
  if (!out) return InvalidArgument("RecvDispatch needs a result to fill");
  const EpConfig& c = config_;
  const Layout& L = *layout_;
  const uint32_t R = c.ranks, b = uint32_t(seq_ & 1);
  if (Status s = WaitImms(c.imm_base + kDispatchImm + b, R - 1, "token records from peers"); !s.ok()) return Fail(s);
  // ResetResult's work, from the local expert list SendDispatch kept.
  out->experts.resize(map_local_.size());
  for (size_t i = 0; i < map_local_.size(); ++i) {
    ExpertTokens& e = out->experts[i];
    e.expert = map_local_[i];
    e.count = 0;
    e.data.clear(), e.scales.clear(), e.weights.clear(), e.src_rank.clear(), e.src_token.clear();
  }
  DispatchHandle& h = out->handle;
  h.seq = seq_;
  h.tokens = sent_.tokens;
  h.sent_to = sent_.sent_to;
  h.token_row_begin = sent_.token_row_begin;
  h.token_rows = sent_.token_rows;
  h.recv_from.assign(R, 0);
  h.row_begin.assign(1, 0);
  h.entries.clear();
  h.matrix.clear();
  const uint8_t* recv = recv_mr_->data();
  for (uint32_t s = 0; s < R; ++s) {
    if (s == c.rank) {  // no header to check: this rank's records, in its send block
      const uint8_t* own = send_mr_->data() + L.Block(s) + L.record;
      if (Status st = UnpackRecords(c, s, own, plan_.per_rank[s], out); !st.ok()) return Fail(st);
      continue;
    }
    BlockHeader head;
    std::memcpy(&head, recv + L.HeaderAt(L.Slot(b, s)), sizeof head);
    if (head.seq != seq_)
      return Fail(Internal("rank " + std::to_string(s) + " is at dispatch " + std::to_string(head.seq) +
                           ", this rank at " + std::to_string(seq_) + ": ranks must dispatch every layer"));
    if (head.map_fingerprint != fingerprint_)
      return Fail(InvalidArgument("rank " + std::to_string(s) + " uses another expert map for dispatch " +
                                  std::to_string(seq_)));
    if (head.count > c.max_tokens)
      return Fail(Internal("rank " + std::to_string(s) + " announces " + std::to_string(head.count) +
                           " records, above max_tokens " + std::to_string(c.max_tokens)));
    if (Status st = UnpackRecords(c, s, recv + L.Slot(b, s) + L.record, head.count, out); !st.ok()) return Fail(st);
  }
  if (engine_->options().progress == ProgressMode::kManual)
    if (Status s = WaitSends(submitted_, "dispatch writes"); !s.ok()) return Fail(s);
  phase_ = Phase::kDispatched;
  return Status::Ok();
}

Status LowLatencyDispatcher::SendCombine(const ExpertOutputs& outputs, const DispatchResult& dispatched) {
  TE_RETURN_IF_ERROR(Expect(Phase::kDispatched, "SendCombine"));
  TE_RETURN_IF_ERROR(ValidateOutputs(dispatched, outputs));
  const DispatchHandle& h = dispatched.handle;
  if (h.seq != seq_ || h.recv_from.size() != config_.ranks)
    return InvalidArgument("SendCombine got the result of dispatch " + std::to_string(h.seq) + "; the pending one is " +
                           std::to_string(seq_));
  if (Status s = WaitSends(submitted_, "previous writes"); !s.ok()) return Fail(s);
  const EpConfig& c = config_;
  const Layout& L = *layout_;
  const uint32_t R = c.ranks, p = c.rank, b = uint32_t(seq_ & 1);
  uint8_t* recv = recv_mr_->data();
  uint8_t* send = send_mr_->data();
  // Rows of source s start at firsts_[s] in the handle (sources in rank order).
  firsts_.assign(R + 1, 0);  // sized once: no allocation per layer
  for (uint32_t s = 0; s < R; ++s) firsts_[s + 1] = firsts_[s] + h.recv_from[s];
  const size_t at = L.CombineSlot(b, p) + L.hidden_bytes;  // this rank's slot, at every source
  // Sources from the next rank up, round, as in dispatch; this rank's own
  // rows summed straight into its slot. One request for all the writes:
  // posting each source's rows as soon as they are summed measured slower
  // here (a post per source costs more than the overlap wins on loopback).
  ScatterWrite back{send_mr_, {}, c.imm_base + kCombineImm + b};
  for (uint32_t k = 1; k <= R; ++k) {
    const uint32_t s = (p + k) % R, n = h.recv_from[s];
    if (n == 0) continue;
    if (s == p) {
      ReduceRows(c, h, outputs, firsts_[s], n, reinterpret_cast<uint16_t*>(recv + at));
      continue;
    }
    ReduceRows(c, h, outputs, firsts_[s], n, reinterpret_cast<uint16_t*>(send + L.Partials(s)));
    back.targets.push_back({peers_[s], L.Partials(s), at, size_t(n) * L.hidden_bytes});
  }
  if (!back.targets.empty()) {
    if (Status st = engine_->Submit(std::move(back), {.counter = &sends_}); !st.ok())
      return Fail(st.WithContext("combine"));
    ++submitted_;
    PostNow();
  }
  phase_ = Phase::kCombineSent;
  return Status::Ok();
}

Status LowLatencyDispatcher::RecvCombine(uint16_t* out) {
  TE_RETURN_IF_ERROR(Expect(Phase::kCombineSent, "RecvCombine"));
  if (!out && sent_.tokens > 0)
    return InvalidArgument("RecvCombine needs an output for " + std::to_string(sent_.tokens) + " tokens");
  const EpConfig& c = config_;
  const uint32_t R = c.ranks, p = c.rank, b = uint32_t(seq_ & 1);
  uint64_t expected = 0;
  for (uint32_t d = 0; d < R; ++d) expected += d != p && sent_.sent_to[d] > 0;
  if (Status s = WaitImms(c.imm_base + kCombineImm + b, expected, "combine rows from peers"); !s.ok()) return Fail(s);
  SumPartials(c, sent_, reinterpret_cast<const uint16_t*>(recv_mr_->data() + layout_->CombineSlot(b, 0)), out);
  if (engine_->options().progress == ProgressMode::kManual)
    if (Status s = WaitSends(submitted_, "combine writes"); !s.ok()) return Fail(s);
  phase_ = Phase::kIdle;
  return Status::Ok();
}

Status LowLatencyDispatcher::Dispatch(const TokenBatch& batch, const ExpertMap& map, DispatchResult* out) {
  TE_RETURN_IF_ERROR(SendDispatch(batch, map));
  return RecvDispatch(out);
}

Status LowLatencyDispatcher::Combine(const ExpertOutputs& outputs, const DispatchResult& dispatched, uint16_t* out) {
  TE_RETURN_IF_ERROR(SendCombine(outputs, dispatched));
  return RecvCombine(out);
}

}  // namespace te::moe
