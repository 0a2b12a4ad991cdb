#!/usr/bin/env bash
# A small scaling sweep for the built-in model (issue 15): networks of other widths and block sizes,
# each trained from scratch with the same recipe and number of training crops, then scored on the
# photo validation set the way bench/quality.sh scores the built-in model. Prints one table.
#
#   bench/train-sweep.sh                 # all variants, STEPS=600 crops of 256 px each
#   VARIANTS="base wide" STEPS=300 bench/train-sweep.sh
#   BIN=target/cuda/release/infdit DEVICE=cuda STEPS=5000 bench/train-sweep.sh   # on a GPU
#   MATMUL=f32 STEPS=3000 bench/train-sweep.sh   # continue runs started before --matmul existed (f32)
#
# The first run (600 crops, 2026-12-04) left every variant at bicubic: a sweep needs thousands of
# steps per variant to separate them (docs/training.md#a-scaling-sweep). Needs target/release/infdit, data/photos/train (data/fetch_debian_wallpapers.sh) and
# data/photos/validation_photos (data/fetch_validation_photos.sh). Run folders: $OUT (default
# target/sweep); a rerun resumes them. Variants (hidden / depth / heads / MLP / block px):
#   base    128 / 4 / 2 / 512 / 64   (the built-in model's network)
#   narrow   96 / 4 / 2 / 384 / 64
#   wide    192 / 4 / 3 / 768 / 64
#   block32 128 / 4 / 2 / 512 / 32
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/infdit}
OUT=${OUT:-target/sweep}
STEPS=${STEPS:-600}
VARIANTS=${VARIANTS:-"base narrow wide block32"}
MATMUL=${MATMUL:-bf16}
mkdir -p "$OUT"
variant() {
    case $1 in
        base) echo "128 4 2 512 64" ;;
        narrow) echo "96 4 2 384 64" ;;
        wide) echo "192 4 3 768 64" ;;
        block32) echo "128 4 2 512 32" ;;
        *) echo "unknown variant $1" >&2; exit 2 ;;
    esac
}
rows=()
for v in $VARIANTS; do
    read -r hidden depth heads mlp block <<<"$(variant "$v")"
    cfg=$OUT/$v.json
    sed -e "s/\"hidden\": 128/\"hidden\": $hidden/" -e "s/\"depth\": 4/\"depth\": $depth/" \
        -e "s/\"heads\": 2/\"heads\": $heads/" -e "s/\"mlp_hidden\": 512/\"mlp_hidden\": $mlp/" \
        -e "s/\"block_px\": 64/\"block_px\": $block/" models/default/train-config.json > "$cfg"
    t0=$(date +%s)
    "$BIN" train data/photos/train --config "$cfg" --out "$OUT/$v" --steps "$STEPS" --batch 1 --crop 256 \
        --max-side 1024 --lr 1e-3 --warmup 50 --grad-clip 1.0 --ema-decay 0.995 --p-mean 3.0 --p-std 0.5 \
        --degrade-prob 0.1 --lr-dropout 0 --checkpoint-every 100 --sample-steps 1 --sample-sigma-max 20 \
        --seed 12 --matmul "$MATMUL" ${DEVICE:+--device "$DEVICE"} --quiet
    train_s=$(( $(date +%s) - t0 ))
    "$BIN" eval --hr data/photos/validation_photos --hr-size 1024 --steps 1 --sigma-max 20 \
        --model "$OUT/$v" > "$OUT/$v-eval.txt"
    params=$(python3 -c "import json,struct,sys; f=open('$OUT/$v/model.safetensors','rb'); n=struct.unpack('<Q',f.read(8))[0]; h=json.loads(f.read(n)); import math; print(sum(math.prod(t['shape']) for k,t in h.items() if k!='__metadata__'))")
    mean=$(grep -E '^\| \*\*mean.*\| model' "$OUT/$v-eval.txt" | awk -F'|' '{gsub(/ /,"",$4); gsub(/ /,"",$6); gsub(/ /,"",$7); gsub(/ /,"",$8); gsub(/ /,"",$9); print $4" | "$6" | "$7" | "$8" | "$9}')
    rows+=("| $v | $hidden / $depth / $heads / $mlp / $block | $params | $STEPS | $train_s | $mean |")
done
bic=$(grep -E '^\| \*\*mean.*\| bicubic' "$OUT/$(set -- $VARIANTS; echo "$1")-eval.txt" | awk -F'|' '{gsub(/ /,"",$4); gsub(/ /,"",$6); gsub(/ /,"",$7); gsub(/ /,"",$8); print $4" | "$6" | "$7" | "$8" | n/a"}')
echo "| variant | hidden / depth / heads / MLP / block | parameters | crops | train s | PSNR-Y | SSIM-Y | seam | flat | s/image |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
echo "| bicubic | | | | | $bic |"
printf '%s\n' "${rows[@]}"
