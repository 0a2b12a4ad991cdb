#!/usr/bin/env python3
"""Reference implementation of infdit's image-quality metrics (crates/infdit/src/metrics/).

PSNR-Y and SSIM-Y follow BasicSR 1.4.2 (`basicsr/metrics/psnr_ssim.py`: `calculate_psnr` and
`calculate_ssim` with `test_y_channel=True`, `input_order='HWC'`) statement for statement, with one
deliberate change: the images are RGB (not cv2's BGR), so `to_y_channel` uses BasicSR's `rgb2ycbcr`
coefficients (R 65.481, G 128.553, B 24.966) instead of `bgr2ycbcr`'s reversed order. The dtypes are
BasicSR's: u8 -> float32 / 255 -> float64 dot -> + 16 -> / 255 -> float32 -> * 255 (float32) -> float64.

SSIM's `cv2.getGaussianKernel(11, 1.5)` and `cv2.filter2D(...)[5:-5, 5:-5]` are reimplemented in plain
numpy (the kernel with the formula of OpenCV's getGaussianKernelBitExact, the filter as a direct 11x11
correlation over the valid region), so only numpy is needed. With `--check-cv2` the script also runs
the original cv2 calls and prints the differences (pip install numpy opencv-python-headless).

The seam score is infdit's own metric; the definition is the one documented in
crates/infdit/src/metrics/seam.rs and is repeated in `seam_score` below.

Usage:
    python3 tools/metrics_reference.py            # (re)writes the test PNGs, prints the reference values
    python3 tools/metrics_reference.py --check-cv2
The PNGs go to crates/infdit/tests/data/metrics/ (written with a minimal stdlib PNG encoder, so the
bytes are deterministic); the printed values are the ones recorded in crates/infdit/tests/metrics.rs.
"""

import argparse
import math
import os
import struct
import sys
import zlib

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(REPO, "crates", "infdit", "tests", "data", "metrics")


# ----------------------------------------------------------------------------------------------
# BasicSR (1.4.2) PSNR / SSIM, RGB input.
# ----------------------------------------------------------------------------------------------

def rgb2ycbcr_y(img):
    """BasicSR `rgb2ycbcr(img, y_only=True)` for a float32 image in [0, 1] (the only case used)."""
    assert img.dtype == np.float32
    img_type = img.dtype
    img = img.astype(np.float32)  # _convert_input_type_range (float32: unchanged)
    out_img = np.dot(img, [65.481, 128.553, 24.966]) + 16.0
    out_img /= 255.  # _convert_output_type_range(out_img, np.float32)
    return out_img.astype(img_type)


def to_y_channel(img):
    """BasicSR `metric_util.to_y_channel`, RGB order."""
    img = img.astype(np.float32) / 255.
    if img.ndim == 3 and img.shape[2] == 3:
        img = rgb2ycbcr_y(img)
        img = img[..., None]
    return img * 255.


def gaussian_kernel_cv2(n=11, sigma=1.5):
    """`cv2.getGaussianKernel(n, sigma)` (sigma > 0) as OpenCV's getGaussianKernelBitExact computes
    it, in float64: x runs over 1-n, 3-n, ... (twice the offset), t = exp(x*x * (-0.125 / sigma^2)),
    the centre weight is 1, sum = 2*sum(t) + 1, every weight is multiplied by 1/sum."""
    sigma_x = float(sigma)
    scale2x = -0.125 / (sigma_x * sigma_x)
    n2 = (n - 1) // 2
    values = []
    s = 0.0
    x = 1 - n
    for _ in range(n2):
        t = math.exp(float(x * x) * scale2x)
        values.append(t)
        s += t
        x += 2
    s *= 2.0
    s += 1.0
    if n % 2 == 0:
        s += 1.0
    mul1 = 1.0 / s
    out = [0.0] * n
    for i in range(n2):
        out[i] = out[n - 1 - i] = values[i] * mul1
    out[n2] = 1.0 * mul1
    if n % 2 == 0:
        out[n2 + 1] = out[n2]
    return np.array(out, dtype=np.float64).reshape(n, 1)


def filter2d_valid(img, window):
    """`cv2.filter2D(img, -1, window)[r:-r, r:-r]` for a float64 image and an odd square window
    (a correlation; the border mode does not matter in the valid region)."""
    k = window.shape[0]
    h, w = img.shape
    out = np.zeros((h - k + 1, w - k + 1), dtype=np.float64)
    for i in range(k):
        for j in range(k):
            out += window[i, j] * img[i:i + h - k + 1, j:j + w - k + 1]
    return out


