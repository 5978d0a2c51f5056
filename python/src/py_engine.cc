#include "py_engine.h"

#include <pybind11/chrono.h>
#include <pybind11/stl.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <thread>

#include "py_requests.h"
#include "status_error.h"
#include "transfer/shared_host_memory.h"

namespace py = pybind11;

namespace tepy {
namespace {

// Waits are cut into slices this long so that Ctrl-C is seen promptly.
constexpr auto kWaitSlice = std::chrono::milliseconds(50);
// A wait for a request first drives the engine on the waiting thread this
// long (TransferEngine::DriveUntil) before it sleeps: a request on shm or a
// fast NIC often finishes within microseconds, and a futex wake-up on a busy
// machine can cost a hundred. The cost is at most this much CPU per wait.
constexpr auto kWaitSpin = std::chrono::microseconds(50);
// Received control messages held for Python beyond which new ones are
// dropped (counted): a program that never calls recv() cannot grow it.
constexpr size_t kMaxInboxBytes = size_t(64) << 20;

py::bytes Bytes(const std::vector<uint8_t>& v) { return py::bytes(reinterpret_cast<const char*>(v.data()), v.size()); }

std::string_view BytesView(const py::bytes& b) {
  char* p = nullptr;
  Py_ssize_t n = 0;
  PyBytes_AsStringAndSize(b.ptr(), &p, &n);
  return {p, size_t(n)};
}

}  // namespace

RegionState::~RegionState() = default;

PyEngine::PyEngine(const te::EngineOptions& options) {
  te::Result<std::unique_ptr<te::TransferEngine>> created = [&] {
    py::gil_scoped_release release;
    return te::TransferEngine::Create(options);
  }();
  engine_ = Unwrap(std::move(created));
  manual_ = options.progress == te::ProgressMode::kManual;
  engine_->SetRecvHandler(
      [this](const te::EngineAddress& from, std::span<const uint8_t> data) { OnMessage(from, data); });
}

void PyEngine::DetachPlane() {
  if (planes_.fetch_sub(1) == 1 && engine_)
    engine_->SetRecvHandler(
        [this](const te::EngineAddress& from, std::span<const uint8_t> data) { OnMessage(from, data); });
}

PyEngine::~PyEngine() {
  if (engine_) {
    py::gil_scoped_release release;
    engine_.reset();  // fails what is in flight with CANCELLED: handles move to finished_
  }
  pending_.clear();
  finished_.clear();
  if (efd_ >= 0) ::close(efd_);
}

te::TransferEngine* PyEngine::engine() const {
  if (!engine_) Throw(te::Cancelled("the engine is closed"));
  return engine_.get();
}

void PyEngine::Close() {
  if (!engine_) return;
  if (planes_.load() > 0)
    Throw(
        te::InvalidArgument("close(): a data plane (KV prefiller or decoder, weight receiver or pusher, MoE "
                            "dispatcher) still uses this engine; close it first"));
  {
    py::gil_scoped_release release;
    engine_.reset();
  }
  Reap();
}

int PyEngine::fileno() {
  std::lock_guard<std::mutex> lock(mu_);
  if (efd_ < 0) {
    efd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (efd_ < 0) Throw(te::IoError(std::string("eventfd: ") + strerror(errno)));
    notify_ = true;
  }
  return efd_;
}

void PyEngine::SignalLocked() {
  if (!notify_) return;
  uint64_t one = 1;
  // Non-blocking: when the counter is saturated the reader is due anyway.
  [[maybe_unused]] ssize_t n = ::write(efd_, &one, sizeof(one));
}

std::shared_ptr<RegionState> PyEngine::Register(MemoryView view) {
  te::TransferEngine* e = engine();
  const te::Memory memory = view.cuda ? te::Memory::Cuda(view.device) : te::Memory::Host();
  te::Result<te::LocalMr> mr = [&] {
    py::gil_scoped_release release;
    return e->RegisterMemory(view.data, view.nbytes, memory);
  }();
  auto r = std::make_shared<RegionState>();
  r->engine = shared_from_this();
  r->mr = Unwrap(std::move(mr));
  r->view = std::move(view);
  return r;
}

void PyEngine::Deregister(RegionState& region) {
  Reap();
  if (!region.mr) return;
  const int64_t n = region.inflight.load(std::memory_order_acquire);
  if (n > 0)
    Throw(te::InvalidArgument("deregister: " + std::to_string(n) +
                              " request(s) using this region have not finished; wait for them first"));
  region.mr.reset();
  region.view = MemoryView();
}

std::shared_ptr<HandleState> PyEngine::Begin(const char* kind, std::vector<std::shared_ptr<RegionState>> regions,
                                             uint32_t parts) {
  for (const auto& r : regions)
    if (!r->mr) Throw(te::InvalidArgument("a region of this request was deregistered"));
  for (const auto& r : regions) r->inflight.fetch_add(1, std::memory_order_relaxed);
  auto h = std::make_shared<HandleState>();
  h->kind = kind;
  h->regions = std::move(regions);
  h->remaining = parts;
  std::lock_guard<std::mutex> lock(mu_);
  h->id = next_id_++;
  pending_.emplace(h->id, h);
  return h;
}

te::Completion PyEngine::CompletionFor(HandleState* h) {
  te::Completion c;
  // Cheap: Finish flips the handle's state under a short lock and signals;
  // run it on the engine's worker (or a thread driving in WaitFor), saving
  // the hop to the callback thread.
  c.on_worker = true;
  c.on_done = [this, h] { Finish(h, te::Status()); };
  c.on_error = [this, h](const te::Status& s) { Finish(h, s); };
  return c;
}

void PyEngine::Finish(HandleState* h, const te::Status& status) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!status.ok() && h->status.ok()) h->status = status;
  if (--h->remaining > 0) return;
  // The regions are free for deregistration before anyone sees the state.
  for (const auto& r : h->regions) r->inflight.fetch_sub(1, std::memory_order_release);
  h->state.store(h->status.ok() ? HandleState::kDone : HandleState::kFailed, std::memory_order_release);
  auto it = pending_.find(h->id);
  if (it != pending_.end()) {
    finished_.push_back(std::move(it->second));
    pending_.erase(it);
  }
  ++finished_since_poll_;
  if (h->watched) watched_ready_.push_back(h->id);
  cv_.notify_all();
  SignalLocked();
}

