// Helpers shared by the engine integration tests.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <vector>

#include "support/wait_until.h"
#include "transfer/transfer_engine.h"

namespace te::testing {

using namespace std::chrono_literals;

// Every 8-byte word holds (salt, offset): a byte in the wrong place, from the
// wrong request, or missing, breaks the comparison.
inline void FillPattern(uint8_t* p, size_t n, uint32_t salt) {
  for (size_t i = 0; i + 8 <= n; i += 8) {
    uint64_t v = (uint64_t(salt) << 40) ^ i ^ 0x5bd1e995;
    std::memcpy(p + i, &v, 8);
  }
  for (size_t i = n & ~size_t(7); i < n; ++i) p[i] = uint8_t(salt + i);
}

// `provider` may end in "+local": a group of that provider's domains and the
// same-host domain beside them (EngineOptions::SetProvider). A bare provider
// is exercised alone (kNic), as the tools do.
inline EngineOptions Options(const std::string& provider, int domains = 1) {
  EngineOptions o;
  o.same_host = SameHost::kNic;
  o.SetProvider(provider);
  o.domains = domains;
  o.request_timeout = 5000ms;
  return o;
}

// Waits for a counter; fails the test (not hangs) on timeout.
inline void WaitDone(const CompletionCounter& c, uint64_t n, std::chrono::seconds t = 20s) {
  ASSERT_TRUE(c.WaitFinished(n, t)) << c.finished() << " of " << n << " requests finished";
  ASSERT_EQ(c.failed(), 0u) << c.first_error().ToString();
}

}  // namespace te::testing
