#include "transfer/staging/staged_transfer.h"

#include <algorithm>
#include <cstring>

#include "base/checked_math.h"

namespace te {

namespace {

class HostCopyEngine final : public CopyEngine {
 public:
  Result<uint64_t> Start(void* dst, const void* src, size_t n) override {
    if (n) std::memcpy(dst, src, n);
    return ++tickets_;
  }
  Status Wait(uint64_t) override { return Status::Ok(); }
  const char* name() const override { return "host memcpy"; }

 private:
  uint64_t tickets_ = 0;
};

Status CheckOptions(const StagingOptions& o) {
  // The ring (chunk_bytes x depth) is at most kMaxRegionBytes: no product wraps.
  if (o.chunk_bytes == 0 || o.chunk_bytes > kMaxRegionBytes / 64 || o.depth < 1 || o.depth > 64)
    return InvalidArgument("StagingOptions: chunk_bytes " + std::to_string(o.chunk_bytes) + " must be in [1, " +
                           std::to_string(kMaxRegionBytes / 64) + "] and depth " + std::to_string(o.depth) +
                           " in [1, 64]");
  return Status::Ok();
}

}  // namespace

std::unique_ptr<CopyEngine> MakeHostCopyEngine() { return std::make_unique<HostCopyEngine>(); }

Result<std::unique_ptr<StagedSender>> StagedSender::Create(TransferEngine* engine, CopyEngine* copies,
                                                           const StagingOptions& options) {
  if (!engine || !copies) return InvalidArgument("StagedSender needs an engine and a copy engine");
  TE_RETURN_IF_ERROR(CheckOptions(options));
  std::unique_ptr<StagedSender> s(new StagedSender(engine, copies, options));
  // Owned by the region: a chunk's write still posted after it failed keeps
  // the ring alive past this sender.
  TE_ASSIGN_OR_RETURN(s->ring_mr_, engine->AllocateMemory(options.chunk_bytes * size_t(options.depth)));
  TE_RETURN_IF_ERROR(copies->PinHostMemory(s->ring_mr_->data(), s->ring_mr_->length()));
  return s;
}

Result<uint64_t> StagedSender::ExpectedImms(size_t length, const RemoteMr& dst) const {
  const uint64_t chunks = (length + options_.chunk_bytes - 1) / options_.chunk_bytes;
  if (chunks == 0) return uint64_t(0);
  // Every chunk is a SingleWrite from the (host) ring to `dst`: as many
  // immediates as one chunk's write delivers.
  TE_ASSIGN_OR_RETURN(
      uint64_t per_chunk,
      engine_->ExpectedImmCount(SingleWrite{ring_mr_, 0, std::min(length, options_.chunk_bytes), dst, 0, uint32_t(0)}));
  return chunks * per_chunk;
}

Status StagedSender::Write(const void* src, size_t length, const RemoteMr& dst, uint64_t dst_offset, uint32_t imm) {
  if (!src && length)
    return InvalidArgument("StagedSender::Write: null source for " + std::to_string(length) + " bytes");
  if (!dst) return InvalidArgument("StagedSender::Write: no destination");
  if (dst_offset > dst->length() || length > dst->length() - dst_offset)
    return OutOfRange("StagedSender::Write: [" + std::to_string(dst_offset) + ", +" + std::to_string(length) +
                      ") outside the remote region of " + std::to_string(dst->length()) + " bytes");
  const size_t chunk = options_.chunk_bytes;
  const size_t chunks = (length + chunk - 1) / chunk;
  const size_t depth = size_t(options_.depth);
  // One counter per slot: a slot is reused only once its own write is done
  // (writes of different chunks may finish in any order).
  std::vector<CompletionCounter> slot_done(depth);
  std::vector<uint64_t> slot_writes(depth, 0);
  // The engine finishes every request within its request timeout; waiting
  // for that long is what keeps the ring from being reused under a write.
  const auto wait = std::max(
      options_.timeout, std::chrono::duration_cast<std::chrono::milliseconds>(engine_->options().request_timeout) * 2);
  Status failure;
  size_t k = 0;
  for (; k < chunks && failure.ok(); ++k) {
    const size_t s = k % depth;
    if (!slot_done[s].WaitFinished(slot_writes[s], wait)) {
      failure = Timeout("staged write: chunk " + std::to_string(k - depth) + " not written within " +
                        std::to_string(wait.count()) + " ms");
      break;
    }
    if (slot_done[s].failed()) {
      failure = slot_done[s].first_error();
      break;
    }
    const size_t n = std::min(chunk, length - k * chunk);
    uint8_t* slot = ring_mr_->data() + s * chunk;
    auto ticket = copies_->Start(slot, static_cast<const uint8_t*>(src) + k * chunk, n);
    if (!ticket.ok()) {
      failure = ticket.status().WithContext("staged write: copying chunk " + std::to_string(k));
      break;
    }
    if (Status w = copies_->Wait(*ticket); !w.ok()) {
      failure = w.WithContext("staged write: copying chunk " + std::to_string(k));
      break;
    }
    Status submitted = engine_->Submit(SingleWrite{ring_mr_, s * chunk, n, dst, dst_offset + k * chunk, imm},
                                       {.counter = &slot_done[s]});
    if (!submitted.ok()) {
      failure = submitted.WithContext("staged write: chunk " + std::to_string(k));
      break;
    }
    ++slot_writes[s];
  }
  // Everything submitted must finish before the ring (and the counters)
  // can go: the engine guarantees it within its request timeout.
  for (size_t s = 0; s < depth; ++s) {
    if (!slot_done[s].WaitFinished(slot_writes[s], wait) && failure.ok())
      failure = Timeout("staged write: writes still in flight after " + std::to_string(wait.count()) + " ms");
    if (slot_done[s].failed() && failure.ok()) failure = slot_done[s].first_error();
  }
  return failure;
}

Status StagedReceiver::Receive(void* dst, const void* staging, size_t length, uint32_t imm, uint64_t expected,
                               std::chrono::milliseconds timeout) {
  if ((!dst || !staging) && length) return InvalidArgument("StagedReceiver::Receive: null buffer");
  TE_RETURN_IF_ERROR(CheckOptions(options_));
  if (expected) TE_RETURN_IF_ERROR(engine_->WaitImm(imm, expected, timeout));
  uint64_t last = 0;
  bool any = false;
  for (size_t off = 0; off < length; off += options_.chunk_bytes) {
    const size_t n = std::min(options_.chunk_bytes, length - off);
    TE_ASSIGN_OR_RETURN(
        last, copies_->Start(static_cast<uint8_t*>(dst) + off, static_cast<const uint8_t*>(staging) + off, n));
    any = true;
  }
  return any ? copies_->Wait(last) : Status::Ok();
}

}  // namespace te