template <typename Post>
std::shared_ptr<HandleState> PyEngine::Start(const char* kind, std::vector<std::shared_ptr<RegionState>> regions,
                                             Post post) {
  engine();  // raises when closed
  Reap();
  auto h = Begin(kind, std::move(regions));
  te::Status s;
  {
    py::gil_scoped_release release;
    s = post(CompletionFor(h.get()));
  }
  if (!s.ok()) {
    Finish(h.get(), s);  // refused: nothing was posted; the handle is dropped
    Reap();
    Throw(s);
  }
  return h;
}

std::shared_ptr<HandleState> PyEngine::Submit(const char* kind, te::Request request,
                                              std::vector<std::shared_ptr<RegionState>> regions) {
  te::TransferEngine* e = engine();
  return Start(kind, std::move(regions), [&](te::Completion c) { return e->Submit(std::move(request), std::move(c)); });
}

std::shared_ptr<HandleState> PyEngine::ExpectImm(const char* kind, uint32_t imm, uint64_t count) {
  te::TransferEngine* e = engine();
  return Start(kind, {}, [&](te::Completion c) {
    return e->ExpectImm(imm, count, std::move(c.on_done), te::TransferEngine::ImmDelivery::kOnWorker);
  });
}

size_t PyEngine::Reap() {
  std::vector<std::shared_ptr<HandleState>> done;
  {
    std::lock_guard<std::mutex> lock(mu_);
    done.swap(finished_);
  }
  return done.size();  // released here, with the GIL
}

