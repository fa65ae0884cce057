#!/usr/bin/env bash
# The README's TensorBoard pictures: three short runs of today's default recipe (Muon, batch 2000, 8 epochs),
# then the scalars and the HParams dashboard comparing them, each taken by tensorboard_screenshot.sh in
# headless Chromium (apt-get install -y chromium).
#
#   benchmarks/readme_pictures.sh                          # what the README shows: 8 min on 2 CPU cores
#   DATA_FLAGS="--data-dir data --epochs 2" benchmarks/readme_pictures.sh    # real CIFAR-10: ~50 min on 2 cores
#
# The runs differ in the seed and in --optimizer (Muon, the default, against SGD). Every flag not named here
# is the default. The HParams table shows each run's final metrics beside the first five flags by name
# (TensorBoard's default; ticking others, such as optimizer and seed, is a click a screenshot cannot make).
set -euo pipefail

LOGDIR="${LOGDIR:-benchmarks/out/readme}"                     # fresh each time: the three runs only
MODEL="${MODEL:-fastnet_small}"                               # fastnet (the default) costs ~7x the time
DATA_FLAGS="${DATA_FLAGS:---dataset synthetic --synthetic-size 4000}"
PYTHON="${PYTHON:-python3}"
SCALARS_PNG="${SCALARS_PNG:-benchmarks/tensorboard.png}"
HPARAMS_PNG="${HPARAMS_PNG:-benchmarks/tensorboard_hparams.png}"
HPARAMS_WINDOW="${HPARAMS_WINDOW:-2100,420}"                  # wide enough for the table's metric columns

cd "$(dirname "$0")/.."
rm -rf "$LOGDIR" "$LOGDIR.ckpt"
run() {  # name, extra flags...
    local name=$1
    shift
    # shellcheck disable=SC2086  # DATA_FLAGS is a list of flags
    "$PYTHON" -m ddp.train --model "$MODEL" $DATA_FLAGS --eval-every 1 --log-every 1 --resume none \
        --logdir "$LOGDIR" --run-name "$name" --checkpoint-dir "$LOGDIR.ckpt/$name" "$@"
}
run muon-seed0 --seed 0
run muon-seed1 --seed 1
run sgd-seed0 --seed 0 --optimizer sgd
rm -rf "$LOGDIR.ckpt"

LOGDIR="$LOGDIR" OUT="$SCALARS_PNG" benchmarks/tensorboard_screenshot.sh
# the HParams table: one row per run, its flags and final metrics
LOGDIR="$LOGDIR" OUT="$HPARAMS_PNG" URL="http://127.0.0.1:${PORT:-6006}/#hparams" WINDOW="$HPARAMS_WINDOW" \
    benchmarks/tensorboard_screenshot.sh
