// A seeded mutation fuzzer over every target in fuzz_targets.h, bounded in
// time, run by ctest (and so by .ci/run under ASan/UBSan).
//
// Each target starts from its built-in seeds and the files in
// tests/fuzz/corpus/<target>/, and mutates them: bit flips, byte edits,
// insertions and deletions, integers swapped for boundary values (0, -1,
// 2^31, 2^32, 2^62, 2^64 - 1, binary and decimal), truncation and splicing.
// Formats ending in a CRC get the CRC fixed on half the mutants.
//
//   TE_FUZZ_SECONDS   time per target (default 4)
//   TE_FUZZ_SEED      generator seed (default 1): a failing run repeats
//   TE_FUZZ_CORPUS    corpus root (default: the source tree's)
//   TE_FUZZ_WRITE_CORPUS=DIR  writes the built-in seeds there and stops
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>

#include "fuzz/fuzz_targets.h"

namespace te::fuzz {
namespace {

std::vector<std::vector<uint8_t>> LoadCorpus(const std::string& target) {
  const char* root = std::getenv("TE_FUZZ_CORPUS");
  std::filesystem::path dir = std::filesystem::path(root ? root : TE_FUZZ_CORPUS_DIR) / target;
  std::vector<std::vector<uint8_t>> out;
  std::error_code ec;
  for (std::filesystem::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::ifstream in(it->path(), std::ios::binary);
    out.emplace_back(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  return out;
}

class Mutator {
 public:
  explicit Mutator(uint64_t seed) : rng_(seed) {}

  std::vector<uint8_t> Mutate(std::vector<uint8_t> b, const std::vector<std::vector<uint8_t>>& pool) {
    const int n = 1 + int(rng_() % 4);
    for (int i = 0; i < n; ++i) Once(&b, pool);
    if (b.size() > kMaxInput) b.resize(kMaxInput);
    return b;
  }

 private:
  static constexpr size_t kMaxInput = 1 << 16;

  size_t Pos(size_t size) { return size ? rng_() % size : 0; }

  void Once(std::vector<uint8_t>* b, const std::vector<std::vector<uint8_t>>& pool) {
    static const uint64_t kInts[] = {0,
                                     1,
                                     0x7f,
                                     0xff,
                                     0x7fff,
                                     0xffff,
                                     0x7fffffff,
                                     0x80000000,
                                     0xffffffff,
                                     uint64_t(1) << 32,
                                     uint64_t(1) << 40,
                                     uint64_t(1) << 62,
                                     ~uint64_t(0),
                                     ~uint64_t(0) - 3};
    static const char* kDecimals[] = {"0",
                                      "-1",
                                      "4294967295",
                                      "4294967296",
                                      "18446744073709551615",
                                      "18446744073709551616",
                                      "4611686018427387904",
                                      "1099511627776",
                                      "99999999999999999999999",
                                      "2147483648",
                                      "32767",
                                      "65536"};
    switch (rng_() % 9) {
      case 0:  // flip a bit
        if (!b->empty()) (*b)[Pos(b->size())] ^= uint8_t(1u << (rng_() % 8));
        break;
      case 1:  // random byte
        if (!b->empty()) (*b)[Pos(b->size())] = uint8_t(rng_());
        break;
      case 2: {  // insert random bytes
        const size_t at = Pos(b->size() + 1), n = 1 + rng_() % 16;
        for (size_t i = 0; i < n; ++i) b->insert(b->begin() + at, uint8_t(rng_()));
        break;
      }
      case 3: {  // delete a range
        if (b->empty()) break;
        const size_t at = Pos(b->size()), n = std::min<size_t>(b->size() - at, 1 + rng_() % 32);
        b->erase(b->begin() + at, b->begin() + at + n);
        break;
      }
      case 4: {  // a boundary integer, little-endian, over 1/2/4/8 bytes
        const size_t width = size_t(1) << (rng_() % 4);
        if (b->size() < width) break;
        const uint64_t v = kInts[rng_() % std::size(kInts)];
        const size_t at = Pos(b->size() - width + 1);
        for (size_t i = 0; i < width; ++i) (*b)[at + i] = uint8_t(v >> (8 * i));
        break;
      }
      case 5: {  // a decimal token swapped for a boundary number
        std::vector<size_t> starts;
        for (size_t i = 0; i < b->size(); ++i)
          if (isdigit((*b)[i]) && (i == 0 || !isdigit((*b)[i - 1]))) starts.push_back(i);
        if (starts.empty()) break;
        size_t at = starts[rng_() % starts.size()], end = at;
        while (end < b->size() && isdigit((*b)[end])) ++end;
        const std::string d = kDecimals[rng_() % std::size(kDecimals)];
        b->erase(b->begin() + at, b->begin() + end);
        b->insert(b->begin() + at, d.begin(), d.end());
        break;
      }
      case 6:  // truncate
        if (!b->empty()) b->resize(Pos(b->size()));
        break;
      case 7: {  // splice in part of another input
        if (pool.empty()) break;
        const auto& o = pool[rng_() % pool.size()];
        if (o.empty()) break;
        const size_t from = Pos(o.size()), n = std::min<size_t>(o.size() - from, 1 + rng_() % 64);
        const size_t at = Pos(b->size() + 1);
        b->insert(b->begin() + at, o.begin() + from, o.begin() + from + n);
        break;
      }
      case 8: {  // duplicate a range (repeated fields, long lists)
        if (b->empty()) break;
        const size_t at = Pos(b->size()), n = std::min<size_t>(b->size() - at, 1 + rng_() % 64);
        std::vector<uint8_t> copy(b->begin() + at, b->begin() + at + n);
        b->insert(b->begin() + at, copy.begin(), copy.end());
        break;
      }
    }
  }

  std::mt19937_64 rng_;
};

double SecondsPerTarget() {
  const char* s = std::getenv("TE_FUZZ_SECONDS");
  return s ? std::max(0.1, atof(s)) : 4.0;
}

class FuzzTest : public ::testing::TestWithParam<Target> {};

TEST_P(FuzzTest, ParserSurvivesMutatedInputs) {
  const Target& t = GetParam();
  std::vector<std::vector<uint8_t>> pool = BuiltinSeeds(t.name);
  ASSERT_FALSE(pool.empty()) << "target " << t.name << " has no built-in seeds";
  if (const char* out = std::getenv("TE_FUZZ_WRITE_CORPUS")) {
    const auto dir = std::filesystem::path(out) / t.name;
    std::filesystem::create_directories(dir);
    for (size_t i = 0; i < pool.size(); ++i)
      std::ofstream(dir / ("seed-" + std::to_string(i)), std::ios::binary)
          .write(reinterpret_cast<const char*>(pool[i].data()), std::streamsize(pool[i].size()));
    GTEST_SKIP() << "wrote the corpus of " << t.name;
  }
  const auto corpus = LoadCorpus(t.name);
  pool.insert(pool.end(), corpus.begin(), corpus.end());
  for (const auto& seed : pool) t.run(seed);

  const char* seed_env = std::getenv("TE_FUZZ_SEED");
  const uint64_t seed = seed_env ? strtoull(seed_env, nullptr, 10) : 1;
  Mutator m(seed ^ std::hash<std::string>()(t.name));
  std::mt19937_64 pick(seed);
  const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(SecondsPerTarget());
  uint64_t runs = 0;
  while (std::chrono::steady_clock::now() < end) {
    std::vector<uint8_t> input = m.Mutate(pool[pick() % pool.size()], pool);
    if (t.crc == Crc::kTrailingCrc32c && pick() % 2) FixTrailingCrc(&input);
    t.run(input);  // aborts (and fails the test) on a broken invariant
    ++runs;
  }
  RecordProperty("inputs", std::to_string(runs));
  printf("fuzz %s: %llu inputs, %zu seeds, seed %llu\n", t.name, (unsigned long long)runs, pool.size(),
         (unsigned long long)seed);
  EXPECT_GT(runs, 0u);
}

INSTANTIATE_TEST_SUITE_P(Parsers, FuzzTest, ::testing::ValuesIn(Targets()),
                         [](const ::testing::TestParamInfo<Target>& i) { return std::string(i.param.name); });

}  // namespace
}  // namespace te::fuzz
