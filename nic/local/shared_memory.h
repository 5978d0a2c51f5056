// SharedMemory: host memory that peers on this host can map.
//
// Memory an application allocates here is a sealed memfd mapping. When it is
// registered with an engine whose group has a same-host domain
// (nic/local/local_domain.h), a same-host initiator maps the target's
// memory once and writes it with memcpy: the speed of memory, against one
// process_vm_writev per run of writes for any other memory (which pins and
// copies page by page). Nothing else changes: the same registration,
// descriptor and checks, and memory from anywhere else still works.
//
// The memfd is sealed against shrinking (F_SEAL_SHRINK), so a peer that
// mapped it can never be made to fault (SIGBUS) by the owner truncating it;
// an initiator maps only memfds it finds sealed.
//
// Ownership: the SharedMemory owns the mapping and the fd; destroying it
// unmaps them (deregister every region in it first). A peer's mapping
// keeps the pages alive until that peer drops it (when the registration is
// gone, at its next write to that region's slot, or when it forgets this
// process). Thread-safe: Allocate and the lookups may run on any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>

#include "base/status.h"

namespace te::nic {

class SharedMemory {
 public:
  // `length` bytes (rounded up to pages), zero-filled, readable and writable.
  static Result<std::unique_ptr<SharedMemory>> Allocate(size_t length);
  ~SharedMemory();
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;

  void* data() const { return data_; }
  size_t size() const { return size_; }

  // Where [ptr, ptr + length) lives when it lies inside one live
  // SharedMemory of this process: the memfd and the offset of ptr in it.
  struct Backing {
    int fd;
    uint64_t offset;
  };
  static std::optional<Backing> Find(const void* ptr, size_t length);

 private:
  SharedMemory(void* data, size_t size, int fd) : data_(data), size_(size), fd_(fd) {}
  void* data_;
  size_t size_;
  int fd_;
};

}  // namespace te::nic
