#!/usr/bin/env bash
# GPU benchmark: infdit's CUDA build against the PyTorch baseline on the same GPU, in one command that
# finishes within 8 minutes on an H100 or H200. Run it in the repository root of the GPU machine, with
# the binary built beforehand by bench/build-cuda.sh (target/cuda/release/infdit) carried along; that
# machine needs no cargo and no network, only its PyTorch (python3) and the NVIDIA driver.
#
#   bench/gpu.sh          # on the GPU machine
#   bench/gpu.sh --dry    # anywhere: the same steps on the CPU with a tiny config (tests the script)
#
# Steps (each bounded by what is left of the time budget; a step that does not fit is skipped):
#  1. checks: `infdit bench compare` (one block-scheduler call of a small random model with the
#     released head width 80, on the GPU in f32 and bf16, with and without --kv-offload, against the
#     CPU in f32: max and mean abs differences), and `infdit upscale --scale 2` of
#     examples/ladybird-256.png (built-in model with its CLIP tower, 4 steps, f32) on the GPU and on
#     the CPU: max difference of the 8-bit outputs;
#  2. random weights of the official-size network (hidden 1280, depth 28, 16 heads, block 128, no
#     CLIP: bench/official-dit-config.json) in bf16, written to $GPU_OUT (not the repository);
#  3. for outputs 1024^2, 2048^2 and 4096^2, one network call each (after a small warm-up call):
#     infdit with the K/V cache on the GPU (--max-memory $MEM_GPU_KV, default 8G), infdit with
#     --kv-offload (--max-memory $MEM_OFFLOAD, default 3G), PyTorch (bench/pytorch_baseline.py:
#     bf16, scaled_dot_product_attention over the UniBA keys, whole image, or layer by layer in
#     chunks of 64 blocks after an out-of-memory error), and, with FREE=1 (default), infdit with the
#     block batch sized from all free GPU memory; time per block and peak GPU memory (infdit: the
#     CUDA memory pool's high-water mark; PyTorch: torch.cuda.max_memory_allocated; both count the
#     weights, neither the CUDA context);
#  4. one table.
#
# Environment: BUDGET_S (default 470 s), GPU_OUT (default target/gpu-bench), PY (default python3;
# --dry: /tmp/torchenv/bin/python if present), INFDIT_BIN, SIZES, MEM_GPU_KV, MEM_OFFLOAD, FREE.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET=${BUDGET_S:-470}
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
OUT=${GPU_OUT:-target/gpu-bench}
mkdir -p "$OUT"
MEM_GPU_KV=${MEM_GPU_KV:-8G}
MEM_OFFLOAD=${MEM_OFFLOAD:-3G}
FREE=${FREE:-1}

if [ $DRY = 1 ]; then
    BIN=${INFDIT_BIN:-target/cuda/release/infdit}
    [ -x "$BIN" ] || BIN=target/release/infdit
    DEVICE=cpu
    BIG_CONFIG=bench/small-config.json
    SIZES=${SIZES:-"256 512"}
    WARMUP=128x128
    CHECK_SIZE=256x256
    if [ -z "${PY:-}" ]; then
        PY=python3
        [ -x /tmp/torchenv/bin/python ] && PY=/tmp/torchenv/bin/python
    fi
else
    BIN=${INFDIT_BIN:-target/cuda/release/infdit}
    DEVICE=cuda
    BIG_CONFIG=bench/official-dit-config.json
    SIZES=${SIZES:-"1024 2048 4096"}
    WARMUP=512x512
    CHECK_SIZE=512x512
    PY=${PY:-python3}
    # The CUDA 13 libraries infdit opens (cuBLAS, cuBLASLt, cuRAND) from PyTorch's wheels.
    NVLIB=$("$PY" -c 'import os, nvidia
print(next((os.path.join(p, "cu13", "lib") for p in nvidia.__path__ if os.path.isdir(os.path.join(p, "cu13", "lib"))), ""))' 2>/dev/null)
    [ -n "$NVLIB" ] && export LD_LIBRARY_PATH="$NVLIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "== [$(elapsed) s] $*" >&2; }
# run NAME CMD...: runs CMD with what is left of the budget, its output in $OUT/NAME.log and on
# stderr; returns its exit status (124 when cut by the budget, 125 when skipped for lack of time).
run() {
    local name=$1
    shift
    local left=$(( BUDGET - $(elapsed) ))
    if [ "$left" -lt 15 ]; then
        say "skipped $name: out of time"
        echo "skipped" > "$OUT/$name.log"
        return 125
    fi
    say "$name (up to $left s): $*"
    timeout "$left" "$@" > "$OUT/$name.log" 2> "$OUT/$name.err"
    local rc=$?
    cat "$OUT/$name.log" >&2
    [ $rc -ne 0 ] && { tail -5 "$OUT/$name.err" >&2; say "$name: exit $rc"; }
    return $rc
}
field() { grep -o "$1=[^ ]*" "$OUT/$2.log" 2>/dev/null | head -1 | cut -d= -f2; }

say "dry=$DRY binary=$BIN device=$DEVICE python=$PY sizes=$SIZES budget=${BUDGET}s"
"$BIN" --version >&2 || { echo "error: $BIN does not run (build it with bench/build-cuda.sh)" >&2; exit 1; }
if [ $DRY = 0 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
    ls "$NVLIB"/libcublas.so.* "$NVLIB"/libcublasLt.so.* "$NVLIB"/libcurand.so.* >&2 ||
        echo "warning: CUDA libraries missing in '$NVLIB'" >&2
    "$PY" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))' >&2 || true
