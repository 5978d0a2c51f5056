// nic::Domain: one NIC endpoint set behind one small interface.
//
// A Domain is what the transfer engine drives for one NIC: for libfabric one
// fabric + domain + RDM endpoint + CQ + AV. It offers registration, one-sided
// writes with an optional 32-bit immediate, two-sided control messages, and a
// poll that reports completions. Every provider quirk (mr_mode bits, key
// kinds, CQ data width, zero-byte writes) lives behind this interface.
//
// Threading: a Domain may be called from several threads (registration from
// application threads, post/poll from the engine's worker); implementations
// make that safe. Completion handlers run on the thread that calls poll().
//
// Nothing here includes a libfabric or verbs header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "base/status.h"

namespace te::nic {

// Where registered memory lives.
struct MemoryKind {
  enum class Type { kHost, kCuda } type = Type::kHost;
  int device = 0;  // CUDA device ordinal when type == kCuda
};

// One registration on one domain.
struct LocalRegistration {
  void* mr = nullptr;        // provider handle (opaque)
  void* desc = nullptr;      // local descriptor passed with posts (FI_MR_LOCAL)
  uint64_t rkey = 0;         // key a peer uses to write into the region
  uint64_t remote_base = 0;  // what a peer adds offsets to: the virtual address
                             // under FI_MR_VIRT_ADDR, 0 where the provider
                             // addresses regions by offset
};

// A peer as this domain knows it (an address-vector entry).
using PeerAddr = uint64_t;

// One one-sided write: `length` bytes from `local` to `remote_addr` under
// `rkey` at `peer`. A zero-length write with an immediate is a notification.
struct WriteOp {
  const void* local = nullptr;
  void* local_desc = nullptr;
  size_t length = 0;
  PeerAddr peer = 0;
  uint64_t remote_addr = 0;
  uint64_t rkey = 0;
  bool has_imm = false;
  uint32_t imm = 0;
  void* context = nullptr;  // returned in the completion
};

// What poll() reports. Handlers must not call back into the same Domain's
// poll(); posting from a handler is allowed.
class CompletionHandler {
 public:
  virtual ~CompletionHandler() = default;
  // A write or send posted with `context` finished locally.
  virtual void OnSendDone(void* context) = 0;
  // A write or send posted with `context` failed; `status` names the
  // provider's message.
  virtual void OnSendError(void* context, const Status& status) = 0;
  // A peer's write with immediate `imm` landed in our memory.
  virtual void OnImm(uint32_t imm) = 0;
  // A control message arrived. `data` is valid only during the call.
  virtual void OnRecv(std::span<const uint8_t> data) = 0;
  // An error without an operation to blame (e.g. a failed receive).
  virtual void OnDomainError(const Status& status) = 0;
};

// Facts about the opened domain that the engine plans with.
struct DomainInfo {
  std::string provider;             // e.g. "tcp;ofi_rxm"
  std::string domain_name;          // e.g. "lo"
  size_t max_write_bytes = 0;       // largest single write the provider accepts
  size_t max_message_bytes = 0;     // largest control message payload
  size_t tx_depth = 0;              // how many operations may be outstanding
  bool virtual_addressing = false;  // FI_MR_VIRT_ADDR
  bool provider_keys = false;       // FI_MR_PROV_KEY
  bool local_descriptors = false;   // FI_MR_LOCAL
  bool hmem = false;                // can register device memory
};

class Domain {
 public:
  virtual ~Domain() = default;

  virtual const DomainInfo& info() const = 0;

  // Opaque bytes a peer passes to AddPeer() to reach this domain.
  virtual std::vector<uint8_t> address() const = 0;

  // Resolves a peer's address bytes (from its address()). Idempotent: the
  // same bytes give the same PeerAddr.
  virtual Result<PeerAddr> AddPeer(std::span<const uint8_t> address) = 0;
  // Forgets a peer AddPeer resolved, freeing its slot in the provider's
  // peer table. The caller guarantees nothing is queued or posted to it.
  // Domains without a bounded table may keep the entry.
  virtual Status RemovePeer(PeerAddr peer) { return Status::Ok(); }

  virtual Result<LocalRegistration> Register(void* ptr, size_t length, MemoryKind kind) = 0;
  virtual Status Deregister(const LocalRegistration& reg) = 0;

  // Posts one write. kUnavailable means the send queue is full right now
  // (back-pressure): poll and post again; nothing was posted. kNotPosted
  // means the peer is known dead: nothing was posted, and nothing will be.
  virtual Status PostWrite(const WriteOp& op) = 0;

  // Posts `ops` in order; *posted says how many went (always a prefix).
  // Providers that can chain work requests post a run to one peer in one
  // call (verbs: one ibv_post_send). Errors as PostWrite, for the first op
  // that did not go; kUnavailable when back-pressure stopped the run.
  virtual Status PostWrites(std::span<const WriteOp> ops, size_t* posted) {
    *posted = 0;
    for (const WriteOp& op : ops) {
      Status s = PostWrite(op);
      if (!s.ok()) return s;
      ++*posted;
    }
    return Status::Ok();
  }

  // Posts a control message (copied; the caller's buffer is free on return).
  // kUnavailable on back-pressure, as for PostWrite.
  virtual Status PostSend(PeerAddr peer, std::span<const uint8_t> data, void* context) = 0;

  // Reaps up to `max` completions into `handler`; returns how many.
  virtual int Poll(CompletionHandler& handler, int max) = 0;
};

}  // namespace te::nic
