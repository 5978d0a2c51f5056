#include "memory_view.h"

#include <dlpack/dlpack.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "base/checked_math.h"
#include "status_error.h"

namespace py = pybind11;

namespace tepy {
namespace {

[[noreturn]] void Refuse(py::handle obj, const std::string& why) {
  std::string type = py::str(py::type::handle_of(obj).attr("__name__"));
  Throw(te::InvalidArgument("cannot register a " + type + ": " + why));
}

// The pending Python error as text, cleared.
std::string TakePythonError() {
  py::error_already_set e;
  return e.what();
}

// True when `shape`/`strides` (in elements) describe one row-major run.
// Dimensions of extent 1 may have any stride.
bool RowMajorCompact(const std::vector<int64_t>& shape, const std::vector<int64_t>& strides) {
  int64_t expect = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    if (shape[i] == 1) continue;
    if (strides[i] != expect) return false;
    expect *= shape[i];
  }
  return true;
}

// Product of the extents times the element size, checked.
size_t ByteCount(py::handle obj, const std::vector<int64_t>& shape, uint64_t item_bytes) {
  uint64_t n = item_bytes;
  for (int64_t d : shape) {
    if (d < 0) Refuse(obj, "negative extent " + std::to_string(d));
    uint64_t next;
    if (!te::CheckedMul(n, uint64_t(d), &next)) Refuse(obj, "its size overflows 64 bits");
    n = next;
  }
  return size_t(n);
}

MemoryView FromBuffer(py::handle obj) {
  auto* view = new Py_buffer();
  if (PyObject_GetBuffer(obj.ptr(), view, PyBUF_RECORDS_RO) != 0) {
    delete view;
    Refuse(obj, "its buffer cannot be read (" + TakePythonError() + ")");
  }
  // The export lives as long as the capsule: a bytearray cannot be resized
  // and an mmap cannot be closed while it is held.
  py::capsule hold(view, [](void* p) {
    auto* v = static_cast<Py_buffer*>(p);
    PyBuffer_Release(v);
    delete v;
  });
  if (view->readonly) Refuse(obj, "its memory is read-only; a peer would write into it");
  if (!PyBuffer_IsContiguous(view, 'C'))
    Refuse(obj, "its memory is not contiguous (strided view); register the base array or a contiguous copy");
  if (view->len <= 0) Refuse(obj, "it holds no bytes");
  MemoryView m;
  m.data = view->buf;
  m.nbytes = size_t(view->len);
  m.via = "buffer";
  m.owner = py::reinterpret_borrow<py::object>(obj);
  m.export_ = std::move(hold);
  return m;
}

MemoryView FromDlpack(py::handle obj) {
  py::object capsule;
  try {
    capsule = obj.attr("__dlpack__")();
  } catch (py::error_already_set& e) {
    Refuse(obj, std::string("__dlpack__() failed: ") + e.what());
  }
  if (!PyCapsule_IsValid(capsule.ptr(), "dltensor"))
    Refuse(obj, "__dlpack__() did not return an unused 'dltensor' capsule");
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  const DLTensor& t = managed->dl_tensor;
  MemoryView m;
  switch (t.device.device_type) {
    case kDLCPU:
    case kDLCUDAHost:
      break;
    case kDLCUDA:
    case kDLCUDAManaged:
      m.cuda = true;
      m.device = t.device.device_id;
      break;
    default:
      Refuse(obj, "DLPack device type " + std::to_string(int(t.device.device_type)) +
                      " is neither host (1, 3) nor CUDA (2, 13)");
  }
  if (t.ndim < 0 || t.ndim > 64) Refuse(obj, "DLPack ndim " + std::to_string(t.ndim) + " is outside [0, 64]");
  std::vector<int64_t> shape(t.shape, t.shape + t.ndim);
  if (t.strides != nullptr && !RowMajorCompact(shape, std::vector<int64_t>(t.strides, t.strides + t.ndim)))
    Refuse(obj, "its memory is not contiguous (DLPack strides); register a contiguous tensor");
  const uint64_t bits = uint64_t(t.dtype.bits) * t.dtype.lanes;
  if (bits == 0 || bits % 8 != 0) Refuse(obj, "DLPack element of " + std::to_string(bits) + " bits is not whole bytes");
  m.nbytes = ByteCount(obj, shape, bits / 8);
  if (m.nbytes == 0) Refuse(obj, "it holds no bytes");
  m.data = static_cast<uint8_t*>(t.data) + t.byte_offset;
  m.via = "dlpack";
  m.owner = py::reinterpret_borrow<py::object>(obj);
  // The capsule stays named "dltensor": its own destructor calls the
  // producer's deleter when the view lets go of it.
  m.export_ = std::move(capsule);
  return m;
}

MemoryView FromCudaArrayInterface(py::handle obj) {
  py::dict cai;
  try {
    cai = obj.attr("__cuda_array_interface__");
  } catch (py::error_already_set& e) {
    Refuse(obj, std::string("__cuda_array_interface__ is not a dict: ") + e.what());
  } catch (py::cast_error&) {
    Refuse(obj, "__cuda_array_interface__ is not a dict");
  }
  try {
    auto data = cai["data"].cast<py::tuple>();
    if (data.size() != 2) Refuse(obj, "__cuda_array_interface__['data'] is not (pointer, read_only)");
    if (data[1].cast<bool>()) Refuse(obj, "its memory is read-only; a peer would write into it");
    std::vector<int64_t> shape = cai["shape"].cast<std::vector<int64_t>>();
    std::string typestr = cai["typestr"].cast<std::string>();
    auto parsed = typestr.size() < 3 ? std::nullopt : te::ParseUint64(std::string_view(typestr).substr(2));
    const uint64_t item = parsed.value_or(0);
    if (item == 0 || item > 64)
      Refuse(obj, "__cuda_array_interface__ typestr '" + typestr + "' has no element size in [1, 64]");
    if (cai.contains("strides") && !cai["strides"].is_none()) {
      std::vector<int64_t> strides = cai["strides"].cast<std::vector<int64_t>>();
      if (strides.size() != shape.size()) Refuse(obj, "__cuda_array_interface__ strides and shape differ in length");
      for (auto& s : strides) {
        if (s % int64_t(item) != 0) Refuse(obj, "its memory is not contiguous (byte strides not whole elements)");
        s /= int64_t(item);
      }
      if (!RowMajorCompact(shape, strides))
        Refuse(obj, "its memory is not contiguous (strided view); register a contiguous tensor");
    }
    MemoryView m;
    m.nbytes = ByteCount(obj, shape, item);
    if (m.nbytes == 0) Refuse(obj, "it holds no bytes");
    m.data = reinterpret_cast<void*>(data[0].cast<uintptr_t>());
    m.cuda = true;
    // The interface does not say which GPU; torch and CuPy objects do.
    if (py::hasattr(obj, "device")) {
      py::object dev = obj.attr("device");
      if (py::hasattr(dev, "index") && !dev.attr("index").is_none())
        m.device = dev.attr("index").cast<int>();
      else if (py::hasattr(dev, "id"))
        m.device = dev.attr("id").cast<int>();
    }
    m.via = "cuda_array_interface";
    m.owner = py::reinterpret_borrow<py::object>(obj);
    return m;
  } catch (py::cast_error& e) {
    Refuse(obj, std::string("__cuda_array_interface__ is malformed: ") + e.what());
  } catch (py::error_already_set& e) {
    Refuse(obj, std::string("__cuda_array_interface__ is malformed: ") + e.what());
  }
}

}  // namespace

