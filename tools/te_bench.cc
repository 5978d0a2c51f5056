// te-bench: measures the transfer engine between two processes, and the same
// case with a bare libfabric loop (--raw) in the same run.
//
//   te-bench --loopback                    # both processes on this machine
//   te-bench --listen                      # prints its address line
//   te-bench --connect <descriptor hex>    # runs the cases against it
//
// Cases: single writes (4 KiB .. 64 MiB), paged writes (1 .. 64 KiB pages,
// random page indices, stride = page + 128 B), imm-only round trips. Every
// engine case is verified once: the listener zeroes its region, one pass is
// written, and the listener's CRC-32C must equal the one computed locally.
#include <gflags/gflags.h>
#include <glog/logging.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/crc32c.h"
#include "base/cross_cpu_probe.h"
#include "nic/fabric/raw_write_loop.h"
#include "tools/discard_domain.h"
#include "tools/tool_support.h"
#include "transfer/shared_host_memory.h"
#include "transfer/transfer_engine.h"

DEFINE_bool(listen, false, "Serve as the target and print the address line");
DEFINE_string(connect, "", "Descriptor hex printed by a --listen process");
DEFINE_bool(loopback, false, "Start a listener child process and connect to it");
DEFINE_string(provider, "tcp",
              "provider: tcp, shm, efa, verbs, verbs-native, local (same host), or a libfabric name; a suffix "
              "+local adds the same-host domain beside the NICs (peers on this host take it), +nic opts out");
DEFINE_string(iface, "", "libfabric domain / interface (default lo for tcp)");
DEFINE_int32(domains, 1, "Domains (NICs) per group");
DEFINE_string(cases, "single,paged,imm", "Comma-separated case kinds: single, paged, imm");
DEFINE_string(sizes, "4K,16K,64K,256K,1M,4M,16M,64M", "Single-write sizes");
DEFINE_string(page_sizes, "1K,4K,16K,64K", "Paged-write page sizes");
DEFINE_int32(pages_per_request, 64, "Pages in one PagedWrite request");
DEFINE_int64(iters, 0, "Operations per case (0: about --bytes_per_case, 20..50000)");
DEFINE_int64(bytes_per_case, 512ll << 20, "Bytes each bandwidth case moves when --iters=0");
DEFINE_int32(rtt_iters, 2000, "Round trips in the imm case");
DEFINE_int32(warmup, 50, "Untimed operations before each case");
DEFINE_int32(window, 64,
             "Writes outstanding at once (engine and raw); requests of more writes (paged) keep two in flight");
DEFINE_bool(raw, false, "Also run each case with a bare libfabric loop and print the ratio");
DEFINE_bool(json, false, "Print one JSON object per case instead of a table");
DEFINE_bool(engine_cost, false,
            "Measure the engine's own cost per write and per page, in this process, over domains that move no data "
            "(tools/discard_domain.h): cases single (--sizes) and paged (--page_sizes)");
DEFINE_int64(cost_writes, 1000000, "engine_cost: writes (or pages) per case");
DEFINE_bool(busy_poll, false, "Engine worker polls without ever sleeping (EngineOptions::busy_poll)");
DEFINE_bool(shared_memory, true,
            "The listener's region is SharedHostMemory (transfer/shared_host_memory.h): same-host initiators "
            "map it and write with memcpy; false: heap memory (the same-host path then uses process_vm_writev)");
DEFINE_bool(raw_pin, false, "Pin each raw loop's thread to its own CPU while it runs (initiator 0, listener 1)");
DEFINE_int32(wait_spin_us, 50, "WaitImm drives progress this long before it sleeps (EngineOptions::wait_spin)");
DEFINE_string(progress, "thread", "Engine progress: thread (worker thread) or manual");
DEFINE_int32(timeout_ms, 30000, "Per-case timeout");
DEFINE_bool(verify, true, "Verify received bytes once per case");
DEFINE_bool(
    probe, false,
    "Time a cache line passed between CPUs 0 and 1 before and after every run (base/cross_cpu_probe.h) and report it "
    "beside each run: on a virtual machine small-write figures move with it");
DEFINE_int32(repeat, 3, "Runs per case, engine and raw interleaved; the median run is reported");

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr uint32_t kDataImm = 0x100, kAckImm = 0x101, kPingImm = 0x102, kPongImm = 0x103;
constexpr uint32_t kRawDataImm = 0x200, kRawAckImm = 0x201, kRawPingImm = 0x202;
// The responders (pong, ack) and the bench's completions only submit or
// count: cheap callbacks, run on the engine's worker with no thread hop.
constexpr auto kOnWorker = te::TransferEngine::ImmDelivery::kOnWorker;
constexpr size_t kPagesInRegion = 1024;
constexpr size_t kPageSlack = 128;

using te::tools::Die;
using te::tools::Must;
using te::tools::Percentile;

uint64_t ParseSize(const std::string& s) {
  char* end = nullptr;
  double v = strtod(s.c_str(), &end);
  uint64_t mult = 1;
  if (end && *end) {
    switch (toupper(*end)) {
      case 'K':
        mult = 1ull << 10;
        break;
      case 'M':
        mult = 1ull << 20;
        break;
      case 'G':
        mult = 1ull << 30;
        break;
      default:
        Die("bad size '" + s + "': use a number with optional K, M or G");
    }
  }
  // Checked before the conversion: 99999999999G must not wrap to 0 B.
  constexpr uint64_t kMaxSize = uint64_t(16) << 30;
  if (!(v * double(mult) >= 1)) Die("bad size '" + s + "': must be at least 1 byte");
  if (v * double(mult) > double(kMaxSize)) Die("bad size '" + s + "': at most 16G");
  return uint64_t(v * double(mult));
}

std::vector<std::string> Split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, sep);)
    if (!item.empty()) out.push_back(item);
  return out;
}

std::string HumanSize(uint64_t b) {
  char buf[32];
  if (b >= (1ull << 20) && b % (1ull << 20) == 0)
    snprintf(buf, sizeof buf, "%llu MiB", (unsigned long long)(b >> 20));
  else if (b >= 1024 && b % 1024 == 0)
    snprintf(buf, sizeof buf, "%llu KiB", (unsigned long long)(b >> 10));
  else
    snprintf(buf, sizeof buf, "%llu B", (unsigned long long)b);
  return buf;
}

// Region size: the largest single write or the page area, whichever is larger.
size_t RegionBytes() {
  uint64_t max_single = 4096, max_page = 1024;
  for (auto& s : Split(FLAGS_sizes, ',')) max_single = std::max(max_single, ParseSize(s));
  for (auto& s : Split(FLAGS_page_sizes, ',')) max_page = std::max(max_page, ParseSize(s));
  return std::max<uint64_t>(max_single, kPagesInRegion * (max_page + kPageSlack));
}

