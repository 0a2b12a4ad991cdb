"""infdit: the Inf-DiT diffusion-transformer image upscaler (Rust, candle) for Python.

>>> import numpy as np, infdit
>>> up = infdit.Upscaler()                      # the built-in model, on the CPU
>>> lr = np.zeros((32, 32, 3), np.uint8)
>>> up.upscale(lr, steps=1).shape               # 4x, same dtype and channels as given
(128, 128, 3)

Images are NumPy arrays (H x W x 3 or 4; uint8, uint16, or float32 in [0, 1]) or PIL images; the
result has the type, sample type and channels of the input. The GIL is released while the model
runs (threads may share one Upscaler), ``progress(done, total)`` is called as blocks finish, and
Ctrl-C stops a run at the next block batch with ``KeyboardInterrupt``. Errors are the typed
exceptions of this module (``InputError``, ``OptionError``, ``ModelError``, ...), with the words
the ``infdit`` command prints.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np

from . import _infdit
from ._errors import (
    Cancelled,
    ResumeError,
    InfditError,
    InputError,
    IoError,
    ModelError,
    NumericalError,
    OptionError,
    OutputError,
    TooLargeError,
)

__all__ = [
    "Upscaler",
    "eval",
    "imread",
    "cpu_kernels",
    "InfditError",
    "InputError",
    "TooLargeError",
    "OptionError",
    "ModelError",
    "OutputError",
    "IoError",
    "NumericalError",
    "Cancelled",
    "ResumeError",
    "MAX_PIXELS",
]

#: The default largest input, in pixels (as the ``infdit`` command's ``--max-pixels``).
MAX_PIXELS = 64 << 20

_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))

PathLike = Union[str, "os.PathLike[str]"]
Progress = Callable[[int, int], Any]


def _is_pil(image: Any) -> bool:
    return type(image).__module__.startswith("PIL.") and hasattr(image, "mode") and hasattr(image, "size")


def _as_array(image: Any, max_pixels: int) -> Tuple[np.ndarray, Optional[str]]:
    """A C-contiguous H x W x 3|4 array of a supported dtype, and the PIL mode to give back (or None)."""
    mode = None
    if _is_pil(image):
        if image.mode not in ("RGB", "RGBA"):
            has_alpha = image.mode in ("LA", "PA", "RGBa", "La") or (
                image.mode == "P" and "transparency" in image.info
            )
            image = image.convert("RGBA" if has_alpha else "RGB")
        mode = image.mode
        w, h = image.size
        if w * h > max_pixels:
            raise TooLargeError(f"the image is {w} x {h} = {w * h} pixels, above the limit of {max_pixels} (max_pixels)")
        image = np.asarray(image)
    if not isinstance(image, np.ndarray):
        raise InputError(f"an image is a NumPy array or a PIL image, not {type(image).__name__}")
    if image.dtype not in _DTYPES:
        raise InputError(f"an image array is uint8, uint16 or float32 (in [0, 1]), not {image.dtype}")
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise InputError(f"an image array is H x W x 3 (RGB) or H x W x 4 (RGBA), got shape {image.shape}")
    h, w = int(image.shape[0]), int(image.shape[1])
    if h == 0 or w == 0:
        raise InputError(f"an image array needs at least one pixel, got shape {image.shape}")
    if h * w > max_pixels:
        # Checked before the copy below, which a broadcast (zero-stride) array would make huge.
        raise TooLargeError(f"the image is {w} x {h} = {h * w} pixels, above the limit of {max_pixels} (max_pixels)")
    return np.ascontiguousarray(image), mode


def _opts(**kw: Any) -> Dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


def _check_progress(progress: Optional[Progress]) -> None:
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable as progress(done, total), not {type(progress).__name__}")


class Upscaler:
    """A loaded model, ready to upscale any number of images with any options.

    ``model``: a checkpoint file (the official ``.pt`` or safetensors) or a model folder
    (``model.safetensors`` + ``config.json``); ``None`` is the small model built into the library.
    ``config``: the model's config file (``None``: the folder's, or the released config).
    ``clip``: separate CLIP weights for a checkpoint without its CLIP tower.
    ``device``: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (a GPU that cannot be used falls back to the CPU;
    see :attr:`device`). ``dtype``: ``"f32"``, ``"bf16"`` or ``"f16"``; ``None`` is f32 on the CPU and
    bf16 on a GPU. Loading errors raise :class:`ModelError` (or :class:`IoError`).

    One Upscaler may be used from several threads at once.
    """

    def __init__(
        self,
        model: Optional[PathLike] = None,
        config: Optional[PathLike] = None,
        clip: Optional[PathLike] = None,
        device: str = "cpu",
        dtype: Optional[str] = None,
    ) -> None:
        self._inner = _infdit.Upscaler(model, config, clip, device, dtype)

    @property
    def device(self) -> str:
        """Where the model runs (with the reason when a GPU was asked for and the CPU is used)."""
        return self._inner.device

    @property
    def dtype(self) -> str:
        """The network's dtype: ``"f32"``, ``"bf16"`` or ``"f16"``."""
        return self._inner.dtype

    def upscale(
        self,
        image: Any,
        scale: Optional[float] = None,
        width: Optional[int] = None,
        height: Optional[int] = None,
        seed: int = 0,
        steps: Optional[int] = None,
        alpha: str = "bicubic",
        progress: Optional[Progress] = None,
        *,
        background: Optional[Tuple[int, int, int]] = None,
        sigma_max: Optional[float] = None,
        crop: str = "pad",
        block_batch: Optional[int] = None,
        whole_image: bool = False,
        max_memory: Optional[int] = None,
        max_pixels: int = MAX_PIXELS,
        ensemble: Optional[int] = None,
    ) -> Any:
        """Upscales an image in memory and returns the result, of the input's kind.

        ``image``: an H x W x 3 (RGB) or H x W x 4 (RGBA) NumPy array of uint8, uint16 or float32
        samples in [0, 1] (any strides: it is copied to C order), or a PIL image (other modes are
        converted to RGB or RGBA). The result has the same type, sample type and channels.

        The output size: ``scale`` (default 4; any factor above 0: x4 and x2 model passes, then an
        exact resize), or ``width`` and/or ``height`` (one alone keeps the aspect ratio).
        ``seed``: the noise seed. ``steps``: sampler steps (``None``: the model's default).
        ``alpha``: how an alpha channel is upscaled: ``"bicubic"``, ``"model"`` (as a gray image, doubling
        the model time) or ``"drop"`` (composited on ``background``, white by default; RGB out).
        ``progress``: called as ``progress(done, total)`` in block evaluations, from the calling thread;
        an exception it raises stops the run and is raised here. Ctrl-C raises ``KeyboardInterrupt``
        at the next block batch. ``crop="official"`` is the official centre crop (x4 or x2 only);
        ``block_batch``, ``whole_image``, ``max_memory`` (bytes) and ``max_pixels`` as the CLI's flags.
        ``ensemble``: 1, 2, 4 or 8 runs on mirrored and transposed inputs, averaged (the
        self-ensemble; that many times the time; ``None``: the model's own setting, the built-in
        model's 2, else 1).
        """
        _check_progress(progress)
        arr, mode = _as_array(image, max_pixels)
        opts = _opts(
            scale=scale,
            width=width,
            height=height,
            seed=seed,
            steps=steps,
            alpha=alpha,
            background=background,
            sigma_max=sigma_max,
            crop=crop,
            block_batch=block_batch,
            whole_image=whole_image,
            max_memory=max_memory,
            max_pixels=max_pixels,
            ensemble=ensemble,
        )
        out = self._inner.upscale(arr, opts, progress)
        if mode is None:
            return out
        from PIL import Image

        return Image.fromarray(out)  # uint8 H x W x 3 or 4: RGB or RGBA

    def upscale_file(
        self,
        src: PathLike,
        dst: PathLike,
        scale: Optional[float] = None,
        width: Optional[int] = None,
        height: Optional[int] = None,
        seed: int = 0,
        steps: Optional[int] = None,
        alpha: str = "bicubic",
        progress: Optional[Progress] = None,
        *,
        background: Optional[Tuple[int, int, int]] = None,
        sigma_max: Optional[float] = None,
        crop: str = "pad",
        block_batch: Optional[int] = None,
        whole_image: bool = False,
        max_memory: Optional[int] = None,
        max_pixels: int = MAX_PIXELS,
        ensemble: Optional[int] = None,
        noise: Optional[PathLike] = None,
        rounding: str = "nearest",
        strip_metadata: bool = False,
        jpeg_quality: int = 95,
    ) -> Dict[str, Any]:
        """Upscales the image file ``src`` into ``dst``, as ``infdit upscale SRC -o DST`` does.

        Every check that can be made before the model runs is made first (options, sizes, memory,
        the output's format, folder and permissions; a missing output folder is made); the input's
        ICC profile and EXIF are carried over unless ``strip_metadata``, 16-bit samples are kept
        where the format holds them, and the write is atomic (``dst`` appears whole or not at all).
        Options as :meth:`upscale`, plus ``noise`` (a safetensors file with the initial noise
        ``eps``, one model pass only), ``rounding`` (``"nearest"``, or ``"truncate"`` as the official
        script) and ``jpeg_quality``. Returns the plan that ran (as :meth:`dry_run`).
        """
        _check_progress(progress)
        opts = _opts(
            scale=scale,
            width=width,
            height=height,
            seed=seed,
            steps=steps,
            alpha=alpha,
            background=background,
            sigma_max=sigma_max,
            crop=crop,
            block_batch=block_batch,
            whole_image=whole_image,
            max_memory=max_memory,
            max_pixels=max_pixels,
            ensemble=ensemble,
            noise=None if noise is None else os.fspath(noise),
            rounding=rounding,
            strip_metadata=strip_metadata,
            jpeg_quality=jpeg_quality,
        )
        return self._inner.upscale_file(os.fspath(src), os.fspath(dst), opts, progress)

    def dry_run(
        self,
        image: Any,
        dst: Optional[PathLike] = None,
        scale: Optional[float] = None,
        width: Optional[int] = None,
        height: Optional[int] = None,
        steps: Optional[int] = None,
        alpha: str = "bicubic",
        *,
        background: Optional[Tuple[int, int, int]] = None,
        crop: str = "pad",
        block_batch: Optional[int] = None,
        whole_image: bool = False,
        max_memory: Optional[int] = None,
        max_pixels: int = MAX_PIXELS,
        ensemble: Optional[int] = None,
    ) -> Dict[str, Any]:
        """The plan of an upscale, with every check made before the model runs; nothing runs.

        ``image``: an array or PIL image (its size and channels are used), or a file path; with a
        path, ``dst`` is required and the output checks of :meth:`upscale_file` are made too (no
        folder is created). Returns a dict: ``input`` and ``output`` (width, height), ``passes``
        (the model passes' factors), ``alpha``, ``alpha_passes``, ``work`` (block evaluations, the
        progress total), ``memory`` (bytes of the largest pass), ``steps``, ``evaluations`` and
        ``resize``; for a file, also ``holds_16_bits``. Errors as the run would raise them.
        """
        opts = _opts(
            scale=scale,
            width=width,
            height=height,
            steps=steps,
            alpha=alpha,
            background=background,
            crop=crop,
            block_batch=block_batch,
            whole_image=whole_image,
            max_memory=max_memory,
            max_pixels=max_pixels,
            ensemble=ensemble,
        )
        if isinstance(image, (str, os.PathLike)):
            if dst is None:
                raise TypeError("dry_run of a file needs dst, the output path")
            return self._inner.dry_run_file(os.fspath(image), os.fspath(dst), opts)
        if _is_pil(image):
            w, h = image.size
            has_alpha = "A" in image.mode or (image.mode == "P" and "transparency" in image.info)
        elif isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] not in (3, 4):
                raise InputError(f"an image array is H x W x 3 (RGB) or H x W x 4 (RGBA), got shape {image.shape}")
            h, w, has_alpha = int(image.shape[0]), int(image.shape[1]), image.shape[2] == 4
        else:
            raise InputError(f"an image is a NumPy array, a PIL image or a path, not {type(image).__name__}")
        if h * w > max_pixels:
            raise TooLargeError(f"the image is {w} x {h} = {h * w} pixels, above the limit of {max_pixels} (max_pixels)")
        return self._inner.dry_run(w, h, has_alpha, opts)


