"""Same-host peers: SharedHostMemory as a buffer, and a NIC group with the same-host lane beside it."""

import numpy as np
import pytest

import transfer_engine as te


def test_shared_host_memory_is_a_zeroed_writable_buffer():
    mem = te.SharedHostMemory(10000)
    assert mem.nbytes == len(mem) and mem.nbytes % 4096 == 0 and mem.nbytes >= 10000
    view = np.frombuffer(mem, dtype=np.uint8)
    assert not view.any()
    view[:4] = [1, 2, 3, 4]
    assert bytes(memoryview(mem)[:4]) == b"\x01\x02\x03\x04"
    with pytest.raises(te.TransferError):
        te.SharedHostMemory(0)


def test_same_host_option_and_provider_suffix():
    opts = te.EngineOptions()
    assert opts.same_host == "auto"
    opts.provider = "tcp+local"
    assert opts.same_host == "direct" and opts.provider == "tcp+local"
    opts.same_host = "nic"
    assert opts.provider == "tcp+nic"
    with pytest.raises(te.TransferError):
        opts.same_host = "sometimes"


@pytest.mark.parametrize("provider", ["local", "tcp+local"])
def test_writes_into_shared_host_memory_land_with_exact_counts(provider):
    with te.Engine(provider=provider, domains=2) as a, te.Engine(provider=provider, domains=2) as b:
        mem = te.SharedHostMemory(1 << 20)
        dst = b.register(mem)
        src_array = np.arange(1 << 20, dtype=np.uint32).astype(np.uint8)
        src = a.register(src_array)
        remote = a.import_descriptor(dst.descriptor())
        # "local": two same-host domains, one immediate each; "tcp+local": the
        # peer takes the one same-host lane beside the two tcp domains.
        expected = 1 if provider.endswith("+local") else 2
        assert a.expected_imm_count(te.SingleWrite(src, remote, 1 << 20, imm=5)) == expected
        a.write(src, remote, 1 << 20, imm=5).wait(30.0)
        b.wait_imm(5, expected, timeout=30.0)
        assert b.imm_count(5) == 0
        assert np.array_equal(np.frombuffer(mem, dtype=np.uint8), src_array)
