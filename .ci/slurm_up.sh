#!/usr/bin/env bash
# Start a real one-node SLURM (Debian's slurmctld/slurmd + munge) for tests/slurm/. Idempotent.
# Facts behind each line: ../shared/SLURM_LOCAL.md. State lives under /tmp/nemo-ft-slurm.
set -euo pipefail
RUN=/tmp/nemo-ft-slurm
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
# [[ ]] on the captured output, not `sinfo | grep -q` under pipefail (see .ci/slurm2_up.sh).
idle() { [[ "$(sinfo -h -o %T 2>/dev/null)" == *idle* ]]; }
if idle; then echo "slurm already up"; exit 0; fi
mkdir -p /run/munge "$RUN"/{state,spool,log}
chown munge:munge /run/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
munge -n | unmunge >/dev/null
host=$(hostname -s)
node=$(slurmd -C | head -n1)
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=nemoft
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
MailProg=/bin/true
StateSaveLocation=$RUN/state
SlurmdSpoolDir=$RUN/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$RUN/log/slurmctld.log
SlurmdLogFile=$RUN/log/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$RUN/log/jobcomp.txt
ReturnToService=2
MinJobAge=3600
$node
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
  if idle; then echo "slurm up: $(sinfo -h -o '%N %c cpus %T')"; exit 0; fi
  sleep 1
done
echo "slurm did not come up; logs in $RUN/log" >&2
exit 1
