// AlignedBuffer: page-aligned heap memory that frees itself.
//
// For buffers handed to NICs (registration works on whole pages, and
// aligned buffers keep DMA off shared cache lines). The size is rounded up
// to the alignment, as std::aligned_alloc requires.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "base/status.h"

namespace te {

class AlignedBuffer {
 public:
  static constexpr size_t kPage = 4096;

  AlignedBuffer() = default;
  // `alignment` is a power of two; `bytes` > 0. `zero`: clear it (pages are
  // touched now rather than on first use).
  static Result<AlignedBuffer> Allocate(size_t bytes, size_t alignment = kPage, bool zero = true) {
    if (bytes == 0 || alignment == 0 || (alignment & (alignment - 1)) != 0 || bytes > SIZE_MAX - alignment)
      return InvalidArgument("AlignedBuffer of " + std::to_string(bytes) + " bytes, alignment " +
                             std::to_string(alignment) + ": need bytes > 0 and a power-of-two alignment");
    const size_t rounded = (bytes + alignment - 1) & ~(alignment - 1);
    void* p = std::aligned_alloc(alignment, rounded);
    if (p == nullptr) return Unavailable("cannot allocate " + std::to_string(rounded) + " bytes");
    if (zero) std::memset(p, 0, rounded);
    AlignedBuffer b;
    b.data_.reset(static_cast<uint8_t*>(p));
    b.size_ = bytes;
    return b;
  }

  uint8_t* data() const { return data_.get(); }
  size_t size() const { return size_; }

 private:
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> data_;
  size_t size_ = 0;
};

}  // namespace te
