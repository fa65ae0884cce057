#!/usr/bin/env bash
# Train on this machine: NPROC processes under torchrun, standalone rendezvous (a free local port).
#
#   launch/torchrun.sh [flags of python -m ddp.train]
#   NPROC=4 launch/torchrun.sh --epochs 30
#
# Run it from anywhere: the repository is put on PYTHONPATH, and relative paths (--data-dir,
# --checkpoint-dir, --logdir) are taken from the current directory, as with python -m ddp.train.
#
# Environment, with defaults:
#   NPROC=<GPUs torch sees, or 2 if none>  processes on this node, one per GPU
#   PYTHON=python3                         the interpreter that has torch and the requirements
#   OMP_NUM_THREADS=<CPUs / NPROC, >= 1>   threads per process; CPUs: $SLURM_CPUS_ON_NODE, else nproc
#   MAX_RESTARTS=0                         torchrun --max-restarts: restart the workers after a failure
#                                          (they resume from latest.pt, see --save-every-steps)
#   TORCHRUN_ARGS=                         more torchrun flags, separated by spaces
#   RDZV_ARGS=--standalone                 torchrun's rendezvous flags (launch/torchrun_multinode.sh sets them)
#
# SIGTERM or SIGUSR1 to this script stops training cleanly: torchrun gets SIGTERM (SIGUSR1 would kill
# it), the trainer saves <checkpoint-dir>/latest.pt at its next step, and the script exits non-zero.
# Run the same command again to continue from there (--resume auto is the trainer's default).
# Ctrl-C stops at once, without saving (the script waits until torchrun has stopped its workers).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
if [[ -z ${NPROC:-} ]]; then
  gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
  NPROC=$((gpus > 0 ? gpus : 2))
fi
cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / NPROC > 0 ? cpus / NPROC : 1))}
MAX_RESTARTS=${MAX_RESTARTS:-0}
read -r -a rdzv_args <<<"${RDZV_ARGS:---standalone}"
read -r -a torchrun_args <<<"${TORCHRUN_ARGS:-}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

echo "launch/torchrun.sh: $NPROC processes x $OMP_NUM_THREADS threads on $(hostname)" >&2

pid=""
interrupted=0
stopping=0
# shellcheck disable=SC2317  # (called from the traps below)
stop() {
  interrupted=1
  echo "launch/torchrun.sh: got SIG$1: stopping torchrun; the trainer saves latest.pt" >&2
  # once: a second SIGTERM would interrupt torchrun's own shutdown of its workers
  if [[ -n $pid && $stopping == 0 ]]; then
    stopping=1
    kill -TERM "$pid" 2>/dev/null || true
  fi
}
trap 'stop USR1' USR1
trap 'stop TERM' TERM
trap 'interrupted=1' INT

# torchrun in the background (a trap runs only while the shell waits), with SIGUSR1 ignored: some
# senders (srun, scancel without --batch) signal every process of the job, torchrun included.
(
  trap '' USR1
  exec "$PYTHON" -m torch.distributed.run "${rdzv_args[@]}" --nproc-per-node="$NPROC" \
    --max-restarts="$MAX_RESTARTS" "${torchrun_args[@]}" -m ddp.train "$@"
) &
pid=$!
while :; do
  interrupted=0
  status=0
  wait "$pid" || status=$?
  ((interrupted)) || break # else a trap ended the wait early: torchrun is still stopping
done
exit "$status"
