#!/usr/bin/env bash
# Start a real two-node SLURM for tests/slurm/test_two_nodes.py: one slurmctld in this namespace and
# two slurmd "nodes", each in a network namespace of its own, with its own IP and hostname. Idempotent;
# .ci/slurm2_down.sh removes all of it. Facts behind each line: ../shared/SLURM_LOCAL.md.
#
# It lives beside the one-node cluster of .ci/slurm_up.sh and never touches it: its own slurm.conf
# (use it with SLURM_CONF=/tmp/nemo-ft-slurm2/slurm.conf), cluster name, ports and state folder.
# munged is shared (same key, same socket): started here only if nothing started it yet, never stopped.
# Everything else it creates is tagged: bridge nemoft-br0, namespaces nemoft-n1/2, veths nemoft-v1/2,
# /etc/hosts lines ending in "# nemo-ft-slurm2", all under 10.77.0.0/24 with no route out of it.
set -euo pipefail
RUN=/tmp/nemo-ft-slurm2
CONF=$RUN/slurm.conf
TAG="# nemo-ft-slurm2"
NET=10.77.0
NODES=(nemoft-n1 nemoft-n2)
export SLURM_CONF=$CONF

# Up = both nodes answer: idle, or busy with (or planned for) a job.
up() { sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|planned|mixed|allocated|completing)' | grep -qx "${#NODES[@]}"; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
command -v ip >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends iproute2 >/dev/null; }
for tool in ip nsenter unshare; do
  command -v "$tool" >/dev/null || { echo "slurm2: $tool is missing (iproute2, util-linux)" >&2; exit 1; }
done
if [ -f "$CONF" ] && up; then echo "slurm2 already up: $(sinfo -h -o '%N %T')"; exit 0; fi

# The private range must be ours alone: refuse to start over a network the machine already uses.
# (No `cmd | grep -q` under pipefail in this file: grep exits at its first match, `ip` then dies of
# SIGPIPE on its next write and the pipeline reads as "not found": 61 of 300 checks of an address
# that was there, measured; then `addr add` failed "Address already assigned" and so did CI.)
if ! ip link show nemoft-br0 >/dev/null 2>&1 && [[ "$(ip -4 addr)" == *"inet $NET."* ]]; then
  echo "slurm2: $NET.0/24 is already in use on this machine; not creating the bridge" >&2; exit 1
fi

mkdir -p /run/munge "$RUN"/{state,spool,log}
chown munge:munge /run/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
munge -n | unmunge >/dev/null

# Network: a bridge in this namespace, one namespace per node joined to it by a veth pair.
ip link show nemoft-br0 >/dev/null 2>&1 || ip link add nemoft-br0 type bridge
# `addr replace`, not a check then `addr add`: the same result whether a run left the address or not.
ip addr replace "$NET.1/24" dev nemoft-br0
ip link set nemoft-br0 up
for i in "${!NODES[@]}"; do
  n=$((i + 1)) node=${NODES[$i]}
  [ -e "/run/netns/$node" ] || ip netns add "$node"
  # A pair is whole or made again: a host end left without its node end (a namespace deleted by
  # hand) would otherwise be joined to the bridge with nothing behind it.
  if ! ip -n "$node" link show veth0 >/dev/null 2>&1; then
    ip link delete "nemoft-v$n" 2>/dev/null || true
    ip link add "nemoft-v$n" type veth peer name veth0 netns "$node"
  fi
  ip link set "nemoft-v$n" master nemoft-br0 up
  ip -n "$node" link set lo up
  ip -n "$node" addr replace "$NET.1$n/24" dev veth0
  ip -n "$node" link set veth0 up
  grep -q "^$NET.1$n $node $TAG\$" /etc/hosts || echo "$NET.1$n $node $TAG" >> /etc/hosts
done

host=$(hostname -s)
cat > "$CONF" <<CONF
ClusterName=nemoft2
SlurmctldHost=$host($NET.1)
SlurmctldPort=6917
SlurmdPort=6918
SlurmUser=root
AuthType=auth/munge
MailProg=/bin/true
StateSaveLocation=$RUN/state
SlurmdSpoolDir=$RUN/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.%n.pid
SlurmctldLogFile=$RUN/log/slurmctld.log
SlurmdLogFile=$RUN/log/slurmd.%n.log
SelectType=select/cons_tres
# Heterogeneous jobs are started by the backfill scheduler only: every 2 s instead of 30.
SchedulerParameters=bf_interval=2
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$RUN/log/jobcomp.txt
ReturnToService=2
MinJobAge=3600
NodeName=nemoft-n1 NodeAddr=$NET.11 NodeHostname=nemoft-n1 CPUs=2 RealMemory=1000
NodeName=nemoft-n2 NodeAddr=$NET.12 NodeHostname=nemoft-n2 CPUs=2 RealMemory=1000
PartitionName=debug Nodes=nemoft-n[1-2] Default=YES MaxTime=INFINITE State=UP
CONF

alive "$RUN/slurmctld.pid" || slurmctld
for node in "${NODES[@]}"; do
  mkdir -p "$RUN/spool/$node"
  # nsenter, not `ip netns exec`: that remounts /sys and slurmd then finds no cgroup filesystem.
  # unshare --uts: the node's own hostname, seen by slurmd and every task it starts.
  alive "$RUN/slurmd.$node.pid" || \
    nsenter --net="/run/netns/$node" unshare --uts sh -c "hostname $node && exec slurmd -N $node"
done
for _ in $(seq 60); do
  if up; then echo "slurm2 up: $(sinfo -h -o '%N %c cpus %T') (SLURM_CONF=$CONF)"; exit 0; fi
  sleep 0.5
done
echo "slurm2 did not come up; logs in $RUN/log" >&2
sinfo -h -o '%N %T %E' >&2 || true
exit 1
