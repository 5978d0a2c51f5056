// Host memory that peers on this host write at memory speed.
//
//   auto buf = te::AllocateSharedHostMemory(64 << 20).value();
//   auto mr = engine->RegisterMemory(buf->data(), buf->size()).value();
//
// Register memory from here when same-host peers write into it (a KV cache
// another process fills, a weight-update buffer of a colocated trainer):
// through the same-host domain (provider "local", or a NIC provider with
// EngineOptions::same_host) an initiator then maps the region once and
// writes it with memcpy, instead of one cross-memory-attach system call per
// run of writes, which pins the target's pages on every call. Any other
// memory works as before; peers on other hosts see no difference.
// nic/local/shared_memory.h has the contract (ownership, sealing).
#pragma once

#include <cstddef>
#include <memory>

#include "base/status.h"
#include "nic/local/shared_memory.h"

namespace te {

using SharedHostMemory = nic::SharedMemory;

inline Result<std::unique_ptr<SharedHostMemory>> AllocateSharedHostMemory(size_t bytes) {
  return nic::SharedMemory::Allocate(bytes);
}

}  // namespace te
