#!/usr/bin/env bash
# Peak resident memory of `infdit upscale` against output size, whole-image mode vs the block
# scheduler, with a small random-weight model (bench/small-config.json) and one network evaluation
# (--steps 1: the peak of a run is the peak of one evaluation). Prints a markdown table.
# Usage: bench/memory.sh [sizes...]   (default: 512x512 1024x1024 2048x2048 4096x4096 1024x8192)
# MODEL=builtin measures the model built into the binary instead (64-px blocks; fast enough for tall
# outputs); BIN=path uses that binary instead of building the release one. Memory does not depend on
# the optimisation level, so a dev build gives the same figures.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${BIN:-}" ]; then
    cargo build --release -q -p infdit-cli
    BIN=${CARGO_TARGET_DIR:-target}/release/infdit
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
if [ "${MODEL:-small}" = builtin ]; then
    MODEL_ARGS=()
    BLOCK=64
else
    $BIN random-model --config bench/small-config.json -o "$TMP/model.safetensors" --seed 1 >/dev/null
    MODEL_ARGS=(--model "$TMP/model.safetensors" --config bench/small-config.json)
    BLOCK=128
fi
SIZES=("$@")
[ ${#SIZES[@]} -eq 0 ] && SIZES=(512x512 1024x1024 2048x2048 4096x4096 1024x8192)
peak() { # prints peak RSS in MiB of the command
    /usr/bin/time -f "%M" -o "$TMP/rss" "$@" >/dev/null 2>"$TMP/err" || { cat "$TMP/err" >&2; echo "failed"; return; }
    awk '{printf "%.0f", $1/1024}' "$TMP/rss"
}
echo "| output (W x H) | blocks | whole-image peak RSS (MiB) | scheduler n=1 peak RSS (MiB) | ratio | scheduler n=1 + --state-dir (MiB) |"
echo "| --- | --- | --- | --- | --- | --- |"
for s in "${SIZES[@]}"; do
    W=${s%x*}; H=${s#*x}
    python3 bench/make_png.py $((W / 4)) $((H / 4)) "$TMP/in.png"
    COMMON=(upscale "$TMP/in.png" -o "$TMP/out.png" "${MODEL_ARGS[@]}" --steps 1 --quiet)
    whole=$(peak $BIN "${COMMON[@]}" --mode whole)
    sched=$(peak $BIN "${COMMON[@]}" --mode blocks --block-batch 1)
    filed=$(peak $BIN "${COMMON[@]}" --mode blocks --block-batch 1 --state-dir "$TMP/state")
    ratio=$(awk -v a="$whole" -v b="$sched" 'BEGIN { if (b > 0) printf "%.1fx", a / b; else print "-" }')
    echo "| ${W} x ${H} | $((W / BLOCK * H / BLOCK)) | $whole | $sched | $ratio | $filed |"
done
