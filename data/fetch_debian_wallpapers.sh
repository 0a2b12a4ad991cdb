#!/usr/bin/env bash
# Fetch training photos for infdit from Debian wallpaper/background packages.
#
# Usage: data/fetch_debian_wallpapers.sh [OUT_DIR]        (default: data/photos)
#   env PACKAGES="pkg1 pkg2"   override the package list
#   env MIN_SIDE=512           minimum shorter side in pixels
#   env MAKE_VALIDATION=1      (re)write data/validation.txt (every 10th image)
# Files whose SHA-256 is listed in data/validation_photos.txt (bench/quality.sh's photo validation set) are
# kept out of the train split.
#
# Only Debian's own archive is used (apt-get download + dpkg -x); no other
# network access. Re-running is idempotent: a package whose OUT_DIR/<pkg>/.done
# stamp matches the candidate version is skipped without downloading.
set -u -o pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT_DIR="${1:-$SCRIPT_DIR/photos}"
VALIDATION_LIST="$SCRIPT_DIR/validation.txt"
PHOTO_LIST="$SCRIPT_DIR/validation_photos.txt"
MIN_SIDE="${MIN_SIDE:-512}"
PACKAGES="${PACKAGES:-mate-backgrounds plasma-workspace-wallpapers ukui-wallpapers gnome-backgrounds lomiri-wallpapers}"

for tool in apt-get apt-cache dpkg dpkg-deb python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: '$tool' not found (Debian/Ubuntu host required)" >&2; exit 2; }
done

mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# --- helper: select images, dedupe, copy; licence parsing -------------------
cat > "$WORK/helper.py" <<'PY'
import hashlib, os, re, shutil, struct, sys

def image_size(path):
    """Return (w, h) for PNG/JPEG/WebP using only the stdlib, or None."""
    try:
        with open(path, 'rb') as f:
            head = f.read(32)
            if head[:8] == b'\x89PNG\r\n\x1a\n' and head[12:16] == b'IHDR':
                return struct.unpack('>II', head[16:24])
            if head[:4] == b'RIFF' and head[8:12] == b'WEBP':
                chunk = head[12:16]
                f.seek(12); data = f.read(30)
                if chunk == b'VP8 ':
                    w, h = struct.unpack('<HH', data[14:18]); return (w & 0x3fff, h & 0x3fff)
                if chunk == b'VP8L':
                    b = data[9:13]; v = int.from_bytes(b, 'little')
                    return ((v & 0x3fff) + 1, ((v >> 14) & 0x3fff) + 1)
                if chunk == b'VP8X':
                    w = int.from_bytes(data[12:15], 'little') + 1
                    h = int.from_bytes(data[15:18], 'little') + 1
                    return (w, h)
                return None
            if head[:2] == b'\xff\xd8':
                f.seek(2)
                while True:
                    b = f.read(1)
                    if not b: return None
                    if b != b'\xff': continue
                    m = f.read(1)
                    while m == b'\xff': m = f.read(1)
                    if not m: return None
                    mk = m[0]
                    if mk in (0xd8, 0x01) or 0xd0 <= mk <= 0xd7: continue
                    ln = struct.unpack('>H', f.read(2))[0]
                    if mk in (0xc0,0xc1,0xc2,0xc3,0xc5,0xc6,0xc7,0xc9,0xca,0xcb,0xcd,0xce,0xcf):
                        d = f.read(5); h, w = struct.unpack('>HH', d[1:5]); return (w, h)
                    f.seek(ln - 2, 1)
    except (OSError, struct.error):
        return None
    return None

EXTS = ('.jpg', '.jpeg', '.png', '.webp')
RES_NAME = re.compile(r'^(\d+)x(\d+)\.[a-z]+$', re.I)

