#!/usr/bin/env python3
"""GPU memory between two processes of one host through the same-host domain
(`--provider=local`: CUDA IPC, nic/local/cuda_ipc.h), against the copy the
GPU does on its own in the same run.

    PYTHONPATH=<build>/python python3 scripts/bench/gpu_same_host.py [--json]

Needs torch with a GPU (exits 0 saying so where there is none). A target
process registers a CUDA tensor; this process writes into it from a CUDA
tensor (device to device) and from pinned host memory (host to device),
with --window writes in flight, and KV-style pages (64 random pages of 16
and 64 KiB per write_paged, device to device), timed until the target
counted every immediate. The baselines, measured in this process in the same run:
`dst.copy_(src)` of the same bytes, device to device and pinned host to
device (cudaMemcpyAsync), queued back to back (the copy engine's rate) and
each waited for before the next (what a write must do before its
immediate may be sent). Both peers share one GPU here, so
"device to device" is a copy within one GPU's memory; between two GPUs it
would go over NVLink or PCIe and the baseline would be a peer copy.
"""

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time

SIZES = [64 << 10, 1 << 20, 16 << 20, 64 << 20]
PAGE_SIZES = [16 << 10, 64 << 10]
IMM = 0x6B000001


def target(conn, nbytes):
    import torch

    import transfer_engine as te

    engine = te.Engine(provider="local", request_timeout=30.0)
    buf = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    region = engine.register(buf)
    conn.send(region.descriptor())
    while True:
        cmd = conn.recv()
        if cmd[0] == "expect":
            try:
                engine.wait_imm(cmd[1], cmd[2], timeout=60.0)
                conn.send(("ok",))
            except Exception as e:  # reported; the initiator stops
                conn.send(("error", repr(e)))
        elif cmd[0] == "read":
            torch.cuda.synchronize()
            conn.send(("ok", buf[cmd[1]:cmd[1] + cmd[2]].cpu().numpy().tobytes()))
        else:
            engine.close()
            conn.send(("ok",))
            return


def ask(conn, *cmd):
    conn.send(cmd)
    if not conn.poll(120):
        sys.exit(f"the target did not answer {cmd[0]}")
    reply = conn.recv()
    if reply[0] != "ok":
        sys.exit(f"target: {reply}")
    return reply