void FillPattern(uint8_t* p, size_t n) {
  // Each 8-byte word encodes its own offset, so a misplaced byte shows.
  for (size_t i = 0; i + 8 <= n; i += 8) {
    uint64_t v = (i * 0x9E3779B97F4A7C15ull) ^ (i >> 3);
    memcpy(p + i, &v, 8);
  }
}

// With --raw_pin (hosts of two or more CPUs), a raw loop's thread is pinned
// while it runs: the initiator's to CPU 0, the listener's to CPU 1, as some
// provider benchmarks run their two sides. The previous affinity is restored
// afterwards. Off by default: on this project's 2-core test machine the shm
// baseline alternates between two speeds (0.3 and 1.1 .. 1.6 Mop/s at 4 KiB)
// pinned or not, so pinning showed no gain.
class ScopedPin {
 public:
  explicit ScopedPin(int cpu) {
    if (!FLAGS_raw_pin || std::thread::hardware_concurrency() < 2) return;
    if (pthread_getaffinity_np(pthread_self(), sizeof(old_), &old_) != 0) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pinned_ = pthread_setaffinity_np(pthread_self(), sizeof(set), &set) == 0;
  }
  ~ScopedPin() {
    if (pinned_) pthread_setaffinity_np(pthread_self(), sizeof(old_), &old_);
  }
  ScopedPin(const ScopedPin&) = delete;
  ScopedPin& operator=(const ScopedPin&) = delete;

 private:
  cpu_set_t old_;
  bool pinned_ = false;
};

// Requests the engine keeps outstanding: --window counts writes, but at
// least two requests, so that a request as large as the window (64 pages)
// does not leave the pipe empty while the next one is submitted.
uint64_t RequestsInFlight(uint64_t writes_per_request) {
  const uint64_t w = std::max<uint64_t>(1, writes_per_request);
  return std::max<uint64_t>(w >= uint64_t(FLAGS_window) ? 2 : 1, uint64_t(FLAGS_window) / w);
}
// Writes in flight at once, engine and raw alike.
uint64_t WritesInFlight(uint64_t writes_per_request) {
  return RequestsInFlight(writes_per_request) * std::max<uint64_t>(1, writes_per_request);
}

te::EngineOptions MakeEngineOptions() {
  te::EngineOptions o = Must(te::tools::BuildEngineOptions({FLAGS_provider, FLAGS_iface, FLAGS_domains, FLAGS_progress,
                                                            std::chrono::milliseconds(FLAGS_timeout_ms)}),
                             "engine flags");
  o.busy_poll = FLAGS_busy_poll;
  if (FLAGS_wait_spin_us < 0) Die("--wait_spin_us must be >= 0");
  o.wait_spin = std::chrono::microseconds(FLAGS_wait_spin_us);
  return o;
}

// The local provider's baseline is not a provider loop but what it competes
// with: one thread's memcpy into a buffer of the same size (writes), and two
// threads passing a cache line (round trips).
// So is a NIC provider with the same-host domain beside it (tcp+local):
// --loopback's peer is on this host, and the same-host lane is what runs.
bool MemcpyBaseline() {
  const te::EngineOptions o = MakeEngineOptions();
  return o.backend == te::nic::Backend::kLocal || o.same_host == te::SameHost::kDirect;
}

// The raw loop runs the NIC provider itself (without a same-host suffix).
te::nic::FabricOptions RawOptions() { return MakeEngineOptions().fabric; }

// A mailbox of control messages, filled by the engine's receive handler.
class Mailbox {
 public:
  void Push(const te::EngineAddress& from, std::string msg) {
    std::lock_guard<std::mutex> l(mu_);
    q_.emplace_back(from, std::move(msg));
    queued_.fetch_add(1, std::memory_order_release);
    cv_.notify_all();
  }
  bool Pop(te::TransferEngine* engine, std::chrono::milliseconds timeout,
           std::pair<te::EngineAddress, std::string>* out) {
    const auto deadline = Clock::now() + timeout;
    if (engine->options().progress == te::ProgressMode::kManual) {
      // This loop is the listener's progress while a case runs: per pass
      // only the engine's work and one atomic load, no lock and no clock
      // (those took a sixth of the listener's core at 4 KiB on shm).
      for (uint32_t spins = 1; queued_.load(std::memory_order_acquire) == 0; ++spins) {
        engine->Progress();
        if (spins % 1024 == 0 && Clock::now() >= deadline) return false;
      }
    }
    std::unique_lock<std::mutex> l(mu_);
    while (q_.empty()) {
      if (Clock::now() >= deadline) return false;
      cv_.wait_for(l, 10ms);
    }
    *out = std::move(q_.front());
    q_.pop_front();
    queued_.fetch_sub(1, std::memory_order_relaxed);
    return true;
  }

 private:
  std::atomic<uint32_t> queued_{0};  // q_.size(), readable without the lock
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<te::EngineAddress, std::string>> q_;
};

void SendText(te::TransferEngine* engine, const te::PeerRef& peer, const std::string& text) {
  std::vector<uint8_t> b(text.begin(), text.end());
  Must(engine->Send(peer, b, {}), "sending a control message");
}

// Waits in the way the progress mode allows.
template <typename Pred>
bool WaitUntil(te::TransferEngine* engine, Pred pred, Clock::time_point deadline) {
  int spins = 0;
  while (!pred()) {
    if (Clock::now() >= deadline) return false;
    if (engine->options().progress == te::ProgressMode::kManual)
      engine->Progress();
    else if (++spins > 100)
      std::this_thread::yield();
  }
  return true;
}

// ---------------- Listener ----------------

