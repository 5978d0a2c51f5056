"""Waiting releases the GIL, honours its timeout, and Ctrl-C interrupts it."""

import signal
import threading
import time

import numpy as np
import pytest

import transfer_engine as te
from peers import wait_forever


def test_other_threads_run_while_one_waits(engines):
    a, b = engines
    ticks = []
    stop = threading.Event()

    def spin():  # pure Python: runs only when the GIL is free
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.001)

    t = threading.Thread(target=spin)
    t.start()
    try:
        before = len(ticks)
        with pytest.raises(TimeoutError):
            b.wait_imm(0x1234, 1, timeout=0.5)
        assert len(ticks) - before > 10  # the spinner kept going during the wait
    finally:
        stop.set()
        t.join(10)


def test_a_wait_returns_when_another_thread_delivers(engines):
    a, b = engines
    dst = b.register(np.zeros(4096, dtype=np.uint8))
    remote = a.import_descriptor(dst.descriptor())
    threading.Timer(0.2, lambda: a.imm_only(remote, 42)).start()
    t0 = time.monotonic()
    b.wait_imm(42, 1, timeout=30.0)
    assert time.monotonic() - t0 < 30.0


def test_timeouts_are_honoured(engines):
    a, b = engines
    for timeout in (0.0, 0.05, 0.3):
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            b.wait_imm(0x77, 1, timeout=timeout)
        elapsed = time.monotonic() - t0
        assert timeout <= elapsed < timeout + 10.0
    h = b.expect_imm(0x78, 1)
    with pytest.raises(TimeoutError):
        h.wait(0.1)
    assert not h.done()
    with pytest.raises(te.TransferError, match="negative"):
        h.wait(-1.0)
    b.forget_imm(0x78)


def test_ctrl_c_interrupts_a_wait_in_the_main_thread():
    e = te.Engine()
    try:
        timer = threading.Timer(0.3, lambda: signal.raise_signal(signal.SIGINT))
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            e.wait_imm(0xC0FFEE, 1)  # no timeout: only the signal ends it
        assert time.monotonic() - t0 < 30.0
        timer.join()
    finally:
        e.close()


def test_ctrl_c_interrupts_a_waiting_process(child):
    import os

    peer = child(wait_forever, "tcp")
    assert peer.recv() == "ready"
    time.sleep(0.2)  # let it enter the wait; the outcome does not depend on it
    os.kill(peer.proc.pid, signal.SIGINT)
    reply = peer.recv()
    assert reply[0] == "interrupted", reply
    peer.proc.join(30)
    assert peer.proc.exitcode == 0


def test_manual_progress_mode_drives_on_wait_and_poll():
    a = te.Engine(progress="manual")
    b = te.Engine(progress="manual")
    try:
        src = a.register(np.full(8192, 3, dtype=np.uint8))
        buf = np.zeros(8192, dtype=np.uint8)
        target = b.register(buf)  # kept: dropping it ends the registration
        dst = a.import_descriptor(target.descriptor())
        h = a.write(src, dst, imm=9)
        # Manual mode: nothing moves unless someone calls in, and over tcp
        # the target must progress too (it accepts the connection).
        deadline = time.monotonic() + 30.0
        while (not h.done() or b.imm_count(9) < 1) and time.monotonic() < deadline:
            a.poll()
            b.poll()
        h.wait(0)
        b.wait_imm(9, 1, timeout=30.0)
        assert (buf == 3).all()
        assert a.poll() >= 0
    finally:
        a.close()
        b.close()
