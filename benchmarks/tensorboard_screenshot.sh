#!/usr/bin/env bash
# Screenshot of TensorBoard's scalars for a real run: tensorboard on 127.0.0.1, headless Chromium (Debian's
# `chromium` package: apt-get install -y chromium), then tensorboard is stopped.
#
#   benchmarks/tensorboard_screenshot.sh                                   # the time-to-accuracy run
#   LOGDIR=runs OUT=/tmp/tb.png benchmarks/tensorboard_screenshot.sh       # any runs directory
set -euo pipefail

LOGDIR="${LOGDIR:-benchmarks/out/tta}"            # a TensorBoard root (runs below it)
OUT="${OUT:-benchmarks/tensorboard.png}"
PORT="${PORT:-6006}"
WINDOW="${WINDOW:-1400,1000}"
BUDGET_MS="${BUDGET_MS:-20000}"                   # Chromium's virtual time for the page to load its charts
# the scalars tab, no smoothing, accuracy/loss/throughput charts first (tagFilter is a regex over tag names)
URL="${URL:-http://127.0.0.1:${PORT}/#scalars&_smoothingWeight=0&tagFilter=acc%7Closs%7Cimages}"
CHROMIUM="${CHROMIUM:-chromium}"
TENSORBOARD="${TENSORBOARD:-tensorboard}"

command -v "$CHROMIUM" >/dev/null || { echo "no $CHROMIUM: apt-get install -y chromium" >&2; exit 1; }
[ -d "$LOGDIR" ] || { echo "no TensorBoard logdir $LOGDIR (run python -m benchmarks.time_to_accuracy)" >&2; exit 1; }

profile="$(mktemp -d)"
tb_log="$(mktemp)"
"$TENSORBOARD" --logdir "$LOGDIR" --host 127.0.0.1 --port "$PORT" >"$tb_log" 2>&1 &
tb_pid=$!
cleanup() {
    kill "$tb_pid" 2>/dev/null || true
    wait "$tb_pid" 2>/dev/null || true
    rm -rf "$profile" "$tb_log"
}
trap cleanup EXIT

for _ in $(seq 60); do  # wait until it serves (up to 30 s)
    if curl -fsS "http://127.0.0.1:${PORT}/data/runs" >/dev/null 2>&1; then break; fi
    kill -0 "$tb_pid" 2>/dev/null || { cat "$tb_log" >&2; exit 1; }
    sleep 0.5
done
curl -fsS "http://127.0.0.1:${PORT}/data/runs" >/dev/null || { echo "tensorboard did not start" >&2; cat "$tb_log" >&2; exit 1; }

mkdir -p "$(dirname "$OUT")"
"$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
    --window-size="$WINDOW" --virtual-time-budget="$BUDGET_MS" --screenshot="$OUT" "$URL" 2>/dev/null
echo "wrote $OUT ($(stat -c %s "$OUT") bytes) from $URL, logdir $LOGDIR"
