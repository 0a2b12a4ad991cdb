#!/usr/bin/env python3
"""Writes a deterministic smooth RGB test PNG of W x H pixels (standard library only)."""
import math
import struct
import sys
import zlib


def main() -> None:
    w, h, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    rows = bytearray()
    for y in range(h):
        rows.append(0)
        for x in range(w):
            r = int(127.5 + 120 * math.sin(x * 0.05) * math.cos(y * 0.03))
            g = int(127.5 + 120 * math.sin((x + y) * 0.02))
            b = (x * 7 + y * 3) % 256
            rows += bytes((r, g, b))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(bytes(rows), 6)) + chunk(b"IEND", b"")
    with open(out, "wb") as f:
        f.write(png)


if __name__ == "__main__":
    main()
