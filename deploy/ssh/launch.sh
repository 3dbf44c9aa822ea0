#!/usr/bin/env bash
# SwiftDDP over SSH, for clusters without a scheduler: starts the coordinator on one host and a worker on
# each worker host, waits for the job, and tears everything down.
#
#   deploy/ssh/launch.sh start --coordinator HOST --workers HOST1,HOST2 --config /shared/job.yaml [options]
#   deploy/ssh/launch.sh stop  --coordinator HOST --workers HOST1,HOST2 --job-dir DIR
#
# Options:
#   --address ADDR    the address workers use to reach the coordinator (default: its host name)
#   --port N          the coordinator's worker port (default 5555; control is N + 1)
#   --shards H1,H2    run coordinator shards 1, 2, ... on these hosts (coordinator_shards = 1 + their number);
#                     shard J listens on port N + 1 + J
#   --shard-addresses A1,A2  the addresses workers use to reach the shards (default: their host names)
#   --keys DIR        a key folder from 'ddpctl keygen' present on every host (encrypted traffic)
#   --job-dir DIR     the job directory on the coordinator host (default /tmp/swiftddp-JOB)
#   --ddpd PATH       the ddpd executable on the hosts (default: ddpd)
#   --no-wait         return after starting
# The job file (and key folder) must exist at the same path on every host (a shared file system, or copy
# them first). Commands reach hosts through $DDP_SSH (default "ssh -o BatchMode=yes"): any command that
# takes a host and a shell command works, e.g. a wrapper that enters a network namespace.
set -euo pipefail

ssh_command=${DDP_SSH:-"ssh -o BatchMode=yes"}
action="${1:-}"; shift || true
coordinator="" workers="" address="" port=5555 keys="" job_dir="" ddpd="ddpd" config="" wait_for_job=1 shards="" shard_addresses=""
while [ $# -gt 0 ]; do
  case "$1" in
    --coordinator) coordinator="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --shards) shards="$2"; shift 2 ;;
    --shard-addresses) shard_addresses="$2"; shift 2 ;;
    --address) address="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --keys) keys="$2"; shift 2 ;;
    --job-dir) job_dir="$2"; job_dir_given=1; shift 2 ;;
    --ddpd) ddpd="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --no-wait) wait_for_job=0; shift ;;
    *) echo "launch.sh: unknown option $1" >&2; exit 64 ;;
  esac
done
if [ -z "$coordinator" ] || [ -z "$workers" ]; then
  echo "usage: launch.sh start|stop --coordinator HOST --workers H1,H2 --config FILE" >&2; exit 64
fi
IFS=, read -r -a worker_hosts <<< "$workers"
shard_hosts=()
shard_ips=()
if [ -n "$shards" ]; then IFS=, read -r -a shard_hosts <<< "$shards"; fi
if [ -n "$shard_addresses" ]; then IFS=, read -r -a shard_ips <<< "$shard_addresses"; fi
address="${address:-$coordinator}"
job_id="ssh-$(date +%Y%m%d-%H%M%S)"
job_dir="${job_dir:-/tmp/swiftddp-$job_id}"
run() { local host="$1"; shift; $ssh_command "$host" "$*"; }

stop_all() {
  local rank=0
  for host in "${worker_hosts[@]}"; do
    run "$host" "kill \$(cat '$job_dir/worker-$rank.pid' 2>/dev/null) 2>/dev/null || true"
    rank=$((rank + 1))
  done
  local shard=1
  for host in "${shard_hosts[@]}"; do
    run "$host" "kill \$(cat '$job_dir/shard-$shard.pid' 2>/dev/null) 2>/dev/null || true"
    shard=$((shard + 1))
  done
  run "$coordinator" "kill \$(cat '$job_dir/coordinator.pid' 2>/dev/null) 2>/dev/null || true"
}

case "$action" in
  start)
    [ -n "$config" ] || { echo "launch.sh start: --config is required" >&2; exit 64; }
    settings="--set workers=${#worker_hosts[@]} --set job_id=$job_id --set coordinator_shards=$((${#shard_hosts[@]} + 1))"
    security="--insecure"
    if [ -n "$keys" ]; then settings="$settings --set keys_dir=$keys"; security=""; fi
    run "$coordinator" "mkdir -p '$job_dir'; nohup '$ddpd' coordinator --config '$config' $settings $security \
      --bind tcp://0.0.0.0:$port --control tcp://0.0.0.0:$((port + 1)) --job-dir '$job_dir' \
      > '$job_dir/coordinator.log' 2>&1 < /dev/null & echo \$! > '$job_dir/coordinator.pid'"
    shard=1
    for host in "${shard_hosts[@]}"; do
      shard_port=$((port + 1 + shard))
      run "$host" "mkdir -p '$job_dir'; nohup '$ddpd' coordinator --config '$config' $settings $security --shard $shard \
        --leader tcp://$address:$port --bind tcp://0.0.0.0:$shard_port --advertise tcp://${shard_ips[$((shard - 1))]:-$host}:$shard_port \
        > '$job_dir/shard-$shard.log' 2>&1 < /dev/null & echo \$! > '$job_dir/shard-$shard.pid'"
      shard=$((shard + 1))
    done
    rank=0
    for host in "${worker_hosts[@]}"; do
      run "$host" "mkdir -p '$job_dir'; nohup '$ddpd' worker --connect tcp://$address:$port --config '$config' $settings \
        --rank $rank > '$job_dir/worker-$rank.log' 2>&1 < /dev/null & echo \$! > '$job_dir/worker-$rank.pid'"
      rank=$((rank + 1))
    done
    echo "started job $job_id: coordinator on $coordinator ($address:$port, control $((port + 1))), ${#shard_hosts[@]} more shards, ${#worker_hosts[@]} workers"
    echo "status: ddpctl status --endpoint tcp://$address:$((port + 1))${keys:+ --keys $keys}"
    [ "$wait_for_job" -eq 1 ] || exit 0
    trap 'echo "interrupted: stopping the job" >&2; stop_all; exit 130' INT TERM
    while run "$coordinator" "kill -0 \$(cat '$job_dir/coordinator.pid') 2>/dev/null"; do sleep 1; done
    run "$coordinator" "cat '$job_dir/summary.json' 2>/dev/null || { echo 'no summary; coordinator log:'; tail -5 '$job_dir/coordinator.log'; }"
    stop_all
    run "$coordinator" "grep -q '\"state\" : \"completed\"' '$job_dir/summary.json'"
    ;;
  stop)
    [ -n "${job_dir_given:-}" ] || { echo "launch.sh stop: --job-dir is required (the folder given to start)" >&2; exit 64; }
    stop_all
    echo "stopped SwiftDDP processes on $coordinator, ${#shard_hosts[@]} shard hosts and ${#worker_hosts[@]} worker hosts"
    ;;
  *)
    echo "usage: launch.sh start|stop --coordinator HOST --workers H1,H2 [--config FILE] ..." >&2; exit 64 ;;
esac
