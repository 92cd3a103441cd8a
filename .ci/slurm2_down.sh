#!/usr/bin/env bash
# Remove everything .ci/slurm2_up.sh created, by pid and by tag; idempotent. The one-node cluster of
# .ci/slurm_up.sh and the shared munged are left running.
set -uo pipefail
RUN=/tmp/nemo-ft-slurm2
TAG="# nemo-ft-slurm2"
NODES=(nemoft-n1 nemoft-n2)

stop() {  # stop <pid file>: SIGTERM, wait up to 10 s (an old slurmctld takes over a second), then SIGKILL
  local pid
  [ -f "$1" ] || return 0
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

for node in "${NODES[@]}"; do stop "$RUN/slurmd.$node.pid"; done
stop "$RUN/slurmctld.pid"
for node in "${NODES[@]}"; do
  if [ -e "/run/netns/$node" ]; then
    # Whatever still runs in a node's namespace (a step's slurmstepd, a task) was started by that node.
    for pid in $(ip netns pids "$node"); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns delete "$node"
  fi
done
for n in 1 2; do ip link show "nemoft-v$n" >/dev/null 2>&1 && ip link delete "nemoft-v$n"; done
ip link show nemoft-br0 >/dev/null 2>&1 && ip link delete nemoft-br0
if grep -q "$TAG\$" /etc/hosts; then
  # /etc/hosts may be a bind mount: rewrite it in place rather than replace it.
  kept=$(grep -v "$TAG\$" /etc/hosts)
  printf '%s\n' "$kept" > /etc/hosts
fi
rm -rf "$RUN"
echo "slurm2 down"
