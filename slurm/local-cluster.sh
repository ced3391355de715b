#!/usr/bin/env bash
# A throw-away one-host SLURM cluster for testing srun/sbatch launches (tests/test_slurm.py, CI).
# From the team notes (shared/notes/local-slurm-example.sh), unchanged below this header.
# Throw-away Slurm cluster on this one host, for testing slurm/ scripts.
#
#   local-slurm-example.sh start    # idempotent: no-op if already up, else (re)start clean
#   local-slurm-example.sh stop     # cancel jobs, stop only the daemons this script started (PID files)
#   local-slurm-example.sh status
#   eval "$(local-slurm-example.sh env)"   # sets SLURM_CONF for sbatch/srun/squeue/scontrol
#   local-slurm-example.sh wait JOBID [TIMEOUT_S]   # poll to a final state; rc 0 iff COMPLETED
#
# Needs root and: apt-get install -y --no-install-recommends munge slurmctld slurmd slurm-client
# Knobs (environment):
#   SLURM_LOCAL_DIR   everything (config, munge key/socket, state, logs, PID files) lives here
#   SLURM_LOCAL_NODES 1 = one node named after the host; N>1 = virtual nodes n1..nN (one slurmd
#                     each, all on 127.0.0.1); their names are added to /etc/hosts (removed on stop)
#   SLURM_LOCAL_PORT  slurmctld port; slurmd ports are PORT+1 .. PORT+N
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/local-slurm}
NODES=${SLURM_LOCAL_NODES:-1}
PORT=${SLURM_LOCAL_PORT:-16817}
CONF=$DIR/etc/slurm.conf
HOSTS_TAG="# local-slurm-example virtual nodes"
export SLURM_CONF=$CONF

log() { echo "local-slurm: $*" >&2; }
trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR

# PID from a PID file, only if that process is alive and is the expected program.
pid_of() { # pidfile comm
  local f=$1 comm=$2 pid
  [[ -s $f ]] || return 1
  pid=$(<"$f")
  [[ $pid =~ ^[0-9]+$ ]] && [[ -r /proc/$pid/comm ]] && [[ $(<"/proc/$pid/comm") == "$comm" ]] || return 1
  echo "$pid"
}

node_names() {
  if (( NODES == 1 )); then hostname -s; else for ((i = 1; i <= NODES; i++)); do echo "n$i"; done; fi
}

all_up() {
  pid_of "$DIR/munge/munged.pid" munged >/dev/null || return 1
  pid_of "$DIR/run/slurmctld.pid" slurmctld >/dev/null || return 1
  local n
  for n in $(node_names); do pid_of "$DIR/run/slurmd-$n.pid" slurmd >/dev/null || return 1; done
  scontrol ping 2>/dev/null | grep -q UP
}

