#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine (Debian's slurm-wlm: slurmctld + slurmd + munge),
# for trying kvc's Slurm scripts without a cluster:
#   bash scripts/slurm/local-cluster.sh start   # prints `export SLURM_CONF=...`; eval it
#   bash scripts/slurm/local-cluster.sh stop
# State lives in ${KVC_SLURM_DIR:-/tmp/kvc-slurm}. Needs root (the daemons run as root) and
# `apt-get install slurm-wlm` (the script installs it when apt-get is there and it is missing).
# The node offers every CPU of the machine; jobs run as the calling user. The controller and the
# node take the machine's short hostname at 127.0.0.1, so nothing depends on that name resolving.
set -euo pipefail
dir=${KVC_SLURM_DIR:-/tmp/kvc-slurm}
conf=$dir/slurm.conf
cmd=${1:-}
stop() {
  pkill -f "slurmctld -f $conf" 2>/dev/null || true
  pkill -f "slurmd -f $conf" 2>/dev/null || true
}
case "$cmd" in
start)
  if ! command -v slurmctld >/dev/null; then
    command -v apt-get >/dev/null || { echo "local-cluster: install slurm-wlm first" >&2; exit 2; }
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm) >&2
  fi
  stop
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  mkdir -p "$dir"/{state,spool,log}
  cat > "$conf" <<CONF
ClusterName=kvc-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
DefMemPerCPU=$((mem / cpus))
NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  if ! pgrep -x munged >/dev/null; then
    [[ -s /etc/munge/munge.key ]] || runuser -u munge -- /usr/sbin/mungekey --create >&2
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged
  fi
  slurmctld -f "$conf"
  slurmd -f "$conf" -N "$host"
  export SLURM_CONF=$conf
  for _ in $(seq 90); do
    sinfo -h -o %t 2>/dev/null | grep -q idle && break
    sleep 1
  done
  if ! sinfo -h -o %t 2>/dev/null | grep -q idle; then
    echo "local-cluster: the node did not come up in 90 s; the daemons' logs ($dir/log):" >&2
    tail -n 25 "$dir"/log/*.log >&2 || true
    exit 1
  fi
  echo "export SLURM_CONF=$conf"
  ;;
stop) stop ;;
*) sed -n 2,9p "$0"; exit 2 ;;
esac
