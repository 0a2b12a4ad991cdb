"""Counts the samples that differ between two 8-bit PNGs of the same size, by difference; no dependencies
(numpy and PIL are not needed). Usage: python3 docs/png_diff.py OURS.png THEIRS.png (see docs/parity.md)."""
import struct, sys, zlib
from collections import Counter

def read_png(path):
    data = open(path, 'rb').read()
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    pos, idat, hdr = 8, b'', None
    while pos < len(data):
        n, kind = struct.unpack('>I4s', data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b'IHDR':
            hdr = struct.unpack('>IIBBBBB', body)
        elif kind == b'IDAT':
            idat += body
        pos += 12 + n
    w, h, depth, ctype, _, _, interlace = hdr
    assert depth == 8 and interlace == 0, hdr
    ch = {0: 1, 2: 3, 4: 2, 6: 4}[ctype]
    raw, stride, bpp = zlib.decompress(idat), w * ch, ch
    out, prev, i = bytearray(), bytearray(stride), 0
    for _ in range(h):
        f, line = raw[i], bytearray(raw[i + 1:i + 1 + stride]); i += 1 + stride
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if f == 1: line[x] = (line[x] + a) & 255
            elif f == 2: line[x] = (line[x] + b) & 255
            elif f == 3: line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c; pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pr = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[x] = (line[x] + pr) & 255
        out += line; prev = line
    return (w, h, ch), bytes(out)

(sa, a), (sb, b) = read_png(sys.argv[1]), read_png(sys.argv[2])
assert sa == sb, (sa, sb)
diff = Counter(x - y for x, y in zip(a, b) if x != y)
print(f"{sa[0]}x{sa[1]}x{sa[2]} = {len(a)} values; differing: {sum(diff.values())}; by difference (ours - theirs): {dict(sorted(diff.items()))}")
