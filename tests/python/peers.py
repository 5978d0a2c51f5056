"""Peer processes for the Python tests (module-level so "spawn" can run them)."""

import os
import signal
import sys
import time

import numpy as np

import transfer_engine as te

SIZE = 1 << 20


def serve(conn, provider):
    """A target: two registered regions, driven by commands over `conn`."""
    engine = te.Engine(provider=provider, request_timeout=10.0)
    d1 = np.zeros(SIZE, dtype=np.uint8)
    d2 = np.zeros(SIZE, dtype=np.uint8)
    r1, r2 = engine.register(d1), engine.register(d2)
    conn.send({"address": engine.address(), "d1": r1.descriptor(), "d2": r2.descriptor(), "pid": os.getpid()})
    while True:
        cmd = conn.recv()
        try:
            if cmd[0] == "wait_imm":
                engine.wait_imm(cmd[1], cmd[2], timeout=30.0)
                conn.send(("ok",))
            elif cmd[0] == "dump":
                conn.send(("ok", d1.tobytes(), d2.tobytes()))
            elif cmd[0] == "echo":
                sender, data = engine.recv(timeout=30.0)
                peer = engine.add_peer(sender)
                engine.send(peer, b"echo:" + data).wait(30.0)
                conn.send(("ok", data))
            elif cmd[0] == "exit":
                engine.close()
                conn.send(("ok",))
                return
        except Exception as e:  # reported to the test, which fails on it
            conn.send(("error", repr(e)))


def wait_forever(conn, provider):
    """Blocks in wait_imm with no timeout until SIGINT; reports what it saw."""
    engine = te.Engine(provider=provider)
    conn.send("ready")
    t0 = time.monotonic()
    try:
        engine.wait_imm(0xBEEF, 1)
        conn.send("returned")
    except KeyboardInterrupt:
        conn.send(("interrupted", time.monotonic() - t0))
    engine.close()


def sigint_self_after(delay):
    """For use in a thread: the interrupt a user's Ctrl-C would send."""
    time.sleep(delay)
    os.kill(os.getpid(), signal.SIGINT)


if __name__ == "__main__":
    sys.exit("peers.py holds helpers for the tests; run pytest")


def serve_cuda_tensor(conn, nbytes, provider):
    """A target whose region is a torch CUDA tensor: reports its descriptor,
    waits for the writes' immediates, then sends the tensor's bytes back."""
    import torch

    engine = te.Engine(provider=provider, request_timeout=10.0)
    tensor = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    region = engine.register(tensor)
    conn.send((region.device, region.descriptor()))
    while True:
        cmd = conn.recv()
        try:
            if cmd[0] == "wait_imm":
                engine.wait_imm(cmd[1], cmd[2], timeout=30.0)
                torch.cuda.synchronize()
                conn.send(("ok", tensor.cpu().numpy().tobytes()))
            elif cmd[0] == "exit":
                engine.close()
                conn.send(("ok",))
                return
        except Exception as e:  # reported to the test, which fails on it
            conn.send(("error", repr(e)))
