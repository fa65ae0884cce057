#!/usr/bin/env bash
# The GPU check in one command: tests/test_gpu.py, then the default recipe timed on one GPU and on all of
# them, then the peers on one GPU where their checkouts are given; one table at the end. No data set needed:
# the timing runs train on synthetic images of CIFAR-10's shape (--dataset synthetic). Within TIME_BUDGET
# (8 minutes): a step that would start with less than a minute left is skipped, one that runs over is stopped.
#
#   benchmarks/gpu_check.sh
#   AIRBENCH_DIR=../cifar10-airbench HIVERGE_DIR=../cifar10-speedrun benchmarks/gpu_check.sh
#   DRY_RUN=1 benchmarks/gpu_check.sh       # print the commands, run nothing (works without a GPU)
#
# Environment, with defaults:
#   PYTHON=python3
#   IMAGES=50000          synthetic training images (the test set: a fifth of that)
#   EPOCHS=8              our epochs (the peers train their own recipes' epochs)
#   GPUS=<torch.cuda.device_count()>   processes of the all-GPU run
#   AIRBENCH_DIR=         checkout of github.com/KellerJordan/cifar10-airbench: times airbench94_muon.py
#   HIVERGE_DIR=          checkout of github.com/hiverge/cifar10-speedrun: times cifar10_speedrun.py
#   OUT=benchmarks/out/gpu_check       run directories, logs and the peers' data, under the repository
#   TIME_BUDGET=480       seconds for everything
#   DRY_RUN=0
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
IMAGES=${IMAGES:-50000}
EPOCHS=${EPOCHS:-8}
AIRBENCH_DIR=${AIRBENCH_DIR:-}
HIVERGE_DIR=${HIVERGE_DIR:-}
OUT=${OUT:-$REPO/benchmarks/out/gpu_check}
TIME_BUDGET=${TIME_BUDGET:-480}
DRY_RUN=${DRY_RUN:-0}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [[ -z ${GPUS:-} ]]; then
  if [[ $DRY_RUN == 1 ]]; then GPUS=2; else GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())'); fi
fi
if [[ $DRY_RUN != 1 && $GPUS -lt 1 ]]; then
  echo "gpu_check.sh: no GPU visible (torch.cuda.device_count() is 0); DRY_RUN=1 prints the commands" >&2
  exit 1
fi
cd "$REPO"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # the peers run from their data directory
START=$SECONDS
ROWS=()

# run NAME CMD...: run CMD (in the background of the budget), its output in $OUT/NAME.log; 0 if it succeeded.
run() {
  local name=$1 left
  shift
  echo "\$ $*" | tee "$OUT/$name.log"
  [[ $DRY_RUN == 1 ]] && return 0
  left=$((TIME_BUDGET - (SECONDS - START)))
  if ((left < 60)); then
    echo "skipped: ${left}s of TIME_BUDGET left" | tee -a "$OUT/$name.log"
    return 1
  fi
  timeout --signal=TERM --kill-after=20 "$left" "$@" 2>&1 | tee -a "$OUT/$name.log"
}

# ours NAME NPROC: the default recipe on NPROC GPUs; a table row with its per-epoch and total times.
ours() {
  local name=$1 nproc=$2 t0 total epochs acc
  t0=$SECONDS
  if run "$name" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m ddp.train \
      --dataset synthetic --synthetic-size "$IMAGES" --epochs "$EPOCHS" --device cuda --resume none \
      --checkpoint-dir "$OUT/$name/checkpoints" --logdir "$OUT" --run-name "$name"; then
    total=$((SECONDS - t0))
    epochs=$(sed -n 's/^epoch [0-9]*\/[0-9]* |.* | \([0-9.]*\)s$/\1/p' "$OUT/$name.log" | paste -sd' ')
    acc=$(sed -n 's/.* acc \([0-9.]*%\) .*/\1/p' "$OUT/$name.log" | tail -1)
    total="${total}s launch to exit"
  else
    total="failed or timed out (see $OUT/$name.log)" epochs="-" acc="-"
  fi
  [[ $DRY_RUN == 1 ]] && total="dry run"
  ROWS+=("| ours, $nproc GPU(s), $EPOCHS epochs | ${epochs:--} | $total | ${acc:--} |")
}

# peer NAME CMD...: a peer in $OUT/peer_data, timed by its own timer (training and its final TTA).
peer() {
  local name=$1 own="failed or timed out" acc="-"
  shift
  mkdir -p "$OUT/peer_data"
  if (cd "$OUT/peer_data" && run "$name" "$@") && [[ $DRY_RUN != 1 ]]; then
    own="$(sed -n 's/^PEER_TRAINED .*"train_s": \([0-9.]*\).*/\1/p' "$OUT/$name.log" | tail -1)s (own timer)"
    acc=$(sed -n 's/^PEER_TRAINED {"acc": \([0-9.]*\).*/\1/p' "$OUT/$name.log" | tail -1)
  fi
  [[ $DRY_RUN == 1 ]] && own="dry run"
  ROWS+=("| $name, 1 GPU | - | $own | $acc (own TTA) |")
}

if ! run test_gpu "$PYTHON" -m pytest -q -rs tests/test_gpu.py; then
  tests="FAILED (see $OUT/test_gpu.log)"
elif [[ $DRY_RUN == 1 ]]; then
  tests="not run (DRY_RUN=1)"
else
  tests="passed (skips, if any, in $OUT/test_gpu.log)"
fi
ours one_gpu 1
if ((GPUS > 1)); then ours all_gpus "$GPUS"; fi

AIRBENCH=0  # airbench94 runs where PyPI's airbench is installed
if [[ $DRY_RUN == 1 ]] || "$PYTHON" -c 'import airbench' 2>/dev/null; then AIRBENCH=1; fi
if [[ $AIRBENCH == 1 || -n $AIRBENCH_DIR || -n $HIVERGE_DIR ]]; then
  run peer_data "$PYTHON" -c "from pathlib import Path; from benchmarks.peer import write_peer_data; \
write_peer_data('synthetic', '', $IMAGES, Path('$OUT/peer_data'))" || true
fi
if [[ $AIRBENCH == 1 ]]; then
  peer airbench94 "$PYTHON" -m benchmarks.airbench_cpu --device cuda
fi
if [[ -n $AIRBENCH_DIR ]]; then
  echo "airbench94_muon: $(git -C "$AIRBENCH_DIR" rev-parse HEAD 2>/dev/null || echo 'not a git checkout')"
  peer airbench94_muon "$PYTHON" -m benchmarks.peer_script --device cuda --script "$AIRBENCH_DIR/airbench94_muon.py"
fi
if [[ -n $HIVERGE_DIR ]]; then
  echo "hiverge: $(git -C "$HIVERGE_DIR" rev-parse HEAD 2>/dev/null || echo 'not a git checkout')"
  peer hiverge "$PYTHON" -m benchmarks.peer_script --device cuda --script "$HIVERGE_DIR/cifar10_speedrun.py"
fi

echo
GPU_NAME="no GPU (dry run)"
if [[ $DRY_RUN != 1 ]]; then GPU_NAME=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))'); fi
echo "## GPU check: $GPUS x $GPU_NAME, $IMAGES synthetic images"
echo
echo "tests/test_gpu.py: $tests"
echo
echo "| run | per-epoch time (s) | total | test accuracy (synthetic) |"
echo "|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
echo "$((SECONDS - START))s in all; logs in $OUT/"