def copy_rate(torch, dst, src, size, n, wait_each):
    """GB/s of n copies of `size` bytes by the GPU's own copy engine, queued
    back to back, or each waited for before the next (what a write must do
    before its immediate may go)."""
    d, s = dst[:size], src[:size]
    d.copy_(s, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        d.copy_(s, non_blocking=True)
        if wait_each:
            torch.cuda.current_stream().synchronize()
    torch.cuda.synchronize()
    return size * n / (time.perf_counter() - t0) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window", type=int, default=8, help="writes in flight")
    p.add_argument("--bytes_per_case", type=int, default=4 << 30)
    p.add_argument("--repeat", type=int, default=3, help="runs per case; the median is reported")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    try:
        import torch
    except ImportError:
        print("gpu_same_host: torch is not installed; nothing measured")
        return 0
    if not torch.cuda.is_available():
        print("gpu_same_host: no GPU; nothing measured")
        return 0
    import transfer_engine as te

    region = max(SIZES)
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, region), daemon=True)
    proc.start()
    if not conn.poll(120):
        sys.exit("the target process did not start")
    engine = te.Engine(provider="local", request_timeout=30.0)
    gen = torch.Generator(device="cuda").manual_seed(3)
    src_gpu = torch.randint(0, 256, (region,), dtype=torch.uint8, device="cuda", generator=gen)
    src_host = src_gpu.cpu().pin_memory()
    scratch = torch.empty(region, dtype=torch.uint8, device="cuda")
    sources = {"gpu->gpu": engine.register(src_gpu), "host->gpu": engine.register(src_host)}
    dst = engine.import_descriptor(conn.recv())

    rows = []
    for kind, src in sources.items():
        base_src = src_gpu if kind == "gpu->gpu" else src_host
        for size in SIZES:
            n = max(8, min(20000, args.bytes_per_case // size))
            per = engine.expected_imm_count(te.SingleWrite(src, dst, size, imm=IMM))
            engine_rates, base_rates, sync_rates = [], [], []
            for _ in range(args.repeat):
                conn.send(("expect", IMM, n * per))
                t0 = time.perf_counter()
                inflight = []
                for _ in range(n):
                    if len(inflight) >= args.window:
                        inflight.pop(0).wait(60.0)
                    inflight.append(engine.write(src, dst, size, imm=IMM))
                engine.wait_all(inflight, 60.0)
                if not conn.poll(120) or conn.recv()[0] != "ok":
                    sys.exit("the target did not count the immediates")
                engine_rates.append(size * n / (time.perf_counter() - t0) / 1e9)
                base_rates.append(copy_rate(torch, scratch, base_src, size, n, False))
                sync_rates.append(copy_rate(torch, scratch, base_src, size, n, True))
            # The bytes landed: the last write's bytes, read back by the target.
            got = ask(conn, "read", 0, min(size, 1 << 20))[1]
            if got != base_src[:min(size, 1 << 20)].cpu().numpy().tobytes():
                sys.exit(f"{kind} {size}: the target's bytes differ from the source")
            e, b = statistics.median(engine_rates), statistics.median(base_rates)
            w = statistics.median(sync_rates)
            rows.append({"case": kind, "size": size, "writes": n, "engine_GBps": round(e, 1),
                         "copy_GBps": round(b, 1), "copy_each_waited_GBps": round(w, 1), "ratio": round(e / b, 3),
                         "ratio_each_waited": round(e / w, 3)})
            if not args.json:
                print(f"  {kind:9} {size >> 10:>7} KiB  engine {e:8.1f} GB/s  copies queued {b:8.1f} GB/s "
                      f"(ratio {e / b:5.2f})  each waited {w:8.1f} GB/s (ratio {e / w:5.2f})", flush=True)
    # KV pages: 64 pages per write_paged, random page indices, GPU to GPU.
    import numpy as np

    rng = np.random.default_rng(11)
    for page in PAGE_SIZES:
        pages_in_region = region // page
        reqs = max(8, min(2000, args.bytes_per_case // (page * 64)))
        sp = [rng.permutation(pages_in_region)[:64].astype(np.uint32) for _ in range(reqs)]
        dp = [rng.permutation(pages_in_region)[:64].astype(np.uint32) for _ in range(reqs)]
        src = sources["gpu->gpu"]
        engine_rates, base_rates, sync_rates = [], [], []
        for _ in range(args.repeat):
            conn.send(("expect", IMM, reqs * 64))
            t0 = time.perf_counter()
            inflight = []
            for k in range(reqs):
                if len(inflight) >= max(1, args.window // 4):
                    inflight.pop(0).wait(60.0)
                inflight.append(engine.write_paged(src, sp[k], dst, dp[k], page, imm=IMM))
            engine.wait_all(inflight, 60.0)
            if not conn.poll(120) or conn.recv()[0] != "ok":
                sys.exit("the target did not count the immediates")
            engine_rates.append(page * 64 * reqs / (time.perf_counter() - t0) / 1e9)
            base_rates.append(copy_rate(torch, scratch, src_gpu, page, reqs * 64, False))
            sync_rates.append(copy_rate(torch, scratch, src_gpu, page, reqs * 64, True))
        last_s, last_d = int(sp[-1][-1]), int(dp[-1][-1])
        got = ask(conn, "read", last_d * page, page)[1]
        if got != src_gpu[last_s * page:(last_s + 1) * page].cpu().numpy().tobytes():
            sys.exit(f"pages {page}: the target's bytes differ from the source")
        e, b, w = (statistics.median(x) for x in (engine_rates, base_rates, sync_rates))
        rows.append({"case": "gpu->gpu pages x64", "size": page, "writes": reqs, "engine_GBps": round(e, 1),
                     "copy_GBps": round(b, 1), "copy_each_waited_GBps": round(w, 1), "ratio": round(e / b, 3),
                     "ratio_each_waited": round(e / w, 3)})
        if not args.json:
            print(f"  pages x64 {page >> 10:>5} KiB  engine {e:8.1f} GB/s  copies queued {b:8.1f} GB/s "
                  f"(ratio {e / b:5.2f})  each waited {w:8.1f} GB/s (ratio {e / w:5.2f})", flush=True)
    ask(conn, "exit")
    proc.join(30)
    engine.close()
    if args.json:
        print(json.dumps({"gpu": torch.cuda.get_device_name(), "window": args.window, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