def _ssim(img, img2, use_cv2=False):
    """BasicSR `_ssim` (one channel, float64, range [0, 255])."""
    c1 = (0.01 * 255)**2
    c2 = (0.03 * 255)**2
    if use_cv2:
        import cv2
        kernel = cv2.getGaussianKernel(11, 1.5)
        window = np.outer(kernel, kernel.transpose())

        def filt(x):
            return cv2.filter2D(x, -1, window)[5:-5, 5:-5]
    else:
        kernel = gaussian_kernel_cv2(11, 1.5)
        window = np.outer(kernel, kernel.transpose())

        def filt(x):
            return filter2d_valid(x, window)

    mu1 = filt(img)
    mu2 = filt(img2)
    mu1_sq = mu1**2
    mu2_sq = mu2**2
    mu1_mu2 = mu1 * mu2
    sigma1_sq = filt(img**2) - mu1_sq
    sigma2_sq = filt(img2**2) - mu2_sq
    sigma12 = filt(img * img2) - mu1_mu2

    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    return ssim_map.mean()


def calculate_psnr(img, img2, crop_border, test_y_channel=True):
    """BasicSR `calculate_psnr`, HWC uint8 RGB."""
    assert img.shape == img2.shape, (f'Image shapes are different: {img.shape}, {img2.shape}.')
    if crop_border != 0:
        img = img[crop_border:-crop_border, crop_border:-crop_border, ...]
        img2 = img2[crop_border:-crop_border, crop_border:-crop_border, ...]
    if test_y_channel:
        img = to_y_channel(img)
        img2 = to_y_channel(img2)
    img = img.astype(np.float64)
    img2 = img2.astype(np.float64)
    mse = np.mean((img - img2)**2)
    if mse == 0:
        return float('inf')
    return 10. * np.log10(255. * 255. / mse)


def calculate_ssim(img, img2, crop_border, test_y_channel=True, use_cv2=False):
    """BasicSR `calculate_ssim`, HWC uint8 RGB."""
    assert img.shape == img2.shape, (f'Image shapes are different: {img.shape}, {img2.shape}.')
    if crop_border != 0:
        img = img[crop_border:-crop_border, crop_border:-crop_border, ...]
        img2 = img2[crop_border:-crop_border, crop_border:-crop_border, ...]
    if test_y_channel:
        img = to_y_channel(img)
        img2 = to_y_channel(img2)
    img = img.astype(np.float64)
    img2 = img2.astype(np.float64)
    ssims = []
    for i in range(img.shape[2]):
        ssims.append(_ssim(img[..., i], img2[..., i], use_cv2=use_cv2))
    return np.array(ssims).mean()


# ----------------------------------------------------------------------------------------------
# Seam score (infdit).
# ----------------------------------------------------------------------------------------------

SEAM_OFFSETS = (4, 8, 12)


def _positions(n, block):
    """Border positions k*block (k >= 1, < n) and the reference positions b +- d (d in 4, 8, 12) that
    lie in [1, n) and are not borders themselves (a set: each position counted once)."""
    borders = list(range(block, n, block))
    refs = set()
    for b in borders:
        for d in SEAM_OFFSETS:
            for p in (b - d, b + d):
                if 1 <= p < n and p % block != 0:
                    refs.add(p)
    return borders, sorted(refs)


def seam_score(img, block):
    """Seam score of an HWC uint8 RGB image, on the BasicSR Y channel (float64).

    g_col(x) = |Y[:, x] - Y[:, x-1]| (all rows), g_row(y) = |Y[y, :] - Y[y-1, :]| (all columns).
    seam = mean of {g_col(x) : x border column} U {g_row(y) : y border row}
         / mean of {g_col(x) : x reference column} U {g_row(y) : y reference row}
    (pooled means over all samples). None without an interior border or without a reference position;
    a zero denominator gives 1.0 when the numerator is zero too, inf otherwise."""
    y = to_y_channel(img)[..., 0].astype(np.float64)
    h, w = y.shape
    if block == 0:
        return None
    bc, rc = _positions(w, block)
    br, rr = _positions(h, block)
    if not bc and not br:
        return None
    if not rc and not rr:
        return None

    def col_grads(cols):
        return [np.abs(y[:, c] - y[:, c - 1]) for c in cols]

    def row_grads(rows):
        return [np.abs(y[r, :] - y[r - 1, :]) for r in rows]

    num = np.concatenate(col_grads(bc) + row_grads(br))
    den = np.concatenate(col_grads(rc) + row_grads(rr))
    n, d = num.mean(), den.mean()
    if d == 0:
        return 1.0 if n == 0 else float('inf')
    return float(n / d)


