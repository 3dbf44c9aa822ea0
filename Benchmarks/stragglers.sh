#!/usr/bin/env bash
# Stragglers and slow links, measured across hosts: time to a target test accuracy, bytes moved and steps
# for synchronous SGD (f32 and bf16 on the wire, one coordinator or a coordinator shard per host), backup workers (alone and with staleness 2), balanced shards,
# DiLoCo with H = 8 and 32, and PyTorch DDP on gloo, with one worker slowed to half speed, over links limited
# to 100 Mbit/s and 1 Gbit/s (and any other --rates, e.g. 10gbit, where compute rather than the link bounds a
# step).
#
#   sudo Benchmarks/stragglers.sh [--rates "100mbit 1gbit"] [--epochs 8] [--target 0.95]
#                                 [--layout colocated|dedicated] [--modes "sync backup torch ..."] [--out DIR]
#
# The hosts are network namespaces (scripts/netns-hosts.sh: a bridge, 1 ms delay, each host's egress limited
# to the rate): workers on hosts 1 and 2, as PyTorch's two ranks (rank 0's host being their rendezvous); the
# coordinator beside worker 0 on host 1 (--layout colocated, the default: the two hosts PyTorch has) or on a
# host of its own, host 0 (--layout dedicated: a star through host 0's link). The "sharded" rows run
# coordinator_shards 2: the leader there and a follower on host 2 (colocated; beside the leader on host 0
# when dedicated), each owning half the model's elements, as BytePS places a server on every worker's host.
# --modes picks rows by their labels (all-fast sync sync-bf16 sync-sharded backup stale balance
# balance-sharded diloco8 diloco32 torch; default all). The job: the
# bundled digits, MLP 64-512-512-10, SGD lr 0.1 momentum 0.9, global batch 64, at most --epochs epochs (each
# run stops when it ends; PyTorch stops at the target), no checkpoint during the run (checkpoint_every beyond
# its steps, as the PyTorch peer writes none; the job's model and last checkpoint are written when it ends).
# Both clocks start once the workers are ready: SwiftDDP's once they hold their Welcome's values, PyTorch's
# after a barrier behind DDP's constructor. The slowed worker (rank 1 on host 2) is stopped 10 ms of every 20
# (SIGSTOP/SIGCONT) from the start; the "all fast" row is the synchronous job without it. Bytes are the
# interface counters (received + sent) over the run, scaled to the epochs that reached the target, of
# the coordinator's host for SwiftDDP and of PyTorch's rank 0 (a ring of two) for gloo.
# Needs root, iproute2, a release build (swift build -c release) and, for the PyTorch row, the peer
# environment (scripts/setup-peer.sh; PEER_PYTHON, default ~/peer/bin/python). Prints a Markdown table.
# DDP_BIN names another directory holding ddpd and ddpctl (a build to compare against; default the release build).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
rates="100mbit 1gbit"; epochs=8; target=0.95; out=""; layout=colocated
all_modes="all-fast sync sync-bf16 sync-sharded backup stale balance balance-sharded diloco8 diloco32 torch"
modes="$all_modes"
while [ $# -gt 0 ]; do
  case "$1" in
    --rates) rates="$2"; shift 2 ;;
    --epochs) epochs="$2"; shift 2 ;;
    --target) target="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --layout) layout="${2:?--layout needs colocated or dedicated}"; shift 2 ;;
    --modes) modes="${2:?--modes needs a list of labels}"; shift 2 ;;
    *) echo "usage: stragglers.sh [--rates \"100mbit 1gbit\"] [--epochs N] [--target ACC] [--layout colocated|dedicated] [--modes \"sync torch ...\"] [--out DIR]" >&2; exit 64 ;;
  esac
done
for mode in $modes; do
  case " $all_modes " in
    *" $mode "*) ;;
    *) echo "stragglers.sh: unknown mode '$mode' ($all_modes)" >&2; exit 64 ;;
  esac
done
case "$layout" in
  colocated) coordinator_host=1 ;;
  dedicated) coordinator_host=0 ;;
  *) echo "stragglers.sh: --layout is colocated or dedicated, not '$layout'" >&2; exit 64 ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "stragglers.sh needs root (network namespaces)" >&2; exit 1; }
