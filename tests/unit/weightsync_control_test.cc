// The weight-sync control lines (weightsync/control_messages.h): what the
// sides send parses back to itself, and what a peer could send instead is
// refused with the reason, never thrown or half-read.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "weightsync/control_messages.h"

namespace te::weightsync {
namespace {

std::vector<uint8_t> Bytes(const std::string& s) { return {s.begin(), s.end()}; }

TEST(WeightSyncControl, LinesTheSidesSendParseBack) {
  const BeginMessage b{.version = 42, .writes = 1000, .source = 3};
  EXPECT_EQ(EncodeBegin(b), "tews1 BEGIN 42 1000 3");
  auto pb = ParseBegin(Bytes(EncodeBegin(b)));
  ASSERT_TRUE(pb.ok()) << pb.status().ToString();
  EXPECT_EQ(pb->version, 42u);
  EXPECT_EQ(pb->writes, 1000u);
  EXPECT_EQ(pb->source, 3u);

  const AnswerMessage ready{.ready = true, .version = 7, .rank = 2};
  const AnswerMessage refused{.ready = false, .version = 7, .rank = 2, .published = 9};
  EXPECT_EQ(EncodeAnswer(ready), "tews1 READY 7 2");
  EXPECT_EQ(EncodeAnswer(refused), "tews1 REFUSED 7 2 9");
  auto pr = ParseAnswer(Bytes(EncodeAnswer(ready)));
  ASSERT_TRUE(pr.ok());
  EXPECT_TRUE(pr->ready);
  EXPECT_EQ(pr->rank, 2u);
  auto pf = ParseAnswer(Bytes(EncodeAnswer(refused)));
  ASSERT_TRUE(pf.ok());
  EXPECT_FALSE(pf->ready);
  EXPECT_EQ(pf->published, 9u);
  // The largest numbers the fields hold.
  auto big = ParseBegin(Bytes("tews1 BEGIN 18446744073709551615 18446744073709551615 1048575"));
  ASSERT_TRUE(big.ok()) << big.status().ToString();
  EXPECT_EQ(big->version, ~uint64_t(0));
}

TEST(WeightSyncControl, WhatAPeerCouldSendInsteadIsRefused) {
  for (const char* line : {
           "",
           "tews1",
           "tews1 BEGIN",
           "tews1 BEGIN 1 2",
           "tews1 BEGIN 1 2 3 4",  // fields missing or extra
           "tews2 BEGIN 1 2 3",
           "tews1 begin 1 2 3",
           "tews1 READY 1 2",    // not a BEGIN
           "tews1 BEGIN 0 2 3",  // versions start at 1
           "tews1 BEGIN -1 2 3",
           "tews1 BEGIN +1 2 3",
           "tews1 BEGIN 1 0x10 3",                  // not decimal
           "tews1 BEGIN 18446744073709551616 2 3",  // beyond 64 bits
           "tews1 BEGIN 1 2 1048576",               // rank beyond the wire's range
           "tews1 BEGIN 1 2 3 ",
           " tews1 BEGIN 1 2 3",
           "tews1  BEGIN 1 2 3",  // stray spaces
           "tews1 BEGIN 1 2 3\n",
           "tews1 BEGIN 1\t2 3",  // other whitespace
       }) {
    auto p = ParseBegin(Bytes(line));
    EXPECT_FALSE(p.ok()) << "accepted '" << line << "'";
    if (!p.ok()) {
      EXPECT_FALSE(p.status().message().empty());
    }
  }
  for (const char* line : {"tews1 READY 1", "tews1 READY 1 2 3", "tews1 REFUSED 1 2", "tews1 READY 0 2",
                           "tews1 REFUSED 1 2 x", "tews1 READY 1 4294967296", "tews1 BEGIN 1 2 3"}) {
    EXPECT_FALSE(ParseAnswer(Bytes(line)).ok()) << "accepted '" << line << "'";
  }
  // A line longer than any the sides send is refused before it is split.
  const std::string long_line = "tews1 BEGIN 1 2 3" + std::string(kMaxControlLine, '0');
  auto p = ParseBegin(Bytes(long_line));
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find(std::to_string(kMaxControlLine)), std::string::npos) << p.status().ToString();
  // The reason names the bad field and its range.
  auto bad_rank = ParseBegin(Bytes("tews1 BEGIN 1 2 1048576"));
  EXPECT_NE(bad_rank.status().message().find("source rank"), std::string::npos) << bad_rank.status().ToString();
}

}  // namespace
}  // namespace te::weightsync
