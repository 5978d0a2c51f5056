// Synthetic KV contents that make misplaced bytes visible: every 8-byte word
// of a head's slot encodes (request salt, layer, tensor, the page's index in
// the request, token, global head, word). A head landing in the wrong page,
// layer, rank position or request breaks the comparison; a decode rank
// checks what it received against the same definition, without knowing how
// it was moved. Used by the tests and by te-kv.
#pragma once

#include <cstdint>
#include <cstring>
#include <span>

#include "kvcache/kv_layout.h"

namespace te::kvcache {

inline uint64_t KvPatternWord(uint64_t salt, uint32_t layer, uint32_t tensor, uint32_t index, uint32_t token,
                              uint32_t head, uint64_t word) {
  uint64_t x = salt * 0x9E3779B97F4A7C15ull ^
               (uint64_t(layer) << 48 | uint64_t(tensor) << 47 | uint64_t(index) << 20 | uint64_t(token) << 8 | head);
  x ^= word * 0xBF58476D1CE4E5B9ull;
  x ^= x >> 31;
  x *= 0x94D049BB133111EBull;
  return x ^ (x >> 29);
}

// Calls f(layer, tensor, index, token, local head, global head, offset) for
// every head slot of the request's pages on `rank`.
template <typename F>
void ForEachHead(const KvLayout& l, uint32_t rank, std::span<const uint32_t> pages, F&& f) {
  for (uint32_t layer = 0; layer < l.layers; ++layer)
    for (uint32_t c = 0; c < l.tensors(); ++c)
      for (uint32_t i = 0; i < pages.size(); ++i)
        for (uint32_t t = 0; t < l.page_tokens; ++t)
          for (uint32_t h = 0; h < l.local_heads(); ++h)
            f(layer, c, i, t, h, l.first_head(rank) + h, l.Offset(layer, c, pages[i], t, h));
}

// Fills the request's pages of `rank`'s cache (head_bytes must be a
// multiple of 8).
inline void FillKvPattern(const KvLayout& l, uint32_t rank, std::span<const uint32_t> pages, uint64_t salt,
                          uint8_t* cache) {
  ForEachHead(l, rank, pages,
              [&](uint32_t layer, uint32_t c, uint32_t i, uint32_t t, uint32_t, uint32_t g, uint64_t off) {
                for (uint64_t w = 0; w < l.head_bytes() / 8; ++w) {
                  const uint64_t v = KvPatternWord(salt, layer, c, i, t, g, w);
                  std::memcpy(cache + off + 8 * w, &v, 8);
                }
              });
}

// Head slots of the request's pages on `rank` that do not hold the pattern.
inline uint64_t CountWrongKvHeads(const KvLayout& l, uint32_t rank, std::span<const uint32_t> pages, uint64_t salt,
                                  const uint8_t* cache) {
  uint64_t wrong = 0;
  ForEachHead(l, rank, pages,
              [&](uint32_t layer, uint32_t c, uint32_t i, uint32_t t, uint32_t, uint32_t g, uint64_t off) {
                for (uint64_t w = 0; w < l.head_bytes() / 8; ++w) {
                  uint64_t v;
                  std::memcpy(&v, cache + off + 8 * w, 8);
                  if (v != KvPatternWord(salt, layer, c, i, t, g, w)) {
                    ++wrong;
                    return;
                  }
                }
              });
  return wrong;
}

}  // namespace te::kvcache
