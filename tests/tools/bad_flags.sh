#!/usr/bin/env bash
# Tools refuse bad flags with a message and a non-zero exit, and leave
# nothing behind: no process (te-bench --loopback forks a listener), no
# /dev/shm file (te-weightsync serve maps one), no uncaught exception.
set -u
USAGE="usage: bad_flags.sh te-bench te-weightsync te-telemetry te-moe"
BENCH=${1:?$USAGE}
WSYNC=${2:?$USAGE}
TELEM=${3:?$USAGE}
MOE=${4:?$USAGE}
fail=0
expect_refused() {  # expect_refused <what the message must contain> <command...>
  local want=$1; shift
  local out rc
  out=$(timeout 60 "$@" 2>&1); rc=$?
  if [ $rc -eq 0 ] || [ $rc -ge 124 ]; then
    echo "FAIL: '$*' exited $rc (want a refusal)"; fail=1
  elif ! grep -q -- "$want" <<<"$out"; then
    echo "FAIL: '$*' said '$out' (want '$want')"; fail=1
  elif grep -q "terminate called\|Aborted\|core dumped" <<<"$out"; then
    echo "FAIL: '$*' aborted: $out"; fail=1
  else
    echo "ok: $* -> $(head -c 160 <<<"$out" | tr '\n' ' ')"
  fi
}
expect_refused "cases" "$BENCH" --loopback --cases=bogus
expect_refused "16G" "$BENCH" --loopback --sizes=99999999999G
expect_refused "iters" "$BENCH" --loopback --iters=-5
expect_refused "no network interface 'bogus0'" "$BENCH" --loopback --iface=bogus0 --cases=imm --rtt_iters=10
sleep 0.2
if pgrep -x te-bench >/dev/null; then echo "FAIL: a te-bench process was left behind"; pgrep -ax te-bench; fail=1; fi

SHM=/dev/shm/te-weights-badflags-$$
expect_refused "rendezvous" "$WSYNC" serve --rendezvous=/proc/nonexistent/dir --rank=0 --ranks=1 --sources=1 \
  --model=tiny --shm="$SHM"
if [ -e "$SHM" ]; then echo "FAIL: a failed serve left $SHM"; rm -f "$SHM"; fail=1; fi
expect_refused "reporters" "$TELEM" bench --reporters=abc
expect_refused "reporters" "$TELEM" report --reporters=99999999999999999999
expect_refused "ep" "$MOE" bench --ep=99999999999
expect_refused "zipf" "$MOE" gen --out=/dev/null --model=zipf
expect_refused "group_size" "$MOE" gen --out=/dev/null --model=groups --experts=64 --group_size=48
expect_refused "cannot open trace" "$MOE" place --trace=/nonexistent/trace.bin
expect_refused "--mode entry 'fast'" "$MOE" bench --ep=2 --mode=fast
expect_refused "bench_sources" "$WSYNC" bench --bench_sources=99999999999
exit $fail
