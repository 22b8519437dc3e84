#!/usr/bin/env bash
# A real single-node SLURM on this machine, for the tests of `fuseseg run --executor slurm`.
#
#   scripts/slurm-local.sh          # install (if absent), configure, start; waits until it answers
#   scripts/slurm-local.sh stop     # stop the daemons this script started
#
# Debian's slurm-wlm (22.05) with munge, run as root: one node with this machine's CPUs and
# memory (`slurmd -C`), one partition `debug`. Exit status 0 once `sinfo` shows the node idle
# and `srun hostname` answers; otherwise non-zero with the reason on stderr (the SLURM tests
# print that reason when they skip). Nothing here is meant for a real cluster: it writes
# /etc/slurm/slurm.conf and refuses to replace one that it did not write itself.
set -euo pipefail

MARK="# written by fuseseg scripts/slurm-local.sh"
CONF=/etc/slurm/slurm.conf
CGROUP=/etc/slurm/cgroup.conf
LOGDIR=/var/log/slurm

die() { echo "slurm-local: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts slurmctld/slurmd as SlurmUser=root)"

if [ "${1:-}" = "stop" ]; then
  for pidfile in /run/slurmd.pid /run/slurmctld.pid; do   # by pid, never by name
    [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  exit 0
fi

# ---------------------------------------------------------------- packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v srun >/dev/null; then
  echo "slurm-local: installing slurm-wlm and munge (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
fi

# ---------------------------------------------------------------- already up?
if timeout 15 srun -N1 -t 1 hostname >/dev/null 2>&1; then
  echo "slurm-local: already running ($(sinfo -h -o '%N %T' | head -1))"
  exit 0
fi

# ---------------------------------------------------------------- munge
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [ ! -s /etc/munge/munge.key ]; then
  if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
fi
chmod 400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
  munged --force || die "munged --force failed to start"
fi
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.2; done
munge -n >/dev/null 2>&1 || die "munged started but \`munge -n\` does not answer"

# ---------------------------------------------------------------- slurm.conf, cgroup.conf
host=$(hostname -s)
node=$(slurmd -C | head -1)   # NodeName=HOST CPUs=.. Boards=.. ... RealMemory=..
[ -n "$node" ] || die "\`slurmd -C\` printed nothing: cannot describe this node"
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
  die "$CONF exists and was not written by this script; refusing to replace it"
fi
mkdir -p /etc/slurm "$LOGDIR" /var/spool/slurmctld /var/spool/slurmd
cat > "$CONF" <<EOF
$MARK
ClusterName=fuseseg-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
KillWait=1
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
cat > "$CGROUP" <<EOF
$MARK
CgroupPlugin=cgroup/v1
CgroupAutomount=no
EOF

# ---------------------------------------------------------------- daemons
pgrep -x slurmctld >/dev/null || slurmctld || die "slurmctld failed to start: $(tail -5 $LOGDIR/slurmctld.log 2>/dev/null)"
pgrep -x slurmd >/dev/null || slurmd || die "slurmd failed to start: $(tail -5 $LOGDIR/slurmd.log 2>/dev/null)"

state=""
for _ in $(seq 60); do
  state=$(sinfo -h -o '%T' 2>/dev/null | head -1 || true)
  [ "$state" = "idle" ] && break
  sleep 0.5
done
[ "$state" = "idle" ] || die "the node is not idle after 30 s (sinfo: '${state:-no answer}'); see $LOGDIR/slurmd.log: $(tail -3 $LOGDIR/slurmd.log 2>/dev/null | tr '\n' ' ')"
out=$(timeout 30 srun -N1 -t 1 hostname 2>&1) || die "\`srun hostname\` did not answer: $out"
echo "slurm-local: up, node $host idle, srun hostname -> $out"
