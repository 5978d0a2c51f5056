// What a peer can and cannot do to an engine: where it listens, which
// memory a guessed key reaches, descriptors built by hand, unbounded
// submission, queued versus in-flight deadlines, dead shm peers, stale shm
// regions, and a bounded peer table (docs/RELIABILITY.md).
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>

#include "integration/peer_process.h"
#include "integration/test_support.h"
#include "nic/fabric/fabric_setup.h"

namespace te::testing {
namespace {

TEST(Trust, TcpListensOnlyOnItsInterface) {
  auto e = TransferEngine::Create(Options("tcp")).value();
  for (const auto& d : e->address().domains) {
    ASSERT_GE(d.size(), sizeof(sockaddr_in));
    sockaddr_in a;
    std::memcpy(&a, d.data(), sizeof(a));
    ASSERT_EQ(a.sin_family, AF_INET);
    EXPECT_EQ(ntohl(a.sin_addr.s_addr), INADDR_LOOPBACK) << "the default tcp engine must bind 127.0.0.1";
  }
  auto o = Options("tcp");
  o.fabric.domain = "no-such-interface0";
  auto bad = TransferEngine::Create(o);
  ASSERT_FALSE(bad.ok()) << "a nonexistent interface was accepted";
  EXPECT_NE(bad.status().message().find("no-such-interface0"), std::string::npos) << bad.status().ToString();
  EXPECT_NE(bad.status().message().find("lo"), std::string::npos) << "the error lists the interfaces there are";
}

// A peer holding one descriptor tries its neighbours' keys: nothing lands
// outside what it was given, and the keys are not a sequence.
TEST(Trust, GuessedKeysReachNoOtherRegion) {
  for (const char* provider : {"tcp", "shm", "local"}) {
    SCOPED_TRACE(provider);
    auto o = Options(provider);
    o.request_timeout = 1000ms;  // forged writes may end by timeout (tcp drops the connection)
    std::vector<uint8_t> given(1 << 16, 0), secret(1 << 16, 0), src(1 << 16, 0xAB);
    auto receiver = TransferEngine::Create(o).value();
    auto sender = TransferEngine::Create(o).value();
    auto given_mr = receiver->RegisterMemory(given.data(), given.size()).value();
    auto secret_mr = receiver->RegisterMemory(secret.data(), secret.size()).value();
    const MrDescriptor d = receiver->Describe(*given_mr);
    const uint64_t k1 = d.keys[0].rkey, k2 = receiver->Describe(*secret_mr).keys[0].rkey;
    EXPECT_GT(std::max(k1, k2) - std::min(k1, k2), 1u << 16) << "registration keys look sequential";
    auto src_mr = sender->RegisterMemory(src.data(), src.size()).value();
    CompletionCounter c;
    uint64_t n = 0;
    for (int64_t delta : {-2, -1, 1, 2, 3}) {
      MrDescriptor forged = d;
      forged.keys[0].rkey = k1 + uint64_t(delta);
      auto remote = sender->Import(forged).value();
      ASSERT_TRUE(sender->Submit(SingleWrite{src_mr, 0, src.size(), remote, 0, 0x77}, {.counter = &c}).ok());
      ++n;
    }
    ASSERT_TRUE(c.WaitFinished(n, 20s));
    // Whatever the provider reports locally (tcp and shm report done), no
    // immediate arrived and no byte changed anywhere.
    EXPECT_FALSE(receiver->WaitImm(0x77, 1, 300ms).ok());
    EXPECT_EQ(std::count(secret.begin(), secret.end(), 0), ptrdiff_t(secret.size()));
    EXPECT_EQ(std::count(given.begin(), given.end(), 0), ptrdiff_t(given.size()));
  }
}

TEST(Trust, DescriptorsBuiltByHandAreCheckedLikeDecodedOnes) {
  std::vector<uint8_t> dst(4096), src(4096);
  auto receiver = TransferEngine::Create(Options("shm")).value();
  auto sender = TransferEngine::Create(Options("shm")).value();
  auto dst_mr = receiver->RegisterMemory(dst.data(), dst.size()).value();
  auto src_mr = sender->RegisterMemory(src.data(), src.size()).value();
  MrDescriptor wrap = receiver->Describe(*dst_mr);
  wrap.keys[0].remote_base = ~uint64_t(0) - 100;  // base + length wraps
  auto r = sender->Import(wrap);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status().ToString();
  MrDescriptor no_keys = receiver->Describe(*dst_mr);
  no_keys.keys.clear();
  EXPECT_FALSE(sender->Import(no_keys).ok());
  // A RemoteRegion assembled by hand, without keys, on a real peer.
  auto good = sender->Import(receiver->Describe(*dst_mr)).value();
  MrDescriptor keyless = good->descriptor();
  keyless.keys.clear();
  auto forged = std::make_shared<const RemoteRegion>(keyless, good->peer());
  Status s = sender->Submit(SingleWrite{src_mr, 0, 64, forged, 0, 1}, {});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  auto foreign = std::make_shared<const RemoteRegion>(good->descriptor(), nullptr);
  EXPECT_FALSE(sender->Submit(SingleWrite{src_mr, 0, 64, foreign, 0, 1}, {}).ok());
  // A source region another engine registered means nothing to this one's
  // posts (its descriptors and keys are that engine's).
  Status theirs = sender->Submit(SingleWrite{dst_mr, 0, 64, good, 0, 1}, {});
  EXPECT_EQ(theirs.code(), StatusCode::kInvalidArgument) << theirs.ToString();
  EXPECT_NE(theirs.message().find("another engine"), std::string::npos) << theirs.ToString();
}

TEST(Trust, SubmitIsBounded) {
  auto o = Options("tcp");
  o.max_queued_operations = 8;
  o.request_timeout = 500ms;
  std::vector<uint8_t> src(4096), dst(4096);
  auto sender = TransferEngine::Create(o).value();
  auto src_mr = sender->RegisterMemory(src.data(), src.size()).value();
  MrDescriptor dead;
  {
    auto gone = TransferEngine::Create(o).value();
    dead = gone->Describe(*gone->RegisterMemory(dst.data(), dst.size()).value());
  }
  auto remote = sender->Import(dead).value();
  CompletionCounter c;
  for (int i = 0; i < 8; ++i)
    ASSERT_TRUE(sender->Submit(SingleWrite{src_mr, 0, 64, remote, 0, 1}, {.counter = &c}).ok());
  Status s = sender->Submit(SingleWrite{src_mr, 0, 64, remote, 0, 1}, {.counter = &c});
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.ToString();
  // A single request larger than the bound is refused before it is planned.
  std::vector<uint32_t> pages(9, 0);
  PagedWrite paged;
  paged.src = src_mr;
  paged.src_pages = paged.dst_pages = pages;
  paged.src_stride = paged.dst_stride = paged.page_length = 64;
  paged.dst = remote;
  Status big = sender->Submit(paged, {});
  EXPECT_EQ(big.code(), StatusCode::kResourceExhausted) << big.ToString();
  ASSERT_TRUE(c.WaitFinished(8, 20s));
  // Finished requests give their room back.
  EXPECT_TRUE(WaitUntil([&] { return sender->Submit(ImmOnly{remote, 2}, {.counter = &c}).ok(); }, 10s));
}

// A peer sending faster than the receive handler runs: what waits for the
// handler is bounded in bytes, the rest is dropped and counted.
TEST(Trust, SlowReceiveHandlerBoundsWaitingMessages) {
  auto o = Options("tcp");
  o.max_pending_message_bytes = 16 << 10;
  auto receiver = TransferEngine::Create(o).value();
  auto sender = TransferEngine::Create(Options("tcp")).value();
  std::atomic<bool> release{false};
  std::atomic<int> handled{0};
  receiver->SetRecvHandler([&](const EngineAddress&, std::span<const uint8_t>) {
    while (!release.load()) std::this_thread::sleep_for(1ms);
    handled++;
  });
  auto peer = sender->Connect(receiver->address()).value();
  const std::vector<uint8_t> msg(1024, 0x42);
  CompletionCounter sent;
  constexpr int kMessages = 200;
  for (int i = 0; i < kMessages; ++i) ASSERT_TRUE(sender->Send(peer, msg, {.counter = &sent}).ok());
  ASSERT_TRUE(sent.WaitFinished(kMessages, 20s));
  // Every message arrives while the handler is still blocked: each is
  // either accepted (waiting) or dropped.
  auto accounted = [&] {
    const EngineStats st = receiver->stats();
    return st.messages_received + st.messages_dropped == uint64_t(kMessages);
  };
  ASSERT_TRUE(WaitUntil(accounted, 20s)) << receiver->stats().messages_received << " received, "
                                         << receiver->stats().messages_dropped << " dropped";
  const uint64_t accepted = receiver->stats().messages_received;
  EXPECT_GT(receiver->stats().messages_dropped, 0u);
  // The one in the handler plus what fits in 16 KiB of ~1.1 KiB messages.
  EXPECT_LE(accepted, 1u + (16u << 10) / 1024) << "more messages waited than the bound allows";
  release = true;
  ASSERT_TRUE(WaitUntil([&] { return uint64_t(handled.load()) == accepted; }, 20s)) << handled.load();
}

// Requests queued behind back-pressure to a healthy peer: each either
// completes, or is withdrawn with kNotPosted, in which case nothing of it
// ever arrives. Nothing posted times out against a peer that answers.
TEST(Trust, QueuedRequestsAreWithdrawnUnpostedNotTimedOut) {
  auto o = Options("tcp");
  o.request_timeout = 300ms;
  o.max_inflight_per_domain = 2;
  constexpr int kRequests = 6000;  // 1.5 GiB: far longer in the queue than the timeout
  constexpr size_t kLen = 256 << 10;
  std::vector<uint8_t> src(kLen, 1), dst(kLen);
  auto receiver = TransferEngine::Create(o).value();
  auto sender = TransferEngine::Create(o).value();
  auto src_mr = sender->RegisterMemory(src.data(), src.size()).value();
  auto dst_mr = receiver->RegisterMemory(dst.data(), dst.size()).value();
  auto remote = sender->Import(receiver->Describe(*dst_mr)).value();
  std::mutex mu;
  std::map<StatusCode, int> outcome;
  std::vector<uint32_t> withdrawn;
  std::string first_other;
  std::atomic<int> finished{0};
  for (int i = 0; i < kRequests; ++i) {
    const uint32_t imm = 0x10000 + i;
    ASSERT_TRUE(sender
                    ->Submit(SingleWrite{src_mr, 0, kLen, remote, 0, imm}, {.on_done =
                                                                                [&] {
                                                                                  std::lock_guard<std::mutex> l(mu);
                                                                                  outcome[StatusCode::kOk]++;
                                                                                  finished++;
                                                                                },
                                                                            .on_error =
                                                                                [&, imm](const Status& s) {
                                                                                  std::lock_guard<std::mutex> l(mu);
                                                                                  outcome[s.code()]++;
                                                                                  if (s.code() ==
                                                                                      StatusCode::kNotPosted)
                                                                                    withdrawn.push_back(imm);
                                                                                  else if (first_other.empty())
                                                                                    first_other = s.ToString();
                                                                                  finished++;
                                                                                }})
                    .ok());
  }
  ASSERT_TRUE(WaitUntil([&] { return finished.load() == kRequests; }, 60s)) << finished.load();
  std::lock_guard<std::mutex> l(mu);
  EXPECT_GT(outcome[StatusCode::kOk], 0);
  EXPECT_GT(outcome[StatusCode::kNotPosted], 0) << "nothing waited long enough to be withdrawn";
  EXPECT_EQ(outcome[StatusCode::kTimeout], 0) << "a request timed out against a peer that answers";
  std::string seen;
  for (const auto& [code, n] : outcome) seen += std::string(StatusCodeName(code)) + "=" + std::to_string(n) + " ";
  EXPECT_EQ(outcome[StatusCode::kOk] + outcome[StatusCode::kNotPosted], kRequests) << seen << first_other;
  // Give stragglers time to land, then: nothing withdrawn ever arrived.
  WaitUntil([&] { return false; }, 200ms);
  for (uint32_t imm : withdrawn)
    ASSERT_EQ(receiver->ImmAvailable(imm), 0u) << "withdrawn request " << imm << " arrived";
}

// shm: a peer process that died is never posted to (libfabric's shm spins
// on the queue lock of a process that died holding it); its requests fail
// with kNotPosted, and other peers are unaffected.
TEST(Trust, DeadShmPeerIsNeverPostedTo) {
  auto o = Options("shm");
  o.request_timeout = 3000ms;
  // Buffers outlive the engines: a write that ended in error may still land.
  std::vector<uint8_t> src(1 << 20, 3), live_dst(1 << 20);
  PeerProcess peer(o, 1 << 20);
  auto engine = TransferEngine::Create(o).value();
  auto live = TransferEngine::Create(o).value();
  auto src_mr = engine->RegisterMemory(src.data(), src.size()).value();
  auto to_peer = engine->Import(MrDescriptor::FromHex(peer.descriptor_hex()).value()).value();
  auto live_mr = live->RegisterMemory(live_dst.data(), live_dst.size()).value();
  auto to_live = engine->Import(live->Describe(*live_mr)).value();
  CompletionCounter first;
  ASSERT_TRUE(engine->Submit(SingleWrite{src_mr, 0, 4096, to_peer, 0, 5}, {.counter = &first}).ok());
  WaitDone(first, 1);
  peer.Kill();
  CompletionCounter after;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < 64; ++i)
    ASSERT_TRUE(engine->Submit(SingleWrite{src_mr, 0, 65536, to_peer, 0, 6}, {.counter = &after}).ok());
  ASSERT_TRUE(after.WaitFinished(64, 20s)) << "requests to a dead shm peer hung";
  EXPECT_EQ(after.failed(), 64u);
  EXPECT_EQ(after.first_error().code(), StatusCode::kNotPosted) << after.first_error().ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 3s) << "a dead peer was only found by its timeout";
  CompletionCounter ok;
  ASSERT_TRUE(engine->Submit(SingleWrite{src_mr, 0, 65536, to_live, 0, 7}, {.counter = &ok}).ok());
  WaitDone(ok, 1);
  EXPECT_TRUE(live->WaitImm(7, 1, 10s).ok());
  // A descriptor of the dead process is refused outright from now on.
  auto other = TransferEngine::Create(o).value();
  auto stale = other->Import(MrDescriptor::FromHex(peer.descriptor_hex()).value());
  EXPECT_FALSE(stale.ok());
}

