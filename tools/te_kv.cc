// te-kv: disaggregated KV-cache transfer (prefill -> decode), measured.
//
//   te-kv loopback [--preset=llama70b|deepseek] [--prefill_tp=1] [--decode_tp=1]
//                  [--tokens=1024] [--requests=6] [--layer_ms=2] [--verify]
//   te-kv prefill  --registry=unix:/path/redis.sock --name=p0 [--serve_seconds=60]
//   te-kv decode   --registry=unix:/path/redis.sock --name=d0 [--requests=20]
//
// loopback: a prefill and a decode instance in one process (one engine per
//   tensor-parallel rank), requests one at a time. Each request is run twice:
//   streamed (every layer written as its simulated compute ends) and in bulk
//   (every layer written after the whole prefill), and reported as the time
//   from the last layer's compute to the KV being ready at the decoder, and
//   the transfer rate. In the same run, the same bytes in the same run
//   lengths go as bare PagedWrites (te-bench's paged case) for the baseline.
// prefill / decode: separate processes that find each other through a Redis
//   registry (kvcache/kv_registry.h). A prefill instance serves whatever
//   decode instances pull (its "compute" is --layer_ms per layer); a decode
//   instance routes --requests requests over the live prefill instances and
//   reports each. The context each request ends with carries the prefill's
//   monotonic clock at its last layer, so the decoder measures the same
//   latency as loopback does (processes on one host share that clock).
#include <gflags/gflags.h>
#include <glog/logging.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "kvcache/kv_decoder.h"
#include "kvcache/kv_pattern.h"
#include "kvcache/kv_plan.h"
#include "kvcache/kv_prefiller.h"
#include "kvcache/kv_registry.h"
#include "kvcache/kv_router.h"
#include "tools/tool_support.h"
#include "transfer/transfer_engine.h"

DEFINE_string(preset, "llama70b", "model shape: llama70b (GQA, 8 KV heads) or deepseek (MLA)");
DEFINE_string(order, "NHD", "page memory order on both sides: NHD or HND");
DEFINE_int32(prefill_tp, 1, "tensor-parallel ranks of the prefill instance");
DEFINE_int32(decode_tp, 1, "tensor-parallel ranks of the decode instance");
DEFINE_int32(tokens, 1024, "prompt tokens per request");
DEFINE_int32(requests, 6, "requests to run (loopback: each streamed and in bulk)");
DEFINE_double(layer_ms, 2.0, "simulated prefill compute per layer (ms)");
DEFINE_int32(slots, 8, "prefill/decode: requests an instance holds at once");
DEFINE_bool(verify, false, "check every page of every request byte for byte (fills and reads the cache)");
DEFINE_string(provider, "tcp",
              "engine provider (tcp = tcp;ofi_rxm on lo; shm; local = same host; +local after a NIC provider: "
              "same-host peers bypass it)");
DEFINE_string(iface, "", "libfabric domain / interface (default lo for tcp)");
DEFINE_string(registry, "", "prefill/decode: Redis registry, unix:/path or host:port");
DEFINE_string(name, "", "prefill/decode: this instance's name in the registry");
DEFINE_int32(serve_seconds, 60, "prefill: how long to serve");
DEFINE_int32(peer_timeout_ms, 2000, "heartbeat silence that fails a peer's requests");
DEFINE_int32(request_timeout_ms, 10000, "engine request timeout (also the grace for a peer never heard from)");
DEFINE_bool(json, false, "print JSON lines");
DEFINE_bool(loopback, false, "same as the loopback command");

namespace {

using Clock = std::chrono::steady_clock;
using te::kvcache::KvDecoder;
using te::kvcache::KvInstanceInfo;
using te::kvcache::KvLayout;
using te::kvcache::KvPrefiller;

using te::tools::Die;
using te::tools::Median;
using te::tools::Must;

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }
uint64_t NowNs() {
  return uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count());
}

te::EngineOptions EngineOpts() {
  return Must(te::tools::BuildEngineOptions(
                  {FLAGS_provider, FLAGS_iface, 1, "thread", std::chrono::milliseconds(FLAGS_request_timeout_ms)}),
              "engine flags");
}

