#!/usr/bin/env bash
# Validates docs/openapi.json against the OpenAPI specification (openapi-spec-validator from PyPI,
# installed into a venv on first use). Run by .ci/run.
#
#   crates/infdit-server/validate-openapi.sh [VENV]     # default target/openapi-venv
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${1:-target/openapi-venv}
if [ ! -x "$VENV/bin/openapi-spec-validator" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet openapi-spec-validator
fi
"$VENV/bin/openapi-spec-validator" docs/openapi.json
