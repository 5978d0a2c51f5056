#include "weightsync/weights_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <new>

namespace te::weightsync {

Result<std::unique_ptr<WeightsMemory>> WeightsMemory::Create(const std::string& path, uint64_t slot_bytes) {
  if (slot_bytes == 0) return InvalidArgument("slot_bytes must be positive");
  slot_bytes = (slot_bytes + 4095) & ~uint64_t(4095);
  const size_t bytes = kHeaderBytes + 2 * slot_bytes;
  void* p;
  // Populated now: the memory is the receiver's for its whole life, and an
  // update should not pay first-touch page faults (in the 1 GiB bench they
  // were a fifth of the CPU of the first two updates).
  std::unique_ptr<SharedHostMemory> shared;
  if (path.empty()) {
    TE_ASSIGN_OR_RETURN(shared, AllocateSharedHostMemory(bytes));
    p = shared->data();
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    for (size_t at = 0; at < bytes; at += page) static_cast<volatile uint8_t*>(p)[at] = 0;  // zero-filled already
  } else {
    int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return IoError("cannot create " + path + ": " + strerror(errno));
    if (ftruncate(fd, off_t(bytes)) != 0) {
      close(fd);
      return IoError("cannot size " + path + " to " + std::to_string(bytes) + " bytes: " + strerror(errno));
    }
    p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    close(fd);
  }
  if (p == MAP_FAILED) return IoError("cannot map " + std::to_string(bytes) + " bytes: " + strerror(errno));
  auto* h = new (p) WeightsHeader{};
  std::memcpy(h->magic, "TEWSHM1", 8);
  h->slot_bytes = slot_bytes;
  std::unique_ptr<WeightsMemory> m(new WeightsMemory(static_cast<uint8_t*>(p), bytes, path));
  m->shared_ = std::move(shared);
  return m;
}

Result<std::unique_ptr<WeightsMemory>> WeightsMemory::Open(const std::string& path) {
  int fd = open(path.c_str(), O_RDWR);
  if (fd < 0) return NotFound("cannot open " + path + ": " + strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0 || size_t(st.st_size) < kHeaderBytes) {
    close(fd);
    return InvalidArgument(path + " is not a weights file (too small)");
  }
  void* p = mmap(nullptr, size_t(st.st_size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return IoError("cannot map " + path + ": " + strerror(errno));
  auto* h = static_cast<WeightsHeader*>(p);
  if (std::memcmp(h->magic, "TEWSHM1", 8) != 0 || kHeaderBytes + 2 * h->slot_bytes != size_t(st.st_size)) {
    munmap(p, size_t(st.st_size));
    return InvalidArgument(path + " is not a weights file (bad magic or size)");
  }
  return std::unique_ptr<WeightsMemory>(new WeightsMemory(static_cast<uint8_t*>(p), size_t(st.st_size), path));
}

WeightsMemory::~WeightsMemory() {
  if (!shared_) munmap(base_, bytes_);
}

Status WeightsMemory::Read(const std::function<void(uint64_t, const uint8_t*)>& fn, int attempts) const {
  for (int i = 0; i < attempts; ++i) {
    const uint64_t v = published();
    if (v == 0) return NotFound("no complete version yet");
    fn(v, slot(v));
    std::atomic_thread_fence(std::memory_order_acquire);  // the reads above happen before the check
    // A writer of this slot (v + 2) starts only after raising `begun`.
    if (header()->begun.load(std::memory_order_acquire) < v + 2) return Status::Ok();
  }
  return Unavailable("updates overtook the reader " + std::to_string(attempts) + " times");
}

}  // namespace te::weightsync
