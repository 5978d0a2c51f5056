// Schedule: the static plan of a weight update, computed once from the two
// sides' ShardLayouts and reused every step.
//
// Every destination byte range is written by exactly one Transfer: which
// source rank writes it, from where in its region, to which destination rank
// and offset. A transfer is contiguous at the destination; at the source it
// is `length / src_piece` pieces of `src_piece` bytes, `src_stride` apart
// (re-sharding along another dimension makes the source side strided; the
// pusher gathers it into staging). Where several source ranks hold the same
// bytes (replicas), each transfer goes to the one with the least bytes so
// far, so the work spreads over sources and their NICs.
//
// The two sides' models are equal, or the destination takes some bf16
// parameters as fp8 with block scales (fp8_conversion.h): then transfers
// describe the destination's model as the sources hold it after quantizing
// (wire_source()), and the pusher quantizes before it writes.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "base/status.h"
#include "weightsync/fp8_conversion.h"
#include "weightsync/shard_layout.h"

namespace te::weightsync {

struct Transfer {
  uint32_t param = 0, src_rank = 0, dst_rank = 0;
  uint64_t dst_offset = 0, length = 0;
  uint64_t src_offset = 0, src_piece = 0, src_stride = 0;
};

struct ScheduleOptions {
  uint64_t max_transfer_bytes = 4 << 20;  // longer runs are cut, for balance and pipelining
  // Every contiguous piece of every row costs a step and possibly a Transfer
  // (56 B): 2^26 of them is about a second and at most 3.5 GiB of plan.
  // Layouts come from files and peers, so a plan needing more pieces is
  // refused (kInvalidArgument) rather than walked for minutes.
  uint64_t max_pieces = uint64_t(1) << 26;
};

class Schedule {
 public:
  // kInvalidArgument when the models neither match nor convert
  // (PlanFp8Conversion's errors).
  static Result<Schedule> Build(const ShardLayout& src, const ShardLayout& dst, const ScheduleOptions& options = {});

  // The sources' layout of what moves (src itself when nothing converts;
  // transfers' src_offset and param refer to it), and per destination
  // parameter where its bytes come from.
  const ShardLayout& wire_source() const { return wire_source_; }
  const std::vector<WireParam>& wire_params() const { return wire_params_; }
  bool converts() const { return AnyQuantized(wire_params_); }

  const std::vector<Transfer>& transfers() const { return transfers_; }
  // Indexes into transfers() of one source rank, in schedule order.
  const std::vector<size_t>& from(uint32_t src_rank) const { return by_source_[src_rank]; }
  uint64_t bytes_from(uint32_t src_rank) const;
  uint64_t bytes_to(uint32_t dst_rank) const;
  uint64_t total_bytes() const;
  // Transfers from `src_rank` to `dst_rank` (the immediates it sends there).
  uint64_t count(uint32_t src_rank, uint32_t dst_rank) const;

  // Recomputes what every transfer claims: each destination byte of every
  // shard written exactly once, nothing outside shards, and every piece's
  // first and last element read from the source position holding the same
  // element of the same parameter.
  Status Verify(const ShardLayout& src, const ShardLayout& dst) const;

  // A table: per source rank bytes and transfers, per destination rank bytes.
  std::string Summary() const;
  // Every transfer, one per line (up to `limit`).
  void Print(FILE* out, size_t limit) const;

 private:
  std::vector<Transfer> transfers_;
  std::vector<std::vector<size_t>> by_source_;
  ShardLayout wire_source_;
  std::vector<WireParam> wire_params_;
  uint32_t src_ranks_ = 0, dst_ranks_ = 0;
};

}  // namespace te::weightsync
