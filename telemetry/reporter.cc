#include "telemetry/reporter.h"

#include <cstring>

#include "base/checked_math.h"

namespace te::telemetry {

Result<std::unique_ptr<Reporter>> Reporter::Create(TransferEngine* engine, const CollectorInfo& info,
                                                   const ReporterOptions& options) {
  TE_RETURN_IF_ERROR(info.Validate());
  if (info.region.length == 0) return InvalidArgument("collector info carries no region descriptor");
  if (options.ring >= info.lists.rings)
    return OutOfRange("reporter ring " + std::to_string(options.ring) + " outside the " +
                      std::to_string(info.lists.rings) + " rings per list");
  if (options.writes_per_batch == 0 || options.batches_in_flight == 0)
    return InvalidArgument("writes_per_batch and batches_in_flight must be > 0");
  std::unique_ptr<Reporter> r(new Reporter());
  r->engine_ = engine;
  r->info_ = info;
  r->options_ = options;
  TE_ASSIGN_OR_RETURN(r->dst_, engine->Import(info.region));
  r->write_bytes_ = std::max(info.store.slot_bytes(), info.lists.record_slot_bytes());
  // Owned by the region: a write still posted after its batch failed keeps
  // it alive past this reporter.
  TE_ASSIGN_OR_RETURN(
      const uint64_t staging,
      CheckedProduct("reporter staging (batches_in_flight x writes_per_batch x slot bytes)",
                     {options.batches_in_flight, options.writes_per_batch, r->write_bytes_}, kMaxRegionBytes));
  TE_ASSIGN_OR_RETURN(r->staging_mr_, engine->AllocateMemory(staging));
  for (size_t i = 0; i < options.batches_in_flight; ++i)
    r->slice_done_.push_back(std::make_unique<CompletionCounter>());
  r->slice_submitted_.assign(options.batches_in_flight, 0);
  r->next_seq_.assign(info.lists.lists, 0);
  r->batch_.src = r->staging_mr_;
  return r;
}

Reporter::~Reporter() {
  (void)Drain();
  // The engine counts each batch's end into its slice's counter. Drain
  // waits options_.timeout, which may be shorter than the engine takes to
  // end a batch to an unreachable collector (2 x request_timeout at most):
  // wait that long, and should a batch outlast even that, leave its counter
  // behind rather than free it under the engine.
  const auto bound = 2 * engine_->options().request_timeout + std::chrono::seconds(1);
  for (size_t s = 0; s < slice_done_.size(); ++s)
    if (!slice_done_[s]->WaitFinished(slice_submitted_[s], bound)) (void)slice_done_[s].release();
}

Status Reporter::WaitForSlice(size_t slice) {
  const auto& c = *slice_done_[slice];
  const uint64_t n = slice_submitted_[slice];
  if (c.finished() >= n) return Status::Ok();
  // Usually microseconds away: move the writes on this thread for a moment
  // (no hand-off to the worker and back), then wait.
  if (engine_->DriveUntil([&] { return c.finished() >= n; }, std::chrono::microseconds(50))) return Status::Ok();
  if (!c.WaitFinished(n, options_.timeout))
    return Timeout("telemetry batch not finished within " + std::to_string(options_.timeout.count()) +
                   " ms (collector unreachable?)");
  return Status::Ok();
}

Status Reporter::Reserve(size_t writes) {
  if (batch_.targets.size() + writes > options_.writes_per_batch) TE_RETURN_IF_ERROR(Flush());
  if (batch_.targets.empty()) TE_RETURN_IF_ERROR(WaitForSlice(slice_));  // slice reusable?
  return Status::Ok();
}

Status Reporter::KeyWrite(std::span<const uint8_t> key, std::span<const uint8_t> value) {
  const auto& g = info_.store;
  if (g.hashes > options_.writes_per_batch)
    return InvalidArgument("writes_per_batch must be at least the store's " + std::to_string(g.hashes) + " hashes");
  TE_RETURN_IF_ERROR(EncodeSlot(g, key, value, &scratch_));
  TE_RETURN_IF_ERROR(Reserve(g.hashes));
  for (uint32_t i = 0; i < g.hashes; ++i) {
    const size_t src = (slice_ * options_.writes_per_batch + batch_.targets.size()) * write_bytes_;
    std::memcpy(staging_mr_->data() + src, scratch_.data(), scratch_.size());
    batch_.targets.push_back({dst_, src, info_.store_offset() + SlotOf(g, key, i) * g.slot_bytes(), scratch_.size()});
  }
  ++stats_.key_writes;
  return Status::Ok();
}

Status Reporter::Append(uint32_t list, std::span<const uint8_t> record) {
  if (list >= info_.lists.lists)
    return OutOfRange("list " + std::to_string(list) + " outside the collector's " + std::to_string(info_.lists.lists) +
                      " lists");
  const uint64_t seq = next_seq_[list];
  TE_RETURN_IF_ERROR(EncodeRecord(info_.lists, seq, record, &scratch_));
  TE_RETURN_IF_ERROR(Reserve(1));
  const size_t src = (slice_ * options_.writes_per_batch + batch_.targets.size()) * write_bytes_;
  std::memcpy(staging_mr_->data() + src, scratch_.data(), scratch_.size());
  batch_.targets.push_back(
      {dst_, src, info_.lists_offset() + info_.lists.RecordOffset(list, options_.ring, seq), scratch_.size()});
  next_seq_[list] = seq + 1;
  ++stats_.appends;
  return Status::Ok();
}

Status Reporter::Flush() {
  if (batch_.targets.empty()) return Status::Ok();
  const size_t n = batch_.targets.size();
  ++slice_submitted_[slice_];
  Status st = engine_->Submit(batch_, {.counter = slice_done_[slice_].get(), .on_worker = true});
  batch_.targets.clear();
  if (!st.ok()) {
    --slice_submitted_[slice_];
    ++stats_.failed_batches;
    return st;
  }
  stats_.writes += n;
  ++stats_.batches;
  slice_ = (slice_ + 1) % slice_done_.size();
  return Status::Ok();
}

Status Reporter::Drain() {
  TE_RETURN_IF_ERROR(Flush());
  Status first;
  for (size_t s = 0; s < slice_done_.size(); ++s) {
    Status st = WaitForSlice(s);
    if (first.ok() && !st.ok()) first = st;
    if (first.ok() && slice_done_[s]->failed() > 0) first = slice_done_[s]->first_error();
  }
  uint64_t failed = 0;
  for (const auto& c : slice_done_) failed += c->failed();
  stats_.failed_batches = failed;
  return first;
}

}  // namespace te::telemetry
