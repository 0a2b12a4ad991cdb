#!/usr/bin/env bash
# End to end: a 256x256 -> 1024x1024 upscale with the "small" config (hidden 512, depth 8, 8 heads;
# random weights) and the released sampler (20 Heun steps = 39 network evaluations), default
# settings otherwise, timed with its peak resident memory.
#
#   bench/e2e.sh            # f32 and bf16
#   DTYPES=bf16 bench/e2e.sh
#
# Environment: THREADS (default 2), DTYPES (default "f32 bf16"), STEPS (default 20),
# INPUT (default examples/ladybird-256.png), BENCH_OUT (default target/bench), EXTRA (more
# `infdit upscale` flags, e.g. EXTRA="--block-batch 8").
# Last line: e2e_f32_s=<s> e2e_bf16_s=<s> (for the dtypes run).
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS=${THREADS:-2}
DTYPES=${DTYPES:-"f32 bf16"}
STEPS=${STEPS:-20}
INPUT=${INPUT:-examples/ladybird-256.png}
EXTRA=${EXTRA:-}
OUT=${BENCH_OUT:-target/bench}
BIN=target/release/infdit
CFG=bench/small512-config.json
W="$OUT/small512-random.safetensors"
export RAYON_NUM_THREADS=$THREADS
mkdir -p "$OUT"

echo "== cargo build --release -p infdit-cli" >&2
cargo build --release -p infdit-cli >&2
if [ ! -f "$W" ] || [ "$CFG" -nt "$W" ]; then
    "$BIN" random-model --config "$CFG" -o "$W" --seed 1 >&2
fi

LAST=""
for d in $DTYPES; do
    log="$OUT/e2e-$d.log"
    echo "== $INPUT x4, small config, $STEPS steps, $d, $THREADS threads" >&2
    /usr/bin/time -f "wall_s=%e peak_rss_kib=%M" "$BIN" upscale "$INPUT" -o "$OUT/e2e-$d.png" \
        --model "$W" --config "$CFG" --steps "$STEPS" --dtype "$d" --verbose --quiet $EXTRA 2> "$log"
    grep -E "mode|memory plan" "$log" >&2 || true
    wall=$(grep -o "wall_s=[0-9.]*" "$log" | cut -d= -f2)
    rss=$(grep -o "peak_rss_kib=[0-9]*" "$log" | cut -d= -f2)
    n=$(grep -o "block_batch: [0-9]*" "$log" | head -1 | cut -d' ' -f2)
    evals=$((2 * STEPS - 1))
    echo "e2e dtype=$d steps=$STEPS evals=$evals wall_s=$wall per_eval_s=$(awk "BEGIN { printf \"%.2f\", $wall / $evals }") peak_rss_mib=$((rss / 1024)) block_batch=$n"
    LAST="$LAST e2e_${d}_s=$wall"
done
echo "${LAST# }"