def select(root, dest, min_side):
    """Copy qualifying images from extracted tree `root` into `dest`.
    Flattened name: path below usr/share/<dir>/ joined with '__'.
    Same content (symlinks, duplicates) kept once. Directories holding one
    wallpaper at several resolutions (Plasma's contents/images/WxH.png) keep
    only the largest, so the same picture cannot land in train and validation."""
    cands = []
    for dp, dns, fns in os.walk(root):
        for fn in fns:
            p = os.path.join(dp, fn)
            if not fn.lower().endswith(EXTS) or not os.path.isfile(p):
                continue
            sz = image_size(p)
            if not sz or min(sz) < min_side:
                continue
            cands.append((p, sz))
    bydir = {}
    for p, sz in cands:
        if RES_NAME.match(os.path.basename(p)):
            d = os.path.dirname(p)
            if d not in bydir or sz[0]*sz[1] > bydir[d][1][0]*bydir[d][1][1]:
                bydir[d] = (p, sz)
    keep = [(p, sz) for p, sz in cands
            if not RES_NAME.match(os.path.basename(p)) or bydir[os.path.dirname(p)][0] == p]
    seen, n = set(), 0
    os.makedirs(dest, exist_ok=True)
    for p, sz in sorted(keep):
        real = os.path.realpath(p)
        h = hashlib.sha256(open(real, 'rb').read()).hexdigest()
        if h in seen:
            continue
        seen.add(h)
        rel = os.path.relpath(p, root).split(os.sep)
        if rel[:2] == ['usr', 'share'] and len(rel) > 3:
            rel = rel[3:]
        rel = [c for c in rel if c not in ('contents', 'images')] or rel
        name = '__'.join(rel).replace(' ', '_')
        base, ext = os.path.splitext(name)
        out, i = os.path.join(dest, name), 1
        while os.path.exists(out):
            out = os.path.join(dest, f'{base}_{i}{ext}'); i += 1
        shutil.copyfile(real, out)
        n += 1
    print(n)

KNOWN = ['GPL-2+', 'GPL-2', 'GPL-3+', 'GPL-3', 'LGPL-2.1+', 'LGPL-2.1', 'LGPL-3+', 'LGPL-3',
         'CC-BY-SA-4.0', 'CC-BY-SA-3.0', 'CC-BY-SA-2.0', 'CC-BY-4.0', 'CC-BY-3.0', 'CC-BY-2.0',
         'CC0-1.0', 'public-domain', 'MIT', 'BSD-3-clause', 'BSD-2-clause', 'Expat', 'Apache-2.0']

def licenses(path):
    txt = open(path, encoding='utf-8', errors='replace').read()
    found = []
    for m in re.finditer(r'^License:\s*(.+)$', txt, re.M):
        for part in re.split(r'\s+(?:or|and)\s+|\s*,\s*', m.group(1).strip()):
            if part and part not in found:
                found.append(part)
    if not found:  # not machine-readable (no DEP-5 'License:' fields): scan the prose
        for k in KNOWN:
            if re.search(r'(?<![\w-])' + re.escape(k) + r'(?![\w+-])', txt) and k not in found:
                found.append(k)
        flat = re.sub(r'\s+', ' ', txt)
        for m in re.finditer(r'GNU (Lesser |Library )?General Public License,? (?:as published by the Free Software Foundation; )?(?:either )?version (\d(?:\.\d)?)( of the License, or \(at your option\) any later)?', flat):
            k = ('LGPL-' if m.group(1) else 'GPL-') + m.group(2) + ('+' if m.group(3) else '')
            if k not in found:
                found.append(k)
        for m in re.finditer(r'Creative Commons Attribution(?:[- ]Share ?Alike)? (\d\.\d)', flat):
            k = ('CC-BY-SA-' if re.search('share ?alike', m.group(0), re.I) else 'CC-BY-') + m.group(1)
            if k not in found:
                found.append(k)
    print(','.join(found) if found else 'UNKNOWN')

if __name__ == '__main__':
    if sys.argv[1] == 'select':
        select(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1] == 'licenses':
        licenses(sys.argv[2])
PY

failed=()
for pkg in $PACKAGES; do
  ver="$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')"
  if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then
    echo "error: package '$pkg' is not available from the configured Debian archive (run apt-get update?)" >&2
    failed+=("$pkg"); continue
  fi
  dest="$OUT_DIR/$pkg"
  if [ -f "$dest/.done" ] && [ "$(cat "$dest/.done")" = "$ver" ]; then
    echo "skip: $pkg $ver already present ($(find "$dest" -maxdepth 1 -type f ! -name '.done' ! -name COPYRIGHT | wc -l) images)"
    continue
  fi
  echo "fetch: $pkg $ver"
  pdir="$WORK/$pkg"; mkdir -p "$pdir/x"
  if ! (cd "$pdir" && apt-get download -q "$pkg" >"$pdir/apt.log" 2>&1); then
    echo "error: apt-get download $pkg failed:" >&2; tail -n 3 "$pdir/apt.log" >&2
    failed+=("$pkg"); continue
  fi
  deb="$(ls "$pdir"/*.deb 2>/dev/null | head -n 1)"
  if [ -z "$deb" ] || ! dpkg -x "$deb" "$pdir/x"; then
    echo "error: could not extract $pkg" >&2; failed+=("$pkg"); continue
  fi
  rm -rf "$dest"; mkdir -p "$dest"
  n="$(python3 "$WORK/helper.py" select "$pdir/x" "$dest" "$MIN_SIDE")" || { echo "error: image selection failed for $pkg" >&2; failed+=("$pkg"); continue; }
  copyright="$pdir/x/usr/share/doc/$pkg/copyright"
  if [ -f "$copyright" ]; then
    cp "$copyright" "$dest/COPYRIGHT"
  else
    echo "warning: $pkg has no usr/share/doc/$pkg/copyright" >&2
  fi
  echo "$ver" > "$dest/.done"
  echo "  $n images (shorter side >= $MIN_SIDE px) -> $dest"
  rm -rf "$pdir"
