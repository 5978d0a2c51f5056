#include "moe/ep_config.h"

#include <algorithm>
#include <string>

namespace te::moe {

const char* PayloadName(Payload p) { return p == Payload::kBf16 ? "bf16" : "fp8"; }

uint64_t EpConfig::overflow_slot_tokens() const {
  // Worst case: every source sends every token here, beyond its private slot.
  const uint64_t worst = uint64_t(ranks) * (max_tokens - std::min(max_tokens, private_slot_tokens()));
  return overflow_tokens == kWorstCase ? worst : std::min<uint64_t>(overflow_tokens, worst);
}

Status EpConfig::Validate() const {
  auto bad = [](const std::string& what) { return InvalidArgument("EpConfig: " + what); };
  if (ranks == 0 || ranks > 1024) return bad("ranks " + std::to_string(ranks) + " outside [1, 1024]");
  if (rank >= ranks) return bad("rank " + std::to_string(rank) + " outside [0, " + std::to_string(ranks) + ")");
  if (experts == 0 || experts > 65535) return bad("experts " + std::to_string(experts) + " outside [1, 65535]");
  if (topk == 0 || topk > 64 || topk > experts)
    return bad("topk " + std::to_string(topk) + " outside [1, min(64, experts " + std::to_string(experts) + ")]");
  if (hidden == 0 || hidden > (1u << 20)) return bad("hidden " + std::to_string(hidden) + " outside [1, 2^20]");
  if (hidden % 2) return bad("hidden " + std::to_string(hidden) + " must be even");
  if (payload == Payload::kFp8E4M3 && hidden % 128)
    return bad("fp8 payload needs hidden a multiple of 128 (one scale per 128), got " + std::to_string(hidden));
  if (max_tokens == 0 || max_tokens > (1u << 20))
    return bad("max_tokens " + std::to_string(max_tokens) + " outside [1, 2^20]");
  if (private_tokens > max_tokens)
    return bad("private_tokens " + std::to_string(private_tokens) + " exceeds max_tokens " +
               std::to_string(max_tokens));
  if (timeout.count() <= 0) return bad("timeout must be positive");
  return Status::Ok();
}

}  // namespace te::moe
