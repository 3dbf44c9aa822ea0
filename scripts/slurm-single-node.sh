#!/usr/bin/env bash
# A real single-node Slurm cluster in a folder, for testing deploy/slurm (needs root, slurm-wlm and munge).
#   scripts/slurm-single-node.sh up DIR [CPUS]    # writes DIR/slurm.conf, starts munged, slurmctld, slurmd
#   scripts/slurm-single-node.sh down DIR         # stops them (munged only when "up" started it)
# Then: SLURM_CONF=DIR/slurm.conf sbatch ...
set -euo pipefail
action="${1:?usage: slurm-single-node.sh up|down DIR [CPUS]}"
dir="${2:?usage: slurm-single-node.sh up|down DIR [CPUS]}"
case "$action" in
  up)
    cpus="${3:-4}"
    mkdir -p "$dir"/{state,spool,log} /run/munge /var/log/munge /var/lib/munge /etc/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge 2>/dev/null || true
    if [ ! -s /etc/munge/munge.key ]; then
      dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
      chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    fi
    if ! munge -n </dev/null >/dev/null 2>&1; then  # no working munged yet
      su -s /bin/sh munge -c "munged --pid-file=/run/munge/munged.pid"
      touch "$dir/munged.ours"  # stopped again by "down"
    fi
    host="$(hostname -s)"
    cat > "$dir/slurm.conf" <<CONF
ClusterName=swiftddp-test
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=$((16000 + RANDOM % 4000))
SlurmdPort=$((20000 + RANDOM % 4000))
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -f "$dir/slurm.conf"
    slurmd -f "$dir/slurm.conf"
    for _ in $(seq 1 100); do
      if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed)'; then exit 0; fi
      sleep 0.2
    done
    echo "slurm did not come up; see $dir/log" >&2
    exit 1
    ;;
  down)
    # SIGTERM, then SIGKILL after 5 s; the Slurm daemons first, munged (when ours) last, as they need it to stop.
    stop() {
      local pid
      pid="$(cat "$1" 2>/dev/null)" || return 0
      kill "$pid" 2>/dev/null || return 0
      for _ in $(seq 1 50); do
        if ! kill -0 "$pid" 2>/dev/null || grep -q '^[0-9]* ([^)]*) Z' "/proc/$pid/stat" 2>/dev/null; then return 0; fi
        sleep 0.1
      done
      kill -9 "$pid" 2>/dev/null || true
    }
    stop "$dir/slurmd.pid"
    stop "$dir/slurmctld.pid"
    if [ -f "$dir/munged.ours" ]; then stop /run/munge/munged.pid; rm -f "$dir/munged.ours"; fi
    ;;
  *) echo "usage: slurm-single-node.sh up|down DIR [CPUS]" >&2; exit 64 ;;
esac