done

# --- LICENSES.tsv (rebuilt from whatever packages are present) -------------
{
  printf 'package\tversion\tlicenses\n'
  for d in "$OUT_DIR"/*/; do
    pkg="$(basename "$d")"
    [ -f "$d/.done" ] || continue
    lic=UNKNOWN; [ -f "$d/COPYRIGHT" ] && lic="$(python3 "$WORK/helper.py" licenses "$d/COPYRIGHT")"
    printf '%s\t%s\t%s\n' "$pkg" "$(cat "$d/.done")" "$lic"
  done
} > "$OUT_DIR/LICENSES.tsv"

# --- train/validation split -------------------------------------------------
# All images, relative to OUT_DIR, sorted bytewise.
all_list="$WORK/all.txt"
( cd "$OUT_DIR" && for d in */; do
    d="${d%/}"; case "$d" in train|validation) continue;; esac
    [ -f "$d/.done" ] || continue
    find "$d" -maxdepth 1 -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' -o -iname '*.webp' \)
  done ) | LC_ALL=C sort > "$all_list"

if [ "${MAKE_VALIDATION:-0}" = 1 ] || [ ! -f "$VALIDATION_LIST" ]; then
  python3 - "$all_list" "$VALIDATION_LIST" <<'PY'
import sys
files = [l.strip() for l in open(sys.argv[1]) if l.strip()]
n = len(files)
step = max(1, min(10, n // 8)) if n else 1          # ~10 %, at least 8 files
val = [f for i, f in enumerate(files) if i % step == step - 1]
open(sys.argv[2], 'w').write(''.join(f + '\n' for f in val))
print(f"wrote {sys.argv[2]}: {len(val)} of {n} images (every {step}th in sorted order)")
PY
fi

rm -rf "$OUT_DIR/train" "$OUT_DIR/validation"
mkdir -p "$OUT_DIR/train" "$OUT_DIR/validation"
ntrain=0; nval=0; nheld=0; missing=0
declare -A isval=()
while IFS= read -r f; do [ -n "$f" ] && isval["$f"]=1; done < "$VALIDATION_LIST"
# The photo validation set of bench/quality.sh (data/validation_photos.txt, 4th column: SHA-256) never
# goes into train: a file with one of those contents is held out of both splits (unless validation.txt
# lists it, then it stays in validation).
declare -A isphoto=()
if [ -f "$PHOTO_LIST" ]; then
  while IFS=$'\t' read -r _ _ _ sum _; do [ -n "${sum:-}" ] && isphoto["$sum"]=1; done < <(grep -v '^#' "$PHOTO_LIST")
fi
while IFS= read -r f; do
  if [ -n "${isval[$f]:-}" ]; then split=validation; nval=$((nval+1));
  elif [ -n "${isphoto[$(sha256sum "$OUT_DIR/$f" | cut -c1-64)]:-}" ]; then nheld=$((nheld+1)); continue;
  else split=train; ntrain=$((ntrain+1)); fi
  mkdir -p "$OUT_DIR/$split/$(dirname "$f")"
  ln "$OUT_DIR/$f" "$OUT_DIR/$split/$f" 2>/dev/null || cp "$OUT_DIR/$f" "$OUT_DIR/$split/$f"
done < "$all_list"
for f in "${!isval[@]}"; do
  [ -f "$OUT_DIR/$f" ] || { echo "warning: validation entry not present: $f" >&2; missing=$((missing+1)); }
done
echo "split: $ntrain train, $nval validation (hard links under $OUT_DIR/train and $OUT_DIR/validation), $nheld held out (photo validation set, data/validation_photos.txt)"
[ "$missing" -gt 0 ] && echo "warning: $missing validation entries missing (package not fetched?)" >&2
echo "total size of images: $(cd "$OUT_DIR" && cat "$all_list" | tr '\n' '\0' | du -ch --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)"

if [ "${#failed[@]}" -gt 0 ]; then
  echo "error: these packages could not be fetched: ${failed[*]}" >&2
  exit 1
fi
echo "done: $OUT_DIR"
