#!/usr/bin/env bash
# Quality bench with a real peer (issue 15, item 3): bicubic, infdit's built-in model and UpscalerJS
# ESRGAN-thick x4 on the photo validation set, scored by the same code, in one table.
#
# NOT part of CI: it needs the npm registry (the first run installs UpscalerJS and tfjs into the npm folder)
# and the peer takes minutes per image (tfjs on wasm). Run it by hand:
#
#   bench/quality.sh                  # everything; prints the table, writes it to $OUT/table.md
#   bench/quality.sh --peer-only      # only make (or reuse) the peer's outputs, e.g. in the background
#
# Environment (defaults in brackets):
#   INFDIT      the infdit binary [target/release/infdit; built with cargo -j 2 if missing]
#   MODEL       extra model arguments for infdit eval, e.g. "--model DIR" or "--ensemble 1" [the built-in model with its
#               own ensemble setting: two runs averaged]
#   PHOTOS      the HR photos [data/photos/validation_photos; fetched by data/fetch_validation_photos.sh]
#   OUT         work folder [target/bench/quality]
#   NPM_DIR     where the npm packages are installed [target/bench/npm]
#   PEER_CACHE  the peer's outputs, keyed by the SHA-256 of the LR PNG [target/bench/esrgan-cache]
#   PEER_PRIO   prefix of the peer's node command ["nice -n 10"]; "chrt -f 10" for timing runs
#   EVAL_PRIO   prefix of the final infdit eval ["chrt -f 10" when that works (root), else none]
#   CROP        "STEM X Y SIZE" of the side-by-side picture ["plasma__Grey 640 48 192"]
#   PICTURE     where the side-by-side picture goes [$OUT/quality-sidebyside.png]
#
# Protocol: each photo's shorter side is resized to 1024 px (antialiased bicubic) and its centre 1024 x 1024
# taken (HR); the LR is its antialiased bicubic 4x downscale to 256 x 256, 8-bit (infdit eval --hr-size 1024
# writes both). All three methods get the same 8-bit LR PNG; infdit eval scores them all against the same HR
# (PSNR-Y / SSIM-Y with BasicSR's conventions, border 4; seam score at the model's block borders; flat-area
# deviation: mean |output - HR| in Y over the HR's flat areas, see infdit::metrics::flat).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
INFDIT="${INFDIT:-$ROOT/target/release/infdit}"
MODEL="${MODEL:-}"
PHOTOS="${PHOTOS:-$ROOT/data/photos/validation_photos}"
OUT="${OUT:-$ROOT/target/bench/quality}"
NPM_DIR="${NPM_DIR:-$ROOT/target/bench/npm}"
PEER_CACHE="${PEER_CACHE:-$ROOT/target/bench/esrgan-cache}"
PEER_PRIO="${PEER_PRIO:-nice -n 10}"
CROP="${CROP:-plasma__Grey 640 48 192}"
PICTURE="${PICTURE:-$OUT/quality-sidebyside.png}"
if [ -z "${EVAL_PRIO+x}" ]; then
  if chrt -f 10 true 2>/dev/null; then EVAL_PRIO="chrt -f 10"; else EVAL_PRIO=""; fi
fi
PEER_ONLY=0
[ "${1:-}" = "--peer-only" ] && PEER_ONLY=1

say() { echo "quality.sh: $*" >&2; }

# --- inputs -------------------------------------------------------------------------------------------
if [ ! -d "$PHOTOS" ] || [ -z "$(ls -A "$PHOTOS" 2>/dev/null)" ]; then
  say "fetching the validation photos"
  "$ROOT/data/fetch_validation_photos.sh" "$PHOTOS"
fi
if [ ! -x "$INFDIT" ]; then
  say "building infdit (release)"
  (cd "$ROOT" && cargo build --release -p infdit-cli -j 2)