KvLayout Layout(int tp, uint32_t pages) {
  KvLayout l = Must(KvLayout::Preset(FLAGS_preset), "--preset");
  if (FLAGS_order != "NHD" && FLAGS_order != "HND") Die("--order must be NHD or HND, got " + FLAGS_order);
  l.order = FLAGS_order == "NHD" ? te::kvcache::KvOrder::kNHD : te::kvcache::KvOrder::kHND;
  l.tp = uint32_t(tp);
  l.pages = pages;
  Must(l.Validate(), "layout");
  return l;
}

uint32_t RequestPages(const KvLayout& l) { return uint32_t((FLAGS_tokens + l.page_tokens - 1) / l.page_tokens); }

// One instance: an engine, a cache and a prefiller or decoder per rank.
struct Prefill {
  KvLayout layout;
  std::vector<std::unique_ptr<te::TransferEngine>> engines;
  std::vector<std::vector<uint8_t>> memory;
  std::vector<std::unique_ptr<KvPrefiller>> ranks;

  // Only rank 0 gets o's callbacks: every rank sees the same requests.
  Prefill(const KvLayout& l, te::kvcache::PrefillerOptions o) : layout(l) {
    for (uint32_t r = 0; r < l.tp; ++r) {
      if (r == 1) {
        o.on_pull = nullptr;
        o.on_sent = nullptr;
      }
      engines.push_back(Must(te::TransferEngine::Create(EngineOpts()), "prefill engine"));
      memory.emplace_back(KvPrefiller::MemoryBytes(l, o));
      ranks.push_back(Must(KvPrefiller::Create(engines.back().get(), l, r, memory.back().data(), o), "prefiller"));
    }
  }
  ~Prefill() {
    ranks.clear();
    engines.clear();
  }
  KvInstanceInfo Info(const std::string& name) const {
    KvInstanceInfo i{"prefill", name, layout, {}};
    for (auto& e : engines) i.ranks.push_back(e->address());
    return i;
  }
  void Fill(const std::vector<uint32_t>& pages, uint64_t salt) {
    for (uint32_t r = 0; r < layout.tp; ++r) te::kvcache::FillKvPattern(layout, r, pages, salt, memory[r].data());
  }
  void Start(uint64_t id, const std::vector<uint32_t>& pages) {
    for (auto& p : ranks) Must(p->Start(id, pages), "Start");
  }
  // Layer done on every rank; false if the request is gone (cancelled, failed).
  bool Layer(uint64_t id, uint32_t l) {
    bool ok = true;
    for (auto& p : ranks) ok = p->LayerDone(id, l).ok() && ok;
    return ok;
  }
  void Finish(uint64_t id, uint64_t last_layer_ns) {
    uint8_t ctx[8];
    std::memcpy(ctx, &last_layer_ns, 8);
    for (auto& p : ranks) (void)p->Finish(id, ctx);
  }
};

struct Decode {
  KvLayout layout;
  std::vector<std::unique_ptr<te::TransferEngine>> engines;
  std::vector<std::vector<uint8_t>> memory;
  std::vector<std::unique_ptr<KvDecoder>> ranks;

  explicit Decode(const KvLayout& l) : layout(l) {
    te::kvcache::DecoderOptions o;
    o.context_bytes = 64;
    o.context_slots = uint32_t(std::max(FLAGS_slots, 1));
    o.peer_timeout = std::chrono::milliseconds(FLAGS_peer_timeout_ms);
    for (uint32_t r = 0; r < l.tp; ++r) {
      engines.push_back(Must(te::TransferEngine::Create(EngineOpts()), "decode engine"));
      memory.emplace_back(KvDecoder::MemoryBytes(l, o));
      ranks.push_back(Must(KvDecoder::Create(engines.back().get(), l, r, memory.back().data(), o), "decoder"));
    }
  }
  ~Decode() {
    ranks.clear();
    engines.clear();
  }
  uint64_t Wrong(const std::vector<uint32_t>& pages, uint64_t salt) {
    uint64_t w = 0;
    for (uint32_t r = 0; r < layout.tp; ++r)
      w += te::kvcache::CountWrongKvHeads(layout, r, pages, salt, memory[r].data());
    return w;
  }
};

// What one request's decode ranks reported.
struct Waiter {
  std::mutex mu;
  std::condition_variable cv;
  int left = 0;
  te::Status status;
  Clock::time_point ready;
  uint64_t context_ns = 0;

