// The KV transfer control messages (engine Send/Recv) and the description
// of an instance that peers and the registry pass around.
//
//   decoder -> prefiller  PULL       request id, immediate, decode rank, where
//                                    the context goes, the decode layout, the
//                                    descriptor of the decode cache, the pages,
//                                    and the prefill rank and layout the
//                                    decoder assumed (its immediate count
//                                    depends on them: a mismatch is FAILED)
//   decoder -> prefiller  CANCEL     request id, decode rank
//   prefiller -> decoder  CANCELLED  request id, prefill rank, immediates it
//                                    delivered (none follow)
//   prefiller -> decoder  FAILED     request id, prefill rank, immediates it
//                                    delivered, reason (none follow)
//   either way            HB         heartbeat
// Nothing says "done": the decoder counts the request's immediates.
//
// Encoding: one text line; PULL is followed by its pages as little-endian
// uint32s, so a request of thousands of pages fits one message.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"
#include "kvcache/kv_layout.h"
#include "transfer/mr_descriptor.h"

namespace te::kvcache {

struct KvMessage {
  enum class Kind { kPull, kCancel, kCancelled, kFailed, kHeartbeat };
  Kind kind = Kind::kHeartbeat;
  uint64_t request = 0;
  // Sender's rank in its instance; a prefiller answers with the rank the
  // PULL addressed (source_rank), so a misdirected PULL is still matched.
  uint32_t rank = 0;
  // PULL
  uint32_t imm = 0;
  uint64_t context_offset = 0, context_bytes = 0;
  KvLayout layout;
  std::string descriptor_hex;
  std::vector<uint32_t> pages;
  uint32_t source_rank = 0;
  KvLayout source_layout;
  // CANCELLED, FAILED
  uint64_t delivered = 0;
  // FAILED
  std::string reason;

  std::vector<uint8_t> Encode() const;
  static Result<KvMessage> Decode(std::span<const uint8_t> data);
};

// What a peer needs to reach an instance: its role, a name, its layout (tp =
// number of ranks) and every rank's engine address.
struct KvInstanceInfo {
  std::string role;  // "prefill" or "decode"
  std::string name;
  KvLayout layout;
  std::vector<EngineAddress> ranks;

  std::string Serialize() const;  // one line
  static Result<KvInstanceInfo> Parse(const std::string& text);
};

}  // namespace te::kvcache
