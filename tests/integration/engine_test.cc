// Two engines in one process over a real provider (tcp on loopback, shm):
// every request kind, byte-exact, with 1, 2 and 4 domains per group.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <random>
#include <thread>

#include "base/checked_math.h"
#include "integration/test_support.h"

namespace te::testing {
namespace {

struct Param {
  std::string provider;
  int domains;
};

class EngineTest : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    auto a = TransferEngine::Create(Options(GetParam().provider, GetParam().domains));
    if (!a.ok() && GetParam().provider == "shm") GTEST_SKIP() << "shm unavailable: " << a.status().ToString();
    ASSERT_TRUE(a.ok()) << a.status().ToString();
    sender_ = std::move(a).value();
    auto b = TransferEngine::Create(Options(GetParam().provider, GetParam().domains));
    ASSERT_TRUE(b.ok()) << b.status().ToString();
    receiver_ = std::move(b).value();
    src_buf_.resize(kBytes);
    dst_buf_.assign(kBytes, 0);
    FillPattern(src_buf_.data(), kBytes, 1);
    src_ = sender_->RegisterMemory(src_buf_.data(), kBytes).value();
    auto dst_local = receiver_->RegisterMemory(dst_buf_.data(), kBytes);
    ASSERT_TRUE(dst_local.ok());
    dst_local_ = dst_local.value();
    // The descriptor travels as bytes, as between real processes.
    auto desc = MrDescriptor::Deserialize(receiver_->Describe(*dst_local_).Serialize());
    ASSERT_TRUE(desc.ok());
    auto dst = sender_->Import(desc.value());
    ASSERT_TRUE(dst.ok()) << dst.status().ToString();
    dst_ = dst.value();
  }

  static constexpr size_t kBytes = 8 << 20;
  std::unique_ptr<TransferEngine> sender_, receiver_;
  std::vector<uint8_t> src_buf_, dst_buf_;
  LocalMr src_, dst_local_;
  RemoteMr dst_;
};

TEST_P(EngineTest, SingleWritesLandByteExactAndNotifyPerDomain) {
  CompletionCounter done;
  std::vector<std::pair<uint64_t, uint64_t>> cases = {
      {0, 1}, {4096, 4096}, {12345, 100003}, {1 << 20, 3 << 20}, {0, 0}};
  uint64_t imms = 0;
  for (auto [off, len] : cases) {
    SingleWrite w{src_, off, len, dst_, off + 7, 0xAB};
    imms += sender_->ExpectedImmCount(w).value();
    ASSERT_TRUE(sender_->Submit(w, {.counter = &done}).ok());
  }
  WaitDone(done, cases.size());
  // One per lane: the same-host domain alone for a peer on this host, else
  // every NIC domain.
  const bool same_host = GetParam().provider.ends_with("+local");
  EXPECT_EQ(dst_->same_host_lane().has_value(), same_host);
  EXPECT_EQ(imms, cases.size() * (same_host ? 1 : GetParam().domains));
  ASSERT_TRUE(receiver_->WaitImm(0xAB, imms, 10s).ok());
  for (auto [off, len] : cases)
    ASSERT_EQ(0, memcmp(dst_buf_.data() + off + 7, src_buf_.data() + off, len)) << "write at " << off;
  EXPECT_EQ(dst_buf_[6], 0);  // nothing before the first write
}

TEST_P(EngineTest, PagedWriteWithRandomPagesIsByteExact) {
  constexpr uint32_t kPages = 256, kPage = 4096, kStride = kPage + 128;
  std::vector<uint32_t> src_pages(kPages), dst_pages(kPages);
  std::iota(src_pages.begin(), src_pages.end(), 0);
  std::iota(dst_pages.begin(), dst_pages.end(), 0);
  std::mt19937 rng(7);
  std::shuffle(src_pages.begin(), src_pages.end(), rng);
  std::shuffle(dst_pages.begin(), dst_pages.end(), rng);
  PagedWrite p{src_, src_pages, kStride, 64, dst_, dst_pages, kStride, 32, kPage, 0x77};
  EXPECT_EQ(sender_->ExpectedImmCount(p).value(), kPages);
  CompletionCounter done;
  ASSERT_TRUE(sender_->Submit(p, {.counter = &done}).ok());
  WaitDone(done, 1);
  ASSERT_TRUE(receiver_->WaitImm(0x77, kPages, 10s).ok());
  for (uint32_t i = 0; i < kPages; ++i)
    ASSERT_EQ(
        0, memcmp(dst_buf_.data() + 32 + dst_pages[i] * kStride, src_buf_.data() + 64 + src_pages[i] * kStride, kPage))
        << "page " << i;
  // The 128-byte gaps between pages stay untouched.
  EXPECT_EQ(dst_buf_[32 + kPage + 5], 0);
}