int RunListener(int address_fd) {
  auto engine = Must(te::TransferEngine::Create(MakeEngineOptions()), "creating the engine");
  const size_t bytes = RegionBytes();
  // The written region: SharedHostMemory by default, which same-host
  // initiators map and write with memcpy; heap memory with
  // --shared_memory=false (cross-memory attach on the same-host path).
  te::AlignedBuffer heap;
  std::unique_ptr<te::SharedHostMemory> shared;
  if (FLAGS_shared_memory)
    shared = Must(te::AllocateSharedHostMemory(bytes), "allocating shared memory");
  else
    heap = Must(te::AlignedBuffer::Allocate(bytes), "allocating the region");
  const std::span<uint8_t> region(shared ? static_cast<uint8_t*>(shared->data()) : heap.data(), bytes);
  auto mr = Must(engine->RegisterMemory(region.data(), region.size()), "registering memory");
  std::unique_ptr<te::nic::RawWriteLoop> raw;
  if (MakeEngineOptions().backend == te::nic::Backend::kLibfabric && !MemcpyBaseline())
    raw = Must(te::nic::RawWriteLoop::Open(RawOptions(), bytes), "opening the raw loop");

  Mailbox mailbox;
  engine->SetRecvHandler([&](const te::EngineAddress& from, std::span<const uint8_t> d) {
    mailbox.Push(from, std::string(d.begin(), d.end()));
  });
  const std::string line = "TE-BENCH-ADDRESS " + engine->Describe(*mr).ToHex() + "\n";
  if (write(address_fd, line.data(), line.size()) != ssize_t(line.size())) Die("writing the address");
  if (address_fd != STDOUT_FILENO) close(address_fd);
  fflush(stdout);

  te::RemoteMr initiator;
  te::PeerRef peer;
  std::atomic<int> pongs_left{0};
  std::function<void()> pong;  // re-arming responder for the imm case
  pong = [&] {
    Must(engine->Submit(te::ImmOnly{initiator, kPongImm}, {}), "answering a ping");
    if (--pongs_left > 0) Must(engine->ExpectImm(kPingImm, 1, pong, kOnWorker), "re-arming the responder");
  };
  for (;;) {
    std::pair<te::EngineAddress, std::string> msg;
    if (!mailbox.Pop(engine.get(), 3600s, &msg)) Die("no command from the initiator for an hour");
    std::istringstream in(msg.second);
    std::string cmd;
    in >> cmd;
    if (!peer) peer = Must(engine->Connect(msg.first), "connecting back to the initiator");
    if (cmd == "HELLO") {
      std::string desc_hex, raw_hex;
      uint64_t raw_key = 0, raw_base = 0;
      in >> desc_hex >> raw_hex >> raw_key >> raw_base;
      initiator = Must(engine->Import(Must(te::MrDescriptor::FromHex(desc_hex), "initiator descriptor")),
                       "importing the initiator's region");
      if (raw_hex != "-" && raw)
        Must(raw->Connect(Must(te::FromHex(raw_hex), "raw address"), raw_key, raw_base), "raw connect");
      SendText(engine.get(), peer,
               raw ? "OK " + te::ToHex(raw->address()) + " " + std::to_string(raw->rkey()) + " " +
                         std::to_string(raw->remote_base())
                   : std::string("OK - 0 0"));
    } else if (cmd == "EXPECT") {
      uint64_t count;
      in >> count;
      Must(engine->ExpectImm(
               kDataImm, count,
               [&] {
                 Must(engine->Submit(te::ImmOnly{initiator, kAckImm}, {}), "acknowledging");
               },
               kOnWorker),
           "expecting");
      SendText(engine.get(), peer, "OK");
    } else if (cmd == "PONG") {
      int iters;
      in >> iters;
      pongs_left = iters;
      Must(engine->ExpectImm(kPingImm, 1, pong, kOnWorker), "arming the responder");
      SendText(engine.get(), peer, "OK");
    } else if (cmd == "RAWSERVE" || cmd == "RAWPONG") {
      // The raw loop runs on this thread while the engine stays quiet, so the
      // baseline does not share the cores with engine polling.
      uint64_t n;
      in >> n;
      SendText(engine.get(), peer, "OK");
      WaitUntil(
          engine.get(),
          [&] {
            return engine->stats().requests_done + engine->stats().requests_failed ==
                   engine->stats().requests_submitted;
          },
          Clock::now() + 5s);
      auto t = std::chrono::milliseconds(FLAGS_timeout_ms);
      ScopedPin pin(1);
      te::Status st = !raw                ? te::Unimplemented("no raw loop for provider " + FLAGS_provider)
                      : cmd == "RAWSERVE" ? raw->Serve(n, kRawDataImm, kRawAckImm, t)
                                          : raw->Pong(int(n), kRawPingImm, t);
      if (!st.ok()) LOG(ERROR) << "raw loop: " << st.ToString();
    } else if (cmd == "ZERO") {
      std::fill(region.begin(), region.end(), 0);
      SendText(engine.get(), peer, "OK");
    } else if (cmd == "CRC") {
      uint64_t len;
      in >> len;
      len = std::min<uint64_t>(len, region.size());
      SendText(engine.get(), peer, "CRC " + std::to_string(te::Crc32c(region.data(), len)));
    } else if (cmd == "BYE") {
      SendText(engine.get(), peer, "OK");
      // Let the reply leave before the engine goes.
      auto until = Clock::now() + 200ms;
      WaitUntil(
          engine.get(), [] { return false; }, until);
      return 0;
    } else {
      LOG(WARNING) << "unknown command '" << cmd << "'";
    }
  }
}

// ---------------- Initiator ----------------

struct CaseResult {
  std::string kind;
  uint64_t size = 0;
  uint64_t ops = 0;
  double seconds = 0;
  uint64_t bytes = 0;
  std::vector<double> lat_us;
  double xcpu_ns = 0;  // --probe: te::CrossCpuRoundTripNs(), the slower of before and after the run
  double gbps() const { return seconds > 0 ? bytes / seconds / 1e9 : 0; }
  double mops() const { return seconds > 0 ? ops / seconds / 1e6 : 0; }
};

class Initiator {
 public:
  Initiator(const std::string& listener_hex) {
    engine_ = Must(te::TransferEngine::Create(MakeEngineOptions()), "creating the engine");
    const size_t bytes = RegionBytes();
    // Page-aligned, as registered buffers usually are; the baselines' buffers
    // are too. A copy's speed depends on the source's and destination's
    // alignment relative to each other (16 bytes apart, as two heap vectors
    // and a page-aligned region are, costs memcpy up to a third here), so every
    // buffer a case copies between starts on a page.
    src_ = Must(te::AlignedBuffer::Allocate(bytes), "allocating the source");
    FillPattern(src_.data(), src_.size());
    mr_ = Must(engine_->RegisterMemory(src_.data(), src_.size()), "registering memory");
    engine_->SetRecvHandler([this](const te::EngineAddress& from, std::span<const uint8_t> d) {
      mailbox_.Push(from, std::string(d.begin(), d.end()));
    });
    auto desc = Must(te::MrDescriptor::FromHex(listener_hex), "the --connect descriptor");
    dst_ = Must(engine_->Import(desc), "importing the listener's region");
    std::string raw_info = "- 0 0";
    if (FLAGS_raw && MemcpyBaseline()) {
      memcpy_dst_ =
          Must(te::AlignedBuffer::Allocate(bytes), "allocating the memcpy baseline");  // zeroed: faulted in now
    } else if (FLAGS_raw) {
      raw_ = Must(te::nic::RawWriteLoop::Open(RawOptions(), bytes), "opening the raw loop");
      FillPattern(raw_->buffer(), raw_->buffer_bytes());
      raw_info =
          te::ToHex(raw_->address()) + " " + std::to_string(raw_->rkey()) + " " + std::to_string(raw_->remote_base());
    }
    std::istringstream reply(Rpc("HELLO " + engine_->Describe(*mr_).ToHex() + " " + raw_info));
    std::string ok, raw_hex;
    uint64_t raw_key, raw_base;
    reply >> ok >> raw_hex >> raw_key >> raw_base;
    if (raw_) Must(raw_->Connect(Must(te::FromHex(raw_hex), "raw address"), raw_key, raw_base), "raw connect");
  }

