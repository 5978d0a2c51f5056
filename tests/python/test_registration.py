"""Zero-copy registration: every form gives the memory itself, bad memory is refused."""

import gc
import mmap
import weakref

import numpy as np
import pytest

import transfer_engine as te


@pytest.fixture
def engine():
    e = te.Engine()
    yield e
    e.close()


class DlpackOnly:
    """Exports its array through __dlpack__ only (as torch and JAX do)."""

    def __init__(self, array):
        self.array = array

    def __dlpack__(self, stream=None):
        return self.array.__dlpack__()

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


def test_every_form_gives_the_same_pointer(engine):
    arr = np.zeros(1 << 16, dtype=np.uint8)
    ptr = arr.ctypes.data
    regions = [
        engine.register(arr),
        engine.register(memoryview(arr)),
        engine.register(DlpackOnly(arr)),
        engine.register(arr, via="dlpack"),
        engine.register_pointer(ptr, arr.nbytes, "cpu", owner=arr),
    ]
    assert [r.ptr for r in regions] == [ptr] * len(regions)
    assert [r.nbytes for r in regions] == [arr.nbytes] * len(regions)
    assert [r.via for r in regions] == ["buffer", "buffer", "dlpack", "dlpack", "pointer"]
    for r in regions:
        assert r.device == "cpu"
        r.deregister()


def test_bytearray_and_mmap(engine):
    ba = bytearray(4096)
    r = engine.register(ba)
    assert r.nbytes == 4096
    # The export pins the bytearray: it cannot be resized under the NIC.
    with pytest.raises(BufferError):
        ba.extend(b"x")
    r.deregister()
    ba.extend(b"x")  # released with the registration

    m = mmap.mmap(-1, 8192)
    r = engine.register(m)
    assert r.nbytes == 8192
    r.deregister()
    m.close()


def test_typed_arrays_count_bytes_not_elements(engine):
    arr = np.zeros((4, 8), dtype=np.float32)
    assert engine.register(arr).nbytes == 128
    assert engine.register(DlpackOnly(arr)).nbytes == 128


def test_strided_memory_is_refused(engine):
    arr = np.zeros((64, 64), dtype=np.uint16)
    for bad in (arr[:, ::2], arr.T, arr[::2]):
        with pytest.raises(te.TransferError, match="not contiguous") as e:
            engine.register(bad)
        assert e.value.code == te.StatusCode.INVALID_ARGUMENT
    with pytest.raises(te.TransferError, match="not contiguous"):
        engine.register(DlpackOnly(arr[:, ::2]))
    with pytest.raises(te.TransferError, match="not contiguous"):
        engine.register(memoryview(arr)[::2])


def test_read_only_memory_is_refused(engine):
    arr = np.zeros(1024, dtype=np.uint8)
    arr.flags.writeable = False
    with pytest.raises(te.TransferError, match="read-only"):
        engine.register(arr)
    with pytest.raises(te.TransferError):
        engine.register(DlpackOnly(arr))  # numpy refuses to export it
    with pytest.raises(te.TransferError, match="read-only"):
        engine.register(b"immutable bytes")


def test_freed_memory_is_refused(engine):
    view = memoryview(bytearray(256))
    view.release()
    with pytest.raises(te.TransferError, match="cannot be read"):
        engine.register(view)
    m = mmap.mmap(-1, 4096)
    m.close()
    with pytest.raises(te.TransferError, match="cannot be read"):
        engine.register(m)


def test_empty_and_foreign_objects_are_refused(engine):
    with pytest.raises(te.TransferError, match="no bytes"):
        engine.register(np.zeros(0, dtype=np.uint8))
    with pytest.raises(te.TransferError, match="exports no memory"):
        engine.register(object())
    with pytest.raises(te.TransferError, match="via="):
        engine.register(np.zeros(8), via="magic")
    with pytest.raises(te.TransferError, match="null pointer"):
        engine.register_pointer(0, 16)
    with pytest.raises(te.TransferError, match="device"):
        engine.register_pointer(1, 16, device="tpu")


def test_pointers_to_unmapped_memory_are_refused(engine):
    # tcp and shm register lazily: without the check the first write from
    # such a region would fault inside the provider.
    import ctypes
    m = mmap.mmap(-1, 8192)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    region = engine.register_pointer(addr, 8192, owner=m)
    region.deregister()
    m.close()
    with pytest.raises(te.TransferError, match="not mapped"):
        engine.register_pointer(addr, 8192)
    with pytest.raises(te.TransferError, match="not mapped"):
        engine.register_pointer(8, 16)
    with pytest.raises(te.TransferError, match="does not wrap"):
        engine.register_pointer(2**64 - 16, 4096)


class FakeCudaArray:
    def __init__(self, shape, strides=None, readonly=False, typestr="<f2"):
        self.__cuda_array_interface__ = {
            "shape": shape, "typestr": typestr, "data": (0x7F0000000000, readonly),
            "strides": strides, "version": 3,
        }


def test_cuda_array_interface_is_checked_before_registration(engine):
    with pytest.raises(te.TransferError, match="read-only"):
        engine.register(FakeCudaArray((16,), readonly=True))
    with pytest.raises(te.TransferError, match="not contiguous"):
        engine.register(FakeCudaArray((16, 16), strides=(2, 64)))
    with pytest.raises(te.TransferError, match="typestr"):
        engine.register(FakeCudaArray((16,), typestr="<x"))
    # A well-formed one reaches the engine, which (no GPU, tcp without
    # FI_HMEM) refuses device memory with its own error, not a crash.
    with pytest.raises(te.TransferError):
        engine.register(FakeCudaArray((16, 16), strides=(32, 2)))


class Owned(bytearray):
    """A bytearray that can be weakly referenced."""


def test_the_owner_stays_alive_while_registered(engine):
    obj = Owned(4096)
    ref = weakref.ref(obj)
    region = engine.register(obj)
    del obj
    gc.collect()
    assert ref() is not None and region.obj is ref()
    region.deregister()
    gc.collect()
    assert ref() is None
    assert not region.registered
    with pytest.raises(te.TransferError, match="deregistered"):
        region.descriptor()


def test_dropping_the_region_releases_the_owner(engine):
    obj = Owned(4096)
    ref = weakref.ref(obj)
    region = engine.register(obj)
    del obj, region
    gc.collect()
    assert ref() is None