TEST_P(EngineTest, ThousandsOfConcurrentRequestsEachCompleteExactlyOnce) {
  constexpr int kRequests = 3000, kLen = 2048;
  std::vector<std::atomic<int>> done(kRequests);
  std::atomic<int> errors{0};
  for (int i = 0; i < kRequests; ++i) {
    SingleWrite w{src_, uint64_t(i) * kLen, kLen, dst_, uint64_t(i) * kLen, uint32_t(1000 + i % 10)};
    ASSERT_TRUE(
        sender_->Submit(w, {.on_done = [&done, i] { done[i]++; }, .on_error = [&](const Status&) { errors++; }}).ok());
  }
  const uint64_t per = sender_->ExpectedImmCount(SingleWrite{src_, 0, kLen, dst_, 0, 1}).value();
  for (int k = 0; k < 10; ++k) ASSERT_TRUE(receiver_->WaitImm(1000 + k, per * kRequests / 10, 20s).ok());
  // Completions may trail the immediates a little.
  ASSERT_TRUE(WaitUntil([&] { return sender_->stats().requests_done == kRequests; }, 20s));
  // A duplicate callback would show up within a few callback hops: wait
  // for every callback to have run, then a little longer.
  ASSERT_TRUE(WaitUntil(
      [&] {
        int n = 0;
        for (int i = 0; i < kRequests; ++i) n += done[i].load() > 0;
        return n == kRequests;
      },
      20s));
  std::this_thread::sleep_for(20ms);
  for (int i = 0; i < kRequests; ++i) ASSERT_EQ(done[i].load(), 1) << "request " << i;
  EXPECT_EQ(errors.load(), 0);
  ASSERT_EQ(0, memcmp(dst_buf_.data(), src_buf_.data(), size_t(kRequests) * kLen));
}

TEST_P(EngineTest, ScatterBarrierAndImmOnlyNotifyEveryPeer) {
  // A second receiver to scatter to.
  auto other = TransferEngine::Create(Options(GetParam().provider, GetParam().domains)).value();
  std::vector<uint8_t> other_buf(1 << 20, 0);
  auto other_mr = other->RegisterMemory(other_buf.data(), other_buf.size()).value();
  auto other_dst = sender_->Import(other->Describe(*other_mr)).value();

  ScatterWrite s{src_, {{dst_, 0, 100, 5000}, {other_dst, 8192, 0, 7000}, {dst_, 20000, 9000, 1}}, 0x51};
  CompletionCounter done;
  ASSERT_TRUE(sender_->Submit(s, {.counter = &done}).ok());
  ASSERT_TRUE(sender_->Submit(Barrier{{dst_, other_dst}, 0x52}, {.counter = &done}).ok());
  ASSERT_TRUE(sender_->Submit(ImmOnly{other_dst, 0x53}, {.counter = &done}).ok());
  WaitDone(done, 3);
  ASSERT_TRUE(receiver_->WaitImm(0x51, 2, 10s).ok());
  ASSERT_TRUE(other->WaitImm(0x51, 1, 10s).ok());
  ASSERT_TRUE(receiver_->WaitImm(0x52, 1, 10s).ok());
  ASSERT_TRUE(other->WaitImm(0x52, 1, 10s).ok());
  ASSERT_TRUE(other->WaitImm(0x53, 1, 10s).ok());
  EXPECT_EQ(0, memcmp(dst_buf_.data() + 100, src_buf_.data(), 5000));
  EXPECT_EQ(0, memcmp(other_buf.data(), src_buf_.data() + 8192, 7000));
  EXPECT_EQ(dst_buf_[9000], src_buf_[20000]);
  EXPECT_FALSE(receiver_->TryConsumeImm(0x53, 1));  // ImmOnly went to the other peer only
}

TEST_P(EngineTest, ExpectImmCallbackRunsOffTheWorkerOnce) {
  std::atomic<int> fired{0};
  ASSERT_TRUE(receiver_->ExpectImm(0x99, 3, [&] { fired++; }).ok());
  CompletionCounter done;
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(sender_->Submit(ImmOnly{dst_, 0x99}, {.counter = &done}).ok());
  WaitDone(done, 3);
  ASSERT_TRUE(WaitUntil([&] { return fired.load() > 0; }, 20s));
  std::this_thread::sleep_for(20ms);  // a second firing would show up here
  EXPECT_EQ(fired.load(), 1);
}

