# Sourced by the multi-host scripts: two network namespaces joined by a veth
# pair, as two hosts on one machine.
#
#   . tests/netns/veth_pair.sh
#   make_veth_pair NS_A NS_B IF_A IF_B SUBNET   # e.g. 10.77.0 -> .1 and .2
#   ... ip netns exec "$NS_A" ... --iface="$IF_A" ...
#   del_veth_pair NS_A NS_B                     # from the script's cleanup
#
# make_veth_pair returns 77 (the tests' "skipped") where namespaces or veth
# pairs cannot be made (not root, no iproute2), after printing why.
make_veth_pair() {
  local a=$1 b=$2 va=$3 vb=$4 net=$5
  if ! ip netns add "$a" 2>/dev/null; then echo "SKIP: cannot create network namespaces here (need root and iproute2)"; return 77; fi
  ip netns add "$b" || return 77
  ip link add "$va" type veth peer name "$vb" || { echo "SKIP: cannot create a veth pair"; return 77; }
  ip link set "$va" netns "$a"; ip link set "$vb" netns "$b"
  ip -n "$a" addr add "$net.1/24" dev "$va"; ip -n "$b" addr add "$net.2/24" dev "$vb"
  local ns
  for ns in "$a" "$b"; do ip -n "$ns" link set lo up; done
  ip -n "$a" link set "$va" up; ip -n "$b" link set "$vb" up
}

del_veth_pair() {
  local ns
  for ns in "$@"; do [ -n "$ns" ] && ip netns del "$ns" 2>/dev/null; done
  return 0
}
