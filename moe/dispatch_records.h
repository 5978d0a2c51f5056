// Token records: how a dispatched token travels, and the packing, unpacking
// and combine arithmetic every transport shares (the engine path and the MPI
// baseline differ only in how records move).
//
// A record is one token for one destination rank, however many of its
// experts live there:
//   u32 source token | u16 entries | u16 tag | topk x {u16 local expert, u16 0,
//   f32 weight} | token bytes | fp8 scales | padding to 64 bytes.
// The source token is the token's row in its batch unless the packer names
// tokens by id (context-coherent dispatch); the tag is 0 unless the packer
// gives one (the merge rank of context-coherent dispatch).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "base/status.h"
#include "moe/dispatch_types.h"
#include "moe/ep_config.h"
#include "moe/expert_map.h"

namespace te::moe {

size_t RecordBytes(const EpConfig& config);

// Checks a batch against the group's shape and the layer's map: token count
// within max_tokens, pointers present, every expert id in [-1, experts) and
// none repeated within a token.
Status ValidateBatch(const EpConfig& config, const ExpertMap& map, const TokenBatch& batch);

// Where each destination's records sit in the send staging.
struct SendPlan {
  std::vector<uint32_t> per_rank;     // [R] tokens to each rank
  std::vector<uint32_t> rank_offset;  // [R + 1] first record of each rank
  std::vector<uint32_t> per_expert;   // [E] (token, expert) pairs
  std::vector<uint8_t> goes;          // scratch [T x R]: token t goes to rank r; kept to reuse its memory
  std::vector<uint32_t> dest;         // scratch [T x K]: slot k's destination rank (UINT32_MAX: empty slot)
};

// Packs a validated batch into `staging` (room for max_tokens x min(topk,
// ranks) records), grouped by destination rank in token order; fills the plan
// and the handle's sent_to / token_row_begin / token_rows. Without
// copy_payload only headers and expert entries are written (batch.data and
// scales are not read): a device kernel copies the payloads, using
// `row_token` (source token of every staging row) when given. With
// `first_row` ([R]), rank r's records start at staging row first_row[r]
// instead of plan->rank_offset[r] (fixed slots per destination), and the
// handle's token_rows index those rows; row_token must then be null.
// `labels` (when given) names token t by ids[t] instead of t in its records
// and tags them tags[t].
struct TokenLabels {
  const uint32_t* ids = nullptr;   // [tokens]
  const uint16_t* tags = nullptr;  // [tokens]
};
void PackRecords(const EpConfig& config, const ExpertMap& map, const TokenBatch& batch, uint8_t* staging,
                 SendPlan* plan, DispatchHandle* handle, bool copy_payload = true,
                 std::vector<uint32_t>* row_token = nullptr, const std::vector<uint32_t>* first_row = nullptr,
                 const TokenLabels* labels = nullptr);

// A packed record's source token (row or id) and tag.
uint32_t RecordSourceToken(const uint8_t* record);
uint16_t RecordTag(const uint8_t* record);

// Where a record's payload starts (token bytes, then fp8 scales).
size_t RecordPayloadOffset(const EpConfig& config);

// Prepares `out` for a dispatch on this rank: one ExpertTokens per local
// expert, emptied (their capacity is kept).
void ResetResult(const EpConfig& config, const ExpertMap& map, DispatchResult* out);

// Appends `n` records from `source` to the local experts and to the handle's
// rows. Records that name a local expert out of range fail with kInternal.
// Without copy_payload the experts get counts, weights and sources but no
// data; `row_records` (when given) collects each row's record address.
Status UnpackRecords(const EpConfig& config, uint32_t source, const uint8_t* records, uint32_t n, DispatchResult* out,
                     bool copy_payload = true, std::vector<const uint8_t*>* row_records = nullptr);

// Partial sums of received rows (outputs validated) [first, first + n): dst gets n rows of
// hidden bf16.
void ReduceRows(const EpConfig& config, const DispatchHandle& handle, const ExpertOutputs& outputs, uint32_t first,
                uint32_t n, uint16_t* dst);

// Checks outputs against a dispatch result: one per local expert, present
// where the expert received tokens.
Status ValidateOutputs(const DispatchResult& dispatched, const ExpertOutputs& outputs);

// Sums the partial rows that came back (rows indexed as token_rows) into
// out [tokens, hidden].
void SumPartials(const EpConfig& config, const DispatchHandle& handle, const uint16_t* rows, uint16_t* out);

}  // namespace te::moe