TEST_P(EngineTest, CheapCallbacksRunOffTheCallbackThreadExactlyOnce) {
  // A plain callback shows which thread is the callback thread.
  std::atomic<std::thread::id> callback_thread{};
  CompletionCounter plain;
  ASSERT_TRUE(sender_
                  ->Submit(ImmOnly{dst_, 0x61},
                           {.on_done = [&] { callback_thread = std::this_thread::get_id(); }, .counter = &plain})
                  .ok());
  WaitDone(plain, 1);
  ASSERT_TRUE(WaitUntil([&] { return callback_thread.load() != std::thread::id{}; }, 20s));

  constexpr int kRequests = 500;
  std::vector<std::atomic<int>> done(kRequests);
  std::atomic<int> errors{0}, on_callback_thread{0};
  for (int i = 0; i < kRequests; ++i) {
    Completion c;
    c.on_worker = true;
    c.on_done = [&, i] {
      if (std::this_thread::get_id() == callback_thread.load()) on_callback_thread++;
      done[i]++;
    };
    c.on_error = [&](const Status&) { errors++; };
    ASSERT_TRUE(sender_->Submit(SingleWrite{src_, uint64_t(i) * 1024, 1024, dst_, uint64_t(i) * 1024, 0x62}, c).ok());
  }
  const uint64_t per = sender_->ExpectedImmCount(SingleWrite{src_, 0, 1024, dst_, 0, 0x62}).value();
  ASSERT_TRUE(receiver_->WaitImm(0x62, per * kRequests, 20s).ok());
  ASSERT_TRUE(WaitUntil([&] { return sender_->stats().requests_done == kRequests + 1; }, 20s));
  ASSERT_TRUE(WaitUntil(
      [&] {
        int n = 0;
        for (auto& d : done) n += d.load() > 0;
        return n == kRequests;
      },
      20s));
  std::this_thread::sleep_for(20ms);  // a second run of a callback would show up here
  for (int i = 0; i < kRequests; ++i) ASSERT_EQ(done[i].load(), 1) << "request " << i;
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(on_callback_thread.load(), 0);
  EXPECT_EQ(0, memcmp(dst_buf_.data(), src_buf_.data(), size_t(kRequests) * 1024));
}

TEST_P(EngineTest, PingPongWithAResponderOnTheWorkerCountsEveryRoundTrip) {
  // The receiver answers each ping from its worker; the sender waits with
  // WaitImm, which drives progress on this thread for wait_spin first.
  auto back_mr = sender_->RegisterMemory(src_buf_.data(), 4096).value();
  auto back = receiver_->Import(sender_->Describe(*back_mr)).value();
  constexpr int kRounds = 300;
  std::atomic<int> pongs{0};
  std::function<void()> pong = [&] {
    if (!receiver_->Submit(ImmOnly{back, 0x72}, {}).ok()) return;
    if (++pongs < kRounds) {
      ASSERT_TRUE(receiver_->ExpectImm(0x71, 1, pong, TransferEngine::ImmDelivery::kOnWorker).ok());
    }
  };
  ASSERT_TRUE(receiver_->ExpectImm(0x71, 1, pong, TransferEngine::ImmDelivery::kOnWorker).ok());
  for (int i = 0; i < kRounds; ++i) {
    ASSERT_TRUE(sender_->Submit(ImmOnly{dst_, 0x71}, {}).ok());
    ASSERT_TRUE(sender_->WaitImm(0x72, 1, 20s).ok()) << "round " << i;
  }
  EXPECT_EQ(pongs.load(), kRounds);
  EXPECT_FALSE(sender_->TryConsumeImm(0x72, 1));  // exactly one pong per ping
  EXPECT_EQ(receiver_->ImmAvailable(0x71), 0u);
}

TEST_P(EngineTest, ASlowCheapCallbackIsCountedAndAWaitInsideOneIsRefused) {
  std::atomic<int> slow_done{0};
  Completion slow;
  slow.on_worker = true;
  slow.on_done = [&] {
    std::this_thread::sleep_for(30ms);  // breaks the contract: EngineOptions::slow_worker_callback is 10 ms
    slow_done++;
  };
  ASSERT_TRUE(sender_->Submit(ImmOnly{dst_, 0x81}, slow).ok());
  ASSERT_TRUE(WaitUntil([&] { return slow_done.load() == 1; }, 20s));
  // Counted once its round ends, just after the callback returns.
  ASSERT_TRUE(WaitUntil([&] { return sender_->stats().slow_worker_callbacks >= 1; }, 20s));
  EXPECT_EQ(sender_->stats().slow_worker_callbacks, 1u);

  // WaitImm from a cheap callback would wait for arrivals only its own
  // thread reads: refused, and traffic carries on.
  std::atomic<int> code{-1};
  ASSERT_TRUE(receiver_
                  ->ExpectImm(
                      0x82, 1, [&] { code = int(receiver_->WaitImm(0x83, 1, 1s).code()); },
                      TransferEngine::ImmDelivery::kOnWorker)
                  .ok());
  ASSERT_TRUE(sender_->Submit(ImmOnly{dst_, 0x82}, {}).ok());
  ASSERT_TRUE(WaitUntil([&] { return code.load() != -1; }, 20s));
  EXPECT_EQ(StatusCode(code.load()), StatusCode::kInvalidArgument);
  CompletionCounter after;
  ASSERT_TRUE(sender_->Submit(ImmOnly{dst_, 0x84}, {.counter = &after}).ok());
  WaitDone(after, 1);
  ASSERT_TRUE(receiver_->WaitImm(0x84, 1, 20s).ok());
}

