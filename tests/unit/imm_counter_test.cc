#include "transfer/imm_counter.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <thread>

namespace te {
namespace {

using namespace std::chrono_literals;

void RunAll(std::vector<ImmCounter::Callback>& ready) {
  for (auto& cb : ready) cb();
  ready.clear();
}

TEST(ImmCounter, ArrivalsBeforeTheExpectationAreNotLost) {
  ImmCounter c;
  std::vector<ImmCounter::Callback> ready;
  c.Add(7, 3, &ready);
  int fired = 0;
  ASSERT_TRUE(c.Expect(
                   7, 3, [&] { ++fired; }, &ready)
                  .ok());
  RunAll(ready);
  EXPECT_EQ(fired, 1);
  EXPECT_EQ(c.Available(7), 0u);  // consumed
}

TEST(ImmCounter, FiresExactlyOnceWhenCountReached) {
  ImmCounter c;
  std::vector<ImmCounter::Callback> ready;
  int fired = 0;
  ASSERT_TRUE(c.Expect(
                   1, 4, [&] { ++fired; }, &ready)
                  .ok());
  for (int i = 0; i < 3; ++i) {
    c.Add(1, 1, &ready);
    RunAll(ready);
    EXPECT_EQ(fired, 0);
  }
  c.Add(1, 1, &ready);
  RunAll(ready);
  EXPECT_EQ(fired, 1);
  c.Add(1, 10, &ready);
  RunAll(ready);
  EXPECT_EQ(fired, 1);
  EXPECT_EQ(c.Available(1), 10u);
}

TEST(ImmCounter, ForgetDropsExpectationsAndArrivals) {
  ImmCounter c;
  std::vector<ImmCounter::Callback> ready;
  int fired = 0;
  ASSERT_TRUE(c.Expect(
                   5, 4, [&] { ++fired; }, &ready)
                  .ok());
  c.Add(5, 3, &ready);
  EXPECT_EQ(c.Available(5), 3u);
  EXPECT_EQ(c.Forget(5), 3u);
  EXPECT_EQ(c.Available(5), 0u);
  c.Add(5, 1, &ready);  // a straggler after Forget: the old expectation is gone
  RunAll(ready);
  EXPECT_EQ(fired, 0);
  EXPECT_EQ(c.Available(5), 1u);
  EXPECT_EQ(c.Forget(6), 0u);  // never seen
}

TEST(ImmCounter, ForgetWhileAWaitIsBlockedKeepsTheWaiterWorking) {
  ImmCounter c;
  std::vector<ImmCounter::Callback> ready;
  c.Add(9, 2, &ready);
  std::thread waiter([&] { EXPECT_TRUE(c.Wait(9, 1, 10s).ok()); });
  std::this_thread::sleep_for(20ms);
  c.Forget(9);  // drops the 2 (or 1, if the waiter already took one)
  c.Add(9, 1, &ready);
  waiter.join();
  EXPECT_LE(c.Available(9), 1u);
}

TEST(ImmCounter, ShuffledArrivalsOfManyImmediates) {
  ImmCounter c;
  std::vector<ImmCounter::Callback> ready;
  constexpr int kImms = 500;
  std::vector<uint32_t> arrivals;
  std::vector<int> fired(kImms, 0);
  for (uint32_t imm = 0; imm < kImms; ++imm) {
    for (uint32_t k = 0; k < imm % 7 + 1; ++k) arrivals.push_back(imm);
    // Half the expectations come before any arrival, half after.
    if (imm % 2 == 0) {
      ASSERT_TRUE(c.Expect(
                       imm, imm % 7 + 1, [&fired, imm] { fired[imm]++; }, &ready)
                      .ok());
    }
  }
  std::shuffle(arrivals.begin(), arrivals.end(), std::mt19937(1));
  for (size_t i = 0; i < arrivals.size(); i += 13)
    c.Add(std::span(arrivals).subspan(i, std::min<size_t>(13, arrivals.size() - i)), &ready);
  for (uint32_t imm = 1; imm < kImms; imm += 2)
    ASSERT_TRUE(c.Expect(
                     imm, imm % 7 + 1, [&fired, imm] { fired[imm]++; }, &ready)
                    .ok());
  RunAll(ready);
  for (int imm = 0; imm < kImms; ++imm) EXPECT_EQ(fired[imm], 1) << "imm " << imm;
}

TEST(ImmCounter, ExpectationsAreServedInOrder) {
  ImmCounter c;
  std::vector<ImmCounter::Callback> ready;
  std::vector<int> order;
  ASSERT_TRUE(c.Expect(
                   5, 3, [&] { order.push_back(1); }, &ready)
                  .ok());
  ASSERT_TRUE(c.Expect(
                   5, 1, [&] { order.push_back(2); }, &ready)
                  .ok());
  c.Add(5, 2, &ready);
  RunAll(ready);
  EXPECT_TRUE(order.empty());  // the second must not jump the first
  c.Add(5, 2, &ready);
  RunAll(ready);
  EXPECT_EQ(order, (std::vector<int>{1, 2}));
}

TEST(ImmCounter, WaitTimesOutNamingTheCount) {
  ImmCounter c;
  std::vector<ImmCounter::Callback> ready;
  c.Add(9, 1, &ready);
  Status s = c.Wait(9, 2, 20ms);
  EXPECT_EQ(s.code(), StatusCode::kTimeout);
  EXPECT_NE(s.message().find("1 arrived"), std::string::npos) << s.message();
  EXPECT_EQ(c.Available(9), 1u);  // a timed-out wait consumes nothing
}

TEST(ImmCounter, WaitWakesOnArrivalFromAnotherThread) {
  ImmCounter c;
  std::thread t([&] {
    std::this_thread::sleep_for(10ms);
    std::vector<ImmCounter::Callback> ready;
    for (int i = 0; i < 5; ++i) c.Add(3, 1, &ready);
  });
  EXPECT_TRUE(c.Wait(3, 5, 5s).ok());
  t.join();
  EXPECT_FALSE(c.TryConsume(3, 1));
}

TEST(ImmCounter, RejectsZeroCountAndMissingCallback) {
  ImmCounter c;
  std::vector<ImmCounter::Callback> ready;
  EXPECT_EQ(c.Expect(
                 1, 0, [] {}, &ready)
                .code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(c.Expect(1, 1, nullptr, &ready).code(), StatusCode::kInvalidArgument);
}

// Peers choose immediate values: a flood of distinct ones is bounded, and
// values whose arrivals were consumed leave the table.
TEST(ImmCounter, DistinctValuesAreBoundedAndConsumedOnesLeave) {
  ImmCounter c(/*max_values=*/100);
  std::vector<ImmCounter::Callback> ready;
  std::vector<uint32_t> flood(10000);
  for (uint32_t i = 0; i < flood.size(); ++i) flood[i] = 1000000 + i;
  c.Add(flood, &ready);
  EXPECT_EQ(c.tracked(), 100u);
  EXPECT_EQ(c.dropped(), 9900u);
  // Consuming them empties the table, and new values are taken again.
  for (uint32_t i = 0; i < 100; ++i) ASSERT_TRUE(c.TryConsume(1000000 + i, 1));
  EXPECT_EQ(c.tracked(), 0u);
  int fired = 0;
  ASSERT_TRUE(c.Expect(
                   7, 2, [&] { ++fired; }, &ready)
                  .ok());
  c.Add(7, 2, &ready);
  for (auto& cb : ready) cb();
  EXPECT_EQ(fired, 1);
  EXPECT_EQ(c.tracked(), 0u) << "a served expectation left its entry behind";
  // The caller's own expectations and waits are never refused by the cap.
  for (uint32_t i = 0; i < 150; ++i)
    ASSERT_TRUE(c.Expect(
                     5000 + i, 1, [] {}, &ready)
                    .ok());
  EXPECT_EQ(c.tracked(), 150u);
  c.Add(5000, 1, &ready);  // an expected value is served even above the cap
  EXPECT_EQ(c.tracked(), 149u);
}

}  // namespace
}  // namespace te
