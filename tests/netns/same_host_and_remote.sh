#!/usr/bin/env bash
# One engine, two kinds of peer: namespaces te-sa-$$ and te-sb-$$ joined by a
# veth pair (10.78.0.1/24 <-> 10.78.0.2/24). In te-sa, an engine with tcp
# domains on the veth and the same-host domain beside them writes one
# ScatterWrite to a peer process in te-sa (the same-host lane) and to a tcp
# peer process in te-sb (across the veth), and checks counts and bytes.
# Exits 77 (skipped) where namespaces cannot be made.
set -u
TESTS=${1:?usage: same_host_and_remote.sh path/to/te_engine_tests}
A=te-sa-$$; B=te-sb-$$
VA=tsa$$; VB=tsb$$
. "$(dirname "$0")/veth_pair.sh"
cleanup() { del_veth_pair "$A" "$B"; }
trap cleanup EXIT
make_veth_pair "$A" "$B" "$VA" "$VB" 10.78.0 || exit $?
ip netns exec "$A" env TE_NETNS_REMOTE="$B" TE_NETNS_IFACE="$VA" TE_NETNS_REMOTE_IFACE="$VB" \
  timeout 120 "$TESTS" --gtest_filter='SameHostLanesNetns.*' 2>&1 | tee /tmp/te-same-host-netns-$$.log
RC=${PIPESTATUS[0]}
if grep -q "SKIPPED" /tmp/te-same-host-netns-$$.log; then rm -f /tmp/te-same-host-netns-$$.log; echo "FAIL: the test skipped inside the namespaces"; exit 1; fi
rm -f /tmp/te-same-host-netns-$$.log
[ "$RC" -eq 0 ] || { echo "FAIL: exit $RC"; exit 1; }
echo "PASS: one ScatterWrite over the same-host lane in $A and tcp across the veth to $B"
