#!/usr/bin/env bash
# te-kv as separate processes: a private redis-server (unix socket, no
# persistence) as the registry, two `te-kv prefill` instances and a
# `te-kv decode` that routes requests over them with every page verified.
# Then one prefill instance is SIGKILLed without leaving; a second decode
# run must still get every request, retrying what was routed to the dead
# one until its registry entry expires. With --netns the prefill instances
# run in one network namespace and the decode in another, joined by a veth
# pair (the registry's unix socket is reachable from both); exits 77
# (skipped) where namespaces cannot be made.
set -u
TOOL=${1:?usage: kv_processes.sh path/to/te-kv [--netns]}
MODE=${2:-loopback}
DIR=$(mktemp -d)
PIDS=()
RUN_P=(); RUN_D=(); IF_P=(); IF_D=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  del_veth_pair "${NSA:-}" "${NSB:-}"
  rm -rf "$DIR"
}
. "$(dirname "$0")/../netns/veth_pair.sh"
trap cleanup EXIT
if [ "$MODE" = "--netns" ]; then
  NSA=te-ka-$$; NSB=te-kb-$$; VA=tka$$; VB=tkb$$
  make_veth_pair "$NSA" "$NSB" "$VA" "$VB" 10.79.0 || exit $?
  RUN_P=(ip netns exec "$NSA"); RUN_D=(ip netns exec "$NSB"); IF_P=(--iface="$VA"); IF_D=(--iface="$VB")
fi
command -v redis-server >/dev/null || { echo "FAIL: redis-server not found; scripts/install-deps.sh installs it"; exit 1; }
redis-server --port 0 --unixsocket "$DIR/redis.sock" --save "" --appendonly no --dir "$DIR" >"$DIR/redis.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do [ -S "$DIR/redis.sock" ] && break; sleep 0.05; done
[ -S "$DIR/redis.sock" ] || { echo "FAIL: redis-server did not start"; cat "$DIR/redis.log"; exit 1; }
REG=(--registry="unix:$DIR/redis.sock" --preset=deepseek --tokens=256 --layer_ms=1 --peer_timeout_ms=1000 --request_timeout_ms=2000)

for name in p0 p1; do
  "${RUN_P[@]}" "$TOOL" prefill "${REG[@]}" "${IF_P[@]}" --name=$name --serve_seconds=60 --verify >"$DIR/$name.log" 2>&1 &
  PIDS+=($!); eval "PID_$name=$!"
done
# Both registered?
for _ in $(seq 100); do
  [ "$(grep -c serving "$DIR"/p*.log 2>/dev/null | awk -F: '{s+=$2} END {print s}')" = 2 ] && break; sleep 0.05
done

check() {  # log file, expected requests
  python3 - "$1" "$2" <<'PY' || { echo "FAIL: $1"; cat "$1"; exit 1; }
import json, sys
lines = [l for l in open(sys.argv[1]) if l.startswith("{")]
d = json.loads(lines[-1])
assert d["ready"] == int(sys.argv[2]) and d["verified"] is True and d["wrong_heads"] == 0, d
print(f"  decode: {d['ready']} requests ready, {d['retried']} retried, "
      f"KV ready {d['ready_after_last_layer_ms_p50']:.2f} ms p50 after the last layer, verified")
PY
}
"${RUN_D[@]}" "$TOOL" decode "${REG[@]}" "${IF_D[@]}" --name=d0 --requests=8 --verify --json >"$DIR/d0.log" 2>&1 || { cat "$DIR/d0.log"; exit 1; }
check "$DIR/d0.log" 8

kill -9 "$PID_p0"  # no goodbye: the registry entry lives until its TTL
"${RUN_D[@]}" "$TOOL" decode "${REG[@]}" "${IF_D[@]}" --name=d1 --requests=8 --verify --json >"$DIR/d1.log" 2>&1 || { cat "$DIR/d1.log"; exit 1; }
check "$DIR/d1.log" 8
echo "PASS ($MODE): te-kv prefill/decode processes through the Redis registry, a prefill killed between runs"
