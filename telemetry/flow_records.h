// Synthetic flow telemetry shared by te-telemetry and the tests: 13-byte
// 5-tuple keys and 5-hop path traces (4-byte switch ids), both derived from
// (seed, flow index) so a reader can regenerate what a reporter wrote.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>

namespace te::telemetry {

inline constexpr size_t kFlowKeyBytes = 13;
inline constexpr size_t kPathHops = 5;
inline constexpr size_t kPathValueBytes = kPathHops * 4;

inline uint64_t FlowMix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// src ip, dst ip, src port, dst port, protocol.
inline std::array<uint8_t, kFlowKeyBytes> FlowKey(uint64_t seed, uint64_t flow) {
  std::array<uint8_t, kFlowKeyBytes> k{};
  const uint64_t a = FlowMix(seed ^ (flow * 2 + 1)), b = FlowMix(a);
  std::memcpy(k.data(), &a, 8);      // both addresses
  std::memcpy(k.data() + 8, &b, 4);  // both ports
  k[12] = (flow & 1) ? 6 : 17;       // tcp or udp
  return k;
}

// Switch ids along the path; `version` lets a test tell rewrites apart.
inline std::array<uint8_t, kPathValueBytes> PathTrace(uint64_t seed, uint64_t flow, uint32_t version = 0) {
  std::array<uint8_t, kPathValueBytes> v{};
  uint64_t h = FlowMix(seed * 31 + flow);
  for (size_t i = 0; i < kPathHops; ++i) {
    const uint32_t sw = i == kPathHops - 1 ? version : uint32_t(FlowMix(h + i));
    std::memcpy(v.data() + 4 * i, &sw, 4);
  }
  return v;
}

}  // namespace te::telemetry
