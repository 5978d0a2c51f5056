#!/usr/bin/env bash
# Two hosts on one machine: namespaces te-a-$$ and te-b-$$ joined by a veth
# pair (10.77.0.1/24 <-> 10.77.0.2/24). te-bench listens in one and connects
# from the other over libfabric tcp pinned to the veth, verifying the bytes.
# Exits 77 (skipped) where namespaces cannot be made.
set -u
BENCH=${1:?usage: two_hosts.sh path/to/te-bench}
A=te-a-$$; B=te-b-$$
VA=tea$$; VB=teb$$
. "$(dirname "$0")/veth_pair.sh"
cleanup() {
  [ -n "${LPID:-}" ] && kill "$LPID" 2>/dev/null
  del_veth_pair "$A" "$B"
  rm -f "${OUT:-}"
}
trap cleanup EXIT
make_veth_pair "$A" "$B" "$VA" "$VB" 10.77.0 || exit $?

OUT=$(mktemp)
ARGS=(--provider=tcp --sizes=64K,4M --page_sizes=4K --bytes_per_case=33554432 --rtt_iters=200)
ip netns exec "$A" timeout 240 "$BENCH" --listen --iface="$VA" "${ARGS[@]}" >"$OUT" &
LPID=$!
for _ in $(seq 1 100); do grep -q '^TE-BENCH-ADDRESS' "$OUT" && break; sleep 0.1; done
ADDR=$(grep '^TE-BENCH-ADDRESS' "$OUT" | cut -d' ' -f2)
[ -n "$ADDR" ] || { echo "FAIL: the listener in $A printed no address"; exit 1; }
ip netns exec "$B" timeout 240 "$BENCH" --connect="$ADDR" --iface="$VB" "${ARGS[@]}" --json | tee /dev/stderr > "$OUT.client"
RC=${PIPESTATUS[0]}
wait "$LPID"; LRC=$?; LPID=
[ "$RC" -eq 0 ] || { echo "FAIL: initiator exited $RC"; exit 1; }
[ "$LRC" -eq 0 ] || { echo "FAIL: listener exited $LRC"; exit 1; }
grep -q '"verified":false' "$OUT.client" && { echo "FAIL: bytes differ across hosts"; exit 1; }
N=$(grep -c '"verified":true' "$OUT.client")
rm -f "$OUT.client"
[ "$N" -ge 3 ] || { echo "FAIL: expected 3 verified cases, got $N"; exit 1; }
echo "PASS: $N cases verified between namespaces $A and $B"
