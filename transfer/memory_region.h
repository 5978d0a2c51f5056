// MemoryRegion: memory registered with every domain of an engine.
//
// Made by TransferEngine::RegisterMemory and held through LocalMr (a shared
// pointer). The registration ends when the last reference goes: requests in
// flight hold one, so a region never disappears under a write. The caller
// owns the memory itself and keeps it alive at least as long; memory from
// TransferEngine::AllocateMemory is owned by the region instead, and freed
// after the registration ends.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "nic/domain.h"

namespace te {

// What kind of memory a region is.
struct Memory {
  static Memory Host() { return Memory{}; }
  static Memory Cuda(int device) { return Memory{nic::MemoryKind{nic::MemoryKind::Type::kCuda, device}}; }
  nic::MemoryKind kind;
};

class MemoryRegion {
 public:
  // `storage`, when set, owns the memory and is released after the
  // registrations end.
  MemoryRegion(void* data, size_t length, Memory memory, std::vector<std::shared_ptr<nic::Domain>> domains,
               std::vector<nic::LocalRegistration> registrations, std::shared_ptr<void> storage = nullptr);
  ~MemoryRegion();
  MemoryRegion(const MemoryRegion&) = delete;
  MemoryRegion& operator=(const MemoryRegion&) = delete;

  uint8_t* data() const { return static_cast<uint8_t*>(data_); }
  size_t length() const { return length_; }
  const Memory& memory() const { return memory_; }

  // Per-domain registration (engine internal use). An entry with no handle
  // and key 0 is no registration: GPU memory the same-host domain could not
  // share (no CUDA driver, or memory CUDA IPC cannot export).
  const nic::LocalRegistration& registration(size_t domain) const { return regs_[domain]; }
  static bool Registered(const nic::LocalRegistration& r) { return r.mr != nullptr || r.rkey != 0; }
  // Whether this region was registered on exactly these domains (by the
  // engine that owns them): only then do its registrations mean anything
  // to that engine's posts.
  bool RegisteredOn(const std::vector<std::shared_ptr<nic::Domain>>& domains) const { return domains_ == domains; }

 private:
  void* data_;
  size_t length_;
  Memory memory_;
  std::vector<std::shared_ptr<nic::Domain>> domains_;  // keeps them open until deregistered
  std::vector<nic::LocalRegistration> regs_;
  std::shared_ptr<void> storage_;  // destroyed after ~MemoryRegion's body deregistered
};

using LocalMr = std::shared_ptr<const MemoryRegion>;

}  // namespace te
