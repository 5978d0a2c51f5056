// EpConfig: the shape of one expert-parallel group's dispatch/combine, the
// same on every rank (Connect checks it).
#pragma once

#include <chrono>
#include <cstdint>
#include <limits>

#include "base/status.h"
#include "transfer/imm_ranges.h"

namespace te::moe {

// How token activations travel. Combine outputs are always bf16.
enum class Payload : uint8_t {
  kBf16 = 0,     // hidden x 2 bytes per token
  kFp8E4M3 = 1,  // hidden bytes plus one float scale per 128 elements
};
const char* PayloadName(Payload p);

struct EpConfig {
  uint32_t ranks = 1;
  uint32_t rank = 0;
  uint32_t experts = 0;     // global experts of the layer
  uint32_t topk = 0;        // experts per token
  uint32_t hidden = 0;      // elements per token (a multiple of 128 for fp8)
  uint32_t max_tokens = 0;  // tokens per rank per dispatch; buffers are sized for it
  Payload payload = Payload::kBf16;
  // Receive slot of each source rank, in tokens: written without waiting for
  // anyone's counts. 0 means ceil(max_tokens / 2).
  uint32_t private_tokens = 0;
  // Shared overflow region for what exceeds the private slots, placed by the
  // counts. kWorstCase sizes it so no routing can exceed it; a smaller value
  // saves memory and makes a dispatch that needs more fail on every rank
  // alike with kUnavailable.
  static constexpr uint32_t kWorstCase = std::numeric_limits<uint32_t>::max();
  uint32_t overflow_tokens = kWorstCase;
  // Immediates used: imm_base + 0 .. 5 by EpDispatcher, + 6 .. 9 by
  // LowLatencyDispatcher (transfer/imm_ranges.h), so both fit one engine.
  uint32_t imm_base = kMoeImms.base;
  // A peer that sends nothing for this long fails the call with kTimeout.
  std::chrono::milliseconds timeout{10000};

  Status Validate() const;
  uint32_t private_slot_tokens() const { return private_tokens ? private_tokens : (max_tokens + 1) / 2; }
  uint64_t overflow_slot_tokens() const;
  size_t token_bytes() const { return payload == Payload::kBf16 ? size_t(hidden) * 2 : hidden; }
  size_t scale_count() const { return payload == Payload::kFp8E4M3 ? hidden / 128 : 0; }
};

}  // namespace te::moe
