"""torch tensors, registered through DLPack (skipped where torch is absent)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed here; DLPack is covered by numpy's export")

import peers  # noqa: E402
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")
def test_cuda_tensors_between_two_processes_over_the_same_host_domain(child):
    """What a colocated trainer and inference engine do with weights: one
    process's CUDA tensor written into another's, byte-exact (CUDA IPC), and
    a CPU tensor into the same GPU target."""
    nbytes = (8 << 20) + 4096
    target = child(peers.serve_cuda_tensor, nbytes, "local")
    device, descriptor = target.recv()
    assert device.startswith("cuda:")
    with te.Engine(provider="local", request_timeout=10.0) as e:
        gen = torch.Generator(device="cuda").manual_seed(7)
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda", generator=gen)
        host = torch.arange(4096, dtype=torch.int32).to(torch.uint8)
        rs = e.register(src)
        rh = e.register(host)
        assert rs.device == f"cuda:{src.device.index}" and rs.ptr == src.data_ptr()
        remote = e.import_descriptor(descriptor)
        half = nbytes // 2
        first = te.SingleWrite(rs, remote, half, imm=11)
        imms = e.expected_imm_count(first)
        e.write(rs, remote, half, imm=11).wait(60.0)
        e.write(rh, remote, 4096, dst_offset=half, imm=11).wait(60.0)
        imms += e.expected_imm_count(te.SingleWrite(rh, remote, 4096, dst_offset=half, imm=11))
        target.send(("wait_imm", 11, imms))
        reply = target.recv()
        assert reply[0] == "ok", reply
        got = np.frombuffer(reply[1], dtype=np.uint8)
        want = np.zeros(nbytes, dtype=np.uint8)
        want[:half] = src[:half].cpu().numpy()
        want[half : half + 4096] = host.numpy()
        assert np.array_equal(got, want)
    target.send(("exit",))
    assert target.recv()[0] == "ok"
