#include "weightsync/weight_pusher.h"

#include <glog/logging.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "base/checked_math.h"
#include "weightsync/fp8_block_quant.h"
#include "weightsync/receiver_info.h"

namespace te::weightsync {

Result<std::unique_ptr<WeightPusher>> WeightPusher::Create(TransferEngine* engine, const Schedule& schedule,
                                                           const ShardLayout& src, uint32_t rank, const uint8_t* region,
                                                           const PusherOptions& options) {
  if (!engine || !region) return InvalidArgument("WeightPusher needs an engine and a region");
  if (rank >= src.ranks())
    return InvalidArgument("source rank " + std::to_string(rank) + " outside [0, " + std::to_string(src.ranks()) + ")");
  LocalMr mr;
  if (options.zero_copy && src.RegionBytes(rank) > 0) {
    // Registered for the NIC to read from; the pusher never writes it.
    TE_ASSIGN_OR_RETURN(mr, engine->RegisterMemory(const_cast<uint8_t*>(region), src.RegionBytes(rank)));
  }
  std::vector<SourceShard> shards(src.model().params.size());
  for (size_t q = 0; q < shards.size(); ++q)
    shards[q] = {region + src.ParamOffset(q, rank), mr, src.ParamOffset(q, rank)};
  return Make(engine, schedule, src, rank, std::move(shards), options);
}

Result<std::unique_ptr<WeightPusher>> WeightPusher::CreateNamed(TransferEngine* engine, const Schedule& schedule,
                                                                const ShardLayout& src, uint32_t rank,
                                                                const TensorMap& tensors,
                                                                const PusherOptions& options) {
  if (!engine) return InvalidArgument("WeightPusher needs an engine");
  TE_RETURN_IF_ERROR(CheckTensorMap(src, rank, tensors));
  std::vector<SourceShard> shards(src.model().params.size());
  for (size_t q = 0; q < shards.size(); ++q) {
    const std::string& name = src.model().params[q].name;
    auto it = tensors.find(name);
    if (it == tensors.end()) continue;  // an empty shard
    const NamedTensor& t = it->second;
    // Strided pieces are gathered and fp8 is quantized by the CPU.
    if (t.memory.kind.type != nic::MemoryKind::Type::kHost)
      return InvalidArgument("source tensor '" + name + "' is not host memory; sources read their shards on the CPU");
    LocalMr mr;
    if (options.zero_copy) {
      auto r = engine->RegisterMemory(t.data, t.bytes);
      if (!r.ok()) return r.status().WithContext("registering tensor '" + name + "'");
      mr = std::move(*r);
    }
    shards[q] = {static_cast<const uint8_t*>(t.data), std::move(mr), 0};
  }
  return Make(engine, schedule, src, rank, std::move(shards), options);
}

Result<std::unique_ptr<WeightPusher>> WeightPusher::Make(TransferEngine* engine, const Schedule& schedule,
                                                         const ShardLayout& src, uint32_t rank,
                                                         std::vector<SourceShard> shards,
                                                         const PusherOptions& options) {
  if (options.bucket_bytes == 0 || options.staging_bytes < options.bucket_bytes)
    return InvalidArgument("staging_bytes " + std::to_string(options.staging_bytes) +
                           " must hold at least one bucket of " + std::to_string(options.bucket_bytes));
  uint32_t receivers = 0;
  for (const Transfer& t : schedule.transfers()) {
    receivers = std::max(receivers, t.dst_rank + 1);
    if (t.length > options.bucket_bytes)
      return InvalidArgument("a transfer of " + std::to_string(t.length) + " bytes exceeds bucket_bytes " +
                             std::to_string(options.bucket_bytes) + " (ScheduleOptions::max_transfer_bytes)");
  }
  // The region is laid out as `src`; the schedule's transfers read the
  // wire layout (src with fp8 parameters quantized). Copied parameters must
  // be the same bytes in both.
  const ShardLayout& wire = schedule.wire_source();
  const auto& wp = schedule.wire_params();
  if (wire.ranks() != src.ranks() || wp.size() != wire.model().params.size())
    return InvalidArgument("the source layout is not the one the schedule was built from");
  for (size_t q = 0; q < wp.size(); ++q)
    if (wp[q].source_param >= src.model().params.size() ||
        (wp[q].kind == WireParam::kCopy && src.ShardBytes(wp[q].source_param, rank) != wire.ShardBytes(q, rank)))
      return InvalidArgument("the source layout is not the one the schedule was built from (parameter " +
                             std::to_string(q) + ")");
  std::unique_ptr<WeightPusher> p(new WeightPusher(engine, schedule, src, rank, std::move(shards), options));
  p->receivers_ = receivers;
  // Quantized codes and scales of this rank's shards, written at every
  // push, read by the NIC like staging.
  uint64_t converted = 0;
  p->converted_at_.assign(wp.size(), 0);
  p->fp8_of_.assign(src.model().params.size(), {kNone, kNone});
  for (size_t q = 0; q < wp.size(); ++q) {
    if (wp[q].kind == WireParam::kCopy) continue;
    p->converted_at_[q] = converted;
    converted = (converted + wire.ShardBytes(q, rank) + 63) & ~uint64_t(63);
    auto& pair = p->fp8_of_[wp[q].source_param];
    (wp[q].kind == WireParam::kFp8Codes ? pair.first : pair.second) = uint32_t(q);
  }
  if (converted > 0) {
    TE_ASSIGN_OR_RETURN(p->converted_mr_, engine->AllocateMemory(converted));
  }
  p->landings_.resize(receivers);
  const uint64_t staging = options.staging_bytes / options.bucket_bytes * options.bucket_bytes;
  // Zeroed (its pages are faulted in here rather than in the first push),
  // and owned by the region: a write still posted after its request failed
  // keeps it alive past this pusher.
  TE_ASSIGN_OR_RETURN(p->staging_mr_, engine->AllocateMemory(staging));
  WeightPusher* self = p.get();
  // READY or REFUSED (control_messages.h), from receivers: parsed as hostile.
  TE_RETURN_IF_ERROR(
      engine->ClaimRecvHandler(self, "WeightPusher", [self](const EngineAddress&, std::span<const uint8_t> data) {
        auto answer = ParseAnswer(data);
        if (!answer.ok() || answer->rank >= self->receivers_) {
          LOG_EVERY_N(WARNING, 100) << "weightsync source " << self->rank_ << ": dropped a control message ("
                                    << google::COUNTER << " so far): "
                                    << (answer.ok() ? "answer from receiver rank " + std::to_string(answer->rank) +
                                                          " of " + std::to_string(self->receivers_)
                                                    : answer.status().ToString());
          return;
        }
        std::lock_guard<std::mutex> lock(self->mu_);
        if (answer->version != self->asking_) return;  // a late answer to an older version
        self->answers_[answer->rank] = *answer;
        self->cv_.notify_all();
      }));
  return p;
}

WeightPusher::~WeightPusher() { engine_->ReleaseRecvHandler(this); }

Status WeightPusher::SetReceiver(uint32_t rank, const std::string& info) {
  if (rank >= receivers_)
    return InvalidArgument("receiver rank " + std::to_string(rank) + " outside [0, " + std::to_string(receivers_) +
                           ")");
  if (info.empty()) {
    landings_[rank] = Landing{};
    return Status::Ok();
  }
  // Infos come from receivers through the registry: parsed as hostile.
  const std::string who = "receiver info for rank " + std::to_string(rank);
  auto parsed = ParseReceiverInfo(info);
  if (!parsed.ok()) return parsed.status().WithContext(who);
  if (parsed->rank != rank) return InvalidArgument(who + " comes from rank " + std::to_string(parsed->rank));
  Landing l;
  l.slots = parsed->slots;
  for (ReceiverExtent& e : parsed->extents) {
    TE_ASSIGN_OR_RETURN(RemoteMr mr, engine_->Import(e.memory));
    l.extents[e.slot].push_back({e.offset, e.length, std::move(mr), e.memory_offset});
  }
  landings_[rank] = std::move(l);
  return Status::Ok();
}

const WeightPusher::Extent* WeightPusher::Landing::Find(uint64_t version, uint64_t offset, uint64_t length) const {
  const auto& e = extents[version % slots];
  auto it = std::upper_bound(e.begin(), e.end(), offset, [](uint64_t o, const Extent& x) { return o < x.offset; });
  if (it == e.begin()) return nullptr;
  --it;
  return offset + length <= it->offset + it->length ? &*it : nullptr;
}

RemoteMr WeightPusher::Landing::any() const {
  for (const auto& e : extents)
    if (!e.empty()) return e.front().mr;
  return nullptr;
}

Result<PushReport> WeightPusher::Push(uint64_t version) {
  if (version == 0) return InvalidArgument("versions start at 1");
  const auto start = std::chrono::steady_clock::now();
  PushReport report;
  report.version = version;
  const uint32_t imm = options_.imm_base | uint32_t(version & 0xffff);

  // 1. BEGIN to every receiver, READY back.
  {
    std::lock_guard<std::mutex> lock(mu_);
    answers_.clear();
    asking_ = version;
  }
  std::vector<bool> live(receivers_, false);
  // One pass over this rank's transfers: the writes each receiver is told
  // to expect, and whether its memory holds every byte this version sends
  // there (a receiver whose tensors do not is missed, not written around).
  std::vector<uint64_t> writes_to(receivers_, 0);
  for (size_t k : schedule_.from(rank_)) {
    const Transfer& t = schedule_.transfers()[k];
    ++writes_to[t.dst_rank];
    const Landing& l = landings_[t.dst_rank];
    if (l.slots && !report.missed.count(t.dst_rank) && !l.Find(version, t.dst_offset, t.length))
      report.missed[t.dst_rank] = "its memory does not hold region bytes [" + std::to_string(t.dst_offset) + ", " +
                                  std::to_string(t.dst_offset + t.length) + ") of version " + std::to_string(version);
  }
  for (uint32_t d = 0; d < receivers_; ++d) {
    if (!landings_[d].slots) {
      report.missed[d] = "absent (no receiver info)";
      continue;
    }
    if (report.missed.count(d)) continue;
    const std::string msg = EncodeBegin({.version = version, .writes = writes_to[d], .source = rank_});
    std::vector<uint8_t> bytes(msg.begin(), msg.end());
    if (Status s = engine_->Send(landings_[d].any()->peer(), bytes, {}); !s.ok()) report.missed[d] = s.ToString();
  }
  {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, options_.ready_timeout, [&] {
      for (uint32_t d = 0; d < receivers_; ++d)
        if (landings_[d].slots && !report.missed.count(d) && !answers_.count(d)) return false;
      return true;
    });
    for (uint32_t d = 0; d < receivers_; ++d) {
      if (!landings_[d].slots || report.missed.count(d)) continue;
      auto a = answers_.find(d);
      if (a == answers_.end())
        report.missed[d] = "no READY within " + std::to_string(options_.ready_timeout.count()) + " ms";
      else if (!a->second.ready)
        report.missed[d] = "refused: " + EncodeAnswer(a->second);  // names the version the receiver holds
      else
        live[d] = true;
    }
  }

