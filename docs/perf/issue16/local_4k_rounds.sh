#!/usr/bin/env bash
# 4 KiB single writes: the same-host domain (worker thread and manual
# progress) against the shm provider's own window loop
# (baselines/provider-window-bench, which shares no code with the engine)
# and the engine over shm, alternating in rounds, each run with the
# cross-CPU probe (base/cross_cpu_probe.h) to tell this machine's states
# apart. Usage: bash docs/perf/issue16/local_4k_rounds.sh [rounds] > out.txt
set -u
rounds=${1:-6}
b=./build/tools/te-bench
for r in $(seq 1 "$rounds"); do
  echo "== round $r $(date +%T)"
  ./build/baselines/provider-window-bench --provider=shm --size=4096 --probe 2>/dev/null | tail -3 | sed 's/^/provider-loop /'
  for p in thread manual; do
    $b --loopback --provider=local --progress=$p --cases=single --sizes=4K --raw --probe --repeat=3 2>/dev/null \
      | grep '^single' | sed "s/^/local-$p /"
  done
  $b --loopback --provider=shm --cases=single --sizes=4K --raw --probe --repeat=3 2>/dev/null | grep '^single' | sed 's/^/shm-engine /'
done