// libfabric 1.17 shm: a write of more than 4 KiB with a bad key is reported
// done, and completions of later writes of more than 4 KiB from the same
// endpoint, to any peer, may never come back (docs/RELIABILITY.md). Pinned
// here is the guard: those requests end within the timeout (done or
// kTimeout: outcome unknown) instead of hanging, and their data and
// immediates still land.
TEST(Trust, ShmBadKeyNeverHangsLaterWrites) {
  auto o = Options("shm");
  o.request_timeout = 1500ms;
  // Buffers outlive the engines: a write that ended in error may still land.
  std::vector<uint8_t> src(1 << 20, 4), live_dst(1 << 20);
  PeerProcess peer(o, 1 << 20);
  auto engine = TransferEngine::Create(o).value();
  auto live = TransferEngine::Create(o).value();
  auto src_mr = engine->RegisterMemory(src.data(), src.size()).value();
  auto live_mr = live->RegisterMemory(live_dst.data(), live_dst.size()).value();
  auto to_live = engine->Import(live->Describe(*live_mr)).value();
  const MrDescriptor d = MrDescriptor::FromHex(peer.descriptor_hex()).value();
  auto good = engine->Import(d).value();
  MrDescriptor forged = d;
  forged.keys[0].rkey ^= 0x5a5a;
  CompletionCounter bad;
  ASSERT_TRUE(
      engine->Submit(SingleWrite{src_mr, 0, 65536, engine->Import(forged).value(), 0, 1}, {.counter = &bad}).ok());
  ASSERT_TRUE(bad.WaitFinished(1, 10s)) << "a write with a bad key hung";
  for (uint32_t i = 0; i < 3; ++i) {
    CompletionCounter c;
    const auto t0 = std::chrono::steady_clock::now();
    ASSERT_TRUE(engine->Submit(SingleWrite{src_mr, 0, 65536, good, 0, 10 + i}, {.counter = &c}).ok());
    ASSERT_TRUE(c.WaitFinished(1, 10s)) << "write " << i << " to the peer hung";
    EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
    if (c.failed()) {
      EXPECT_EQ(c.first_error().code(), StatusCode::kTimeout) << c.first_error().ToString();
    }
    EXPECT_EQ(peer.WaitImm(10 + i, 1, 5000), "OK") << "write " << i << "'s immediate never arrived";
  }
  EXPECT_EQ(peer.Crc(0, 65536), Crc32c(src.data(), 65536));
  CompletionCounter ok;
  ASSERT_TRUE(engine->Submit(SingleWrite{src_mr, 0, 65536, to_live, 0, 7}, {.counter = &ok}).ok());
  ASSERT_TRUE(ok.WaitFinished(1, 10s)) << "a write to another peer hung";
  if (ok.failed()) {
    EXPECT_EQ(ok.first_error().code(), StatusCode::kTimeout) << ok.first_error().ToString();
  }
  EXPECT_TRUE(live->WaitImm(7, 1, 5s).ok());
  // Writes that fit the provider's inject buffer (4 KiB) are unaffected.
  CompletionCounter small;
  ASSERT_TRUE(engine->Submit(SingleWrite{src_mr, 0, 4096, to_live, 0, 8}, {.counter = &small}).ok());
  WaitDone(small, 1);
}