  // 2. Buckets through the staging ring. One counter per receiver, so a
  // failed write is charged to the receiver it went to.
  const uint64_t B = options_.bucket_bytes, ring = staging_mr_->length() / B;
  std::vector<CompletionCounter> done(receivers_);
  std::vector<uint64_t> submitted(receivers_, 0);
  std::vector<std::vector<uint64_t>> submitted_by_bucket;  // [bucket][receiver], cumulative
  auto wait_until = [&](const std::vector<uint64_t>& upto) {
    for (uint32_t d = 0; d < receivers_; ++d)
      if (!done[d].WaitFinished(upto[d], std::chrono::seconds(120))) return false;
    return true;
  };
  const auto& mine = schedule_.from(rank_);
  // A quantized parameter is quantized when its first transfer comes up, so
  // quantizing one overlaps the writes of those before it.
  std::vector<bool> done_quantizing(src_.model().params.size(), false);
  size_t i = 0;
  for (uint64_t bucket = 0; i < mine.size(); ++bucket) {
    if (bucket >= ring && !wait_until(submitted_by_bucket[bucket - ring]))  // its memory must be free
      return Timeout("push " + std::to_string(version) + ": staging not released in time");
    uint8_t* base = staging_mr_->data() + (bucket % ring) * B;
    const uint64_t base_off = (bucket % ring) * B;
    // Per receiver: writes from staging (gathered) and from the region.
    // Per receiver: writes from staging (gathered); and per (memory, receiver)
    // writes straight from a registered shard or from quantized codes.
    std::map<uint32_t, std::vector<ScatterTarget>> staged;
    std::map<std::pair<const MemoryRegion*, uint32_t>, std::pair<LocalMr, std::vector<ScatterTarget>>> direct;
    uint64_t used = 0, bytes = 0;  // staging used; bytes in this bucket
    for (; i < mine.size(); ++i) {
      const Transfer& t = schedule_.transfers()[mine[i]];
      const WireParam& w = schedule_.wire_params()[t.param];
      const bool converted = w.kind != WireParam::kCopy;
      const SourceShard& shard = shards_[w.source_param];
      const bool contiguous = (converted || shard.mr) && t.src_piece == t.length;
      if ((contiguous ? bytes : used) + t.length > B) break;  // the bucket is full
      bytes += t.length;
      if (!live[t.dst_rank]) continue;
      if (converted && !done_quantizing[w.source_param]) {
        const auto q0 = std::chrono::steady_clock::now();
        TE_RETURN_IF_ERROR(Quantize(w.source_param).WithContext("push " + std::to_string(version)));
        report.quantize_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - q0).count();
        done_quantizing[w.source_param] = true;
      }
      // Where the transfer's bytes lie: its offset within the parameter's
      // shard is the same in the wire layout and in the memory read.
      const uint64_t within = t.src_offset - schedule_.wire_source().ParamOffset(t.param, rank_);
      const uint8_t* from = converted ? converted_mr_->data() + converted_at_[t.param] + within : shard.data + within;
      const Extent* x = landings_[t.dst_rank].Find(version, t.dst_offset, t.length);  // checked at BEGIN
      const uint64_t dst = x->mr_offset + (t.dst_offset - x->offset);
      if (contiguous) {
        const LocalMr& mr = converted ? converted_mr_ : shard.mr;
        const uint64_t at = converted ? converted_at_[t.param] + within : shard.mr_offset + within;
        auto& [keep, list] = direct[{mr.get(), t.dst_rank}];
        keep = mr;
        list.push_back({x->mr, at, dst, t.length});
        continue;
      }
      for (uint64_t k = 0; k < t.length / t.src_piece; ++k)  // the gather
        std::memcpy(base + used + k * t.src_piece, from + k * t.src_stride, t.src_piece);
      staged[t.dst_rank].push_back({x->mr, base_off + used, dst, t.length});
      used += t.length;
    }
    auto submit = [&](uint32_t d, const LocalMr& from, std::vector<ScatterTarget>& list) {
      if (!live[d]) return;
      report.writes += list.size();
      if (Status s = engine_->Submit(ScatterWrite{from, std::move(list), imm}, {.counter = &done[d]}); !s.ok()) {
        report.missed[d] = s.ToString();
        live[d] = false;
        return;
      }
      ++submitted[d];
    };
    for (auto& [d, list] : staged) submit(d, staging_mr_, list);
    for (auto& [key, v] : direct) submit(key.second, v.first, v.second);
    submitted_by_bucket.push_back(submitted);
  }
  if (!wait_until(submitted)) return Timeout("push " + std::to_string(version) + ": writes did not finish");
  for (uint32_t d = 0; d < receivers_; ++d)
    if (live[d] && done[d].failed() > 0) report.missed[d] = done[d].first_error().ToString();
  for (size_t k : mine) {
    const Transfer& t = schedule_.transfers()[k];
    if (live[t.dst_rank] && !report.missed.count(t.dst_rank)) report.bytes += t.length;
  }
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

Status WeightPusher::Quantize(uint32_t param) {
  const auto [codes, scales] = fp8_of_[param];
  const Box b = src_.ShardBox(param, rank_);
  if (b.empty()) return Status::Ok();
  const std::vector<uint64_t> extent = b.extents();
  TE_ASSIGN_OR_RETURN(Fp8BlockShape shape, Fp8ShapeOf(extent.data(), extent.size()));
  // The shard starts on a block boundary (PlanFp8Conversion), so its blocks
  // are the tensor's and its scales are the tensor's scales of those blocks.
  return QuantizeBf16ToFp8Blocks(reinterpret_cast<const uint16_t*>(shards_[param].data), shape,
                                 converted_mr_->data() + converted_at_[codes],
                                 reinterpret_cast<float*>(converted_mr_->data() + converted_at_[scales]));
}

}  // namespace te::weightsync
