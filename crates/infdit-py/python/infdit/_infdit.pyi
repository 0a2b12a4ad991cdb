"""Type stubs of the native module (the public API is ``infdit``; see its ``__init__``)."""

from typing import Any, Callable, Dict, Optional

import numpy as np

BUILTIN_LABEL: str

class Upscaler:
    def __init__(
        self,
        model: Optional[str] = None,
        config: Optional[str] = None,
        clip: Optional[str] = None,
        device: str = "cpu",
        dtype: Optional[str] = None,
    ) -> None: ...
    @property
    def device(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    def upscale(
        self,
        image: np.ndarray,
        opts: Optional[Dict[str, Any]] = None,
        progress: Optional[Callable[[int, int], Any]] = None,
    ) -> np.ndarray: ...
    def upscale_file(
        self,
        src: str,
        dst: str,
        opts: Optional[Dict[str, Any]] = None,
        progress: Optional[Callable[[int, int], Any]] = None,
    ) -> Dict[str, Any]: ...
    def dry_run(
        self, width: int, height: int, has_alpha: bool = False, opts: Optional[Dict[str, Any]] = None
    ) -> Dict[str, Any]: ...
    def dry_run_file(self, src: str, dst: str, opts: Optional[Dict[str, Any]] = None) -> Dict[str, Any]: ...

def eval(restored: np.ndarray, reference: np.ndarray, crop_border: int = 4, block: int = 128) -> Dict[str, Optional[float]]: ...
def imread(path: str, max_pixels: int = ...) -> np.ndarray: ...
def cpu_kernels() -> str: ...
