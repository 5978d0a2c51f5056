// KvLayout: a paged KV cache as one tensor-parallel rank of an inference
// engine holds it, and where every element of it sits in the rank's memory.
//
// Memory order. The cache is one region per rank, made of per-layer,
// per-tensor blocks: layer l, tensor c (0 = K, 1 = V; MLA has one latent
// tensor) starts at (l * tensors + c) * pages * page_bytes. Inside a block,
// page p starts at p * page_bytes, and a page holds page_tokens tokens of the
// rank's local heads in one of two orders:
//   kNHD  [token][head][dim]   (vLLM's default): a page is contiguous, a
//         subset of its heads is one run per token;
//   kHND  [head][token][dim]   (FlashInfer's): a subset of heads is one run.
// That is why the order matters to transfers: NHD head slicing costs
// page_tokens writes per page, HND one.
//
// Tensor parallelism. With `tp` ranks, rank r holds KV heads
// [r * kv_heads / tp, (r + 1) * kv_heads / tp); kv_heads must divide by tp.
// MLA (one latent vector per token, no heads) is replicated on every rank:
// `kv_heads` is 1 and `head_dim` is the latent width.
#pragma once

#include <cstdint>
#include <string>

#include "base/status.h"

namespace te::kvcache {

enum class KvOrder { kNHD, kHND };

struct KvLayout {
  uint32_t layers = 0;
  uint32_t page_tokens = 0;  // tokens per page (block size)
  uint32_t kv_heads = 0;     // of the whole model; 1 for MLA
  uint32_t head_dim = 0;     // elements per head (MLA: latent width)
  uint32_t dtype_bytes = 2;
  bool mla = false;
  KvOrder order = KvOrder::kNHD;
  uint32_t tp = 1;     // tensor-parallel degree of the instance
  uint32_t pages = 0;  // pages in one rank's cache

  // Checks every field and that the region fits; names the bad value.
  Status Validate() const;

  uint32_t tensors() const { return mla ? 1 : 2; }
  uint32_t local_heads() const { return mla ? 1 : kv_heads / tp; }
  // First (global) head rank `rank` holds.
  uint32_t first_head(uint32_t rank) const { return mla ? 0 : rank * local_heads(); }
  uint64_t head_bytes() const { return uint64_t(head_dim) * dtype_bytes; }
  uint64_t page_bytes() const { return uint64_t(page_tokens) * local_heads() * head_bytes(); }
  uint64_t block_bytes() const { return uint64_t(pages) * page_bytes(); }
  uint64_t region_bytes() const { return uint64_t(layers) * tensors() * block_bytes(); }
  // Bytes of one page across every layer and tensor: what one page of a
  // request costs to move.
  uint64_t page_bytes_all_layers() const { return uint64_t(layers) * tensors() * page_bytes(); }

  // Byte offset of (layer, tensor, page, token, local head) in the region.
  uint64_t Offset(uint32_t layer, uint32_t tensor, uint32_t page, uint32_t token, uint32_t local_head) const;

  // "80L x 16tok x 8h x 128d x 2B NHD tp2, 1024 pages"
  std::string Describe() const;
  // One line of whitespace-separated fields, and its parser (messages,
  // registry entries).
  std::string Serialize() const;
  static Result<KvLayout> Parse(const std::string& text);

  // Model shapes: "llama70b" (80 layers, 8 KV heads x 128, GQA, bf16,
  // 16-token pages) and "deepseek" (61 layers, MLA latent 512 + 64 rope,
  // bf16, 64-token pages); `pages` and `tp` are left for the caller.
  static Result<KvLayout> Preset(const std::string& name);
};

// Whether a prefill layout's cache can be written into a decode layout's:
// the same model shape (layers, page size, heads, head width, dtype, MLA);
// tensor parallelism and memory order may differ.
Status CheckCompatible(const KvLayout& src, const KvLayout& dst);

}  // namespace te::kvcache
