#!/usr/bin/env bash
# shellcheck disable=SC2317  # on_warning and on_term are invoked by traps, which shellcheck cannot see
# The body of slurm/train.sbatch and slurm/train-cpu.sbatch: one dtrain launcher per node under srun.
#
# On SLURM's warning signal (USR1, from #SBATCH --signal=B:USR1@SECONDS, or `scancel --signal=USR1
# --batch`) every rank finishes its step and checkpoints, the launchers exit 75, and the job requeues
# itself (at most DTRAIN_MAX_REQUEUES times, default 3). The requeued job keeps its job id, so it resumes
# in the same run folder, runs/<name>/job<id>. A job that fails for a real error (exit 1 or 2) is never
# requeued. SIGTERM (scancel, the time limit) is passed on too: the ranks checkpoint, nothing is requeued.
#   DTRAIN_LAUNCH         the launcher command (default: python -m dtrain.launch)
#   DTRAIN_MAX_REQUEUES   how often a job may requeue itself (default: 3)
set -uo pipefail

max_requeues=${DTRAIN_MAX_REQUEUES:-3}
read -r -a launch <<<"${DTRAIN_LAUNCH:-python -m dtrain.launch}"
warned=0
srun_pid=

on_warning() { warned=1; [[ -n $srun_pid ]] && kill -USR1 "$srun_pid" 2>/dev/null; }
on_term() { [[ -n $srun_pid ]] && kill -TERM "$srun_pid" 2>/dev/null; }
trap on_warning USR1
trap on_term TERM

echo "dtrain: job ${SLURM_JOB_ID} (requeued ${SLURM_RESTART_COUNT:-0} times) on ${SLURM_JOB_NODELIST}: $*"
srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${launch[@]}" "$@" &
srun_pid=$!
rc=0
wait "$srun_pid" || rc=$?
# A trapped signal interrupts `wait` (status > 128) while srun still runs: wait for srun itself.
while ((rc > 128)) && kill -0 "$srun_pid" 2>/dev/null; do
  rc=0
  wait "$srun_pid" || rc=$?
done

# The SLURM log, linked into the run folder (named after the job id) so the two sit together.
log=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'StdOut=[^ ]*' | cut -d= -f2)
for folder in runs/*/"job${SLURM_JOB_ID}"; do
  if [[ -d $folder && -n $log ]]; then ln -sf "$log" "$folder/slurm.out"; fi
done

if ((rc == 75 && warned)); then
  if ((${SLURM_RESTART_COUNT:-0} < max_requeues)); then
    echo "dtrain: checkpointed on SLURM's warning; requeueing job ${SLURM_JOB_ID}"
    # The requeue ends this shell; wait for it rather than exit (an exit could beat the requeue).
    scontrol requeue "$SLURM_JOB_ID" && { sleep 300 & wait $!; }
  else
    echo "dtrain: not requeueing: already requeued ${max_requeues} times (DTRAIN_MAX_REQUEUES)"
  fi
fi
exit "$rc"