  ~Initiator() { Rpc("BYE"); }

  std::string Rpc(const std::string& cmd) {
    SendText(engine_.get(), dst_->peer(), cmd);
    std::pair<te::EngineAddress, std::string> reply;
    if (!mailbox_.Pop(engine_.get(), std::chrono::milliseconds(FLAGS_timeout_ms), &reply))
      Die("no reply to '" + cmd.substr(0, 16) + "' within " + std::to_string(FLAGS_timeout_ms) + " ms");
    return reply.second;
  }

  // Runs `requests` with at most `window` writes outstanding; returns timing.
  CaseResult RunEngine(const std::vector<te::Request>& requests, uint64_t writes_per_request,
                       uint64_t bytes_per_request) {
    uint64_t imms = 0;
    for (const auto& r : requests) imms += Must(engine_->ExpectedImmCount(r), "planning");
    Must(Rpc("EXPECT " + std::to_string(imms)) == "OK" ? te::Status() : te::Internal("EXPECT refused"), "EXPECT");
    const size_t n = requests.size();
    const uint64_t window_reqs = RequestsInFlight(writes_per_request);
    // Latency: every kLatencyEvery-th request is timed (two clock reads
    // cost a sixth of a small write's engine time here).
    constexpr size_t kLatencyEvery = 8;
    // What the completions touch, in one place: each callback captures a
    // pointer to it and the request's index, which std::function holds
    // without allocating (a capture of several references would allocate
    // per request, a cost the engine does not have).
    struct Tally {
      std::vector<Clock::time_point> t_submit, t_done;
      // 32-bit so that waiting on it is a plain futex. The completions wake
      // the bench thread only once `done` reaches `wake_at` (what it waits
      // for), not once per request: a futex wake per completion would cost
      // the engine's worker a system call per write.
      std::atomic<uint32_t> done{0}, failed{0}, wake_at{UINT32_MAX};
      te::Status first_error;
      std::mutex err_mu;
      void Bump() {
        if (done.fetch_add(1, std::memory_order_acq_rel) + 1 >= wake_at.load(std::memory_order_acquire))
          done.notify_one();
      }
      void Done(size_t i) {
        if (i % kLatencyEvery == 0) t_done[i / kLatencyEvery] = Clock::now();
        Bump();
      }
      void Failed(const te::Status& s) {
        {
          std::lock_guard<std::mutex> l(err_mu);
          if (first_error.ok()) first_error = s;
        }
        failed.fetch_add(1);
        Bump();
      }
    } tally;
    const size_t timed = (n + kLatencyEvery - 1) / kLatencyEvery;
    tally.t_submit.resize(timed);
    tally.t_done.resize(timed);
    std::atomic<uint32_t>& done = tally.done;
    std::atomic<uint32_t>& wake_at = tally.wake_at;
    const bool manual = engine_->options().progress == te::ProgressMode::kManual;
    const auto deadline = Clock::now() + std::chrono::milliseconds(FLAGS_timeout_ms);
    // Blocks (thread mode) or drives progress (manual mode) until `done`
    // reaches `target`. In thread mode the bench thread drives progress
    // itself for --wait_spin_us, as WaitImm does, then sleeps so that it
    // does not take a core from the engine it measures; every request ends
    // (done, failed, or timed out by the engine), so the wait cannot hang.
    auto wait_for = [&](uint32_t target) {
      auto reached = [&] { return done.load(std::memory_order_acquire) >= target; };
      if (manual) {
        if (!WaitUntil(engine_.get(), reached, deadline)) Die("timed out waiting for requests");
        return;
      }
      if (engine_->DriveUntil(reached, engine_->options().wait_spin)) return;
      wake_at.store(target, std::memory_order_release);
      for (uint32_t d = done.load(std::memory_order_acquire); d < target; d = done.load(std::memory_order_acquire))
        done.wait(d);
      wake_at.store(UINT32_MAX, std::memory_order_release);
    };
    auto check_failed = [&] {
      if (tally.failed.load() == 0) return;
      std::lock_guard<std::mutex> l(tally.err_mu);
      Die("a request failed: " + tally.first_error.ToString());
    };
    const auto start = Clock::now();
    for (size_t i = 0; i < n; ++i) {
      // A full window refills in halves, as a tuned application posts: one
      // wake-up per half window rather than per completion.
      if (i - done.load(std::memory_order_acquire) >= window_reqs) wait_for(uint32_t(i - window_reqs / 2));
      check_failed();  // a dead listener stops the run at once
      if (i % kLatencyEvery == 0) tally.t_submit[i / kLatencyEvery] = Clock::now();
      te::Completion c;
      c.on_worker = true;  // cheap: a counter, and a clock read in one of kLatencyEvery
      Tally* t = &tally;
      c.on_done = [t, i] { t->Done(i); };
      c.on_error = [t](const te::Status& s) { t->Failed(s); };
      Must(engine_->Submit(requests[i], std::move(c)), "submitting");
    }
    wait_for(uint32_t(n));
    check_failed();
    Must(engine_->WaitImm(kAckImm, 1, std::chrono::milliseconds(FLAGS_timeout_ms)), "waiting for the ack");
    CaseResult r;
    r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    r.ops = n * writes_per_request;
    r.bytes = n * bytes_per_request;
    for (size_t k = 0; k < timed; ++k)
      r.lat_us.push_back(std::chrono::duration<double, std::micro>(tally.t_done[k] - tally.t_submit[k]).count());
    return r;
  }

  // Both engines stay idle while the raw loop runs; waiting past their
  // idle_deep lets their workers back off so the baseline has the cores.
  void QuietEngines() {
    if (FLAGS_progress == "thread") std::this_thread::sleep_for(engine_->options().idle_deep + 50ms);
  }

