// MoE dispatch and combine from Python (moe/*.h): ExpertMap, EpDispatcher
// (one class over the four dispatchers, picked by `mode`; the low-latency
// mode also splits each call into send and receive), DispatchResult,
// MergedTokens and Pending.
//
// Tokens go in as any buffer (numpy, torch CPU tensors through DLPack), read
// in place: [tokens, hidden] bf16 (uint16 in numpy) or fp8 bytes. Routing
// comes as arrays (int64 indices are converted). What a dispatch returns
// (each local expert's rows, weights and sources) and what a combine returns
// are numpy arrays that own the dispatcher's result vectors: no copy. Every
// call releases the GIL while it waits for peers, so the ranks of a group may
// be threads of one process.
#include "py_moe.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "moe/coherent_dispatcher.h"
#include "moe/ep_dispatcher.h"
#include "moe/expert_map.h"
#include "moe/hierarchical_dispatcher.h"
#include "moe/ll_dispatcher.h"
#include "py_engine.h"
#include "status_error.h"

namespace py = pybind11;
using namespace te::moe;

namespace tepy {
namespace {

using IntArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using IdArray = py::array_t<uint32_t, py::array::c_style | py::array::forcecast>;

// A numpy array over `v` (moved to the heap), shaped `shape`: no copy.
template <typename T>
py::array Own(std::vector<T>&& v, std::vector<py::ssize_t> shape) {
  auto* held = new std::vector<T>(std::move(v));
  py::capsule free_it(held, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(shape, held->data(), free_it);
}

// One local expert's tokens (Python: ExpertTokens).
struct PyExpertTokens {
  uint32_t expert = 0, count = 0;
  py::array tokens, scales, weights, src_rank, src_token;
};

// A dispatch's result (Python: DispatchResult); combine needs it.
struct PyDispatchResult {
  DispatchResult result;
  std::vector<PyExpertTokens> experts;
  uint64_t dispatcher = 0;  // which dispatcher made it
};

// Tokens living on a rank after a coherent combine (Python: MergedTokens).
struct PyMergedTokens {
  py::array from_rank, ids, data;
};

// What send_dispatch / send_combine return (Python: Pending): recv() makes
// the matching receive call once and returns its result, every time after.
struct PyPending {
  py::object dispatcher;
  const char* receive;  // "recv_dispatch" or "recv_combine"
  py::object result;
  py::object Recv() {
    if (!result) result = dispatcher.attr(receive)();
    return result;
  }
};

enum class Mode { kNormal, kLowLatency, kHierarchical, kCoherent };

Mode ParseMode(const std::string& m) {
  if (m == "normal") return Mode::kNormal;
  if (m == "ll" || m == "low_latency") return Mode::kLowLatency;
  if (m == "hierarchical") return Mode::kHierarchical;
  if (m == "coherent") return Mode::kCoherent;
  Throw(te::InvalidArgument("mode '" + m + "' is not one of normal, ll, hierarchical, coherent"));
}

class PyEpDispatcher {
 public:
  PyEpDispatcher(std::shared_ptr<PyEngine> engine, uint32_t ranks, uint32_t rank, uint32_t experts, uint32_t topk,
                 uint32_t hidden, uint32_t max_tokens, const std::string& payload, const std::string& mode,
                 uint32_t nodes, double timeout, uint32_t private_tokens)
      : engine_(std::move(engine)), mode_(ParseMode(mode)) {
    EpConfig& c = config_;
    c.ranks = ranks, c.rank = rank, c.experts = experts, c.topk = topk, c.hidden = hidden;
    c.max_tokens = max_tokens, c.private_tokens = private_tokens;
    if (payload == "bf16")
      c.payload = Payload::kBf16;
    else if (payload == "fp8")
      c.payload = Payload::kFp8E4M3;
    else
      Throw(te::InvalidArgument("payload '" + payload + "' is not one of bf16, fp8"));
    if (!(timeout > 0 && timeout < 86400)) Throw(te::InvalidArgument("timeout must be in (0, 86400) seconds"));
    c.timeout = std::chrono::milliseconds(int64_t(timeout * 1000));
    te::TransferEngine* e = engine_->engine();
    py::gil_scoped_release release;
    te::Status made;
    switch (mode_) {
      case Mode::kNormal:
        made = Make(EpDispatcher::Create(e, c), &normal_);
        break;
      case Mode::kLowLatency:
        made = Make(LowLatencyDispatcher::Create(e, c), &ll_);
        break;
      case Mode::kHierarchical:
        made = Make(HierarchicalDispatcher::Create(e, c, nodes), &hier_);
        break;
      case Mode::kCoherent:
        made = Make(CoherentDispatcher::Create(e, c), &coherent_);
        break;
    }
    py::gil_scoped_acquire hold;
    Check(made);
    engine_->AttachPlane();
    open_ = true;
  }
  ~PyEpDispatcher() { Close(); }

  void Close() {
    if (!open_) return;
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(call_mu_);  // after a call in flight on another thread
      if (!open_) return;
      normal_.reset(), ll_.reset(), hier_.reset(), coherent_.reset();
      open_ = false;
    }
    engine_->DetachPlane();
  }

  std::string LocalInfo() {
    CheckOpen();
    std::string info;
    Check(Locked([&] {
      info = Call([](auto& d) { return d.LocalInfo(); });
      return te::Status::Ok();
    }));
    return info;
  }

  void Connect(const std::vector<std::string>& infos) {
    CheckOpen();
    Check(Locked([&] { return Call([&](auto& d) { return d.Connect(infos); }); }));
  }

  // The arrays a batch reads, kept alive for the call that reads them.
  struct Batch {
    MemoryView tokens;
    FloatArray scales;
    IdArray ids;
    TokenBatch view;
  };
  Batch BatchOf(const py::object& x, const IntArray& topk_idx, const FloatArray& topk_weights, const py::object& scales,
                const py::object& ids) const {
    const EpConfig& c = config_;
    if (topk_idx.ndim() != 2 || size_t(topk_idx.shape(1)) != c.topk)
      Throw(te::InvalidArgument("topk_idx must be [tokens, " + std::to_string(c.topk) + "]"));
    const size_t T = size_t(topk_idx.shape(0));
    if (topk_weights.size() != py::ssize_t(T * c.topk))
      Throw(te::InvalidArgument("topk_weights must be [" + std::to_string(T) + ", " + std::to_string(c.topk) + "]"));
    Batch b;
    b.tokens = ViewOf(x, "auto");
    if (b.tokens.cuda)  // this binding is the host path; the device path (moe/cuda) is C++ only
      Throw(te::InvalidArgument("tokens are in GPU memory; EpDispatcher takes host memory"));
    if (b.tokens.nbytes != T * c.token_bytes())
      Throw(te::InvalidArgument("tokens hold " + std::to_string(b.tokens.nbytes) + " bytes; " + std::to_string(T) +
                                " tokens of " + std::to_string(c.token_bytes()) + " bytes need " +
                                std::to_string(T * c.token_bytes())));
    if (c.payload == Payload::kFp8E4M3) {
      if (scales.is_none()) Throw(te::InvalidArgument("fp8 payload needs scales [tokens, hidden / 128]"));
      b.scales = FloatArray::ensure(scales);
      if (!b.scales || b.scales.size() != py::ssize_t(T * c.scale_count()))
        Throw(te::InvalidArgument("scales must be [" + std::to_string(T) + ", " + std::to_string(c.scale_count()) +
                                  "] float32"));
    }
    if (!ids.is_none()) {
      if (mode_ != Mode::kCoherent) Throw(te::InvalidArgument("ids name tokens only in coherent mode"));
      b.ids = IdArray::ensure(ids);
      if (!b.ids || b.ids.size() != py::ssize_t(T))
        Throw(te::InvalidArgument("ids must be [" + std::to_string(T) + "] uint32"));
    }
    if (T > c.max_tokens)
      Throw(te::InvalidArgument("tokens " + std::to_string(T) + " exceeds max_tokens " + std::to_string(c.max_tokens)));
    b.view = TokenBatch{uint32_t(T), static_cast<const uint8_t*>(b.tokens.data), b.scales ? b.scales.data() : nullptr,
                        topk_idx.data(), topk_weights.data()};
    return b;
  }

  // The Python view of a filled result: its vectors move into numpy arrays.
  std::shared_ptr<PyDispatchResult> Wrap(std::shared_ptr<PyDispatchResult> r) const {
    const EpConfig& c = config_;
    r->dispatcher = reinterpret_cast<uint64_t>(this);
    for (ExpertTokens& x : r->result.experts) {
      PyExpertTokens e;
      e.expert = x.expert;
      e.count = x.count;
      const py::ssize_t n = x.count;
      if (c.payload == Payload::kBf16) {  // the bytes as bf16 bits, still no copy
        e.tokens = Own(std::move(x.data), {n, py::ssize_t(c.hidden) * 2}).attr("view")(py::dtype::of<uint16_t>());
      } else {
        e.tokens = Own(std::move(x.data), {n, py::ssize_t(c.hidden)});
        e.scales = Own(std::move(x.scales), {n, py::ssize_t(c.scale_count())});
      }
      e.weights = Own(std::move(x.weights), {n});
      e.src_rank = Own(std::move(x.src_rank), {n});
      e.src_token = Own(std::move(x.src_token), {n});
      r->experts.push_back(std::move(e));
    }
    return r;
  }

  std::shared_ptr<PyDispatchResult> Dispatch(const py::object& x, const IntArray& topk_idx,
                                             const FloatArray& topk_weights, const ExpertMap& map,
                                             const py::object& scales, const py::object& ids) {
    CheckOpen();
    const Batch b = BatchOf(x, topk_idx, topk_weights, scales, ids);
    auto r = std::make_shared<PyDispatchResult>();
    const uint32_t* id_data = b.ids ? b.ids.data() : nullptr;
    Check(Locked([&] {
      return Call([&](auto& d) {
        if constexpr (std::is_same_v<std::decay_t<decltype(d)>, CoherentDispatcher>)
          return d.Dispatch(b.view, id_data, map, &r->result);
        else
          return d.Dispatch(b.view, map, &r->result);
      });
    }));
    return Wrap(std::move(r));
  }

  // The low-latency mode's split: posts the dispatch and returns; the records
  // are copied out of `x` before it returns, so the caller may reuse it.
  void SendDispatch(const py::object& x, const IntArray& topk_idx, const FloatArray& topk_weights, const ExpertMap& map,
                    const py::object& scales) {
    CheckOpen();
    RequireSplit("send_dispatch");
    const Batch b = BatchOf(x, topk_idx, topk_weights, scales, py::none());
    Check(Locked([&] { return ll_->SendDispatch(b.view, map); }));
  }
  std::shared_ptr<PyDispatchResult> RecvDispatch() {
    CheckOpen();
    auto r = std::make_shared<PyDispatchResult>();
    Check(Locked([&] { return ll_->RecvDispatch(&r->result); }));
    return Wrap(std::move(r));
  }

  // outputs[i]: local expert i's output [count, hidden] bf16 (any buffer);
  // the views keep them readable for the call.
  ExpertOutputs OutputsOf(const py::list& outputs, const PyDispatchResult& dispatched,
                          std::vector<MemoryView>* views) const {
    if (dispatched.dispatcher != reinterpret_cast<uint64_t>(this))
      Throw(te::InvalidArgument("combine got the result of another dispatcher's dispatch"));
    const EpConfig& c = config_;
    if (outputs.size() != dispatched.experts.size())
      Throw(te::InvalidArgument("combine got " + std::to_string(outputs.size()) + " outputs for " +
                                std::to_string(dispatched.experts.size()) + " local experts"));
    ExpertOutputs outs;
    views->reserve(outputs.size());
    for (size_t i = 0; i < outputs.size(); ++i) {
      const size_t want = size_t(dispatched.experts[i].count) * c.hidden * 2;
      if (want == 0) {
        outs.push_back(nullptr);
        continue;
      }
      views->push_back(ViewOf(outputs[i], "auto"));
      if (views->back().cuda || views->back().nbytes != want)
        Throw(te::InvalidArgument("output of local expert " + std::to_string(i) + " holds " +
                                  std::to_string(views->back().nbytes) + " bytes; it needs " + std::to_string(want) +
                                  " (" + std::to_string(dispatched.experts[i].count) + " x " +
                                  std::to_string(c.hidden) + " bf16) in host memory"));
      outs.push_back(static_cast<const uint16_t*>(views->back().data));
    }
    return outs;
  }

  py::object Combine(const py::list& outputs, const PyDispatchResult& dispatched) {
    CheckOpen();
    const EpConfig& c = config_;
    std::vector<MemoryView> views;
    const ExpertOutputs outs = OutputsOf(outputs, dispatched, &views);
    if (mode_ == Mode::kCoherent) {
      MergedTokens merged;
      Check(Locked([&] { return coherent_->Combine(outs, dispatched.result, &merged); }));
      auto m = std::make_shared<PyMergedTokens>();
      const py::ssize_t n = merged.count;
      m->from_rank = Own(std::move(merged.from_rank), {n});
      m->ids = Own(std::move(merged.ids), {n});
      m->data = Own(std::move(merged.data), {n, py::ssize_t(c.hidden)});
      return py::cast(m);
    }
    std::vector<uint16_t> out(size_t(dispatched.result.handle.tokens) * c.hidden);
    Check(Locked([&] {
      return Call([&](auto& d) -> te::Status {
        if constexpr (std::is_same_v<std::decay_t<decltype(d)>, CoherentDispatcher>)
          return te::Internal("unreachable");
        else
          return d.Combine(outs, dispatched.result, out.data());
      });
    }));
    return Own(std::move(out), {py::ssize_t(dispatched.result.handle.tokens), py::ssize_t(c.hidden)});
  }

  // The split combine: the outputs are summed into the dispatcher's buffers
  // before it returns. RecvCombine returns [tokens, hidden] for the tokens
  // of the pending dispatch.
  void SendCombine(const py::list& outputs, const PyDispatchResult& dispatched) {
    CheckOpen();
    RequireSplit("send_combine");
    std::vector<MemoryView> views;
    const ExpertOutputs outs = OutputsOf(outputs, dispatched, &views);
    Check(Locked([&] { return ll_->SendCombine(outs, dispatched.result); }));
    pending_tokens_ = dispatched.result.handle.tokens;
  }
  py::array RecvCombine() {
    CheckOpen();
    std::vector<uint16_t> out(size_t(pending_tokens_) * config_.hidden);
    Check(Locked([&] { return ll_->RecvCombine(out.data()); }));
    return Own(std::move(out), {py::ssize_t(pending_tokens_), py::ssize_t(config_.hidden)});
  }

  const EpConfig& config() const { return config_; }
  std::string mode() const {
    switch (mode_) {
      case Mode::kLowLatency:
        return "ll";
      case Mode::kHierarchical:
        return "hierarchical";
      case Mode::kCoherent:
        return "coherent";
      default:
        return "normal";
    }
  }

 private:
  template <typename D>
  static te::Status Make(te::Result<std::unique_ptr<D>> made, std::unique_ptr<D>* into) {
    if (!made.ok()) return made.status();
    *into = std::move(made).value();
    return te::Status::Ok();
  }
  void CheckOpen() const {
    if (!open_) Throw(te::Cancelled("the dispatcher is closed"));
  }
  void RequireSplit(const char* call) const {
    if (mode_ != Mode::kLowLatency)
      Throw(te::InvalidArgument(std::string(call) +
                                " is the low-latency mode's (mode=\"ll\"); this dispatcher's mode is " + mode()));
  }
  // f() with the GIL released and the dispatcher to this thread (its calls
  // are one at a time; another Python thread waits here), kCancelled once
  // closed.
  template <typename F>
  te::Status Locked(F&& f) {
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(call_mu_);
    if (!open_) return te::Cancelled("the dispatcher is closed");
    return f();
  }
  // f(dispatcher) on whichever dispatcher this is (open: call_mu_ held).
  template <typename F>
  auto Call(F&& f) -> decltype(f(std::declval<EpDispatcher&>())) {
    if (normal_) return f(*normal_);
    if (ll_) return f(*ll_);
    if (hier_) return f(*hier_);
    return f(*coherent_);
  }

  std::shared_ptr<PyEngine> engine_;
  Mode mode_;
  EpConfig config_;
  std::mutex call_mu_;
  std::atomic<bool> open_{false};
  std::unique_ptr<EpDispatcher> normal_;
  std::unique_ptr<LowLatencyDispatcher> ll_;
  std::unique_ptr<HierarchicalDispatcher> hier_;
  std::unique_ptr<CoherentDispatcher> coherent_;
  uint32_t pending_tokens_ = 0;  // tokens of the dispatch whose combine was sent (split calls)
};

}  // namespace

namespace {

te::moe::ReplicaChoice ReplicaChoiceOf(const std::string& name) { return Unwrap(te::moe::ParseReplicaChoice(name)); }

// ExpertMap::Route for a Python row; -1 where a slot is empty.
std::vector<int64_t> RouteRow(const ExpertMap& map, const std::vector<int32_t>& row, uint32_t source) {
  for (int32_t e : row)
    if (e >= int32_t(map.experts()))
      Throw(te::InvalidArgument("expert " + std::to_string(e) + " outside [0, " + std::to_string(map.experts()) + ")"));
  std::vector<uint32_t> dest(row.size());
  map.Route(row.data(), uint32_t(row.size()), source, ExpertMap::TokenKey(row.data(), uint32_t(row.size())),
            dest.data());
  std::vector<int64_t> out;
  for (uint32_t d : dest) out.push_back(d == ExpertMap::kNoRank ? -1 : int64_t(d));
  return out;
}

}  // namespace

void BindMoe(py::module_& m) {
  py::class_<ExpertMap>(m, "ExpertMap", "Which rank computes each expert of a layer (moe/expert_map.h).")
      .def_static(
          "contiguous", [](uint32_t experts, uint32_t ranks) { return Unwrap(ExpertMap::Contiguous(experts, ranks)); },
          py::arg("experts"), py::arg("ranks"), "Experts 0 .. E/R - 1 on rank 0, and so on.")
      .def_static(
          "from_ranks",
          [](std::vector<uint32_t> rank_of, uint32_t ranks) {
            return Unwrap(ExpertMap::FromRanks(std::move(rank_of), ranks));
          },
          py::arg("rank_of"), py::arg("ranks"), "rank_of[e]: the rank of expert e.")
      .def_static(
          "with_replicas",
          [](std::vector<std::vector<uint32_t>> ranks_of, uint32_t ranks, uint32_t nodes,
             const std::vector<std::tuple<uint32_t, uint32_t, uint32_t, uint32_t>>& splits, const std::string& choice) {
            std::vector<te::moe::TokenSplit> s;
            for (const auto& [expert, source, rank, share] : splits) s.push_back({expert, source, rank, share});
            return Unwrap(ExpertMap::WithReplicas(std::move(ranks_of), ranks, nodes, s, ReplicaChoiceOf(choice)));
          },
          py::arg("ranks_of"), py::arg("ranks"), py::arg("nodes") = 1,
          py::arg("splits") = std::vector<std::tuple<uint32_t, uint32_t, uint32_t, uint32_t>>{},
          py::arg("choice") = "source",
          "ranks_of[e]: the ranks holding expert e, its primary first. splits: (expert, source, rank, share) "
          "token splits, share of 65536 token keys. choice: 'source' (by source and key), 'reached_node' (a "
          "token goes to a copy on a node it reaches anyway) or 'reached_rank' (and on a rank it reaches "
          "anyway, where one holds a copy): moe/expert_map.h.")
      .def_static(
          "token_key",
          [](const std::vector<int32_t>& row) { return ExpertMap::TokenKey(row.data(), uint32_t(row.size())); },
          py::arg("row"), "A token's key in [0, 65536): a hash of its top-k expert ids (-1 for an empty slot).")
      .def_property_readonly("experts", &ExpertMap::experts)
      .def_property_readonly("ranks", &ExpertMap::ranks)
      .def(
          "rank_for",
          [](const ExpertMap& map, uint32_t expert, uint32_t source, std::optional<std::vector<int32_t>> row) {
            if (expert >= map.experts())
              Throw(te::InvalidArgument("expert " + std::to_string(expert) + " outside [0, " +
                                        std::to_string(map.experts()) + ")"));
            if (source >= map.ranks())
              Throw(te::InvalidArgument("source " + std::to_string(source) + " outside [0, " +
                                        std::to_string(map.ranks()) + ")"));
            if (!row) return int64_t(map.ChoiceFor(expert, source));
            const auto at = std::find(row->begin(), row->end(), int32_t(expert));
            if (at == row->end()) Throw(te::InvalidArgument("row does not name expert " + std::to_string(expert)));
            return RouteRow(map, *row, source)[size_t(at - row->begin())];
          },
          py::arg("expert"), py::arg("source"), py::arg("row") = py::none(),
          "The rank source sends a token's tokens of `expert` to; `row`: the token's top-k expert ids, "
          "needed where the map has token splits or reached-node choice (without it: the rule's choice).")
      .def(
          "route",
          [](const ExpertMap& map, const std::vector<int32_t>& row, uint32_t source) {
            if (source >= map.ranks())
              Throw(te::InvalidArgument("source " + std::to_string(source) + " outside [0, " +
                                        std::to_string(map.ranks()) + ")"));
            return RouteRow(map, row, source);
          },
          py::arg("row"), py::arg("source"),
          "Where each slot of a token's row goes from `source` (-1 for an empty slot), as dispatch sends it.")
      .def_property_readonly(
          "choice", [](const ExpertMap& map) { return te::moe::ReplicaChoiceName(map.replica_choice()); },
          "How dispatch chooses among an expert's copies: 'source', 'reached_node' or 'reached_rank'.")
      .def(
          "local_experts",
          [](const ExpertMap& map, uint32_t rank) {
            if (rank >= map.ranks()) Throw(te::InvalidArgument("rank out of range"));
            return map.local_experts(rank);
          },
          py::arg("rank"), "The experts `rank` computes, in the order dispatch returns them.")
      .def("__repr__", [](const ExpertMap& map) {
        return "<ExpertMap " + std::to_string(map.experts()) + " experts on " + std::to_string(map.ranks()) + " ranks" +
               (map.replicated() ? ", replicated>" : ">");
      });

  py::class_<PyExpertTokens>(m, "ExpertTokens", "The tokens one local expert received.")
      .def_readonly("expert", &PyExpertTokens::expert)
      .def_readonly("count", &PyExpertTokens::count)
      .def_readonly("tokens", &PyExpertTokens::tokens, "[count, hidden]: uint16 (bf16 bits) or uint8 (fp8)")
      .def_readonly("scales", &PyExpertTokens::scales, "fp8: [count, hidden / 128] float32; else None")
      .def_readonly("weights", &PyExpertTokens::weights, "[count] this expert's router weight per token")
      .def_readonly("src_rank", &PyExpertTokens::src_rank, "[count] the rank each token came from")
      .def_readonly("src_token", &PyExpertTokens::src_token,
                    "[count] its row there (coherent: its id; hierarchical: the relay's row)")
      .def("__repr__", [](const PyExpertTokens& e) {
        return "<ExpertTokens expert " + std::to_string(e.expert) + ", " + std::to_string(e.count) + " tokens>";
      });

  py::class_<PyDispatchResult, std::shared_ptr<PyDispatchResult>>(m, "DispatchResult",
                                                                  "What dispatch returns; combine takes it back.")
      .def_readonly("experts", &PyDispatchResult::experts, "One ExpertTokens per local expert, ExpertMap order.")
      .def_property_readonly("tokens", [](const PyDispatchResult& r) { return r.result.handle.tokens; });

  py::class_<PyMergedTokens, std::shared_ptr<PyMergedTokens>>(m, "MergedTokens",
                                                              "The tokens living on a rank after a coherent combine.")
      .def_readonly("from_rank", &PyMergedTokens::from_rank, "[n] the rank each token was dispatched from")
      .def_readonly("ids", &PyMergedTokens::ids, "[n] its id there")
      .def_readonly("data", &PyMergedTokens::data, "[n, hidden] uint16 (bf16 bits): the combined output");

  py::class_<PyPending>(m, "Pending", "A posted low-latency send; recv() waits for its result (once).")
      .def("recv", &PyPending::Recv,
           "The matching receive: a DispatchResult after send_dispatch, [T, hidden] uint16 after send_combine.");

  py::class_<PyEpDispatcher>(m, "EpDispatcher",
                             "MoE dispatch/combine for one rank of an expert-parallel group (moe/ep_dispatcher.h).")
      .def(py::init<std::shared_ptr<PyEngine>, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t,
                    const std::string&, const std::string&, uint32_t, double, uint32_t>(),
           py::arg("engine"), py::arg("ranks"), py::arg("rank"), py::arg("experts"), py::arg("topk"), py::arg("hidden"),
           py::arg("max_tokens"), py::arg("payload") = "bf16", py::arg("mode") = "normal", py::arg("nodes") = 1,
           py::arg("timeout") = 10.0, py::arg("private_tokens") = 0,
           "mode: normal, ll (no count exchange), hierarchical (node-level deduplication over `nodes`) or "
           "coherent (combine merges on the top-1 expert's rank).")
      .def("local_info", &PyEpDispatcher::LocalInfo, "What the other ranks need (one line); all-gather it.")
      .def("connect", &PyEpDispatcher::Connect, py::arg("infos"), "infos[r]: rank r's local_info().")
      .def("dispatch", &PyEpDispatcher::Dispatch, py::arg("tokens"), py::arg("topk_idx"), py::arg("topk_weights"),
           py::arg("expert_map"), py::arg("scales") = py::none(), py::arg("ids") = py::none(),
           "tokens [T, hidden] (bf16 as uint16, or fp8 bytes with scales), topk_idx [T, topk] (-1: none), "
           "topk_weights [T, topk]; coherent mode: ids [T] name the tokens. Every rank calls it each layer.")
      .def("combine", &PyEpDispatcher::Combine, py::arg("outputs"), py::arg("dispatched"),
           "outputs[i]: local expert i's output [count, hidden] bf16. Returns [T, hidden] uint16, or MergedTokens "
           "in coherent mode.")
      .def(
          "send_dispatch",
          [](py::object self, const py::object& x, const IntArray& topk_idx, const FloatArray& topk_weights,
             const ExpertMap& map, const py::object& scales) {
            self.cast<PyEpDispatcher&>().SendDispatch(x, topk_idx, topk_weights, map, scales);
            return PyPending{self, "recv_dispatch", py::object()};
          },
          py::arg("tokens"), py::arg("topk_idx"), py::arg("topk_weights"), py::arg("expert_map"),
          py::arg("scales") = py::none(),
          "Low-latency mode: posts this rank's dispatch and returns at once (the tokens are copied out). "
          "Compute, then .recv() on what it returns (or recv_dispatch()). Every rank calls it each layer.")
      .def("recv_dispatch", &PyEpDispatcher::RecvDispatch,
           "Low-latency mode: waits for every rank's records of the pending send_dispatch; returns its "
           "DispatchResult.")
      .def(
          "send_combine",
          [](py::object self, const py::list& outputs, const PyDispatchResult& dispatched) {
            self.cast<PyEpDispatcher&>().SendCombine(outputs, dispatched);
            return PyPending{self, "recv_combine", py::object()};
          },
          py::arg("outputs"), py::arg("dispatched"),
          "Low-latency mode: sums and posts this rank's expert outputs and returns at once; then .recv() on "
          "what it returns (or recv_combine()).")
      .def("recv_combine", &PyEpDispatcher::RecvCombine,
           "Low-latency mode: waits for the rows of this rank's tokens; returns [T, hidden] uint16.")
      .def_property_readonly("mode", &PyEpDispatcher::mode)
      .def_property_readonly("rank", [](const PyEpDispatcher& d) { return d.config().rank; })
      .def_property_readonly("ranks", [](const PyEpDispatcher& d) { return d.config().ranks; })
      .def("close", &PyEpDispatcher::Close)
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PyEpDispatcher& d, py::args) { d.Close(); });
}

}  // namespace tepy
