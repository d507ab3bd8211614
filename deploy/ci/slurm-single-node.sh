#!/bin/sh
# Start a throw-away single-node SLURM (controller + compute daemon on this
# machine) for testing `sacla-dask process --cluster jobqueue` end to end.
#
# Debian/Ubuntu, run as root, no systemd needed:
#     sh deploy/ci/slurm-single-node.sh            # installs slurm-wlm if absent
#     SACLA_DASK_SLURM=1 python -m pytest tests/test_cluster.py -k slurm
#     sh deploy/ci/slurm-single-node.sh stop
#
# Not for production: root runs the daemons, no accounting, no cgroups
# (proctrack/linuxproc), one partition "debug" holding this node.
set -eu

CONF=/etc/slurm/slurm.conf
STATE=/var/spool/slurm
LOG=/var/log/slurm

if [ "${1:-start}" = "stop" ]; then
    for d in slurmd slurmctld munged; do
        if [ -f "/run/sacla-dask-$d.pid" ]; then
            kill "$(cat "/run/sacla-dask-$d.pid")" 2>/dev/null || true
            rm -f "/run/sacla-dask-$d.pid"
        fi
    done
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "run as root" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

HOST=$(hostname -s)
# what slurmd sees on this machine: CPUs, sockets, cores, memory
NODE=$(slurmd -C | head -n 1 | sed 's/^NodeName=[^ ]* //; s/ RealMemory=\([0-9]*\)/ RealMemory=\1/')
MEM=$(echo "$NODE" | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
# leave some memory to the OS so that jobs asking for it still fit
NODE=$(echo "$NODE" | sed "s/RealMemory=[0-9]*/RealMemory=$((MEM * 9 / 10))/")

mkdir -p "$STATE/ctld" "$STATE/d" "$LOG" /etc/slurm /run/munge /var/lib/munge /var/log/munge
cat > "$CONF" <<CONF
ClusterName=sacla-dask-ci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/sacla-dask-slurmctld.pid
SlurmdPidFile=/run/sacla-dask-slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=30
KillWait=5
NodeName=$HOST $NODE State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF

if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown -R root:root /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key

if ! munge -n >/dev/null 2>&1; then
    munged --force --pid-file=/run/sacla-dask-munged.pid 2>/dev/null || munged --force
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

# wait until the node accepts jobs
i=0
until sinfo -h -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; do
    i=$((i + 1))
    if [ "$i" -gt 60 ]; then
        echo "SLURM did not come up; see $LOG/slurmctld.log and $LOG/slurmd.log" >&2
        sinfo >&2 || true
        exit 1
    fi
    sleep 0.5
done
sinfo
