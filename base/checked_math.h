// Overflow-checked size arithmetic for everything that parses peer or file
// bytes.
//
// A size read from the wire is hostile: `n * 4` wraps for n = 2^62 and a
// check written with it passes. Every parser computes sizes through these
// helpers, which say whether the exact result fits, so a wrap turns into an
// error instead of a small allocation followed by a large write (or a large
// allocation that throws).
//
//   uint64_t bytes;
//   if (!CheckedMul(n, 4, &bytes) || bytes != payload.size()) return error;
//   TE_ASSIGN_OR_RETURN(uint64_t total, CheckedProduct("region", {a, b, c}, kMaxRegionBytes));
#pragma once

#include <charconv>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>

#include "base/status.h"

namespace te {

// *out = a * b; false (and *out untouched) when the product does not fit.
inline bool CheckedMul(uint64_t a, uint64_t b, uint64_t* out) {
  uint64_t r;
  if (__builtin_mul_overflow(a, b, &r)) return false;
  *out = r;
  return true;
}

// *out = a + b; false (and *out untouched) when the sum does not fit.
inline bool CheckedAdd(uint64_t a, uint64_t b, uint64_t* out) {
  uint64_t r;
  if (__builtin_add_overflow(a, b, &r)) return false;
  *out = r;
  return true;
}

// The product of `factors`, refused when it overflows or exceeds `limit`.
// The message names `what`, every factor and the limit.
inline Result<uint64_t> CheckedProduct(const std::string& what, std::initializer_list<uint64_t> factors,
                                       uint64_t limit = ~uint64_t(0)) {
  uint64_t p = 1;
  bool fits = true;
  for (uint64_t f : factors) fits = fits && CheckedMul(p, f, &p);
  if (fits && p <= limit) return p;
  std::string expr;
  for (uint64_t f : factors) expr += (expr.empty() ? "" : " x ") + std::to_string(f);
  return InvalidArgument(what + " of " + expr + (fits ? " = " + std::to_string(p) : std::string()) +
                         (fits ? " exceeds the limit of " : " overflows 64 bits; the limit is ") +
                         std::to_string(limit));
}

// True when [offset, offset + length) lies inside [0, size).
inline bool RangeWithin(uint64_t offset, uint64_t length, uint64_t size) {
  return offset <= size && length <= size - offset;
}

// A decimal number of at most 64 bits, the whole of `text` (no sign, no
// spaces); nullopt otherwise. For flags and files: std::stoul throws on
// bad input, and an exception must not escape a tool or a parser.
inline std::optional<uint64_t> ParseUint64(std::string_view text) {
  uint64_t v = 0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, v);
  if (text.empty() || ec != std::errc() || ptr != end) return std::nullopt;
  return v;
}

// The largest region any parser accepts: 64 TiB, far beyond one host's
// memory and far below 2^64, so sums of a few such sizes cannot wrap.
inline constexpr uint64_t kMaxRegionBytes = uint64_t(1) << 46;

}  // namespace te
