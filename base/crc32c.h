// CRC-32C (Castagnoli): the checksum on serialized descriptors and the one
// te-bench and the tests use to verify received bytes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace te {

// Extends `crc` (0 for a fresh checksum) over `len` bytes at `data`.
uint32_t Crc32c(const void* data, size_t len, uint32_t crc = 0);

}  // namespace te