TEST_P(EngineTest, DriveUntilCompletesRequestsOnTheCallingThreadAndHandsBack) {
  std::atomic<int> done{0};
  std::atomic<int> elsewhere{0};
  const auto me = std::this_thread::get_id();
  constexpr int kRequests = 64;
  for (int i = 0; i < kRequests; ++i) {
    Completion c;
    c.on_worker = true;
    c.on_done = [&] {
      if (std::this_thread::get_id() != me) elsewhere++;
      done++;
    };
    ASSERT_TRUE(sender_->Submit(SingleWrite{src_, 0, 4096, dst_, uint64_t(i) * 4096, 0x91}, c).ok());
  }
  // Driving ends when the condition holds, or at its timeout; either way
  // the worker finishes what is left.
  const bool all = sender_->DriveUntil([&] { return done.load() == kRequests; }, 10s);
  EXPECT_TRUE(all);
  ASSERT_TRUE(WaitUntil([&] { return done.load() == kRequests; }, 20s));
  EXPECT_LE(elsewhere.load(), kRequests);  // some may have completed on the worker before the drive began
  EXPECT_FALSE(sender_->DriveUntil([] { return false; }, 1ms));
  CompletionCounter after;
  ASSERT_TRUE(sender_->Submit(ImmOnly{dst_, 0x92}, {.counter = &after}).ok());
  WaitDone(after, 1);  // the worker took its role back
  const uint64_t per = sender_->ExpectedImmCount(SingleWrite{src_, 0, 4096, dst_, 0, 0x91}).value();
  ASSERT_TRUE(receiver_->WaitImm(0x91, per * kRequests, 20s).ok());
  ASSERT_TRUE(receiver_->WaitImm(0x92, 1, 20s).ok());
}

TEST_P(EngineTest, CheapCallbacksOfRequestsCancelledAtShutdownRunOnce) {
  // libfabric 1.17's shm: closing an endpoint with 64 KiB writes in flight
  // to a peer in the same process unmaps memory the peer's provider still
  // reads in fi_cq_read; the peer's worker crashes inside libfabric about
  // once in a hundred runs (docs/RELIABILITY.md, shm limits). Nothing the
  // engine can guard; the callbacks' accounting is the same code on tcp
  // and local.
  if (GetParam().provider == "shm") GTEST_SKIP() << "shm endpoint closed mid-write crashes its in-process peer";
  constexpr int kRequests = 200;
  std::atomic<int> done{0}, failed{0};
  for (int i = 0; i < kRequests; ++i) {
    Completion c;
    c.on_worker = true;
    c.on_done = [&] { done++; };
    c.on_error = [&](const Status&) { failed++; };
    ASSERT_TRUE(sender_->Submit(SingleWrite{src_, 0, 64 << 10, dst_, 0, 0xA1}, c).ok());
  }
  sender_.reset();  // fails what is in flight with kCancelled, callbacks before it returns
  EXPECT_EQ(done.load() + failed.load(), kRequests);
}

TEST_P(EngineTest, OutOfBoundsWriteIsRefusedAtSubmitAndNeverPosted) {
  const uint64_t posted_before = sender_->stats().writes_posted;
  SingleWrite w{src_, 0, 4096, dst_, kBytes - 100, 1};
  Status s = sender_->Submit(w, {});
  EXPECT_EQ(s.code(), StatusCode::kOutOfRange);
  EXPECT_NE(s.message().find("exceeds dst region size " + std::to_string(kBytes)), std::string::npos) << s.message();
  std::this_thread::sleep_for(10ms);
  EXPECT_EQ(sender_->stats().writes_posted, posted_before);
  EXPECT_EQ(sender_->stats().requests_submitted, 0u);
}