def imread(path: PathLike, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file as the library reads it (EXIF orientation applied): H x W x 3 or 4, uint16 for
    16-bit and float files, else uint8. Raises :class:`InputError` naming the file and the problem."""
    return _infdit.imread(os.fspath(path), max_pixels)


def cpu_kernels() -> str:
    """The CPU kernel path this process runs, with the instructions beyond it that its kernels use:
    ``"avx512 (bf16 dot product, AMX tiles)"``, ``"avx2"``, ``"neon"`` or ``"portable"`` (the environment
    variable ``INFDIT_KERNELS``, read once when the first kernel runs, forces one)."""
    return _infdit.cpu_kernels()


def _rgb8(image: Any, what: str) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        image = imread(image)
    arr, _ = _as_array(image, 1 << 62)
    if arr.dtype == np.uint16:
        arr = np.round(arr[..., :3].astype(np.float64) / 257.0).astype(np.uint8)
    elif arr.dtype == np.float32:
        if np.isnan(arr).any():
            raise InputError(f"{what}: NaN in the image")
        arr = np.round(np.clip(arr[..., :3].astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])


def eval(restored: Any, reference: Any, crop_border: int = 4, block: int = 128) -> Dict[str, Optional[float]]:
    """The metrics of ``infdit eval`` for one pair of images: ``{"psnr_y": dB, "ssim_y": ..., "seam":
    ... or None}``. PSNR-Y and SSIM-Y compare ``restored`` with ``reference`` (the BasicSR Y channel,
    ``crop_border`` pixels cropped on each side; identical images give ``inf``); the seam score is
    of ``restored`` for ``block``-px blocks (``None`` without an interior block border). The images
    are arrays, PIL images or paths, compared as 8-bit RGB (alpha ignored)."""
    a, b = _rgb8(restored, "restored"), _rgb8(reference, "reference")
    if a.shape != b.shape:
        raise InputError(
            f"image sizes differ: {a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]}"
        )
    return _infdit.eval(a, b, crop_border, block)
