#include "py_requests.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "status_error.h"

namespace py = pybind11;

namespace tepy {
namespace {

using RegionRef = std::shared_ptr<RegionState>;
using RemoteRef = std::shared_ptr<RemoteState>;

const py::object& Numpy() {
  static py::object* np = new py::object(py::module_::import("numpy"));  // lives as long as the process
  return *np;
}

// A 1-D list of non-negative integers of T, copied once.
template <typename T>
std::vector<T> IndexList(py::handle obj, const char* what) {
  std::vector<T> out;
  if (py::isinstance<py::array_t<T>>(obj)) {  // the fast path: already the right type
    auto a = py::reinterpret_borrow<py::array_t<T>>(obj);
    if (a.ndim() == 1 && (a.flags() & py::array::c_style)) {
      out.resize(size_t(a.size()));
      if (!out.empty()) std::memcpy(out.data(), a.data(), out.size() * sizeof(T));
      return out;
    }
  }
  py::array a = Numpy().attr("asarray")(obj);
  if (a.ndim() != 1)
    Throw(te::InvalidArgument(std::string(what) + " must be one-dimensional, got " + std::to_string(a.ndim()) +
                              " dimensions"));
  if (a.size() == 0) return out;
  const char kind = a.dtype().kind();
  if (kind != 'i' && kind != 'u')
    Throw(te::InvalidArgument(std::string(what) + " must hold integers, got dtype " + std::string(py::str(a.dtype()))));
  if (kind == 'i' && a.attr("min")().cast<int64_t>() < 0)
    Throw(te::InvalidArgument(std::string(what) + " holds negative value " +
                              std::to_string(a.attr("min")().cast<int64_t>())));
  const uint64_t max = a.attr("max")().cast<uint64_t>();
  if (max > std::numeric_limits<T>::max())
    Throw(te::InvalidArgument(std::string(what) + " holds " + std::to_string(max) + ", above the largest " +
                              std::to_string(std::numeric_limits<T>::max())));
  auto conv = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(a);
  if (!conv) throw py::error_already_set();
  out.resize(size_t(conv.size()));
  std::memcpy(out.data(), conv.data(), out.size() * sizeof(T));
  return out;
}

uint64_t DefaultLength(const RegionRef& src, uint64_t src_offset, std::optional<uint64_t> length) {
  if (length) return *length;
  if (src_offset > src->view.nbytes)
    Throw(te::OutOfRange("src_offset " + std::to_string(src_offset) + " is beyond the region's " +
                         std::to_string(src->view.nbytes) + " bytes"));
  return src->view.nbytes - src_offset;
}

const te::LocalMr& Local(const RegionRef& r) {
  if (!r) Throw(te::InvalidArgument("source region is None"));
  if (!r->mr) Throw(te::InvalidArgument("source region was deregistered"));
  return r->mr;
}
const te::RemoteMr& Remote(const RemoteRef& r) {
  if (!r) Throw(te::InvalidArgument("destination is None"));
  return r->remote;
}

// ---- Python request objects: plain data, converted at submit.

struct PySingleWrite {
  RegionRef src;
  RemoteRef dst;
  std::optional<uint64_t> length;
  uint64_t src_offset = 0;
  uint64_t dst_offset = 0;
  std::optional<uint32_t> imm;
};
struct PyPagedWrite {
  RegionRef src;
  std::vector<uint32_t> src_pages;
  RemoteRef dst;
  std::vector<uint32_t> dst_pages;
  uint64_t page_length = 0;
  std::optional<uint64_t> src_stride, dst_stride;
  uint64_t src_offset = 0;
  uint64_t dst_offset = 0;
  std::optional<uint32_t> imm;
};
struct PyScatterTarget {
  RemoteRef dst;
  uint64_t src_offset = 0;
  uint64_t dst_offset = 0;
  uint64_t length = 0;
};
struct PyScatterWrite {
  RegionRef src;
  std::vector<PyScatterTarget> targets;
  std::optional<uint32_t> imm;
};
struct PyImmOnly {
  RemoteRef dst;
  uint32_t imm = 0;
};
struct PyBarrier {
  std::vector<RemoteRef> peers;
  uint32_t imm = 0;
};

struct Prepared {
  const char* kind;
  te::Request request;
  std::vector<RegionRef> regions;
};

Prepared Prepare(const PySingleWrite& w) {
  te::SingleWrite r{Local(w.src),  w.src_offset, DefaultLength(w.src, w.src_offset, w.length),
                    Remote(w.dst), w.dst_offset, w.imm};
  return {"write", std::move(r), {w.src}};
}
// By value: the one-call write_paged moves its freshly converted page lists
// into the request; submit() of a PagedWrite object copies them once.
Prepared Prepare(PyPagedWrite w) {
  te::PagedWrite r;
  r.src = Local(w.src);
  r.src_pages = std::move(w.src_pages);
  r.src_stride = w.src_stride.value_or(w.page_length);
  r.src_offset = w.src_offset;
  r.dst = Remote(w.dst);
  r.dst_pages = std::move(w.dst_pages);
  r.dst_stride = w.dst_stride.value_or(w.page_length);
  r.dst_offset = w.dst_offset;
  r.page_length = w.page_length;
  r.imm = w.imm;
  return {"write_paged", std::move(r), {w.src}};
}
Prepared Prepare(const PyScatterWrite& w) {
  te::ScatterWrite r;
  r.src = Local(w.src);
  for (const auto& t : w.targets) r.targets.push_back({Remote(t.dst), t.src_offset, t.dst_offset, t.length});
  r.imm = w.imm;
  return {"write_scatter", std::move(r), {w.src}};
}
Prepared Prepare(const PyImmOnly& w) { return {"imm_only", te::ImmOnly{Remote(w.dst), w.imm}, {}}; }
Prepared Prepare(const PyBarrier& w) {
  te::Barrier r;
  for (const auto& p : w.peers) r.peers.push_back(Remote(p));
  r.imm = w.imm;
  return {"barrier", std::move(r), {}};
}

Prepared PrepareAny(py::handle request) {
  if (py::isinstance<PySingleWrite>(request)) return Prepare(request.cast<const PySingleWrite&>());
  if (py::isinstance<PyPagedWrite>(request)) return Prepare(request.cast<PyPagedWrite>());
  if (py::isinstance<PyScatterWrite>(request)) return Prepare(request.cast<const PyScatterWrite&>());
  if (py::isinstance<PyImmOnly>(request)) return Prepare(request.cast<const PyImmOnly&>());
  if (py::isinstance<PyBarrier>(request)) return Prepare(request.cast<const PyBarrier&>());
  Throw(te::InvalidArgument("not a request: " + std::string(py::str(py::type::handle_of(request).attr("__name__"))) +
                            "; valid: SingleWrite, PagedWrite, ScatterWrite, ImmOnly, Barrier"));
}

py::object SubmitPrepared(PyEngine& e, Prepared p) {
  return WrapHandle(e, e.Submit(p.kind, std::move(p.request), std::move(p.regions)));
}

std::vector<PyScatterTarget> Targets(const std::vector<py::tuple>& targets) {
  std::vector<PyScatterTarget> out;
  out.reserve(targets.size());
  for (const auto& t : targets) {
    if (t.size() != 4) Throw(te::InvalidArgument("a scatter target is (dst, src_offset, dst_offset, length)"));
    out.push_back({t[0].cast<RemoteRef>(), t[1].cast<uint64_t>(), t[2].cast<uint64_t>(), t[3].cast<uint64_t>()});
  }
  return out;
}

}  // namespace

void BindRequests(py::module_& m, py::class_<PyEngine, std::shared_ptr<PyEngine>>& engine) {
  py::class_<PySingleWrite>(m, "SingleWrite", "`length` bytes from src[src_offset] to dst[dst_offset].")
      .def(py::init([](RegionRef src, RemoteRef dst, std::optional<uint64_t> length, uint64_t src_offset,
                       uint64_t dst_offset, std::optional<uint32_t> imm) {
             return PySingleWrite{std::move(src), std::move(dst), length, src_offset, dst_offset, imm};
           }),
           py::arg("src"), py::arg("dst"), py::arg("length") = py::none(), py::kw_only(), py::arg("src_offset") = 0,
           py::arg("dst_offset") = 0, py::arg("imm") = py::none())
      .def_readwrite("src", &PySingleWrite::src)
      .def_readwrite("dst", &PySingleWrite::dst)
      .def_readwrite("length", &PySingleWrite::length)
      .def_readwrite("src_offset", &PySingleWrite::src_offset)
      .def_readwrite("dst_offset", &PySingleWrite::dst_offset)
      .def_readwrite("imm", &PySingleWrite::imm);

  py::class_<PyPagedWrite>(m, "PagedWrite",
                           "Page i from src[src_offset + src_pages[i] * src_stride] to "
                           "dst[dst_offset + dst_pages[i] * dst_stride], page_length bytes each.")
      .def(py::init([](RegionRef src, py::handle src_pages, RemoteRef dst, py::handle dst_pages, uint64_t page_length,
                       std::optional<uint64_t> src_stride, std::optional<uint64_t> dst_stride, uint64_t src_offset,
                       uint64_t dst_offset, std::optional<uint32_t> imm) {
             return PyPagedWrite{std::move(src), IndexList<uint32_t>(src_pages, "src_pages"),
                                 std::move(dst), IndexList<uint32_t>(dst_pages, "dst_pages"),
                                 page_length,    src_stride,
                                 dst_stride,     src_offset,
                                 dst_offset,     imm};
           }),
           py::arg("src"), py::arg("src_pages"), py::arg("dst"), py::arg("dst_pages"), py::arg("page_length"),
           py::kw_only(), py::arg("src_stride") = py::none(), py::arg("dst_stride") = py::none(),
           py::arg("src_offset") = 0, py::arg("dst_offset") = 0, py::arg("imm") = py::none())
      .def_readwrite("src", &PyPagedWrite::src)
      .def_readwrite("dst", &PyPagedWrite::dst)
      .def_readonly("src_pages", &PyPagedWrite::src_pages)
      .def_readonly("dst_pages", &PyPagedWrite::dst_pages)
      .def_readwrite("page_length", &PyPagedWrite::page_length)
      .def_readwrite("src_stride", &PyPagedWrite::src_stride)
      .def_readwrite("dst_stride", &PyPagedWrite::dst_stride)
      .def_readwrite("src_offset", &PyPagedWrite::src_offset)
      .def_readwrite("dst_offset", &PyPagedWrite::dst_offset)
      .def_readwrite("imm", &PyPagedWrite::imm);

  py::class_<PyScatterWrite>(m, "ScatterWrite",
                             "One source to many peers: targets are (dst, src_offset, dst_offset, length).")
      .def(py::init([](RegionRef src, const std::vector<py::tuple>& targets, std::optional<uint32_t> imm) {
             return PyScatterWrite{std::move(src), Targets(targets), imm};
           }),
           py::arg("src"), py::arg("targets"), py::kw_only(), py::arg("imm") = py::none())
      .def_readwrite("src", &PyScatterWrite::src)
      .def_readwrite("imm", &PyScatterWrite::imm);

  py::class_<PyImmOnly>(m, "ImmOnly", "A zero-byte write carrying `imm`: a notification.")
      .def(py::init([](RemoteRef dst, uint32_t imm) {
             return PyImmOnly{std::move(dst), imm};
           }),
           py::arg("dst"), py::arg("imm"))
      .def_readwrite("dst", &PyImmOnly::dst)
      .def_readwrite("imm", &PyImmOnly::imm);

  py::class_<PyBarrier>(m, "Barrier", "A notification carrying `imm` to each peer (one region of each).")
      .def(py::init([](std::vector<RemoteRef> peers, uint32_t imm) {
             return PyBarrier{std::move(peers), imm};
           }),
           py::arg("peers"), py::arg("imm"))
      .def_readwrite("peers", &PyBarrier::peers)
      .def_readwrite("imm", &PyBarrier::imm);

  engine
      .def(
          "submit", [](PyEngine& e, py::handle request) { return SubmitPrepared(e, PrepareAny(request)); },
          py::arg("request"), "Submits a request object; returns its Handle.")
      .def(
          "expected_imm_count",
          [](PyEngine& e, py::handle request) {
            Prepared p = PrepareAny(request);
            te::TransferEngine* t = e.engine();
            return Unwrap(t->ExpectedImmCount(p.request));
          },
          py::arg("request"), "How many immediates `request` delivers to its peer(s) (transfer/requests.h rules).")
      .def(
          "write",
          [](PyEngine& e, RegionRef src, RemoteRef dst, std::optional<uint64_t> length, uint64_t src_offset,
             uint64_t dst_offset, std::optional<uint32_t> imm) {
            return SubmitPrepared(
                e, Prepare(PySingleWrite{std::move(src), std::move(dst), length, src_offset, dst_offset, imm}));
          },
          py::arg("src"), py::arg("dst"), py::arg("length") = py::none(), py::kw_only(), py::arg("src_offset") = 0,
          py::arg("dst_offset") = 0, py::arg("imm") = py::none(),
          "Writes `length` bytes (default: the rest of src) from src[src_offset] to dst[dst_offset].")
      .def(
          "write_paged",
          [](PyEngine& e, RegionRef src, py::handle src_pages, RemoteRef dst, py::handle dst_pages,
             uint64_t page_length, std::optional<uint64_t> src_stride, std::optional<uint64_t> dst_stride,
             uint64_t src_offset, uint64_t dst_offset, std::optional<uint32_t> imm) {
            return SubmitPrepared(
                e, Prepare(PyPagedWrite{std::move(src), IndexList<uint32_t>(src_pages, "src_pages"), std::move(dst),
                                        IndexList<uint32_t>(dst_pages, "dst_pages"), page_length, src_stride,
                                        dst_stride, src_offset, dst_offset, imm}));
          },
          py::arg("src"), py::arg("src_pages"), py::arg("dst"), py::arg("dst_pages"), py::arg("page_length"),
          py::kw_only(), py::arg("src_stride") = py::none(), py::arg("dst_stride") = py::none(),
          py::arg("src_offset") = 0, py::arg("dst_offset") = 0, py::arg("imm") = py::none(),
          "Writes pages by index (numpy uint32 arrays or lists); strides default to page_length.")
      .def(
          "write_scatter",
          [](PyEngine& e, RegionRef src, const std::vector<py::tuple>& targets, std::optional<uint32_t> imm) {
            return SubmitPrepared(e, Prepare(PyScatterWrite{std::move(src), Targets(targets), imm}));
          },
          py::arg("src"), py::arg("targets"), py::kw_only(), py::arg("imm") = py::none(),
          "One source to many peers: targets are (dst, src_offset, dst_offset, length).")
      .def(
          "write_batch",
          [](PyEngine& e, RegionRef src, RemoteRef dst, py::handle src_offsets, py::handle dst_offsets,
             py::handle lengths, std::optional<uint32_t> imm) {
            auto so = IndexList<uint64_t>(src_offsets, "src_offsets");
            auto dso = IndexList<uint64_t>(dst_offsets, "dst_offsets");
            auto len = IndexList<uint64_t>(lengths, "lengths");
            if (so.size() != dso.size() || so.size() != len.size())
              Throw(te::InvalidArgument("write_batch: src_offsets, dst_offsets and lengths have " +
                                        std::to_string(so.size()) + ", " + std::to_string(dso.size()) + " and " +
                                        std::to_string(len.size()) + " entries; they must match"));
            if (so.empty()) Throw(te::InvalidArgument("write_batch: no writes"));
            if (so.size() > std::numeric_limits<uint32_t>::max())
              Throw(te::InvalidArgument("write_batch: more than 2^32-1 writes"));
            te::TransferEngine* t = e.engine();
            std::vector<te::Request> reqs;
            reqs.reserve(so.size());
            for (size_t i = 0; i < so.size(); ++i) {
              reqs.push_back(te::SingleWrite{Local(src), so[i], len[i], Remote(dst), dso[i], imm});
              // Every write is checked before any is posted: a bad entry
              // refuses the whole batch.
              auto n = t->ExpectedImmCount(reqs.back());
              if (!n.ok()) Throw(n.status().WithContext("write_batch entry " + std::to_string(i)));
            }
            e.Reap();
            auto h = e.Begin("write_batch", {src}, uint32_t(reqs.size()));
            {
              py::gil_scoped_release release;
              for (size_t i = 0; i < reqs.size(); ++i) {
                te::Status s = t->Submit(std::move(reqs[i]), e.CompletionFor(h.get()));
                // Refused (queue full): this part and the rest end with the
                // error; the parts already accepted finish on their own.
                if (!s.ok())
                  for (size_t j = i; j < reqs.size(); ++j) e.Finish(h.get(), s);
                if (!s.ok()) break;
              }
            }
            return WrapHandle(e, std::move(h));
          },
          py::arg("src"), py::arg("dst"), py::arg("src_offsets"), py::arg("dst_offsets"), py::arg("lengths"),
          py::kw_only(), py::arg("imm") = py::none(),
          "Many single writes between two regions in one call (numpy uint64 arrays); one Handle for all. "
          "With `imm`, each write delivers expected_imm_count(SingleWrite) immediates.")
      .def(
          "imm_only",
          [](PyEngine& e, RemoteRef dst, uint32_t imm) {
            return SubmitPrepared(e, Prepare(PyImmOnly{dst, imm}));
          },
          py::arg("dst"), py::arg("imm"), "A zero-byte write carrying `imm` to dst's owner.")
      .def(
          "barrier",
          [](PyEngine& e, std::vector<RemoteRef> peers, uint32_t imm) {
            return SubmitPrepared(e, Prepare(PyBarrier{std::move(peers), imm}));
          },
          py::arg("peers"), py::arg("imm"), "A notification carrying `imm` to the owner of each region.");
}

}  // namespace tepy
