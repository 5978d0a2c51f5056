#!/usr/bin/env python3
"""The engine in two processes: a receiver registers a buffer and counts
immediates; a sender writes into it. The smallest complete use of the API.

    /usr/bin/python3 examples/write_and_count.py [--provider=shm]
"""

import argparse
import multiprocessing as mp
import sys

import numpy as np

import transfer_engine as te

SIZE = 8 << 20
IMM = 42


def receiver(conn, provider: str) -> None:
    with te.Engine(provider=provider) as engine:
        buf = np.zeros(SIZE, dtype=np.uint8)
        region = engine.register(buf)          # zero-copy: the NIC writes into `buf`
        conn.send(region.descriptor())         # bytes, over any side channel
        count = conn.recv()                    # the sender says how many to expect
        engine.wait_imm(IMM, count, timeout=60.0)   # the data has landed
        expected = np.arange(SIZE, dtype=np.uint64).astype(np.uint8)
        conn.send(bool(np.array_equal(buf, expected)))
        region.deregister()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--provider", default="tcp")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=receiver, args=(child, args.provider), daemon=True)
    proc.start()
    with te.Engine(provider=args.provider) as engine:
        src = np.arange(SIZE, dtype=np.uint64).astype(np.uint8)
        region = engine.register(src)
        if not conn.poll(60):
            print("the receiver did not start")
            return 1
        dst = engine.import_descriptor(conn.recv())
        # Two halves: a single write and a paged write of 64 KiB pages.
        half = SIZE // 2
        first = te.SingleWrite(region, dst, half, imm=IMM)
        pages = np.arange(half // 65536, dtype=np.uint32) + half // 65536
        second = te.PagedWrite(region, pages, dst, pages, 65536, imm=IMM)
        conn.send(engine.expected_imm_count(first) + engine.expected_imm_count(second))
        engine.wait_all([engine.submit(first), engine.submit(second)], timeout=60.0)
        ok = conn.recv() if conn.poll(60) else False
        print(f"{SIZE >> 20} MiB over {engine.provider}: {'verified' if ok else 'MISMATCH'}")
        print("stats:", {k: v for k, v in engine.stats().items() if k in ("requests_done", "writes_posted")})
    proc.join(30)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