  // `batch` writes make one request's worth; the raw loop keeps as many
  // writes in flight as the engine does (WritesInFlight).
  CaseResult RunRaw(const std::vector<te::nic::RawWriteLoop::Op>& ops, size_t batch) {
    if (memcpy_dst_.data()) return RunMemcpy(ops, batch);
    if (Rpc("RAWSERVE " + std::to_string(ops.size())) != "OK") Die("RAWSERVE refused");
    QuietEngines();
    ScopedPin pin(0);
    auto stats = Must(raw_->RunWrites(ops, WritesInFlight(batch), batch, kRawDataImm, kRawAckImm,
                                      std::chrono::milliseconds(FLAGS_timeout_ms)),
                      "raw loop");
    CaseResult r;
    r.seconds = stats.seconds;
    r.ops = ops.size();
    for (const auto& op : ops) r.bytes += op.length;
    r.lat_us = std::move(stats.batch_latency_us);
    return r;
  }

  // One verified pass: zero the target, write, compare CRCs.
  bool Verify(const te::Request& request, const std::vector<uint8_t>& expected_dst) {
    if (Rpc("ZERO") != "OK") Die("ZERO refused");
    RunEngine({request}, 1, 0);
    std::istringstream in(Rpc("CRC " + std::to_string(expected_dst.size())));
    std::string tag;
    uint32_t crc = 0;
    in >> tag >> crc;
    return crc == te::Crc32c(expected_dst.data(), expected_dst.size());
  }

  CaseResult EngineRtt(int iters) {
    if (Rpc("PONG " + std::to_string(iters)) != "OK") Die("PONG refused");
    CaseResult r;
    const auto start = Clock::now();
    for (int i = 0; i < iters; ++i) {
      auto t0 = Clock::now();
      Must(engine_->Submit(te::ImmOnly{dst_, kPingImm}, {}), "ping");
      Must(engine_->WaitImm(kPongImm, 1, std::chrono::milliseconds(FLAGS_timeout_ms)), "waiting for pong");
      r.lat_us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    }
    r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    r.ops = iters;
    return r;
  }

  // The memcpy baseline: the same offsets and lengths, one thread.
  CaseResult RunMemcpy(const std::vector<te::nic::RawWriteLoop::Op>& ops, size_t batch) {
    QuietEngines();
    CaseResult r;
    const auto start = Clock::now();
    auto t0 = start;
    for (size_t i = 0; i < ops.size(); ++i) {
      std::memcpy(memcpy_dst_.data() + ops[i].remote_offset, src_.data() + ops[i].local_offset, ops[i].length);
      r.bytes += ops[i].length;
      if ((i + 1) % batch == 0) {
        const auto t1 = Clock::now();
        r.lat_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
        t0 = t1;
      }
    }
    r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    r.ops = ops.size();
    return r;
  }

  // Two threads of this process passing one cache line back and forth.
  CaseResult CacheLineRtt(int iters) {
    std::atomic<int64_t> line{0};
    std::thread responder([&] {
      for (int64_t i = 0; i < iters; ++i) {
        while (line.load(std::memory_order_acquire) != 2 * i + 1) {
        }
        line.store(2 * i + 2, std::memory_order_release);
      }
    });
    CaseResult r;
    const auto start = Clock::now();
    for (int64_t i = 0; i < iters; ++i) {
      const auto t0 = Clock::now();
      line.store(2 * i + 1, std::memory_order_release);
      while (line.load(std::memory_order_acquire) != 2 * i + 2) {
      }
      r.lat_us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    }
    r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    r.ops = iters;
    responder.join();
    return r;
  }

  CaseResult RawRtt(int iters) {
    if (memcpy_dst_.data()) return CacheLineRtt(iters);
    if (Rpc("RAWPONG " + std::to_string(iters)) != "OK") Die("RAWPONG refused");
    QuietEngines();
    ScopedPin pin(0);
    CaseResult r;
    const auto start = Clock::now();
    r.lat_us = Must(raw_->Ping(iters, kRawPingImm, std::chrono::milliseconds(FLAGS_timeout_ms)), "raw ping");
    r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    r.ops = iters;
    return r;
  }

  te::TransferEngine* engine() { return engine_.get(); }
  const te::LocalMr& mr() const { return mr_; }
  const te::RemoteMr& dst() const { return dst_; }
  std::span<const uint8_t> src() const { return {src_.data(), src_.size()}; }
  bool has_raw() const { return raw_ != nullptr || memcpy_dst_.data() != nullptr; }

 private:
  std::unique_ptr<te::TransferEngine> engine_;
  te::AlignedBuffer src_;
  te::LocalMr mr_;
  te::RemoteMr dst_;
  std::unique_ptr<te::nic::RawWriteLoop> raw_;
  te::AlignedBuffer memcpy_dst_;  // the local provider's baseline
  Mailbox mailbox_;
};

// The figure a case reports: GB/s, Mop/s or p50 latency in us.
double Figure(const CaseResult& r, const std::string& metric) {
  if (metric == "gbps") return r.gbps();
  if (metric == "mops") return r.mops();
  return Percentile(r.lat_us, 0.5);
}
// The same, larger is better: what the median run is chosen by.
double Merit(const CaseResult& r, const std::string& metric) {
  return metric == "p50" ? -Figure(r, metric) : Figure(r, metric);
}

struct Row {
  std::string kind;
  uint64_t size;
  CaseResult eng, raw;
  // --probe: every run's figure (Figure) and probe, in run order.
  std::vector<std::pair<double, double>> eng_runs, raw_runs;
  bool has_raw = false;
  bool verified = false, verify_ran = false;
  std::string metric;  // what `ratio` compares: gbps, mops or p50
  double ratio() const {
    const double base = has_raw ? Figure(raw, metric) : 0;
    return base > 0 ? Figure(eng, metric) / base : 0;
  }
};

void PrintHeader(bool raw) {
  printf("%-7s %9s %4s %7s %8s %8s %8s %9s %9s", "case", "size", "dom", "ops", "GB/s", "Gbit/s", "Mop/s", "p50_us",
         "p99_us");
  if (raw) printf(" %9s %9s %9s %7s", "raw_GB/s", "raw_Mop/s", "raw_p50", "ratio");
  if (FLAGS_probe) printf(" %7s %7s", "xcpu_ns", "raw_xc");
  printf("  %s\n", "verified");
}