template <typename Pred>
bool PyEngine::WaitFor(Pred done, std::optional<double> timeout, bool spin) {
  using Clock = std::chrono::steady_clock;
  if (timeout && *timeout < 0) Throw(te::InvalidArgument("timeout " + std::to_string(*timeout) + " s is negative"));
  const auto deadline =
      timeout ? Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(*timeout))
              : Clock::time_point::max();
  te::TransferEngine* e = engine();
  if (spin && !manual_) {
    if (done()) return true;
    // Drive the engine on this thread for a moment (TransferEngine::
    // DriveUntil): a completion microseconds away then needs no wake-up.
    py::gil_scoped_release release;
    const auto spin = std::min<Clock::duration>(kWaitSpin, deadline - Clock::now());
    if (spin > Clock::duration::zero() && e->DriveUntil(done, spin)) return true;
  }
  while (true) {
    bool ok;
    {
      py::gil_scoped_release release;
      const auto slice_end = std::min(deadline, Clock::now() + kWaitSlice);
      if (manual_) {
        while (!(ok = done()) && Clock::now() < slice_end) e->Progress();
      } else {
        std::unique_lock<std::mutex> lock(mu_);
        ok = cv_.wait_until(lock, slice_end, done);
      }
    }
    if (ok) return true;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();  // Ctrl-C
    if (Clock::now() >= deadline) return false;
  }
}

bool PyEngine::Wait(const HandleState& h, std::optional<double> timeout) {
  bool ok = WaitFor([&] { return h.state.load(std::memory_order_acquire) != HandleState::kPending; }, timeout,
                    /*spin=*/true);
  Reap();
  return ok;
}

bool PyEngine::WaitAll(const std::vector<std::shared_ptr<HandleState>>& hs, std::optional<double> timeout) {
  size_t next = 0;  // handles before `next` are known finished
  bool ok = WaitFor(
      [&] {
        while (next < hs.size() && hs[next]->state.load(std::memory_order_acquire) != HandleState::kPending) ++next;
        return next == hs.size();
      },
      timeout, /*spin=*/true);
  Reap();
  return ok;
}

size_t PyEngine::Poll() {
  te::TransferEngine* e = engine();
  if (manual_) {
    py::gil_scoped_release release;
    while (e->Progress()) {
    }
  }
  Reap();
  std::lock_guard<std::mutex> lock(mu_);
  return std::exchange(finished_since_poll_, 0);
}

void PyEngine::Watch(const std::shared_ptr<HandleState>& h) {
  fileno();  // completions now write the eventfd
  std::lock_guard<std::mutex> lock(mu_);
  h->watched = true;
  if (h->state.load(std::memory_order_acquire) != HandleState::kPending) {
    watched_ready_.push_back(h->id);
    SignalLocked();
  }
}

std::vector<uint64_t> PyEngine::DrainWatched() {
  if (manual_ && engine_) {
    py::gil_scoped_release release;
    while (engine_->Progress()) {
    }
  }
  std::vector<uint64_t> ids;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ids.swap(watched_ready_);
    if (efd_ >= 0) {
      uint64_t count;
      [[maybe_unused]] ssize_t n = ::read(efd_, &count, sizeof(count));
    }
  }
  Reap();
  return ids;
}

void PyEngine::OnMessage(const te::EngineAddress& from, std::span<const uint8_t> data) {
  std::lock_guard<std::mutex> lock(mu_);
  if (inbox_bytes_ + data.size() > kMaxInboxBytes) {
    ++inbox_dropped_;
    return;
  }
  auto addr = from.Serialize();
  inbox_.push_back({std::string(addr.begin(), addr.end()), std::string(data.begin(), data.end())});
  inbox_bytes_ += data.size();
  cv_.notify_all();
  SignalLocked();
}

