#include "nic/fabric/raw_write_loop.h"

#include <cstring>

#include "base/aligned_buffer.h"

#include "nic/fabric/fabric_setup.h"

namespace te::nic {
namespace {
using Clock = std::chrono::steady_clock;
double Us(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }
}  // namespace

struct RawWriteLoop::Impl {
  std::unique_ptr<FabricResources> res;
  AlignedBuffer buf;  // page-aligned, as the engine's registered buffers usually are
  fid_mr* mr = nullptr;
  void* desc = nullptr;
  fi_addr_t peer = FI_ADDR_UNSPEC;
  uint64_t peer_key = 0, peer_base = 0;
  std::vector<fi_context2> ctx;  // one per window slot
  uint64_t imms_seen = 0;        // arrivals of the imm being counted

  ~Impl() {
    if (res && res->ep) {
      fi_close(&res->ep->fid);
      res->ep = nullptr;
    }
    if (mr) fi_close(&mr->fid);
  }

  // Reads completions; counts arrivals of `imm`; returns local completions,
  // each identified by its context slot in `done_slots`.
  Result<int> Reap(uint32_t imm, std::vector<size_t>* done_slots) {
    fi_cq_data_entry e[32];
    ssize_t n = fi_cq_read(res->cq, e, 32);
    if (n == -FI_EAGAIN) return 0;
    if (n == -FI_EAVAIL) {
      void* op;
      return ReadCqError(res->cq, res->provider(), &op);
    }
    if (n < 0) return IoError(FiErrorString("fi_cq_read", n));
    int local = 0;
    for (ssize_t i = 0; i < n; ++i) {
      if (e[i].flags & FI_REMOTE_CQ_DATA) {
        if (uint32_t(e[i].data) == imm) ++imms_seen;
        continue;
      }
      if (done_slots) done_slots->push_back(static_cast<fi_context2*>(e[i].op_context) - ctx.data());
      ++local;
    }
    return local;
  }

  // fi_inject_writedata for a payload of at most the provider's inject
  // size: the provider copies it at once and generates no completion, so
  // the write is done from the caller's view. kUnavailable on -FI_EAGAIN.
  Status Inject(const void* local, size_t len, uint64_t remote_off, uint32_t imm) {
    ssize_t ret =
        fi_inject_writedata(res->ep, len ? local : buf.data(), len, imm, peer, peer_base + remote_off, peer_key);
    if (ret == 0) return Status::Ok();
    if (ret == -FI_EAGAIN) return Unavailable("send queue full");
    return IoError(FiErrorString("fi_inject_writedata", ret));
  }

  // kUnavailable on -FI_EAGAIN: the caller reaps and posts again.
  Status Post(const void* local, size_t len, uint64_t remote_off, uint32_t imm, void* context) {
    ssize_t ret = fi_writedata(res->ep, len ? local : buf.data(), len, desc, imm, peer, peer_base + remote_off,
                               peer_key, context);
    if (ret == 0) return Status::Ok();
    if (ret == -FI_EAGAIN) return Unavailable("send queue full");
    return IoError(FiErrorString("fi_writedata", ret));
  }

  // Posts one zero-byte write carrying `imm` (ping, pong, ack), reaping
  // while the queue is full. Local completions are counted in `*local_done`
  // while imms of `count_imm` are counted as arrivals.
  Status PostNotify(uint32_t imm, uint32_t count_imm, int* local_done, Clock::time_point deadline) {
    void* context = &ctx[notify_slot++ % ctx.size()];
    for (;;) {
      Status st = Post(nullptr, 0, 0, imm, context);
      if (st.code() != StatusCode::kUnavailable) return st;
      auto r = Reap(count_imm, nullptr);
      if (!r.ok()) return r.status();
      *local_done += r.value();
      if (Clock::now() > deadline) return Timeout("raw loop: send queue stayed full");
    }
  }
  size_t notify_slot = 0;

