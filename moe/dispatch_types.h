// What dispatch takes and gives, shared by the reference, the host path over
// the transfer engine and the baselines.
//
// dispatch(tokens [T, H], topk_idx [T, K] (-1 = none), topk_weights [T, K],
//          scales [T, H/128] for fp8)
//   -> for each local expert: the tokens it received, their router weights
//      and where they came from, in (source rank, source token) order;
//   -> a handle that combine needs.
// combine(expert outputs [count, H] bf16 per local expert, handle)
//   -> [T, H] bf16 at the source: for every token, the sum over its experts
//      of weight x output.
//
// Arithmetic of combine, fixed so every path gives the same bits: the rank
// holding a token's experts sums weight x output over them in top-k order,
// in float starting from 0, and rounds to bf16 (one partial per rank the
// token went to); the source sums the partials in rank order, in float from
// 0, and rounds to bf16. A token with no expert combines to zeros.
#pragma once

#include <cstdint>
#include <vector>

namespace te::moe {

// Caller-owned inputs of one dispatch; nothing is kept after the call.
struct TokenBatch {
  uint32_t tokens = 0;
  const uint8_t* data = nullptr;        // [tokens, token_bytes]: bf16 or fp8
  const float* scales = nullptr;        // fp8 only: [tokens, hidden / 128]
  const int32_t* topk_idx = nullptr;    // [tokens, topk], -1 = no expert
  const float* topk_weights = nullptr;  // [tokens, topk]
};

// The tokens one local expert received.
struct ExpertTokens {
  uint32_t expert = 0;  // global id
  uint32_t count = 0;
  std::vector<uint8_t> data;   // [count, token_bytes]
  std::vector<float> scales;   // fp8: [count, hidden / 128]
  std::vector<float> weights;  // [count]: this expert's router weight for the token
  std::vector<uint32_t> src_rank, src_token;
};

// One received token row and one of the local experts it went to.
struct RowEntry {
  uint32_t local_expert = 0;
  uint32_t position = 0;  // in that expert's ExpertTokens
  float weight = 0;
};

struct DispatchHandle {
  uint64_t seq = 0;                 // which dispatch of the group this is
  uint32_t tokens = 0;              // T at this rank
  std::vector<uint32_t> sent_to;    // [R] tokens this rank sent to each rank
  std::vector<uint32_t> recv_from;  // [R] tokens received from each rank
  // Received rows, source-major: row q's experts are
  // entries[row_begin[q] .. row_begin[q + 1]), in top-k order.
  std::vector<uint32_t> row_begin{0};
  std::vector<RowEntry> entries;
  // Combine rows of token t (one per rank it went to, rank order), indexes
  // into the rows this rank receives back: token_rows[token_row_begin[t] ..
  // token_row_begin[t + 1]).
  std::vector<uint32_t> token_row_begin;
  std::vector<uint32_t> token_rows;
  // Whole group's token counts [source * R + destination] (host path).
  std::vector<uint32_t> matrix;

  // Records this rank sent to ranks other than `self`.
  uint64_t sent_to_others(uint32_t self) const {
    uint64_t n = 0;
    for (uint32_t r = 0; r < sent_to.size(); ++r) n += r == self ? 0 : sent_to[r];
    return n;
  }
};

struct DispatchResult {
  std::vector<ExpertTokens> experts;  // one per local expert, ExpertMap order
  DispatchHandle handle;
};

// Expert outputs for combine: per local expert, [count, hidden] bf16.
using ExpertOutputs = std::vector<const uint16_t*>;

}  // namespace te::moe
