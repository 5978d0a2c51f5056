#!/usr/bin/env bash
# te-weightsync end to end with real daemons: two `serve` receivers and two
# `push` sources (fsdp x2 -> tp x2), on loopback, or with --netns across two
# network namespaces joined by a veth pair (receivers in one, sources in the
# other). Every completed version is verified byte for byte by the receiver.
# Then a receiver is killed: the next push reports it missed and the other
# completes; a restarted receiver is current after the following push.
# With --registry the ranks meet through a private redis-server instead of a
# rendezvous directory: on a unix socket on loopback, or with --netns on TCP
# in the receivers' namespace, which the sources reach over the veth pair.
# Exits 77 (skipped) where namespaces cannot be made.
set -u
TOOL=${1:?usage: weightsync_daemons.sh path/to/te-weightsync [--netns] [--registry]}
shift
MODE=loopback; REGISTRY=""
for arg in "$@"; do
  case "$arg" in
    --netns) MODE=--netns ;;
    --registry) REGISTRY=pending ;;
    *) echo "unknown argument $arg"; exit 2 ;;
  esac
done
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
MEET=(--rendezvous="$DIR")
if [ -n "$REGISTRY" ]; then
  command -v redis-server >/dev/null || { echo "FAIL: redis-server not found; scripts/install-deps.sh installs it"; exit 1; }
  if [ "$MODE" = "--netns" ]; then
    "${RUN_R[@]}" redis-server --port 6379 --bind 10.78.0.1 --protected-mode no --save "" --appendonly no \
      --dir "$DIR" >"$DIR/redis.log" 2>&1 &
    REGISTRY=10.78.0.1:6379
  else
    redis-server --port 0 --unixsocket "$DIR/redis.sock" --save "" --appendonly no --dir "$DIR" >"$DIR/redis.log" 2>&1 &
    REGISTRY=unix:$DIR/redis.sock
  fi
  PIDS+=($!)
  MEET=(--registry="$REGISTRY" --job=ws$$)
  for _ in $(seq 100); do "${RUN_S[@]}" "$TOOL" status "${MEET[@]}" >/dev/null 2>&1 && break; sleep 0.05; done
  "${RUN_S[@]}" "$TOOL" status "${MEET[@]}" >/dev/null || { echo "FAIL: redis-server unreachable"; cat "$DIR/redis.log"; exit 1; }
fi
COMMON=("${MEET[@]}" --model=moe --model_bytes=24M --sources=2 --ranks=2 --timeout_ms=3000)

status() {  # from the sources' side, which reaches the registry in --netns mode too
  "${RUN_S[@]}" "$TOOL" status "${MEET[@]}"
}
announced() {  # rank: its entry is in the rendezvous
  status 2>/dev/null | awk -v r="$1" '$1 == r { found = 1 } END { exit !found }'
}
INCARNATION=0
serve() {  # rank; each incarnation logs to its own file
  rm -f "$DIR/receiver-$1"  # a killed receiver's directory entry is stale (the registry's expires)
  INCARNATION=$((INCARNATION + 1))
  local log="$DIR/serve-$1-$INCARNATION.log"
  "${RUN_R[@]}" "$TOOL" serve "${COMMON[@]}" "${IF_R[@]}" --rank="$1" --verify --serve_seconds=120 \
    --shm=/dev/shm/te-ws-$$-"$1" >"$log" 2>&1 &
  PIDS+=($!); eval "SERVE$1=$!"
  # It prints "waiting for" after announcing itself.
  for _ in $(seq 1 100); do grep -q "waiting for" "$log" && announced "$1" && return 0; sleep 0.1; done
  echo "FAIL: receiver $1 did not announce itself"; cat "$log"; exit 1
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
  status | awk -v r="$1" '$1 == r { print $2 }'
}
wait_published() {  # rank version
  for _ in $(seq 1 200); do [ "$(published "$1")" = "$2" ] && return 0; sleep 0.05; done
  echo "FAIL: receiver $1 is at version '$(published "$1")', expected $2"; cat "$DIR"/serve-*.log "$DIR"/push-*.log; exit 1
}

serve 0; serve 1
push 1 3
wait_published 0 3; wait_published 1 3
status

kill -9 "$SERVE1"; wait "$SERVE1" 2>/dev/null
push 4 1   # receiver 1 is dead (its rendezvous entry is stale)
grep -q "receiver 1 missed version 4" "$DIR/push-0.log" || { echo "FAIL: the push did not report receiver 1"; cat "$DIR"/push-*.log "$DIR"/serve-*.log; exit 1; }
wait_published 0 4

serve 1    # restarted: empty memory, new engine
push 5 1
wait_published 0 5; wait_published 1 5
status

grep -h "MISMATCH\|FAILED" "$DIR"/serve-*.log && { echo "FAIL: a receiver saw wrong bytes or failed a version"; exit 1; }
N=$(cat "$DIR"/serve-*.log | grep -c "complete, verified")
# receiver 0: versions 1-5; receiver 1: 1-3, then 5 after its restart.
[ "$N" -eq 9 ] || { echo "FAIL: expected 9 verified versions, got $N"; cat "$DIR"/serve-*.log; exit 1; }
echo "PASS ($MODE${REGISTRY:+, registry $REGISTRY}): 9 versions verified on 2 receivers, a killed receiver reported and caught up after restart"