  Status WaitImms(uint32_t imm, uint64_t count, Clock::time_point deadline, int* local_done) {
    while (imms_seen < count) {
      auto r = Reap(imm, nullptr);
      if (!r.ok()) return r.status();
      if (local_done) *local_done += r.value();
      if (Clock::now() > deadline)
        return Timeout("raw loop: " + std::to_string(imms_seen) + " of " + std::to_string(count) + " arrivals of imm " +
                       std::to_string(imm) + " before the timeout");
    }
    return Status::Ok();
  }
};

RawWriteLoop::RawWriteLoop(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
RawWriteLoop::~RawWriteLoop() = default;

Result<std::unique_ptr<RawWriteLoop>> RawWriteLoop::Open(const FabricOptions& options, size_t buffer_bytes) {
  auto impl = std::make_unique<Impl>();
  TE_ASSIGN_OR_RETURN(impl->res, OpenFabric(options, /*thread_safe=*/false, 16384));
  TE_ASSIGN_OR_RETURN(impl->buf, AlignedBuffer::Allocate(std::max<size_t>(buffer_bytes, 64)));
  fi_mr_attr attr{};
  iovec iov{impl->buf.data(), impl->buf.size()};
  attr.mr_iov = &iov;
  attr.iov_count = 1;
  attr.access = FI_WRITE | FI_REMOTE_WRITE;
  attr.requested_key = 1;
  int ret = fi_mr_regattr(impl->res->domain, &attr, 0, &impl->mr);
  if (ret) return IoError(FiErrorString("fi_mr_regattr", ret));
  if (impl->res->mr_mode() & FI_MR_ENDPOINT) {
    if ((ret = fi_mr_bind(impl->mr, &impl->res->ep->fid, 0)) || (ret = fi_mr_enable(impl->mr)))
      return IoError(FiErrorString("fi_mr_bind/enable", ret));
  }
  impl->desc = fi_mr_desc(impl->mr);
  return std::unique_ptr<RawWriteLoop>(new RawWriteLoop(std::move(impl)));
}

std::vector<uint8_t> RawWriteLoop::address() const { return impl_->res->address(); }
uint64_t RawWriteLoop::rkey() const { return fi_mr_key(impl_->mr); }
uint64_t RawWriteLoop::remote_base() const {
  return (impl_->res->mr_mode() & FI_MR_VIRT_ADDR) ? reinterpret_cast<uint64_t>(impl_->buf.data()) : 0;
}
uint8_t* RawWriteLoop::buffer() { return impl_->buf.data(); }
size_t RawWriteLoop::buffer_bytes() const { return impl_->buf.size(); }

Status RawWriteLoop::Connect(std::span<const uint8_t> peer_address, uint64_t peer_rkey, uint64_t peer_remote_base) {
  int ret = fi_av_insert(impl_->res->av, peer_address.data(), 1, &impl_->peer, 0, nullptr);
  if (ret != 1) return IoError(FiErrorString("fi_av_insert", ret));
  impl_->peer_key = peer_rkey;
  impl_->peer_base = peer_remote_base;
  return Status::Ok();
}

Result<RawWriteLoop::RunStats> RawWriteLoop::RunWrites(std::span<const Op> ops, size_t window, size_t batch,
                                                       uint32_t imm, uint32_t ack_imm,
                                                       std::chrono::milliseconds timeout) {
  Impl& m = *impl_;
  window = std::max<size_t>(1, window);
  batch = std::max<size_t>(1, batch);
  for (const Op& op : ops)
    if (op.local_offset + op.length > m.buf.size())
      return OutOfRange("raw op at local offset " + std::to_string(op.local_offset) + " + length " +
                        std::to_string(op.length) + " exceeds buffer " + std::to_string(m.buf.size()));
  m.ctx.assign(window, fi_context2{});
  std::vector<size_t> free_slots;
  for (size_t i = 0; i < window; ++i) free_slots.push_back(i);
  std::vector<size_t> slot_op(window);
  const size_t batches = (ops.size() + batch - 1) / batch;
  std::vector<Clock::time_point> batch_start(batches);
  std::vector<size_t> batch_left(batches, 0);
  RunStats stats;
  stats.batch_latency_us.resize(batches);
  for (size_t i = 0; i < ops.size(); ++i) ++batch_left[i / batch];

  m.imms_seen = 0;
  const auto deadline = Clock::now() + timeout;
  const auto start = Clock::now();
  size_t next = 0, completed = 0;
  std::vector<size_t> done;
  // What a tuned provider benchmark does: payloads up to the provider's
  // inject size go by fi_inject_writedata (no completion to reap, no context),
  // the whole window is posted before completions are read, and completions
  // are read 32 at a time.
  const size_t inject_size = m.res->info->tx_attr ? m.res->info->tx_attr->inject_size : 0;
  auto finish_op = [&](size_t op_index, Clock::time_point now) {
    const size_t b = op_index / batch;
    if (--batch_left[b] == 0) stats.batch_latency_us[b] = Us(now - batch_start[b]);
    ++completed;
  };
  while (completed < ops.size()) {
    while (next < ops.size() && ops[next].length <= inject_size) {
      const Op& op = ops[next];
      if (next % batch == 0) batch_start[next / batch] = Clock::now();
      Status st = m.Inject(m.buf.data() + op.local_offset, op.length, op.remote_offset, imm);
      if (st.code() == StatusCode::kUnavailable) break;  // reap (progress), then post again
      TE_RETURN_IF_ERROR(st);
      finish_op(next, Clock::now());
      ++next;
    }
    while (next < ops.size() && ops[next].length > inject_size && !free_slots.empty()) {
      size_t slot = free_slots.back();
      const Op& op = ops[next];
      if (next % batch == 0) batch_start[next / batch] = Clock::now();
      Status st = m.Post(m.buf.data() + op.local_offset, op.length, op.remote_offset, imm, &m.ctx[slot]);
      if (st.code() == StatusCode::kUnavailable) break;  // reap, then post again
      TE_RETURN_IF_ERROR(st);
      free_slots.pop_back();
      slot_op[slot] = next;
      ++next;
    }
    done.clear();
    auto r = m.Reap(ack_imm, &done);
    if (!r.ok()) return r.status();
    if (!done.empty()) {
      const auto now = Clock::now();
      for (size_t slot : done) {
        finish_op(slot_op[slot], now);
        free_slots.push_back(slot);
      }
    } else if (Clock::now() > deadline) {
      return Timeout("raw loop: " + std::to_string(completed) + " of " + std::to_string(ops.size()) +
                     " writes completed before the timeout");
    }
  }
  TE_RETURN_IF_ERROR(m.WaitImms(ack_imm, 1, deadline, nullptr));
  stats.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return stats;
}

Status RawWriteLoop::Serve(uint64_t expected, uint32_t imm, uint32_t ack_imm, std::chrono::milliseconds timeout) {
  Impl& m = *impl_;
  m.imms_seen = 0;
  const auto deadline = Clock::now() + timeout;
  m.ctx.assign(64, fi_context2{});
  TE_RETURN_IF_ERROR(m.WaitImms(imm, expected, deadline, nullptr));
  int local = 0;
  TE_RETURN_IF_ERROR(m.PostNotify(ack_imm, imm, &local, deadline));
  // Wait for the ack's own completion so the context outlives the write.
  while (local == 0) {
    auto r = m.Reap(~0u, nullptr);
    if (!r.ok()) return r.status();
    local += r.value();
    if (Clock::now() > deadline) return Timeout("raw loop: ack write never completed");
  }
  return Status::Ok();
}

Result<std::vector<double>> RawWriteLoop::Ping(int iterations, uint32_t imm, std::chrono::milliseconds timeout) {
  Impl& m = *impl_;
  std::vector<double> rtt;
  rtt.reserve(iterations);
  m.ctx.assign(64, fi_context2{});
  m.imms_seen = 0;
  const auto deadline = Clock::now() + timeout;
  int local_outstanding = 0;
  for (int i = 0; i < iterations; ++i) {
    const auto t0 = Clock::now();
    int local = 0;
    TE_RETURN_IF_ERROR(m.PostNotify(imm, imm, &local, deadline));
    ++local_outstanding;
    TE_RETURN_IF_ERROR(m.WaitImms(imm, uint64_t(i) + 1, deadline, &local));
    rtt.push_back(Us(Clock::now() - t0));
    local_outstanding -= local;
  }
  while (local_outstanding > 0) {
    auto r = m.Reap(~0u, nullptr);
    if (!r.ok()) return r.status();
    local_outstanding -= r.value();
    if (Clock::now() > deadline) return Timeout("raw loop: ping writes never completed");
  }
  return rtt;
}

Status RawWriteLoop::Pong(int iterations, uint32_t imm, std::chrono::milliseconds timeout) {
  Impl& m = *impl_;
  m.ctx.assign(64, fi_context2{});
  m.imms_seen = 0;
  const auto deadline = Clock::now() + timeout;
  int local_outstanding = 0;
  for (int i = 0; i < iterations; ++i) {
    int local = 0;
    TE_RETURN_IF_ERROR(m.WaitImms(imm, uint64_t(i) + 1, deadline, &local));
    TE_RETURN_IF_ERROR(m.PostNotify(imm, imm, &local, deadline));
    local_outstanding -= local;
    ++local_outstanding;
  }
  while (local_outstanding > 0) {
    auto r = m.Reap(~0u, nullptr);
    if (!r.ok()) return r.status();
    local_outstanding -= r.value();
    if (Clock::now() > deadline) return Timeout("raw loop: pong writes never completed");
  }
  return Status::Ok();
}

}  // namespace te::nic