TEST(Trust, StaleShmRegionsOfDeadProcessesAreRemoved) {
  // A pid that is surely not running: a child that has exited and been
  // reaped.
  pid_t dead = fork();
  if (dead == 0) _exit(0);
  waitpid(dead, nullptr, 0);
  const std::string stale = "/dev/shm/" + nic::ShmRegionName(dead, 0) + ":0:0";
  const std::string mine = "/dev/shm/" + nic::ShmRegionName(getpid(), 999) + ":0:0";
  for (const auto& f : {stale, mine}) close(open(f.c_str(), O_CREAT | O_RDWR, 0600));
  EXPECT_EQ(nic::ShmOwnerPid("fi_shm://te.123.4:0:0").value_or(0), 123);
  EXPECT_FALSE(nic::ShmOwnerPid("1234:0:0").has_value());
  auto e = TransferEngine::Create(Options("shm")).value();  // opening an shm domain cleans up
  EXPECT_FALSE(std::filesystem::exists(stale)) << "the region of a dead process is still there";
  EXPECT_TRUE(std::filesystem::exists(mine)) << "the region of a live process was removed";
  unlink(mine.c_str());
}

// shm holds 256 peers. Peers nobody holds any more are evicted to make
// room, so meeting many short-lived peers (or being sent many addresses)
// does not fill the table for good.
TEST(Trust, PeerTableMakesRoomForNewPeers) {
  auto o = Options("shm");
  std::vector<uint8_t> src(4096, 9), dst(4096);
  auto sender = TransferEngine::Create(o).value();
  auto src_mr = sender->RegisterMemory(src.data(), src.size()).value();
  for (int i = 0; i < 300; ++i) {
    auto peer = TransferEngine::Create(o).value();
    auto mr = peer->RegisterMemory(dst.data(), dst.size()).value();
    auto remote = sender->Import(peer->Describe(*mr));
    ASSERT_TRUE(remote.ok()) << "peer " << i << ": " << remote.status().ToString();
    CompletionCounter c;
    ASSERT_TRUE(sender->Submit(SingleWrite{src_mr, 0, 64, remote.value(), 0, 1}, {.counter = &c}).ok());
    WaitDone(c, 1);
    ASSERT_TRUE(peer->WaitImm(1, 1, 10s).ok()) << "peer " << i;
  }
}

