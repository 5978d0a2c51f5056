// MemoryView: the memory a Python object holds, found without copying.
//
// Accepted forms, tried in this order by ViewOf(obj, "auto"):
//   __cuda_array_interface__   CuPy, Numba, torch CUDA tensors (GPU memory)
//   the buffer protocol        numpy, bytearray, memoryview, mmap, array
//   __dlpack__                 torch, JAX, CuPy, numpy >= 1.22 (host or GPU)
// and ViewOfPointer for a raw (pointer, nbytes, device) triple.
//
// Refused, with an error naming the object and the reason: read-only
// memory, memory that is not one contiguous run (a strided view would be
// registered whole and the peer would see the wrong bytes), empty memory,
// released or closed buffers, and devices other than host and CUDA.
//
// A view keeps what backs the memory alive (the object, its buffer export
// or its DLPack capsule) until the view is destroyed; the GIL must be held
// to destroy one.
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>
#include <string>

namespace tepy {

struct MemoryView {
  void* data = nullptr;
  size_t nbytes = 0;
  bool cuda = false;  // device memory of GPU `device`
  int device = 0;
  std::string via;           // "buffer", "dlpack", "cuda_array_interface", "pointer"
  pybind11::object owner;    // the registered object
  pybind11::object export_;  // a buffer export or a DLPack capsule, released last
};

// `via`: "auto", "buffer", "dlpack" or "cuda_array_interface".
MemoryView ViewOf(pybind11::handle obj, const std::string& via);
// `device`: "cpu" or "cuda" / "cuda:N"; `owner` (may be None) is kept alive.
MemoryView ViewOfPointer(uintptr_t ptr, size_t nbytes, const std::string& device, pybind11::object owner);

}  // namespace tepy
