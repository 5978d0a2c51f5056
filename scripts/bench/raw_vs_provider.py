#!/usr/bin/env python3
"""Checks te-bench's raw loop against an independent provider loop
(baselines/provider_window_bench.cc), alternating the two, and labels every
run with the machine's cross-CPU round trip (base/cross_cpu_probe.h) so that
runs are compared only within one machine state.

    /usr/bin/python3 scripts/bench/raw_vs_provider.py --rounds=8 [--provider=shm] [--size=4096]

Prints every run, then per state the medians of: the provider loop with fi_writedata, with
fi_inject_writedata up to the inject size, te-bench's raw loop, and the
engine (worker-thread mode), and the ratios the targets are about. States,
by the probe: "fastest" under --fastest_ns (the two CPUs seem to share a
core's caches then: the provider loop about doubles), "fast" under
--fast_ns, "slow" above.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_json(cmd):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--provider", default="shm")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--build", default="build")
    ap.add_argument("--fast_ns", type=float, default=200.0)
    ap.add_argument("--fastest_ns", type=float, default=62.0)
    args = ap.parse_args()
    pwb = os.path.join(args.build, "baselines", "provider-window-bench")
    teb = os.path.join(args.build, "tools", "te-bench")
    runs = {"provider writedata": [], "provider inject": [], "te-bench raw": [], "te-bench engine": []}
    for r in range(args.rounds):
        print(f"## round {r + 1}", flush=True)
        for op, name in (("writedata", "provider writedata"), ("inject", "provider inject")):
            for row in run_json([pwb, f"--provider={args.provider}", f"--size={args.size}", "--window=64",
                                 "--iters=100000", "--runs=1", f"--op={op}", "--probe", "--json"]):
                runs[name].append((row["mops"], row["xcpu_ns"]))
                print(f"{name:20s} {row['mops']:7.3f} Mop/s  xcpu {row['xcpu_ns']:5.0f} ns", flush=True)
        for row in run_json([teb, "--loopback", "--raw", "--probe", "--json", f"--provider={args.provider}",
                             "--cases=single", f"--sizes={args.size}", "--repeat=3"]):
            mops = lambda gbps: gbps * 1e9 / args.size / 1e6
            for key, name in (("raw_runs", "te-bench raw"), ("runs", "te-bench engine")):
                for run in row[key]:
                    runs[name].append((mops(run["gbps"]), run["xcpu_ns"]))
                    print(f"{name:20s} {mops(run['gbps']):7.3f} Mop/s  xcpu {run['xcpu_ns']:5.0f} ns", flush=True)
    print(f"\n# medians per machine state ({args.provider}, {args.size} B, window 64; "
          f"fastest: probe < {args.fastest_ns:.0f} ns, fast: < {args.fast_ns:.0f} ns)")
    summary = {}
    for state, keep in (("fastest", lambda ns: 0 < ns < args.fastest_ns),
                        ("fast", lambda ns: args.fastest_ns <= ns < args.fast_ns),
                        ("slow", lambda ns: ns >= args.fast_ns)):
        print(f"{state}:")
        for name, v in runs.items():
            sel = [m for m, ns in v if keep(ns)]
            med = statistics.median(sel) if sel else float("nan")
            summary[(state, name)] = med
            print(f"  {name:20s} {med:7.3f} Mop/s  ({len(sel)} runs)")
        best_provider = max(summary[(state, "provider writedata")], summary[(state, "provider inject")])
        if best_provider == best_provider and best_provider > 0 and summary[(state, "te-bench raw")] > 0:
            print(f"  te-bench raw / best provider loop: {summary[(state, 'te-bench raw')] / best_provider:.3f}")
            print(f"  engine / te-bench raw:             "
                  f"{summary[(state, 'te-bench engine')] / summary[(state, 'te-bench raw')]:.3f}")


if __name__ == "__main__":
    main()
