#include "nic/local/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

namespace te::nic {
namespace {

// Live allocations of this process, by start address.
struct Registry {
  std::mutex mu;
  std::map<uintptr_t, std::pair<size_t, int>> by_start;  // start -> (size, fd)
};
Registry& TheRegistry() {
  static Registry* r = new Registry;  // never destroyed: used from destructors at exit
  return *r;
}

}  // namespace

Result<std::unique_ptr<SharedMemory>> SharedMemory::Allocate(size_t length) {
  if (length == 0) return InvalidArgument("SharedMemory::Allocate: length 0");
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  if (length > (size_t(1) << 46))
    return InvalidArgument("SharedMemory::Allocate: " + std::to_string(length) + " bytes");
  const size_t size = (length + page - 1) / page * page;
  const int fd = memfd_create("te-shared-memory", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return IoError(std::string("SharedMemory: memfd_create: ") + strerror(errno));
  if (ftruncate(fd, off_t(size)) != 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_SEAL) != 0) {
    const int e = errno;
    close(fd);
    return IoError("SharedMemory: sizing and sealing " + std::to_string(size) + " bytes: " + strerror(e));
  }
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    const int e = errno;
    close(fd);
    return IoError("SharedMemory: mapping " + std::to_string(size) + " bytes: " + strerror(e));
  }
  Registry& r = TheRegistry();
  {
    std::lock_guard<std::mutex> lock(r.mu);
    r.by_start[reinterpret_cast<uintptr_t>(p)] = {size, fd};
  }
  return std::unique_ptr<SharedMemory>(new SharedMemory(p, size, fd));
}

SharedMemory::~SharedMemory() {
  Registry& r = TheRegistry();
  {
    std::lock_guard<std::mutex> lock(r.mu);
    r.by_start.erase(reinterpret_cast<uintptr_t>(data_));
  }
  munmap(data_, size_);
  close(fd_);
}

std::optional<SharedMemory::Backing> SharedMemory::Find(const void* ptr, size_t length) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
  Registry& r = TheRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.by_start.upper_bound(p);
  if (it == r.by_start.begin()) return std::nullopt;
  --it;
  const auto [size, fd] = it->second;
  const uintptr_t offset = p - it->first;
  if (offset > size || length > size - offset) return std::nullopt;
  return Backing{fd, uint64_t(offset)};
}

}  // namespace te::nic
