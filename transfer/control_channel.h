// The control channel: two-sided messages between engines (TransferEngine::
// Send and the receive handler), and how one is framed on the wire.
//
// A frame is
//   [magic u32 = kControlMagic][sender address length u16][sender address]
//   [payload]
// in host byte order (both ends run this code). The receiver learns who sent
// a message from the frame itself: an RDM endpoint reports no source
// address. The address is not authenticated (docs/RELIABILITY.md).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "base/status.h"
#include "transfer/mr_descriptor.h"

namespace te {

// Receives a control message; `data` is valid only during the call.
using RecvHandler = std::function<void(const EngineAddress& from, std::span<const uint8_t> data)>;

inline constexpr uint32_t kControlMagic = 0x4d455445;  // "ETEM"
inline constexpr size_t kControlMagicBytes = 4;
inline constexpr size_t kControlAddressLengthBytes = 2;
inline constexpr size_t kControlHeaderBytes = kControlMagicBytes + kControlAddressLengthBytes;

// Bytes a frame adds in front of the payload for a sender address of
// `address_bytes`.
inline size_t ControlOverhead(size_t address_bytes) { return kControlHeaderBytes + address_bytes; }

// The frame of `payload` from the engine whose serialized address is
// `sender` (at most 65535 bytes, which EngineAddress::Validate ensures).
std::vector<uint8_t> EncodeControlFrame(std::span<const uint8_t> sender, std::span<const uint8_t> payload);

struct ControlFrame {
  EngineAddress from;
  std::span<const uint8_t> payload;  // into the decoded bytes
};
// Checks the magic, the lengths and the sender address; an error names what
// is wrong. Never reads outside `frame`.
Result<ControlFrame> DecodeControlFrame(std::span<const uint8_t> frame);

}  // namespace te
