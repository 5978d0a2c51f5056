#include "moe/dispatch_records.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "moe/numeric_formats.h"

namespace te::moe {
namespace {

struct RecordHeader {
  uint32_t src_token;
  uint16_t entries;
  uint16_t tag;
};
struct RecordEntry {
  uint16_t local_expert;
  uint16_t zero;
  float weight;
};
static_assert(sizeof(RecordHeader) == 8 && sizeof(RecordEntry) == 8);

size_t EntriesBytes(const EpConfig& c) { return sizeof(RecordHeader) + size_t(c.topk) * sizeof(RecordEntry); }

}  // namespace

size_t RecordPayloadOffset(const EpConfig& c) { return EntriesBytes(c); }

uint32_t RecordSourceToken(const uint8_t* record) {
  RecordHeader h;
  std::memcpy(&h, record, sizeof h);
  return h.src_token;
}

uint16_t RecordTag(const uint8_t* record) {
  RecordHeader h;
  std::memcpy(&h, record, sizeof h);
  return h.tag;
}

size_t RecordBytes(const EpConfig& c) {
  size_t raw = EntriesBytes(c) + c.token_bytes() + c.scale_count() * sizeof(float);
  return (raw + 63) & ~size_t(63);
}

Status ValidateBatch(const EpConfig& c, const ExpertMap& map, const TokenBatch& b) {
  if (map.experts() != c.experts || map.ranks() != c.ranks)
    return InvalidArgument("expert map has " + std::to_string(map.experts()) + " experts on " +
                           std::to_string(map.ranks()) + " ranks; the group has " + std::to_string(c.experts) + " on " +
                           std::to_string(c.ranks));
  if (b.tokens > c.max_tokens)
    return InvalidArgument("tokens " + std::to_string(b.tokens) + " exceeds max_tokens " +
                           std::to_string(c.max_tokens));
  if (b.tokens == 0) return Status::Ok();
  if (!b.data || !b.topk_idx || !b.topk_weights)
    return InvalidArgument("tokens, topk_idx and topk_weights must be given for " + std::to_string(b.tokens) +
                           " tokens");
  if (c.payload == Payload::kFp8E4M3 && !b.scales) return InvalidArgument("fp8 payload needs scales");
  for (uint32_t t = 0; t < b.tokens; ++t) {
    const int32_t* idx = b.topk_idx + size_t(t) * c.topk;
    for (uint32_t k = 0; k < c.topk; ++k) {
      if (idx[k] < -1 || idx[k] >= int32_t(c.experts))
        return InvalidArgument("topk_idx[" + std::to_string(t) + "][" + std::to_string(k) +
                               "] = " + std::to_string(idx[k]) + ", outside [-1, " + std::to_string(c.experts) + ")");
      for (uint32_t j = 0; j < k; ++j)
        if (idx[k] >= 0 && idx[j] == idx[k])
          return InvalidArgument("topk_idx[" + std::to_string(t) + "] names expert " + std::to_string(idx[k]) +
                                 " twice (k = " + std::to_string(j) + " and " + std::to_string(k) + ")");
    }
  }
  return Status::Ok();
}

void PackRecords(const EpConfig& c, const ExpertMap& map, const TokenBatch& b, uint8_t* staging, SendPlan* plan,
                 DispatchHandle* h, bool copy_payload, std::vector<uint32_t>* row_token,
                 const std::vector<uint32_t>* first_row, const TokenLabels* labels) {
  const uint32_t R = c.ranks, K = c.topk;
  plan->per_rank.assign(R, 0);
  plan->per_expert.assign(c.experts, 0);
  // Pass 1: each slot's destination (ExpertMap::Route; hashing the row only
  // where the map reads its key), and tokens per destination rank.
  const bool keyed = map.uses_key();
  std::vector<uint32_t>& dest = plan->dest;
  dest.assign(size_t(b.tokens) * K, UINT32_MAX);
  std::vector<uint8_t>& goes = plan->goes;
  goes.assign(size_t(b.tokens) * R, 0);
  for (uint32_t t = 0; t < b.tokens; ++t) {
    const int32_t* idx = b.topk_idx + size_t(t) * K;
    const uint32_t key = keyed ? ExpertMap::TokenKey(idx, K) : 0;
    map.Route(idx, K, c.rank, key, &dest[size_t(t) * K]);
    for (uint32_t k = 0; k < K; ++k) {
      if (idx[k] < 0) continue;
      plan->per_expert[idx[k]]++;
      const uint32_t d = dest[size_t(t) * K + k];
      uint8_t& g = goes[size_t(t) * R + d];
      if (!g) plan->per_rank[d]++;
      g = 1;
    }
  }
  plan->rank_offset.assign(R + 1, 0);
  for (uint32_t r = 0; r < R; ++r) plan->rank_offset[r + 1] = plan->rank_offset[r] + plan->per_rank[r];

  // Pass 2: write records; token t's combine rows follow the same grouping.
  const size_t rec = RecordBytes(c), eb = EntriesBytes(c), tb = c.token_bytes(), sb = c.scale_count() * sizeof(float);
  std::vector<uint32_t> next =
      first_row ? *first_row : std::vector<uint32_t>(plan->rank_offset.begin(), plan->rank_offset.end() - 1);
  h->tokens = b.tokens;
  h->sent_to = plan->per_rank;
  h->token_row_begin.assign(1, 0);
  h->token_rows.clear();
  if (row_token) row_token->assign(plan->rank_offset[R], 0);
  for (uint32_t t = 0; t < b.tokens; ++t) {
    const int32_t* idx = b.topk_idx + size_t(t) * K;
    const float* w = b.topk_weights + size_t(t) * K;
    const uint32_t* d = dest.data() + size_t(t) * K;
    for (uint32_t r = 0; r < R; ++r) {
      if (!goes[size_t(t) * R + r]) continue;
      const uint32_t row = next[r]++;
      uint8_t* p = staging + size_t(row) * rec;
      RecordHeader hdr{t, 0, 0};
      if (labels && labels->ids) hdr.src_token = labels->ids[t];
      if (labels && labels->tags) hdr.tag = labels->tags[t];
      auto* entries = reinterpret_cast<RecordEntry*>(p + sizeof(RecordHeader));
      for (uint32_t k = 0; k < K; ++k) {
        if (d[k] != r) continue;
        RecordEntry e{uint16_t(map.local_index(idx[k], r)), 0, w[k]};
        std::memcpy(&entries[hdr.entries++], &e, sizeof e);
      }
      std::memcpy(p, &hdr, sizeof hdr);
      if (copy_payload) {
        std::memcpy(p + eb, b.data + size_t(t) * tb, tb);
        if (sb) std::memcpy(p + eb + tb, b.scales + size_t(t) * c.scale_count(), sb);
      }
      if (row_token) (*row_token)[row] = t;
      h->token_rows.push_back(row);
    }
    h->token_row_begin.push_back(uint32_t(h->token_rows.size()));
  }
}

void ResetResult(const EpConfig& c, const ExpertMap& map, DispatchResult* out) {
  const auto& local = map.local_experts(c.rank);
  out->experts.resize(local.size());
  for (size_t i = 0; i < local.size(); ++i) {
    ExpertTokens& e = out->experts[i];
    e.expert = local[i];
    e.count = 0;
    e.data.clear();
    e.scales.clear();
    e.weights.clear();
    e.src_rank.clear();
    e.src_token.clear();
  }
  DispatchHandle& h = out->handle;
  h.recv_from.assign(c.ranks, 0);
  h.row_begin.assign(1, 0);
  h.entries.clear();
}

Status UnpackRecords(const EpConfig& c, uint32_t source, const uint8_t* records, uint32_t n, DispatchResult* out,
                     bool copy_payload, std::vector<const uint8_t*>* row_records) {
  const size_t rec = RecordBytes(c), eb = EntriesBytes(c), tb = c.token_bytes(), sc = c.scale_count();
  DispatchHandle& h = out->handle;
  for (uint32_t i = 0; i < n; ++i) {
    const uint8_t* p = records + size_t(i) * rec;
    RecordHeader hdr;
    std::memcpy(&hdr, p, sizeof hdr);
    if (row_records) row_records->push_back(p);
    if (hdr.entries == 0 || hdr.entries > c.topk)
      return Internal("record " + std::to_string(i) + " from rank " + std::to_string(source) + " has " +
                      std::to_string(hdr.entries) + " experts, outside [1, " + std::to_string(c.topk) + "]");
    for (uint32_t j = 0; j < hdr.entries; ++j) {
      RecordEntry e;
      std::memcpy(&e, p + sizeof(RecordHeader) + j * sizeof(RecordEntry), sizeof e);
      if (e.local_expert >= out->experts.size())
        return Internal("record from rank " + std::to_string(source) + " names local expert " +
                        std::to_string(e.local_expert) + " of " + std::to_string(out->experts.size()) +
                        ": the ranks disagree on the expert map");
      ExpertTokens& x = out->experts[e.local_expert];
      h.entries.push_back({e.local_expert, x.count, e.weight});
      if (copy_payload) x.data.insert(x.data.end(), p + eb, p + eb + tb);
      if (sc && copy_payload) {
        const float* s = reinterpret_cast<const float*>(p + eb + tb);  // 4-aligned: eb, tb multiples of 4
        x.scales.insert(x.scales.end(), s, s + sc);
      }
      x.weights.push_back(e.weight);
      x.src_rank.push_back(source);
      x.src_token.push_back(hdr.src_token);
      x.count++;
    }
    h.row_begin.push_back(uint32_t(h.entries.size()));
  }
  h.recv_from[source] += n;
  return Status::Ok();
}

Status ValidateOutputs(const DispatchResult& d, const ExpertOutputs& outputs) {
  if (outputs.size() != d.experts.size())
    return InvalidArgument("combine got outputs for " + std::to_string(outputs.size()) + " experts; this rank has " +
                           std::to_string(d.experts.size()) + " local experts");
  for (size_t i = 0; i < outputs.size(); ++i)
    if (!outputs[i] && d.experts[i].count > 0)
      return InvalidArgument("combine: output of local expert " + std::to_string(i) + " (expert " +
                             std::to_string(d.experts[i].expert) + ", " + std::to_string(d.experts[i].count) +
                             " tokens) is missing");
  return Status::Ok();
}

void ReduceRows(const EpConfig& c, const DispatchHandle& h, const ExpertOutputs& outputs, uint32_t first, uint32_t n,
                uint16_t* dst) {
  const uint32_t H = c.hidden;
  thread_local std::vector<float> acc;  // no allocation per call: combine may reduce row by row
  acc.resize(H);
  for (uint32_t q = first; q < first + n; ++q) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (uint32_t i = h.row_begin[q]; i < h.row_begin[q + 1]; ++i) {
      const RowEntry& e = h.entries[i];
      const uint16_t* x = outputs[e.local_expert] + size_t(e.position) * H;
      for (uint32_t j = 0; j < H; ++j) acc[j] += e.weight * Bf16ToFloat(x[j]);
    }
    uint16_t* d = dst + size_t(q - first) * H;
    for (uint32_t j = 0; j < H; ++j) d[j] = FloatToBf16(acc[j]);
  }
}

void SumPartials(const EpConfig& c, const DispatchHandle& h, const uint16_t* rows, uint16_t* out) {
  const uint32_t H = c.hidden;
  std::vector<float> acc(H);
  for (uint32_t t = 0; t < h.tokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (uint32_t i = h.token_row_begin[t]; i < h.token_row_begin[t + 1]; ++i) {
      const uint16_t* x = rows + size_t(h.token_rows[i]) * H;
      for (uint32_t j = 0; j < H; ++j) acc[j] += Bf16ToFloat(x[j]);
    }
    for (uint32_t j = 0; j < H; ++j) out[size_t(t) * H + j] = FloatToBf16(acc[j]);
  }
}

}  // namespace te::moe
