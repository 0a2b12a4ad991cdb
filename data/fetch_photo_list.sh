#!/usr/bin/env bash
# Fetch a fixed list of photos from Debian packages: each file of LIST taken from its package (apt-get
# download + dpkg -x) and checked against its SHA-256. Used by data/fetch_validation_photos.sh (the photo
# validation set of bench/quality.sh) and data/fetch_train_photos.sh (the extra camera photos of the train split).
#
# Usage: data/fetch_photo_list.sh LIST OUT_DIR
#
# LIST: tab-separated lines `name package path-inside-the-package sha256 licence content` ('#' comments).
# Writes OUT_DIR/<name> for each listed file, OUT_DIR/LICENSES.tsv (name, package, version, licence, path)
# and OUT_DIR/COPYRIGHT.<package> (the package's Debian copyright file). Re-running is cheap: a file already
# present with the listed SHA-256 is not fetched again. A package whose file no longer matches its SHA-256
# (the archive moved on) is an error: the set is fixed, the list says what it is.
set -u -o pipefail

[ $# = 2 ] || { echo "usage: $0 LIST OUT_DIR" >&2; exit 2; }
LIST="$1"
OUT_DIR="$2"

for tool in apt-get apt-cache dpkg sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: '$tool' not found (Debian/Ubuntu host required)" >&2; exit 2; }
done
[ -f "$LIST" ] || { echo "error: $LIST not found" >&2; exit 2; }

mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# name<TAB>package<TAB>path<TAB>sha256<TAB>licence<TAB>content; '#' lines are comments.
entries="$WORK/entries.tsv"
grep -v '^#' "$LIST" | grep -v '^[[:space:]]*$' > "$entries"

ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -c1-64)" = "$2" ]; }

declare -A need=()
while IFS=$'\t' read -r name pkg path sum lic what; do
  ok "$OUT_DIR/$name" "$sum" || need["$pkg"]=1
done < "$entries"

failed=0
declare -A version=()
for pkg in "${!need[@]}"; do
  ver="$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')"
  if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then
    echo "error: package '$pkg' is not available from the configured Debian archive (run apt-get update?)" >&2
    failed=1; continue
  fi
  echo "fetch: $pkg $ver"
  mkdir -p "$WORK/$pkg/x"
  if ! (cd "$WORK/$pkg" && apt-get download -q "$pkg" >apt.log 2>&1); then
    echo "error: apt-get download $pkg failed:" >&2; tail -n 3 "$WORK/$pkg/apt.log" >&2
    failed=1; continue
  fi
  if ! dpkg -x "$(ls "$WORK/$pkg"/*.deb | head -n 1)" "$WORK/$pkg/x"; then
    echo "error: could not extract $pkg" >&2; failed=1; continue
  fi
  version["$pkg"]="$ver"
  cp "$WORK/$pkg/x/usr/share/doc/$pkg/copyright" "$OUT_DIR/COPYRIGHT.$pkg" 2>/dev/null \
    || echo "warning: $pkg has no usr/share/doc/$pkg/copyright" >&2
done

n=0
while IFS=$'\t' read -r name pkg path sum lic what; do
  if ! ok "$OUT_DIR/$name" "$sum"; then
    src="$WORK/$pkg/x/$path"
    if [ ! -f "$src" ]; then
      echo "error: $name: $path not in package $pkg" >&2; failed=1; continue
    fi
    got="$(sha256sum "$src" | cut -c1-64)"
    if [ "$got" != "$sum" ]; then
      echo "error: $name: $pkg's $path has SHA-256 $got, the list says $sum (package changed?)" >&2
      failed=1; continue
    fi
    cp "$(realpath "$src")" "$OUT_DIR/$name"
  fi
  n=$((n + 1))
done < "$entries"

{
  printf 'name\tpackage\tversion\tlicence\tpath\n'
  while IFS=$'\t' read -r name pkg path sum lic what; do
    ver="${version[$pkg]:-$(cat "$OUT_DIR/.version.$pkg" 2>/dev/null || echo unknown)}"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$pkg" "$ver" "$lic" "$path"
  done < "$entries"
} > "$OUT_DIR/LICENSES.tsv.new"
for pkg in "${!version[@]}"; do echo "${version[$pkg]}" > "$OUT_DIR/.version.$pkg"; done
mv "$OUT_DIR/LICENSES.tsv.new" "$OUT_DIR/LICENSES.tsv"

echo "photos: $n of $(wc -l < "$entries") present in $OUT_DIR"
[ "$failed" = 0 ] || { echo "error: some photos could not be fetched (see above)" >&2; exit 1; }