bin="${DDP_BIN:-$root/.build/release}"
[ -x "$bin/ddpd" ] || { echo "no ddpd in $bin: run swift build -c release first" >&2; exit 1; }
peer="${PEER_PYTHON:-$HOME/peer/bin/python}"
out="${out:-$(mktemp -d /tmp/stragglers.XXXXXX)}"
mkdir -p "$out"
prefix="sg"; subnet="10.231.7"
netns="$root/scripts/netns-hosts.sh"
slow_pid=""
cleanup() {
  if [ -n "$slow_pid" ]; then kill "$slow_pid" 2>/dev/null || true; fi
  pkill -f "ddpd (coordinator|worker) .*--set job_id=stragglers-" 2>/dev/null || true
  "$netns" down "$prefix" 3 2>/dev/null || true
}
trap cleanup EXIT

# Interface bytes (received + sent) of host $1.
bytes() { ip netns exec "$1" cat /proc/net/dev | awk '/eth0:/ { printf "%.0f\n", $2 + $10 }'; }

# Stops process $1 for 10 ms of every 20 until it exits.
slow_down() {
  python3 - "$1" <<'EOF' &
import os, signal, sys, time
pid = int(sys.argv[1])
try:
    while True:
        os.kill(pid, signal.SIGSTOP); time.sleep(0.01)
        os.kill(pid, signal.SIGCONT); time.sleep(0.01)
except ProcessLookupError:
    pass
finally:
    try: os.kill(pid, signal.SIGCONT)
    except ProcessLookupError: pass
EOF
  slow_pid=$!
}

# From a history.jsonl-like file (one JSON object per epoch with elapsed_seconds, test_accuracy, step):
# "seconds steps epochs" at the first epoch reaching the target, or "- - -".
to_target() {
  python3 - "$1" "$target" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip() and '"epoch"' in l]
hit = next((r for r in rows if r["test_accuracy"] >= float(sys.argv[2])), None)
print(f'{hit["elapsed_seconds"]:.1f} {hit["step"]} {hit["epoch"]}' if hit else f'- - {len(rows)}')
EOF
}

# Runs SwiftDDP's job with extra keys "$@" as run "$label" (slowed unless $fast), prints a table row.
swift_run() {
  local label="$1" mode="$2" fast="$3"; shift 3
  case " $modes " in *" $label "*) ;; *) return 0 ;; esac
  local dir="$out/$rate-$label" id="stragglers-$rate-$label"
  rm -rf "$dir"; mkdir -p "$dir"
  local keys=(--set job_id="$id" --set workers=2 --set dataset=digits --set 'hidden=[512,512]' --set batch_size=64
              --set epochs="$epochs" --set blas_threads=1 --set shared_memory=false --set checkpoint_every=100000)
  for k in "$@"; do keys+=(--set "$k"); done
  local host="$prefix$coordinator_host"
  local before; before=$(bytes "$host")
  ip netns exec "$host" "$bin/ddpd" coordinator "${keys[@]}" --bind "tcp://$subnet.$((10 + coordinator_host)):0" --insecure --job-dir "$dir/job" \
    > "$dir/coordinator.out" 2> "$dir/coordinator.err" &
  local coordinator=$!
  local endpoint=""
  for _ in $(seq 1 200); do
    endpoint=$(sed -n 's/^workers=//p' "$dir/coordinator.out" 2>/dev/null || true)
    [ -n "$endpoint" ] && break
    kill -0 "$coordinator" 2>/dev/null || break
    sleep 0.05
  done
  [ -n "$endpoint" ] || { echo "coordinator of $label did not start: $(tail -3 "$dir/coordinator.err")" >&2; return 1; }
  case " $* " in
    *" coordinator_shards=2 "*)
      local follower_host=0
      [ "$coordinator_host" = 1 ] && follower_host=2
      ip netns exec "$prefix$follower_host" "$bin/ddpd" coordinator "${keys[@]}" --shard 1 --leader "$endpoint" \
        --bind "tcp://$subnet.$((10 + follower_host)):0" --insecure > "$dir/follower.out" 2> "$dir/follower.err" &
      ;;
  esac
  for i in 1 2; do
    ip netns exec "$prefix$i" "$bin/ddpd" worker --connect "$endpoint" --rank $((i - 1)) \
      > "$dir/worker-$i.out" 2> "$dir/worker-$i.err" &
    [ "$i" = 2 ] && [ "$fast" = "no" ] && slow_down $!
  done
  wait "$coordinator" || true
  wait 2>/dev/null || true
  slow_pid=""
  local moved=$(( $(bytes "$host") - before ))
  read -r seconds steps hit_epochs < <(to_target "$dir/job/history.jsonl")
  local ran; ran=$(wc -l < "$dir/job/history.jsonl")
  local wall; wall=$(python3 -c "import json; print(round(json.load(open('$dir/job/summary.json'))['wall_seconds'], 1))")
  local data_steps; data_steps=$(python3 -c "
import json
rows = [json.loads(l) for l in open('$dir/job/steps.jsonl')]
trained = sum(sum(v for k, v in r['samples'].items() if int(k) not in r.get('left_out', []))
              + sum(late['samples'] for late in r.get('late', [])) for r in rows)
print(f'{1000 * sum(r[\"seconds\"] for r in rows) / max(1, trained) * 64:.1f}')")
  local scaled="-"
  [ "$seconds" != "-" ] && scaled=$(python3 -c "print(f'{$moved * $hit_epochs / max($ran, 1) / 1e6:.1f}')")
  echo "| $rate | $mode | $seconds | $steps | $scaled | $data_steps | $wall |"
}