TEST_P(EngineTest, ControlMessagesCarryTheSenderAddress) {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::string> got;
  EngineAddress from;
  // Sent before the handler exists: kept in the backlog, not lost.
  auto peer = sender_->Connect(receiver_->address()).value();
  std::string first = "hello before the handler";
  CompletionCounter sent;
  ASSERT_TRUE(sender_->Send(peer, std::span((const uint8_t*)first.data(), first.size()), {.counter = &sent}).ok());
  WaitDone(sent, 1);
  std::this_thread::sleep_for(50ms);
  receiver_->SetRecvHandler([&](const EngineAddress& f, std::span<const uint8_t> d) {
    std::lock_guard<std::mutex> l(mu);
    got.emplace_back(d.begin(), d.end());
    from = f;
    cv.notify_all();
  });
  std::string second(receiver_->max_message_bytes(), 'x');
  ASSERT_TRUE(sender_->Send(peer, std::span((const uint8_t*)second.data(), second.size()), {.counter = &sent}).ok());
  WaitDone(sent, 2);
  std::unique_lock<std::mutex> l(mu);
  ASSERT_TRUE(cv.wait_for(l, 10s, [&] { return got.size() == 2; }));
  EXPECT_TRUE(std::find(got.begin(), got.end(), first) != got.end());
  EXPECT_TRUE(std::find(got.begin(), got.end(), second) != got.end());
  EXPECT_EQ(from, sender_->address());
  std::string too_big(sender_->max_message_bytes() + 1, 'y');
  EXPECT_EQ(sender_->Send(peer, std::span((const uint8_t*)too_big.data(), too_big.size()), {}).code(),
            StatusCode::kInvalidArgument);
}

// Requests of every kind one after another, each waited for, so that each
// takes the state the one before it left in the pool, Work elements
// included (they are reused, not rebuilt): nothing of a control message, a
// paged write or a write with a source may leak into the next request.
TEST_P(EngineTest, PooledRequestStatesCarryNothingIntoTheNextRequest) {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::string> got;
  receiver_->SetRecvHandler([&](const EngineAddress&, std::span<const uint8_t> d) {
    std::lock_guard<std::mutex> l(mu);
    got.emplace_back(d.begin(), d.end());
    cv.notify_all();
  });
  auto peer = sender_->Connect(receiver_->address()).value();
  CompletionCounter done;
  uint64_t n = 0, imms = 0;
  constexpr uint64_t kPage = 4096;
  for (uint32_t round = 0; round < 8; ++round) {
    const std::string msg = "round " + std::to_string(round);
    ASSERT_TRUE(sender_->Send(peer, std::span((const uint8_t*)msg.data(), msg.size()), {.counter = &done}).ok());
    WaitDone(done, ++n);
    // Three pages of this round's block, reversed.
    const uint32_t first = round * 4;
    PagedWrite p{src_, {first, first + 1, first + 2}, kPage, 0, dst_, {first + 2, first + 1, first}, kPage, 0, kPage,
                 0x61};
    imms += sender_->ExpectedImmCount(p).value();
    ASSERT_TRUE(sender_->Submit(p, {.counter = &done}).ok());
    WaitDone(done, ++n);
    ASSERT_TRUE(sender_->Submit(ImmOnly{dst_, 0x62}, {.counter = &done}).ok());
    WaitDone(done, ++n);
    SingleWrite w{src_, 4 << 20, 100 + round, dst_, (4 << 20) + 7 * round * 100, 0x63};
    ASSERT_TRUE(sender_->Submit(w, {.counter = &done}).ok());
    WaitDone(done, ++n);
  }
  EXPECT_EQ(done.failed(), 0u);
  ASSERT_TRUE(receiver_->WaitImm(0x61, imms, 10s).ok());
  ASSERT_TRUE(receiver_->WaitImm(0x62, 8, 10s).ok());
  ASSERT_TRUE(
      receiver_->WaitImm(0x63, 8 * sender_->ExpectedImmCount(SingleWrite{src_, 0, 1, dst_, 0, 0x63}).value(), 10s)
          .ok());
  for (uint32_t round = 0; round < 8; ++round) {
    for (uint32_t i = 0; i < 3; ++i)
      ASSERT_EQ(0,
                memcmp(dst_buf_.data() + (round * 4 + 2 - i) * kPage, src_buf_.data() + (round * 4 + i) * kPage, kPage))
          << "round " << round << " page " << i;
    ASSERT_EQ(0, memcmp(dst_buf_.data() + (4 << 20) + 7 * round * 100, src_buf_.data() + (4 << 20), 100 + round))
        << "round " << round;
  }
  std::unique_lock<std::mutex> l(mu);
  ASSERT_TRUE(cv.wait_for(l, 10s, [&] { return got.size() == 8; }));
  for (uint32_t round = 0; round < 8; ++round)
    EXPECT_TRUE(std::find(got.begin(), got.end(), "round " + std::to_string(round)) != got.end()) << round;
  EXPECT_FALSE(receiver_->TryConsumeImm(0x61, 1));  // exactly the counts above, no stray immediates
  EXPECT_FALSE(receiver_->TryConsumeImm(0x62, 1));
}

#ifdef TE_ENGINE_TESTS_ON_VERBS_NATIVE
// Built into te_verbs_tests: the same tests over the native verbs backend on
// the software RC NIC (tests/soft_rc), and nothing that needs libfabric.
INSTANTIATE_TEST_SUITE_P(Providers, EngineTest, ::testing::Values(Param{"verbs-native", 1}, Param{"verbs-native", 2}),
                         [](const auto& info) {
                           return std::string("verbs_native_") + std::to_string(info.param.domains) + "domains";
                         });
