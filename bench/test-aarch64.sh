#!/usr/bin/env bash
# The kernel and parity tests of the infdit library on aarch64 (the NEON kernel path), built with
# the Debian cross toolchain and run under qemu-user emulation. Speed under emulation means
# nothing: this checks results only.
#
#   bench/test-aarch64.sh                 # install what is missing, build, run
#   bench/test-aarch64.sh kernels         # another test filter for the library's unit tests
#
# Environment: AARCH64_TARGET_DIR (default target/aarch64), INFDIT_SHARED_DIR (the parity vectors,
# default ../shared), SKIP_PARITY=1 to run the unit tests only, PARITY_FILTER (a test-name filter for
# the parity tests, e.g. `network`: the sampling cases take long under emulation), JOBS (default 2),
# QEMU_CPU (read by qemu: the default `max` has FP16 arithmetic, where the gemm crate's f16 matmul
# would sum in f16, so infdit's f16 dense layers widen to f32 there; `cortex-a72` has none and runs
# gemm's f32 route: both pass, see docs/kernels.md),
# PROFILE (cargo profile of the build, default `release`; under emulation the f32 arithmetic itself is
# the limit, qemu's soft-float multiply-add: the sampling parity cases take 35-70 minutes each with one
# thread (a, d, e) and hours (neon b: 79 minutes, c: 2 hours 19 minutes; portable b: 92 minutes, c: 110 minutes; each
# with RAYON_NUM_THREADS=2 on a 2-core host), see docs/kernels.md, so use PARITY_FILTER="--skip sampling"
# unless the cores are free for hours).
# Needs root (or the packages already installed) for apt-get, and rustup.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu
FILTER=${1:-kernels}
JOBS=${JOBS:-2}
PROFILE=${PROFILE:-release}
export CARGO_TARGET_DIR=${AARCH64_TARGET_DIR:-target/aarch64}

# (a) cross linker, emulator, Rust target
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    echo "== installing gcc-aarch64-linux-gnu and qemu-user" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
fi
if ! rustup target list --installed | grep -qx "$TARGET"; then
    rustup target add "$TARGET"
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc

# (b) the kernels' unit tests: every path the emulated CPU runs (neon, portable)
echo "== unit tests ($FILTER) on $TARGET under qemu" >&2
cargo test -j "$JOBS" --profile "$PROFILE" -p infdit --target "$TARGET" --lib -- "$FILTER"

# (c) the parity tests against the golden vectors, once per kernel path
if [ "${SKIP_PARITY:-0}" != 1 ]; then
    for p in neon portable; do
        echo "== parity tests, INFDIT_KERNELS=$p" >&2
        INFDIT_KERNELS=$p cargo test -j "$JOBS" --profile "$PROFILE" -p infdit --target "$TARGET" --test parity -- ${PARITY_FILTER:-}
    done
fi
echo "aarch64 tests passed"