fi
mapfile -t photos < <(find "$PHOTOS" -maxdepth 1 -type f \( -iname '*.png' -o -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.webp' \) | LC_ALL=C sort)
[ "${#photos[@]}" -gt 0 ] || { say "no photos in $PHOTOS"; exit 2; }
stems=()
for p in "${photos[@]}"; do b="$(basename "$p")"; stems+=("${b%.*}"); done

# The LR (and HR) crops: infdit eval writes them; skipped when all are there.
mkdir -p "$OUT/eval"
missing_lr=0
for s in "${stems[@]}"; do [ -f "$OUT/eval/${s}_lr.png" ] && [ -f "$OUT/eval/${s}_hr.png" ] || missing_lr=1; done
if [ "$missing_lr" = 1 ]; then
  say "making the HR/LR crops (infdit eval --hr-size 1024)"
  # shellcheck disable=SC2086
  "$INFDIT" eval --hr "${photos[@]}" --hr-size 1024 --out-dir "$OUT/eval" $MODEL >/dev/null
fi

# --- the peer: UpscalerJS ESRGAN-thick x4 on tfjs-backend-wasm ---------------------------------------
if [ ! -d "$NPM_DIR/node_modules/@upscalerjs/esrgan-thick" ] || [ ! -d "$NPM_DIR/node_modules/pngjs" ] \
   || [ ! -d "$NPM_DIR/node_modules/@tensorflow/tfjs-backend-wasm" ]; then
  say "installing UpscalerJS, tfjs 4.11 (wasm) and pngjs into $NPM_DIR"
  command -v npm >/dev/null || { say "npm not found (node 20 + npm needed)"; exit 2; }
  mkdir -p "$NPM_DIR"
  (cd "$NPM_DIR" && { [ -f package.json ] || npm init -y >/dev/null; } \
     && npm install --no-audit --no-fund upscaler@1.0.0 @upscalerjs/esrgan-thick@1.0.0 \
          @tensorflow/tfjs@4.11.0 @tensorflow/tfjs-backend-wasm@4.11.0 pngjs@7.0.0 >&2)
fi
mkdir -p "$PEER_CACHE" "$OUT/esrgan-thick"
todo=()
for s in "${stems[@]}"; do
  key="$(sha256sum "$OUT/eval/${s}_lr.png" | cut -c1-64)"
  [ -f "$PEER_CACHE/$key.png" ] && [ -f "$PEER_CACHE/$key.seconds" ] || todo+=("$s")
done
if [ "${#todo[@]}" -gt 0 ]; then
  say "ESRGAN-thick on ${#todo[@]} image(s) (a few minutes each); outputs cached in $PEER_CACHE"
  tmp="$OUT/esrgan-run"; rm -rf "$tmp"; mkdir -p "$tmp/in"
  for s in "${todo[@]}"; do cp "$OUT/eval/${s}_lr.png" "$tmp/in/$s.png"; done
  # One image at a time so that each lands in the cache as soon as it is done.
  for s in "${todo[@]}"; do
    # shellcheck disable=SC2086
    line="$(NODE_PATH="$NPM_DIR/node_modules" $PEER_PRIO node "$ROOT/bench/esrgan_upscale.cjs" "$tmp/out" "$tmp/in/$s.png")"
    secs="$(printf '%s\n' "$line" | sed -n 's/.*"seconds":\([0-9.eE+-]*\).*/\1/p')"
    key="$(sha256sum "$tmp/in/$s.png" | cut -c1-64)"
    cp "$tmp/out/$s.png" "$PEER_CACHE/$key.png.partial" && mv "$PEER_CACHE/$key.png.partial" "$PEER_CACHE/$key.png"
    echo "$secs" > "$PEER_CACHE/$key.seconds"
    say "  $s: ${secs} s"
  done
  rm -rf "$tmp"
fi
# The peer's folder for infdit eval --peer: <stem>.png, and times.tsv (stem, seconds).
: > "$OUT/esrgan-thick/times.tsv"
for s in "${stems[@]}"; do
  key="$(sha256sum "$OUT/eval/${s}_lr.png" | cut -c1-64)"
  cp "$PEER_CACHE/$key.png" "$OUT/esrgan-thick/$s.png"
  printf '%s\t%s\n' "$s" "$(cat "$PEER_CACHE/$key.seconds")" >> "$OUT/esrgan-thick/times.tsv"
done
[ "$PEER_ONLY" = 1 ] && { say "peer outputs ready in $OUT/esrgan-thick"; exit 0; }

# --- one table ----------------------------------------------------------------------------------------
say "scoring (infdit eval --peer esrgan-thick=...; model timed${EVAL_PRIO:+ under $EVAL_PRIO})"
# shellcheck disable=SC2086
$EVAL_PRIO "$INFDIT" eval --hr "${photos[@]}" --hr-size 1024 --out-dir "$OUT/eval" $MODEL \
  --peer "esrgan-thick=$OUT/esrgan-thick" > "$OUT/eval.txt"
# The comparison table is the last section of eval's output.
sed -n '/^## comparison/,$p' "$OUT/eval.txt" | tee "$OUT/table.md"

# --- side-by-side crop --------------------------------------------------------------------------------
if python3 -c 'import PIL' 2>/dev/null; then PY=python3; elif /usr/bin/python3 -c 'import PIL' 2>/dev/null; then PY=/usr/bin/python3; else PY=""; fi
if [ -n "$PY" ]; then
  read -r cstem cx cy csize <<< "$CROP"
  "$PY" "$ROOT/docs/make_crop.py" "$OUT/eval" "$cstem" "$cx" "$cy" "$csize" "$PICTURE" \
    --peer "$OUT/esrgan-thick/$cstem.png"
  say "side-by-side picture: $PICTURE"
else
  say "no PIL: side-by-side picture skipped (apt-get install python3-pil)"
fi
