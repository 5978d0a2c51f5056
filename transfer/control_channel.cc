#include "transfer/control_channel.h"

#include <cstring>
#include <string>

namespace te {

std::vector<uint8_t> EncodeControlFrame(std::span<const uint8_t> sender, std::span<const uint8_t> payload) {
  std::vector<uint8_t> frame(ControlOverhead(sender.size()) + payload.size());
  const uint32_t magic = kControlMagic;
  const uint16_t addr_len = uint16_t(sender.size());
  std::memcpy(frame.data(), &magic, kControlMagicBytes);
  std::memcpy(frame.data() + kControlMagicBytes, &addr_len, kControlAddressLengthBytes);
  if (!sender.empty()) std::memcpy(frame.data() + kControlHeaderBytes, sender.data(), sender.size());
  if (!payload.empty()) std::memcpy(frame.data() + kControlHeaderBytes + sender.size(), payload.data(), payload.size());
  return frame;
}

Result<ControlFrame> DecodeControlFrame(std::span<const uint8_t> frame) {
  if (frame.size() < kControlHeaderBytes)
    return InvalidArgument("control frame of " + std::to_string(frame.size()) + " bytes is shorter than its " +
                           std::to_string(kControlHeaderBytes) + "-byte header");
  uint32_t magic = 0;
  uint16_t addr_len = 0;
  std::memcpy(&magic, frame.data(), kControlMagicBytes);
  std::memcpy(&addr_len, frame.data() + kControlMagicBytes, kControlAddressLengthBytes);
  if (magic != kControlMagic) return InvalidArgument("control frame has a bad magic");
  if (frame.size() - kControlHeaderBytes < addr_len)
    return InvalidArgument("control frame of " + std::to_string(frame.size()) + " bytes claims a " +
                           std::to_string(addr_len) + "-byte sender address");
  auto from = EngineAddress::Deserialize(frame.subspan(kControlHeaderBytes, addr_len));
  if (!from.ok()) return from.status().WithContext("control frame's sender address");
  return ControlFrame{std::move(from).value(), frame.subspan(kControlHeaderBytes + addr_len)};
}

}  // namespace te
