#!/usr/bin/env bash
# `infdit serve` under a bounded load: N uploads (default 200) of 8x8 PNGs from 8 concurrent clients against a real
# server on 127.0.0.1 (2 workers, the built-in model, scale 2, 1 step), then waits until every job is done. Prints
# upload and GET latencies (p50/p95/max), throughput and the server's peak RSS (VmHWM). The test asserts that nothing
# is lost and memory stays bounded; the figures are printed, not asserted (docs/serve.md).
#   bench/serve-load.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
SERVE_LOAD_JOBS="${1:-200}" cargo test -p infdit-cli --test serve --locked -- \
    load_uploads_from_8_clients_are_all_accounted_for --nocapture 2>&1 | grep -E "serve load:|test result"
