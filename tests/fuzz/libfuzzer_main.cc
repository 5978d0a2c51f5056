// libFuzzer's entry points for the fuzz targets (fuzz_targets.h): one
// binary for all of them, the target named by TE_FUZZ_TARGET ("list"
// prints their names). A target
// aborts on a broken invariant; the sanitizers catch the rest.
//
//   TE_FUZZ_TARGET=routing_trace ./build-fuzz/tests/te_libfuzzer \
//       -max_total_time=60 corpus-dir tests/fuzz/corpus/routing_trace
//
// scripts/fuzz.sh builds it with clang and runs every target in turn.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "fuzz/fuzz_targets.h"

namespace {

const te::fuzz::Target* target = nullptr;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* name = std::getenv("TE_FUZZ_TARGET");
  if (name && std::strcmp(name, "list") == 0) {  // for scripts/fuzz.sh
    for (const te::fuzz::Target& t : te::fuzz::Targets()) std::printf("%s\n", t.name);
    std::exit(0);
  }
  std::string names;
  for (const te::fuzz::Target& t : te::fuzz::Targets()) {
    if (name && std::strcmp(name, t.name) == 0) target = &t;
    names += std::string(names.empty() ? "" : ", ") + t.name;
  }
  if (!target) {
    std::fprintf(stderr, "te_libfuzzer: TE_FUZZ_TARGET is %s%s%s; set it to one of: %s\n", name ? "'" : "",
                 name ? name : "unset", name ? "'" : "", names.c_str());
    std::exit(2);
  }
  // The built-in seeds (valid encodings the code makes) into the corpus
  // directory the run reads, before libFuzzer reads it.
  if (const char* dir = std::getenv("TE_FUZZ_SEEDS_TO")) {
    const auto seeds = te::fuzz::BuiltinSeeds(target->name);
    for (size_t i = 0; i < seeds.size(); ++i) {
      const std::string path = std::string(dir) + "/seed-" + std::to_string(i);
      std::ofstream(path, std::ios::binary)
          .write(reinterpret_cast<const char*>(seeds[i].data()), std::streamsize(seeds[i].size()));
    }
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  target->run({data, size});
  // A format ending in a CRC: also the same bytes with the CRC made right,
  // or nearly every mutant stops at the CRC check.
  if (target->crc == te::fuzz::Crc::kTrailingCrc32c && size >= 8) {
    std::vector<uint8_t> fixed(data, data + size);
    te::fuzz::FixTrailingCrc(&fixed);
    target->run(fixed);
  }
  return 0;
}
