"""Side-by-side crop for the model card: [LR (nearest, 4x) | bicubic | model | HR] from the files that
`infdit eval --out-dir DIR` writes. Usage: python3 docs/make_crop.py DIR STEM X Y SIZE OUT.png"""
import sys
from PIL import Image

d, stem, x, y, size, out = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), sys.argv[6]
box = (x, y, x + size, y + size)
lr = Image.open(f"{d}/{stem}_lr.png").crop((x // 4, y // 4, (x + size) // 4, (y + size) // 4)).resize((size, size), Image.NEAREST)
tiles = [lr] + [Image.open(f"{d}/{stem}{s}.png").convert("RGB").crop(box) for s in ("_bicubic", "", "_hr")]
canvas = Image.new("RGB", (4 * size + 3 * 4, size), (255, 255, 255))
for i, t in enumerate(tiles):
    canvas.paste(t, (i * (size + 4), 0))
canvas.save(out)