#else
INSTANTIATE_TEST_SUITE_P(Providers, EngineTest,
                         ::testing::Values(Param{"tcp", 1}, Param{"tcp", 2}, Param{"tcp", 4}, Param{"shm", 1},
                                           Param{"shm", 2}, Param{"local", 1}, Param{"local", 2},
                                           Param{"tcp+local", 2}),
                         [](const auto& info) {
                           std::string name =
                               info.param.provider + "_" + std::to_string(info.param.domains) + "domains";
                           std::replace(name.begin(), name.end(), '+', '_');
                           return name;
                         });

#endif  // TE_ENGINE_TESTS_ON_VERBS_NATIVE

#ifndef TE_ENGINE_TESTS_ON_VERBS_NATIVE
// Registration refuses what no backend can serve, before any provider sees
// it: tcp and shm register lazily and would accept an unmapped pointer,
// then fault on the first write from it.
TEST(EngineRegister, RefusesRangesNoBackendCanServe) {
  auto e = TransferEngine::Create(Options("tcp")).value();
  std::vector<uint8_t> buf(4096);
  EXPECT_EQ(e->RegisterMemory(nullptr, 4096).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(e->RegisterMemory(buf.data(), 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(e->RegisterMemory(buf.data(), kMaxRegionBytes + 1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(e->RegisterMemory(reinterpret_cast<void*>(UINTPTR_MAX - 100), 4096).status().code(),
            StatusCode::kInvalidArgument);
  // A page that was mapped and is no longer, at the start or at the end.
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  void* map = mmap(nullptr, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(map, MAP_FAILED);
  auto* bytes = static_cast<uint8_t*>(map);
  ASSERT_EQ(munmap(bytes + page, page), 0);
  auto tail = e->RegisterMemory(bytes, 2 * page);
  EXPECT_EQ(tail.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(tail.status().message().find("not mapped"), std::string::npos) << tail.status().ToString();
  EXPECT_EQ(e->RegisterMemory(bytes + page, 16).status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(e->RegisterMemory(bytes, page).ok());  // the page still mapped
  ASSERT_EQ(munmap(bytes, page), 0);
  EXPECT_TRUE(e->RegisterMemory(buf.data(), buf.size()).ok());
}

// A plane releases the handler and is destroyed: a call of the handler
// already running must end first (a KV decoder's destructor once freed its
// maps under a running OnMessage, caught by TSan).
TEST(EngineHandler, ReplacingTheHandlerWaitsForItsRunningCall) {
  auto a = TransferEngine::Create(Options("tcp")).value();
  auto b = TransferEngine::Create(Options("tcp")).value();
  std::atomic<bool> entered{false}, release{false}, replaced{false};
  b->SetRecvHandler([&](const EngineAddress&, std::span<const uint8_t>) {
    entered = true;
    while (!release.load()) std::this_thread::yield();
  });
  auto peer = a->Connect(b->address()).value();
  const uint8_t msg[] = {1, 2, 3};
  ASSERT_TRUE(a->Send(peer, std::span<const uint8_t>(msg, 3), {}).ok());
  ASSERT_TRUE(WaitUntil([&] { return entered.load(); }, 20s));
  std::thread releaser([&] {
    b->SetRecvHandler(nullptr);
    replaced = true;
  });
  // Negative check: while the call runs, the replacement must not return.
  EXPECT_FALSE(WaitUntil([&] { return replaced.load(); }, 200ms));
  release = true;
  EXPECT_TRUE(WaitUntil([&] { return replaced.load(); }, 20s));
  releaser.join();

  // A handler that replaces itself does not wait for itself.
  std::atomic<int> second{0};
  b->SetRecvHandler([&](const EngineAddress&, std::span<const uint8_t>) {
    b->SetRecvHandler([&](const EngineAddress&, std::span<const uint8_t>) { ++second; });
    ++second;
  });
  ASSERT_TRUE(a->Send(peer, std::span<const uint8_t>(msg, 3), {}).ok());
  ASSERT_TRUE(a->Send(peer, std::span<const uint8_t>(msg, 3), {}).ok());
  EXPECT_TRUE(WaitUntil([&] { return second.load() == 2; }, 20s));
}

TEST(EngineFailure, DeadPeerTurnsIntoErrorsWithinTheTimeout) {
  auto o = Options("tcp");
  o.request_timeout = 1500ms;
  auto sender = TransferEngine::Create(o).value();
  std::vector<uint8_t> src(1 << 20, 1), dst(1 << 20);
  auto src_mr = sender->RegisterMemory(src.data(), src.size()).value();
  MrDescriptor desc;
  {
    auto receiver = TransferEngine::Create(o).value();
    auto mr = receiver->RegisterMemory(dst.data(), dst.size()).value();
    desc = receiver->Describe(*mr);
  }  // the receiver is gone: its port is closed
  auto remote = sender->Import(desc).value();
  CompletionCounter c;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 20; ++i)
    ASSERT_TRUE(sender->Submit(SingleWrite{src_mr, 0, 65536, remote, 0, 1}, {.counter = &c}).ok());
  ASSERT_TRUE(c.WaitFinished(20, 10s)) << "requests to a dead peer hung";
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_EQ(c.failed(), 20u);
  EXPECT_LT(took, 5s);
  const Status e = c.first_error();
  // Nothing can be posted to a closed port: withdrawn (kNotPosted), or
  // failed by the provider; never reported done.
  EXPECT_TRUE(e.code() == StatusCode::kNotPosted || e.code() == StatusCode::kTimeout ||
              e.code() == StatusCode::kIoError)
      << e.ToString();
}

// Work for a dead peer waits (and then fails) on its own: writes and
// messages to a live peer queued behind it go ahead at once.
TEST(EngineFailure, DeadPeerDoesNotHoldUpLivePeers) {
  auto o = Options("tcp");
  o.request_timeout = 4000ms;
  auto sender = TransferEngine::Create(o).value();
  auto live = TransferEngine::Create(o).value();
  std::vector<uint8_t> src(1 << 16, 7), dst(1 << 16), dead_dst(1 << 16);
  auto src_mr = sender->RegisterMemory(src.data(), src.size()).value();
  auto live_mr = live->RegisterMemory(dst.data(), dst.size()).value();
  auto to_live = sender->Import(live->Describe(*live_mr)).value();
  MrDescriptor dead_desc;
  {
    auto dead = TransferEngine::Create(o).value();
    dead_desc = dead->Describe(*dead->RegisterMemory(dead_dst.data(), dead_dst.size()).value());
  }
  auto to_dead = sender->Import(dead_desc).value();
  EXPECT_NE(to_dead->peer()->id(), to_live->peer()->id());  // per-peer ids are distinct
  CompletionCounter dead_c, live_c;
  const uint8_t msg[4] = {1, 2, 3, 4};
  for (int round = 0; round < 5; ++round) {
    ASSERT_TRUE(sender->Submit(SingleWrite{src_mr, 0, 4096, to_dead, 0, 3}, {.counter = &dead_c}).ok());
    ASSERT_TRUE(sender->Send(to_dead->peer(), msg, {.counter = &dead_c}).ok());
    const auto t0 = std::chrono::steady_clock::now();
    ASSERT_TRUE(sender->Submit(SingleWrite{src_mr, 0, 4096, to_live, 0, 9}, {.counter = &live_c}).ok());
    ASSERT_TRUE(live->WaitImm(9, 1, 3s).ok()) << "a write to a live peer waited behind a dead one";
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 1s) << "round " << round;
  }
  ASSERT_TRUE(live_c.WaitFinished(5, 5s));
  EXPECT_EQ(live_c.failed(), 0u);
  ASSERT_TRUE(dead_c.WaitFinished(10, 15s));
  EXPECT_EQ(dead_c.failed(), 10u);
}

TEST(EngineFailure, ShutdownWithRequestsInFlightFailsThemOnce) {
  auto o = Options("tcp");
  std::vector<uint8_t> src(4 << 20, 1), dst(4 << 20);
  std::atomic<int> done{0}, failed{0};
  {
    auto receiver = TransferEngine::Create(o).value();
    auto dst_mr = receiver->RegisterMemory(dst.data(), dst.size()).value();
    auto sender = TransferEngine::Create(o).value();
    auto src_mr = sender->RegisterMemory(src.data(), src.size()).value();
    auto remote = sender->Import(receiver->Describe(*dst_mr)).value();
    for (int i = 0; i < 500; ++i)
      ASSERT_TRUE(sender
                      ->Submit(SingleWrite{src_mr, 0, 4 << 20, remote, 0, 1},
                               {.on_done = [&] { done++; },
                                .on_error =
                                    [&](const Status& s) {
                                      EXPECT_EQ(s.code(), StatusCode::kCancelled) << s.ToString();
                                      failed++;
                                    }})
                      .ok());
  }  // both engines destroyed with writes in flight
  EXPECT_EQ(done + failed, 500);
  EXPECT_GT(failed.load(), 0);
}

TEST(EngineFailure, BadOptionsAndDescriptorsGetClearErrors) {
  auto o = Options("tcp");
  o.domains = 0;
  auto bad = TransferEngine::Create(o);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("domains = 0"), std::string::npos);
  auto none = TransferEngine::Create(Options("no-such-provider"));
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.status().message().find("no-such-provider"), std::string::npos);

  auto e = TransferEngine::Create(Options("tcp")).value();
  MrDescriptor d;
  d.owner.provider = "shm";
  d.owner.domains = {{1, 2, 3}};
  d.keys = {{1, 0}};
  d.length = 4096;
  auto imp = e->Import(d);
  ASSERT_FALSE(imp.ok());
  EXPECT_NE(imp.status().message().find("'shm'"), std::string::npos) << imp.status().ToString();
  d.owner.provider = e->provider();
  d.keys.clear();
  EXPECT_FALSE(e->Import(d).ok());
}

TEST(EngineManualProgress, RoundTripWithoutThreads) {
  auto o = Options("tcp");
  o.progress = ProgressMode::kManual;
  auto a = TransferEngine::Create(o).value();
  auto b = TransferEngine::Create(o).value();
  std::vector<uint8_t> buf(4096, 0), src(4096);
  FillPattern(src.data(), src.size(), 3);
  auto mr = b->RegisterMemory(buf.data(), buf.size()).value();
  auto smr = a->RegisterMemory(src.data(), src.size()).value();
  auto dst = a->Import(b->Describe(*mr)).value();
  bool done = false;
  ASSERT_TRUE(a->Submit(SingleWrite{smr, 0, 4096, dst, 0, 5}, {.on_done = [&] { done = true; }}).ok());
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while ((!done || b->ImmAvailable(5) == 0) && std::chrono::steady_clock::now() < deadline) {
    a->Progress();
    b->Progress();
  }
  EXPECT_TRUE(done);
  EXPECT_TRUE(b->TryConsumeImm(5, 1));
  EXPECT_EQ(0, memcmp(buf.data(), src.data(), 4096));

  // DriveUntil in manual mode is Progress() in a loop, with a deadline.
  bool cheap_done = false;
  ASSERT_TRUE(a->Submit(ImmOnly{dst, 6}, {.on_done = [&] { cheap_done = true; }, .on_worker = true}).ok());
  EXPECT_TRUE(a->DriveUntil([&] { return cheap_done; }, 10s));
  EXPECT_TRUE(b->DriveUntil([&] { return b->ImmAvailable(6) == 1; }, 10s));
  EXPECT_FALSE(b->DriveUntil([] { return false; }, 1ms));
}

// A region from AllocateMemory owns its memory: the caller may drop it right
// after Submit (as after a failed request whose writes may still be posted)
// and the write still reads it; it goes once the request has ended.
TEST(EngineManualProgress, AllocatedMemoryLivesUntilTheLastRequestEnds) {
  auto o = Options("tcp");
  o.progress = ProgressMode::kManual;
  auto a = TransferEngine::Create(o).value();
  auto b = TransferEngine::Create(o).value();
  constexpr size_t kLen = 256 << 10;
  std::vector<uint8_t> buf(kLen, 0), expected(kLen);
  FillPattern(expected.data(), kLen, 9);
  auto mr = b->RegisterMemory(buf.data(), buf.size()).value();
  auto dst = a->Import(b->Describe(*mr)).value();

  auto src = a->AllocateMemory(kLen);
  ASSERT_TRUE(src.ok()) << src.status().ToString();
  LocalMr region = std::move(src).value();
  ASSERT_EQ(region->length(), kLen);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(region->data()) % 4096, 0u);
  EXPECT_TRUE(std::all_of(region->data(), region->data() + kLen, [](uint8_t v) { return v == 0; }));
  std::memcpy(region->data(), expected.data(), kLen);
  std::weak_ptr<const MemoryRegion> watch = region;
  // Manual progress: nothing is posted before Progress(), so the write
  // reads the memory after the caller let go of it.
  CompletionCounter done;
  ASSERT_TRUE(a->Submit(SingleWrite{region, 0, kLen, dst, 0, 11}, {.counter = &done}).ok());
  region.reset();
  EXPECT_FALSE(watch.expired()) << "the queued request holds the region";
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  while ((done.finished() < 1 || b->ImmAvailable(11) == 0 || !watch.expired()) &&
         std::chrono::steady_clock::now() < deadline) {
    a->Progress();
    b->Progress();
  }
  EXPECT_EQ(done.done(), 1u) << done.first_error().ToString();
  EXPECT_TRUE(b->TryConsumeImm(11, 1));
  EXPECT_EQ(0, memcmp(buf.data(), expected.data(), kLen));
  EXPECT_TRUE(watch.expired()) << "the region outlived its last request";

  EXPECT_EQ(a->AllocateMemory(0).status().code(), StatusCode::kInvalidArgument);
  const Status huge = a->AllocateMemory(size_t(1) << 50).status();
  EXPECT_EQ(huge.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(huge.message().find("valid range"), std::string::npos) << huge.ToString();
}

#endif  // !TE_ENGINE_TESTS_ON_VERBS_NATIVE

}  // namespace
}  // namespace te::testing
