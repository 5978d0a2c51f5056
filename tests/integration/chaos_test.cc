// Chaos, bounded in time (TE_CHAOS_SECONDS, default 20): a surviving
// process streams verified writes into receiver processes that are
// SIGKILLed and restarted, runs KV-cache requests, and takes malformed
// control messages from an attacker engine, all at once. At the end:
//  - nothing hung: every request finished within a deadline;
//  - every request completed exactly once;
//  - every write whose immediate arrived holds exactly the bytes sent, and
//    every KV request that reported ready is byte-exact;
//  - no file descriptor and no /dev/shm region leaked.
#include <dirent.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <deque>
#include <random>

#include "base/crc32c.h"
#include "integration/kv_instances.h"
#include "integration/peer_process.h"

namespace te::testing {
namespace {

size_t CountDir(const char* dir, const char* prefix) {
  size_t n = 0;
  if (DIR* d = opendir(dir)) {
    while (dirent* e = readdir(d)) n += std::string(e->d_name).rfind(prefix, 0) == 0;
    closedir(d);
  }
  return n;
}
size_t OpenFds() { return CountDir("/proc/self/fd", ""); }

constexpr size_t kSlot = 64 << 10;
constexpr uint32_t kSlots = 48;

struct Write {
  std::atomic<int> calls{0};
  std::atomic<bool> ok{false};
};

// One receiver process and what was written into it in this incarnation.
struct Receiver {
  std::unique_ptr<PeerProcess> process;
  RemoteMr dst;
  uint32_t next_slot = 0;
  std::vector<std::pair<uint32_t, Write*>> slots;  // slot -> its write
};

TEST(Chaos, KilledPeersMalformedMessagesAndVerifiedTraffic) {
  const char* env = std::getenv("TE_CHAOS_SECONDS");
  const auto run_for = std::chrono::duration<double>(env ? std::max(1.0, atof(env)) : 20.0);
  const size_t fds_before = OpenFds();
  // shm regions of this process (other tests may run beside this one).
  const std::string my_regions = "te." + std::to_string(getpid()) + ".";
  const size_t shm_before = CountDir("/dev/shm", my_regions.c_str());
  uint64_t kills = 0, writes_verified = 0, bytes_verified = 0, kv_verified = 0, junk_sent = 0;
  {
    auto o = Options("tcp");
    o.request_timeout = 2000ms;
    // Declared before the engines, so it outlives writes that ended in error.
    std::vector<uint8_t> src(size_t(kSlots) * kSlot);
    auto engine = TransferEngine::Create(o).value();
    auto attacker = TransferEngine::Create(o).value();
    for (uint32_t s = 0; s < kSlots; ++s) FillPattern(src.data() + size_t(s) * kSlot, kSlot, 0xC0 + s);
    auto src_mr = engine->RegisterMemory(src.data(), src.size()).value();

    std::deque<Write> writes;
    auto start_receiver = [&](Receiver* r) {
      r->process = std::make_unique<PeerProcess>(o, size_t(kSlots) * kSlot);
      r->dst = engine->Import(MrDescriptor::FromHex(r->process->descriptor_hex()).value()).value();
      r->next_slot = 0;
      r->slots.clear();
    };
    std::vector<Receiver> receivers(3);
    for (auto& r : receivers) start_receiver(&r);

    // Every imm that announced a write is checked against the bytes sent;
    // writes that failed are not (their data may or may not have landed).
    auto verify = [&](Receiver& r) {
      for (const auto& [slot, w] : r.slots) {
        if (!WaitUntil([&] { return w->calls.load() > 0; }, 20s)) continue;  // counted as a hang below
        if (!w->ok) continue;
        ASSERT_EQ(r.process->WaitImm(0x100 + slot, 1, 10000), "OK") << "slot " << slot;
        ASSERT_EQ(r.process->Crc(uint64_t(slot) * kSlot, kSlot), Crc32c(src.data() + size_t(slot) * kSlot, kSlot))
            << "slot " << slot << ": the immediate arrived but the bytes differ";
        ++writes_verified;
        bytes_verified += kSlot;
      }
    };

    PrefillInstance prefill(TestLayout(1));
    DecodeInstance decode(TestLayout(1));
    std::vector<PeerRef> targets;
    for (auto* e : {prefill.engines[0].get(), decode.engines[0].get()})
      targets.push_back(attacker->Connect(e->address()).value());
    std::mt19937_64 rng(7);
    auto junk = [&]() {
      std::vector<uint8_t> m;
      if (rng() % 2) {
        m.resize(1 + rng() % 300);
        for (auto& b : m) b = uint8_t(rng());
      } else {  // a KV message with hostile numbers
        kvcache::KvMessage k;
        k.kind = kvcache::KvMessage::Kind(rng() % 5);
        k.request = rng() % 4;
        k.rank = uint32_t(rng());
        k.layout = k.source_layout = TestLayout(1);
        k.descriptor_hex = rng() % 2 ? "zz" : receivers[0].process->descriptor_hex();
        k.pages.resize(rng() % 8, uint32_t(rng()));
        m = k.Encode();
        for (int i = 0; i < 3; ++i) m[rng() % m.size()] = uint8_t(rng());
      }
      return m;
    };

    const auto t0 = std::chrono::steady_clock::now();
    auto next_kill = t0 + 700ms, next_kv = t0;
    uint64_t kv_id = 0;
    while (std::chrono::steady_clock::now() - t0 < run_for) {
      const auto now = std::chrono::steady_clock::now();
      Receiver& r = receivers[rng() % receivers.size()];
      if (r.next_slot < kSlots) {
        const uint32_t slot = r.next_slot++;
        Write* w = &writes.emplace_back();
        r.slots.emplace_back(slot, w);
        ASSERT_TRUE(
            engine
                ->Submit(
                    SingleWrite{src_mr, uint64_t(slot) * kSlot, kSlot, r.dst, uint64_t(slot) * kSlot, 0x100 + slot},
                    {.on_done = [w] { w->ok = true, w->calls++; }, .on_error = [w](const Status&) { w->calls++; }})
                .ok());
      }
      for (int i = 0; i < 2; ++i) {
        auto m = junk();
        (void)attacker->Send(targets[rng() % targets.size()], m, {});
        ++junk_sent;
      }
      if (now >= next_kill) {  // verify what landed, then kill mid-stream and restart
        Receiver& victim = receivers[rng() % receivers.size()];
        for (auto& x : receivers)
          if (&x != &victim && x.next_slot == kSlots) {  // full: check it and start a fresh one
            verify(x);
            x.process.reset();
            start_receiver(&x);
          }
        victim.process->Kill();
        ++kills;
        start_receiver(&victim);
        next_kill = now + 400ms + std::chrono::milliseconds(rng() % 400);
      }
      if (now >= next_kv) {  // one KV request end to end, byte-exact
        const uint64_t id = ++kv_id;
        const std::vector<uint32_t> src_pages = {uint32_t(id % 20), 30, 41},
                                    dst_pages = {uint32_t(id % 20) + 1, 50, 60};
        decode.Receive(id, prefill.Info(), dst_pages);
        prefill.RunAll(id, src_pages);
        ASSERT_TRUE(decode.WaitAll(id)) << "KV request " << id << " never finished";
        ASSERT_TRUE(decode.ready[0]->Get(id).ok()) << decode.ready[0]->Get(id).ToString();
        ASSERT_EQ(decode.ready[0]->Calls(id), 1);
        ASSERT_EQ(decode.Wrong(id, dst_pages), 0u) << "KV request " << id;
        ++kv_verified;
        next_kv = now + 150ms;
      }
      std::this_thread::sleep_for(1ms);
    }
    for (auto& r : receivers) verify(r);
    // Nothing hangs, and exactly once.
    ASSERT_TRUE(WaitUntil(
        [&] {
          for (auto& w : writes)
            if (w.calls.load() == 0) return false;
          return true;
        },
        30s))
        << "a request never finished";
    for (auto& w : writes) ASSERT_EQ(w.calls.load(), 1);
    printf("chaos: %llu kills, %zu writes (%llu verified, %llu bytes), %llu KV requests verified, %llu junk messages\n",
           (unsigned long long)kills, writes.size(), (unsigned long long)writes_verified,
           (unsigned long long)bytes_verified, (unsigned long long)kv_verified, (unsigned long long)junk_sent);
    RecordProperty("kills", std::to_string(kills));
    RecordProperty("bytes_verified", std::to_string(bytes_verified));
    EXPECT_GT(kills, 0u);
    EXPECT_GT(writes_verified, 0u);
    EXPECT_GT(kv_verified, 0u);
  }
  // Everything above is destroyed: nothing it opened stays open.
  EXPECT_TRUE(WaitUntil([&] { return OpenFds() <= fds_before; }, 5s))
      << OpenFds() << " fds open, " << fds_before << " before";
  EXPECT_LE(CountDir("/dev/shm", my_regions.c_str()), shm_before);
}

}  // namespace
}  // namespace te::testing
