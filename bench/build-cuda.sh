#!/usr/bin/env bash
# Builds target/cuda/release/infdit with candle's CUDA backend, on a machine with no GPU and no
# system CUDA: every CUDA piece comes from PyPI. Run from anywhere; needs cargo, python3 (with venv
# and pip) and network access to crates.io and PyPI. Re-running it reuses what is already there.
#
#   bench/build-cuda.sh            # venv + cudaroot + cargo build (release, sm_90 = H100/H200)
#   CUDA_COMPUTE_CAP=80 bench/build-cuda.sh   # another GPU generation (A100: 80)
#
# Steps (each timed):
#  1. a venv under target/cuda-venv with only the CUDA 13.0 wheels the build reads: nvcc and its
#     parts (nvvm, crt, cccl) and the runtime (headers, libcudart). CUDA 13.0 matches the GPU
#     machines' driver (580) and nvcc; a newer nvcc writes PTX that driver cannot load.
#  2. target/cudaroot: a CUDA_ROOT of symlinks into the venv (bin, include, nvvm).
#  3. candle-core copied to target/cuda/vendor with cudarc switched from `dynamic-linking` to
#     `dynamic-loading`, and used through a `--config patch` for this build only: the CUDA
#     libraries (libcuda, cuBLAS, cuBLASLt, cuRAND) are then opened with dlopen when a GPU is first
#     used instead of being needed to start the program, so the binary still starts, and runs on
#     the CPU, on a machine without them (and no libcuda link stub is needed). candle-kernels
#     copied there too, without its quantized MoE/GGUF kernels (a stub library instead): they are
#     most of the build time and of the binary, and would make libcudart.so.13 needed to start.
#  4. CUDA_COMPUTE_CAP=90 cargo build --release -p infdit-cli --features cuda into target/cuda,
#     apart from the CPU build in target/release (Cargo.lock is restored afterwards: the patch
#     would rewrite candle-core's entry).
#
# On the GPU machine the binary needs libcuda.so.1 (the driver) and libcublas, libcublasLt and
# libcurand of CUDA 13, e.g. from PyTorch's wheels:
#   LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib target/cuda/release/infdit ...
# (bench/gpu.sh finds and sets that itself).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${INFDIT_CUDA_VENV:-$ROOT/target/cuda-venv}
CUDAROOT=$ROOT/target/cudaroot
TARGET_DIR=$ROOT/target/cuda
VENDOR=$TARGET_DIR/vendor
PY=${PYTHON:-python3}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
NICE=${NICE:-nice -n 10}

step() { echo "== $*" >&2; }
t_all=$(date +%s)
t=$t_all
lap() {
    local now
    now=$(date +%s)
    echo "   ($(( now - t )) s)" >&2
    t=$now
}

# 1. The PyPI CUDA toolkit parts.
step "1/4 venv with the CUDA 13.0 compiler and runtime wheels: $VENV"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
# Pinned to 13.0: unpinned, nvcc 13.0 pulls crt/nvvm of a later 13.x; without cccl nvcc fails with
# 'fatal error: nv/target: No such file'.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" \
    "nvidia-cuda-runtime==13.0.*"
