#!/usr/bin/env bash
# Peak resident memory of a block-mode upscale (n = 1) with the sampler state in memory vs in a state
# folder (SampleOptions::state_dir), through the library (crates/infdit/examples/state_dir_memory.rs,
# which does what `infdit upscale --mode blocks` does), with the small random-weight model of
# bench/small-config.json. Prints a markdown table: the peak while sampling and the peak after the
# PNG is written (the 8-bit output image, 3 bytes per pixel, must exist for the encoder).
# Usage: STEPS=1 bench/state_dir_memory.sh [sizes...]   (default: 1024x1024 1024x8192 4096x4096)
# STEPS=1 is one Euler evaluation; STEPS=2 includes a full Heun step (derivative and Euler point).
# The state folder is made under $TMPDIR (default /tmp): put it on a disk, not a tmpfs, or its file
# lives in RAM after all (as page cache, which the RSS figures do not show).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p infdit --example state_dir_memory
BIN=${CARGO_TARGET_DIR:-target}/release/examples/state_dir_memory
STEPS=${STEPS:-1}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
SIZES=("$@")
[ ${#SIZES[@]} -eq 0 ] && SIZES=(1024x1024 1024x8192 4096x4096)
run() { # prints "sampling-peak writing-peak" in MiB
    $BIN --config bench/small-config.json --input "$TMP/in.png" --steps "$STEPS" "$@" |
        sed -E 's/.*peak RSS ([0-9]+) MiB after sampling, ([0-9]+) MiB after writing.*/\1 \2/'
}
echo "| output (W x H) | blocks | steps | in memory: sampling / total peak RSS (MiB) | state folder: sampling / total (MiB) | same PNG |"
echo "| --- | --- | --- | --- | --- | --- |"
for s in "${SIZES[@]}"; do
    W=${s%x*}; H=${s#*x}
    python3 bench/make_png.py $((W / 4)) $((H / 4)) "$TMP/in.png"
    read -r mem_s mem_t < <(run --output "$TMP/mem.png")
    read -r dir_s dir_t < <(run --output "$TMP/dir.png" --state-dir "$TMP/state")
    same=$(cmp -s "$TMP/mem.png" "$TMP/dir.png" && echo yes || echo NO)
    echo "| ${W} x ${H} | $((W / 128 * H / 128)) | $STEPS | $mem_s / $mem_t | $dir_s / $dir_t | $same |"
done