stop_pidfile() { # pidfile comm
  local pid
  pid=$(pid_of "$1" "$2") || { rm -f "$1"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then log "$2 ($pid) ignored SIGTERM, sending SIGKILL"; kill -KILL "$pid" || true; fi
  rm -f "$1"
}

hosts_remove() {
  grep -qF "$HOSTS_TAG" /etc/hosts || return 0
  local tmp; tmp=$(mktemp)
  grep -vF "$HOSTS_TAG" /etc/hosts >"$tmp"
  cat "$tmp" >/etc/hosts   # rewrite in place: /etc/hosts is often a bind mount
  rm -f "$tmp"
}

do_stop() {
  # Jobs first: slurmstepd (and the job's processes) outlive a stopped slurmd.
  local jobs=()
  if pid_of "$DIR/run/slurmctld.pid" slurmctld >/dev/null; then mapfile -t jobs < <(squeue -h -o %i 2>/dev/null); fi
  if ((${#jobs[@]})); then
    scancel "${jobs[@]}" 2>/dev/null || true   # SIGTERM, then SIGKILL after KillWait
    for _ in $(seq 60); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.5; done
  fi
  local f
  for f in "$DIR"/run/slurmd-*.pid; do if [[ -e $f ]]; then stop_pidfile "$f" slurmd; fi; done
  stop_pidfile "$DIR/run/slurmctld.pid" slurmctld
  stop_pidfile "$DIR/munge/munged.pid" munged
  hosts_remove
  log "stopped"
}

write_conf() {
  local host hw nodeline
  host=$(hostname -s)
  # Real hardware line, e.g. "CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
  hw=$(slurmd -C | sed -n '1s/^NodeName=[^ ]* //p')
  if (( NODES == 1 )); then
    nodeline="NodeName=$host NodeAddr=127.0.0.1 Port=$((PORT + 1)) $hw"
  else
    nodeline="NodeName=n[1-$NODES] NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 1))-$((PORT + NODES)) $hw"
  fi
  cat >"$CONF" <<EOF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job is held for cred_expire+1 s (default 120). Minimum accepted is 5;
# a smaller value is rejected ("AuthInfo=cred_expire=N invalid") and 120 applies.
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# No cgroups in containers: track processes by parent PID, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# One line per finished job (state, exit code) since there is no sacct without slurmdbd.
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.log
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Run the main scheduler every second (default 60 s) so a requeued job starts as
# soon as it becomes eligible; backfill every second (default 30 s).
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
KillWait=10
MinJobAge=300
$nodeline
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

# Poll until a job reaches a final state (sbatch --wait polls every 2, 10, 42, 74... s).
# Prints the state; exit 0 only for COMPLETED. A requeued job passes PENDING again: keep polling.
do_wait() { # JOBID [TIMEOUT_S]
  local job=$1 deadline=$((SECONDS + ${2:-300})) st
  while ((SECONDS < deadline)); do
    st=$(scontrol show job -o "$job" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2) || true
    case $st in
      COMPLETED) echo "$st"; return 0 ;;
      FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE | PREEMPTED) echo "$st"; return 1 ;;
      "") echo "UNKNOWN (job record gone? see $DIR/log/jobcomp.log)"; return 1 ;;
    esac
    sleep 0.5
  done
  echo "TIMEOUT_WAITING ($st)"; return 1
}

do_start() {
  [[ $EUID -eq 0 ]] || { log "must run as root"; return 1; }
  if all_up; then log "already running ($CONF)"; return 0; fi
  do_stop >/dev/null 2>&1 || true
  rm -rf "${DIR:?}/state" "${DIR:?}/spool" "${DIR:?}/log" "${DIR:?}/run" "${DIR:?}/etc"
  mkdir -p "$DIR/etc" "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run" "$DIR/munge"
  chmod 755 "$DIR" "$DIR/spool" "$DIR/munge"   # munged wants its socket dir o+x
  write_conf

  # munge: private key, socket, PID file and log, so the system munged (if any) is untouched.
  [[ -s $DIR/munge/munge.key ]] || mungekey --create --keyfile="$DIR/munge/munge.key"
  chmod 400 "$DIR/munge/munge.key"
  munged --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
    --seed-file="$DIR/munge/munged.seed"

  if (( NODES > 1 )); then
    hosts_remove
    echo "127.0.0.1 $(node_names | tr '\n' ' ')$HOSTS_TAG" >>/etc/hosts
  fi

  slurmctld -f "$CONF"          # daemonizes; writes SlurmctldPidFile
  local n
  for n in $(node_names); do
    mkdir -p "$DIR/spool/slurmd-$n"
    slurmd -f "$CONF" -N "$n"   # daemonizes; writes SlurmdPidFile (slurmd-%n.pid)
  done

  # Wait for every node to be idle.
  for _ in $(seq 120); do
    if [[ $(sinfo -h -N -o %T 2>/dev/null | grep -c '^idle$') -eq $NODES ]]; then
      log "up: $(sinfo -h -o '%P %D %T %N')"
      log "export SLURM_CONF=$CONF"
      return 0
    fi
    sleep 0.25
  done
  log "nodes did not become idle; see $DIR/log"; sinfo -N -l >&2 || true
  return 1
}

case ${1:-start} in
  start) do_start || exit 1 ;;
  stop) do_stop ;;
  status) if all_up; then sinfo -N; else echo "not running"; exit 1; fi ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  wait) do_wait "${2:?usage: $0 wait JOBID [TIMEOUT_S]}" "${3:-300}" || exit 1 ;;
  *) echo "usage: $0 [start|stop|status|env|wait JOBID [TIMEOUT_S]]" >&2; exit 2 ;;
esac
