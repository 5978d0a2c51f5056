// Valid inputs of every fuzz target, encoded by the code under test.
#include <cstring>
#include <string>

#include "fuzz/fuzz_targets.h"
#include "kvcache/kv_layout.h"
#include "kvcache/kv_messages.h"
#include "moe/dispatch_records.h"
#include "moe/numeric_formats.h"
#include "moe/routing_trace.h"
#include "moe/trace_generator.h"
#include "nic/verbs/verbs_wire.h"
#include "telemetry/append_list.h"
#include "telemetry/collector.h"
#include "telemetry/engine_stats_reporter.h"
#include "transfer/control_channel.h"
#include "transfer/mr_descriptor.h"
#include "weightsync/model_spec.h"

namespace te::fuzz {
namespace {

std::vector<uint8_t> Bytes(const std::string& s) { return {s.begin(), s.end()}; }

EngineAddress Address() {
  EngineAddress a;
  a.provider = "tcp;ofi_rxm";
  a.domains = {std::vector<uint8_t>(16, 0x7f), std::vector<uint8_t>(16, 0x01)};
  return a;
}

MrDescriptor Descriptor() {
  MrDescriptor d;
  d.owner = Address();
  d.length = 1 << 20;
  d.keys = {{0x1234567890abcdefull, 0x7f0000000000ull}, {42, 0}};
  return d;
}

// An engine with the same-host domain beside its NIC domains (version 2).
MrDescriptor SameHostDescriptor() {
  MrDescriptor d = Descriptor();
  d.owner.domains.push_back(std::vector<uint8_t>(32, 0x4c));
  d.owner.same_host_domains = 1;
  d.keys.push_back({0x0000abcd00000007ull, 0x7f1000000000ull});
  return d;
}

kvcache::KvLayout Layout(const char* preset, uint32_t pages) {
  kvcache::KvLayout l = kvcache::KvLayout::Preset(preset).value();
  l.pages = pages;
  return l;
}

}  // namespace

std::vector<std::vector<uint8_t>> BuiltinSeeds(const std::string& target) {
  if (target == "descriptor")
    return {Descriptor().Serialize(), Address().Serialize(), Bytes(Descriptor().ToHex()),
            SameHostDescriptor().Serialize(), SameHostDescriptor().owner.Serialize()};
  if (target == "control_frame") {
    const auto addr = Address().Serialize();
    return {EncodeControlFrame(addr, Bytes("tekv1 PULL ...")), EncodeControlFrame(addr, {}),
            EncodeControlFrame({}, Bytes("no sender"))};
  }
  if (target == "kv_message") {
    kvcache::KvMessage pull;
    pull.kind = kvcache::KvMessage::Kind::kPull;
    pull.request = 7;
    pull.imm = 0x4b000001;
    pull.context_bytes = 64;
    pull.layout = Layout("llama70b", 64);
    pull.source_layout = Layout("llama70b", 64);
    pull.descriptor_hex = Descriptor().ToHex();
    pull.pages = {1, 2, 3, 60};
    kvcache::KvMessage failed;
    failed.kind = kvcache::KvMessage::Kind::kFailed;
    failed.delivered = 3;
    failed.reason = "prefill rank died";
    kvcache::KvMessage cancelled;
    cancelled.kind = kvcache::KvMessage::Kind::kCancelled;
    kvcache::KvMessage empty = pull;  // no pages: a count of 2^62 carries 0 bytes too
    empty.pages.clear();
    return {pull.Encode(), empty.Encode(), failed.Encode(), cancelled.Encode(), kvcache::KvMessage{}.Encode()};
  }
  if (target == "kv_layout")
    return {Bytes(Layout("llama70b", 128).Serialize()), Bytes(Layout("deepseek", 9).Serialize())};
  if (target == "kv_instance") {
    kvcache::KvInstanceInfo i;
    i.role = "prefill";
    i.name = "p0";
    i.layout = Layout("deepseek", 16);
    i.ranks = {Address()};
    return {Bytes(i.Serialize())};
  }
  if (target == "collector_info") {
    telemetry::CollectorInfo c;
    c.store = {4096, 16, 4, 99};
    c.lists = {2, 2, 64, 32};
    std::vector<std::vector<uint8_t>> out = {Bytes(c.Serialize())};
    c.region = Descriptor();
    c.region.length = c.region_bytes();
    out.push_back(Bytes(c.Serialize()));
    return out;
  }
  if (target == "engine_sample") {
    telemetry::EngineSample s;
    s.stats.requests_done = 5;
    s.stats.domains.resize(2);
    s.stats.peers.resize(1);
    return {telemetry::EncodeEngineSample(s)};
  }
  if (target == "receiver_info") {
    const std::string hex = Descriptor().ToHex();
    return {Bytes("tews1 3 524288 " + hex),
            Bytes("tews2 1 2 3 0 0 4096 " + hex + " 1 0 4096 " + hex + " 0 8192 64 " + hex),
            Bytes("tews2 0 1 1 0 64 128 " + hex)};
  }
  if (target == "model_json")
    return {Bytes(weightsync::ModelToJson(weightsync::ModelPreset("tiny", 0).value())),
            Bytes(R"({"params": [{"name": "w", "dtype": "bf16", "shape": [128, 64]}]})")};
  if (target == "routing_trace") {
    moe::TraceOptions o;
    o.tokens = 4;
    o.layers = 3;
    o.topk = 2;
    o.experts = 8;
    std::vector<std::vector<uint8_t>> seeds = {moe::SerializeTrace(moe::GenerateTrace(o).value())};
    o.model = moe::TraceModel::kCoactivationGroups;
    o.group_size = 4;
    seeds.push_back(moe::SerializeTrace(moe::GenerateTrace(o).value()));
    return seeds;
  }
  if (target == "moe_records") {  // a payload byte, then records PackRecords wrote
    std::vector<std::vector<uint8_t>> seeds;
    for (bool fp8 : {false, true}) {
      const moe::EpConfig c = MoeRecordShape(fp8);
      const moe::ExpertMap map = moe::ExpertMap::Contiguous(c.experts, c.ranks).value();
      const uint32_t T = 3;
      std::vector<uint8_t> data(T * c.token_bytes(), 0x3c);
      std::vector<float> scales(T * c.scale_count(), 0.5f), weights(T * c.topk, 0.25f);
      const std::vector<int32_t> idx{4, 5, -1, 7, 0, 6, 5, -1, -1};  // rank 1 holds experts 4 .. 7
      moe::SendPlan plan;
      moe::DispatchHandle h;
      std::vector<uint8_t> staging(T * c.ranks * moe::RecordBytes(c));
      const moe::TokenBatch b{T, data.data(), fp8 ? scales.data() : nullptr, idx.data(), weights.data()};
      moe::PackRecords(c, map, b, staging.data(), &plan, &h);
      std::vector<uint8_t> seed{uint8_t(fp8)};
      const size_t rec = moe::RecordBytes(c);
      seed.insert(seed.end(), staging.begin() + plan.rank_offset[1] * rec, staging.begin() + plan.rank_offset[2] * rec);
      seeds.push_back(seed);
    }
    return seeds;
  }
  if (target == "moe_merge") {  // 3 ranks, rank 1; rows from ranks 0 and 2 for token 5 of rank 0
    std::vector<uint8_t> seed{3, 1};
    for (uint8_t sender : {0, 2}) {
      seed.push_back(sender);
      for (int k = 0; k < 8; ++k) {
        const uint16_t v = moe::FloatToBf16(0.5f * (k + sender));
        seed.push_back(uint8_t(v)), seed.push_back(uint8_t(v >> 8));
      }
      for (uint32_t word : {0u, 5u})
        for (int i = 0; i < 4; ++i) seed.push_back(uint8_t(word >> (8 * i)));
    }
    return {seed};
  }
  if (target == "placement_csv") {
    std::string csv = "layer,expert,rank\n";
    for (uint32_t l = 0; l < 2; ++l)
      for (uint32_t e = 0; e < 8; ++e)
        csv += std::to_string(l) + "," + std::to_string(e) + "," + std::to_string(e % 4) + "\n";
    // The second with replicas, the third with a token split and reached-node
    // choice on layer 1, the fourth with reached-rank choice on layer 0.
    return {Bytes(csv), Bytes(csv + "0,3,0\n1,5,2\n1,5,3\n"), Bytes(csv + "1,5,2\n1,5,1,0,30000\n1,1\n"),
            Bytes(csv + "0,3,0\n0,3,2\n0,6,1\n0,2\n")};
  }
  if (target == "telemetry_ring") {
    // Geometry byte 0x2c: 1 list, 1 ring, 4 records of 16 bytes; cursor 3;
    // records 2 .. 6 written in order, so the ring lapped the reader once.
    telemetry::ListGeometry g{1, 1, 4, 16};
    std::vector<uint8_t> seed = {0x2c, 3, 0, 0, 0, 0, 0, 0, 0};
    std::vector<uint8_t> region(g.region_bytes(), 0);
    for (uint64_t seq = 2; seq <= 6; ++seq) {
      std::vector<uint8_t> rec;
      const std::vector<uint8_t> payload(1 + seq % 16, uint8_t(2 * seq + 1));  // odd first byte: CRC kept
      (void)telemetry::EncodeRecord(g, seq, payload, &rec);
      std::memcpy(region.data() + g.RecordOffset(0, 0, seq), rec.data(), rec.size());
    }
    seed.insert(seed.end(), region.begin(), region.end());
    return {seed};
  }
  if (target == "verbs_wire") {
    namespace vi = nic::verbs_internal;
    vi::WireAddress a;
    a.lid = 7;
    a.ud_qpn = 0x1234;
    a.gid[10] = a.gid[11] = 0xff, a.gid[12] = 10, a.gid[15] = 2;
    vi::Handshake h;
    h.type = vi::kHandshakeConnect;
    h.rc_qpn = 99;
    h.from = a.Serialize();
    return {a.Serialize(), h.Serialize()};
  }
  if (target == "weightsync_control")
    return {Bytes("tews1 BEGIN 3 1200 1"), Bytes("tews1 READY 3 0"), Bytes("tews1 REFUSED 3 1 4")};
  if (target == "moe_peer_info") {
    std::vector<std::vector<uint8_t>> seeds;
    for (uint8_t r = 0; r < 4; ++r) {
      std::vector<uint8_t> s = {r};
      const std::string info = MoePeerInfoOfRank(r);
      s.insert(s.end(), info.begin(), info.end());
      seeds.push_back(std::move(s));
    }
    return seeds;
  }
  if (target == "cpu_list") return {Bytes("0-3,8,10-11"), Bytes("0\n"), Bytes("")};
  return {};
}

}  // namespace te::fuzz
