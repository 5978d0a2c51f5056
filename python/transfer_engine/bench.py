"""Python's te-bench: the single and paged cases from Python, next to the
C++ te-bench measured in the same run, and the cost of one Python call.

    /usr/bin/python3 -m transfer_engine.bench                 # tcp on loopback
    /usr/bin/python3 -m transfer_engine.bench --provider=shm --json

Each case runs the same workload as te-bench's (same sizes, window of 64
writes outstanding, 64 pages per PagedWrite with random page indices and a
stride of page + 128 B, all single writes at offset 0, bytes per case capped
the same way), between this process and a target process, timed until the
target has counted every immediate. Python runs and te-bench runs (its own
process pair, one run each) alternate, --repeat times per case, so both see
the same machine state; each side reports its median.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import deque
from typing import Dict, List, Optional

import numpy as np

import transfer_engine as te

PAGES_IN_REGION = 1024
PAGE_SLACK = 128
DATA_IMM = 0x7E000001


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper()
    if t and t[-1] in units:
        return int(t[:-1]) * units[t[-1]]
    return int(t)


def human(n: int) -> str:
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def target_main(conn, provider: str, region_bytes: int) -> None:
    engine = te.Engine(provider=provider)
    buf = np.zeros(region_bytes, dtype=np.uint8)
    region = engine.register(buf)
    conn.send(region.descriptor())
    while True:
        cmd = conn.recv()
        if cmd[0] == "expect":
            try:
                engine.wait_imm(cmd[1], cmd[2], timeout=cmd[3])
                conn.send(("ok",))
            except Exception as e:  # reported; the initiator stops
                conn.send(("error", repr(e)))
        elif cmd[0] == "read":
            conn.send(("ok", buf[cmd[1]:cmd[1] + cmd[2]].tobytes()))
        elif cmd[0] == "zero":
            buf[:] = 0
            conn.send(("ok",))
        else:
            engine.close()
            conn.send(("ok",))
            return


class Bench:
    def __init__(self, args: argparse.Namespace, region_bytes: int) -> None:
        self.args = args
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target_main, args=(child, args.provider, region_bytes), daemon=True)
        self.proc.start()
        self.engine = te.Engine(provider=args.provider)
        self.src_buf = np.random.default_rng(7).integers(0, 256, region_bytes, dtype=np.uint8)
        self.src = self.engine.register(self.src_buf)
        if not self.conn.poll(60):
            raise RuntimeError("the target process did not start within 60 s")
        self.dst = self.engine.import_descriptor(self.conn.recv())

    def ask(self, *cmd):
        self.conn.send(cmd)
        if not self.conn.poll(self.args.timeout + 30):
            raise RuntimeError(f"the target did not answer {cmd[0]}")
        reply = self.conn.recv()
        if reply[0] != "ok":
            raise RuntimeError(f"target: {reply}")
        return reply

    def close(self) -> None:
        try:
            self.ask("exit")
        finally:
            self.proc.join(30)
            self.engine.close()

    def timed(self, submit_all, imms: int) -> float:
        """Seconds from the first submit until the target counted `imms`."""
        self.conn.send(("expect", DATA_IMM, imms, self.args.timeout))
        t0 = time.perf_counter()
        submit_all()
        if not self.conn.poll(self.args.timeout + 30):
            raise RuntimeError("the target did not count the immediates in time")
        reply = self.conn.recv()
        if reply[0] != "ok":
            raise RuntimeError(f"target: {reply}")
        return time.perf_counter() - t0

    def ops_for(self, bytes_per_op: int) -> int:
        return max(20, min(50000, self.args.bytes_per_case // max(1, bytes_per_op)))

    # ---- cases

    def single(self, size: int, n: int, batched: bool) -> float:
        e, src, dst, window = self.engine, self.src, self.dst, self.args.window
        per = e.expected_imm_count(te.SingleWrite(src, dst, size, imm=DATA_IMM))

        def run_calls():
            inflight: deque = deque()
            for _ in range(n):
                if len(inflight) >= window:
                    inflight.popleft().wait(self.args.timeout)
                inflight.append(e.write(src, dst, size, imm=DATA_IMM))
            e.wait_all(list(inflight), self.args.timeout)

        def run_batched():
            # Two batches of window/2 in flight: the window stays between
            # half and full, as a framework posting a layer at a time would.
            half = max(1, window // 2)
            zeros = np.zeros(half, dtype=np.uint64)
            lengths = np.full(half, size, dtype=np.uint64)
            inflight: deque = deque()
            left = n
            while left > 0:
                k = min(half, left)
                if len(inflight) >= 2:
                    inflight.popleft().wait(self.args.timeout)
                inflight.append(e.write_batch(src, dst, zeros[:k], zeros[:k], lengths[:k], imm=DATA_IMM))
                left -= k
            e.wait_all(list(inflight), self.args.timeout)

        return self.timed(run_batched if batched else run_calls, n * per)

    def paged(self, size: int, requests: List[tuple]) -> float:
        e, src, dst = self.engine, self.src, self.dst
        stride = size + PAGE_SLACK
        ppr = len(requests[0][0])
        window_reqs = max(1, self.args.window // ppr)  # te-bench's rule

        def run():
            inflight: deque = deque()
            for sp, dp in requests:
                if len(inflight) >= window_reqs:
                    inflight.popleft().wait(self.args.timeout)
                inflight.append(e.write_paged(src, sp, dst, dp, size, src_stride=stride, dst_stride=stride,
                                              imm=DATA_IMM))
            e.wait_all(list(inflight), self.args.timeout)

        return self.timed(run, len(requests) * ppr)

    def verify_paged(self, size: int, sp: np.ndarray, dp: np.ndarray) -> bool:
        stride = size + PAGE_SLACK
        self.ask("zero")
        self.engine.write_paged(self.src, sp, self.dst, dp, size, src_stride=stride, dst_stride=stride,
                                imm=DATA_IMM + 1).wait(self.args.timeout)
        self.ask("expect", DATA_IMM + 1, len(sp), self.args.timeout)
        for s, d in zip(sp.tolist(), dp.tolist()):
            got = self.ask("read", d * stride, size)[1]
            if got != self.src_buf[s * stride:s * stride + size].tobytes():
                return False
        return True

    def verify_single(self, size: int) -> bool:
        self.ask("zero")
        per = self.engine.expected_imm_count(te.SingleWrite(self.src, self.dst, size, imm=DATA_IMM + 2))
        self.engine.write(self.src, self.dst, size, imm=DATA_IMM + 2).wait(self.args.timeout)
        self.ask("expect", DATA_IMM + 2, per, self.args.timeout)
        return self.ask("read", 0, size)[1] == self.src_buf[:size].tobytes()

    def call_overhead(self) -> Dict[str, float]:
        """Microseconds one Python call takes to submit and return a Handle,
        for a 4 KiB write and for a 64-page PagedWrite of 4 KiB pages: the
        median over calls made one at a time (each waited for before the
        next), so that the figure is the call's own cost, not time spent
        preempted by the engine's threads on a busy machine."""
        e, src, dst = self.engine, self.src, self.dst
        out = {}
        per = e.expected_imm_count(te.SingleWrite(src, dst, 4096, imm=DATA_IMM))
        times: List[float] = []

        def singles():
            for _ in range(1000):
                t = time.perf_counter()
                h = e.write(src, dst, 4096, imm=DATA_IMM)
                times.append(time.perf_counter() - t)
                h.wait(self.args.timeout)

        self.timed(singles, 1000 * per)
        out["single_4k_us"] = statistics.median(times) * 1e6
        rng = np.random.default_rng(1)
        reqs = [(rng.permutation(PAGES_IN_REGION)[:64].astype(np.uint32),
                 rng.permutation(PAGES_IN_REGION)[:64].astype(np.uint32)) for _ in range(200)]
        stride = 4096 + PAGE_SLACK
        times = []

        def pages():
            for sp, dp in reqs:
                t = time.perf_counter()
                h = e.write_paged(src, sp, dst, dp, 4096, src_stride=stride, dst_stride=stride, imm=DATA_IMM)
                times.append(time.perf_counter() - t)
                h.wait(self.args.timeout)

        self.timed(pages, len(reqs) * 64)
        out["paged_64x4k_us"] = statistics.median(times) * 1e6
        return out


