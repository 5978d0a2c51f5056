// Fuzz targets: every parser of bytes that come from a peer or a file.
//
// A target takes arbitrary bytes and must return: an error for bad input,
// never an exception, an abort, a hang or a huge allocation. What it
// accepts it must also be able to use (sizes computed, re-encoded), so an
// overflow the parser let through shows up here under ASan/UBSan.
#include "fuzz/fuzz_targets.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstring>
#include <string>

#include "base/checked_math.h"
#include "base/crc32c.h"
#include "kvcache/kv_layout.h"
#include "kvcache/kv_messages.h"
#include "moe/coherent_dispatcher.h"
#include "moe/dispatch_cost.h"
#include "moe/dispatch_records.h"
#include "moe/peer_info.h"
#include "moe/placement.h"
#include "moe/placement_file.h"
#include "moe/placement_solver.h"
#include "moe/routing_trace.h"
#include "nic/topology/topology.h"
#include "nic/verbs/verbs_wire.h"
#include "telemetry/append_list.h"
#include "telemetry/collector.h"
#include "telemetry/engine_stats_reporter.h"
#include "transfer/control_channel.h"
#include "transfer/mr_descriptor.h"
#include "weightsync/control_messages.h"
#include "weightsync/fp8_conversion.h"
#include "weightsync/model_spec.h"
#include "weightsync/receiver_info.h"
#include "weightsync/schedule.h"
#include "weightsync/shard_layout.h"

