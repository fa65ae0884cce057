#!/usr/bin/env bash
# Run a launcher as a SLURM batch job that outlives its time limit. The job files here end with
#   exec "$REPO/launch/slurm/preemptible.sh" COMMAND...
# so that this script is the batch shell, the process that `#SBATCH --signal=B:USR1@SECONDS` signals.
#
# SIGUSR1 (SECONDS before the time limit, or `scancel --batch --signal=USR1 JOBID`): passed on to
#   COMMAND as SIGUSR1: launch/torchrun.sh, and srun running launch/torchrun_multinode.sh on every node,
#   make it a clean stop in which the trainer saves latest.pt and exits 75. When COMMAND has exited
#   with an error, `scontrol requeue $SLURM_JOB_ID` puts the job back in the queue under the same id,
#   so the next run finds the same checkpoint directory and resumes (--resume auto).
# SIGTERM (scancel, or the time limit reached): passed on as SIGUSR1 too, to save; no requeue.
# The exit status is COMMAND's, or 0 once the job is requeued.
#
# Environment, with defaults:
#   REQUEUE=1   0: on SIGUSR1, save and stop but do not requeue
set -euo pipefail

REQUEUE=${REQUEUE:-1}
me="launch/slurm/preemptible.sh"
pid=""
interrupted=0
signalled=""
# shellcheck disable=SC2317  # (called from the traps below)
forward() {
  interrupted=1
  signalled=${signalled:-$1}
  echo "$me: $(date +%T) got SIG$1: asking the trainer to save and stop" >&2
  if [[ -n $pid ]]; then kill -USR1 "$pid" 2>/dev/null || true; fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

"$@" &
pid=$!
while :; do
  interrupted=0
  status=0
  wait "$pid" || status=$?
  ((interrupted)) || break # else a trap ended the wait early: COMMAND is still stopping
done

if [[ $signalled == USR1 && $status -ne 0 && $REQUEUE == 1 ]]; then
  echo "$me: $(date +%T) stopped with status $status; requeueing job $SLURM_JOB_ID to resume" >&2
  if scontrol requeue "$SLURM_JOB_ID"; then
    exit 0
  fi
  echo "$me: could not requeue job $SLURM_JOB_ID; submit again with the same CKPT_DIR to resume" >&2
fi
exit "$status"
