// An engine reports its own statistics through itself into a collector.
#include <gtest/gtest.h>

#include "support/wait_until.h"
#include "telemetry/engine_stats_reporter.h"

namespace te::telemetry {
namespace {

using namespace std::chrono_literals;

TEST(EngineStatsReporter, EngineReportsItsOwnHealthIntoACollector) {
  EngineOptions o;
  o.fabric.provider = "tcp";
  auto collector_engine = TransferEngine::Create(o).value();
  o.domains = 2;
  auto engine = TransferEngine::Create(o).value();

  CollectorInfo layout;
  layout.store = {1024, 20, 2, 1};
  layout.lists = {1, 2, 64, uint32_t(EngineSampleBytes(2, kMaxSamplePeers))};
  auto collector = Collector::Create(collector_engine.get(), layout).value();

  // Traffic to observe: 10 writes of 1 MiB, sharded over the 2 domains.
  std::vector<uint8_t> src(1 << 20, 7), dst(1 << 20);
  auto src_mr = engine->RegisterMemory(src.data(), src.size()).value();
  auto dst_mr = collector_engine->RegisterMemory(dst.data(), dst.size()).value();
  auto remote = engine->Import(collector_engine->Describe(*dst_mr)).value();
  CompletionCounter done;
  for (int i = 0; i < 10; ++i)
    ASSERT_TRUE(engine->Submit(SingleWrite{src_mr, 0, 1 << 20, remote, 0, 3}, {.counter = &done}).ok());
  ASSERT_TRUE(done.WaitFinished(10, 20s));
  ASSERT_EQ(done.failed(), 0u);

  ReporterOptions ro;
  ro.ring = 1;
  auto reporter = Reporter::Create(engine.get(), collector->info(), ro);
  ASSERT_TRUE(reporter.ok()) << reporter.status().ToString();
  auto esr = EngineStatsReporter::Start(engine.get(), std::move(reporter).value(), 0, 20ms);
  ASSERT_TRUE(esr.ok()) << esr.status().ToString();
  // Samples every 20 ms: wait until three have landed (a peek that leaves
  // the list as it is), however slow the machine.
  EXPECT_TRUE(testing::WaitUntil(
      [&] {
        uint64_t peek = 0;
        auto l = collector->ReadList(0, 1, &peek);
        return l.ok() && l->records.size() >= 3;
      },
      20000ms));
  EXPECT_TRUE((*esr)->status().ok()) << (*esr)->status().ToString();
  esr->reset();  // last sample, drained: it has landed when reset returns

  uint64_t cursor = 0;
  auto list = collector->ReadList(0, 1, &cursor);
  ASSERT_TRUE(list.ok());
  ASSERT_GE(list->records.size(), 3u);
  uint64_t prev_done = 0, prev_time = 0;
  for (const auto& rec : list->records) {
    auto s = DecodeEngineSample(rec);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    EXPECT_GE(s->stats.requests_done, prev_done);  // counters only grow
    EXPECT_GT(s->time_ns, prev_time);
    prev_done = s->stats.requests_done;
    prev_time = s->time_ns;
  }
  auto last = DecodeEngineSample(list->records.back()).value();
  EXPECT_GE(last.stats.requests_done, 10u);
  ASSERT_EQ(last.stats.domains.size(), 2u);
  // Each 1 MiB write was split in two 512 KiB shards, one per domain.
  EXPECT_GE(last.stats.domains[0].bytes_written, 10u * (512 << 10));
  EXPECT_GE(last.stats.domains[1].bytes_written, 10u * (512 << 10));
  EXPECT_EQ(last.stats.domains[0].errors, 0u);
  EXPECT_GT(last.stats.latency_p50_us, 0u);
  // One peer (the collector's engine) took all of it, named by its id.
  ASSERT_EQ(last.stats.peers.size(), 1u);
  EXPECT_EQ(last.stats.peers[0].peer_id, remote->peer()->id());
  // The peer snapshot trails the live domain counters by up to 10 ms.
  EXPECT_GE(last.stats.peers[0].bytes_written, 10u << 20);
  EXPECT_LE(last.stats.peers[0].bytes_written,
            last.stats.domains[0].bytes_written + last.stats.domains[1].bytes_written);
  EXPECT_GE(last.stats.latency_p99_us, last.stats.latency_p50_us);
  // No ring other than this reporter's was touched.
  uint64_t other = 0;
  EXPECT_TRUE(collector->ReadList(0, 0, &other)->records.empty());
  EXPECT_FALSE(DecodeEngineSample(std::vector<uint8_t>(12, 0)).ok());
}

// Staging sizes that wrap 64 bits are refused by name, not allocated short.
TEST(EngineStatsReporter, StagingThatWouldWrapIsRefused) {
  EngineOptions o;
  o.fabric.provider = "tcp";
  auto collector_engine = TransferEngine::Create(o).value();
  auto engine = TransferEngine::Create(o).value();
  CollectorInfo layout;
  layout.store = {1024, 20, 2, 1};
  layout.lists = {1, 2, 64, 256};
  auto collector = Collector::Create(collector_engine.get(), layout).value();
  ReporterOptions ro;
  ro.batches_in_flight = size_t(1) << 40;
  ro.writes_per_batch = size_t(1) << 30;
  const Status s = Reporter::Create(engine.get(), collector->info(), ro).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_NE(s.message().find("batches_in_flight"), std::string::npos) << s.ToString();
}

}  // namespace
}  // namespace te::telemetry