namespace te::fuzz {
namespace {

std::string Text(std::span<const uint8_t> b) { return std::string(b.begin(), b.end()); }

// A failed expectation in a target is a finding: abort so the driver (and
// libFuzzer, if built) report the input.
void Expect(bool ok, const char* what) {
  if (!ok) {
    fprintf(stderr, "fuzz target invariant broken: %s\n", what);
    abort();
  }
}

void Descriptor(std::span<const uint8_t> b) {
  auto d = MrDescriptor::Deserialize(b);
  if (d.ok()) {
    Expect(d->Validate().ok(), "an accepted descriptor validates");
    Expect(MrDescriptor::Deserialize(d->Serialize()).ok(), "an accepted descriptor re-encodes");
  }
  auto a = EngineAddress::Deserialize(b);
  if (a.ok()) Expect(a->Validate().ok(), "an accepted address validates");
  (void)MrDescriptor::FromHex(Text(b));
}

void ControlFrameTarget(std::span<const uint8_t> b) {
  auto f = DecodeControlFrame(b);
  if (!f.ok()) return;
  Expect(f->from.Validate().ok(), "an accepted frame's sender address validates");
  Expect(f->payload.data() >= b.data() && f->payload.data() + f->payload.size() == b.data() + b.size(),
         "a frame's payload lies inside the frame");
  auto again = EncodeControlFrame(f->from.Serialize(), f->payload);
  Expect(DecodeControlFrame(again).ok(), "an accepted frame re-encodes");
}

void KvMessageTarget(std::span<const uint8_t> b) {
  auto m = kvcache::KvMessage::Decode(b);
  if (!m.ok()) return;
  auto again = kvcache::KvMessage::Decode(m->Encode());
  Expect(again.ok(), "an accepted KV message re-encodes");
  Expect(again->pages == m->pages, "KV message pages survive a round trip");
}

void KvLayoutTarget(std::span<const uint8_t> b) {
  auto l = kvcache::KvLayout::Parse(Text(b));
  if (!l.ok()) return;
  Expect(l->region_bytes() > 0 && l->region_bytes() <= kMaxRegionBytes, "an accepted layout has a sane size");
  Expect(l->page_bytes() > 0, "an accepted layout has pages");
}

void KvInstanceTarget(std::span<const uint8_t> b) {
  auto i = kvcache::KvInstanceInfo::Parse(Text(b));
  if (i.ok()) Expect(i->ranks.size() == i->layout.tp, "an accepted instance lists tp ranks");
}

void CollectorInfoTarget(std::span<const uint8_t> b) {
  auto c = telemetry::CollectorInfo::Parse(Text(b));
  if (!c.ok()) return;
  Expect(c->region_bytes() > 0 && c->region_bytes() <= 2 * kMaxRegionBytes + 64,
         "an accepted collector geometry has a sane size");
}

void EngineSampleTarget(std::span<const uint8_t> b) { (void)telemetry::DecodeEngineSample(b); }

void ModelJsonTarget(std::span<const uint8_t> b) {
  auto m = weightsync::ParseModelJson(Text(b));
  if (!m.ok()) return;
  Expect(m->bytes() <= weightsync::kMaxModelBytes, "an accepted model has a bounded size");
  // What te-weightsync schedule does next: an accepted model must plan in
  // bounded time and memory, or be refused.
  auto src = weightsync::ShardLayout::Named(m.value(), 2, "fsdp");
  auto dst = weightsync::ShardLayout::Named(m.value(), 3, "tp");
  if (src.ok() && dst.ok()) {
    weightsync::ScheduleOptions so;
    so.max_transfer_bytes = 1 << 20;
    // The default bound (2^26 pieces, about a second in a release build)
    // takes minutes under ASan, past the fuzzer's per-input timeout (a
    // 4 TB parameter cut into 1 MiB pieces took 7.6 s): the same refusal
    // at a lower bound. The walk is linear in the pieces either way.
    so.max_pieces = uint64_t(1) << 20;
    (void)weightsync::Schedule::Build(src.value(), dst.value(), so);
    // And to receivers that take its bf16 matrices as fp8.
    auto fp8 = weightsync::Fp8Model(m.value());
    if (fp8.ok()) {
      auto fdst = weightsync::ShardLayout::Named(fp8.value(), 3, "tp");
      if (fdst.ok()) (void)weightsync::Schedule::Build(src.value(), fdst.value(), so);
    }
  }
}

void ReceiverInfoTarget(std::span<const uint8_t> b) {
  auto info = weightsync::ParseReceiverInfo(Text(b));
  if (!info.ok()) return;
  Expect(info->slots == 1 || info->slots == 2, "an accepted info has 1 or 2 slots");
  for (size_t i = 0; i < info->extents.size(); ++i) {
    const auto& e = info->extents[i];
    Expect(e.slot < info->slots && e.length > 0 && e.length <= e.memory.length,
           "an accepted extent is in a slot and fits its registration");
    Expect(e.offset + e.length >= e.offset, "an accepted extent does not wrap");
    if (i > 0 && info->extents[i - 1].slot == e.slot)
      Expect(info->extents[i - 1].offset + info->extents[i - 1].length <= e.offset, "accepted extents do not overlap");
  }
}

void TraceTarget(std::span<const uint8_t> b) {
  auto t = moe::ParseTrace(std::vector<uint8_t>(b.begin(), b.end()));
  if (!t.ok()) return;
  // What te-moe place does next (tables kept small here for throughput;
  // CheckSize's own limit is a unit test).
  if (moe::ExpertAffinity::CheckSize(t->layers, t->experts).ok() &&
      uint64_t(t->layers) * t->experts * t->experts <= (uint64_t(1) << 22))
    (void)moe::ExpertAffinity::FromTrace(t.value());
  // Small traces: the solver and the record count (te-moe place's next steps).
  if (t->tokens <= 64 && t->layers <= 4 && t->experts <= 64 && t->experts % 2 == 0) {
    moe::PlacementOptions o;
    o.extra_slots = 1;
    auto p = moe::PlaceExperts(t.value(), 2, o);
    Expect(p.ok(), "the solver places any valid trace with an even expert count on 2 ranks");
    Expect(p->Validate(1).ok(), "the solver's placement validates");
    auto c = moe::CountRecords(t.value(), p.value(), {1, moe::TokenHome::kTop1, true});
    Expect(c.ok(), "records of a valid placement count");
  }
}

// A placement CSV for 2 layers x 8 experts x 4 ranks (2 nodes).
void PlacementCsvTarget(std::span<const uint8_t> b) {
  auto p = moe::ParsePlacementCsv(Text(b), 2, 8, 4);
  if (!p.ok()) return;
  for (uint32_t l = 0; l < 2; ++l) {
    auto m = p->Map(l, 2);
    Expect(m.ok(), "every layer of an accepted placement is a valid expert map");
    if (!m.ok()) continue;
    // Token splits included, every token goes to a rank holding its expert.
    for (uint32_t e = 0; e < 8; ++e)
      for (uint32_t s = 0; s < 4; ++s)
        for (uint32_t key : {0u, 1u, 32768u, moe::ExpertMap::kKeySpace - 1}) {
          const auto& on = m->ranks_of(e);
          Expect(std::find(on.begin(), on.end(), m->RankFor(e, s, key)) != on.end(),
                 "a token goes to a copy of its expert");
        }
    // Whole rows (replica choice included): every slot to a copy of its
    // expert, an empty slot nowhere.
    for (uint32_t s = 0; s < 4; ++s)
      for (uint32_t first = 0; first < 8; ++first) {
        const int32_t row[4] = {int32_t(first), int32_t((first + 3) % 8), -1, int32_t((first * 5 + s) % 8)};
        uint32_t dest[4];
        m->Route(row, 4, s, moe::ExpertMap::TokenKey(row, 4), dest);
        for (uint32_t k = 0; k < 4; ++k) {
          if (row[k] < 0) {
            Expect(dest[k] == moe::ExpertMap::kNoRank, "an empty slot goes nowhere");
            continue;
          }
          const auto& on = m->ranks_of(uint32_t(row[k]));
          Expect(std::find(on.begin(), on.end(), dest[k]) != on.end(), "a routed slot goes to a copy of its expert");
          if (on.size() < 2 || std::find(on.begin(), on.end(), dest[k]) == on.end()) continue;
          // A relay on that node, seeing its part of the row, names the same copy.
          uint32_t seen[5], n = 0;
          if (s / 2 == dest[k] / 2) seen[n++] = s;
          for (uint32_t j = 0; j < 4; ++j)
            if (row[j] >= 0 && dest[j] / 2 == dest[k] / 2 && m->ranks_of(uint32_t(row[j])).size() == 1)
              seen[n++] = dest[j];
          Expect(m->RankOnNode(uint32_t(row[k]), s, moe::ExpertMap::TokenKey(row, 4), dest[k] / 2, seen, n) == dest[k],
                 "a relay routes a slot where its source did");
        }
      }
  }
}

// Token records as a dispatch receives them from a peer: byte 0 picks the
// payload, the rest is whole records of MoeRecordShape.
void MoeRecordsTarget(std::span<const uint8_t> b) {
  if (b.empty()) return;
  const moe::EpConfig c = MoeRecordShape(b[0] & 1);
  const moe::ExpertMap map = moe::ExpertMap::Contiguous(c.experts, c.ranks).value();
  const size_t rec = moe::RecordBytes(c), n = (b.size() - 1) / rec;
  std::vector<uint8_t> records(b.begin() + 1, b.begin() + 1 + n * rec);  // aligned, as the receive region is
  moe::DispatchResult out;
  moe::ResetResult(c, map, &out);
  if (!moe::UnpackRecords(c, 1, records.data(), uint32_t(n), &out).ok()) return;
  const moe::DispatchHandle& h = out.handle;
  Expect(h.row_begin.size() == n + 1 && h.recv_from[1] == n, "every accepted record is a row");
  size_t entries = 0;
  for (const auto& x : out.experts) {
    entries += x.count;
    Expect(x.data.size() == x.count * c.token_bytes() && x.weights.size() == x.count, "rows hold whole tokens");
    Expect(x.scales.size() == x.count * c.scale_count(), "fp8 rows carry their scales");
  }
  Expect(entries == h.entries.size(), "every entry names a local expert's row");
}

// Merge rows as a coherent combine receives them: byte 0 the group size,
// byte 1 this rank; then per row a sender byte and the row's bytes.
void MoeMergeTarget(std::span<const uint8_t> b) {
  if (b.size() < 2) return;
  constexpr uint32_t kHidden = 8;
  const uint32_t ranks = 1 + b[0] % 4, self = b[1] % ranks;
  const size_t row_bytes = (kHidden + 4) * 2, n = (b.size() - 2) / (1 + row_bytes);
  std::vector<uint16_t> rows(n * (kHidden + 4));
  std::vector<const uint16_t*> row_at;
  std::vector<uint32_t> senders;
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* at = b.data() + 2 + i * (1 + row_bytes);
    senders.push_back(at[0] % ranks);
    std::memcpy(&rows[i * (kHidden + 4)], at + 1, row_bytes);
    row_at.push_back(&rows[i * (kHidden + 4)]);
  }
  moe::MergedTokens merged;
  if (!moe::MergePartials(ranks, self, kHidden, row_at, senders, {7}, &merged).ok()) return;
  Expect(merged.ids.size() == merged.count && merged.from_rank.size() == merged.count, "one key per merged token");
  Expect(merged.data.size() == size_t(merged.count) * kHidden, "one output row per merged token");
  Expect(merged.count <= n + 1, "no more tokens than rows and stayers");
  for (uint32_t k = 0; k < merged.count; ++k) {
    Expect(merged.from_rank[k] < ranks, "merged tokens come from ranks of the group");
    if (k > 0)
      Expect(std::make_pair(merged.from_rank[k - 1], merged.ids[k - 1]) <
                 std::make_pair(merged.from_rank[k], merged.ids[k]),
             "merged tokens in (rank, id) order, once each");
  }
}

// A collector's append lists as reporters (peers) left them: byte 0 picks a
// small geometry, bytes 1..8 the reader's cursor, the rest fills the
// lists region (zero beyond). Slots whose length fits get their CRC fixed
// when their payload's first byte is odd, so mutants reach the lap and
// restart logic behind the CRC check.
void TelemetryRingTarget(std::span<const uint8_t> b) {
  if (b.size() < 9) return;
  telemetry::ListGeometry g;
  g.lists = 1 + (b[0] & 1);
  g.rings = 1 + ((b[0] >> 1) & 1);
  g.ring_records = 1 + ((b[0] >> 2) & 7);
  g.record_bytes = 8 * (1 + ((b[0] >> 5) & 7));
  uint64_t start = 0;
  std::memcpy(&start, b.data() + 1, 8);
  std::vector<uint8_t> region(g.region_bytes(), 0);
  std::memcpy(region.data(), b.data() + 9, std::min(region.size(), b.size() - 9));
  for (size_t slot = 0; slot + g.record_slot_bytes() <= region.size(); slot += g.record_slot_bytes()) {
    uint8_t* r = region.data() + slot;
    uint64_t tag;
    uint32_t len;
    std::memcpy(&tag, r, 8);
    std::memcpy(&len, r + 12, 4);
    if (tag == 0 || len > g.record_bytes || len == 0 || (r[16] & 1) == 0) continue;
    std::vector<uint8_t> good;
    Expect(telemetry::EncodeRecord(g, tag - 1, std::span(r + 16, len), &good).ok(), "a fitting record encodes");
    std::memcpy(r + 8, good.data() + 8, 4);  // its CRC
  }
  for (uint32_t list = 0; list < g.lists; ++list)
    for (uint32_t ring = 0; ring < g.rings; ++ring) {
      uint64_t cursor = start;
      auto read = telemetry::ReadRing(g, region, list, ring, &cursor);
      Expect(read.ok(), "a valid geometry over a whole region reads");
      Expect(read->records.size() <= uint64_t(g.ring_records) + 1, "one read returns at most a ring and a restart");
      for (const auto& rec : read->records) Expect(rec.size() <= g.record_bytes, "records fit record_bytes");
      Expect(cursor >= start && cursor - start == read->lost + read->records.size(),
             "the cursor moves by exactly the records read and lost");
    }
  // Out of range rings and short regions are refused, not read.
  uint64_t cursor = start;
  Expect(!telemetry::ReadRing(g, region, g.lists, 0, &cursor).ok(), "a list beyond the geometry is refused");
  Expect(!telemetry::ReadRing(g, std::span(region).first(region.size() - 1), 0, 0, &cursor).ok(),
         "a region shorter than the geometry is refused");
}

// What native verbs domains receive from peers: a wire address (address
// exchange) or a CONNECT / ACCEPT handshake carrying one (over UD).
void VerbsWireTarget(std::span<const uint8_t> b) {
  namespace vi = nic::verbs_internal;
  if (auto a = vi::WireAddress::Parse(b); a.ok()) {
    Expect(a->Serialize() == std::vector<uint8_t>(b.begin(), b.end()), "an accepted address re-encodes to itself");
    (void)a->Name();
  }
  vi::Handshake h;
  if (vi::Handshake::Parse(b, &h)) {
    Expect(h.type == vi::kHandshakeConnect || h.type == vi::kHandshakeAccept, "an accepted handshake has a known type");
    Expect(h.from.size() == b.size() - vi::kHandshakeHeaderBytes, "the sender's address is the rest of the message");
    vi::Handshake again;
    Expect(vi::Handshake::Parse(h.Serialize(), &again) && again.from == h.from, "an accepted handshake re-encodes");
  }
}

// A CPU list as sysfs files hold them (local_cpulist): "0-3,8,10-11".
void CpuListTarget(std::span<const uint8_t> b) {
  auto cpus = nic::ParseCpuList(Text(b));
  if (!cpus.ok()) return;
  Expect(cpus->size() <= (size_t(1) << 20), "an accepted list names at most 2^20 cpus");
  for (int c : *cpus) Expect(c >= 0 && c <= (1 << 20), "accepted CPUs are in 0 .. 2^20");
}

// The weight-sync control lines a receiver (BEGIN) or a source (READY,
// REFUSED) gets from its peers.
void WeightSyncControlTarget(std::span<const uint8_t> b) {
  if (auto m = weightsync::ParseBegin(b); m.ok()) {
    Expect(m->version >= 1 && m->source < weightsync::kMaxWireRank, "an accepted BEGIN is in range");
    const std::string again = weightsync::EncodeBegin(*m);
    auto m2 = weightsync::ParseBegin(std::span(reinterpret_cast<const uint8_t*>(again.data()), again.size()));
    Expect(m2.ok() && m2->version == m->version && m2->writes == m->writes && m2->source == m->source,
           "an accepted BEGIN re-encodes");
  }
  if (auto a = weightsync::ParseAnswer(b); a.ok()) {
    Expect(a->version >= 1 && a->rank < weightsync::kMaxWireRank, "an accepted answer is in range");
    const std::string again = weightsync::EncodeAnswer(*a);
    auto a2 = weightsync::ParseAnswer(std::span(reinterpret_cast<const uint8_t*>(again.data()), again.size()));
    Expect(a2.ok() && a2->ready == a->ready && a2->version == a->version && a2->rank == a->rank &&
               a2->published == a->published,
           "an accepted answer re-encodes");
  }
}

// A dispatcher's Connect reads every peer's info: the first byte picks the
// rank the info claims to be, the rest is the info, checked against a
// 4-rank group's own.
void MoePeerInfoTarget(std::span<const uint8_t> b) {
  if (b.empty()) return;
  const uint32_t r = b[0] % 4;
  const std::string info = Text(b.subspan(1));
  const std::string mine = MoePeerInfoOfRank(0);
  auto hex = moe::MatchPeerInfo(info, mine, r, "ranks rank experts topk hidden max_tokens payload imm_base bytes");
  if (!hex.ok()) return;
  // Accepted: ours but for the rank (exactly r) and the last field.
  std::vector<std::string> words, own;
  for (const auto* pair : {&info, &mine}) {
    auto& out = pair == &info ? words : own;
    size_t i = 0;
    while (i < pair->size()) {
      while (i < pair->size() && std::isspace(static_cast<unsigned char>((*pair)[i]))) ++i;
      size_t j = i;
      while (j < pair->size() && !std::isspace(static_cast<unsigned char>((*pair)[j]))) ++j;
      if (j > i) out.push_back(pair->substr(i, j - i));
      i = j;
    }
  }
  Expect(words.size() == own.size(), "an accepted info has our number of fields");
  Expect(words[2] == std::to_string(r), "an accepted info names exactly its rank");
  Expect(*hex == words.back(), "the descriptor is the last field");
  for (size_t i = 0; i + 1 < own.size(); ++i) Expect(i == 2 || words[i] == own[i], "an accepted info has our shape");
}

}  // namespace

