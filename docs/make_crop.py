"""Side-by-side crop for the model card: [LR (nearest, 4x) | bicubic | model | (peers...) | HR] from the files that
`infdit eval --out-dir DIR` writes.

Usage: python3 docs/make_crop.py DIR STEM X Y SIZE OUT.png [--peer PEER.png]...

Each --peer is another upscaler's 4x output of the same LR image (bench/quality.sh passes ESRGAN-thick's); its
crop goes between the model's and the original."""
import sys
from PIL import Image

args = sys.argv[1:]
peers = []
while "--peer" in args:
    i = args.index("--peer")
    if i + 1 >= len(args):
        sys.exit("--peer needs a file")
    peers.append(args[i + 1])
    del args[i : i + 2]
if len(args) != 6:
    sys.exit(__doc__)
d, stem, x, y, size, out = args[0], args[1], *map(int, args[2:5]), args[5]
box = (x, y, x + size, y + size)
lr = Image.open(f"{d}/{stem}_lr.png").crop((x // 4, y // 4, (x + size) // 4, (y + size) // 4)).resize((size, size), Image.NEAREST)
paths = [f"{d}/{stem}_bicubic.png", f"{d}/{stem}.png", *peers, f"{d}/{stem}_hr.png"]
tiles = [lr] + [Image.open(p).convert("RGB").crop(box) for p in paths]
canvas = Image.new("RGB", (len(tiles) * size + (len(tiles) - 1) * 4, size), (255, 255, 255))
for i, t in enumerate(tiles):
    canvas.paste(t, (i * (size + 4), 0))
canvas.save(out)
