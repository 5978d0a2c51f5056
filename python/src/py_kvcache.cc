// The KV-cache plane from Python: KvLayout, KvInstanceInfo, KvPrefiller,
// KvDecoder and the Redis registry, over the C++ classes in kvcache/.
//
// The planes' callbacks (on_sent, on_pull, on_ready) run on engine or plane
// threads, so they never call Python: they queue an event (prefiller) or
// finish a Handle (decoder), and Python collects them.
#include <pybind11/chrono.h>
#include <pybind11/stl.h>

#include <condition_variable>
#include <deque>
#include <mutex>

#include "kvcache/kv_decoder.h"
#include "kvcache/kv_prefiller.h"
#include "kvcache/kv_registry.h"
#include "py_engine.h"
#include "py_kvcache.h"
#include "py_requests.h"
#include "status_error.h"

namespace py = pybind11;
using namespace te::kvcache;

namespace tepy {
namespace {

// The cache memory a plane is created over: host memory of at least
// `needed` bytes.
MemoryView CacheMemory(py::handle memory, uint64_t needed, const char* who) {
  MemoryView v = ViewOf(memory, "auto");
  if (v.cuda) Throw(te::Unimplemented(std::string(who) + ": the KV plane's Python binding takes host memory"));
  if (v.nbytes < needed)
    Throw(te::InvalidArgument(std::string(who) + ": memory holds " + std::to_string(v.nbytes) +
                              " bytes; the layout and options need " + std::to_string(needed) + " (memory_bytes())"));
  return v;
}

// Runs `f` (returning a Status) with the GIL released; raises what it returns.
template <typename F>
void CheckReleased(F f) {
  te::Status s;
  {
    py::gil_scoped_release release;
    s = f();
  }
  Check(s);
}

py::object ErrorOrNone(const te::Status& s) { return s.ok() ? py::object(py::none()) : ErrorObject(s); }

// ---- Prefiller

class PyPrefiller {
 public:
  PyPrefiller(std::shared_ptr<PyEngine> engine, const KvLayout& layout, uint32_t rank, py::handle memory,
              PrefillerOptions options)
      : engine_(std::move(engine)) {
    view_ = CacheMemory(memory, KvPrefiller::MemoryBytes(layout, options), "KvPrefiller");
    options.on_sent = [this](uint64_t request, const te::Status& s) {
      std::lock_guard<std::mutex> lock(mu_);
      sent_.emplace_back(request, s);
      cv_.notify_all();
    };
    options.on_pull = [this](uint64_t request, size_t pages) {
      std::lock_guard<std::mutex> lock(mu_);
      pulls_.emplace_back(request, pages);
      cv_.notify_all();
    };
    te::TransferEngine* e = engine_->engine();
    auto* data = static_cast<uint8_t*>(view_.data);
    te::Result<std::unique_ptr<KvPrefiller>> made = [&] {
      py::gil_scoped_release release;
      return KvPrefiller::Create(e, layout, rank, data, options);
    }();
    prefiller_ = Unwrap(std::move(made));
    engine_->AttachPlane();
  }
  ~PyPrefiller() { Close(); }

  void Close() {
    if (!prefiller_) return;
    {
      py::gil_scoped_release release;
      prefiller_.reset();
    }
    engine_->DetachPlane();
  }
  KvPrefiller& p() {
    if (!prefiller_) Throw(te::Cancelled("the prefiller is closed"));
    return *prefiller_;
  }

