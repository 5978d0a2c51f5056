// RequestPool: states come back clean, are reused, and the pool stays bounded.
#include "transfer/request_pool.h"

#include <gtest/gtest.h>

#include <thread>

namespace te {
namespace {

TEST(RequestPool, AStateComesBackWithEveryFieldReset) {
  RequestPool pool(4);
  RequestState* raw = nullptr;
  {
    auto r = pool.Get();
    raw = r.get();
    r->works.resize(3);
    r->works[1].is_send = true;
    r->works[1].message.assign(4096, 7);
    r->outstanding = 3;
    r->posted = 2;
    r->failed = true;
    bool called = false;
    r->completion.on_done = [&called] { called = true; };
    r->submitted = std::chrono::steady_clock::now();
    r->deadline = r->submitted;
  }  // given up before the worker saw it: back to the pool
  auto again = pool.Get();
  EXPECT_EQ(again.get(), raw);  // reused, not reallocated (this pool caches, even under ASan)
  // Work elements stay for the next request to assign (no zeroing per
  // request); a control message's buffer does not.
  EXPECT_EQ(again->works.size(), 3u);
  for (const Work& w : again->works) {
    EXPECT_FALSE(w.is_send);
    EXPECT_EQ(w.message.capacity(), 0u);
  }
  EXPECT_EQ(again->outstanding, 0u);
  EXPECT_EQ(again->posted, 0u);
  EXPECT_FALSE(again->failed);
  EXPECT_FALSE(again->completion.on_done);
  EXPECT_EQ(again->completion.counter, nullptr);
  EXPECT_EQ(again->list, nullptr);
  EXPECT_EQ(again->mpsc_next.load(), nullptr);
  EXPECT_EQ(again->submitted, std::chrono::steady_clock::time_point{});
}

TEST(RequestPool, KeepsAtMostMaxCachedAndTrimsLargeVectors) {
  RequestPool pool(2);
  std::vector<RequestState*> batch;
  for (int i = 0; i < 5; ++i) {
    RequestState* r = pool.Get().release();
    r->works.resize(i == 0 ? 10000 : 4);  // one request of many pages
    batch.push_back(r);
  }
  pool.PutAll(&batch);
  EXPECT_TRUE(batch.empty());
  // Two kept; neither holds the 10000-entry vector's memory.
  auto a = pool.Get(), b = pool.Get();
  EXPECT_LE(a->works.capacity(), 256u);
  EXPECT_LE(b->works.capacity(), 256u);
}

TEST(RequestPool, GetAndPutFromManyThreads) {
  RequestPool pool(64);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&pool] {
      for (int i = 0; i < 5000; ++i) {
        auto r = pool.Get();
        ASSERT_EQ(r->outstanding, 0u);  // nobody else's state leaks in
        r->outstanding = 7;
        r->works.resize(2);
      }
    });
  }
  for (auto& t : threads) t.join();
}

}  // namespace
}  // namespace te
