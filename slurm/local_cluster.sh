#!/usr/bin/env bash
# A one-node Slurm cluster on localhost for tests and CI (Debian's slurm-wlm + munge, as root).
#   slurm/local_cluster.sh start DIR   install if needed, write DIR/slurm.conf, start munged,
#                                      slurmctld and slurmd; prints `export SLURM_CONF=...`
#   slurm/local_cluster.sh stop DIR    stop the daemons started by `start`
set -euo pipefail
action=${1:?start or stop}
dir=$(realpath -m "${2:?state directory}")
node=$(hostname)

if [[ $action == stop ]]; then
    # One PID a line (a state directory from before munged.pid held munged's own PID may hold two:
    # the daemon and the parent it forked from); each is stopped and waited for.
    for name in slurmd slurmctld munged; do
        [[ -f "$dir/$name.pid" ]] || continue
        while read -r pid; do
            [[ $pid =~ ^[0-9]+$ ]] || continue
            kill "$pid" 2>/dev/null || continue
            for _ in $(seq 1 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
        done < "$dir/$name.pid"
        rm -f "$dir/$name.pid"
    done
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi
mkdir -p "$dir/spool/ctld" "$dir/spool/d" /run/munge
chown munge:munge /run/munge
if ! pgrep -x munged >/dev/null; then
    # munged forks into the background and writes its own PID file; pgrep right after the start
    # could also catch the parent on its way out (two PIDs, the first one gone).
    rm -f /run/munge/munged.pid
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid
    for _ in $(seq 1 50); do
        [[ -s /run/munge/munged.pid ]] && break
        sleep 0.1
    done
    cp /run/munge/munged.pid "$dir/munged.pid"
fi
# The machine's CPUs: nproc would report OMP_NUM_THREADS instead when it is set (the tests set 1),
# and a 1-CPU node cannot run the 2-task test jobs (they pend forever as PartitionConfig).
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
cat > "$dir/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 1 60); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 1
done
echo "the local Slurm cluster did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
exit 1