std::optional<Message> PyEngine::TryRecv() {
  if (manual_ && engine_) {
    py::gil_scoped_release release;
    engine_->Progress();
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (inbox_.empty()) return std::nullopt;
  Message m = std::move(inbox_.front());
  inbox_.pop_front();
  inbox_bytes_ -= m.data.size();
  return m;
}

std::optional<Message> PyEngine::Recv(std::optional<double> timeout) {
  // No spinning: the predicate reads the inbox, which needs the lock.
  if (!WaitFor([&] { return !inbox_.empty(); }, timeout, /*spin=*/false)) return std::nullopt;
  return TryRecv();
}

uint64_t PyEngine::messages_dropped() const {
  std::lock_guard<std::mutex> lock(mu_);
  return inbox_dropped_;
}

// ---------------------------------------------------------------- bindings

namespace {

struct PyHandle {
  std::shared_ptr<PyEngine> engine;
  std::shared_ptr<HandleState> state;
};

PyHandle MakeHandle(PyEngine& e, std::shared_ptr<HandleState> h) {
  return PyHandle{e.shared_from_this(), std::move(h)};
}

void WaitOrRaise(const PyHandle& h, std::optional<double> timeout) {
  if (!h.engine->Wait(*h.state, timeout))
    RaiseTimeout("request " + std::to_string(h.state->id) + " (" + h.state->kind + ") still in flight after " +
                 std::to_string(*timeout) + " s");
  if (h.state->state.load() == HandleState::kFailed) Throw(h.state->status);
}

py::dict StatsDict(const te::EngineStats& s) {
  py::dict d;
  d["requests_submitted"] = s.requests_submitted;
  d["requests_done"] = s.requests_done;
  d["requests_failed"] = s.requests_failed;
  d["writes_posted"] = s.writes_posted;
  d["bytes_written"] = s.bytes_written;
  d["imms_received"] = s.imms_received;
  d["imms_dropped"] = s.imms_dropped;
  d["messages_received"] = s.messages_received;
  d["messages_dropped"] = s.messages_dropped;
  d["slow_worker_callbacks"] = s.slow_worker_callbacks;
  d["latency_p50_us"] = s.latency_p50_us;
  d["latency_p99_us"] = s.latency_p99_us;
  py::list domains;
  for (const auto& x : s.domains) {
    py::dict dd;
    dd["writes_posted"] = x.writes_posted;
    dd["bytes_written"] = x.bytes_written;
    dd["errors"] = x.errors;
    domains.append(dd);
  }
  d["domains"] = domains;
  py::list peers;
  for (const auto& x : s.peers) {
    py::dict pd;
    pd["peer_id"] = x.peer_id;
    pd["writes_posted"] = x.writes_posted;
    pd["bytes_written"] = x.bytes_written;
    pd["errors"] = x.errors;
    peers.append(pd);
  }
  d["peers"] = peers;
  return d;
}

py::tuple MessageTuple(const Message& m) { return py::make_tuple(py::bytes(m.from), py::bytes(m.data)); }

void BindOptions(py::module_& m) {
  using te::EngineOptions;
  py::class_<EngineOptions>(m, "EngineOptions",
                            "How an Engine is set up; the fields of te::EngineOptions (transfer/engine_options.h). "
                            "Durations accept seconds (float) or datetime.timedelta.")
      .def(py::init<>())
      .def_property(
          "provider", [](const EngineOptions& o) { return o.ProviderName(); },
          [](EngineOptions& o, const std::string& v) { o.SetProvider(v); })
      .def_property(
          "interface", [](const EngineOptions& o) { return o.fabric.domain; },
          [](EngineOptions& o, std::string v) { o.fabric.domain = std::move(v); })
      .def_property(
          "max_message_bytes", [](const EngineOptions& o) { return o.fabric.max_message_bytes; },
          [](EngineOptions& o, size_t v) { o.fabric.max_message_bytes = v; })
      .def_property(
          "recv_buffers", [](const EngineOptions& o) { return o.fabric.recv_buffers; },
          [](EngineOptions& o, size_t v) { o.fabric.recv_buffers = v; })
      .def_property(
          "send_buffers", [](const EngineOptions& o) { return o.fabric.send_buffers; },
          [](EngineOptions& o, size_t v) { o.fabric.send_buffers = v; })
      .def_property(
          "want_hmem", [](const EngineOptions& o) { return o.fabric.want_hmem; },
          [](EngineOptions& o, bool v) { o.fabric.want_hmem = v; })
      .def_property(
          "same_host",
          [](const EngineOptions& o) {
            return o.same_host == te::SameHost::kDirect ? "direct" : o.same_host == te::SameHost::kNic ? "nic" : "auto";
          },
          [](EngineOptions& o, const std::string& v) {
            if (v == "auto")
              o.same_host = te::SameHost::kAuto;
            else if (v == "direct")
              o.same_host = te::SameHost::kDirect;
            else if (v == "nic")
              o.same_host = te::SameHost::kNic;
            else
              Throw(te::InvalidArgument("same_host '" + v + "'; valid: auto, direct, nic"));
          })
      .def_readwrite("domains", &EngineOptions::domains)
      .def_readwrite("domain_names", &EngineOptions::domain_names)
      .def_readwrite("gpu", &EngineOptions::gpu)
      .def_property(
          "progress",
          [](const EngineOptions& o) { return o.progress == te::ProgressMode::kManual ? "manual" : "thread"; },
          [](EngineOptions& o, const std::string& v) {
            if (v == "thread")
              o.progress = te::ProgressMode::kThread;
            else if (v == "manual")
              o.progress = te::ProgressMode::kManual;
            else
              Throw(te::InvalidArgument("progress '" + v + "'; valid: thread, manual"));
          })
      .def_readwrite("worker_cpu", &EngineOptions::worker_cpu)
      .def_readwrite("request_timeout", &EngineOptions::request_timeout)
      .def_readwrite("max_queued_operations", &EngineOptions::max_queued_operations)
      .def_readwrite("max_imm_values", &EngineOptions::max_imm_values)
      .def_readwrite("max_inflight_per_domain", &EngineOptions::max_inflight_per_domain)
      .def_readwrite("min_shard_bytes", &EngineOptions::min_shard_bytes)
      .def_readwrite("idle_spin", &EngineOptions::idle_spin)
      .def_readwrite("idle_sleep", &EngineOptions::idle_sleep)
      .def_readwrite("idle_sleep_max", &EngineOptions::idle_sleep_max)
      .def_readwrite("idle_deep", &EngineOptions::idle_deep)
      .def_readwrite("busy_poll", &EngineOptions::busy_poll)
      .def_readwrite("wait_spin", &EngineOptions::wait_spin)
      .def_readwrite("slow_worker_callback", &EngineOptions::slow_worker_callback)
      .def_readwrite("recv_backlog", &EngineOptions::recv_backlog)
      .def_readwrite("max_pending_message_bytes", &EngineOptions::max_pending_message_bytes)
      .def("__repr__", [](const EngineOptions& o) {
        return "EngineOptions(provider='" + o.ProviderName() + "', interface='" + o.fabric.domain +
               "', domains=" + std::to_string(o.domains) + ", progress='" +
               (o.progress == te::ProgressMode::kManual ? "manual" : "thread") + "')";
      });
}

}  // namespace

void BindEngine(py::module_& m) {
  BindOptions(m);

  py::class_<te::SharedHostMemory>(
      m, "SharedHostMemory", py::buffer_protocol(),
      "Host memory that peers on this host write at memory speed (transfer/shared_host_memory.h): a sealed "
      "memfd mapping, zero-filled, size rounded up to pages. A writable buffer: numpy.frombuffer(mem, dtype) "
      "views it and Engine.register(mem) registers it. Keep it alive while registered.")
      .def(py::init([](size_t nbytes) {
             auto m = te::AllocateSharedHostMemory(nbytes);
             if (!m.ok()) Throw(m.status());
             return std::move(m).value();
           }),
           py::arg("nbytes"))
      .def_property_readonly("nbytes", &te::SharedHostMemory::size)
      .def("__len__", &te::SharedHostMemory::size)
      .def_buffer([](te::SharedHostMemory& m) {
        return py::buffer_info(m.data(), 1, py::format_descriptor<uint8_t>::format(), 1, {py::ssize_t(m.size())},
                               {py::ssize_t(1)});
      });

  py::class_<PyHandle>(m, "Handle",
                       "One request's end: done() to poll, wait() to block, or await it through the Engine's "
                       "*_async methods. Dropping a handle never cancels the request nor frees its memory early.")
      .def_property_readonly("id", [](const PyHandle& h) { return h.state->id; })
      .def_property_readonly("kind", [](const PyHandle& h) { return h.state->kind; })
      .def(
          "done", [](const PyHandle& h) { return h.state->state.load() != HandleState::kPending; },
          "True once the request finished (successfully or not).")
      .def("wait", &WaitOrRaise, py::arg("timeout") = py::none(),
           "Blocks until the request finished; raises TransferError if it failed, TimeoutError if it is "
           "still in flight after `timeout` seconds. Ctrl-C interrupts it. Releases the GIL.")
      .def(
          "exception",
          [](const PyHandle& h) -> py::object {
            if (h.state->state.load() != HandleState::kFailed) return py::none();
            return ErrorObject(h.state->status);
          },
          "The TransferError the request failed with; None while pending or after success.")
      .def_property_readonly(
          "payload",
          [](const PyHandle& h) -> py::object {
            if (h.state->state.load() == HandleState::kPending) return py::none();
            return py::bytes(h.state->payload);
          },
          "Bytes the request produced (a KV request's context), once finished.")
      .def("__repr__", [](const PyHandle& h) {
        static const char* names[] = {"pending", "done", "failed"};
        return "<Handle " + std::to_string(h.state->id) + " " + h.state->kind + " " + names[h.state->state.load()] +
               ">";
      });

  py::class_<RegionState, std::shared_ptr<RegionState>>(
      m, "Region",
      "Memory registered with every NIC of an Engine. Holds the registered object alive until deregister() "
      "(or until this object and every request that used it are gone).")
      .def_property_readonly("ptr", [](const RegionState& r) { return reinterpret_cast<uintptr_t>(r.view.data); })
      .def_property_readonly("nbytes", [](const RegionState& r) { return r.view.nbytes; })
      .def_property_readonly("device",
                             [](const RegionState& r) {
                               return r.view.cuda ? "cuda:" + std::to_string(r.view.device) : std::string("cpu");
                             })
      .def_property_readonly("via", [](const RegionState& r) { return r.view.via; })
      .def_property_readonly("obj", [](const RegionState& r) { return r.view.owner; })
      .def_property_readonly("registered", [](const RegionState& r) { return bool(r.mr); })
      .def(
          "descriptor",
          [](const RegionState& r) {
            if (!r.mr) Throw(te::InvalidArgument("descriptor(): the region was deregistered"));
            return Bytes(r.engine->engine()->Describe(*r.mr).Serialize());
          },
          "What a peer needs to write here, as bytes (send it any way you like; it pickles).")
      .def(
          "deregister", [](RegionState& r) { r.engine->Deregister(r); },
          "Ends the registration and lets go of the object. Raises TransferError while requests using it "
          "are in flight.")
      .def("__enter__", [](std::shared_ptr<RegionState> r) { return r; })
      .def("__exit__", [](RegionState& r, py::args) { r.engine->Deregister(r); })
      .def("__repr__", [](const RegionState& r) {
        return "<Region " + std::to_string(r.view.nbytes) + " bytes on " +
               (r.view.cuda ? "cuda:" + std::to_string(r.view.device) : std::string("cpu")) + " via " + r.view.via +
               (r.mr ? "" : ", deregistered") + ">";
      });

  py::class_<RemoteState, std::shared_ptr<RemoteState>>(m, "RemoteRegion",
                                                        "A peer's region, from Engine.import_descriptor().")
      .def_property_readonly("nbytes", [](const RemoteState& r) { return r.remote->length(); })
      .def_property_readonly("descriptor", [](const RemoteState& r) { return py::bytes(r.descriptor); })
      .def_property_readonly("peer_id", [](const RemoteState& r) { return r.remote->peer()->id(); })
      .def("__repr__",
           [](const RemoteState& r) { return "<RemoteRegion " + std::to_string(r.remote->length()) + " bytes>"; });

  py::class_<PeerState, std::shared_ptr<PeerState>>(m, "Peer", "A peer engine, from Engine.add_peer().")
      .def_property_readonly("id", [](const PeerState& p) { return p.peer->id(); })
      .def_property_readonly("address", [](const PeerState& p) { return Bytes(p.peer->address().Serialize()); })
      .def("__repr__", [](const PeerState& p) { return "<Peer " + std::to_string(p.peer->id()) + ">"; });

  py::class_<PyEngine, std::shared_ptr<PyEngine>> engine(
      m, "_Engine", "The transfer engine (use transfer_engine.Engine, which adds keyword options and asyncio).");
  engine.def(py::init<const te::EngineOptions&>(), py::arg("options"))
      .def("close", &PyEngine::Close,
           "Shuts the engine down: requests in flight fail with CANCELLED. Later calls raise TransferError.")
      .def_property_readonly("closed", &PyEngine::closed)
      .def("fileno", &PyEngine::fileno,
           "An eventfd that becomes readable when a watched request finishes or a message arrives (asyncio).")
      .def(
          "address", [](PyEngine& e) { return Bytes(e.engine()->address().Serialize()); },
          "This engine's address, as bytes for peers' add_peer().")
      .def_property_readonly("provider", [](PyEngine& e) { return e.engine()->provider(); })
      .def_property_readonly("domain_count", [](PyEngine& e) { return e.engine()->domain_count(); })
      .def_property_readonly("max_message_bytes", [](PyEngine& e) { return e.engine()->max_message_bytes(); })
      .def(
          "register", [](PyEngine& e, py::handle obj, const std::string& via) { return e.Register(ViewOf(obj, via)); },
          py::arg("obj"), py::arg("via") = "auto",
          "Registers the memory of `obj` without copying: buffer protocol (numpy, bytearray, memoryview, "
          "mmap), __dlpack__ (torch, JAX, CuPy) or __cuda_array_interface__. Read-only or non-contiguous "
          "memory is refused.")
      .def(
          "register_pointer",
          [](PyEngine& e, uintptr_t ptr, size_t nbytes, const std::string& device, py::object owner) {
            return e.Register(ViewOfPointer(ptr, nbytes, device, std::move(owner)));
          },
          py::arg("ptr"), py::arg("nbytes"), py::arg("device") = "cpu", py::arg("owner") = py::none(),
          "Registers raw memory; `owner` (if given) is kept alive while registered.")
      .def(
          "add_peer",
          [](PyEngine& e, const py::bytes& address) {
            auto a = BytesView(address);
            auto addr = Unwrap(te::EngineAddress::Deserialize(
                std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(a.data()), a.size())));
            te::TransferEngine* t = e.engine();
            te::Result<te::PeerRef> peer = [&] {
              py::gil_scoped_release release;
              return t->Connect(addr);
            }();
            auto p = std::make_shared<PeerState>();
            p->engine = e.shared_from_this();
            p->peer = Unwrap(std::move(peer));
            return p;
          },
          py::arg("address"), "Resolves a peer from its address() bytes.")
      .def(
          "import_descriptor",
          [](PyEngine& e, const py::bytes& descriptor) {
            auto d = BytesView(descriptor);
            auto desc = Unwrap(te::MrDescriptor::Deserialize(
                std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(d.data()), d.size())));
            te::TransferEngine* t = e.engine();
            te::Result<te::RemoteMr> remote = [&] {
              py::gil_scoped_release release;
              return t->Import(desc);
            }();
            auto r = std::make_shared<RemoteState>();
            r->engine = e.shared_from_this();
            r->remote = Unwrap(std::move(remote));
            r->descriptor = std::string(d);
            return r;
          },
          py::arg("descriptor"), "A peer's region from its Region.descriptor() bytes (checked).")
      .def(
          "expect_imm",
          [](PyEngine& e, uint32_t imm, uint64_t count) {
            return MakeHandle(e, e.ExpectImm("expect_imm", imm, count));
          },
          py::arg("imm"), py::arg("count"),
          "A handle that finishes once `count` arrivals of `imm` are there, consuming them.")
      .def(
          "imm_count", [](PyEngine& e, uint32_t imm) { return e.engine()->ImmAvailable(imm); }, py::arg("imm"),
          "Arrivals of `imm` not yet consumed.")
      .def(
          "wait_imm",
          [](PyEngine& e, uint32_t imm, uint64_t count, std::optional<double> timeout) {
            if (e.engine()->TryConsumeImm(imm, count)) return;
            WaitOrRaise(MakeHandle(e, e.ExpectImm("wait_imm", imm, count)), timeout);
          },
          py::arg("imm"), py::arg("count"), py::arg("timeout") = py::none(),
          "Blocks until `count` arrivals of `imm` are there and consumes them; TimeoutError after `timeout` "
          "seconds (the expectation then stays armed and consumes the arrivals when they come).")
      .def(
          "try_consume_imm",
          [](PyEngine& e, uint32_t imm, uint64_t count) { return e.engine()->TryConsumeImm(imm, count); },
          py::arg("imm"), py::arg("count"))
      .def(
          "forget_imm", [](PyEngine& e, uint32_t imm) { return e.engine()->ForgetImm(imm); }, py::arg("imm"),
          "Drops the expectations and unconsumed arrivals of `imm`; returns how many arrivals were dropped.")
      .def(
          "send",
          [](PyEngine& e, const PeerState& peer, py::buffer data) {
            py::buffer_info info = data.request();
            if (!PyBuffer_IsContiguous(info.view(), 'C'))
              Throw(te::InvalidArgument("send: the message buffer is not contiguous"));
            std::span<const uint8_t> bytes(static_cast<const uint8_t*>(info.ptr), size_t(info.size * info.itemsize));
            te::TransferEngine* t = e.engine();
            // Send copies the bytes before it returns; `info` holds the export until then.
            return MakeHandle(
                e, e.Start("send", {}, [&](te::Completion c) { return t->Send(peer.peer, bytes, std::move(c)); }));
          },
          py::arg("peer"), py::arg("data"),
          "Sends a control message (at most max_message_bytes) to `peer`; the peer reads it with recv().")
      .def(
          "recv",
          [](PyEngine& e, std::optional<double> timeout) {
            auto msg = e.Recv(timeout);
            if (!msg) RaiseTimeout("no message within " + std::to_string(timeout.value_or(0)) + " s");
            return MessageTuple(*msg);
          },
          py::arg("timeout") = py::none(), "The next control message as (sender address, data).")
      .def(
          "try_recv",
          [](PyEngine& e) -> py::object {
            auto msg = e.TryRecv();
            if (!msg) return py::none();
            return MessageTuple(*msg);
          },
          "The next control message, or None.")
      .def(
          "wait", [](PyEngine& e, const PyHandle& h, std::optional<double> timeout) { WaitOrRaise(h, timeout); },
          py::arg("handle"), py::arg("timeout") = py::none(), "Same as handle.wait(timeout).")
      .def(
          "wait_all",
          [](PyEngine& e, const std::vector<PyHandle>& hs, std::optional<double> timeout) {
            std::vector<std::shared_ptr<HandleState>> states;
            states.reserve(hs.size());
            for (const auto& h : hs) states.push_back(h.state);
            if (!e.WaitAll(states, timeout))
              RaiseTimeout(std::to_string(hs.size()) + " requests not all finished after " +
                           std::to_string(timeout.value_or(0)) + " s");
            for (const auto& h : hs)
              if (h.state->state.load() == HandleState::kFailed) Throw(h.state->status);
          },
          py::arg("handles"), py::arg("timeout") = py::none(),
          "Blocks until every handle finished; raises the first failure's TransferError.")
      .def("poll", &PyEngine::Poll,
           "Drives progress (manual mode) and releases finished requests' references; returns how many "
           "requests finished since the last poll().")
      .def(
          "stats",
          [](PyEngine& e) {
            py::dict d = StatsDict(e.engine()->stats());
            d["python_messages_dropped"] = e.messages_dropped();
            return d;
          },
          "The engine's counters (te::EngineStats) as a dict.")
      .def("_watch", [](PyEngine& e, const PyHandle& h) { e.Watch(h.state); })
      .def("_drain_watched", &PyEngine::DrainWatched);

  BindRequests(m, engine);
}

py::object WrapHandle(PyEngine& e, std::shared_ptr<HandleState> h) { return py::cast(MakeHandle(e, std::move(h))); }

}  // namespace tepy
