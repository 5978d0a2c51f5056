"""Shared fixtures of the Python tests.

They run against the package in the build tree (ctest sets PYTHONPATH) with
Debian's interpreter. Every wait has a deadline; peers are child processes
started with multiprocessing's "spawn" and are killed at the end of a test
whatever happened.
"""

import multiprocessing as mp
import os

import pytest

import transfer_engine as te

PROVIDERS = ["tcp", "shm"]
# Generous: the machine is shared and may be slow; nothing here waits this
# long unless something is wrong.
DEADLINE = 60.0


@pytest.fixture(params=PROVIDERS)
def provider(request):
    return request.param


@pytest.fixture
def engines(provider):
    """Two engines of `provider` in this process."""
    a = te.Engine(provider=provider, request_timeout=10.0)
    b = te.Engine(provider=provider, request_timeout=10.0)
    yield a, b
    a.close()
    b.close()


class Child:
    """A peer process running `target(conn, *args)`, talked to over a pipe."""

    def __init__(self, target, *args):
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child_conn,) + args, daemon=True)
        self.proc.start()
        child_conn.close()

    def recv(self, timeout=DEADLINE):
        if not self.conn.poll(timeout):
            raise TimeoutError(f"child sent nothing within {timeout} s (alive: {self.proc.is_alive()})")
        return self.conn.recv()

    def send(self, obj):
        self.conn.send(obj)

    def close(self):
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(DEADLINE)


@pytest.fixture
def child():
    made = []

    def start(target, *args):
        c = Child(target, *args)
        made.append(c)
        return c

    yield start
    for c in made:
        c.close()


def pattern(n, seed):
    """Deterministic bytes: what each side expects without sending them."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


os.environ.setdefault("TE_TEST_PYTHON", "1")