# ----------------------------------------------------------------------------------------------
# Deterministic test images and a minimal PNG writer.
# ----------------------------------------------------------------------------------------------

def write_png(path, img):
    """8-bit RGB, non-interlaced, the Sub filter (type 1) on every row, zlib level 9: deterministic
    bytes, about 2.5x smaller than unfiltered for these smooth images."""
    h, w, c = img.shape
    assert c == 3 and img.dtype == np.uint8
    rows = img.reshape(h, w * c).astype(np.int16)
    sub = rows.copy()
    sub[:, c:] = rows[:, c:] - rows[:, :-c]
    sub = (sub % 256).astype(np.uint8)
    raw = b"".join(b"\x01" + sub[r].tobytes() for r in range(h))

    def chunk(tag, data):
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xffffffff)

    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9))
    png += chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def smooth_image(h, w, phase):
    """A smooth colour pattern in [20, 235] (low-frequency sines), float64 HWC."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 70 * np.sin(xx / 9.0 + phase) * np.cos(yy / 13.0) + 20 * np.sin((xx + yy) / 21.0)
    g = 120 + 60 * np.cos(xx / 17.0 - yy / 11.0 + phase) + 0.15 * (xx - w / 2)
    b = 110 + 80 * np.sin(yy / 7.0 + phase) * np.sin(xx / 23.0) - 0.1 * (yy - h / 2)
    return np.clip(np.stack([r, g, b], axis=-1), 20, 235)


def make_pairs():
    """(name, gt, sr) pairs: gt a smooth pattern rounded to u8; sr = gt + Gaussian noise (and, for the
    160x130 pair, a +6 step on the bottom-right 128-px block borders, an artificial seam)."""
    rng = np.random.default_rng(20240611)
    pairs = []

    gt = smooth_image(48, 64, 0.3)
    sr = gt + rng.normal(0.0, 4.0, gt.shape)
    pairs.append(("small", np.round(gt).astype(np.uint8), np.clip(np.round(sr), 0, 255).astype(np.uint8)))

    gt = smooth_image(130, 160, 1.1)
    sr = gt + rng.normal(0.0, 2.5, gt.shape)
    sr[:, 128:, :] += 6.0
    sr[128:, :, :] -= 5.0
    pairs.append(("tile", np.round(gt).astype(np.uint8), np.clip(np.round(sr), 0, 255).astype(np.uint8)))
    return pairs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check-cv2", action="store_true", help="also run cv2's kernel/filter2D and compare")
    ap.add_argument("--no-write", action="store_true", help="do not (re)write the PNGs")
    args = ap.parse_args()

    pairs = make_pairs()
    if not args.no_write:
        os.makedirs(DATA_DIR, exist_ok=True)
        for name, gt, sr in pairs:
            write_png(os.path.join(DATA_DIR, f"{name}_gt.png"), gt)
            write_png(os.path.join(DATA_DIR, f"{name}_sr.png"), sr)

    if args.check_cv2:
        import cv2
        k_np = gaussian_kernel_cv2(11, 1.5)
        k_cv = cv2.getGaussianKernel(11, 1.5)
        print(f"# cv2 {cv2.__version__}: gaussian kernel max |numpy - cv2| = {np.abs(k_np - k_cv).max():.3e}")
        for name, gt, sr in pairs:
            back = cv2.imread(os.path.join(DATA_DIR, f"{name}_sr.png"), cv2.IMREAD_COLOR)[..., ::-1]
            assert np.array_equal(back, sr), f"{name}: PNG round trip differs"

    print("# name, crop_border: psnr_y, ssim_y")
    for name, gt, sr in pairs:
        for crop in (0, 4):
            p = calculate_psnr(sr, gt, crop)
            s = calculate_ssim(sr, gt, crop)
            line = f"{name} crop={crop}: psnr_y = {float(p)!r}, ssim_y = {float(s)!r}"
            if args.check_cv2:
                s_cv = calculate_ssim(sr, gt, crop, use_cv2=True)
                line += f"  (cv2 ssim {float(s_cv)!r}, diff {abs(s - s_cv):.3e})"
            print(line)
    print("# name, image, block: seam_score")
    for name, gt, sr in pairs:
        for block in (16, 32, 128):
            for which, img in (("gt", gt), ("sr", sr)):
                print(f"{name}_{which} block={block}: seam = {seam_score(img, block)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
