#include "transfer/mpsc_queue.h"

#include <gtest/gtest.h>

#include <memory>
#include <thread>
#include <vector>

namespace te {
namespace {

struct Item : MpscNode {
  int producer = 0;
  int seq = 0;
};

TEST(MpscQueue, EveryItemArrivesOnceAndInPerProducerOrder) {
  constexpr int kProducers = 4, kItems = 20000;
  std::vector<std::unique_ptr<Item[]>> items;
  for (int p = 0; p < kProducers; ++p) items.push_back(std::make_unique<Item[]>(kItems));
  MpscQueue q;
  std::vector<std::thread> threads;
  for (int p = 0; p < kProducers; ++p)
    threads.emplace_back([&, p] {
      for (int i = 0; i < kItems; ++i) {
        items[p][i].producer = p;
        items[p][i].seq = i;
        q.Push(&items[p][i]);
      }
    });
  std::vector<int> next(kProducers, 0);
  int got = 0;
  while (got < kProducers * kItems) {
    MpscNode* n = q.Pop();
    if (!n) continue;
    auto* it = static_cast<Item*>(n);
    ASSERT_EQ(it->seq, next[it->producer]) << "producer " << it->producer;
    next[it->producer]++;
    ++got;
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(q.Pop(), nullptr);
  EXPECT_TRUE(q.LooksEmpty());
}

}  // namespace
}  // namespace te
