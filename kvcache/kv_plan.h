// KV transfer plan: which bytes of a prefill rank's pages go where in a
// decode rank's pages, when the two instances may differ in tensor-parallel
// degree and memory order.
//
// GQA caches are sliced by heads: decode rank d receives, from every prefill
// rank whose heads overlap its own, the overlap. MLA caches have no heads and
// are replicated, so ranks are matched instead: decode rank d reads from
// prefill rank d % prefill tp.
//
// One page of one tensor moves as `runs` equal-length contiguous runs
// (`PageRuns`): one run when both sides hold the same heads in the same
// order, one per token for an NHD head slice, one per head and token when the
// orders differ. A layer of a request is then one PagedWrite whose "pages"
// are these runs, addressed in units of one head (`KvLayout::head_bytes()`),
// so it delivers tensors x pages x runs immediates; both sides compute that
// count from the two layouts alone.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "base/status.h"
#include "kvcache/kv_layout.h"

namespace te::kvcache {

// Prefill ranks whose cache decode rank `dst_rank` needs, ascending.
std::vector<uint32_t> SourceRanks(const KvLayout& src, const KvLayout& dst, uint32_t dst_rank);
// Decode ranks prefill rank `src_rank` writes to, ascending.
std::vector<uint32_t> TargetRanks(const KvLayout& src, const KvLayout& dst, uint32_t src_rank);
// The prefill rank that also writes decode rank `dst_rank`'s context (the
// first of its sources).
uint32_t ContextSource(const KvLayout& src, const KvLayout& dst, uint32_t dst_rank);

struct PageRuns {
  uint64_t run_bytes = 0;             // every run has this length
  std::vector<uint64_t> src_offsets;  // byte offsets inside a source page
  std::vector<uint64_t> dst_offsets;  // and inside a destination page
  size_t runs() const { return src_offsets.size(); }
};

// How one page of one tensor moves from prefill rank `src_rank` to decode
// rank `dst_rank`; no runs when the two share no heads. The layouts must be
// compatible (CheckCompatible) and the ranks inside their tp.
Result<PageRuns> PlanPageRuns(const KvLayout& src, uint32_t src_rank, const KvLayout& dst, uint32_t dst_rank);

// One layer of one request as PagedWrite arguments: unit indices (unit =
// head_bytes, from the region's start) of every run, K and V alike.
struct LayerWrites {
  uint64_t unit_bytes = 0;  // PagedWrite src_stride and dst_stride
  uint64_t run_bytes = 0;   // PagedWrite page_length
  std::vector<uint32_t> src_units, dst_units;
};
// Fills `out` for `layer`; src_pages[i] moves into dst_pages[i].
void BuildLayerWrites(const PageRuns& runs, const KvLayout& src, const KvLayout& dst, uint32_t layer,
                      std::span<const uint32_t> src_pages, std::span<const uint32_t> dst_pages, LayerWrites* out);

// Immediates decode rank `dst_rank` receives for a request of `pages` pages:
// every source's layers x tensors x pages x runs, plus one for the context.
Result<uint64_t> ExpectedImms(const KvLayout& src, const KvLayout& dst, uint32_t dst_rank, size_t pages);

}  // namespace te::kvcache