  KvDecoder::ReadyCallback Callback() {
    return [this](uint64_t, const te::Status& s, std::span<const uint8_t> ctx) {
      const auto now = Clock::now();
      std::lock_guard<std::mutex> lock(mu);
      if (!s.ok() && status.ok()) status = s;
      if (ctx.size() >= 8 && s.ok()) std::memcpy(&context_ns, ctx.data(), 8);
      ready = std::max(ready, now);
      if (--left == 0) cv.notify_all();
    };
  }
  bool Wait(std::chrono::seconds t) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, t, [&] { return left == 0; });
  }
};

// ---------------------------------------------------------------- loopback

// Bare PagedWrites of `units` runs of `run_bytes` from prefill rank 0 to
// decode rank 0, 64 runs per request, all in flight at once: te-bench's paged
// case on the same engines. Run() once per KV request, alternating with them,
// so that both see the same machine.
class PagedBaseline {
 public:
  PagedBaseline(Prefill& p, Decode& d, uint64_t run_bytes, uint64_t units) : p_(p), d_(d), run_bytes_(run_bytes) {
    src_ = Must(p.engines[0]->RegisterMemory(p.memory[0].data(), p.memory[0].size()), "baseline src");
    auto dst_mr = Must(d.engines[0]->RegisterMemory(d.memory[0].data(), d.memory[0].size()), "baseline dst");
    dst_ = Must(p.engines[0]->Import(d.engines[0]->Describe(*dst_mr)), "baseline import");
    dst_mr_ = dst_mr;
    n_ = std::min({units, p.memory[0].size() / run_bytes, d.memory[0].size() / run_bytes});
  }
  // GB/s of one pass.
  double Run() {
    const uint32_t imm = 0x00424100 + uint32_t(rep_++ & 0xffff);  // application range (imm_ranges.h)
    te::CompletionCounter done;
    // Completion by callback, as the decoder does (a blocking WaitImm would
    // wake this thread on every arrival batch).
    Waiter arrived;
    arrived.left = 1;
    Must(d_.engines[0]->ExpectImm(imm, n_, [&] { arrived.Callback()(0, te::Status::Ok(), {}); }), "baseline expect");
    const auto t0 = Clock::now();
    uint64_t requests = 0;
    for (uint64_t first = 0; first < n_; first += 64) {
      te::PagedWrite w;
      w.src = src_;
      w.dst = dst_;
      w.page_length = run_bytes_;
      w.src_stride = w.dst_stride = run_bytes_;
      for (uint64_t i = first; i < std::min(n_, first + 64); ++i) {
        w.src_pages.push_back(uint32_t(i));
        w.dst_pages.push_back(uint32_t(i));
      }
      w.imm = imm;
      Must(p_.engines[0]->Submit(std::move(w), {.counter = &done}), "baseline submit");
      ++requests;
    }
    if (!arrived.Wait(std::chrono::seconds(60))) Die("baseline writes did not all arrive within 60 s");
    const double s = std::chrono::duration<double>(arrived.ready - t0).count();
    if (!done.WaitFinished(requests, std::chrono::seconds(60)) || done.failed())
      Die("baseline paged writes failed: " + done.first_error().ToString());
    return double(n_ * run_bytes_) / s / 1e9;
  }

 private:
  Prefill& p_;
  Decode& d_;
  uint64_t run_bytes_, n_ = 0;
  uint32_t rep_ = 0;
  te::LocalMr src_, dst_mr_;
  te::RemoteMr dst_;
};

