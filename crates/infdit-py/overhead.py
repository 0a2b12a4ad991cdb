"""The overhead of the Python package against the `infdit` command on the same image (built-in model).

    python crates/infdit-py/overhead.py INFDIT_BINARY IMAGE [REPEATS]

Times, each the median of REPEATS runs: the command (`infdit upscale IMAGE -o OUT --quiet`, a fresh
process) against a fresh Python process doing the same through `Upscaler().upscale_file`; then, in one
process with the model loaded, `upscale_file` against `upscale` of the decoded array (the conversion
cost), and the import and model load on their own.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def median_time(fn, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def main() -> None:
    binary, image = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    out = Path(tempfile.mkdtemp()) / "out.png"
    cli = lambda: subprocess.run([binary, "upscale", image, "-o", str(out), "--quiet"], check=True)
    code = f"import infdit; infdit.Upscaler().upscale_file({image!r}, {str(out)!r})"
    py = lambda: subprocess.run([sys.executable, "-c", code], check=True)
    for name, fn in (("cli process", cli), ("python process", py)):
        m, ts = median_time(fn, n)
        print(f"{name:>28}: median {m:.3f} s  ({', '.join(f'{t:.3f}' for t in ts)})")
    t = time.perf_counter()
    import infdit

    t_import = time.perf_counter() - t
    t = time.perf_counter()
    up = infdit.Upscaler()
    t_load = time.perf_counter() - t
    arr = infdit.imread(image)
    for name, fn in (
        ("upscale_file (in process)", lambda: up.upscale_file(image, out)),
        ("upscale(array) (in process)", lambda: up.upscale(arr)),
    ):
        m, ts = median_time(fn, n)
        print(f"{name:>28}: median {m:.3f} s  ({', '.join(f'{t:.3f}' for t in ts)})")
    print(f"{'import infdit':>28}: {t_import:.3f} s")
    print(f"{'Upscaler() (built-in)':>28}: {t_load:.3f} s")


if __name__ == "__main__":
    main()