moe::EpConfig MoeRecordShape(bool fp8) {
  moe::EpConfig c;
  c.ranks = 2;
  c.experts = 8;
  c.topk = 3;
  c.hidden = 128;
  c.max_tokens = 16;
  c.payload = fp8 ? moe::Payload::kFp8E4M3 : moe::Payload::kBf16;
  return c;
}

std::string MoePeerInfoOfRank(uint32_t r) {
  return "temoell1 4 " + std::to_string(r) + " 64 8 2048 128 bf16 1296367616 8650752 0a1b2c3d";
}

const std::vector<Target>& Targets() {
  static const std::vector<Target> kTargets = {
      {"descriptor", Descriptor, Crc::kTrailingCrc32c},
      {"kv_message", KvMessageTarget, Crc::kNone},
      {"kv_layout", KvLayoutTarget, Crc::kNone},
      {"kv_instance", KvInstanceTarget, Crc::kNone},
      {"collector_info", CollectorInfoTarget, Crc::kNone},
      {"engine_sample", EngineSampleTarget, Crc::kNone},
      {"model_json", ModelJsonTarget, Crc::kNone},
      {"routing_trace", TraceTarget, Crc::kTrailingCrc32c},
      {"control_frame", ControlFrameTarget, Crc::kNone},
      {"receiver_info", ReceiverInfoTarget, Crc::kNone},
      {"placement_csv", PlacementCsvTarget, Crc::kNone},
      {"moe_records", MoeRecordsTarget, Crc::kNone},
      {"moe_merge", MoeMergeTarget, Crc::kNone},
      {"moe_peer_info", MoePeerInfoTarget, Crc::kNone},
      {"telemetry_ring", TelemetryRingTarget, Crc::kNone},
      {"verbs_wire", VerbsWireTarget, Crc::kNone},
      {"cpu_list", CpuListTarget, Crc::kNone},
      {"weightsync_control", WeightSyncControlTarget, Crc::kNone},
  };
  return kTargets;
}

void FixTrailingCrc(std::vector<uint8_t>* bytes) {
  if (bytes->size() < 8) return;
  const uint32_t crc = Crc32c(bytes->data(), bytes->size() - 4);
  for (int i = 0; i < 4; ++i) (*bytes)[bytes->size() - 4 + i] = uint8_t(crc >> (8 * i));
}

}  // namespace te::fuzz