int Loopback() {
  const KvLayout probe = Layout(FLAGS_prefill_tp, 1);
  const uint32_t pages = RequestPages(probe);
  const KvLayout src_layout = Layout(FLAGS_prefill_tp, pages), dst_layout = Layout(FLAGS_decode_tp, pages);
  Must(te::kvcache::CheckCompatible(src_layout, dst_layout), "layouts");
  te::kvcache::PrefillerOptions po;
  po.context_bytes = 64;
  po.peer_timeout = std::chrono::milliseconds(FLAGS_peer_timeout_ms);
  Prefill prefill(src_layout, po);
  Decode decode(dst_layout);
  const auto info = prefill.Info("loopback");
  std::vector<uint32_t> src_pages(pages), dst_pages(pages);
  for (uint32_t i = 0; i < pages; ++i) {  // the decoder's pages in reverse: a permutation
    src_pages[i] = i;
    dst_pages[i] = pages - 1 - i;
  }
  if (FLAGS_verify) prefill.Fill(src_pages, 0);
  // Bytes a request moves (every rank), and its runs per page on rank 0 -> 0.
  uint64_t bytes = 0, units0 = 0, run_bytes0 = 0;
  for (uint32_t d = 0; d < dst_layout.tp; ++d)
    for (uint32_t s : te::kvcache::SourceRanks(src_layout, dst_layout, d)) {
      auto runs = Must(te::kvcache::PlanPageRuns(src_layout, s, dst_layout, d), "plan");
      bytes += uint64_t(src_layout.layers) * src_layout.tensors() * pages * runs.runs() * runs.run_bytes;
      if (d == 0 && s == te::kvcache::SourceRanks(src_layout, dst_layout, 0).front()) {
        units0 = uint64_t(src_layout.layers) * src_layout.tensors() * pages * runs.runs();
        run_bytes0 = runs.run_bytes;
      }
    }
  if (!FLAGS_json)
    printf(
        "te-kv loopback: %s, %s, prefill tp %d -> decode tp %d, %d tokens = %u pages, %.1f MiB per request, "
        "%.1f ms compute per layer, %s\n",
        FLAGS_preset.c_str(), src_layout.Describe().c_str(), FLAGS_prefill_tp, FLAGS_decode_tp, FLAGS_tokens, pages,
        bytes / 1048576.0, FLAGS_layer_ms, prefill.engines[0]->provider().c_str());

  std::vector<double> ready_stream, ready_bulk, rate_bulk, rate_paged;
  struct Row {
    int request;
    const char* mode;
    double after_ms, gbps;
  };
  std::vector<Row> rows;
  PagedBaseline baseline(prefill, decode, run_bytes0, units0);
  uint64_t wrong = 0;
  uint64_t id = 1;
  const auto layer_time = std::chrono::microseconds(int64_t(FLAGS_layer_ms * 1000));
  for (int i = 0; i < FLAGS_requests; ++i) {
    rate_paged.push_back(baseline.Run());
    for (int bulk = 0; bulk < 2; ++bulk, ++id) {
      if (FLAGS_verify)
        for (auto& m : decode.memory) std::fill(m.begin(), m.begin() + dst_layout.region_bytes(), 0);
      Waiter w;
      w.left = int(dst_layout.tp);
      for (auto& d : decode.ranks) Must(d->Receive(id, info, dst_pages, w.Callback()), "Receive");
      prefill.Start(id, src_pages);
      Clock::time_point last;
      if (bulk) {
        std::this_thread::sleep_for(layer_time * src_layout.layers);
        last = Clock::now();
        for (uint32_t l = 0; l < src_layout.layers; ++l) prefill.Layer(id, l);
      } else {
        auto next = Clock::now();
        for (uint32_t l = 0; l < src_layout.layers; ++l) {
          next += layer_time;
          std::this_thread::sleep_until(next);
          prefill.Layer(id, l);
        }
        last = Clock::now();
      }
      prefill.Finish(id, NowNs());
      if (!w.Wait(std::chrono::seconds(120))) Die("request " + std::to_string(id) + " never became ready");
      Must(w.status, "request " + std::to_string(id));
      const double after = Ms(w.ready - last);
      (bulk ? ready_bulk : ready_stream).push_back(after);
      if (bulk) rate_bulk.push_back(double(bytes) / (after / 1e3) / 1e9);
      rows.push_back({i + 1, bulk ? "bulk" : "streamed", after, bulk ? rate_bulk.back() : 0});
      if (FLAGS_verify) wrong += decode.Wrong(dst_pages, 0);
      if (!FLAGS_json)
        fprintf(stderr, "\r  request %d/%d %-9s ready %.2f ms after the last layer   ", i + 1, FLAGS_requests,
                bulk ? "bulk" : "streamed", after);
    }
  }
  if (!FLAGS_json) fprintf(stderr, "\n");
  const double paged = Median(rate_paged);
  // With several ranks, bulk moves every rank pair at once and the baseline
  // one pair: that ratio is not like for like (PERFORMANCE.md says so).
  const double bulk_rate = Median(rate_bulk);
  const double layer_transfer_ms = Median(ready_bulk) / src_layout.layers;
  if (FLAGS_json) {
    for (const Row& r : rows)
      printf("{\"tool\":\"te-kv\",\"request\":%d,\"mode\":\"%s\",\"ready_after_last_layer_ms\":%.3f,\"gbps\":%.3f}\n",
             r.request, r.mode, r.after_ms, r.gbps);
    printf(
        "{\"tool\":\"te-kv\",\"mode\":\"loopback\",\"preset\":\"%s\",\"layout\":\"%s\",\"prefill_tp\":%d,"
        "\"decode_tp\":%d,\"tokens\":%d,\"pages\":%u,\"bytes_per_request\":%llu,\"layer_ms\":%.3f,"
        "\"requests\":%d,\"streamed_ready_after_last_layer_ms_p50\":%.3f,"
        "\"bulk_ready_after_last_layer_ms_p50\":%.3f,\"one_layer_transfer_ms\":%.3f,\"bulk_gbps\":%.3f,"
        "\"paged_baseline_gbps\":%.3f,\"run_bytes\":%llu,\"bulk_vs_paged\":%.3f,\"verified\":%s,\"wrong_heads\":%llu}"
        "\n",
        FLAGS_preset.c_str(), src_layout.Describe().c_str(), FLAGS_prefill_tp, FLAGS_decode_tp, FLAGS_tokens, pages,
        (unsigned long long)bytes, FLAGS_layer_ms, FLAGS_requests, Median(ready_stream), Median(ready_bulk),
        layer_transfer_ms, bulk_rate, paged, (unsigned long long)run_bytes0, bulk_rate / paged,
        FLAGS_verify ? (wrong == 0 ? "true" : "false") : "null", (unsigned long long)wrong);
  } else {
    printf("\n  %-8s %-10s %26s %10s\n", "request", "mode", "KV ready after last layer", "GB/s");
    for (const Row& r : rows)
      printf("  %-8d %-10s %23.2f ms %10s\n", r.request, r.mode, r.after_ms,
             r.gbps > 0 ? std::to_string(r.gbps).substr(0, 5).c_str() : "-");
    printf("\n  %-10s %28s %14s\n", "summary", "KV ready after last layer", "transfer");
    printf("  %-10s %22.2f ms p50 %14s\n", "streamed", Median(ready_stream), "(overlapped)");
    printf("  %-10s %22.2f ms p50 %9.2f GB/s\n", "bulk", Median(ready_bulk), bulk_rate);
    printf("\n  one layer's transfer (bulk / layers): %.2f ms; streamed ready = %.2f layer transfers\n",
           layer_transfer_ms, Median(ready_stream) / layer_transfer_ms);
    printf("  baseline: bare PagedWrite, %llu-byte runs, 64 per request: %.2f GB/s; bulk / baseline = %.2f\n",
           (unsigned long long)run_bytes0, paged, bulk_rate / paged);
    if (FLAGS_verify)
      printf("  verified: %s (%llu wrong heads)\n", wrong == 0 ? "yes" : "NO", (unsigned long long)wrong);
  }
  return FLAGS_verify && wrong ? 1 : 0;
}

