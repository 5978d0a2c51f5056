// Turning a request into the writes the engine posts: validation (bounds,
// arguments), sharding over domains, and the immediate count. Each
// destination decides its lanes (remote_region.h): its same-host domain
// alone when it has one and the source is registered there too, else the
// NIC domains; a request's writes are spread over the lanes of their own
// destination. A pure function of the request and the group's limits, so it runs on the
// submitting thread and is unit-tested without a NIC.
#pragma once

#include <cstdint>
#include <vector>

#include "base/status.h"
#include "transfer/requests.h"

namespace te {

struct PlanLimits {
  size_t domains = 1;                // NIC domains in the group (lanes 0 .. domains-1)
  bool same_host_source = true;      // the source is registered on the same-host domain
  uint64_t max_write_bytes = ~0ull;  // largest single write on any domain
  uint64_t min_shard_bytes = 64 * 1024;
};

// One write, before addresses are resolved.
struct PlannedWrite {
  uint32_t domain = 0;  // local domain that posts it
  const RemoteRegion* dst = nullptr;
  uint64_t src_offset = 0;  // into the request's source region
  uint64_t dst_offset = 0;
  uint64_t length = 0;
  bool has_imm = false;
  uint32_t imm = 0;
};

// Alignment of SingleWrite shard boundaries.
inline constexpr uint64_t kShardAlignment = 4096;

Result<std::vector<PlannedWrite>> PlanRequest(const Request& request, const PlanLimits& limits);
// The same into `out` (cleared first), so that a caller planning request
// after request reuses one vector (Submit: no allocation per request).
Status PlanRequestInto(const Request& request, const PlanLimits& limits, std::vector<PlannedWrite>* out);

// Immediates `writes` deliver (those with has_imm).
uint64_t CountImms(const std::vector<PlannedWrite>& writes);

}  // namespace te
