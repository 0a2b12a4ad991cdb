#!/usr/bin/env bash
# CPU speed, side by side: one denoiser call D(x; sigma) of infdit vs. the plain-PyTorch baseline
# (bench/pytorch_baseline.py) on the same network and weights, same thread count.
#
#   bench/cpu.sh                      # everything (venv, release build, weights, timings, table)
#
# Environment: INFDIT_KERNELS (avx512, avx2, neon or portable: the kernel path, default the best the
# CPU runs; the table says which ran), ISA=avx2 (an AVX2-only machine, emulated on an AVX-512 one: infdit
# built without its `avx512-gemm` feature and run with INFDIT_KERNELS=avx2, PyTorch run with
# ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2, the peak too; use
# DTYPES=f32 with it: PyTorch's bf16 matmul restricted to AVX2 measured 0.37 GFLOP/s, its bf16 call takes hours),
# RT=1 (each timed command at real-time priority, `chrt -f 10`, so that other jobs on a shared machine
# do not skew the side-by-side; needs root), THREADS (default 2), REPEAT (best of, default 3), SIGMA (default 1.0),
# DTYPES (default "f32 bf16"), CASES (default "parity:384x384 small512:512x512"),
# TORCH_VENV (default /tmp/torchenv), INFDIT_SHARED_DIR (default ../shared), BENCH_OUT (default target/bench).
# Last line: speedup_f32=<x> speedup_bf16=<y> kernels=<path> (pytorch s / infdit s, small512 config).
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS=${THREADS:-2}
REPEAT=${REPEAT:-3}
SIGMA=${SIGMA:-1.0}
DTYPES=${DTYPES:-"f32 bf16"}
CASES=${CASES:-"parity:384x384 small512:512x512"}
VENV=${TORCH_VENV:-/tmp/torchenv}
SHARED=${INFDIT_SHARED_DIR:-../shared}
OUT=${BENCH_OUT:-target/bench}
PY="$VENV/bin/python"
BIN=target/release/infdit
PRIO=()
[ "${RT:-0}" = 1 ] && PRIO=(chrt -f 10)
TORCH_ENV=()
if [ "${ISA:-}" = avx2 ]; then
    export INFDIT_KERNELS=avx2
    TORCH_ENV=(ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2)
elif [ -n "${ISA:-}" ]; then
    echo "ISA=$ISA: only avx2 can be emulated" >&2; exit 2
fi
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
mkdir -p "$OUT"

# (a) the baseline's packages
if ! "$PY" -c "import torch, safetensors, numpy" 2>/dev/null; then
    echo "== creating $VENV and installing torch safetensors numpy (large download)" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet torch safetensors numpy
fi

# (b) release build
if [ "${ISA:-}" = avx2 ]; then
    echo "== cargo build --release -p infdit-cli --no-default-features (gemm without AVX-512)" >&2
    cargo build --release -p infdit-cli --no-default-features >&2
    cp target/release/infdit "$OUT/infdit-avx2"
    BIN="$OUT/infdit-avx2"
else
    echo "== cargo build --release -p infdit-cli" >&2
    cargo build --release -p infdit-cli >&2
fi

# (c) random weights
config_of() {
    case "$1" in
        parity) echo "$SHARED/parity/config.json" ;;
        small512) echo "bench/small512-config.json" ;;
        *) echo "unknown case $1" >&2; exit 2 ;;
    esac
}
for c in parity small512; do
    w="$OUT/$c-random.safetensors"
    if [ ! -f "$w" ] || [ "$(config_of $c)" -nt "$w" ]; then
        "$BIN" random-model --config "$(config_of $c)" -o "$w" --seed 1 >&2
    fi
done

field() { grep -o "$1=[0-9.eE+-]*" | head -1 | cut -d= -f2; }

# (e) matmul peak (2048^3, best of 5)
peak() {
    env "${TORCH_ENV[@]}" "${PRIO[@]}" "$PY" - "$1" "$THREADS" <<'PYEOF'
import sys, time, torch
dt = {"f32": torch.float32, "bf16": torch.bfloat16}[sys.argv[1]]
torch.set_num_threads(int(sys.argv[2]))
n = 2048
a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
a @ b
best = min((lambda t0: (a @ b, time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(5))
print(f"peak_gflops={2 * n**3 / best / 1e9:.2f}")
PYEOF
}
declare -A PEAK
for d in $DTYPES; do
    PEAK[$d]=$(peak "$d" | field peak_gflops)
    echo "== torch matmul peak $d: ${PEAK[$d]} GFLOP/s" >&2
done

# (d) timings
ROWS=()
declare -A SPEEDUP
KPATH=na
for cs in $CASES; do
    c=${cs%%:*}; size=${cs#*:}
    cfg=$(config_of "$c"); w="$OUT/$c-random.safetensors"
    for d in $DTYPES; do
        echo "== $c $size $d" >&2
        il=$("${PRIO[@]}" "$BIN" bench denoise --model "$w" --config "$cfg" --size "$size" --sigma "$SIGMA" --dtype "$d" \
            --repeat "$REPEAT" --mode whole)
        echo "$il" >&2
        pl=$(env "${TORCH_ENV[@]}" "${PRIO[@]}" "$PY" bench/pytorch_baseline.py --weights "$w" --config "$cfg" --size "$size" --sigma "$SIGMA" \
            --dtype "$d" --threads "$THREADS" --repeat "$REPEAT")
        echo "$pl" >&2
        is=$(echo "$il" | field best_s); gf=$(echo "$il" | field gflops); ps=$(echo "$pl" | field best_s)
        kp=$(echo "$il" | grep -o 'kernels=[a-z0-9]*' | cut -d= -f2)
        sp=$(awk -v p="$ps" -v i="$is" 'BEGIN{printf "%.2f", p/i}')
        fr=$(awk -v g="$gf" -v k="${PEAK[$d]}" 'BEGIN{printf "%.2f", g/k}')
        ROWS+=("| $c | $size | $d | ${kp:-na} | $is | $ps | $sp | $gf | $fr |")
        [ "$c" = small512 ] && SPEEDUP[$d]=$sp && KPATH=${kp:-na}
    done
done

# (f) table
echo
echo "threads=$THREADS, best of $REPEAT after 1 warm-up, sigma=$SIGMA, whole-image mode, ISA=${ISA:-native} RT=${RT:-0};" \
    "matmul peak (torch 2048^3):" \
    "$(for d in $DTYPES; do printf '%s %s GFLOP/s; ' "$d" "${PEAK[$d]}"; done)"
echo
echo "| config | size | dtype | kernels | infdit s | pytorch s | speedup (pytorch/infdit) | infdit GFLOP/s | fraction of peak |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for r in "${ROWS[@]}"; do echo "$r"; done
echo
echo "speedup_f32=${SPEEDUP[f32]:-na} speedup_bf16=${SPEEDUP[bf16]:-na} kernels=${KPATH:-na}"
