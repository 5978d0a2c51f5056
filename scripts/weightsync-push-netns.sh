#!/usr/bin/env bash
# Times te-weightsync pushes across two network namespaces joined by a veth
# pair (receivers in one, sources in the other), or on loopback with
# "loopback": 2 `serve` receivers (tp x2), 2 `push` sources (fsdp x2), a
# 512 MiB moe model, 4 versions. Prints each source's per-version report.
# Run as root from the repository root after scripts/bootstrap.sh.
set -u
T=${TOOL:-./build/tools/te-weightsync}
MODE=${1:-netns}
DIR=$(mktemp -d); RUN_R=(); RUN_S=(); IF_R=(); IF_S=()
A=te-pa-$$; B=te-pb-$$
cleanup() {
  [ -n "${SERVES:-}" ] && kill $SERVES 2>/dev/null; wait 2>/dev/null
  del_veth_pair "$A" "$B"
  rm -rf "$DIR" /dev/shm/te-push-$$-*
}
. "$(dirname "$0")/../tests/netns/veth_pair.sh"
trap cleanup EXIT
if [ "$MODE" = netns ]; then
  make_veth_pair "$A" "$B" tpa$$ tpb$$ 10.79.0 || { echo "cannot create network namespaces (need root)"; exit 1; }
  RUN_R=(ip netns exec "$A"); RUN_S=(ip netns exec "$B"); IF_R=(--iface=tpa$$); IF_S=(--iface=tpb$$)
fi
C=(--rendezvous="$DIR" --model=moe --model_bytes=512M --sources=2 --ranks=2)
SERVES=
for r in 0 1; do
  "${RUN_R[@]}" "$T" serve "${C[@]}" "${IF_R[@]}" --rank=$r --serve_seconds=120 --shm=/dev/shm/te-push-$$-$r \
    >"$DIR/serve-$r.log" 2>&1 &
  SERVES="$SERVES $!"
done
for _ in $(seq 100); do [ -f "$DIR/receiver-0" ] && [ -f "$DIR/receiver-1" ] && break; sleep 0.1; done
P=
for s in 0 1; do
  "${RUN_S[@]}" timeout 120 "$T" push "${C[@]}" "${IF_S[@]}" --rank=$s --versions=4 >"$DIR/push-$s.log" 2>&1 &
  P="$P $!"
done
wait $P
cat "$DIR"/push-*.log
