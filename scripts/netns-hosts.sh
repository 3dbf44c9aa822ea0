#!/usr/bin/env bash
# Test hosts on one machine: network namespaces joined by a bridge, with their own addresses, latency and
# a bandwidth limit, for tests that must cross a real network stack. Needs root and iproute2.
#
#   scripts/netns-hosts.sh up PREFIX N SUBNET [RATE]   # namespaces PREFIX0..PREFIX(N-1), addresses SUBNET.10+i/24
#   scripts/netns-hosts.sh cut PREFIXi          # take host i's link down (it drops off the network)
#   scripts/netns-hosts.sh restore PREFIXi      # bring it back
#   scripts/netns-hosts.sh down PREFIX N
# Each link gets 1 ms of delay (netem) and a bandwidth limit, RATE in tc's units (default 1gbit; e.g.
# 100mbit); where the kernel lacks netem, tbf limits the bandwidth alone (said on standard error).
set -euo pipefail
action="${1:?usage: netns-hosts.sh up|cut|restore|down ...}"
case "$action" in
  up)
    prefix="$2"; count="$3"; subnet="$4"; rate="${5:-1gbit}"
    bridge="${prefix}br"
    ip link add "$bridge" type bridge
    ip link set "$bridge" up
    for i in $(seq 0 $((count - 1))); do
      ns="$prefix$i"
      ip netns add "$ns"
      ip link add "${prefix}v$i" type veth peer name "${prefix}p$i"
      ip link set "${prefix}v$i" master "$bridge" up
      ip link set "${prefix}p$i" netns "$ns"
      ip -n "$ns" link set "${prefix}p$i" name eth0
      ip -n "$ns" addr add "$subnet.$((10 + i))/24" dev eth0
      ip -n "$ns" link set eth0 up
      ip -n "$ns" link set lo up
      if ! ip netns exec "$ns" tc qdisc add dev eth0 root netem delay 1ms rate "$rate" 2>/dev/null; then
        ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "$rate" burst 256kb latency 50ms
        echo "netns-hosts: no netem in this kernel; $ns has a $rate limit (tbf) and no added delay" >&2
      fi
    done
    ;;
  cut)
    ip -n "$2" link set eth0 down
    ;;
  restore)
    ip -n "$2" link set eth0 up
    ;;
  down)
    prefix="$2"; count="$3"
    for i in $(seq 0 $((count - 1))); do ip netns del "$prefix$i" 2>/dev/null || true; ip link del "${prefix}v$i" 2>/dev/null || true; done
    ip link del "${prefix}br" 2>/dev/null || true
    ;;
  *) echo "usage: netns-hosts.sh up|cut|restore|down ..." >&2; exit 64 ;;
esac
