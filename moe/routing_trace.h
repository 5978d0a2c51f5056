// RoutingTrace: which experts every token chose at every layer
// (tokens x layers x top-k expert ids, -1 = no expert), and its file format.
// Synthetic traces: moe/trace_generator.h.
//
// File: "TEMOETR1" | u32 tokens | u32 layers | u32 topk | u32 experts |
//       tokens*layers*topk x i16 ids (token-major, then layer, then k) |
//       u32 crc32c of everything before it. Little-endian.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"

namespace te::moe {

inline constexpr uint64_t kMaxTraceIds = uint64_t(1) << 32;

struct RoutingTrace {
  uint32_t tokens = 0, layers = 0, topk = 0, experts = 0;
  std::vector<int16_t> ids;  // size tokens * layers * topk

  int16_t at(uint32_t token, uint32_t layer, uint32_t k) const {
    return ids[(size_t(token) * layers + layer) * topk + k];
  }
  int16_t& at(uint32_t token, uint32_t layer, uint32_t k) { return ids[(size_t(token) * layers + layer) * topk + k]; }
  // The dimensions alone: none zero, experts <= 32767, topk <= experts,
  // tokens x layers x topk <= kMaxTraceIds (8 GiB of ids).
  Status ValidateShape() const;
  // Shapes consistent and every id in [-1, experts).
  Status Validate() const;
};

Status WriteTrace(const RoutingTrace& trace, const std::string& path);
Result<RoutingTrace> ReadTrace(const std::string& path);
Result<RoutingTrace> ParseTrace(const std::vector<uint8_t>& bytes);
std::vector<uint8_t> SerializeTrace(const RoutingTrace& trace);

}  // namespace te::moe
