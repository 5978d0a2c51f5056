"""torch tensors, registered through DLPack (skipped where torch is absent)."""

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed here; DLPack is covered by numpy's export")

import transfer_engine as te  # noqa: E402


def test_cpu_tensors_register_in_place_and_transfer(engines):
    a, b = engines
    src = torch.arange(4096, dtype=torch.int32)
    dst = torch.zeros(4096, dtype=torch.int32)
    rs = a.register(src)
    rd = b.register(dst)
    assert rs.ptr == src.data_ptr() and rs.nbytes == src.numel() * src.element_size()
    remote = a.import_descriptor(rd.descriptor())
    a.write(rs, remote, imm=3).wait(60.0)
    b.wait_imm(3, a.expected_imm_count(te.SingleWrite(rs, remote, imm=3)), timeout=60.0)
    assert torch.equal(src, dst)
    with pytest.raises(te.TransferError, match="not contiguous"):
        a.register(torch.zeros(64, 64)[:, ::2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
def test_cuda_tensors_are_seen_as_device_memory():
    e = te.Engine(want_hmem=False)
    t = torch.zeros(1024, device="cuda")
    try:
        r = e.register(t)
        assert r.device == f"cuda:{t.device.index}" and r.ptr == t.data_ptr()
    except te.TransferError as err:  # providers without FI_HMEM refuse device memory by name
        assert "CUDA" in str(err) or "HMEM" in str(err)
    e.close()
