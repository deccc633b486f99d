#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for trying the scripts in slurm/ without a
# real cluster (the project's SLURM test uses it). Needs root and Debian's slurm-wlm + munge
# (`apt-get install -y slurm-wlm munge`).
#
#   eval "$(slurm/local_cluster.sh start DIR)"   # starts munged, slurmctld, slurmd; prints `export SLURM_CONF=...`
#   sbatch --ntasks-per-node=2 slurm/train.sbatch ...
#   slurm/local_cluster.sh stop DIR
#
# Everything (config, state, logs, pid files) lives in DIR; nothing under /etc/slurm is touched.
set -euo pipefail
cmd=${1:?usage: local_cluster.sh start|stop DIR [CPUS]}
dir=$(realpath -m "${2:?usage: local_cluster.sh start|stop DIR [CPUS]}")
cpus=${3:-$(nproc)}
host=$(hostname -s)
conf=$dir/slurm.conf

stop() {
  for name in slurmd slurmctld; do
    if [[ -f $dir/$name.pid ]]; then kill "$(cat "$dir/$name.pid")" 2>/dev/null || true; fi
  done
  sleep 1
}

case $cmd in
start)
  mkdir -p "$dir/state" "$dir/spool" /run/munge
  if ! munge -n >/dev/null 2>&1; then
    [[ -f /etc/munge/munge.key ]] || mungekey --create
    chown munge:munge /run/munge /etc/munge/munge.key
    runuser -u munge -- munged
  fi
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  cat > "$conf" <<CONF
ClusterName=kontext-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
KillWait=10
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  stop
  slurmctld -f "$conf"
  slurmd -f "$conf"
  for _ in $(seq 60); do
    if SLURM_CONF=$conf sinfo -h -o %t 2>/dev/null | grep -q idle; then
      echo "export SLURM_CONF=$conf"
      exit 0
    fi
    sleep 1
  done
  echo "the local SLURM cluster did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
  exit 1
  ;;
stop)
  stop
  ;;
*)
  echo "usage: local_cluster.sh start|stop DIR [CPUS]" >&2
  exit 2
  ;;
esac
