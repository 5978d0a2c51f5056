// MoE dispatch/combine with EP ranks as processes (tcp on loopback): each
// child rebuilds every rank's inputs from the seed, so it checks its own part
// against the reference by itself. The parent only relays the LocalInfo
// strings over pipes (the test's own channel) and collects verdicts.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <type_traits>

#include "integration/moe_group.h"
#include "integration/test_support.h"

namespace te::testing {
namespace {

struct Rank {
  pid_t pid = -1;
  FILE* to = nullptr;
  FILE* from = nullptr;
};

std::string ReadLine(FILE* f) {
  std::string s;
  char buf[4096];
  while (fgets(buf, sizeof buf, f)) {
    s += buf;
    if (!s.empty() && s.back() == '\n') {
      s.pop_back();
      return s;
    }
  }
  return s.empty() ? "EOF" : s;
}

// Which dispatcher the children run.
enum class Kind { kNormal, kLowLatency, kHierarchical, kCoherent };
constexpr uint32_t kNodes = 2;  // of the hierarchical groups

template <typename D>
Result<std::unique_ptr<D>> CreateDispatcher(TransferEngine* engine, const moe::EpConfig& c) {
  if constexpr (std::is_same_v<D, moe::HierarchicalDispatcher>)
    return D::Create(engine, c, kNodes);
  else
    return D::Create(engine, c);
}

// Child: engine, dispatcher D, info out, infos in, `layers` layers, verdict out.
template <typename D>
int RunChild(moe::EpConfig c, Routing routing, uint32_t tokens, uint32_t layers, FILE* in, FILE* out) {
  auto engine = TransferEngine::Create(Options("tcp"));
  if (!engine.ok()) return fprintf(out, "FAIL %s\n", engine.status().ToString().c_str()), 1;
  auto d = CreateDispatcher<D>(engine->get(), c);
  if (!d.ok()) return fprintf(out, "FAIL %s\n", d.status().ToString().c_str()), 1;
  fprintf(out, "%s\n", (*d)->LocalInfo().c_str());
  fflush(out);
  std::vector<std::string> infos;
  for (uint32_t r = 0; r < c.ranks; ++r) infos.push_back(ReadLine(in));
  if (Status s = (*d)->Connect(infos); !s.ok()) return fprintf(out, "FAIL %s\n", s.ToString().c_str()), 1;
  const moe::ExpertMap map = moe::ExpertMap::Contiguous(c.experts, c.ranks).value();
  const std::vector<uint32_t> counts(c.ranks, tokens);
  std::string err;
  if constexpr (std::is_same_v<D, moe::HierarchicalDispatcher>)
    err = RunHierRank(**d, routing, counts, 99, layers, TraceRun{}, &map);
  else if constexpr (std::is_same_v<D, moe::CoherentDispatcher>)
    err = RunCoherentRank(**d, {routing, counts, 99, layers, nullptr, nullptr, &map}, nullptr);
  else
    err = RunRank(**d, map, routing, counts, 99, layers);
  fprintf(out, "%s\n", err.empty() ? "OK" : ("FAIL " + err).c_str());
  fflush(out);
  return err.empty() ? 0 : 1;
}

std::vector<Rank> StartGroup(const moe::EpConfig& shape, Routing routing, uint32_t tokens, uint32_t layers,
                             Kind kind = Kind::kNormal) {
  std::vector<Rank> ranks(shape.ranks);
  for (uint32_t r = 0; r < shape.ranks; ++r) {
    int to_child[2], from_child[2];
    if (pipe(to_child) || pipe(from_child)) abort();
    pid_t pid = fork();
    if (pid == 0) {
      close(to_child[1]);
      close(from_child[0]);
      moe::EpConfig c = shape;
      c.rank = r;
      FILE* in = fdopen(to_child[0], "r");
      FILE* out = fdopen(from_child[1], "w");
      _exit(kind == Kind::kLowLatency     ? RunChild<moe::LowLatencyDispatcher>(c, routing, tokens, layers, in, out)
            : kind == Kind::kHierarchical ? RunChild<moe::HierarchicalDispatcher>(c, routing, tokens, layers, in, out)
            : kind == Kind::kCoherent     ? RunChild<moe::CoherentDispatcher>(c, routing, tokens, layers, in, out)
                                          : RunChild<moe::EpDispatcher>(c, routing, tokens, layers, in, out));
    }
    close(to_child[0]);
    close(from_child[1]);
    ranks[r] = {pid, fdopen(to_child[1], "w"), fdopen(from_child[0], "r")};
  }
  std::vector<std::string> infos;
  for (auto& r : ranks) infos.push_back(ReadLine(r.from));
  for (auto& r : ranks) {
    for (auto& i : infos) fprintf(r.to, "%s\n", i.c_str());
    fflush(r.to);
  }
  return ranks;
}

void Reap(std::vector<Rank>& ranks) {
  for (auto& r : ranks) {
    if (r.pid > 0) waitpid(r.pid, nullptr, 0);
    fclose(r.to);
    fclose(r.from);
  }
}

moe::EpConfig Shape(uint32_t ranks, moe::Payload payload) {
  moe::EpConfig c;
  c.ranks = ranks;
  c.experts = 32;
  c.topk = 8;
  c.hidden = 1024;
  c.max_tokens = 64;
  c.payload = payload;
  c.timeout = std::chrono::milliseconds(5000);
  return c;
}

TEST(MoeMultiProcess, FourRanksBf16AndFp8MatchTheReference) {
  for (moe::Payload p : {moe::Payload::kBf16, moe::Payload::kFp8E4M3}) {
    std::vector<Rank> ranks = StartGroup(Shape(4, p), Routing::kRandom, 64, 4);
    for (uint32_t r = 0; r < ranks.size(); ++r) EXPECT_EQ(ReadLine(ranks[r].from), "OK") << "rank " << r;
    Reap(ranks);
  }
}

TEST(MoeMultiProcess, LowLatencyFourRanksMatchTheReference) {
  std::vector<Rank> ranks = StartGroup(Shape(4, moe::Payload::kBf16), Routing::kRandom, 64, 4, Kind::kLowLatency);
  for (uint32_t r = 0; r < ranks.size(); ++r) EXPECT_EQ(ReadLine(ranks[r].from), "OK") << "rank " << r;
  Reap(ranks);
}

TEST(MoeMultiProcess, HierarchicalFourRanksInTwoNodesMatchTheReference) {
  std::vector<Rank> ranks = StartGroup(Shape(4, moe::Payload::kBf16), Routing::kRandom, 64, 4, Kind::kHierarchical);
  for (uint32_t r = 0; r < ranks.size(); ++r) EXPECT_EQ(ReadLine(ranks[r].from), "OK") << "rank " << r;
  Reap(ranks);
}

// Tokens move between the processes: 16 per rank, so that all of them fit
// max_tokens on whichever rank they merge.
TEST(MoeMultiProcess, CoherentFourRanksMatchTheReference) {
  std::vector<Rank> ranks = StartGroup(Shape(4, moe::Payload::kBf16), Routing::kRandom, 16, 4, Kind::kCoherent);
  for (uint32_t r = 0; r < ranks.size(); ++r) EXPECT_EQ(ReadLine(ranks[r].from), "OK") << "rank " << r;
  Reap(ranks);
}

// SIGKILL of the last rank while the group runs layers: the others report
// an error within the timeout instead of hanging.
void KillOneRank(Kind kind) {
  const uint32_t n = kind == Kind::kHierarchical ? 4 : 3;
  moe::EpConfig shape = Shape(n, moe::Payload::kBf16);
  shape.experts = 8 * n;
  shape.timeout = std::chrono::milliseconds(1000);
  std::vector<Rank> ranks = StartGroup(shape, Routing::kRandom, 16, 100000, kind);
  usleep(300 * 1000);
  kill(ranks[n - 1].pid, SIGKILL);
  waitpid(ranks[n - 1].pid, nullptr, 0);
  ranks[n - 1].pid = -1;
  const auto start = std::chrono::steady_clock::now();
  for (uint32_t r = 0; r + 1 < n; ++r) {
    const std::string verdict = ReadLine(ranks[r].from);
    EXPECT_EQ(verdict.rfind("FAIL", 0), 0u) << "rank " << r << ": " << verdict;
    EXPECT_TRUE(verdict.find("TIMEOUT") != std::string::npos || verdict.find("IO_ERROR") != std::string::npos)
        << verdict;
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
  Reap(ranks);
}

TEST(MoeMultiProcess, KilledRankTurnsIntoErrorsOnTheOthers) { KillOneRank(Kind::kNormal); }
TEST(MoeMultiProcess, LowLatencyKilledRankTurnsIntoErrorsOnTheOthers) { KillOneRank(Kind::kLowLatency); }
TEST(MoeMultiProcess, HierarchicalKilledRankTurnsIntoErrorsOnTheOthers) { KillOneRank(Kind::kHierarchical); }
TEST(MoeMultiProcess, CoherentKilledRankTurnsIntoErrorsOnTheOthers) { KillOneRank(Kind::kCoherent); }

}  // namespace
}  // namespace te::testing
