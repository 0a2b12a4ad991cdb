"""The infdit Python package, as installed from its wheel: arrays, PIL images, files, errors,
progress, cancellation, threads and parity with the official code."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import infdit


def test_imported_from_an_installed_wheel_not_the_source_tree():
    # The suite must run against the wheel (site-packages), never an in-place build.
    assert "site-packages" in infdit.__file__, infdit.__file__
    assert Path(infdit._infdit.__file__).suffix in (".so", ".pyd")


def gradient(h, w, c, dtype):
    """A smooth test image of shape h x w x c with samples of dtype."""
    y, x = np.mgrid[0:h, 0:w]
    planes = [x / max(w - 1, 1), y / max(h - 1, 1), (x + y) / max(h + w - 2, 1), 1.0 - x / max(w - 1, 1)]
    a = np.stack(planes[:c], axis=-1)
    if dtype == np.uint8:
        return np.round(a * 255).astype(np.uint8)
    if dtype == np.uint16:
        return np.round(a * 65535).astype(np.uint16)
    return a.astype(np.float32)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("channels", [3, 4])
def test_every_dtype_and_channel_count(up, dtype, channels):
    img = gradient(16, 24, channels, dtype)
    out = up.upscale(img, steps=1)
    assert out.dtype == np.dtype(dtype)
    assert out.shape == (64, 96, channels)
    assert out.flags.c_contiguous
    f = out.astype(np.float64) / {np.uint8: 255.0, np.uint16: 65535.0, np.float32: 1.0}[dtype]
    assert f.min() >= 0.0 and f.max() <= 1.0
    # The upscale of a gradient follows it: the mean colour is kept within a few levels.
    src = img.astype(np.float64) / {np.uint8: 255.0, np.uint16: 65535.0, np.float32: 1.0}[dtype]
    assert abs(f[..., :3].mean() - src[..., :3].mean()) < 0.05
    if channels == 4:
        # The alpha plane is the bicubic upscale of the input's: its mean is kept closely.
        assert abs(f[..., 3].mean() - src[..., 3].mean()) < 0.01


def test_sample_types_agree(up):
    # The same picture as uint8, uint16 and float32 gives the same image, up to quantisation.
    u8 = gradient(16, 16, 3, np.uint8)
    a = up.upscale(u8, steps=1).astype(np.float64) / 255
    b = up.upscale(u8.astype(np.uint16) * 257, steps=1).astype(np.float64) / 65535
    c = up.upscale(u8.astype(np.float32) / 255, steps=1).astype(np.float64)
    assert np.abs(a - b).max() <= 1 / 255 + 1e-6
    assert np.abs(b - c).max() <= 1e-4


def test_array_path_equals_the_file_path(up, tmp_path, parity):
    # An array through upscale() gives the very bytes upscale_file() writes for the same PNG.
    src = parity / "case_a_lr.png"
    dst = tmp_path / "out.png"
    up.upscale_file(src, dst, steps=1, seed=5)
    from_file = infdit.imread(dst)
    from_array = up.upscale(infdit.imread(src), steps=1, seed=5)
    assert from_array.dtype == np.uint8 and from_file.shape == from_array.shape
    assert np.array_equal(from_file, from_array)


def test_seed_and_size_options(up):
    img = gradient(16, 16, 3, np.uint8)
    a, b, c = (up.upscale(img, steps=1, seed=s) for s in (1, 1, 2))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert up.upscale(img, scale=2, steps=1).shape == (32, 32, 3)
    assert up.upscale(img, width=40, steps=1).shape == (40, 40, 3)
    assert up.upscale(img, width=20, height=30, steps=1).shape == (30, 20, 3)
    assert up.upscale(img, scale=1.5, steps=1).shape == (24, 24, 3)


def test_ensemble_averages_transformed_runs(up):
    img = gradient(16, 24, 3, np.uint8)
    one, two = (up.upscale(img, ensemble=n) for n in (1, 2))
    assert one.shape == two.shape == (64, 96, 3)
    assert not np.array_equal(one, two)
    # The pair's second run is the anti-transposed input, mapped back: the mean of the two runs,
    # rounded to 8 bits (one level for the rounding of each).
    anti = np.ascontiguousarray(np.transpose(img, (1, 0, 2))[::-1, ::-1])
    back = np.transpose(up.upscale(anti, ensemble=1)[::-1, ::-1], (1, 0, 2)).astype(np.float64)
    assert np.abs((one.astype(np.float64) + back) / 2 - two).max() <= 1.0
    assert up.dry_run(img, ensemble=4)["work"] == 4 * up.dry_run(img, ensemble=1)["work"]
    # The built-in model's own setting is the default.
    assert up.dry_run(img)["work"] == up.dry_run(img, ensemble=2)["work"]


def test_alpha_modes(up):
    img = gradient(16, 16, 4, np.uint8)
    assert up.upscale(img, steps=1, alpha="drop").shape == (64, 64, 3)
    assert up.upscale(img, steps=1, alpha="model").shape == (64, 64, 4)
    with pytest.raises(infdit.OptionError, match="alpha"):
        up.upscale(img, steps=1, alpha="sideways")


def test_pil_images_in_and_out(up):
    Image = pytest.importorskip("PIL.Image")
    for mode, c in (("RGB", 3), ("RGBA", 4)):
        im = Image.fromarray(gradient(16, 16, c, np.uint8))
        out = up.upscale(im, steps=1)
        assert isinstance(out, Image.Image) and out.mode == mode and out.size == (64, 64)
        assert np.array_equal(np.asarray(out), up.upscale(np.asarray(im), steps=1))
    gray = Image.fromarray(gradient(16, 16, 3, np.uint8)).convert("L")
    assert up.upscale(gray, steps=1).mode == "RGB"


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a[::-1],  # negative stride
        lambda a: a[:, ::-1, :],
        lambda a: np.asfortranarray(a),  # non-contiguous
        lambda a: np.pad(a, ((0, 0), (0, 16), (0, 0)))[:, ::2],  # strided view
    ],
    ids=["rows-reversed", "columns-reversed", "fortran", "strided"],
)
def test_any_strides_give_the_contiguous_result(up, make):
    base = gradient(16, 32, 3, np.uint8)
    view = make(base)
    assert not view.flags.c_contiguous
    want = up.upscale(np.ascontiguousarray(view), steps=1)
    assert np.array_equal(up.upscale(view, steps=1), want)


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((16, 16), np.uint8), "H x W x 3"),
        (np.zeros((16, 16, 2), np.uint8), "H x W x 3"),
        (np.zeros((16, 16, 5), np.float32), "H x W x 3"),
        (np.zeros((1, 16, 16, 3), np.uint8), "H x W x 3"),
        (np.zeros((0, 16, 3), np.uint8), "at least one pixel"),
        (np.zeros((16, 16, 3), np.float64), "float64"),
        (np.zeros((16, 16, 3), np.int32), "int32"),
        ([[[0, 0, 0]]], "NumPy array"),
        ("not an image", "NumPy array"),
    ],
)
def test_bad_arrays_raise_input_error(up, image, match):
    with pytest.raises(infdit.InputError, match=match):
        up.upscale(image, steps=1)


def test_nan_is_refused_with_its_position(up):
    img = np.full((16, 16, 3), 0.5, np.float32)
    img[3, 7, 1] = np.nan
    with pytest.raises(infdit.InputError, match=r"NaN in channel 1 at pixel \(row 3, column 7\)"):
        up.upscale(img, steps=1)
    rgba = np.full((16, 16, 4), 0.5, np.float32)
    rgba[2, 2, 3] = np.nan
    with pytest.raises(infdit.InputError, match="NaN in the alpha channel"):
        up.upscale(rgba, steps=1)
    # Infinities are clamped as a float file's samples are.
    img[3, 7, 1] = np.inf
    assert up.upscale(img, steps=1).shape == (64, 64, 3)


def test_huge_sizes_are_refused_before_any_copy(up):
    # 100 000 x 100 000 pixels of a broadcast (zero-stride) array: refused without the 30 GB copy.
    huge = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (100_000, 100_000, 3))
    t = time.perf_counter()
    with pytest.raises(infdit.TooLargeError, match="max_pixels"):
        up.upscale(huge)
    assert time.perf_counter() - t < 1.0
    img = gradient(16, 16, 3, np.uint8)
    with pytest.raises(infdit.TooLargeError, match="largest supported side"):
        up.upscale(img, scale=1e7)
    with pytest.raises(infdit.TooLargeError):
        up.upscale(img, width=4_000_000_000 // 2)
    with pytest.raises(infdit.TooLargeError, match="max_pixels"):
        up.upscale(img, max_pixels=100)
    # TooLargeError is an InputError and a ValueError.
    assert issubclass(infdit.TooLargeError, infdit.InputError)
    assert issubclass(infdit.InputError, ValueError)


def test_bad_options_raise_option_error_naming_the_option(up):
    img = gradient(16, 16, 3, np.uint8)
    cases = [
        (dict(steps=0), "steps: 0 sampler steps: give 1 to 10000"),
        (dict(scale=-1.0), "target"),
        (dict(scale=float("nan")), "target"),
        (dict(scale=2.0, width=10), "scale"),
        (dict(block_batch=0), "block_batch"),
        (dict(crop="official", scale=3.0), "crop"),
        (dict(crop="diagonal"), "crop"),
        (dict(background=(0, 0, 0)), "background"),
        (dict(ensemble=3), "ensemble: 3: give 1, 2, 4 or 8 runs"),
    ]
    for kw, words in cases:
        with pytest.raises(infdit.OptionError, match=words):
            up.upscale(img, **kw)
    with pytest.raises(TypeError):
        up.upscale(img, steps="many")
    with pytest.raises(TypeError, match="progress"):
        up.upscale(img, progress=42)


def test_model_errors(tmp_path, parity):
    with pytest.raises(infdit.ModelError, match="needs a checkpoint"):
        infdit.Upscaler(config=parity / "config.json")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(infdit.ModelError, match="junk.safetensors"):
        infdit.Upscaler(model=junk, config=parity / "config.json")
    with pytest.raises(infdit.OptionError, match="device"):
        infdit.Upscaler(device="tpu")
    with pytest.raises(infdit.OptionError, match="dtype"):
        infdit.Upscaler(dtype="int4")
    with pytest.raises(infdit.InfditError):
        infdit.Upscaler(model=tmp_path / "missing.pt", config=parity / "config.json")


def test_file_errors(up, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png at all")
    with pytest.raises(infdit.InputError, match="junk.png"):
        up.upscale_file(junk, tmp_path / "out.png", steps=1)
    with pytest.raises(infdit.InfditError, match="missing.png"):
        up.upscale_file(tmp_path / "missing.png", tmp_path / "out.png", steps=1)
    with pytest.raises(infdit.InputError, match="junk.png"):
        infdit.imread(junk)


def test_upscale_file_writes_atomically_with_16_bits_and_metadata(up, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    ImageCms = pytest.importorskip("PIL.ImageCms")
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = tmp_path / "in.png"
    Image.fromarray(gradient(16, 16, 3, np.uint8)).save(src, icc_profile=icc)
    dst = tmp_path / "deep" / "out.png"
    seen = []
    plan = up.upscale_file(src, dst, steps=1, progress=lambda d, t: seen.append((d, t)))
    assert plan["output"] == (64, 64) and plan["passes"] == [4]
    assert seen[0] == (0, plan["work"]) and seen[-1] == (plan["work"], plan["work"])
    with Image.open(dst) as im:
        assert im.size == (64, 64)
        assert im.info.get("icc_profile") == icc
    assert sorted(p.name for p in dst.parent.iterdir()) == ["out.png"]  # no temporary left
    # 16-bit in, 16-bit out.
    src16 = tmp_path / "in16.png"
    Image.fromarray(gradient(16, 16, 3, np.uint16)[..., 0]).save(src16)
    up.upscale_file(src16, tmp_path / "out16.png", steps=1)
    assert infdit.imread(tmp_path / "out16.png").dtype == np.uint16
    with pytest.raises(infdit.OutputError):
        up.upscale_file(src, tmp_path / "out.gif", steps=1)


def test_dry_run(up, tmp_path, parity):
    p = up.dry_run(gradient(16, 24, 4, np.uint8), steps=3)
    assert p["input"] == (24, 16) and p["output"] == (96, 64)
    assert p["passes"] == [4] and p["alpha"] == "bicubic" and p["steps"] == 3
    assert p["work"] > 0 and p["memory"] > 0
    # The built-in model's passes stay within the factor (no trained 2x mode): x8 is one x4 pass and
    # a 2x resize, x16 two x4 passes.
    assert up.dry_run(gradient(16, 16, 3, np.uint8), scale=8)["passes"] == [4]
    assert up.dry_run(gradient(16, 16, 3, np.uint8), scale=16)["passes"] == [4, 4]
    f = up.dry_run(parity / "case_a_lr.png", tmp_path / "x" / "out.png")
    assert f["output"] == (128, 128) and not (tmp_path / "x").exists()
    with pytest.raises(infdit.OutputError):
        up.dry_run(parity / "case_a_lr.png", tmp_path / "out.gif")
    with pytest.raises(infdit.TooLargeError):
        up.dry_run(gradient(16, 16, 3, np.uint8), max_memory=1)
    # The work of the plan is the total the progress callback counts to.
    seen = []
    up.upscale(gradient(16, 24, 3, np.uint8), steps=3, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (p["work"], p["work"])


def test_progress_is_called_from_the_calling_thread_with_rising_counts(up):
    calls = []
    up.upscale(
        gradient(32, 32, 3, np.uint8),
        steps=2,
        block_batch=1,
        progress=lambda d, t: calls.append((d, t, threading.get_ident())),
    )
    assert len(calls) > 2
    total = calls[0][1]
    assert calls[0][0] == 0 and calls[-1][0] == total
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))
    assert {c[2] for c in calls} == {threading.get_ident()}


def test_an_exception_in_the_callback_stops_the_run(up):
    calls = []

    def cb(done, total):
        calls.append(done)
        if len(calls) == 3:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        up.upscale(gradient(32, 32, 3, np.uint8), steps=5, block_batch=1, progress=cb)
    assert len(calls) == 3  # not called again after it raised
    assert calls[-1] < up.dry_run(gradient(32, 32, 3, np.uint8), steps=5)["work"]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT delivery")
def test_ctrl_c_stops_at_the_next_block_batch(up):
    # SIGINT from another thread while the model runs (GIL released): KeyboardInterrupt at the next
    # block batch, long before the run would end.
    img = gradient(32, 32, 3, np.uint8)
    total = up.dry_run(img, steps=20, block_batch=1)["work"]
    started = threading.Event()
    calls = []

    def cb(done, t):
        calls.append(done)
        if done > 0:
            started.set()

    def interrupt():
        started.wait(60)
        os.kill(os.getpid(), signal.SIGINT)

    th = threading.Thread(target=interrupt)
    th.start()
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        up.upscale(img, steps=20, block_batch=1, progress=cb)
    th.join()
    assert calls[-1] < total / 4, (calls[-1], total)
    # The upscaler is still usable afterwards.
    assert up.upscale(img, steps=1).shape == (128, 128, 3)
    assert time.perf_counter() - t0 < 120


def test_gil_is_released_while_the_model_runs(up):
    # Another Python thread keeps running (it needs the GIL) while upscale() works.
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.005)

    th = threading.Thread(target=ticker)
    th.start()
    try:
        t0 = time.perf_counter()
        up.upscale(gradient(32, 32, 3, np.uint8), steps=3)
        t1 = time.perf_counter()
    finally:
        stop.set()
        th.join()
    during = [t for t in ticks if t0 < t < t1]
    # At least one tick per 50 ms of the call on average (a held GIL gives none).
    assert len(during) >= max(2, int((t1 - t0) / 0.05)), (len(during), t1 - t0)


def test_two_threads_give_the_same_images_as_one_at_a_time(up):
    imgs = [gradient(16, 32, 3, np.uint8), gradient(32, 16, 4, np.uint16)]
    seq = [up.upscale(im, steps=2, seed=i) for i, im in enumerate(imgs)]
    par = [None, None]
    errors = []

    def work(i):
        try:
            par[i] = up.upscale(imgs[i], steps=2, seed=i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ths = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    assert not errors, errors
    for a, b in zip(seq, par):
        assert b is not None and a.dtype == b.dtype and np.array_equal(a, b)


def test_eval_metrics(parity):
    sr = infdit.imread(parity / "case_b_sr.png")
    same = infdit.eval(sr, parity / "case_b_sr.png")
    assert same["psnr_y"] == float("inf") and same["ssim_y"] == pytest.approx(1.0)
    assert same["seam"] is not None
    noisy = np.clip(sr.astype(np.int16) + 3, 0, 255).astype(np.uint8)
    m = infdit.eval(noisy, sr)
    assert 30 < m["psnr_y"] < 45 and 0.9 < m["ssim_y"] < 1.0
    with pytest.raises(infdit.InputError, match="image sizes differ"):
        infdit.eval(sr[:-4], sr)
    with pytest.raises(infdit.InputError, match="too small"):
        infdit.eval(sr[:8, :8], sr[:8, :8])


def test_parity_case_a_bit_for_bit(tmp_path, parity):
    # The official tiny model and noise give the official PNG, through Python (upscale_file).
    up = infdit.Upscaler(model=parity / "tiny.safetensors", config=parity / "config.json")
    out = tmp_path / "case_a_sr.png"
    up.upscale_file(parity / "case_a_lr.png", out, noise=parity / "case_a.safetensors", rounding="truncate")
    assert np.array_equal(infdit.imread(out), infdit.imread(parity / "case_a_sr.png"))


@pytest.mark.skipif(not os.environ.get("INFDIT_PY_SLOW"), reason="case b takes minutes on a dev build (INFDIT_PY_SLOW=1)")
def test_parity_case_b(tmp_path, parity):
    up = infdit.Upscaler(model=parity / "tiny.safetensors", config=parity / "config.json")
    out = tmp_path / "case_b_sr.png"
    up.upscale_file(parity / "case_b_lr.png", out, noise=parity / "case_b.safetensors", rounding="truncate")
    got, want = infdit.imread(out).astype(int), infdit.imread(parity / "case_b_sr.png").astype(int)
    d = np.abs(got - want)
    assert d.max() <= 1 and (d > 0).sum() <= 2, (d > 0).sum()


def test_types_check_with_mypy(tmp_path):
    # The package ships its annotations and the native module's stubs (py.typed): mypy checks calls.
    api = pytest.importorskip("mypy.api")
    ok = tmp_path / "ok.py"
    ok.write_text(
        "import numpy as np, infdit\n"
        "up = infdit.Upscaler(device='cpu')\n"
        "out = up.upscale(np.zeros((16, 16, 3), np.uint8), scale=2.0, steps=1, progress=lambda d, t: None)\n"
        "plan = up.dry_run(out)\n"
        "m = infdit.eval(out, out)\n"
        "err: type[infdit.InfditError] = infdit.TooLargeError\n"
        "kernels: str = infdit.cpu_kernels()\n"
    )
    out, err, code = api.run([str(ok), "--no-incremental", "--cache-dir", str(tmp_path / "c")])
    assert code == 0, out + err
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy as np, infdit\ninfdit.Upscaler().upscale(np.zeros((1, 1, 3)), steps='one')\n")
    out, err, code = api.run([str(bad), "--no-incremental", "--cache-dir", str(tmp_path / "c")])
    assert code == 1 and 'Argument "steps"' in out, out + err


def test_cpu_kernels_names_the_path_and_follows_infdit_kernels():
    # The process's path; INFDIT_KERNELS forces another in a fresh process (it is read once).
    import subprocess

    names = ("avx512", "avx2", "neon", "portable")
    assert infdit.cpu_kernels().split(" ")[0] in names, infdit.cpu_kernels()

    def forced(path):
        env = dict(os.environ, INFDIT_KERNELS=path)
        code = "import infdit; print(infdit.cpu_kernels())"
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)

    assert forced("portable").stdout.strip() == "portable"
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    if "avx2" in flags and "fma" in flags:
        assert forced("avx2").stdout.strip() == "avx2"
    if "avx512f" in flags:
        got = forced("avx512").stdout.strip()
        assert got.startswith("avx512"), got
        assert ("bf16 dot product" in got) == ("avx512_bf16" in flags), got
    # A path this CPU cannot run is clamped, with a note on stderr.
    if "asimd" not in flags:
        r = forced("neon")
        assert r.stdout.strip() != "neon" and "cannot run the neon kernels" in r.stderr, r.stderr
