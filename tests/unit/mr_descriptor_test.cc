#include "transfer/mr_descriptor.h"

#include <gtest/gtest.h>

namespace te {
namespace {

MrDescriptor Sample() {
  MrDescriptor d;
  d.owner.provider = "tcp;ofi_rxm";
  d.owner.domains = {{2, 0, 0x1f, 0x90, 127, 0, 0, 1}, {2, 0, 0x1f, 0x91, 127, 0, 0, 1}};
  d.keys = {{11, 0}, {12, 0x7f0000001000}};
  d.length = 1 << 20;
  return d;
}

TEST(MrDescriptor, RoundTripsThroughBytesAndHex) {
  MrDescriptor d = Sample();
  auto back = MrDescriptor::Deserialize(d.Serialize());
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back.value(), d);
  auto from_hex = MrDescriptor::FromHex(d.ToHex());
  ASSERT_TRUE(from_hex.ok());
  EXPECT_EQ(from_hex.value(), d);
}

TEST(MrDescriptor, RejectsEveryCorruptedByte) {
  const auto bytes = Sample().Serialize();
  for (size_t i = 0; i < bytes.size(); ++i) {
    auto bad = bytes;
    bad[i] ^= 0x5a;
    auto r = MrDescriptor::Deserialize(bad);
    EXPECT_FALSE(r.ok()) << "corruption at byte " << i << " was accepted";
  }
}

TEST(MrDescriptor, RejectsEveryTruncation) {
  const auto bytes = Sample().Serialize();
  for (size_t n = 0; n < bytes.size(); ++n) {
    auto r = MrDescriptor::Deserialize(std::span(bytes.data(), n));
    ASSERT_FALSE(r.ok()) << "truncation to " << n << " bytes was accepted";
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  }
}

TEST(MrDescriptor, NamesWhatIsWrong) {
  auto bytes = Sample().Serialize();
  bytes[4] = 9;  // version
  auto r = MrDescriptor::Deserialize(bytes);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("version 9"), std::string::npos) << r.status().ToString();

  auto addr = EngineAddress::Deserialize(Sample().Serialize());  // wrong kind of blob
  ASSERT_FALSE(addr.ok());
  EXPECT_NE(addr.status().message().find("magic"), std::string::npos);

  auto hex = MrDescriptor::FromHex("abc");
  ASSERT_FALSE(hex.ok());
  EXPECT_NE(hex.status().message().find("odd length"), std::string::npos);
  auto hex2 = MrDescriptor::FromHex("zz");
  ASSERT_FALSE(hex2.ok());
  EXPECT_NE(hex2.status().message().find("non-hex"), std::string::npos);
}

TEST(EngineAddress, ValidatesCounts) {
  EngineAddress a;
  a.provider = "tcp;ofi_rxm";
  EXPECT_FALSE(a.Validate().ok());  // no domains
  a.domains = {{1, 2, 3}};
  EXPECT_TRUE(a.Validate().ok());
  a.domains.push_back({});
  EXPECT_FALSE(a.Validate().ok());  // empty address
  auto back = EngineAddress::Deserialize(EngineAddress{"shm", {{9, 9}}}.Serialize());
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->provider, "shm");
}

// An engine with the same-host domain beside its NICs: version 2 carries it;
// one without keeps version 1's bytes.
TEST(MrDescriptor, SameHostDomainRoundTripsAndOthersKeepVersionOne) {
  MrDescriptor d = Sample();
  EXPECT_EQ(d.Serialize()[4], 1);  // the version byte
  d.owner.same_host_domains = 1;
  ASSERT_TRUE(d.Validate().ok());
  EXPECT_EQ(d.owner.nic_domains(), 1u);
  const auto bytes = d.Serialize();
  EXPECT_EQ(bytes[4], 2);
  auto back = MrDescriptor::Deserialize(bytes);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back.value(), d);
  auto address = EngineAddress::Deserialize(d.owner.Serialize());
  ASSERT_TRUE(address.ok()) << address.status().ToString();
  EXPECT_EQ(address->same_host_domains, 1);
  for (size_t i = 0; i < bytes.size(); ++i) {
    auto bad = bytes;
    bad[i] ^= 0x5a;
    EXPECT_FALSE(MrDescriptor::Deserialize(bad).ok()) << "corruption at byte " << i << " was accepted";
  }
}

TEST(MrDescriptor, SameHostDomainNeedsANicDomainBesideIt) {
  EngineAddress a = Sample().owner;
  a.same_host_domains = 2;
  EXPECT_FALSE(a.Validate().ok());
  a.same_host_domains = 1;
  a.domains.resize(1);  // a same-host domain alone: nobody elsewhere reaches it
  Status st = a.Validate();
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("NIC domain"), std::string::npos) << st.ToString();
}

}  // namespace
}  // namespace te
