"""Failure from Python: a dead peer and bad bytes raise, nothing hangs."""

import os
import signal
import time

import numpy as np
import pytest

import transfer_engine as te
from peers import SIZE, serve


def test_a_killed_peer_raises_within_the_timeout(provider, child):
    peer = child(serve, provider)
    info = peer.recv()
    with te.Engine(provider=provider, request_timeout=2.0) as engine:
        region = engine.register(np.ones(SIZE, dtype=np.uint8))
        dst = engine.import_descriptor(info["d1"])
        engine.write(region, dst, 4096, imm=1).wait(30.0)  # the peer is alive
        os.kill(info["pid"], signal.SIGKILL)
        peer.proc.join(30)
        t0 = time.monotonic()
        with pytest.raises(te.TransferError) as e:
            # A few writes: the first may still be accepted by a socket
            # buffer; the peer's death must surface as an error, never a hang.
            for _ in range(50):
                engine.write(region, dst, SIZE, imm=2).wait(30.0)
        assert time.monotonic() - t0 < 30.0
        assert e.value.code in (te.StatusCode.IO_ERROR, te.StatusCode.TIMEOUT, te.StatusCode.NOT_POSTED)
        assert e.value.message


def test_waiting_for_a_dead_peer_times_out(child):
    peer = child(serve, "tcp")
    info = peer.recv()
    with te.Engine() as engine:
        os.kill(info["pid"], signal.SIGKILL)
        with pytest.raises(TimeoutError):
            engine.wait_imm(99, 1, timeout=0.5)


def test_bad_descriptors_and_addresses_raise(engines):
    a, b = engines
    good = b.register(np.zeros(4096, dtype=np.uint8)).descriptor()
    for bad in (b"", b"garbage", good[:-1], good + b"\0", bytes([good[0] ^ 1]) + good[1:]):
        with pytest.raises(te.TransferError) as e:
            a.import_descriptor(bad)
        assert e.value.code == te.StatusCode.INVALID_ARGUMENT
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x40
    with pytest.raises(te.TransferError, match="(?i)crc|checksum|invalid|length"):
        a.import_descriptor(bytes(flipped))
    for bad in (b"", b"\xff" * 40, a.address()[:-2]):
        with pytest.raises(te.TransferError):
            a.add_peer(bad)
    with pytest.raises(TypeError):
        a.import_descriptor("not bytes")


def test_a_closed_engine_refuses_calls():
    e = te.Engine()
    region = e.register(np.zeros(64, dtype=np.uint8))
    e.close()
    assert e.closed
    with pytest.raises(te.TransferError) as err:
        e.address()
    assert err.value.code == te.StatusCode.CANCELLED
    with pytest.raises(te.TransferError):
        region.descriptor()
    e.close()  # twice is fine


def test_unknown_options_are_refused():
    with pytest.raises(TypeError, match="unknown option 'provder'"):
        te.Engine(provder="tcp")
    with pytest.raises(te.TransferError, match="progress"):
        te.Engine(progress="sometimes")
    with pytest.raises(te.TransferError):
        te.Engine(provider="no-such-provider")
    with pytest.raises(te.TransferError, match="bogus0"):
        te.Engine(interface="bogus0")


def test_requests_in_flight_at_close_fail_with_cancelled(engines):
    a, b = engines
    size = 64 << 20
    src = a.register(np.zeros(size, dtype=np.uint8))
    target = b.register(np.zeros(size, dtype=np.uint8))
    dst = a.import_descriptor(target.descriptor())
    handles = [a.write(src, dst) for _ in range(8)]
    a.close()
    for h in handles:
        assert h.done()
        err = h.exception()
        assert err is None or err.code == te.StatusCode.CANCELLED