// One data plane per engine (TransferEngine::ClaimRecvHandler).
TEST(Trust, OnePlaneHoldsTheReceiveHandlerAtATime) {
  EngineOptions o;
  auto engine = TransferEngine::Create(o).value();
  auto noop = [](const EngineAddress&, std::span<const uint8_t>) {};
  int a = 0, b = 0;
  ASSERT_TRUE(engine->ClaimRecvHandler(&a, "PlaneA", noop).ok());
  // The holder may claim again (replacing its handler); another may not.
  EXPECT_TRUE(engine->ClaimRecvHandler(&a, "PlaneA", noop).ok());
  Status refused = engine->ClaimRecvHandler(&b, "PlaneB", noop);
  EXPECT_EQ(refused.code(), StatusCode::kUnavailable);
  EXPECT_NE(refused.message().find("PlaneA holds it"), std::string::npos) << refused.ToString();
  engine->ReleaseRecvHandler(&b);  // not the holder: nothing happens
  EXPECT_FALSE(engine->ClaimRecvHandler(&b, "PlaneB", noop).ok());
  engine->ReleaseRecvHandler(&a);
  EXPECT_TRUE(engine->ClaimRecvHandler(&b, "PlaneB", noop).ok());
}

// EngineOptions::busy_poll: a worker that never sleeps still delivers, and
// shutting the engine down stops it.
TEST(EngineBusyPoll, DeliversAndShutsDown) {
  EngineOptions o = Options("tcp");
  o.busy_poll = true;
  auto a = TransferEngine::Create(o).value();
  auto b = TransferEngine::Create(o).value();
  std::vector<uint8_t> src(1 << 20), dst(1 << 20, 0);
  FillPattern(src.data(), src.size(), 7);
  auto smr = a->RegisterMemory(src.data(), src.size()).value();
  auto dmr = b->RegisterMemory(dst.data(), dst.size()).value();
  auto remote = a->Import(b->Describe(*dmr)).value();
  SingleWrite w{smr, 0, src.size(), remote, 0, 0x77};
  const uint64_t n = a->ExpectedImmCount(w).value();
  CompletionCounter done;
  ASSERT_TRUE(a->Submit(w, {.counter = &done}).ok());
  WaitDone(done, 1);
  EXPECT_EQ(done.failed(), 0u) << done.first_error().ToString();
  ASSERT_TRUE(b->WaitImm(0x77, n, std::chrono::seconds(20)).ok());
  EXPECT_EQ(src, dst);
}

TEST(Trust, CreateOverDomainsChecksWhatItIsGiven) {
  EngineOptions o;
  EXPECT_EQ(TransferEngine::CreateOverDomains(o, {}).status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(TransferEngine::CreateOverDomains(o, {nullptr}).status().message().find("null"), std::string::npos);
}

}  // namespace
}  // namespace te::testing