// ------------------------------------------------------- prefill / decode

std::atomic<bool> g_stop{false};

int ServePrefill() {
  if (FLAGS_registry.empty() || FLAGS_name.empty()) Die("prefill needs --registry and --name");
  auto registry = Must(te::kvcache::KvRegistry::Connect(FLAGS_registry), "registry");
  const KvLayout probe = Layout(FLAGS_prefill_tp, 1);
  const uint32_t per = RequestPages(probe), slots = uint32_t(std::max(FLAGS_slots, 1));
  const KvLayout layout = Layout(FLAGS_prefill_tp, per * slots);

  // Work handed from on_pull to the compute thread: (request, pages asked).
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::pair<uint64_t, size_t>> work;
  std::vector<uint32_t> free_slots;
  for (uint32_t s = slots; s-- > 0;) free_slots.push_back(s);
  std::map<uint64_t, uint32_t> slot_of;
  std::atomic<uint64_t> served{0}, failed{0};

  te::kvcache::PrefillerOptions po;
  po.context_bytes = 64;
  po.context_slots = slots;
  po.peer_timeout = std::chrono::milliseconds(FLAGS_peer_timeout_ms);
  po.on_pull = [&](uint64_t id, size_t n) {
    std::lock_guard<std::mutex> lock(mu);
    work.emplace_back(id, n);
    cv.notify_all();
  };
  po.on_sent = [&](uint64_t id, const te::Status& s) {
    std::lock_guard<std::mutex> lock(mu);
    (s.ok() ? served : failed)++;
    auto it = slot_of.find(id);
    if (it != slot_of.end()) {
      free_slots.push_back(it->second);
      slot_of.erase(it);
    }
    cv.notify_all();
  };
  auto prefill = std::make_unique<Prefill>(layout, po);
  te::kvcache::RegistryEntry entry;
  entry.info = prefill->Info(FLAGS_name);
  entry.capacity = slots;
  auto registration = Must(te::kvcache::KvRegistration::Start(
                               registry.get(), entry, [&] { return uint32_t(prefill->ranks[0]->active_requests()); }),
                           "register");
  fprintf(stderr, "te-kv prefill '%s': %s, %u slots of %u pages, serving for %d s\n", FLAGS_name.c_str(),
          layout.Describe().c_str(), slots, per, FLAGS_serve_seconds);
  const auto layer_time = std::chrono::microseconds(int64_t(FLAGS_layer_ms * 1000));
  const auto end = Clock::now() + std::chrono::seconds(FLAGS_serve_seconds);
  while (!g_stop && Clock::now() < end) {
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_for(lock, std::chrono::milliseconds(100), [&] { return !work.empty() && !free_slots.empty(); }))
      continue;
    auto [id, n] = work.front();
    work.pop_front();
    if (n == 0 || n > per) {
      lock.unlock();
      for (auto& p : prefill->ranks)
        (void)p->Abort(id, "asked for " + std::to_string(n) + " pages; slots hold " + std::to_string(per));
      continue;
    }
    const uint32_t slot = free_slots.back();
    free_slots.pop_back();
    slot_of[id] = slot;
    lock.unlock();
    std::vector<uint32_t> pages(n);
    for (size_t i = 0; i < n; ++i) pages[i] = slot * per + uint32_t(i);
    if (FLAGS_verify) prefill->Fill(pages, id);
    prefill->Start(id, pages);
    auto next = Clock::now();
    bool alive = true;
    for (uint32_t l = 0; l < layout.layers && alive; ++l) {
      next += layer_time;
      std::this_thread::sleep_until(next);
      alive = prefill->Layer(id, l);
    }
    if (alive) prefill->Finish(id, NowNs());
  }
  fprintf(stderr, "te-kv prefill '%s': leaving (served %llu, failed %llu)\n", FLAGS_name.c_str(),
          (unsigned long long)served.load(), (unsigned long long)failed.load());
  (void)registration->Leave(std::chrono::seconds(10));
  if (FLAGS_json)
    printf("{\"tool\":\"te-kv\",\"mode\":\"prefill\",\"name\":\"%s\",\"served\":%llu,\"failed\":%llu}\n",
           FLAGS_name.c_str(), (unsigned long long)served.load(), (unsigned long long)failed.load());
  return 0;
}