N=$("$VENV/bin/python" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[ -x "$N/bin/nvcc" ] || { echo "error: no nvcc in $N/bin after the install" >&2; exit 1; }
lap

# 2. A CUDA root of symlinks.
step "2/4 CUDA root of symlinks: $CUDAROOT"
rm -rf "$CUDAROOT"
mkdir -p "$CUDAROOT"
ln -s "$N/bin" "$CUDAROOT/bin"
ln -s "$N/include" "$CUDAROOT/include"
ln -s "$N/nvvm" "$CUDAROOT/nvvm"
"$CUDAROOT/bin/nvcc" --version | tail -2
lap

# 3. candle-core with cudarc loading the CUDA libraries at run time, and candle-kernels without its
#    MoE/GGUF kernels.
step "3/4 candle-core with dynamic loading of the CUDA libraries, candle-kernels without MoE/GGUF: $VENDOR"
$NICE cargo fetch --quiet
crate_dir() {
    cargo metadata --format-version 1 --all-features 2>/dev/null | "$PY" -c '
import json, os, sys
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == sys.argv[1]))' "$1"
}
# vendor NAME: a copy of the registry's crate in $VENDOR/NAME, redone only when the source changes
# (a new copy rebuilds it); returns 1 when it is already there.
vendor() {
    local src stamp
    src=$(crate_dir "$1")
    [ -f "$src/Cargo.toml" ] || { echo "error: no source of $1 found" >&2; exit 1; }
    stamp="$VENDOR/$1/.infdit-patched-from"
    [ "$(cat "$stamp" 2>/dev/null)" = "$src" ] && return 1
    rm -rf "${VENDOR:?}/$1"
    mkdir -p "$VENDOR"
    cp -r "$src" "$VENDOR/$1" || exit 1
    echo "$src" > "$stamp"
}
if vendor candle-core; then
    grep -q '"dynamic-linking",' "$VENDOR/candle-core/Cargo.toml" || {
        echo "error: candle-core's Cargo.toml no longer names cudarc's dynamic-linking; check the patch" >&2
        exit 1
    }
    sed -i 's/"dynamic-linking",/"dynamic-loading",/' "$VENDOR/candle-core/Cargo.toml"
fi
# candle-kernels compiles candle's quantized MoE/GGUF kernels (never used by infdit) into a static
# library of 37 MB that links the CUDA runtime: most of the build time, half of the binary, and a
# libcudart.so.13 needed just to start. Its build script is cut before that library, and a stub
# library that aborts takes the place of those entry points.
if vendor candle-kernels; then
    "$PY" - "$VENDOR/candle-kernels" <<'PYEOF'
import re, subprocess, sys, pathlib
d = pathlib.Path(sys.argv[1])
b = (d / "build.rs").read_text()
start = b.index("    let mut moe_sources = vec![")
end = b.rindex("    Ok(())")
if start > end:
    sys.exit("candle-kernels/build.rs has changed; check the patch")
stub = d / "moe-stub"
nl = chr(10)
b = (b[:start]
     + "    // infdit (bench/build-cuda.sh): no MoE/GGUF kernels; their entry points abort." + nl
     + f'    println!("cargo:rustc-link-search=native={stub}");' + nl
     + '    println!("cargo:rustc-link-lib=static=moe");' + nl
     + b[end:])
(d / "build.rs").write_text("#![allow(dead_code)]" + nl + b)
names = sorted(set(re.findall(r"pub fn (\w+)\(", (d / "src" / "ffi.rs").read_text())))
stub.mkdir()
src = ["#include <stdio.h>", "#include <stdlib.h>"]
for n in names:
    src.append(f'void {n}(void) {{ fputs("infdit: candle kernel {n} is not built in", stderr); abort(); }}')
(stub / "moe.c").write_text(nl.join(src) + nl)
subprocess.run(["gcc", "-O2", "-fPIC", "-c", "-o", str(stub / "moe.o"), str(stub / "moe.c")], check=True)
subprocess.run(["ar", "rcs", str(stub / "libmoe.a"), str(stub / "moe.o")], check=True)
print(f"  stubbed {len(names)} MoE/GGUF entry points")
PYEOF
fi
lap

# 4. The build.
step "4/4 cargo build --release -p infdit-cli --features cuda (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP) into $TARGET_DIR"
cp Cargo.lock "$TARGET_DIR/Cargo.lock.cpu"
trap 'cp "$TARGET_DIR/Cargo.lock.cpu" "$ROOT/Cargo.lock"' EXIT
PATH="$CUDAROOT/bin:$PATH" CUDA_ROOT="$CUDAROOT" CUDA_HOME="$CUDAROOT" \
    $NICE cargo build --release -p infdit-cli --features cuda --target-dir "$TARGET_DIR" \
    --config "patch.crates-io.candle-core.path=\"$VENDOR/candle-core\"" \
    --config "patch.crates-io.candle-kernels.path=\"$VENDOR/candle-kernels\""
lap

BIN=$TARGET_DIR/release/infdit
echo "built $BIN: $(du -h "$BIN" | cut -f1), in $(( $(date +%s) - t_all )) s"
echo "needs at start (readelf -d):"
readelf -d "$BIN" | grep NEEDED | sed 's/^/  /' || true
