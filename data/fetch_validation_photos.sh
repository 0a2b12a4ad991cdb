#!/usr/bin/env bash
# Fetch the photo validation set of bench/quality.sh: the files listed in data/validation_photos.txt, from
# their Debian packages, each checked against its SHA-256 (data/fetch_photo_list.sh does the work).
#
# Usage: data/fetch_validation_photos.sh [OUT_DIR]     (default: data/photos/validation_photos)
#
# These photos are kept out of training: data/fetch_debian_wallpapers.sh leaves every file with one of the
# listed SHA-256 sums out of its train split.
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "$SCRIPT_DIR/fetch_photo_list.sh" "$SCRIPT_DIR/validation_photos.txt" "${1:-$SCRIPT_DIR/photos/validation_photos}"
