// The inputs that crashed, hung or exhausted memory before the parsers
// checked their sizes (docs/RELIABILITY.md), each refused with an error now.
// tests/fuzz runs the same parsers on millions of mutated inputs.
#include <gtest/gtest.h>

#include <string>

#include "base/checked_math.h"
#include "kvcache/kv_layout.h"
#include "kvcache/kv_messages.h"
#include "moe/placement.h"
#include "telemetry/collector.h"
#include "transfer/mr_descriptor.h"
#include "weightsync/model_spec.h"

namespace te {
namespace {

TEST(CheckedMath, RefusesWrapsAndNamesTheFactors) {
  uint64_t out = 7;
  EXPECT_FALSE(CheckedMul(uint64_t(1) << 62, 4, &out));
  EXPECT_EQ(out, 7u);
  EXPECT_TRUE(CheckedMul(3, 4, &out));
  EXPECT_EQ(out, 12u);
  EXPECT_FALSE(CheckedAdd(~uint64_t(0), 1, &out));
  EXPECT_TRUE(RangeWithin(10, 5, 15));
  EXPECT_FALSE(RangeWithin(10, 6, 15));
  EXPECT_FALSE(RangeWithin(~uint64_t(0), 2, 15));
  auto p = CheckedProduct("region", {uint64_t(1) << 40, uint64_t(1) << 40});
  ASSERT_FALSE(p.ok());
  EXPECT_NE(p.status().message().find("1099511627776 x 1099511627776"), std::string::npos) << p.status().ToString();
  EXPECT_EQ(CheckedProduct("region", {2, 3, 7}).value(), 42u);
  EXPECT_FALSE(CheckedProduct("region", {1 << 20, 1 << 20}, 1 << 30).ok());
  EXPECT_EQ(ParseUint64("18446744073709551615").value_or(0), ~uint64_t(0));
  EXPECT_FALSE(ParseUint64("18446744073709551616").has_value());
  EXPECT_FALSE(ParseUint64("-1").has_value());
  EXPECT_FALSE(ParseUint64("12x").has_value());
  EXPECT_FALSE(ParseUint64("").has_value());
}

TEST(HostileInput, KvPullAnnouncingTwoToTheSixtyTwoPages) {
  kvcache::KvMessage pull;
  pull.kind = kvcache::KvMessage::Kind::kPull;
  pull.layout = pull.source_layout = kvcache::KvLayout::Preset("deepseek").value();
  pull.descriptor_hex = "d";
  auto bytes = pull.Encode();  // no pages: "... d 0 0 kvl1 ..."
  std::string text(bytes.begin(), bytes.end());
  const size_t at = text.find(" d 0 0 kvl1");
  ASSERT_NE(at, std::string::npos) << text;
  text.replace(at, 11, " d 4611686018427387904 0 kvl1");  // 2^62 * 4 wraps to 0 = the bytes carried
  auto m = kvcache::KvMessage::Decode({reinterpret_cast<const uint8_t*>(text.data()), text.size()});
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("4611686018427387904 pages"), std::string::npos) << m.status().ToString();
}

TEST(HostileInput, KvLayoutWhoseSizeOverflows) {
  auto l = kvcache::KvLayout::Parse("kvl1 4096 65536 1024 65536 8 0 NHD 1 1073741824");
  ASSERT_FALSE(l.ok());
  EXPECT_NE(l.status().message().find("overflows"), std::string::npos) << l.status().ToString();
}

TEST(HostileInput, CollectorInfoWhoseSizeOverflows) {
  EXPECT_FALSE(telemetry::CollectorInfo::Parse("tetel1 4611686018427387904 16 4 7 2 2 64 32 -").ok());
  EXPECT_FALSE(telemetry::CollectorInfo::Parse("tetel1 1024 16 4 7 4294967295 4294967295 4294967295 65536 -").ok());
  EXPECT_TRUE(telemetry::CollectorInfo::Parse("tetel1 1024 16 4 7 2 2 64 32 -").ok());
}

TEST(HostileInput, ModelWhoseSizeOverflows) {
  auto m = weightsync::ParseModelJson(
      R"({"params": [{"name": "w", "dtype": "fp32", "shape": [1099511627776, 1099511627776]}]})");
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("'w'"), std::string::npos) << m.status().ToString();
  // Each parameter fits, the total does not.
  std::string many = R"({"params": [)";
  for (int i = 0; i < 20; ++i)
    many += std::string(i ? "," : "") + R"({"name": "p)" + std::to_string(i) +
            R"(", "dtype": "fp32", "shape": [1099511627776]})";
  many += "]}";
  EXPECT_FALSE(weightsync::ParseModelJson(many).ok());
}

TEST(HostileInput, TraceDeclaringTooManyExpertsForTheAffinityTables) {
  EXPECT_FALSE(moe::ExpertAffinity::CheckSize(16, 32767).ok());
  EXPECT_TRUE(moe::ExpertAffinity::CheckSize(61, 256).ok());
}

TEST(HostileInput, DescriptorBuiltInMemoryIsValidatedLikeADecodedOne) {
  MrDescriptor d;
  d.owner.provider = "shm";
  d.owner.domains = {{1, 2, 3}};
  d.length = 4096;
  d.keys = {{1, ~uint64_t(0) - 10}};
  EXPECT_FALSE(d.Validate().ok());
  d.keys[0].remote_base = 4096;
  EXPECT_TRUE(d.Validate().ok());
  d.keys.clear();
  EXPECT_FALSE(d.Validate().ok());
}

}  // namespace
}  // namespace te
