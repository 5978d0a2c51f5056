#!/usr/bin/env bash
# te-weightsync end to end with real daemons: two `serve` receivers and two
# `push` sources (fsdp x2 -> tp x2), on loopback, or with --netns across two
# network namespaces joined by a veth pair (receivers in one, sources in the
# other). Every completed version is verified byte for byte by the receiver.
# Then a receiver is killed: the next push reports it missed and the other
# completes; a restarted receiver is current after the following push.
# Exits 77 (skipped) where namespaces cannot be made.
set -u
TOOL=${1:?usage: weightsync_daemons.sh path/to/te-weightsync [--netns]}
MODE=${2:-loopback}
DIR=$(mktemp -d)
PIDS=()
RUN_R=(); RUN_S=(); IF_R=(); IF_S=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  del_veth_pair "${NSA:-}" "${NSB:-}"
  rm -rf "$DIR" /dev/shm/te-ws-$$-*
}
. "$(dirname "$0")/../netns/veth_pair.sh"
trap cleanup EXIT
if [ "$MODE" = "--netns" ]; then
  NSA=te-wa-$$; NSB=te-wb-$$; VA=twa$$; VB=twb$$
  make_veth_pair "$NSA" "$NSB" "$VA" "$VB" 10.78.0 || exit $?
  RUN_R=(ip netns exec "$NSA"); RUN_S=(ip netns exec "$NSB"); IF_R=(--iface="$VA"); IF_S=(--iface="$VB")
fi
COMMON=(--rendezvous="$DIR" --model=moe --model_bytes=24M --sources=2 --ranks=2 --timeout_ms=3000)

serve() {  # rank
  rm -f "$DIR/receiver-$1"  # a killed receiver's entry is stale
  "${RUN_R[@]}" "$TOOL" serve "${COMMON[@]}" "${IF_R[@]}" --rank="$1" --verify --serve_seconds=120 \
    --shm=/dev/shm/te-ws-$$-"$1" >>"$DIR/serve-$1.log" 2>&1 &
  PIDS+=($!); eval "SERVE$1=$!"
  for _ in $(seq 1 100); do [ -f "$DIR/receiver-$1" ] && return 0; sleep 0.1; done
  echo "FAIL: receiver $1 did not announce itself"; cat "$DIR/serve-$1.log"; exit 1
}
push() {  # first_version versions
  for s in 0 1; do
    "${RUN_S[@]}" timeout 120 "$TOOL" push "${COMMON[@]}" "${IF_S[@]}" --rank=$s --first_version="$1" \
      --versions="$2" >"$DIR/push-$s.log" 2>&1 &
    eval "P$s=$!"
  done
  wait "$P0" || { echo "FAIL: source 0"; cat "$DIR/push-0.log"; exit 1; }
  wait "$P1" || { echo "FAIL: source 1"; cat "$DIR/push-1.log"; exit 1; }
}
published() {  # rank
  "$TOOL" status --rendezvous="$DIR" | awk -v r="$1" '$1 == r { print $2 }'
}
wait_published() {  # rank version
  for _ in $(seq 1 200); do [ "$(published "$1")" = "$2" ] && return 0; sleep 0.05; done
  echo "FAIL: receiver $1 is at version '$(published "$1")', expected $2"; cat "$DIR"/serve-*.log "$DIR"/push-*.log; exit 1
}

serve 0; serve 1
push 1 3
wait_published 0 3; wait_published 1 3
"$TOOL" status --rendezvous="$DIR"

kill -9 "$SERVE1"; wait "$SERVE1" 2>/dev/null
push 4 1   # receiver 1 is dead (its rendezvous entry is stale)
grep -q "receiver 1 missed version 4" "$DIR/push-0.log" || { echo "FAIL: the push did not report receiver 1"; cat "$DIR"/push-*.log "$DIR"/serve-*.log; exit 1; }
wait_published 0 4

serve 1    # restarted: empty memory, new engine
push 5 1
wait_published 0 5; wait_published 1 5
"$TOOL" status --rendezvous="$DIR"

grep -h "MISMATCH\|FAILED" "$DIR"/serve-*.log && { echo "FAIL: a receiver saw wrong bytes or failed a version"; exit 1; }
N=$(cat "$DIR"/serve-*.log | grep -c "complete, verified")
# receiver 0: versions 1-5; receiver 1: 1-3, then 5 after its restart.
[ "$N" -eq 9 ] || { echo "FAIL: expected 9 verified versions, got $N"; cat "$DIR"/serve-*.log; exit 1; }
echo "PASS ($MODE): 9 versions verified on 2 receivers, a killed receiver reported and caught up after restart"