int RunDecode() {
  if (FLAGS_registry.empty() || FLAGS_name.empty()) Die("decode needs --registry and --name");
  auto registry = Must(te::kvcache::KvRegistry::Connect(FLAGS_registry), "registry");
  const KvLayout probe = Layout(FLAGS_decode_tp, 1);
  const uint32_t per = RequestPages(probe);
  Decode decode(Layout(FLAGS_decode_tp, per));
  te::kvcache::RegistryEntry entry;
  entry.info = {"decode", FLAGS_name, decode.layout, {}};
  for (auto& e : decode.engines) entry.info.ranks.push_back(e->address());
  entry.capacity = 1;
  std::atomic<uint32_t> load{0};
  auto registration =
      Must(te::kvcache::KvRegistration::Start(registry.get(), entry, [&] { return load.load(); }), "register");
  te::kvcache::KvRouter router(registry.get());
  std::vector<uint32_t> pages(per);
  for (uint32_t i = 0; i < per; ++i) pages[i] = per - 1 - i;
  std::vector<double> after;
  uint64_t ok = 0, retried = 0, wrong = 0;
  const uint64_t base = uint64_t(getpid()) << 24;  // request ids unique across decode processes
  for (int i = 0; i < FLAGS_requests; ++i) {
    std::set<std::string> avoid;
    bool done = false;
    for (int attempt = 0; attempt < 5 && !done; ++attempt) {
      auto route = router.Pick(avoid);
      if (!route.ok()) {
        fprintf(stderr, "  request %d: %s; retrying\n", i, route.status().ToString().c_str());
        std::this_thread::sleep_for(std::chrono::milliseconds(500));
        router.Invalidate();
        continue;
      }
      const uint64_t id = base + uint64_t(i) * 8 + attempt;
      if (FLAGS_verify)
        for (auto& m : decode.memory) std::fill(m.begin(), m.begin() + decode.layout.region_bytes(), 0);
      Waiter w;
      w.left = int(decode.layout.tp);
      load = 1;
      for (auto& d : decode.ranks) Must(d->Receive(id, route->prefill.info, pages, w.Callback()), "Receive");
      if (!w.Wait(std::chrono::seconds(120))) Die("request never became ready");
      load = 0;
      if (!w.status.ok()) {
        fprintf(stderr, "  request %d on %s: %s; retrying elsewhere\n", i, route->prefill.info.name.c_str(),
                w.status.ToString().c_str());
        avoid.insert(route->prefill.info.name);
        router.Invalidate();
        ++retried;
        continue;
      }
      done = true;
      ++ok;
      const double ms =
          double(int64_t(
              uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(w.ready.time_since_epoch()).count()) -
              w.context_ns)) /
          1e6;
      after.push_back(ms);
      if (FLAGS_verify) wrong += decode.Wrong(pages, id);
      if (!FLAGS_json)
        fprintf(stderr, "  request %d/%d from %s: KV ready %.2f ms after its last layer\n", i + 1, FLAGS_requests,
                route->prefill.info.name.c_str(), ms);
    }
  }
  (void)registration->Leave(std::chrono::seconds(5));
  if (FLAGS_json)
    printf(
        "{\"tool\":\"te-kv\",\"mode\":\"decode\",\"name\":\"%s\",\"requests\":%d,\"ready\":%llu,\"retried\":%llu,"
        "\"ready_after_last_layer_ms_p50\":%.3f,\"verified\":%s,\"wrong_heads\":%llu}\n",
        FLAGS_name.c_str(), FLAGS_requests, (unsigned long long)ok, (unsigned long long)retried, Median(after),
        FLAGS_verify ? (wrong == 0 ? "true" : "false") : "null", (unsigned long long)wrong);
  else
    printf("te-kv decode '%s': %llu of %d requests ready (%llu retries), KV ready %.2f ms p50 after the last layer%s\n",
           FLAGS_name.c_str(), (unsigned long long)ok, FLAGS_requests, (unsigned long long)retried, Median(after),
           FLAGS_verify
               ? (wrong == 0 ? ", every byte verified" : ", WRONG BYTES (do the prefill instances run with --verify?)")
               : "");
  return ok == uint64_t(FLAGS_requests) && wrong == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  gflags::SetUsageMessage(
      "disaggregated KV-cache transfer\n"
      "  te-kv loopback [--preset=llama70b|deepseek] [--prefill_tp=N --decode_tp=M] [--tokens=1024] [--verify]\n"
      "  te-kv prefill --registry=unix:/path/redis.sock --name=p0 [--serve_seconds=60]\n"
      "  te-kv decode  --registry=unix:/path/redis.sock --name=d0 [--requests=20]");
  gflags::ParseCommandLineFlags(&argc, &argv, true);
  google::InitGoogleLogging(argv[0]);
  signal(SIGTERM, [](int) { g_stop = true; });
  signal(SIGINT, [](int) { g_stop = true; });
  const std::string cmd = FLAGS_loopback ? "loopback" : argc > 1 ? argv[1] : "loopback";
  if (FLAGS_prefill_tp < 1 || FLAGS_decode_tp < 1) Die("--prefill_tp and --decode_tp must be at least 1");
  if (FLAGS_tokens < 1) Die("--tokens must be at least 1, got " + std::to_string(FLAGS_tokens));
  if (FLAGS_requests < 1) Die("--requests must be at least 1, got " + std::to_string(FLAGS_requests));
  if (FLAGS_layer_ms < 0) Die("--layer_ms must not be negative");
  if (cmd == "loopback") return Loopback();
  if (cmd == "prefill") return ServePrefill();
  if (cmd == "decode") return RunDecode();
  Die("unknown command '" + cmd + "'; use loopback, prefill or decode");
}
