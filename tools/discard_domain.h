// DiscardDomain: a nic::Domain that moves no data. Every write completes at
// the next poll, and a write's immediate arrives back at the same domain, as
// if the engine wrote to itself through a NIC of infinite speed and zero
// latency. Only te-bench's engine-cost case uses it: with the NIC taken out,
// what remains is the engine's own CPU per write and per page (planning,
// queues, posting, completion, immediate counting, callbacks), the figure
// that says whether one worker core can feed a given NIC.
//
// Threading: posts and polls come from the engine's worker only;
// registration and addresses are stateless.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "nic/domain.h"

namespace te::tools {

class DiscardDomain final : public nic::Domain {
 public:
  explicit DiscardDomain(size_t depth = 1024) {
    info_.provider = "discard";
    info_.domain_name = "discard";
    info_.max_write_bytes = size_t(1) << 40;
    info_.max_message_bytes = 4096;
    info_.tx_depth = depth;
    info_.virtual_addressing = true;
  }
  const nic::DomainInfo& info() const override { return info_; }
  std::vector<uint8_t> address() const override { return {'d', 'i', 's', 'c', 'a', 'r', 'd'}; }
  Result<nic::PeerAddr> AddPeer(std::span<const uint8_t>) override { return nic::PeerAddr(0); }
  Result<nic::LocalRegistration> Register(void* ptr, size_t, nic::MemoryKind) override {
    nic::LocalRegistration r;
    r.rkey = 1;
    r.remote_base = reinterpret_cast<uint64_t>(ptr);
    return r;
  }
  Status Deregister(const nic::LocalRegistration&) override { return Status::Ok(); }
  Status PostWrite(const nic::WriteOp& op) override {
    done_.push_back({op.context, op.has_imm, op.imm});
    return Status::Ok();
  }
  Status PostSend(nic::PeerAddr, std::span<const uint8_t>, void* context) override {
    done_.push_back({context, false, 0});
    return Status::Ok();
  }
  int Poll(nic::CompletionHandler& handler, int max) override {
    int n = 0;
    while (n < max && head_ < done_.size()) {
      const Done d = done_[head_++];
      handler.OnSendDone(d.context);
      if (d.has_imm) handler.OnImm(d.imm);
      ++n;
    }
    // Drop what was read once it is half the vector: writes posted between
    // polls would otherwise grow it without bound (page faults in the
    // figure).
    if (head_ > 0 && 2 * head_ >= done_.size()) {
      done_.erase(done_.begin(), done_.begin() + ptrdiff_t(head_));
      head_ = 0;
    }
    return n;
  }

 private:
  struct Done {
    void* context;
    bool has_imm;
    uint32_t imm;
  };
  nic::DomainInfo info_;
  std::vector<Done> done_;
  size_t head_ = 0;
};

}  // namespace te::tools