def find_te_bench(given: str) -> Optional[str]:
    if given == "none":
        return None
    if given:
        return given
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "..", "..", "tools", "te-bench"),  # <build>/python/transfer_engine
                 os.path.join(os.getcwd(), "build", "tools", "te-bench")):
        if os.access(cand, os.X_OK):
            return os.path.normpath(cand)
    return shutil.which("te-bench")


def run_cpp(path: str, args: argparse.Namespace, case: str, size: int) -> Optional[dict]:
    cmd = [path, "--loopback", "--json", f"--provider={args.provider}", f"--window={args.window}",
           "--repeat=1", f"--bytes_per_case={args.bytes_per_case}",
           f"--pages_per_request={args.pages_per_request}"]
    # Only the case's own size: te-bench sizes its region for the largest.
    cmd += [f"--cases={case}", f"--sizes={size}" if case == "single" else f"--page_sizes={size}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout * 10 + 120)
    if out.returncode != 0:
        sys.stderr.write(f"te-bench failed ({out.returncode}): {out.stderr[-2000:]}\n")
        return None
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            if row.get("case") == case:
                return row
    return None


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m transfer_engine.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--provider", default="tcp", help="tcp (loopback) or shm")
    ap.add_argument("--cases", default="single,paged", help="single, paged")
    ap.add_argument("--sizes", default="4K,64K,1M,16M", help="single-write sizes")
    ap.add_argument("--page_sizes", default="4K", help="paged-write page sizes")
    ap.add_argument("--pages_per_request", type=int, default=64)
    ap.add_argument("--window", type=int, default=64, help="writes outstanding (te-bench's --window)")
    ap.add_argument("--bytes_per_case", type=int, default=256 << 20)
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the median is reported")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per run")
    ap.add_argument("--te_bench", default="", help="path of te-bench ('none': Python only)")
    ap.add_argument("--json", action="store_true", help="one JSON object per case")
    args = ap.parse_args(argv)
    if args.window < 1 or args.repeat < 1 or not 1 <= args.pages_per_request <= PAGES_IN_REGION:
        ap.error("--window and --repeat must be >= 1, --pages_per_request in 1..1024")
    kinds = [k for k in args.cases.split(",") if k]
    for k in kinds:
        if k not in ("single", "paged"):
            ap.error(f"--cases names {k!r}; valid: single, paged")
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s]
        page_sizes = [parse_size(s) for s in args.page_sizes.split(",") if s]
    except ValueError as e:
        ap.error(f"bad size: {e}")
    if any(s <= 0 or s > (1 << 30) for s in sizes + page_sizes):
        ap.error("sizes must be in 1..1G")
    region = max([max(sizes, default=0)] + [PAGES_IN_REGION * (p + PAGE_SLACK) for p in page_sizes])
    cpp = find_te_bench(args.te_bench)
    plan = []
    if "single" in kinds:
        plan += [("single", s, False) for s in sizes] + [("single_batch", s, True) for s in sizes]
    if "paged" in kinds:
        plan += [("paged", p, None) for p in page_sizes]
    bench = Bench(args, region)
    rows = []
    rng = np.random.default_rng(42)
    try:
        if not args.json:
            print(f"transfer_engine.bench: provider {bench.engine.provider}, window {args.window}, median of "
                  f"{args.repeat} run(s); C++: {cpp or 'not found (--te_bench)'}")
            print(f"{'case':<13}{'size':>6}{'python':>12}{'c++':>12}{'ratio':>8}  unit   verified")
        for i, (case, size, batched) in enumerate(plan):
            sys.stderr.write(f"[{i + 1}/{len(plan)}] {case} {human(size)} ...\n")
            metric = "mops" if case == "paged" else "gbps"
            if case == "paged":
                ppr = args.pages_per_request
                nreq = max(1, bench.ops_for(size) // ppr)
                reqs = [(rng.permutation(PAGES_IN_REGION)[:ppr].astype(np.uint32),
                         rng.permutation(PAGES_IN_REGION)[:ppr].astype(np.uint32)) for _ in range(nreq)]
                bench.paged(size, reqs[:max(1, 50 // ppr)])  # warm-up, as te-bench
                run_py = lambda: nreq * ppr / bench.paged(size, reqs) / 1e6  # noqa: E731
                unit = "Mop/s"
            else:
                n = bench.ops_for(size)
                bench.single(size, 50, batched)
                run_py = lambda: n * size / bench.single(size, n, batched) / 1e9  # noqa: E731
                unit = "GB/s"
            # Python and C++ runs alternate, so that both see the same drift of
            # a shared machine; each side reports its median.
            py_vals, cpp_vals = [], []
            for _ in range(args.repeat):
                py_vals.append(run_py())
                if cpp:
                    row = run_cpp(cpp, args, "paged" if case == "paged" else "single", size)
                    if row and row.get(metric):
                        cpp_vals.append(row[metric])
            value = statistics.median(py_vals)
            ref = statistics.median(cpp_vals) if cpp_vals else None
            verified = (bench.verify_paged(size, reqs[0][0], reqs[0][1]) if case == "paged"
                        else bench.verify_single(size))
            ratio = value / ref if ref else None
            rec = {"case": case, "size": size, "provider": bench.engine.provider, "python": round(value, 4),
                   "cpp": ref, "ratio": None if ratio is None else round(ratio, 3), "unit": unit,
                   "verified": verified}
            rows.append(rec)
            if args.json:
                print(json.dumps(rec), flush=True)
            else:
                print(f"{case:<13}{human(size):>6}{value:>12.4f}{(ref or float('nan')):>12.4f}"
                      f"{(ratio or float('nan')):>8.2f}  {unit:<6} {'yes' if verified else 'NO'}", flush=True)
        over = bench.call_overhead()
        if args.json:
            print(json.dumps({"case": "call_overhead", **{k: round(v, 2) for k, v in over.items()}}))
        else:
            print(f"per-call cost (submit, returns a Handle): write 4 KiB {over['single_4k_us']:.2f} us, "
                  f"write_paged 64 x 4 KiB {over['paged_64x4k_us']:.2f} us")
    finally:
        bench.close()
    return 0 if all(r["verified"] for r in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
