#!/usr/bin/env bash
# The kernel and parity tests of the infdit library on an emulated AVX2-only x86-64 CPU: the
# ordinary x86-64 test binaries run under qemu-user with an Intel Haswell CPU model (AVX2, FMA,
# F16C, no AVX-512), so the kernels' run-time detection itself, not `INFDIT_KERNELS`, picks the AVX2
# path, and any AVX-512 instruction reached outside the AVX-512 path would stop the run with an
# illegal instruction. Speed under emulation means nothing: this checks results only (the speed
# figures of the AVX2 path are bench/cpu.sh's, docs/benchmarks.md).
#
#   bench/test-avx2-only.sh               # install qemu-user if missing, build, run
#   bench/test-avx2-only.sh kernels       # another test filter for the library's unit tests
#
# Environment: INFDIT_SHARED_DIR (the parity vectors, default ../shared), SKIP_PARITY=1 to run the
# unit tests only (.ci/run does this), PARITY_FILTER (test-name filters for the parity tests, default
# `case_a_network`: the f32 network case on every path the emulated CPU has, avx2 and portable, and the
# bf16 / f16 case; each network case takes minutes of one core under emulation, each sampling case
# from half an hour to hours), JOBS (default 2), QEMU_X86_CPU (default Haswell, less the features
# qemu's TCG cannot emulate, which it would warn about on every thread).
# The test binaries are those of `cargo test --workspace` (built here if missing, else reused: a
# `-p infdit` build would resolve other features and compile everything again).
# Needs root (or qemu-user already installed) for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

FILTER=${1:-kernels}
JOBS=${JOBS:-2}
QEMU=(qemu-x86_64 -cpu "${QEMU_X86_CPU:-Haswell,-pcid,-x2apic,-tsc-deadline,-hle,-rtm,-invpcid}")

if ! command -v qemu-x86_64 >/dev/null; then
    echo "== installing qemu-user" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user
fi

# The library's unit-test binary and the parity-test binary of the workspace build, in one cargo run:
# progress and compiler errors on stderr, the artifacts as JSON on stdout. cargo's exit status is lost
# in the process substitution, so its build-finished message reports a failed build.
read -r LIB PARITY < <(cargo test -j "$JOBS" --workspace --locked --no-run \
        --message-format=json-render-diagnostics | python3 -c '
import json, sys
found = {"lib": "-", "parity": "-"}
built = False
for line in sys.stdin:
    m = json.loads(line)
    t = m.get("target", {})
    if m.get("reason") == "build-finished":
        built = m.get("success", False)
    elif m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        if t.get("name") == "infdit" and "lib" in t.get("kind", []):
            found["lib"] = m["executable"]
        elif t.get("name") == "parity" and "test" in t.get("kind", []):
            found["parity"] = m["executable"]
print(found["lib"] if built else "failed", found["parity"])
')
if [ "${LIB:-failed}" = failed ]; then
    echo "the workspace test build failed (cargo test --workspace --no-run)" >&2
    exit 1
fi
if [ "$LIB" = - ] || [ "$PARITY" = - ]; then
    echo "the workspace build has no unit-test binary of the infdit library or no parity-test binary" >&2
    exit 1
fi

# (a) the kernels' unit tests: every path the emulated CPU runs (avx2, portable)
echo "== unit tests ($FILTER) under ${QEMU[*]}" >&2
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
(cd crates/infdit && "${QEMU[@]}" "$LIB" "$FILTER" --nocapture) 2>&1 | tee "$LOG"
# kernels::tests prints the paths the detection found; without AVX-512 they must be these two.
if [[ $FILTER == kernels* ]] && ! grep -q "paths this CPU runs: \[Avx2, Portable\]" "$LOG"; then
    echo "the emulated CPU did not report exactly the avx2 and portable kernel paths" >&2
    exit 1
fi

# (b) the parity tests against the golden vectors on the path the detection picks (and every other
# the CPU has, for the tests that run each)
if [ "${SKIP_PARITY:-0}" != 1 ]; then
    echo "== parity tests (${PARITY_FILTER:-case_a_network})" >&2
    # shellcheck disable=SC2086 # the filter is one or more words: test names, `--skip NAME`
    (cd crates/infdit && "${QEMU[@]}" "$PARITY" ${PARITY_FILTER:-case_a_network} --nocapture)
fi
echo "AVX2-only tests passed"