MemoryView ViewOf(py::handle obj, const std::string& via) {
  if (via == "cuda_array_interface" || (via == "auto" && py::hasattr(obj, "__cuda_array_interface__")))
    return FromCudaArrayInterface(obj);
  if (via == "buffer" || (via == "auto" && PyObject_CheckBuffer(obj.ptr()))) return FromBuffer(obj);
  if (via == "dlpack" || (via == "auto" && py::hasattr(obj, "__dlpack__"))) return FromDlpack(obj);
  if (via != "auto") Throw(te::InvalidArgument("via='" + via + "'; valid: auto, buffer, dlpack, cuda_array_interface"));
  Refuse(obj,
         "it exports no memory (no buffer protocol, __dlpack__ or __cuda_array_interface__); "
         "use register_pointer(ptr, nbytes, device) for raw memory");
}

MemoryView ViewOfPointer(uintptr_t ptr, size_t nbytes, const std::string& device, py::object owner) {
  MemoryView m;
  if (ptr == 0) Throw(te::InvalidArgument("register_pointer: null pointer"));
  if (nbytes == 0) Throw(te::InvalidArgument("register_pointer: nbytes is 0"));
  if (device == "cpu") {
  } else if (device == "cuda") {
    m.cuda = true;
  } else if (device.rfind("cuda:", 0) == 0) {
    auto id = te::ParseUint64(std::string_view(device).substr(5));
    if (!id || *id > 1024)
      Throw(te::InvalidArgument("register_pointer: device '" + device + "'; valid: cpu, cuda, cuda:N"));
    m.cuda = true;
    m.device = int(*id);
  } else {
    Throw(te::InvalidArgument("register_pointer: device '" + device + "'; valid: cpu, cuda, cuda:N"));
  }
  m.data = reinterpret_cast<void*>(ptr);
  m.nbytes = nbytes;
  m.via = "pointer";
  m.owner = std::move(owner);
  return m;
}

}  // namespace tepy
