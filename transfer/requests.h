// The requests a TransferEngine carries out. All are one-sided writes (or
// zero-byte notifications) into regions a peer registered and described.
//
// Immediates. A request with an `imm` puts that 32-bit value on every write
// it posts, so the receiver can count arrivals without any ordering between
// writes. TransferEngine::ExpectedImmCount() says how many a request
// delivers; the rules, so a receiver can compute it too, are:
//   SingleWrite  one per lane the sender uses to reach the destination
//                (zero-length shards still notify): 1 to a peer reached
//                through the same-host domain, else one per NIC domain of
//                the sender's group; times the split of shards larger than
//                the provider's largest write (none on tcp, shm, efa in
//                practice)
//   PagedWrite   one per page
//   ScatterWrite one per target (to that target's peer)
//   ImmOnly      one
//   Barrier      one per peer
#pragma once

#include <cstdint>
#include <optional>
#include <variant>
#include <vector>

#include "transfer/memory_region.h"
#include "transfer/remote_region.h"

namespace te {

// `length` bytes from src[src_offset] to dst[dst_offset], sharded over the
// group's domains.
struct SingleWrite {
  LocalMr src;
  uint64_t src_offset = 0;
  uint64_t length = 0;
  RemoteMr dst;
  uint64_t dst_offset = 0;
  std::optional<uint32_t> imm;
};

// Page i goes from src[src_offset + src_pages[i] * src_stride] to
// dst[dst_offset + dst_pages[i] * dst_stride], `page_length` bytes each.
// Pages are spread over the group's domains in contiguous blocks.
struct PagedWrite {
  LocalMr src;
  std::vector<uint32_t> src_pages;
  uint64_t src_stride = 0;
  uint64_t src_offset = 0;
  RemoteMr dst;
  std::vector<uint32_t> dst_pages;
  uint64_t dst_stride = 0;
  uint64_t dst_offset = 0;
  uint64_t page_length = 0;
  std::optional<uint32_t> imm;
};

// One source region to many peers: target t writes `length` bytes from
// src[src_offset] to its dst[dst_offset]. Targets are spread over domains.
struct ScatterTarget {
  RemoteMr dst;
  uint64_t src_offset = 0;
  uint64_t dst_offset = 0;
  uint64_t length = 0;
};
struct ScatterWrite {
  LocalMr src;
  std::vector<ScatterTarget> targets;
  std::optional<uint32_t> imm;
};

// A zero-byte write carrying `imm`: a notification.
struct ImmOnly {
  RemoteMr dst;
  uint32_t imm = 0;
};

// A notification carrying `imm` to each of `peers`.
struct Barrier {
  std::vector<RemoteMr> peers;
  uint32_t imm = 0;
};

using Request = std::variant<SingleWrite, PagedWrite, ScatterWrite, ImmOnly, Barrier>;

}  // namespace te
