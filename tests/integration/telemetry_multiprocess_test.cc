// Reporters in several processes write into one collector process; this
// process only reads the collector's region file. It never starts threads
// itself, so every fork here is safe (also under TSan).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include "telemetry/collector.h"
#include "telemetry/flow_records.h"
#include "telemetry/reporter.h"

namespace te::telemetry {
namespace {

using namespace std::chrono_literals;

EngineOptions Tcp() {
  EngineOptions o;
  o.fabric.provider = "tcp";
  o.request_timeout = 5000ms;
  return o;
}

class TelemetryProcesses : public ::testing::Test {
 protected:
  void SetUp() override {
    file_ = "/dev/shm/te-telemetry-test-" + std::to_string(getpid());
    int to[2], from[2];
    ASSERT_EQ(pipe(to), 0);
    ASSERT_EQ(pipe(from), 0);
    collector_ = fork();
    if (collector_ == 0) {
      close(to[1]);
      close(from[0]);
      auto engine = TransferEngine::Create(Tcp());
      if (!engine.ok()) _exit(2);
      CollectorInfo layout;
      layout.store = {1 << 16, uint32_t(kPathValueBytes), 3, 5};
      layout.lists = {1, 4, 1024, 64};
      auto c = Collector::Create(engine->get(), layout, file_);
      if (!c.ok()) _exit(3);
      dprintf(from[1], "%s\n", (*c)->info().Serialize().c_str());
      char b;
      (void)!read(to[0], &b, 1);  // until the test closes the pipe
      _exit(0);
    }
    close(to[0]);
    close(from[1]);
    stop_fd_ = to[1];
    FILE* in = fdopen(from[0], "r");
    char line[8192];
    ASSERT_NE(fgets(line, sizeof line, in), nullptr) << "collector did not start";
    fclose(in);
    auto info = CollectorInfo::Parse(line);
    ASSERT_TRUE(info.ok()) << info.status().ToString();
    info_ = info.value();
  }
  void TearDown() override {
    close(stop_fd_);
    waitpid(collector_, nullptr, 0);
    unlink(file_.c_str());
  }

  // Forks a reporter that writes flows [lo, hi) with `version`, appends one
  // record per flow to list 0, and exits; endless=true keeps rewriting, and
  // writes one byte to `ready_fd` once its first round has fully landed.
  pid_t SpawnReporter(uint32_t ring, uint64_t lo, uint64_t hi, bool endless, int ready_fd = -1) {
    pid_t pid = fork();
    if (pid != 0) return pid;
    auto engine = TransferEngine::Create(Tcp());
    if (!engine.ok()) _exit(2);
    ReporterOptions ro;
    ro.ring = ring;
    ro.writes_per_batch = 48;
    auto rep = Reporter::Create(engine->get(), info_, ro);
    if (!rep.ok()) _exit(3);
    uint32_t version = 0;
    do {
      ++version;
      for (uint64_t f = lo; f < hi; ++f) {
        if (!(*rep)->KeyWrite(FlowKey(5, f), PathTrace(5, f, version)).ok()) _exit(4);
        const uint64_t rec[2] = {f, version};
        if (!(*rep)->Append(0, std::span((const uint8_t*)rec, sizeof rec)).ok()) _exit(5);
      }
      if (version == 1 && ready_fd >= 0) {
        if (!(*rep)->Drain().ok()) _exit(6);
        (void)!write(ready_fd, "r", 1);
      }
    } while (endless);
    _exit((*rep)->Drain().ok() ? 0 : 6);
  }

  std::string file_;
  pid_t collector_ = -1;
  int stop_fd_ = -1;
  CollectorInfo info_;
};

TEST_F(TelemetryProcesses, ManyReportersAtOnceLandWithoutCoordination) {
  constexpr uint64_t kFlows = 8000;
  constexpr int kReporters = 4;
  std::vector<pid_t> pids;
  for (int r = 0; r < kReporters; ++r)
    pids.push_back(SpawnReporter(r, kFlows * r / kReporters, kFlows * (r + 1) / kReporters, false));
  for (pid_t p : pids) {
    int st = 0;
    waitpid(p, &st, 0);
    ASSERT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << "reporter exit " << WEXITSTATUS(st);
  }
  auto view = RegionView::Open(file_, info_);
  ASSERT_TRUE(view.ok()) << view.status().ToString();
  uint64_t found = 0;
  for (uint64_t f = 0; f < kFlows; ++f) {
    auto q = (*view)->Query(FlowKey(5, f));
    ASSERT_TRUE(q.ok());
    if (!q->found) continue;
    auto want = PathTrace(5, f, 1);
    ASSERT_EQ(q->value, std::vector<uint8_t>(want.begin(), want.end())) << "flow " << f;
    ++found;
  }
  // Four writers interleave, so "write order" is not one sequence; the
  // formula for sequential writes is the reference the result must stay near.
  const double expected = ExpectedSuccess(info_.store.slots, kFlows, info_.store.hashes);
  EXPECT_NEAR(double(found) / kFlows, expected, 0.01);
  // Every reporter's ring holds its records in order.
  for (int r = 0; r < kReporters; ++r) {
    uint64_t cursor = 0;
    auto list = (*view)->ReadList(0, r, &cursor);
    ASSERT_TRUE(list.ok());
    ASSERT_EQ(list->records.size() + list->lost, kFlows / kReporters);
    uint64_t prev = 0;
    for (size_t i = 0; i < list->records.size(); ++i) {
      uint64_t rec[2];
      memcpy(rec, list->records[i].data(), sizeof rec);
      if (i) {
        EXPECT_EQ(rec[0], prev + 1);
      }
      prev = rec[0];
    }
  }
}

TEST_F(TelemetryProcesses, ReporterKilledMidWriteNeverYieldsAWrongValue) {
  constexpr uint64_t kFlows = 2000;
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  pid_t p = SpawnReporter(0, 0, kFlows, /*endless=*/true, ready[1]);
  close(ready[1]);
  // Every flow has landed once; the kill then hits later rounds mid-stream.
  char b = 0;
  ASSERT_EQ(read(ready[0], &b, 1), 1) << "reporter died before its first round landed";
  close(ready[0]);
  std::this_thread::sleep_for(50ms);
  kill(p, SIGKILL);
  waitpid(p, nullptr, 0);
  std::this_thread::sleep_for(100ms);  // writes already sent finish landing
  auto view = RegionView::Open(file_, info_);
  ASSERT_TRUE(view.ok());
  uint64_t found = 0;
  for (uint64_t f = 0; f < kFlows; ++f) {
    auto q = (*view)->Query(FlowKey(5, f));
    ASSERT_TRUE(q.ok());
    if (!q->found) continue;
    ++found;
    // Some complete version of this flow's path, never a mixture.
    uint32_t version;
    memcpy(&version, q->value.data() + 16, 4);
    auto want = PathTrace(5, f, version);
    ASSERT_EQ(q->value, std::vector<uint8_t>(want.begin(), want.end())) << "flow " << f;
  }
  EXPECT_GT(found, kFlows / 2);
  uint64_t cursor = 0;
  auto list = (*view)->ReadList(0, 0, &cursor);
  ASSERT_TRUE(list.ok());
  for (const auto& rec : list->records) {
    ASSERT_EQ(rec.size(), 16u);  // whole records only
  }
}

}  // namespace
}  // namespace te::telemetry
