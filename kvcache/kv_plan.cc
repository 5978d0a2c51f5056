#include "kvcache/kv_plan.h"

#include <algorithm>

namespace te::kvcache {

namespace {

// Global heads [begin, end) rank `rank` of `l` holds.
std::pair<uint32_t, uint32_t> Heads(const KvLayout& l, uint32_t rank) {
  return {l.first_head(rank), l.first_head(rank) + l.local_heads()};
}

bool Overlap(const KvLayout& src, uint32_t r, const KvLayout& dst, uint32_t d) {
  if (src.mla) return r == d % src.tp;
  auto [sb, se] = Heads(src, r);
  auto [db, de] = Heads(dst, d);
  return std::max(sb, db) < std::min(se, de);
}

uint64_t InPage(const KvLayout& l, uint32_t token, uint32_t head) {
  return l.order == KvOrder::kNHD ? (uint64_t(token) * l.local_heads() + head) * l.head_bytes()
                                  : (uint64_t(head) * l.page_tokens + token) * l.head_bytes();
}

}  // namespace

std::vector<uint32_t> SourceRanks(const KvLayout& src, const KvLayout& dst, uint32_t dst_rank) {
  std::vector<uint32_t> out;
  for (uint32_t r = 0; r < src.tp; ++r)
    if (Overlap(src, r, dst, dst_rank)) out.push_back(r);
  return out;
}

std::vector<uint32_t> TargetRanks(const KvLayout& src, const KvLayout& dst, uint32_t src_rank) {
  std::vector<uint32_t> out;
  for (uint32_t d = 0; d < dst.tp; ++d)
    if (Overlap(src, src_rank, dst, d)) out.push_back(d);
  return out;
}

uint32_t ContextSource(const KvLayout& src, const KvLayout& dst, uint32_t dst_rank) {
  auto s = SourceRanks(src, dst, dst_rank);
  return s.empty() ? 0 : s.front();
}

Result<PageRuns> PlanPageRuns(const KvLayout& src, uint32_t src_rank, const KvLayout& dst, uint32_t dst_rank) {
  TE_RETURN_IF_ERROR(CheckCompatible(src, dst));
  if (src_rank >= src.tp || dst_rank >= dst.tp)
    return InvalidArgument("KV plan: prefill rank " + std::to_string(src_rank) + " of tp " + std::to_string(src.tp) +
                           ", decode rank " + std::to_string(dst_rank) + " of tp " + std::to_string(dst.tp) +
                           "; ranks must be below tp");
  PageRuns out;
  if (!Overlap(src, src_rank, dst, dst_rank)) return out;
  uint32_t begin = 0, end = 1;  // MLA: the single latent "head"
  if (!src.mla) {
    begin = std::max(Heads(src, src_rank).first, Heads(dst, dst_rank).first);
    end = std::min(Heads(src, src_rank).second, Heads(dst, dst_rank).second);
  }
  const uint32_t s0 = src.first_head(src_rank), d0 = dst.first_head(dst_rank);
  // Every (token, head) unit in source order, then merge neighbours that are
  // contiguous on both sides.
  std::vector<std::pair<uint64_t, uint64_t>> units;
  for (uint32_t t = 0; t < src.page_tokens; ++t)
    for (uint32_t h = begin; h < end; ++h) units.emplace_back(InPage(src, t, h - s0), InPage(dst, t, h - d0));
  std::sort(units.begin(), units.end());
  const uint64_t hb = src.head_bytes();
  std::vector<std::pair<uint64_t, uint64_t>> starts;
  std::vector<uint64_t> lengths;
  for (auto [s, d] : units) {
    if (!starts.empty() && starts.back().first + lengths.back() == s && starts.back().second + lengths.back() == d) {
      lengths.back() += hb;
    } else {
      starts.emplace_back(s, d);
      lengths.push_back(hb);
    }
  }
  // PagedWrite moves equal lengths; irregular merges fall back to single heads.
  const bool equal = std::all_of(lengths.begin(), lengths.end(), [&](uint64_t l) { return l == lengths[0]; });
  if (!equal) {
    starts = units;
    lengths.assign(units.size(), hb);
  }
  out.run_bytes = lengths[0];
  for (auto [s, d] : starts) {
    out.src_offsets.push_back(s);
    out.dst_offsets.push_back(d);
  }
  return out;
}

void BuildLayerWrites(const PageRuns& runs, const KvLayout& src, const KvLayout& dst, uint32_t layer,
                      std::span<const uint32_t> src_pages, std::span<const uint32_t> dst_pages, LayerWrites* out) {
  out->unit_bytes = src.head_bytes();
  out->run_bytes = runs.run_bytes;
  out->src_units.clear();
  out->dst_units.clear();
  const size_t n = std::min(src_pages.size(), dst_pages.size());
  out->src_units.reserve(src.tensors() * n * runs.runs());
  out->dst_units.reserve(src.tensors() * n * runs.runs());
  const uint64_t hb = src.head_bytes();
  for (uint32_t c = 0; c < src.tensors(); ++c) {
    for (size_t i = 0; i < n; ++i) {
      const uint64_t sp = src.Offset(layer, c, src_pages[i], 0, 0);
      const uint64_t dp = dst.Offset(layer, c, dst_pages[i], 0, 0);
      for (size_t j = 0; j < runs.runs(); ++j) {
        out->src_units.push_back(uint32_t((sp + runs.src_offsets[j]) / hb));
        out->dst_units.push_back(uint32_t((dp + runs.dst_offsets[j]) / hb));
      }
    }
  }
}

Result<uint64_t> ExpectedImms(const KvLayout& src, const KvLayout& dst, uint32_t dst_rank, size_t pages) {
  uint64_t total = 1;  // the context
  for (uint32_t r : SourceRanks(src, dst, dst_rank)) {
    TE_ASSIGN_OR_RETURN(PageRuns runs, PlanPageRuns(src, r, dst, dst_rank));
    total += uint64_t(src.layers) * src.tensors() * pages * runs.runs();
  }
  return total;
}

}  // namespace te::kvcache
