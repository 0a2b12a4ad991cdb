#!/usr/bin/env bash
# A throw-away single-node Slurm cluster on this machine, for trying deploy/slurm/infdit-array.sbatch
# and for the test crates/infdit-cli/tests/slurm.rs. Everything (munge key and socket, slurm.conf,
# state, spool, logs, pid files) lives in DIR; nothing in /etc is touched and no system service is
# used. Needs root (slurmd runs jobs as their users), Debian's slurm-wlm and munge.
#
#   deploy/slurm/local-cluster.sh start DIR   # prints `export SLURM_CONF=DIR/slurm.conf`
#   SLURM_CONF=DIR/slurm.conf sbatch --array=0-3 deploy/slurm/infdit-array.sbatch IN OUT
#   deploy/slurm/local-cluster.sh stop DIR
set -euo pipefail

cmd=${1:-}
dir=${2:-}
if [ -z "$cmd" ] || [ -z "$dir" ]; then
    echo "usage: $0 start|stop DIR" >&2
    exit 2
fi

stop() {
    # Only the daemons this script started, by their pid files.
    for d in slurmd slurmctld munged; do
        if [ -f "$dir/$d.pid" ]; then
            pid=$(cat "$dir/$d.pid")
            if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
                kill "$pid" 2>/dev/null || true
                for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
                kill -9 "$pid" 2>/dev/null || true
            fi
            rm -f "$dir/$d.pid"
        fi
    done
}

if [ "$cmd" = stop ]; then
    stop
    exit 0
fi
if [ "$cmd" != start ]; then
    echo "usage: $0 start|stop DIR" >&2
    exit 2
fi
for tool in munged slurmctld slurmd sinfo; do
    if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
        echo "$tool is missing: apt-get install slurm-wlm munge" >&2
        exit 3
    fi
done
export PATH="$PATH:/usr/sbin"
mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
dir=$(cd "$dir" && pwd)
chmod 755 "$dir"
chmod 700 "$dir/munge"

# munge: a fresh key, a private socket.
dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge/munge.key"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.sock" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/munged.seed"

# Ports away from the defaults, so that a cluster already on this machine is not disturbed.
port=$((20000 + ($$ % 20000)))
cpus=$(nproc)
cat >"$dir/slurm.conf" <<CONF
ClusterName=infditlocal
SlurmctldHost=localhost
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.sock
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
ReturnToService=2
KillWait=20
MinJobAge=300
JobRequeue=1
NodeName=localhost NodeHostname=localhost CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$dir/slurm.conf"

slurmctld -c -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N localhost

# Wait (at most 60 s) for the node to be idle.
for i in $(seq 120); do
    state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
    if [ "$state" = idle ]; then
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "the node did not become idle in 60 s (state: ${state:-none}); logs in $dir" >&2
tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
stop
exit 1
