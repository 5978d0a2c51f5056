// The weight-update plane from Python: WeightModel, WeightLayout,
// WeightReceiver and WeightPusher over weightsync/, with the engines' own
// tensors by name (a dict of numpy arrays, torch tensors or any buffer).
//
// A tensor is taken as memory (memory_view.h): its bytes must be the
// shard's exactly. Its shape is checked too when its element size is the
// parameter's (numpy has no bf16, so a bf16 shard may come as uint16 with
// the shard's shape, or as flat bytes). The receiver and pusher keep every
// tensor alive until close().
#include <pybind11/stl.h>

#include <cctype>
#include <chrono>
#include <thread>

#include "py_engine.h"
#include "py_weightsync.h"
#include "status_error.h"
#include "weightsync/fp8_conversion.h"
#include "weightsync/schedule.h"
#include "weightsync/weight_pusher.h"
#include "weightsync/weight_receiver.h"

namespace py = pybind11;
using namespace te::weightsync;

namespace tepy {
namespace {

std::string Lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// dict name -> tensor  =>  TensorMap, keeping the views alive in `views`.
TensorMap TensorsFrom(const py::dict& tensors, const ShardLayout& layout, std::vector<MemoryView>* views) {
  TensorMap map;
  std::map<std::string, size_t> index;
  for (size_t p = 0; p < layout.model().params.size(); ++p) index[layout.model().params[p].name] = p;
  for (auto [k, v] : tensors) {
    const std::string name = py::cast<std::string>(k);
    MemoryView view = ViewOf(v, "auto");
    NamedTensor t;
    t.data = view.data;
    t.bytes = view.nbytes;
    t.memory = view.cuda ? te::Memory::Cuda(view.device) : te::Memory::Host();
    auto it = index.find(name);
    if (it != index.end() && py::hasattr(v, "shape")) {
      size_t itemsize = 0;
      if (py::hasattr(v, "itemsize"))
        itemsize = py::cast<size_t>(v.attr("itemsize"));
      else if (py::hasattr(v, "element_size"))
        itemsize = py::cast<size_t>(v.attr("element_size")());
      if (itemsize == DTypeBytes(layout.model().params[it->second].dtype))
        for (auto d : v.attr("shape")) t.shape.push_back(py::cast<uint64_t>(d));
    }
    map[name] = t;
    views->push_back(std::move(view));
  }
  return map;
}

std::vector<uint64_t> ShardShape(const ShardLayout& l, size_t p, uint32_t rank) {
  return l.ShardBox(p, rank).extents();
}

size_t ParamIndex(const ShardLayout& l, const std::string& name) {
  const auto& ps = l.model().params;
  for (size_t p = 0; p < ps.size(); ++p)
    if (ps[p].name == name) return p;
  Throw(te::NotFound("parameter '" + name + "' is not in the model"));
}

class PyWeightReceiver {
 public:
  PyWeightReceiver(std::shared_ptr<PyEngine> engine, const ShardLayout& layout, uint32_t rank, uint32_t sources,
                   const py::object& tensors, double timeout)
      : engine_(std::move(engine)) {
    std::vector<TensorMap> sets;
    if (py::isinstance<py::dict>(tensors)) {
      sets.push_back(TensorsFrom(tensors, layout, &views_));
    } else {
      for (auto d : tensors) sets.push_back(TensorsFrom(py::cast<py::dict>(d), layout, &views_));
    }
    ReceiverOptions o;
    if (!(timeout > 0 && timeout < 86400)) Throw(te::InvalidArgument("timeout must be in (0, 86400) seconds"));
    o.timeout = std::chrono::milliseconds(int64_t(timeout * 1000));
    te::TransferEngine* e = engine_->engine();
    auto made = [&] {
      py::gil_scoped_release release;
      return WeightReceiver::CreateNamed(e, layout, rank, sources, sets, o);
    }();
    receiver_ = Unwrap(std::move(made));
    engine_->AttachPlane();
  }
  ~PyWeightReceiver() { Close(); }
  void Close() {
    if (!receiver_) return;
    {
      py::gil_scoped_release release;
      receiver_.reset();
    }
    views_.clear();
    engine_->DetachPlane();
  }
  WeightReceiver& r() {
    if (!receiver_) Throw(te::Cancelled("the receiver is closed"));
    return *receiver_;
  }
  // Waits until `version` is published (True), or has failed here or the
  // timeout passed (False). The GIL is released while waiting.
  bool Wait(uint64_t version, double timeout) {
    WeightReceiver& rx = r();
    const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout);
    while (true) {
      if (rx.published() >= version) return true;
      if (rx.header().failed.load() >= version) return false;
      if (std::chrono::steady_clock::now() >= end) return false;
      {
        py::gil_scoped_release release;
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    }
  }

