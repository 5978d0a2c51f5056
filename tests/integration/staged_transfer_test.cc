// The staging path (transfer/staging/staged_transfer.h) over tcp with the host copy
// engine: the pipeline, the ring's reuse, the immediate count and failures.
// The same code with the CUDA copy engine runs in tests/gpu.
#include <gtest/gtest.h>

#include "integration/test_support.h"
#include "transfer/staging/staged_transfer.h"

namespace te::testing {
namespace {

struct Staged {
  std::unique_ptr<TransferEngine> sender, receiver;
  std::unique_ptr<CopyEngine> copies = MakeHostCopyEngine();
  std::vector<uint8_t> src, staging, device;
  LocalMr staging_mr;
  RemoteMr remote;

  Staged(size_t bytes, int domains = 1, std::chrono::milliseconds timeout = std::chrono::milliseconds(5000)) {
    auto o = Options("tcp", domains);
    o.request_timeout = timeout;
    sender = TransferEngine::Create(o).value();
    receiver = TransferEngine::Create(o).value();
    src.resize(bytes);
    FillPattern(src.data(), bytes, 9);
    staging.assign(bytes, 0);
    device.assign(bytes, 0);
    staging_mr = receiver->RegisterMemory(staging.data(), staging.size()).value();
    remote = sender->Import(receiver->Describe(*staging_mr)).value();
  }
};

TEST(StagedTransfer, ChunksThroughASmallRingLandByteExact) {
  for (int domains : {1, 2}) {
    const size_t bytes = (10 << 20) + 123;  // 11 chunks, the last one short
    Staged t(bytes, domains);
    StagingOptions o;
    o.chunk_bytes = 1 << 20;
    o.depth = 2;  // every slot is reused five times
    auto sender = StagedSender::Create(t.sender.get(), t.copies.get(), o);
    ASSERT_TRUE(sender.ok()) << sender.status().ToString();
    EXPECT_EQ((*sender)->ExpectedImms(bytes, t.remote).value(), 11u * domains);
    ASSERT_TRUE((*sender)->Write(t.src.data(), bytes, t.remote, 0, 77).ok());
    StagedReceiver receiver(t.receiver.get(), t.copies.get(), o);
    ASSERT_TRUE(receiver
                    .Receive(t.device.data(), t.staging.data(), bytes, 77,
                             (*sender)->ExpectedImms(bytes, t.remote).value(), 10s)
                    .ok());
    EXPECT_TRUE(t.device == t.src) << domains << " domains";
    EXPECT_EQ(t.receiver->ImmAvailable(77), 0u);  // exactly the expected count arrived
  }
}

TEST(StagedTransfer, SerialRingAndShortTransfers) {
  Staged t(3 << 20);
  StagingOptions o;
  o.chunk_bytes = 64 << 10;
  o.depth = 1;
  auto sender = StagedSender::Create(t.sender.get(), t.copies.get(), o).value();
  for (size_t len : {size_t(1), size_t(4096), size_t(64 << 10), size_t((64 << 10) + 1), size_t(3 << 20)}) {
    std::fill(t.device.begin(), t.device.end(), 0);
    ASSERT_TRUE(sender->Write(t.src.data(), len, t.remote, 0, 5).ok());
    StagedReceiver receiver(t.receiver.get(), t.copies.get(), o);
    ASSERT_TRUE(
        receiver.Receive(t.device.data(), t.staging.data(), len, 5, sender->ExpectedImms(len, t.remote).value(), 10s)
            .ok());
    EXPECT_TRUE(std::equal(t.src.begin(), t.src.begin() + len, t.device.begin())) << len << " bytes";
  }
  EXPECT_EQ(sender->ExpectedImms(0, t.remote).value(), 0u);
  EXPECT_TRUE(sender->Write(t.src.data(), 0, t.remote, 0, 5).ok());
}

TEST(StagedTransfer, BadInputAndADeadPeerAreErrors) {
  Staged t(1 << 20, 1, std::chrono::milliseconds(1500));
  StagingOptions bad;
  bad.depth = 0;
  EXPECT_EQ(StagedSender::Create(t.sender.get(), t.copies.get(), bad).status().code(), StatusCode::kInvalidArgument);
  // A ring whose size (chunk_bytes x depth) would wrap is refused, not allocated.
  bad.depth = 64;
  bad.chunk_bytes = SIZE_MAX / 32;
  const Status wraps = StagedSender::Create(t.sender.get(), t.copies.get(), bad).status();
  EXPECT_EQ(wraps.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(wraps.message().find("chunk_bytes"), std::string::npos) << wraps.ToString();
  StagingOptions o;
  o.chunk_bytes = 256 << 10;
  auto sender = StagedSender::Create(t.sender.get(), t.copies.get(), o).value();
  Status s = sender->Write(t.src.data(), 1 << 20, t.remote, 1, 1);
  EXPECT_EQ(s.code(), StatusCode::kOutOfRange);
  EXPECT_NE(s.message().find("outside the remote region of 1048576 bytes"), std::string::npos) << s.ToString();
  t.receiver.reset();  // the peer goes away
  const auto t0 = std::chrono::steady_clock::now();
  s = sender->Write(t.src.data(), 1 << 20, t.remote, 0, 1);
  EXPECT_FALSE(s.ok());
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 8s);
}

}  // namespace
}  // namespace te::testing
