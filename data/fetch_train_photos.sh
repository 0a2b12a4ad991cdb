#!/usr/bin/env bash
# Fetch the extra camera photos and photo textures of the train split: the files listed in
# data/train_photos.txt (CC0 / public-domain / BSD-3 images from Debian's python3-skimage and libjxl-testdata),
# each checked against its SHA-256 (data/fetch_photo_list.sh does the work). None of them is in a
# validation set; the one libjxl-testdata photo that is (flower.png) is not listed.
#
# Usage: data/fetch_train_photos.sh [OUT_DIR]     (default: data/photos/train_photos; train on it beside data/photos/train)
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "$SCRIPT_DIR/fetch_photo_list.sh" "$SCRIPT_DIR/train_photos.txt" "${1:-$SCRIPT_DIR/photos/train_photos}"