  // (request, error or None) for every request whose pages may be reused.
  py::list PollSent() {
    std::deque<std::pair<uint64_t, te::Status>> got;
    {
      std::lock_guard<std::mutex> lock(mu_);
      got.swap(sent_);
    }
    py::list out;
    for (auto& [id, s] : got) out.append(py::make_tuple(id, ErrorOrNone(s)));
    return out;
  }
  py::list PollPulls() {
    std::deque<std::pair<uint64_t, size_t>> got;
    {
      std::lock_guard<std::mutex> lock(mu_);
      got.swap(pulls_);
    }
    py::list out;
    for (auto& [id, n] : got) out.append(py::make_tuple(id, n));
    return out;
  }
  // Blocks until `request` is reported sent; returns its error or None.
  py::object WaitSent(uint64_t request, std::optional<double> timeout) {
    using Clock = std::chrono::steady_clock;
    const auto deadline =
        timeout ? Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(*timeout))
                : Clock::time_point::max();
    while (true) {
      std::optional<te::Status> found;
      {
        py::gil_scoped_release release;
        std::unique_lock<std::mutex> lock(mu_);
        auto has = [&] {
          for (auto it = sent_.begin(); it != sent_.end(); ++it)
            if (it->first == request) {
              found = it->second;
              sent_.erase(it);
              return true;
            }
          return false;
        };
        cv_.wait_until(lock, std::min(deadline, Clock::now() + std::chrono::milliseconds(50)), has);
      }
      if (found) return ErrorOrNone(*found);
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      if (Clock::now() >= deadline)
        RaiseTimeout("request " + std::to_string(request) + " not sent within " + std::to_string(*timeout) + " s");
    }
  }

 private:
  std::shared_ptr<PyEngine> engine_;
  MemoryView view_;
  std::unique_ptr<KvPrefiller> prefiller_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<uint64_t, te::Status>> sent_;
  std::deque<std::pair<uint64_t, size_t>> pulls_;
};

// ---- Decoder

class PyDecoder {
 public:
  PyDecoder(std::shared_ptr<PyEngine> engine, const KvLayout& layout, uint32_t rank, py::handle memory,
            const DecoderOptions& options)
      : engine_(std::move(engine)) {
    view_ = CacheMemory(memory, KvDecoder::MemoryBytes(layout, options), "KvDecoder");
    te::TransferEngine* e = engine_->engine();
    auto* data = static_cast<uint8_t*>(view_.data);
    te::Result<std::unique_ptr<KvDecoder>> made = [&] {
      py::gil_scoped_release release;
      return KvDecoder::Create(e, layout, rank, data, options);
    }();
    decoder_ = Unwrap(std::move(made));
    engine_->AttachPlane();
  }
  ~PyDecoder() { Close(); }

  void Close() {
    if (!decoder_) return;
    {
      py::gil_scoped_release release;
      decoder_.reset();  // fails requests in flight with CANCELLED: their handles finish
    }
    engine_->DetachPlane();
  }
  KvDecoder& d() {
    if (!decoder_) Throw(te::Cancelled("the decoder is closed"));
    return *decoder_;
  }

  py::object Receive(uint64_t id, const KvInstanceInfo& prefill, std::vector<uint32_t> pages) {
    KvDecoder& dec = d();
    PyEngine* e = engine_.get();
    auto h = e->Begin("kv_receive", {});
    HandleState* hp = h.get();
    te::Status s;
    {
      py::gil_scoped_release release;
      s = dec.Receive(id, prefill, std::move(pages),
                      [e, hp](uint64_t, const te::Status& status, std::span<const uint8_t> context) {
                        hp->payload.assign(context.begin(), context.end());
                        e->Finish(hp, status);
                      });
    }
    if (!s.ok()) {
      e->Finish(hp, s);
      e->Reap();
      Throw(s);
    }
    return WrapHandle(*e, std::move(h));
  }

 private:
  std::shared_ptr<PyEngine> engine_;
  MemoryView view_;
  std::unique_ptr<KvDecoder> decoder_;
};

class PyRegistration {
 public:
  PyRegistration(KvRegistry* registry, RegistryEntry entry, std::chrono::milliseconds ttl) {
    auto r = [&] {
      py::gil_scoped_release release;
      return KvRegistration::Start(
          registry, std::move(entry), [this] { return load_.load(); }, ttl);
    }();
    reg_ = Unwrap(std::move(r));
  }
  ~PyRegistration() {
    py::gil_scoped_release release;
    reg_.reset();
  }
  void SetLoad(uint32_t load) { load_.store(load); }
  void Leave(std::chrono::milliseconds drain_timeout) {
    CheckReleased([&] { return reg_->Leave(drain_timeout); });
  }

 private:
  std::atomic<uint32_t> load_{0};
  std::unique_ptr<KvRegistration> reg_;
};

std::string OrderName(KvOrder o) { return o == KvOrder::kHND ? "HND" : "NHD"; }

}  // namespace