void PrintRow(const Row& r, const std::string& provider) {
  if (FLAGS_json) {
    printf(
        "{\"case\":\"%s\",\"size\":%llu,\"provider\":\"%s\",\"domains\":%d,\"progress\":\"%s\","
        "\"ops\":%llu,\"gbps\":%.4f,\"gbit\":%.3f,\"mops\":%.4f,\"p50_us\":%.2f,\"p99_us\":%.2f",
        r.kind.c_str(), (unsigned long long)r.size, provider.c_str(), FLAGS_domains, FLAGS_progress.c_str(),
        (unsigned long long)r.eng.ops, r.eng.gbps(), r.eng.gbps() * 8, r.eng.mops(), Percentile(r.eng.lat_us, 0.5),
        Percentile(r.eng.lat_us, 0.99));
    if (r.has_raw)
      printf(
          ",\"raw_gbps\":%.4f,\"raw_mops\":%.4f,\"raw_p50_us\":%.2f,\"raw_p99_us\":%.2f,"
          "\"ratio\":%.3f,\"ratio_of\":\"%s\"",
          r.raw.gbps(), r.raw.mops(), Percentile(r.raw.lat_us, 0.5), Percentile(r.raw.lat_us, 0.99), r.ratio(),
          r.metric.c_str());
    if (FLAGS_probe) {
      auto runs = [&](const char* name, const std::vector<std::pair<double, double>>& v) {
        printf(",\"%s\":[", name);
        for (size_t i = 0; i < v.size(); ++i)
          printf("%s{\"%s\":%.4f,\"xcpu_ns\":%.0f}", i ? "," : "", r.metric == "p50" ? "p50_us" : r.metric.c_str(),
                 v[i].first, v[i].second);
        printf("]");
      };
      printf(",\"xcpu_ns\":%.0f", r.eng.xcpu_ns);
      runs("runs", r.eng_runs);
      if (r.has_raw) {
        printf(",\"raw_xcpu_ns\":%.0f", r.raw.xcpu_ns);
        runs("raw_runs", r.raw_runs);
      }
    }
    printf(",\"verified\":%s}\n", r.verify_ran ? (r.verified ? "true" : "false") : "null");
  } else {
    printf("%-7s %9s %4d %7llu %8.3f %8.2f %8.4f %9.1f %9.1f", r.kind.c_str(), HumanSize(r.size).c_str(), FLAGS_domains,
           (unsigned long long)r.eng.ops, r.eng.gbps(), r.eng.gbps() * 8, r.eng.mops(), Percentile(r.eng.lat_us, 0.5),
           Percentile(r.eng.lat_us, 0.99));
    if (r.has_raw)
      printf(" %9.3f %9.4f %9.1f %6.3f%s", r.raw.gbps(), r.raw.mops(), Percentile(r.raw.lat_us, 0.5), r.ratio(),
             r.metric == "p50" ? "x" : " ");
    if (FLAGS_probe) printf(" %7.0f %7.0f", r.eng.xcpu_ns, r.has_raw ? r.raw.xcpu_ns : 0.0);
    printf("  %s\n", r.verify_ran ? (r.verified ? "yes" : "MISMATCH") : "-");
  }
  fflush(stdout);
}

// Runs engine and raw alternately --repeat times; keeps each side's median
// run, so a burst of noise on the shared cores hits both sides alike.
template <typename EngineFn, typename RawFn>
void Repeat(Row* row, EngineFn engine_run, RawFn raw_run) {
  std::vector<CaseResult> eng, raw;
  auto run = [&](auto& fn, std::vector<CaseResult>* into, std::vector<std::pair<double, double>>* runs) {
    // The state can change during a run: the slower of a probe before and
    // one after it is what the run is labelled with.
    const double before = FLAGS_probe ? te::CrossCpuRoundTripNs() : 0;
    into->push_back(fn());
    const double probe = FLAGS_probe ? std::max(before, te::CrossCpuRoundTripNs()) : 0;
    into->back().xcpu_ns = probe;
    runs->emplace_back(Figure(into->back(), row->metric), probe);
  };
  for (int i = 0; i < std::max(1, FLAGS_repeat); ++i) {
    run(engine_run, &eng, &row->eng_runs);
    if (row->has_raw) run(raw_run, &raw, &row->raw_runs);
  }
  auto median = [&](std::vector<CaseResult>& v) {
    std::sort(v.begin(), v.end(),
              [&](const CaseResult& a, const CaseResult& b) { return Merit(a, row->metric) < Merit(b, row->metric); });
    return v[v.size() / 2];
  };
  row->eng = median(eng);
  if (row->has_raw) row->raw = median(raw);
}

uint64_t OpsFor(uint64_t bytes_per_op) {
  if (FLAGS_iters > 0) return FLAGS_iters;
  return std::clamp<uint64_t>(FLAGS_bytes_per_case / std::max<uint64_t>(1, bytes_per_op), 20, 50000);
}

