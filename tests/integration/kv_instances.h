// Prefill and decode instances inside one test process: one engine, one
// cache and one KvPrefiller / KvDecoder per tensor-parallel rank, over tcp
// on loopback.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>

#include "integration/test_support.h"
#include "kvcache/kv_decoder.h"
#include "kvcache/kv_pattern.h"
#include "kvcache/kv_prefiller.h"

namespace te::testing {

using kvcache::KvDecoder;
using kvcache::KvInstanceInfo;
using kvcache::KvLayout;
using kvcache::KvPrefiller;

inline KvLayout TestLayout(uint32_t tp, kvcache::KvOrder order = kvcache::KvOrder::kNHD, bool mla = false) {
  KvLayout l;
  l.layers = 6;
  l.page_tokens = 8;
  l.kv_heads = mla ? 1 : 4;
  l.head_dim = mla ? 72 : 32;
  l.dtype_bytes = 2;
  l.mla = mla;
  l.order = order;
  l.tp = tp;
  l.pages = 64;
  return l;
}

// What on_sent / on_ready reported, by request id.
class Outcomes {
 public:
  void Set(uint64_t id, const Status& s, std::string context = {}) {
    std::lock_guard<std::mutex> lock(mu_);
    ++calls_[id];
    status_[id] = s;
    context_[id] = std::move(context);
    cv_.notify_all();
  }
  // Waits until `n` distinct ids reported; false on timeout.
  bool WaitCount(size_t n, std::chrono::milliseconds t = std::chrono::milliseconds(20000)) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, t, [&] { return status_.size() >= n; });
  }
  bool Has(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    return status_.count(id) > 0;
  }
  Status Get(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    return status_.at(id);
  }
  std::string Context(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    return context_.at(id);
  }
  int Calls(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_[id];
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint64_t, Status> status_;
  std::map<uint64_t, std::string> context_;
  std::map<uint64_t, int> calls_;
};

struct PrefillInstance {
  KvLayout layout;
  std::vector<std::unique_ptr<TransferEngine>> engines;
  std::vector<std::vector<uint8_t>> memory;
  std::vector<std::unique_ptr<KvPrefiller>> ranks;
  std::vector<std::unique_ptr<Outcomes>> sent_by_rank;  // on_sent of each rank
  Outcomes& sent;                                       // rank 0's

  PrefillInstance(const KvLayout& l, kvcache::PrefillerOptions options = Defaults())
      : layout(l), sent_by_rank(MakeOutcomes(l.tp)), sent(*sent_by_rank[0]) {
    for (uint32_t r = 0; r < l.tp; ++r) {
      Outcomes* out = sent_by_rank[r].get();
      options.on_sent = [out](uint64_t id, const Status& s) { out->Set(id, s); };
      auto e = TransferEngine::Create(Options("tcp"));
      EXPECT_TRUE(e.ok()) << e.status().ToString();
      engines.push_back(std::move(e).value());
      memory.emplace_back(KvPrefiller::MemoryBytes(l, options));
      auto p = KvPrefiller::Create(engines.back().get(), l, r, memory.back().data(), options);
      EXPECT_TRUE(p.ok()) << p.status().ToString();
      ranks.push_back(std::move(p).value());
    }
  }
  static std::vector<std::unique_ptr<Outcomes>> MakeOutcomes(uint32_t n) {
    std::vector<std::unique_ptr<Outcomes>> v;
    for (uint32_t i = 0; i < n; ++i) v.push_back(std::make_unique<Outcomes>());
    return v;
  }
  ~PrefillInstance() {
    ranks.clear();
    engines.clear();
  }
  static kvcache::PrefillerOptions Defaults() {
    kvcache::PrefillerOptions o;
    o.heartbeat_interval = std::chrono::milliseconds(50);
    o.peer_timeout = std::chrono::milliseconds(600);
    o.context_bytes = 256;
    return o;
  }
  KvInstanceInfo Info() const {
    KvInstanceInfo info{"prefill", "p", layout, {}};
    for (auto& e : engines) info.ranks.push_back(e->address());
    return info;
  }
  // The request's pages on every rank get the pattern, then Start.
  void Start(uint64_t id, const std::vector<uint32_t>& pages) {
    for (uint32_t r = 0; r < layout.tp; ++r) {
      kvcache::FillKvPattern(layout, r, pages, id, memory[r].data());
      ASSERT_TRUE(ranks[r]->Start(id, pages).ok());
    }
  }
  void Layer(uint64_t id, uint32_t layer) {
    for (auto& p : ranks) ASSERT_TRUE(p->LayerDone(id, layer).ok());
  }
  void Finish(uint64_t id) {
    const std::string ctx = "context of request " + std::to_string(id);
    for (auto& p : ranks) ASSERT_TRUE(p->Finish(id, {reinterpret_cast<const uint8_t*>(ctx.data()), ctx.size()}).ok());
  }
  void RunAll(uint64_t id, const std::vector<uint32_t>& pages) {
    Start(id, pages);
    for (uint32_t l = 0; l < layout.layers; ++l) Layer(id, l);
    Finish(id);
  }
};

struct DecodeInstance {
  KvLayout layout;
  std::vector<std::unique_ptr<TransferEngine>> engines;
  std::vector<std::vector<uint8_t>> memory;
  std::vector<std::unique_ptr<KvDecoder>> ranks;
  std::vector<std::unique_ptr<Outcomes>> ready;  // per rank

  DecodeInstance(const KvLayout& l, kvcache::DecoderOptions options = Defaults()) : layout(l) {
    for (uint32_t r = 0; r < l.tp; ++r) {
      auto e = TransferEngine::Create(Options("tcp"));
      EXPECT_TRUE(e.ok()) << e.status().ToString();
      engines.push_back(std::move(e).value());
      memory.emplace_back(KvDecoder::MemoryBytes(l, options));
      auto d = KvDecoder::Create(engines.back().get(), l, r, memory.back().data(), options);
      EXPECT_TRUE(d.ok()) << d.status().ToString();
      ranks.push_back(std::move(d).value());
      ready.push_back(std::make_unique<Outcomes>());
    }
  }
  ~DecodeInstance() {
    ranks.clear();
    engines.clear();
  }
  static kvcache::DecoderOptions Defaults() {
    kvcache::DecoderOptions o;
    o.heartbeat_interval = std::chrono::milliseconds(50);
    o.peer_timeout = std::chrono::milliseconds(600);
    o.context_bytes = 256;
    return o;
  }
  // Every rank asks for request `id` into `pages`.
  void Receive(uint64_t id, const KvInstanceInfo& from, const std::vector<uint32_t>& pages) {
    for (uint32_t r = 0; r < layout.tp; ++r) {
      Outcomes* out = ready[r].get();
      Status s = ranks[r]->Receive(id, from, pages, [out](uint64_t rid, const Status& st, std::span<const uint8_t> c) {
        std::string ctx(reinterpret_cast<const char*>(c.data()), c.size());
        out->Set(rid, st, ctx.substr(0, ctx.find('\0')));
      });
      ASSERT_TRUE(s.ok()) << s.ToString();
    }
  }
  bool WaitAll(size_t n) {
    for (auto& o : ready)
      if (!o->WaitCount(n)) return false;
    return true;
  }
  // Head slots of request `id` that are wrong on any rank.
  uint64_t Wrong(uint64_t id, const std::vector<uint32_t>& pages) {
    uint64_t wrong = 0;
    for (uint32_t r = 0; r < layout.tp; ++r)
      wrong += kvcache::CountWrongKvHeads(layout, r, pages, id, memory[r].data());
    return wrong;
  }
};

}  // namespace te::testing
