#!/usr/bin/env bash
# The Python package's CI: builds the dev-profile wheel with maturin, installs it into a fresh virtual
# environment (never an in-place import) and runs the pytest suite against it. Needs python3 (3.9+) with
# venv, and pip access to maturin, numpy, pytest and pillow. Run from anywhere; ../shared holds the parity vectors.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
BUILD=target/py-build-venv
TEST=target/py-test-venv
WHEELS=target/py-wheels

if [ ! -x "$BUILD/bin/maturin" ]; then
    "$PY" -m venv "$BUILD"
    "$BUILD/bin/pip" install -q "maturin>=1.9,<2"
fi
rm -rf "$WHEELS" "$TEST"
start=$(date +%s)
"$BUILD/bin/maturin" build --profile dev --locked -m crates/infdit-py/Cargo.toml --out "$WHEELS" --interpreter "$PY"
echo "wheel built in $(( $(date +%s) - start )) s: $(ls -l "$WHEELS"/*.whl | awk '{print $5, $9}')"

"$PY" -m venv "$TEST"
"$TEST/bin/pip" install -q "$WHEELS"/*.whl pytest pillow mypy
# From outside the source tree, so that `import infdit` can only find the installed wheel.
cd crates/infdit-py/tests
"../../../$TEST/bin/python" -m pytest -q -p no:cacheprovider "$@" .
