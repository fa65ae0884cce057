#!/usr/bin/env bash
# The README's TensorBoard pictures: three short runs of today's default recipe (Muon, batch 2000, 8 epochs),
# then the scalars and the HParams dashboard comparing them, each taken by tensorboard_screenshot.sh in
# headless Chromium (apt-get install -y chromium).
#
#   benchmarks/readme_pictures.sh                          # synthetic data, fastnet_small: minutes on 2 CPU cores
#   DATA_FLAGS="--data-dir data" MODEL=fastnet benchmarks/readme_pictures.sh   # real CIFAR-10, the default net
#
# The runs differ in the seed and in --optimizer (Muon, the default, against SGD): the HParams table shows
# those flags beside each run's final accuracy and losses. Every flag not named here is the default.
set -euo pipefail

LOGDIR="${LOGDIR:-benchmarks/out/readme}"                     # fresh each time: the three runs only
MODEL="${MODEL:-fastnet_small}"                               # fastnet (the default) costs ~7x the time
DATA_FLAGS="${DATA_FLAGS:---dataset synthetic --synthetic-size 4000}"
PYTHON="${PYTHON:-python3}"
SCALARS_PNG="${SCALARS_PNG:-benchmarks/tensorboard.png}"
HPARAMS_PNG="${HPARAMS_PNG:-benchmarks/tensorboard_hparams.png}"

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
# the HParams table: one row per run, its flags and final metrics (Chromium's viewport shows its first columns)
LOGDIR="$LOGDIR" OUT="$HPARAMS_PNG" URL="http://127.0.0.1:${PORT:-6006}/#hparams" \
    benchmarks/tensorboard_screenshot.sh