int RunInitiator(const std::string& hex) {
  Initiator ini(hex);
  auto* engine = ini.engine();
  const bool raw = ini.has_raw();
  const auto kinds = Split(FLAGS_cases, ',');
  auto has = [&](const char* k) { return std::find(kinds.begin(), kinds.end(), k) != kinds.end(); };
  std::vector<std::pair<std::string, uint64_t>> plan;
  if (has("single"))
    for (auto& s : Split(FLAGS_sizes, ',')) plan.emplace_back("single", ParseSize(s));
  if (has("paged"))
    for (auto& s : Split(FLAGS_page_sizes, ',')) plan.emplace_back("paged", ParseSize(s));
  if (has("imm")) plan.emplace_back("imm_rtt", 0);
  if (plan.empty()) Die("--cases selects nothing; use single, paged and/or imm");
  if (!FLAGS_json) {
    printf("te-bench: provider %s%s, %d domain(s), window %d, progress %s, median of %d run(s)%s\n",
           engine->provider().c_str(),
           engine->has_same_host_domain() ? " + the same-host domain (peers on this host take it)" : "", FLAGS_domains,
           FLAGS_window, FLAGS_progress.c_str(), std::max(1, FLAGS_repeat),
           !raw ? ""
           : MemcpyBaseline()
               ? ", raw = one thread's memcpy (writes) and a cache line between two threads (round trips), "
                 "interleaved in the same run"
               : ", raw baseline interleaved in the same run");
    PrintHeader(raw);
  }
  std::mt19937 rng(42);
  bool all_verified = true;
  for (size_t c = 0; c < plan.size(); ++c) {
    const auto& [kind, size] = plan[c];
    fprintf(stderr, "[%zu/%zu] %s %s ...\n", c + 1, plan.size(), kind.c_str(), HumanSize(size).c_str());
    Row row;
    row.kind = kind;
    row.size = size;
    row.has_raw = raw;
    if (kind == "single") {
      row.metric = "gbps";
      const uint64_t n = OpsFor(size);
      te::SingleWrite w{ini.mr(), 0, size, ini.dst(), 0, kDataImm};
      const uint64_t writes = Must(engine->ExpectedImmCount(w), "planning");
      std::vector<te::Request> warm(FLAGS_warmup, w), reqs(n, w);
      std::vector<te::nic::RawWriteLoop::Op> ops(n, {0, 0, size});
      Repeat(
          &row,
          [&] {
            if (FLAGS_warmup > 0) ini.RunEngine(warm, writes, size);
            auto r = ini.RunEngine(reqs, writes, size);
            r.ops = n;  // one write per request from the user's view
            return r;
          },
          [&] {
            if (FLAGS_warmup > 0) ini.RunRaw({size_t(FLAGS_warmup), {0, 0, size}}, 1);
            return ini.RunRaw(ops, 1);
          });
      if (FLAGS_verify) {
        std::vector<uint8_t> expect(ini.src().begin(), ini.src().begin() + size);
        row.verify_ran = true;
        row.verified = ini.Verify(w, expect);
      }
    } else if (kind == "paged") {
      row.metric = "mops";
      const uint64_t ppr = FLAGS_pages_per_request;
      const uint64_t stride = size + kPageSlack;
      const uint64_t nreq = std::max<uint64_t>(1, OpsFor(size) / ppr);
      std::vector<uint32_t> perm(kPagesInRegion);
      for (size_t i = 0; i < perm.size(); ++i) perm[i] = uint32_t(i);
      std::vector<te::Request> reqs;
      std::vector<te::nic::RawWriteLoop::Op> ops;
      for (uint64_t i = 0; i < nreq; ++i) {
        std::shuffle(perm.begin(), perm.end(), rng);
        te::PagedWrite p;
        p.src = ini.mr();
        p.dst = ini.dst();
        p.src_stride = p.dst_stride = stride;
        p.page_length = size;
        p.imm = kDataImm;
        p.src_pages.assign(perm.begin(), perm.begin() + ppr);
        std::shuffle(perm.begin(), perm.end(), rng);
        p.dst_pages.assign(perm.begin(), perm.begin() + ppr);
        for (uint64_t k = 0; k < ppr; ++k) ops.push_back({p.src_pages[k] * stride, p.dst_pages[k] * stride, size});
        reqs.push_back(std::move(p));
      }
      const size_t warm_n = std::min<size_t>(reqs.size(), std::max(1, FLAGS_warmup / int(ppr)));
      Repeat(
          &row,
          [&] {
            ini.RunEngine({reqs.begin(), reqs.begin() + warm_n}, ppr, ppr * size);
            return ini.RunEngine(reqs, ppr, ppr * size);
          },
          [&] {
            ini.RunRaw({ops.begin(), ops.begin() + warm_n * ppr}, ppr);
            return ini.RunRaw(ops, ppr);
          });
      if (FLAGS_verify) {
        const auto& p = std::get<te::PagedWrite>(reqs[0]);
        uint64_t end = 0;
        for (auto d : p.dst_pages) end = std::max<uint64_t>(end, d * stride + size);
        std::vector<uint8_t> expect(end, 0);
        for (uint64_t k = 0; k < ppr; ++k)
          memcpy(expect.data() + p.dst_pages[k] * stride, ini.src().data() + p.src_pages[k] * stride, size);
        row.verify_ran = true;
        row.verified = ini.Verify(reqs[0], expect);
      }
    } else {
      row.metric = "p50";
      Repeat(
          &row,
          [&] {
            if (FLAGS_warmup > 0) ini.EngineRtt(FLAGS_warmup);
            return ini.EngineRtt(FLAGS_rtt_iters);
          },
          [&] {
            if (FLAGS_warmup > 0) ini.RawRtt(FLAGS_warmup);
            return ini.RawRtt(FLAGS_rtt_iters);
          });
    }
    all_verified &= !row.verify_ran || row.verified;
    PrintRow(row, engine->provider());
  }
  if (!all_verified) {
    fprintf(stderr, "te-bench: received bytes did not match in at least one case\n");
    return 2;
  }
  return 0;
}

int RunLoopback(const char* argv0) {
  int fds[2];
  if (pipe(fds) != 0) Die("pipe failed");
  fflush(nullptr);  // the child exits through exit(): nothing buffered is printed twice
  pid_t child = fork();
  if (child < 0) Die("fork failed");
  if (child == 0) {
    close(fds[0]);
    // The listener never outlives the initiator, whatever ends it.
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() == 1) _exit(1);
    // exit(), not _exit(): the listener is a whole program, and its exit
    // handlers remove what it published in /dev/shm (its shm life mark).
    exit(RunListener(fds[1]));
  }
  close(fds[1]);
  std::string line;
  char ch;
  while (read(fds[0], &ch, 1) == 1 && ch != '\n') line.push_back(ch);
  close(fds[0]);
  const std::string prefix = "TE-BENCH-ADDRESS ";
  if (line.rfind(prefix, 0) != 0) {
    int status = 0;
    waitpid(child, &status, 0);
    Die("the listener did not start (exit status " + std::to_string(WEXITSTATUS(status)) + ")");
  }
  int rc = RunInitiator(line.substr(prefix.size()));
  int status = 0;
  waitpid(child, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    fprintf(stderr, "te-bench: listener exited abnormally\n");
    return rc ? rc : 3;
  }
  return rc;
}

// ---------------------------------------------------------------- engine cost

double CpuSeconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + 1e-6 * double(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

// The engine's own cost: requests through the whole engine (Submit, the
// worker's queues, posting, polling, immediate counting, completion) over
// DiscardDomains, which complete every write at once without moving data.
// Wall time per operation is what one submitting thread plus the worker
// sustain; CPU time per operation counts every thread of the process.
int RunEngineCost() {
  std::vector<std::shared_ptr<te::nic::Domain>> domains;
  for (int i = 0; i < FLAGS_domains; ++i) domains.push_back(std::make_shared<te::tools::DiscardDomain>());
  auto engine = Must(te::TransferEngine::CreateOverDomains(MakeEngineOptions(), domains), "creating the engine");
  const bool manual = engine->options().progress == te::ProgressMode::kManual;
  std::vector<uint8_t> region(RegionBytes());
  auto mr = Must(engine->RegisterMemory(region.data(), region.size()), "registering");
  auto dst = Must(engine->Import(engine->Describe(*mr)), "importing its own region");
  std::vector<std::pair<std::string, uint64_t>> plan;
  for (auto& s : Split(FLAGS_sizes, ',')) plan.emplace_back("single", ParseSize(s));
  for (auto& s : Split(FLAGS_page_sizes, ',')) plan.emplace_back("paged", ParseSize(s));
  if (!FLAGS_json) {
    printf("te-bench engine cost: %d discard domain(s), progress %s%s, %lld writes per case\n", FLAGS_domains,
           FLAGS_progress.c_str(), FLAGS_busy_poll ? ", busy poll" : "", (long long)FLAGS_cost_writes);
    printf("%-7s %9s %10s %12s %12s %10s%s\n", "case", "size", "writes", "wall ns/op", "cpu ns/op", "Mop/s",
           FLAGS_probe ? "  xcpu_ns" : "");
  }
  std::mt19937 rng(7);
  constexpr uint32_t kCostImm = 0x300;
  for (const auto& [kind, size] : plan) {
    const uint64_t ppr = kind == "paged" ? uint64_t(FLAGS_pages_per_request) : 1;
    const uint64_t stride = size + kPageSlack;
    if (kind == "single" && size > region.size()) continue;
    std::vector<te::Request> reqs;
    for (int k = 0; k < 64; ++k) {  // a few distinct requests, reused round-robin
      if (kind == "single") {
        reqs.push_back(te::SingleWrite{mr, 0, size, dst, 0, kCostImm});
      } else {
        te::PagedWrite p;
        p.src = mr;
        p.dst = dst;
        p.src_stride = p.dst_stride = stride;
        p.page_length = size;
        p.imm = kCostImm;
        std::vector<uint32_t> perm(kPagesInRegion);
        for (size_t i = 0; i < perm.size(); ++i) perm[i] = uint32_t(i);
        std::shuffle(perm.begin(), perm.end(), rng);
        p.src_pages.assign(perm.begin(), perm.begin() + ppr);
        std::shuffle(perm.begin(), perm.end(), rng);
        p.dst_pages.assign(perm.begin(), perm.begin() + ppr);
        reqs.push_back(std::move(p));
      }
    }
    const uint64_t nreq = std::max<uint64_t>(1, uint64_t(FLAGS_cost_writes) / ppr);
    const uint64_t window = std::max<uint64_t>(1, 4096 / ppr);  // requests in flight
    te::CompletionCounter counter;
    const double probe_before = FLAGS_probe ? te::CrossCpuRoundTripNs() : 0;
    const auto deadline = Clock::now() + std::chrono::milliseconds(FLAGS_timeout_ms) * 10;
    auto wait_until = [&](uint64_t n) {
      while (counter.finished() < n) {
        if (manual)
          engine->Progress();
        else if (!counter.WaitFinished(n, std::chrono::milliseconds(100)) && Clock::now() > deadline)
          Die("engine cost: requests did not finish in time");
      }
    };
    const double cpu0 = CpuSeconds();
    const auto t0 = Clock::now();
    for (uint64_t i = 0; i < nreq; ++i) {
      if (i >= window) wait_until(i - window + 1);
      te::Status s = engine->Submit(reqs[i % reqs.size()], {.counter = &counter});
      if (!s.ok()) Die("engine cost: " + s.ToString());
    }
    wait_until(nreq);
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    const double cpu = CpuSeconds() - cpu0;
    if (counter.failed() > 0) Die("engine cost: " + counter.first_error().ToString());
    engine->ForgetImm(kCostImm);
    const double probe = FLAGS_probe ? std::max(probe_before, te::CrossCpuRoundTripNs()) : 0;
    const double ops = double(nreq * ppr);
    const double wall_ns = secs * 1e9 / ops, cpu_ns = cpu * 1e9 / ops, mops = ops / secs / 1e6;
    if (FLAGS_json) {
      printf(
          "{\"case\":\"engine_cost_%s\",\"size\":%llu,\"domains\":%d,\"progress\":\"%s\",\"busy_poll\":%s,"
          "\"ops\":%llu,\"wall_ns_per_op\":%.1f,\"cpu_ns_per_op\":%.1f,\"mops\":%.3f,\"xcpu_ns\":%.0f}\n",
          kind.c_str(), (unsigned long long)size, FLAGS_domains, FLAGS_progress.c_str(),
          FLAGS_busy_poll ? "true" : "false", (unsigned long long)(nreq * ppr), wall_ns, cpu_ns, mops, probe);
    } else {
      printf("%-7s %9s %10llu %12.1f %12.1f %10.3f", kind.c_str(), HumanSize(size).c_str(),
             (unsigned long long)(nreq * ppr), wall_ns, cpu_ns, mops);
      if (FLAGS_probe) printf(" %8.0f", probe);
      printf("\n");
    }
    fflush(stdout);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  gflags::SetUsageMessage(
      "te-bench --loopback | --listen | --connect <descriptor hex> | --engine_cost  [--raw] [--json]");
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  FLAGS_logtostderr = true;
  google::InitGoogleLogging(argv[0]);
  const int modes = int(FLAGS_listen) + int(FLAGS_loopback) + int(!FLAGS_connect.empty()) + int(FLAGS_engine_cost);
  if (modes != 1) Die("choose exactly one of --listen, --connect <hex>, --loopback, --engine_cost");
  if (FLAGS_cost_writes < 1) Die("--cost_writes must be at least 1");
  // Every flag is checked here, before --loopback forks a listener, so a bad
  // flag never leaves a process behind.
  if (FLAGS_window < 1) Die("--window must be at least 1");
  if (FLAGS_pages_per_request < 1 || size_t(FLAGS_pages_per_request) > kPagesInRegion)
    Die("--pages_per_request must be in 1.." + std::to_string(kPagesInRegion));
  if (FLAGS_iters < 0) Die("--iters is " + std::to_string(FLAGS_iters) + "; use 0 (automatic) or a positive count");
  if (FLAGS_bytes_per_case < 1) Die("--bytes_per_case must be positive");
  if (FLAGS_rtt_iters < 1) Die("--rtt_iters must be at least 1");
  if (FLAGS_warmup < 0) Die("--warmup must not be negative");
  if (FLAGS_repeat < 1) Die("--repeat must be at least 1");
  if (FLAGS_timeout_ms < 1) Die("--timeout_ms must be at least 1");
  if (FLAGS_domains < 1 || FLAGS_domains > 64) Die("--domains must be in 1..64");
  if (FLAGS_progress != "thread" && FLAGS_progress != "manual")
    Die("--progress is '" + FLAGS_progress + "'; valid: thread, manual");
  for (const auto& k : Split(FLAGS_cases, ','))
    if (k != "single" && k != "paged" && k != "imm") Die("--cases names '" + k + "'; valid: single, paged, imm");
  if (Split(FLAGS_cases, ',').empty()) Die("--cases selects nothing; use single, paged and/or imm");
  for (const auto& s : Split(FLAGS_sizes, ',')) ParseSize(s);
  for (const auto& s : Split(FLAGS_page_sizes, ',')) ParseSize(s);
  (void)RegionBytes();
  if (FLAGS_engine_cost) return RunEngineCost();
  if (FLAGS_listen) return RunListener(STDOUT_FILENO);
  if (FLAGS_loopback) return RunLoopback(argv[0]);
  return RunInitiator(FLAGS_connect);
}