# PyTorch DDP on gloo, rank 0 on host 1 and rank 1 (slowed) on host 2.
torch_run() {
  case " $modes " in *" torch "*) ;; *) return 0 ;; esac
  local dir="$out/$rate-torch"
  rm -rf "$dir"; mkdir -p "$dir"
  [ -x "$peer" ] || { echo "| $rate | PyTorch DDP gloo | (no peer environment: scripts/setup-peer.sh) | | | | |"; return 0; }
  local before; before=$(bytes "${prefix}1")
  local started; started=$(date +%s.%N)
  ip netns exec "${prefix}1" "$peer" "$root/Benchmarks/peers/torch_ddp_hosts.py" --rank 0 --world 2 --master "$subnet.11" \
    --epochs "$epochs" --target "$target" > "$dir/rank0.out" 2> "$dir/rank0.err" &
  local rank0=$!
  ip netns exec "${prefix}2" "$peer" "$root/Benchmarks/peers/torch_ddp_hosts.py" --rank 1 --world 2 --master "$subnet.11" \
    --epochs "$epochs" --target "$target" > "$dir/rank1.out" 2> "$dir/rank1.err" &
  slow_down $!
  wait "$rank0" || true
  wait 2>/dev/null || true
  slow_pid=""
  local moved=$(( $(bytes "${prefix}1") - before ))
  local wall; wall=$(python3 -c "import time; print(round(time.time() - $started, 1))")
  read -r seconds steps hit_epochs < <(to_target "$dir/rank0.out")
  local ran; ran=$(grep -c '"epoch"' "$dir/rank0.out" || true)
  local per_step; per_step=$(python3 -c "
import json
rows = [json.loads(l) for l in open('$dir/rank0.out') if '\"epoch\"' in l]
print(f'{1000 * rows[-1][\"elapsed_seconds\"] / rows[-1][\"step\"]:.1f}' if rows else '-')")
  local scaled="-"
  [ "$seconds" != "-" ] && scaled=$(python3 -c "print(f'{$moved * $hit_epochs / max($ran, 1) / 1e6:.1f}')")
  echo "| $rate | PyTorch DDP gloo | $seconds | $steps | $scaled | $per_step | $wall |"
}

echo "Target test accuracy $target, at most $epochs epochs; worker 1 stopped half the time except in the all-fast row; runs in $out"
echo
echo "| link | mode | seconds to target | steps to target | MB moved to target | ms per 64 samples | wall s |"
echo "|---|---|---|---|---|---|---|"
for rate in $rates; do
  "$netns" down "$prefix" 3 2>/dev/null || true
  "$netns" up "$prefix" 3 "$subnet" "$rate" 2> "$out/netns-$rate.err"
  swift_run all-fast "synchronous, all fast" yes
  swift_run sync "synchronous" no
  swift_run sync-bf16 "synchronous, bf16 wire" no wire_dtype=bf16
  swift_run sync-sharded "synchronous, a coordinator shard per host" no coordinator_shards=2
  swift_run backup "backup_workers 1" no backup_workers=1
  swift_run stale "backup_workers 1, staleness 2" no backup_workers=1 staleness=2
  swift_run balance "balance speed" no balance=speed
  swift_run balance-sharded "balance speed, a coordinator shard per host" no balance=speed coordinator_shards=2
  swift_run diloco8 "DiLoCo H=8" no sync_every=8 outer_momentum=0.5
  swift_run diloco32 "DiLoCo H=32" no sync_every=32 outer_momentum=0.5
  torch_run
  "$netns" down "$prefix" 3
done