void BindKvCache(py::module_& m) {
  py::class_<KvLayout>(m, "KvLayout",
                       "A paged KV cache as one tensor-parallel rank holds it (kvcache/kv_layout.h). "
                       "order is 'NHD' (vLLM) or 'HND' (FlashInfer).")
      .def(py::init<>())
      .def(py::init([](uint32_t layers, uint32_t page_tokens, uint32_t kv_heads, uint32_t head_dim,
                       uint32_t dtype_bytes, bool mla, const std::string& order, uint32_t tp, uint32_t pages) {
             KvLayout l;
             l.layers = layers;
             l.page_tokens = page_tokens;
             l.kv_heads = kv_heads;
             l.head_dim = head_dim;
             l.dtype_bytes = dtype_bytes;
             l.mla = mla;
             if (order != "NHD" && order != "HND") Throw(te::InvalidArgument("order '" + order + "'; valid: NHD, HND"));
             l.order = order == "HND" ? KvOrder::kHND : KvOrder::kNHD;
             l.tp = tp;
             l.pages = pages;
             Check(l.Validate());
             return l;
           }),
           py::kw_only(), py::arg("layers"), py::arg("page_tokens"), py::arg("kv_heads"), py::arg("head_dim"),
           py::arg("dtype_bytes") = 2, py::arg("mla") = false, py::arg("order") = "NHD", py::arg("tp") = 1,
           py::arg("pages"))
      .def_static(
          "preset",
          [](const std::string& name, uint32_t pages, uint32_t tp, const std::string& order) {
            KvLayout l = Unwrap(KvLayout::Preset(name));
            l.pages = pages;
            l.tp = tp;
            if (order != "NHD" && order != "HND") Throw(te::InvalidArgument("order '" + order + "'; valid: NHD, HND"));
            l.order = order == "HND" ? KvOrder::kHND : KvOrder::kNHD;
            Check(l.Validate());
            return l;
          },
          py::arg("name"), py::kw_only(), py::arg("pages"), py::arg("tp") = 1, py::arg("order") = "NHD",
          "A model shape ('llama70b', 'deepseek') with this instance's pages, tp and order.")
      .def_readwrite("layers", &KvLayout::layers)
      .def_readwrite("page_tokens", &KvLayout::page_tokens)
      .def_readwrite("kv_heads", &KvLayout::kv_heads)
      .def_readwrite("head_dim", &KvLayout::head_dim)
      .def_readwrite("dtype_bytes", &KvLayout::dtype_bytes)
      .def_readwrite("mla", &KvLayout::mla)
      .def_property(
          "order", [](const KvLayout& l) { return OrderName(l.order); },
          [](KvLayout& l, const std::string& o) {
            if (o != "NHD" && o != "HND") Throw(te::InvalidArgument("order '" + o + "'; valid: NHD, HND"));
            l.order = o == "HND" ? KvOrder::kHND : KvOrder::kNHD;
          })
      .def_readwrite("tp", &KvLayout::tp)
      .def_readwrite("pages", &KvLayout::pages)
      .def("validate", [](const KvLayout& l) { Check(l.Validate()); })
      .def_property_readonly("tensors", &KvLayout::tensors)
      .def_property_readonly("local_heads", &KvLayout::local_heads)
      .def_property_readonly("page_bytes", &KvLayout::page_bytes)
      .def_property_readonly("region_bytes", &KvLayout::region_bytes)
      .def_property_readonly("page_bytes_all_layers", &KvLayout::page_bytes_all_layers)
      .def("first_head", &KvLayout::first_head, py::arg("rank"))
      .def(
          "offset",
          [](const KvLayout& l, uint32_t layer, uint32_t tensor, uint32_t page, uint32_t token, uint32_t head) {
            Check(l.Validate());
            if (layer >= l.layers || tensor >= l.tensors() || page >= l.pages || token >= l.page_tokens ||
                head >= l.local_heads())
              Throw(te::OutOfRange("offset(layer " + std::to_string(layer) + ", tensor " + std::to_string(tensor) +
                                   ", page " + std::to_string(page) + ", token " + std::to_string(token) + ", head " +
                                   std::to_string(head) + ") is outside " + l.Describe()));
            return l.Offset(layer, tensor, page, token, head);
          },
          py::arg("layer"), py::arg("tensor"), py::arg("page"), py::arg("token"), py::arg("local_head"),
          "Byte offset of one head of one token in the region.")
      .def("describe", &KvLayout::Describe)
      .def("serialize", &KvLayout::Serialize)
      .def_static(
          "parse", [](const std::string& text) { return Unwrap(KvLayout::Parse(text)); }, py::arg("text"))
      .def("__repr__", [](const KvLayout& l) { return "<KvLayout " + l.Describe() + ">"; })
      .def(py::pickle([](const KvLayout& l) { return l.Serialize(); },
                      [](const std::string& s) { return Unwrap(KvLayout::Parse(s)); }));

  m.def(
      "check_compatible", [](const KvLayout& a, const KvLayout& b) { Check(CheckCompatible(a, b)); }, py::arg("src"),
      py::arg("dst"), "Raises TransferError unless src's cache can be written into dst's.");

  py::class_<KvInstanceInfo>(m, "KvInstanceInfo",
                             "An instance as peers see it: role, name, layout and each rank's engine address.")
      .def(py::init([](const std::string& role, const std::string& name, const KvLayout& layout,
                       const std::vector<py::bytes>& ranks) {
             KvInstanceInfo info;
             info.role = role;
             info.name = name;
             info.layout = layout;
             for (const auto& r : ranks) {
               std::string s = r;
               info.ranks.push_back(Unwrap(te::EngineAddress::Deserialize(
                   std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size()))));
             }
             // The same checks a peer's parser applies.
             return Unwrap(KvInstanceInfo::Parse(info.Serialize()));
           }),
           py::arg("role"), py::arg("name"), py::arg("layout"), py::arg("ranks"))
      .def_readonly("role", &KvInstanceInfo::role)
      .def_readonly("name", &KvInstanceInfo::name)
      .def_readonly("layout", &KvInstanceInfo::layout)
      .def_property_readonly("ranks",
                             [](const KvInstanceInfo& i) {
                               py::list out;
                               for (const auto& a : i.ranks) {
                                 auto b = a.Serialize();
                                 out.append(py::bytes(reinterpret_cast<const char*>(b.data()), b.size()));
                               }
                               return out;
                             })
      .def("serialize", &KvInstanceInfo::Serialize)
      .def_static(
          "parse", [](const std::string& text) { return Unwrap(KvInstanceInfo::Parse(text)); }, py::arg("text"))
      .def(py::pickle([](const KvInstanceInfo& i) { return i.Serialize(); },
                      [](const std::string& s) { return Unwrap(KvInstanceInfo::Parse(s)); }));

  py::class_<PyPrefiller>(m, "KvPrefiller",
                          "One tensor-parallel rank of a prefill instance (kvcache/kv_prefiller.h): start(), "
                          "layer_done() per layer, finish() with the context; decode ranks pull.")
      .def(py::init([](std::shared_ptr<PyEngine> engine, const KvLayout& layout, uint32_t rank, py::handle memory,
                       uint32_t context_slots, uint64_t context_bytes, std::chrono::milliseconds heartbeat_interval,
                       std::chrono::milliseconds peer_timeout, std::chrono::milliseconds pull_timeout) {
             PrefillerOptions o;
             o.context_slots = context_slots;
             o.context_bytes = context_bytes;
             o.heartbeat_interval = heartbeat_interval;
             o.peer_timeout = peer_timeout;
             o.pull_timeout = pull_timeout;
             return std::make_unique<PyPrefiller>(std::move(engine), layout, rank, memory, o);
           }),
           py::arg("engine"), py::arg("layout"), py::arg("rank"), py::arg("memory"), py::kw_only(),
           py::arg("context_slots") = 64, py::arg("context_bytes") = 16384,
           py::arg("heartbeat_interval") = std::chrono::milliseconds(100),
           py::arg("peer_timeout") = std::chrono::milliseconds(2000),
           py::arg("pull_timeout") = std::chrono::milliseconds(10000))
      .def_static(
          "memory_bytes",
          [](const KvLayout& l, uint32_t context_slots, uint64_t context_bytes) {
            PrefillerOptions o;
            o.context_slots = context_slots;
            o.context_bytes = context_bytes;
            return KvPrefiller::MemoryBytes(l, o);
          },
          py::arg("layout"), py::kw_only(), py::arg("context_slots") = 64, py::arg("context_bytes") = 16384,
          "Bytes of memory the prefiller needs: the cache, then the context staging.")
      .def(
          "start",
          [](PyPrefiller& p, uint64_t request, py::handle pages) {
            std::vector<uint32_t> v = py::cast<std::vector<uint32_t>>(pages);
            KvPrefiller& k = p.p();
            CheckReleased([&] { return k.Start(request, std::move(v)); });
          },
          py::arg("request"), py::arg("pages"))
      .def(
          "layer_done",
          [](PyPrefiller& p, uint64_t request, uint32_t layer) {
            KvPrefiller& k = p.p();
            CheckReleased([&] { return k.LayerDone(request, layer); });
          },
          py::arg("request"), py::arg("layer"))
      .def(
          "finish",
          [](PyPrefiller& p, uint64_t request, const py::bytes& context) {
            std::string c = context;
            KvPrefiller& k = p.p();
            CheckReleased([&] {
              return k.Finish(request, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(c.data()), c.size()));
            });
          },
          py::arg("request"), py::arg("context") = py::bytes())
      .def(
          "abort",
          [](PyPrefiller& p, uint64_t request, const std::string& why) {
            KvPrefiller& k = p.p();
            CheckReleased([&] { return k.Abort(request, why); });
          },
          py::arg("request"), py::arg("why") = "aborted")
      .def("poll_sent", &PyPrefiller::PollSent,
           "[(request, error or None)]: requests whose pages may be reused since the last call.")
      .def("wait_sent", &PyPrefiller::WaitSent, py::arg("request"), py::arg("timeout") = py::none(),
           "Blocks until `request`'s pages may be reused; returns None (every decode rank got it) or the "
           "TransferError saying why not.")
      .def("poll_pulls", &PyPrefiller::PollPulls,
           "[(request, pages)]: requests decode ranks asked for that this rank has not started.")
      .def("stats",
           [](PyPrefiller& p) {
             auto s = p.p().stats();
             py::dict d;
             d["requests_sent"] = s.requests_sent;
             d["requests_failed"] = s.requests_failed;
             d["writes"] = s.writes;
             d["bytes"] = s.bytes;
             return d;
           })
      .def("active_requests", [](PyPrefiller& p) { return p.p().active_requests(); })
      .def("close", &PyPrefiller::Close)
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PyPrefiller& p, py::args) { p.Close(); });

  py::class_<PyDecoder>(m, "KvDecoder",
                        "One tensor-parallel rank of a decode instance (kvcache/kv_decoder.h): receive() pulls a "
                        "request's pages from a prefill instance; the Handle finishes when all have landed.")
      .def(py::init([](std::shared_ptr<PyEngine> engine, const KvLayout& layout, uint32_t rank, py::handle memory,
                       uint32_t imm_base, uint32_t context_slots, uint64_t context_bytes,
                       std::chrono::milliseconds heartbeat_interval, std::chrono::milliseconds peer_timeout) {
             DecoderOptions o;
             o.imm_base = imm_base;
             o.context_slots = context_slots;
             o.context_bytes = context_bytes;
             o.heartbeat_interval = heartbeat_interval;
             o.peer_timeout = peer_timeout;
             return std::make_unique<PyDecoder>(std::move(engine), layout, rank, memory, o);
           }),
           py::arg("engine"), py::arg("layout"), py::arg("rank"), py::arg("memory"), py::kw_only(),
           py::arg("imm_base") = 0x4B000000u, py::arg("context_slots") = 64, py::arg("context_bytes") = 16384,
           py::arg("heartbeat_interval") = std::chrono::milliseconds(100),
           py::arg("peer_timeout") = std::chrono::milliseconds(2000))
      .def_static(
          "memory_bytes",
          [](const KvLayout& l, uint32_t context_slots, uint64_t context_bytes) {
            DecoderOptions o;
            o.context_slots = context_slots;
            o.context_bytes = context_bytes;
            return KvDecoder::MemoryBytes(l, o);
          },
          py::arg("layout"), py::kw_only(), py::arg("context_slots") = 64, py::arg("context_bytes") = 16384)
      .def(
          "receive",
          [](PyDecoder& d, uint64_t request, const KvInstanceInfo& prefill, py::handle pages) {
            return d.Receive(request, prefill, py::cast<std::vector<uint32_t>>(pages));
          },
          py::arg("request"), py::arg("prefill"), py::arg("pages"),
          "Pulls `request` into `pages` from `prefill`'s ranks. The Handle finishes once every page of every "
          "layer and the context landed (payload = context), or fails (CANCELLED after cancel()).")
      .def(
          "cancel",
          [](PyDecoder& d, uint64_t request) {
            KvDecoder& k = d.d();
            CheckReleased([&] { return k.Cancel(request); });
          },
          py::arg("request"),
          "Asks the sources to stop; the request's Handle then fails with CANCELLED once nothing more can "
          "land in its pages (or succeeds if everything landed first).")
      .def("stats",
           [](PyDecoder& d) {
             auto s = d.d().stats();
             py::dict out;
             out["requests_ready"] = s.requests_ready;
             out["requests_cancelled"] = s.requests_cancelled;
             out["requests_failed"] = s.requests_failed;
             return out;
           })
      .def("active_requests", [](PyDecoder& d) { return d.d().active_requests(); })
      .def("close", &PyDecoder::Close)
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PyDecoder& d, py::args) { d.Close(); });

  py::class_<RegistryEntry>(m, "RegistryEntry", "An instance's registry entry.")
      .def(py::init([](const KvInstanceInfo& info, uint32_t capacity, uint32_t load, bool draining) {
             return RegistryEntry{info, capacity, load, draining};
           }),
           py::arg("info"), py::arg("capacity") = 0, py::arg("load") = 0, py::arg("draining") = false)
      .def_readwrite("info", &RegistryEntry::info)
      .def_readwrite("capacity", &RegistryEntry::capacity)
      .def_readwrite("load", &RegistryEntry::load)
      .def_readwrite("draining", &RegistryEntry::draining);

  py::class_<KvRegistry>(m, "KvRegistry", "Live instances in Redis (kvcache/kv_registry.h).")
      .def_static(
          "connect",
          [](const std::string& address, const std::string& prefix, std::chrono::milliseconds timeout) {
            auto r = [&] {
              py::gil_scoped_release release;
              return KvRegistry::Connect(address, prefix, timeout);
            }();
            return Unwrap(std::move(r));
          },
          py::arg("address"), py::arg("prefix") = "tekv", py::arg("timeout") = std::chrono::milliseconds(2000),
          "`address`: 'host:port' or 'unix:/path/to/socket'.")
      .def(
          "put",
          [](KvRegistry& r, const RegistryEntry& e, std::chrono::milliseconds ttl) {
            CheckReleased([&] { return r.Put(e, ttl); });
          },
          py::arg("entry"), py::arg("ttl") = std::chrono::milliseconds(3000))
      .def(
          "remove",
          [](KvRegistry& r, const std::string& role, const std::string& name) {
            CheckReleased([&] { return r.Remove(role, name); });
          },
          py::arg("role"), py::arg("name"))
      .def(
          "list",
          [](KvRegistry& r, const std::string& role) {
            auto l = [&] {
              py::gil_scoped_release release;
              return r.List(role);
            }();
            return Unwrap(std::move(l));
          },
          py::arg("role"));

  py::class_<PyRegistration>(m, "KvRegistration",
                             "Keeps an entry alive (a heartbeat every ttl/3) with the load set_load() gives.")
      .def(py::init([](KvRegistry& registry, const RegistryEntry& entry, std::chrono::milliseconds ttl) {
             return std::make_unique<PyRegistration>(&registry, entry, ttl);
           }),
           py::arg("registry"), py::arg("entry"), py::arg("ttl") = std::chrono::milliseconds(3000),
           py::keep_alive<1, 2>())
      .def("set_load", &PyRegistration::SetLoad, py::arg("load"))
      .def("leave", &PyRegistration::Leave, py::arg("drain_timeout") = std::chrono::milliseconds(30000),
           "Marks the entry draining, waits for load 0 (set_load), then removes it.");
}

}  // namespace tepy