 private:
  std::shared_ptr<PyEngine> engine_;
  std::vector<MemoryView> views_;
  std::unique_ptr<WeightReceiver> receiver_;
};

class PyWeightPusher {
 public:
  PyWeightPusher(std::shared_ptr<PyEngine> engine, const ShardLayout& src, const ShardLayout& dst, uint32_t rank,
                 const py::dict& tensors, const PusherOptions& options)
      : engine_(std::move(engine)) {
    TensorMap map = TensorsFrom(tensors, src, &views_);
    te::TransferEngine* e = engine_->engine();
    auto made = [&]() -> te::Result<std::unique_ptr<WeightPusher>> {
      py::gil_scoped_release release;
      TE_ASSIGN_OR_RETURN(Schedule s, Schedule::Build(src, dst));
      return WeightPusher::CreateNamed(e, s, src, rank, map, options);
    }();
    pusher_ = Unwrap(std::move(made));
    engine_->AttachPlane();
  }
  ~PyWeightPusher() { Close(); }
  void Close() {
    if (!pusher_) return;
    {
      py::gil_scoped_release release;
      pusher_.reset();
    }
    views_.clear();
    engine_->DetachPlane();
  }
  WeightPusher& p() {
    if (!pusher_) Throw(te::Cancelled("the pusher is closed"));
    return *pusher_;
  }
  py::dict Push(uint64_t version) {
    WeightPusher& px = p();
    auto r = [&] {
      py::gil_scoped_release release;
      return px.Push(version);
    }();
    PushReport rep = Unwrap(std::move(r));
    py::dict d;
    d["version"] = rep.version;
    d["bytes"] = rep.bytes;
    d["writes"] = rep.writes;
    d["seconds"] = rep.seconds;
    d["quantize_seconds"] = rep.quantize_seconds;
    py::dict missed;
    for (const auto& [k, v] : rep.missed) missed[py::int_(k)] = v;
    d["missed"] = missed;
    return d;
  }