fi
GPU_NAME=$([ $DRY = 0 ] && nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo "CPU (dry run)")

# 1. checks
"$BIN" random-model --config bench/gpu-check-config.json -o "$OUT/check.safetensors" --seed 1 >&2
run check "$BIN" bench compare --model "$OUT/check.safetensors" --config bench/gpu-check-config.json \
    --size "$CHECK_SIZE" --block-batch 2 --device "$DEVICE" --dtype bf16
CHECK_RC=$?
# (--scale 2: the official 2x mode, a 512x512 model output; the built-in model carries CLIP.)
run upscale-dev "$BIN" upscale examples/ladybird-256.png -o "$OUT/ladybird-dev.png" --device "$DEVICE" --dtype f32 \
    --scale 2 --steps 4 --quiet
run upscale-cpu "$BIN" upscale examples/ladybird-256.png -o "$OUT/ladybird-cpu.png" --device cpu --dtype f32 \
    --scale 2 --steps 4 --quiet
IMG_PY=$PY
"$IMG_PY" -c "import PIL, numpy" 2>/dev/null || IMG_PY=python3
UPSCALE_DIFF=$("$IMG_PY" - "$OUT/ladybird-dev.png" "$OUT/ladybird-cpu.png" <<'EOF' 2>/dev/null || echo na
import sys
import numpy as np
from PIL import Image
a, b = (np.asarray(Image.open(p), dtype=np.int32) for p in sys.argv[1:3])
print(int(np.abs(a - b).max()))
EOF
)
say "upscale on $DEVICE vs cpu (f32, 8-bit output): max difference $UPSCALE_DIFF levels"

# 2. official-size random weights
W="$OUT/$(basename "$BIG_CONFIG" .json)-bf16.safetensors"
if [ ! -s "$W" ]; then
    run weights "$BIN" random-model --config "$BIG_CONFIG" -o "$W" --seed 1 --dtype bf16 || exit 1
fi

# 3. timings
for s in $SIZES; do
    size=${s}x${s}
    common=(bench denoise --model "$W" --config "$BIG_CONFIG" --size "$size" --warmup "$WARMUP" --repeat 1
        --device "$DEVICE" --dtype bf16)
    run "infdit-gpukv-$s" "$BIN" "${common[@]}" --kv-offload off --max-memory "$MEM_GPU_KV"
    run "infdit-offload-$s" "$BIN" "${common[@]}" --kv-offload on --max-memory "$MEM_OFFLOAD"
    run "torch-$s" "$PY" bench/pytorch_baseline.py --weights "$W" --config "$BIG_CONFIG" --size "$size" \
        --warmup-size "$WARMUP" --repeat 1 --device "$DEVICE" --dtype bf16 --chunk auto
    if [ "$FREE" = 1 ]; then
        run "infdit-free-$s" "$BIN" "${common[@]}" --kv-offload off
    fi
done

# 4. the table
ms() { awk -v v="$1" 'BEGIN { if (v == "" || v == "na") print "-"; else printf "%.2f", v * 1000 }'; }
cell() { # LOG: "n=N, X ms/block, Y MiB"
    local b
    b=$(field per_block_s "$1")
    if [ -z "$b" ]; then
        head -c 40 "$OUT/$1.log" 2>/dev/null | grep -q skipped && echo "skipped (time)" && return
        echo "failed"
        return
    fi
    echo "$(field mode "$1" | sed 's/blocks/n=/'), $(ms "$b") ms/block, $(field peak_gpu_mib "$1") MiB"
}
tcell() {
    local b
    b=$(field per_block_s "$1")
    if [ -z "$b" ]; then
        head -c 40 "$OUT/$1.log" 2>/dev/null | grep -q skipped && echo "skipped (time)" && return
        grep -q OutOfMemory "$OUT/$1.err" 2>/dev/null && echo "out of memory" && return
        echo "failed"
        return
    fi
    local how="whole image"
    [ "$(field chunk "$1")" != 0 ] && how="chunks of $(field chunk "$1") blocks"
    echo "$(ms "$b") ms/block, $(field peak_gpu_mib "$1") MiB, $how"
}
echo
echo "GPU: $GPU_NAME; bf16, one network call (sigma 1) after a warm-up call at $WARMUP; $(basename "$BIG_CONFIG");" \
    "infdit $("$BIN" --version | cut -d' ' -f2-)"
echo "check (bench compare, $CHECK_SIZE, vs CPU f32): $(sed -n 1p "$OUT/check.log" 2>/dev/null | grep -o '\(f32\|bf16\)_[a-z_]*=[^ ]*\|OK\|FAIL' | tr '\n' ' ')"
echo "upscale ladybird-256 x2 (built-in model, CLIP included) on $DEVICE vs CPU (f32, 4 steps): max difference $UPSCALE_DIFF of 255"
echo
echo "| output | blocks | infdit, K/V on GPU (--max-memory $MEM_GPU_KV) | infdit --kv-offload (--max-memory $MEM_OFFLOAD) | infdit, all free GPU memory | PyTorch SDPA |"
echo "| --- | --- | --- | --- | --- | --- |"
for s in $SIZES; do
    free_cell="not run"
    [ "$FREE" = 1 ] && free_cell=$(cell "infdit-free-$s")
    echo "| ${s}x${s} | $(( (s / 128) * (s / 128) )) | $(cell "infdit-gpukv-$s") | $(cell "infdit-offload-$s") | $free_cell | $(tcell "torch-$s") |"
done
echo
echo "total $(elapsed) s"
[ $CHECK_RC -eq 0 ] || exit 1
