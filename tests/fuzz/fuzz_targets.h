// The fuzz targets (one per parser of peer or file bytes) and their seeds.
// Run by tests/fuzz/fuzz_test.cc (a seeded mutation driver in GoogleTest,
// bounded in time, run in CI under ASan/UBSan) and by libFuzzer through
// tests/fuzz/libfuzzer_main.cc (clang, TE_LIBFUZZER; scripts/fuzz.sh).
#pragma once

#include <cstdint>
#include <ostream>
#include <span>
#include <string>
#include <vector>

#include "moe/ep_config.h"

namespace te::fuzz {

// Formats that end in a CRC-32C of everything before it: the driver fixes
// the CRC of half its mutants so they reach the parser's deeper checks.
enum class Crc { kNone, kTrailingCrc32c };

struct Target {
  const char* name;
  void (*run)(std::span<const uint8_t> bytes);
  Crc crc;
};

const std::vector<Target>& Targets();

// The group shape of the moe_records target (ranks 2, 8 experts, top-3,
// hidden 128), bf16 or fp8.
moe::EpConfig MoeRecordShape(bool fp8);
// The info rank r of the moe_peer_info target's 4-rank group gives its peers
// (a low-latency dispatcher's fields, a short descriptor hex).
std::string MoePeerInfoOfRank(uint32_t r);
inline void PrintTo(const Target& t, std::ostream* os) { *os << t.name; }

// Rewrites the last four bytes of `bytes` (at least 8) as the CRC-32C of
// the rest, so that a mutant of a Crc::kTrailingCrc32c format reaches the
// checks behind its CRC.
void FixTrailingCrc(std::vector<uint8_t>* bytes);

// Valid encodings made by the code itself: the starting points of every
// run, next to the files in tests/fuzz/corpus/<target>/.
std::vector<std::vector<uint8_t>> BuiltinSeeds(const std::string& target);

}  // namespace te::fuzz
