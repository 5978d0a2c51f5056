"""asyncio: many concurrent writes and immediate waits on one event loop."""

import asyncio

import numpy as np
import pytest

import transfer_engine as te


def test_gather_over_many_writes_and_imm_waits(engines):
    a, b = engines
    n, size = 200, 4096
    src = np.random.default_rng(3).integers(0, 256, n * size, dtype=np.uint8)
    dst = np.zeros(n * size, dtype=np.uint8)
    rs = a.register(src)
    target = b.register(dst)  # kept: dropping it ends the registration
    remote = a.import_descriptor(target.descriptor())
    per = a.expected_imm_count(te.SingleWrite(rs, remote, size, imm=1000))

    async def main():
        waits = [b.wait_imm_async(1000 + i, per) for i in range(n)]
        writes = [a.write_async(rs, remote, size, src_offset=i * size, dst_offset=i * size, imm=1000 + i)
                  for i in range(n)]
        handles = await asyncio.wait_for(asyncio.gather(*writes, *waits), 60.0)
        assert all(h.done() for h in handles[:n])

    asyncio.run(main())
    assert np.array_equal(src, dst)


def test_failures_raise_through_the_future(engines):
    a, b = engines
    rs = a.register(np.zeros(64, dtype=np.uint8))
    target = b.register(np.zeros(64, dtype=np.uint8))  # kept: dropping it ends the registration
    remote = a.import_descriptor(target.descriptor())

    async def main():
        with pytest.raises(te.TransferError) as e:
            await a.write_async(rs, remote, 64, dst_offset=1)
        assert e.value.code == te.StatusCode.OUT_OF_RANGE

    asyncio.run(main())


def test_cancelling_a_future_frees_nothing_under_dma(engines):
    a, b = engines
    size = 1 << 20
    src = np.full(size, 7, dtype=np.uint8)
    dst = np.zeros(size, dtype=np.uint8)
    rs = a.register(src)
    target = b.register(dst)  # kept: dropping it ends the registration
    remote = a.import_descriptor(target.descriptor())
    per = a.expected_imm_count(te.SingleWrite(rs, remote, imm=5))

    async def main():
        task = asyncio.ensure_future(a.write_async(rs, remote, imm=5))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(b.wait_imm_async(5, per), 60.0)

    asyncio.run(main())
    assert (dst == 7).all()
    # The region is free again once the write finished.
    deadline = 60.0
    import time

    t0 = time.monotonic()
    while True:
        try:
            rs.deregister()
            break
        except te.TransferError:
            assert time.monotonic() - t0 < deadline
            a.poll()
            time.sleep(0.01)


def test_messages_through_recv_async(engines):
    a, b = engines
    peer = a.add_peer(b.address())

    async def main():
        got = asyncio.ensure_future(b.recv_async())
        await asyncio.sleep(0.05)
        await a.send_async(peer, b"hello")
        sender, data = await asyncio.wait_for(got, 60.0)
        assert data == b"hello" and sender == a.address()

    asyncio.run(main())


def test_deregistering_with_a_request_in_flight_is_an_error(engines):
    a, b = engines
    size = 64 << 20
    rs = a.register(np.zeros(size, dtype=np.uint8))
    target = b.register(np.zeros(size, dtype=np.uint8))  # kept: dropping it ends the registration
    remote = a.import_descriptor(target.descriptor())
    h = a.write(rs, remote)
    if not h.done():  # a 64 MiB write on loopback takes milliseconds: usually still going
        with pytest.raises(te.TransferError, match="have not finished"):
            rs.deregister()
    h.wait(60.0)
    rs.deregister()
    assert not rs.registered
