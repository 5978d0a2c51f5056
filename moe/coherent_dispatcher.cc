#include "moe/coherent_dispatcher.h"

#include <algorithm>
#include <cstring>
#include <numeric>

#include "moe/dispatch_records.h"
#include "moe/numeric_formats.h"

namespace te::moe {
namespace {

constexpr const char* kMagic = "temoec1 ";
constexpr const char* kSeparator = " | ";
// A merge row: the rank partial, then the dispatching rank and the id as two
// u32, each in two bf16 slots (copied as bits, never read as numbers).
constexpr uint32_t kKeySlots = 4;
// The merge part of a top-1 group's LocalInfo (it has no merge step).
constexpr const char* kNoMerge = "no-merge";

}  // namespace

CoherentDispatcher::CoherentDispatcher(const EpConfig& config) : config_(config) {}
CoherentDispatcher::~CoherentDispatcher() = default;

Result<std::unique_ptr<CoherentDispatcher>> CoherentDispatcher::Create(TransferEngine* engine, const EpConfig& config) {
  if (!engine) return InvalidArgument("CoherentDispatcher needs an engine");
  TE_RETURN_IF_ERROR(config.Validate());
  if (config.ranks > 65535)
    return InvalidArgument("ranks " + std::to_string(config.ranks) + " exceeds 65535, the merge ranks a record names");
  if (uint64_t(config.ranks) * config.max_tokens > (1u << 20))
    return InvalidArgument("ranks x max_tokens = " + std::to_string(uint64_t(config.ranks) * config.max_tokens) +
                           " exceeds 2^20, the rows a rank may receive and merge");
  std::unique_ptr<CoherentDispatcher> d(new CoherentDispatcher(config));
  TE_ASSIGN_OR_RETURN(d->dispatch_, EpDispatcher::Create(engine, config));
  d->merge_result_.handle.sent_to.assign(config.ranks, 0);
  // Top-1: a token's one expert is its merge rank, so its whole output is
  // already where it merges: no merge step, one exchange per layer.
  if (config.topk == 1) return d;
  EpConfig merge = config;
  merge.experts = config.ranks;
  merge.topk = 1;
  merge.hidden = config.hidden + kKeySlots;
  merge.payload = Payload::kBf16;
  merge.max_tokens = config.ranks * config.max_tokens;  // the rows a rank received
  merge.private_tokens = 0;
  merge.overflow_tokens = EpConfig::kWorstCase;
  merge.imm_base = config.imm_base + kMergeImmOffset;
  TE_ASSIGN_OR_RETURN(d->merge_map_, ExpertMap::Contiguous(config.ranks, config.ranks));
  TE_ASSIGN_OR_RETURN(d->merge_, EpDispatcher::Create(engine, merge));
  return d;
}

size_t CoherentDispatcher::buffer_bytes() const {
  return dispatch_->buffer_bytes() + (merge_ ? merge_->buffer_bytes() : 0);
}

size_t CoherentDispatcher::merge_record_bytes() const { return merge_ ? RecordBytes(merge_->config()) : 0; }

std::string CoherentDispatcher::LocalInfo() const {
  return kMagic + dispatch_->LocalInfo() + kSeparator + (merge_ ? merge_->LocalInfo() : kNoMerge);
}

Status CoherentDispatcher::Connect(const std::vector<std::string>& infos) {
  const uint32_t R = config_.ranks;
  if (infos.size() != R)
    return InvalidArgument("Connect got " + std::to_string(infos.size()) + " infos for " + std::to_string(R) +
                           " ranks");
  std::vector<std::string> dispatch(R), merge(R);
  for (uint32_t r = 0; r < R; ++r) {
    const size_t cut = infos[r].find(kSeparator);
    if (infos[r].rfind(kMagic, 0) != 0 || cut == std::string::npos)
      return InvalidArgument("info of rank " + std::to_string(r) + " is not a CoherentDispatcher's");
    dispatch[r] = infos[r].substr(std::strlen(kMagic), cut - std::strlen(kMagic));
    merge[r] = infos[r].substr(cut + std::strlen(kSeparator));
  }
  TE_RETURN_IF_ERROR(dispatch_->Connect(dispatch).WithContext("dispatch"));
  if (merge_) {
    TE_RETURN_IF_ERROR(merge_->Connect(merge).WithContext("merge"));
  } else {
    for (uint32_t r = 0; r < R; ++r)
      if (merge[r] != kNoMerge)
        return InvalidArgument("rank " + std::to_string(r) + " has a merge step and this rank (top-1) has none");
  }
  calls_.Connected();
  return Status::Ok();
}

Status CoherentDispatcher::Dispatch(const TokenBatch& batch, const uint32_t* ids, const ExpertMap& map,
                                    DispatchResult* out) {
  TE_RETURN_IF_ERROR(calls_.CanDispatch());
  if (!out) return InvalidArgument("Dispatch needs a result to fill");
  const EpConfig& c = config_;
  const uint32_t T = batch.tokens, K = c.topk;
  TE_RETURN_IF_ERROR(ValidateBatch(c, map, batch));
  ids_.resize(T);
  if (ids) {
    std::copy(ids, ids + T, ids_.begin());
    std::vector<uint32_t> sorted = ids_;
    std::sort(sorted.begin(), sorted.end());
    if (auto dup = std::adjacent_find(sorted.begin(), sorted.end()); dup != sorted.end())
      return InvalidArgument("ids name token " + std::to_string(*dup) + " twice; ids must be distinct in a batch");
  } else {
    std::iota(ids_.begin(), ids_.end(), 0u);
  }
  // Merge ranks (the kTop1 rule), and the tokens that stay for lack of experts.
  merge_of_.resize(T);
  no_expert_.clear();
  std::vector<uint32_t> dest(K);
  for (uint32_t t = 0; t < T; ++t) {
    const int32_t* idx = batch.topk_idx + size_t(t) * K;
    map.Route(idx, K, c.rank, ExpertMap::TokenKey(idx, K), dest.data());
    merge_of_[t] = uint16_t(idx[0] >= 0 ? dest[0] : c.rank);
    if (std::all_of(idx, idx + K, [](int32_t e) { return e < 0; })) no_expert_.push_back(ids_[t]);
  }

  if (Status s = dispatch_->PrepareDispatch(); !s.ok()) return Fail(s);
  ResetResult(c, map, out);
  const TokenLabels labels{ids_.data(), merge_of_.data()};
  PackRecords(c, map, batch, dispatch_->send_records(), &plan_, &out->handle, /*copy_payload=*/true, nullptr, nullptr,
              &labels);
  records_.clear();
  if (Status s = dispatch_->DispatchPacked(plan_, map, T, out, &records_, /*copy_payload=*/true); !s.ok())
    return Fail(s);

  // Each received row's dispatching rank, id and merge rank, for combine.
  const size_t rows = records_.size();
  row_from_.resize(rows);
  row_id_.resize(rows);
  row_merge_.resize(rows);
  const DispatchHandle& h = out->handle;
  for (size_t q = 0; q < rows; ++q) {
    const uint8_t* rec = records_[q];
    row_id_[q] = RecordSourceToken(rec);
    row_merge_[q] = RecordTag(rec);
    if (row_merge_[q] >= c.ranks)
      return Fail(Internal("a record names merge rank " + std::to_string(row_merge_[q]) + ", outside [0, " +
                           std::to_string(c.ranks) + ")"));
    const RowEntry& first = h.entries[h.row_begin[q]];  // every row has an entry (UnpackRecords checks)
    row_from_[q] = out->experts[first.local_expert].src_rank[first.position];
  }
  if (Status s = dispatch_->EndWithoutCombine(*out); !s.ok()) return Fail(s);
  out->handle.seq = calls_.Dispatched();
  dispatched_sent_ += h.sent_to_others(c.rank);
  return Status::Ok();
}

Status CoherentDispatcher::Combine(const ExpertOutputs& outputs, const DispatchResult& dispatched,
                                   MergedTokens* merged) {
  TE_RETURN_IF_ERROR(calls_.CanCombine(dispatched.handle.seq));
  TE_RETURN_IF_ERROR(ValidateOutputs(dispatched, outputs));
  if (!merged) return InvalidArgument("Combine needs a MergedTokens to fill");
  const EpConfig& c = config_;
  const uint32_t H = c.hidden;
  const size_t rows = row_id_.size();
  if (!merge_) return CombineHere(outputs, dispatched, merged);

  // 1. Rank partials of every received row, keyed, to the merge ranks:
  // reduced straight into the merge step's send staging (PackRecords lays
  // out the headers; row_token_ says which received row each record is).
  const EpConfig& mc = merge_->config();
  merge_idx_.resize(rows);
  merge_weight_.assign(rows, 1.0f);
  for (size_t q = 0; q < rows; ++q) merge_idx_[q] = int32_t(row_merge_[q]);
  const TokenBatch sends{uint32_t(rows), nullptr, nullptr, merge_idx_.data(), merge_weight_.data()};
  if (Status s = merge_->PrepareDispatch(); !s.ok()) return Fail(s);
  ResetResult(mc, merge_map_, &merge_result_);
  uint8_t* staging = merge_->send_records();
  PackRecords(mc, merge_map_, sends, staging, &plan_, &merge_result_.handle, /*copy_payload=*/false, &row_token_);
  const size_t rec = RecordBytes(mc), off = RecordPayloadOffset(mc);
  for (size_t j = 0; j < row_token_.size(); ++j) {
    const uint32_t q = row_token_[j];
    FillMergeRow(outputs, dispatched, q, reinterpret_cast<uint16_t*>(staging + j * rec + off));  // 2-aligned
  }
  records_.clear();
  if (Status s = merge_->DispatchPacked(plan_, merge_map_, uint32_t(rows), &merge_result_, &records_); !s.ok())
    return Fail(s);
  merged_sent_ += merge_result_.handle.sent_to_others(c.rank);
  if (Status s = merge_->EndWithoutCombine(merge_result_); !s.ok()) return Fail(s);
  const ExpertTokens& in = merge_result_.experts[0];
  if (records_.size() != in.count)
    return Fail(Internal("merge step received " + std::to_string(records_.size()) + " records for " +
                         std::to_string(in.count) + " rows"));

  // 2. Sum each token's partials in rank order (they arrive rank-major).
  merge_rows_.resize(records_.size());
  for (size_t i = 0; i < records_.size(); ++i) merge_rows_[i] = reinterpret_cast<const uint16_t*>(records_[i] + off);
  if (Status s = MergePartials(c.ranks, c.rank, H, merge_rows_, in.src_rank, no_expert_, merged); !s.ok())
    return Fail(s);
  calls_.Combined();
  return Status::Ok();
}

void CoherentDispatcher::FillMergeRow(const ExpertOutputs& outputs, const DispatchResult& dispatched, uint32_t q,
                                      uint16_t* row) const {
  const uint32_t H = config_.hidden;
  ReduceRows(config_, dispatched.handle, outputs, q, 1, row);
  std::memcpy(row + H, &row_from_[q], 4);
  std::memcpy(row + H + 2, &row_id_[q], 4);
}

Status CoherentDispatcher::CombineHere(const ExpertOutputs& outputs, const DispatchResult& dispatched,
                                       MergedTokens* merged) {
  // Top-1: every row received here merges here (its one expert is here),
  // and its partial is the token's whole output. The same arithmetic as the
  // merge step (the partial in bf16, then summed from 0 alone), so the
  // result is bit for bit what the exchange would give.
  const EpConfig& c = config_;
  const uint32_t H = c.hidden, W = H + kKeySlots;
  const size_t rows = row_id_.size();
  local_rows_.resize(rows * W);
  merge_rows_.resize(rows);
  for (size_t q = 0; q < rows; ++q) {
    if (row_merge_[q] != c.rank)
      return Fail(Internal("a top-1 record received by rank " + std::to_string(c.rank) + " names merge rank " +
                           std::to_string(row_merge_[q])));
    uint16_t* row = local_rows_.data() + q * W;
    FillMergeRow(outputs, dispatched, uint32_t(q), row);
    merge_rows_[q] = row;
  }
  local_senders_.assign(rows, c.rank);
  if (Status s = MergePartials(c.ranks, c.rank, H, merge_rows_, local_senders_, no_expert_, merged); !s.ok())
    return Fail(s);
  calls_.Combined();
  return Status::Ok();
}

Status MergePartials(uint32_t ranks, uint32_t self, uint32_t hidden, const std::vector<const uint16_t*>& rows,
                     const std::vector<uint32_t>& senders, const std::vector<uint32_t>& stay, MergedTokens* merged) {
  const uint32_t H = hidden;
  if (senders.size() != rows.size())
    return InvalidArgument("MergePartials got " + std::to_string(senders.size()) + " senders for " +
                           std::to_string(rows.size()) + " rows");
  struct Piece {
    uint32_t from, id, rank, row;  // row == UINT32_MAX: a token without experts
  };
  std::vector<Piece> pieces;
  pieces.reserve(rows.size() + stay.size());
  for (uint32_t i = 0; i < rows.size(); ++i) {
    Piece p{0, 0, senders[i], i};
    std::memcpy(&p.from, rows[i] + H, 4);
    std::memcpy(&p.id, rows[i] + H + 2, 4);
    if (p.from >= ranks)
      return Internal("rank " + std::to_string(p.rank) + " sent a partial for a token of rank " +
                      std::to_string(p.from) + ", outside [0, " + std::to_string(ranks) + ")");
    pieces.push_back(p);
  }
  for (uint32_t id : stay) pieces.push_back({self, id, self, UINT32_MAX});
  std::stable_sort(pieces.begin(), pieces.end(),
                   [](const Piece& a, const Piece& b) { return a.from != b.from ? a.from < b.from : a.id < b.id; });
  merged->count = 0;
  merged->from_rank.clear();
  merged->ids.clear();
  merged->data.clear();
  std::vector<float> acc(H);
  for (size_t i = 0; i < pieces.size();) {
    size_t j = i;
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (; j < pieces.size() && pieces[j].from == pieces[i].from && pieces[j].id == pieces[i].id; ++j) {
      if (j > i && pieces[j].rank <= pieces[j - 1].rank)
        return Internal("token " + std::to_string(pieces[i].id) + " of rank " + std::to_string(pieces[i].from) +
                        " got two partials from rank " + std::to_string(pieces[j].rank) + " or out of rank order");
      if (pieces[j].row == UINT32_MAX) continue;
      const uint16_t* x = rows[pieces[j].row];
      for (uint32_t k = 0; k < H; ++k) acc[k] += Bf16ToFloat(x[k]);
    }
    merged->from_rank.push_back(pieces[i].from);
    merged->ids.push_back(pieces[i].id);
    merged->data.resize(merged->data.size() + H);
    uint16_t* dst = merged->data.data() + size_t(merged->count) * H;
    for (uint32_t k = 0; k < H; ++k) dst[k] = FloatToBf16(acc[k]);
    merged->count++;
    i = j;
  }
  return Status::Ok();
}

}  // namespace te::moe