 private:
  std::shared_ptr<PyEngine> engine_;
  std::vector<MemoryView> views_;
  std::unique_ptr<WeightPusher> pusher_;
};

}  // namespace

void BindWeightSync(py::module_& m) {
  py::class_<ModelSpec>(m, "WeightModel",
                        "The parameters a weight update moves: name, dtype (bf16, fp16, fp32, fp8, int8), shape.")
      .def(py::init([](const std::vector<std::tuple<std::string, std::string, std::vector<uint64_t>>>& params) {
             ModelSpec s;
             for (const auto& [name, dtype, shape] : params)
               s.params.push_back({name, Unwrap(ParseDType(Lower(dtype))), shape});
             Check(s.Validate());
             return s;
           }),
           py::arg("params"), "From [(name, dtype, shape), ...].")
      .def_static(
          "preset", [](const std::string& name, uint64_t bytes) { return Unwrap(ModelPreset(name, bytes)); },
          py::arg("name"), py::arg("bytes") = 0, "A built-in shape: 'moe', 'dense' (scaled to bytes) or 'tiny'.")
      .def_static(
          "from_json", [](const std::string& text) { return Unwrap(ParseModelJson(text)); }, py::arg("text"))
      .def("to_json", &ModelToJson)
      .def(
          "fp8",
          [](const ModelSpec& s, std::optional<std::vector<std::string>> names) {
            return Unwrap(Fp8Model(s, names.value_or(std::vector<std::string>{})));
          },
          py::arg("names") = py::none(),
          "The model a receiver serving in fp8 declares: the named bf16 parameters (default: every bf16 matrix "
          "but embeddings and heads) as fp8 e4m3, each followed by '<name>.scale' (fp32, 128x128 blocks).")
      .def_property_readonly("params",
                             [](const ModelSpec& s) {
                               py::list out;
                               for (const auto& p : s.params)
                                 out.append(py::make_tuple(p.name, DTypeName(p.dtype), p.shape));
                               return out;
                             })
      .def_property_readonly("bytes", &ModelSpec::bytes)
      .def("__repr__", [](const ModelSpec& s) {
        return "<WeightModel " + std::to_string(s.params.size()) + " parameters, " + std::to_string(s.bytes()) +
               " bytes>";
      });

  py::class_<ShardLayout>(m, "WeightLayout",
                          "How one side holds the model: 'replicated', 'fsdp' or 'tp' over `ranks` ranks.")
      .def(py::init([](const ModelSpec& model, uint32_t ranks, const std::string& kind) {
             return Unwrap(ShardLayout::Named(model, ranks, kind));
           }),
           py::arg("model"), py::arg("ranks"), py::arg("kind"))
      .def_property_readonly("ranks", &ShardLayout::ranks)
      .def_property_readonly("model", &ShardLayout::model)
      .def(
          "shard_shape",
          [](const ShardLayout& l, const std::string& name, uint32_t rank) {
            if (rank >= l.ranks()) Throw(te::InvalidArgument("rank outside the layout"));
            return ShardShape(l, ParamIndex(l, name), rank);
          },
          py::arg("name"), py::arg("rank"), "The extents of `rank`'s shard of parameter `name`.")
      .def(
          "shard_bytes",
          [](const ShardLayout& l, const std::string& name, uint32_t rank) {
            if (rank >= l.ranks()) Throw(te::InvalidArgument("rank outside the layout"));
            return l.ShardBytes(ParamIndex(l, name), rank);
          },
          py::arg("name"), py::arg("rank"))
      .def(
          "shards",
          [](const ShardLayout& l, uint32_t rank) {
            if (rank >= l.ranks()) Throw(te::InvalidArgument("rank outside the layout"));
            py::dict d;
            for (size_t p = 0; p < l.model().params.size(); ++p)
              if (l.ShardBytes(p, rank) > 0)
                d[py::str(l.model().params[p].name)] =
                    py::make_tuple(DTypeName(l.model().params[p].dtype), ShardShape(l, p, rank));
            return d;
          },
          py::arg("rank"), "{name: (dtype, shard shape)} of every parameter `rank` holds: the tensors to give.")
      .def("describe", &ShardLayout::Describe)
      .def("__repr__", [](const ShardLayout& l) { return "<WeightLayout " + l.Describe() + ">"; });

  py::class_<PyWeightReceiver>(m, "WeightReceiver",
                               "The inference side of a weight update, landing in the engine's own tensors.")
      .def(py::init<std::shared_ptr<PyEngine>, const ShardLayout&, uint32_t, uint32_t, const py::object&, double>(),
           py::arg("engine"), py::arg("layout"), py::arg("rank"), py::arg("sources"), py::arg("tensors"),
           py::arg("timeout") = 10.0,
           "tensors: {name: tensor} (in place: pause reads while an update lands), or a list of two such dicts "
           "(double buffered: version v lands in tensors[v % 2]).")
      .def(
          "info", [](PyWeightReceiver& r) { return r.r().Info(); },
          "What sources need (WeightPusher.set_receiver): one line.")
      .def_property_readonly("published", [](PyWeightReceiver& r) { return r.r().published(); })
      .def_property_readonly("begun", [](PyWeightReceiver& r) { return r.r().header().begun.load(); })
      .def_property_readonly("failed", [](PyWeightReceiver& r) { return r.r().header().failed.load(); })
      .def("wait", &PyWeightReceiver::Wait, py::arg("version"), py::arg("timeout") = 30.0,
           "True once `version` is published; False if it failed here or the timeout passed.")
      .def("close", &PyWeightReceiver::Close)
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PyWeightReceiver& r, py::args) { r.Close(); });

  py::class_<PyWeightPusher>(m, "WeightPusher",
                             "The trainer side of a weight update, reading this rank's shards by name.")
      .def(py::init([](std::shared_ptr<PyEngine> engine, const ShardLayout& src, const ShardLayout& dst, uint32_t rank,
                       const py::dict& tensors, uint64_t bucket_bytes, uint64_t staging_bytes, bool zero_copy,
                       double ready_timeout) {
             PusherOptions o;
             o.bucket_bytes = bucket_bytes;
             o.staging_bytes = staging_bytes;
             o.zero_copy = zero_copy;
             if (!(ready_timeout > 0 && ready_timeout < 86400))
               Throw(te::InvalidArgument("ready_timeout must be in (0, 86400) seconds"));
             o.ready_timeout = std::chrono::milliseconds(int64_t(ready_timeout * 1000));
             return std::make_unique<PyWeightPusher>(std::move(engine), src, dst, rank, tensors, o);
           }),
           py::arg("engine"), py::arg("src"), py::arg("dst"), py::arg("rank"), py::arg("tensors"),
           py::arg("bucket_bytes") = 16 << 20, py::arg("staging_bytes") = 256 << 20, py::arg("zero_copy") = true,
           py::arg("ready_timeout") = 2.0,
           "src/dst: the two sides' WeightLayouts (dst's model may take bf16 parameters as fp8: WeightModel.fp8).")
      .def(
          "set_receiver",
          [](PyWeightPusher& p, uint32_t rank, const std::string& info) { Check(p.p().SetReceiver(rank, info)); },
          py::arg("rank"), py::arg("info"), "A receiver's info(); '' marks it absent.")
      .def("push", &PyWeightPusher::Push, py::arg("version"),
           "Writes `version` to every receiver; returns {version, bytes, writes, seconds, quantize_seconds, "
           "missed: {rank: why}}.")
      .def("close", &PyWeightPusher::Close)
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PyWeightPusher& p, py::args) { p.Close(); });
}

}  // namespace tepy
