#include "transfer/request_plan.h"

#include <algorithm>
#include <optional>
#include <string>

namespace te {
namespace {

// The checks run once per request or page; their messages are built out of
// line so that a passing check costs a comparison.
// "dst_offset 4096 + length 8192 exceeds dst region size 8192"
[[gnu::cold, gnu::noinline]] Status RangeError(const char* what, uint64_t offset, uint64_t length, uint64_t size) {
  return OutOfRange(std::string(what) + "_offset " + std::to_string(offset) + " + length " + std::to_string(length) +
                    " exceeds " + what + " region size " + std::to_string(size));
}
inline Status CheckRange(const char* what, uint64_t offset, uint64_t length, uint64_t size) {
  if (offset > size || length > size - offset) [[unlikely]]
    return RangeError(what, offset, length, size);
  return Status::Ok();
}

[[gnu::cold, gnu::noinline]] Status EmptyError(const char* request) {
  return InvalidArgument(std::string(request) + " of length 0 without an imm does nothing; give a length or an imm");
}
inline Status CheckImm(bool has_imm, uint64_t length, const char* request) {
  if (!has_imm && length == 0) [[unlikely]]
    return EmptyError(request);
  return Status::Ok();
}

// The local domains writes to `dst` are spread over: [first, first + count).
struct Lanes {
  uint32_t first = 0;
  uint32_t count = 1;
  uint32_t at(uint64_t i) const { return first + uint32_t(i); }
};
Lanes LanesFor(const RemoteRegion* dst, const PlanLimits& l) {
  if (dst && l.same_host_source && dst->same_host_lane()) return {*dst->same_host_lane(), 1};
  return {0, uint32_t(l.domains)};
}

// Appends `length` bytes as one or more writes no larger than `max_write`,
// each built in place (a PlannedWrite assembled on the stack and copied in
// stalls on store forwarding; this runs once per page). A zero-length
// piece becomes a single notification when it carries an imm.
struct Piece {
  uint32_t domain;
  const RemoteRegion* dst;
  uint64_t src_offset, dst_offset, length;
};
void AddSplit(std::vector<PlannedWrite>* out, const Piece& w, const std::optional<uint32_t>& imm, uint64_t max_write) {
  if (w.length == 0 && !imm) return;
  uint64_t done = 0;
  do {
    PlannedWrite& p = out->emplace_back();
    p.domain = w.domain;
    p.dst = w.dst;
    p.src_offset = w.src_offset + done;
    p.dst_offset = w.dst_offset + done;
    p.length = std::min(max_write, w.length - done);
    p.has_imm = imm.has_value();
    p.imm = imm.value_or(0);
    done += p.length;
  } while (done < w.length);
}

Status PlanSingle(const SingleWrite& r, const PlanLimits& l, std::vector<PlannedWrite>* out) {
  if (!r.src) return InvalidArgument("SingleWrite has no source region");
  if (!r.dst) return InvalidArgument("SingleWrite has no destination region");
  TE_RETURN_IF_ERROR(CheckRange("src", r.src_offset, r.length, r.src->length()));
  TE_RETURN_IF_ERROR(CheckRange("dst", r.dst_offset, r.length, r.dst->length()));
  TE_RETURN_IF_ERROR(CheckImm(r.imm.has_value(), r.length, "SingleWrite"));
  // Every lane gets a shard so that the immediate count (one per lane)
  // does not depend on the length; shards are aligned and not smaller than
  // min_shard_bytes, so short writes land on the first lanes whole.
  const Lanes lanes = LanesFor(r.dst.get(), l);
  const uint64_t n = lanes.count;
  uint64_t shard = (r.length + n - 1) / n;
  shard = std::max<uint64_t>(shard, l.min_shard_bytes);
  shard = (shard + kShardAlignment - 1) / kShardAlignment * kShardAlignment;
  out->reserve(n);
  for (uint64_t d = 0; d < n; ++d) {
    uint64_t begin = std::min(r.length, d * shard);
    uint64_t end = std::min(r.length, begin + shard);
    AddSplit(out, {lanes.at(d), r.dst.get(), r.src_offset + begin, r.dst_offset + begin, end - begin}, r.imm,
             l.max_write_bytes);
  }
  return Status::Ok();
}

Status PlanPaged(const PagedWrite& r, const PlanLimits& l, std::vector<PlannedWrite>* out) {
  if (!r.src) return InvalidArgument("PagedWrite has no source region");
  if (!r.dst) return InvalidArgument("PagedWrite has no destination region");
  if (r.src_pages.size() != r.dst_pages.size())
    return InvalidArgument("PagedWrite has " + std::to_string(r.src_pages.size()) + " source pages but " +
                           std::to_string(r.dst_pages.size()) +
                           " destination pages; the lists must be the same length");
  if (r.src_pages.empty()) return InvalidArgument("PagedWrite has no pages");
  if (r.page_length == 0) return InvalidArgument("PagedWrite page_length is 0");
  const size_t pages = r.src_pages.size();
  const Lanes lanes = LanesFor(r.dst.get(), l);
  out->reserve(pages);
  for (size_t i = 0; i < pages; ++i) {
    // Overflow-safe: indices are 32-bit and strides are checked against the
    // region, so the products cannot wrap for regions that fit in memory.
    const unsigned __int128 s = (unsigned __int128)r.src_pages[i] * r.src_stride + r.src_offset;
    const unsigned __int128 d = (unsigned __int128)r.dst_pages[i] * r.dst_stride + r.dst_offset;
    if (s + r.page_length > r.src->length())
      return OutOfRange("PagedWrite source page " + std::to_string(r.src_pages[i]) + " (entry " + std::to_string(i) +
                        ") at src_offset " + std::to_string(uint64_t(s)) + " + page_length " +
                        std::to_string(r.page_length) + " exceeds src region size " + std::to_string(r.src->length()));
    if (d + r.page_length > r.dst->length())
      return OutOfRange("PagedWrite destination page " + std::to_string(r.dst_pages[i]) + " (entry " +
                        std::to_string(i) + ") at dst_offset " + std::to_string(uint64_t(d)) + " + page_length " +
                        std::to_string(r.page_length) + " exceeds dst region size " + std::to_string(r.dst->length()));
    // Contiguous blocks of pages per lane.
    AddSplit(out, {lanes.at(i * lanes.count / pages), r.dst.get(), uint64_t(s), uint64_t(d), r.page_length}, r.imm,
             l.max_write_bytes);
  }
  return Status::Ok();
}

Status PlanScatter(const ScatterWrite& r, const PlanLimits& l, std::vector<PlannedWrite>* out) {
  if (!r.src) return InvalidArgument("ScatterWrite has no source region");
  if (r.targets.empty()) return InvalidArgument("ScatterWrite has no targets");
  out->reserve(r.targets.size());
  for (size_t t = 0; t < r.targets.size(); ++t) {
    const ScatterTarget& tg = r.targets[t];
    if (!tg.dst) return InvalidArgument("ScatterWrite target " + std::to_string(t) + " has no destination region");
    Status st = CheckRange("src", tg.src_offset, tg.length, r.src->length());
    if (st.ok()) st = CheckRange("dst", tg.dst_offset, tg.length, tg.dst->length());
    if (st.ok()) st = CheckImm(r.imm.has_value(), tg.length, "ScatterWrite target");
    if (!st.ok()) return st.WithContext("ScatterWrite target " + std::to_string(t));
    const Lanes lanes = LanesFor(tg.dst.get(), l);
    AddSplit(out, {lanes.at(t % lanes.count), tg.dst.get(), tg.src_offset, tg.dst_offset, tg.length}, r.imm,
             l.max_write_bytes);
  }
  return Status::Ok();
}

// A notification needs no source: it takes the destination's same-host lane
// whatever the request's source.
PlannedWrite Notification(const RemoteRegion* dst, uint64_t i, const PlanLimits& l, uint32_t imm) {
  PlanLimits any_source = l;
  any_source.same_host_source = true;
  const Lanes lanes = LanesFor(dst, any_source);
  PlannedWrite w;
  w.domain = lanes.at(i % lanes.count);
  w.dst = dst;
  w.has_imm = true;
  w.imm = imm;
  return w;
}

}  // namespace

Status PlanRequestInto(const Request& request, const PlanLimits& limits, std::vector<PlannedWrite>* out) {
  out->clear();
  if (limits.domains == 0) return Internal("plan limits name zero domains");
  if (limits.max_write_bytes == 0) return Internal("plan limits allow zero-byte writes only");
  struct Visitor {
    const PlanLimits& l;
    std::vector<PlannedWrite>* out;
    Status operator()(const SingleWrite& r) { return PlanSingle(r, l, out); }
    Status operator()(const PagedWrite& r) { return PlanPaged(r, l, out); }
    Status operator()(const ScatterWrite& r) { return PlanScatter(r, l, out); }
    Status operator()(const ImmOnly& r) {
      if (!r.dst) return InvalidArgument("ImmOnly has no destination region");
      out->push_back(Notification(r.dst.get(), 0, l, r.imm));
      return Status::Ok();
    }
    Status operator()(const Barrier& r) {
      if (r.peers.empty()) return InvalidArgument("Barrier has no peers");
      for (size_t i = 0; i < r.peers.size(); ++i) {
        if (!r.peers[i]) return InvalidArgument("Barrier peer " + std::to_string(i) + " is null");
        out->push_back(Notification(r.peers[i].get(), i, l, r.imm));
      }
      return Status::Ok();
    }
  };
  return std::visit(Visitor{limits, out}, request);
}

Result<std::vector<PlannedWrite>> PlanRequest(const Request& request, const PlanLimits& limits) {
  std::vector<PlannedWrite> out;
  TE_RETURN_IF_ERROR(PlanRequestInto(request, limits, &out));
  return out;
}

uint64_t CountImms(const std::vector<PlannedWrite>& writes) {
  return std::count_if(writes.begin(), writes.end(), [](const PlannedWrite& w) { return w.has_imm; });
}

}  // namespace te
