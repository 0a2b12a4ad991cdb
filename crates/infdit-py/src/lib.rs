//! `infdit._infdit`, the native half of the `infdit` Python package: the library's [`Upscaler`]
//! over NumPy arrays and files, with the GIL released while the model runs, a progress callback,
//! Ctrl-C that stops a run at the next block batch, and library errors raised as the typed
//! exceptions of `infdit._errors`. The Python half (`python/infdit/__init__.py`) converts PIL
//! images, checks shapes and sizes before anything is copied, and documents the API.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use infdit::imageio::LoadedImage;
use infdit::upscale::{Event, ImagePlan, LoadOptions, NamedOptions, UpscaleOptions, Upscaler};
use infdit::{InfditError, ModelSpec};
use numpy::ndarray::Array3;
use numpy::{IntoPyArray, PyReadonlyArray3, PyUntypedArrayMethods};
use pyo3::exceptions::{PyKeyboardInterrupt, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

/// The allocator of the CLI (see its `main.rs`): the network makes a fresh tensor per op, and
/// kept pages halve the CPU time of a denoiser call against glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_t`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The exception of `infdit._errors` named `kind`, with `msg`.
fn raise(py: Python<'_>, kind: &str, msg: String) -> PyErr {
    let class = py.import("infdit._errors").and_then(|m| m.getattr(kind));
    match class.and_then(|c| c.call1((msg.clone(),))) {
        Ok(obj) => PyErr::from_value(obj),
        Err(e) => e,
    }
}

/// The exception class (in `infdit._errors`) of a library error.
fn kind_of(e: &InfditError) -> &'static str {
    match e {
        InfditError::Io { .. } => "IoError",
        InfditError::Config(_) | InfditError::Weights(_) | InfditError::MissingClip { .. } => "ModelError",
        InfditError::InvalidOption { .. } => "OptionError",
        InfditError::TooLarge(_) => "TooLargeError",
        InfditError::Output { .. } => "OutputError",
        InfditError::Image(_) | InfditError::ImageSize { .. } | InfditError::Noise { .. } => "InputError",
        InfditError::Resume { .. } | InfditError::DamagedState { .. } | InfditError::Locked { .. } => "ResumeError",
        InfditError::NonFinite(_) => "NumericalError",
        InfditError::Interrupted { .. } => "Cancelled",
        _ => "InfditError",
    }
}

/// A library error as its typed Python exception, with the library's (the CLI's) words.
fn to_py(py: Python<'_>, e: &InfditError) -> PyErr {
    raise(py, kind_of(e), e.to_string())
}

/// Converts a library result, attaching to the interpreter for the error.
fn lib<T>(py: Python<'_>, r: infdit::Result<T>) -> PyResult<T> {
    r.map_err(|e| to_py(py, &e))
}

/// A candle error (building or reading a tensor here) as `infdit.InfditError`.
fn tensor_err(py: Python<'_>, e: candle_core::Error) -> PyErr {
    to_py(py, &InfditError::Candle(e))
}

/// One option of the `opts` dict, converted; `None` when absent or `None`.
fn opt<'py, T: for<'a> FromPyObject<'a, 'py>>(d: &Bound<'py, PyDict>, key: &str) -> PyResult<Option<T>> {
    match d.get_item(key)? {
        Some(v) if !v.is_none() => v.extract::<T>().map(Some).map_err(|e| {
            let e: PyErr = e.into();
            PyTypeError::new_err(format!("{key}: {e}"))
        }),
        _ => Ok(None),
    }
}

/// The keys `options` understands besides the library's [`NamedOptions::NAMES`].
const PY_ONLY_KEYS: [&str; 2] = ["max_pixels", "noise"];

/// The library's options from the keyword arguments of a call: the names the library maps
/// ([`NamedOptions`], as the HTTP API does), plus `max_pixels` and `noise`.
fn options(py: Python<'_>, d: Option<&Bound<'_, PyDict>>) -> PyResult<UpscaleOptions> {
    let mut base = UpscaleOptions::default();
    let Some(d) = d else { return Ok(base) };
    for k in d.keys() {
        let k: String = k.extract()?;
        if !NamedOptions::NAMES.contains(&k.as_str()) && !PY_ONLY_KEYS.contains(&k.as_str()) {
            return Err(PyTypeError::new_err(format!("unexpected option '{k}'")));
        }
    }
    let jpeg_quality = match opt::<i64>(d, "jpeg_quality")? {
        Some(q) => Some(u8::try_from(q).map_err(|_| {
            to_py(py, &InfditError::InvalidOption { option: "jpeg_quality", reason: format!("{q} is not in 1..=100") })
        })?),
        None => None,
    };
    let named = NamedOptions {
        scale: opt(d, "scale")?,
        width: opt(d, "width")?,
        height: opt(d, "height")?,
        seed: opt(d, "seed")?,
        steps: opt(d, "steps")?,
        sigma_max: opt(d, "sigma_max")?,
        alpha: opt(d, "alpha")?,
        background: opt::<(u8, u8, u8)>(d, "background")?.map(|(r, g, b)| [r, g, b]),
        crop: opt(d, "crop")?,
        block_batch: opt(d, "block_batch")?,
        whole_image: opt(d, "whole_image")?,
        max_memory: opt(d, "max_memory")?,
        rounding: opt(d, "rounding")?,
        strip_metadata: opt(d, "strip_metadata")?,
        jpeg_quality,
        ensemble: opt(d, "ensemble")?,
    };
    if let Some(p) = opt(d, "max_pixels")? {
        base.max_pixels = p;
    }
    base.noise = opt::<PathBuf>(d, "noise")?;
    lib(py, named.apply(base))
}

/// What a run's event handler met: a Python exception to raise after the run (KeyboardInterrupt
/// from Ctrl-C, or one the progress callback raised).
struct Watch {
    cancel: Arc<AtomicBool>,
    error: Mutex<Option<PyErr>>,
}

impl Watch {
    fn new() -> Self {
        Self { cancel: Arc::new(AtomicBool::new(false)), error: Mutex::new(None) }
    }

    /// Handles one event from inside the released section: attaches to the interpreter, runs the
    /// pending signal handlers (Ctrl-C raises KeyboardInterrupt there) and calls `progress(done,
    /// total)`; an exception from either cancels the run, which stops at the next block batch.
    fn event(&self, ev: &Event, total: &mut u64, progress: Option<&Py<PyAny>>) {
        let done = match ev {
            Event::Start(plan) => {
                *total = plan.work;
                Some(0)
            }
            Event::Progress(p) => Some(p.work_done()),
            _ => None,
        };
        if self.cancel.load(Ordering::SeqCst) {
            return;
        }
        Python::attach(|py| {
            let r = py.check_signals().and_then(|()| match (progress, done) {
                (Some(cb), Some(done)) => cb.call1(py, (done, *total)).map(drop),
                _ => Ok(()),
            });
            if let Err(e) = r {
                if let Ok(mut slot) = self.error.lock() {
                    slot.get_or_insert(e);
                }
                self.cancel.store(true, Ordering::SeqCst);
            }
        });
    }

    /// The result of a run: the exception met on the way first (the run was stopped for it).
    fn finish<T>(self, py: Python<'_>, r: infdit::Result<T>) -> PyResult<T> {
        let met = self.error.into_inner().ok().flatten();
        match (met, r) {
            (Some(e), _) => Err(e),
            (None, Ok(v)) => Ok(v),
            (None, Err(InfditError::Interrupted { steps_done })) => {
                Err(PyKeyboardInterrupt::new_err(format!("interrupted after {steps_done} completed sampler steps")))
            }
            (None, Err(e)) => Err(to_py(py, &e)),
        }
    }
}

/// Planar colour in [-1, 1], the alpha plane in [0, 1], height and width.
type Split = (Vec<f32>, Option<Vec<f32>>, usize, usize);

/// `(1, C, H, W)` planes from an `H x W x C` array of u8, u16 or f32 samples (f32 clamped to
/// [0, 1], NaN refused): the colour in [-1, 1] as the library's file loader maps it, and alpha in
/// [0, 1].
fn planes(py: Python<'_>, image: &Bound<'_, PyAny>) -> PyResult<(Tensor, Option<Tensor>, &'static str)> {
    fn split<T: Copy + numpy::Element>(
        py: Python<'_>,
        a: PyReadonlyArray3<'_, T>,
        f: impl Fn(T) -> f32,
    ) -> PyResult<Split> {
        let (h, w, c) = (a.shape()[0], a.shape()[1], a.shape()[2]);
        if !(c == 3 || c == 4) || h == 0 || w == 0 {
            return Err(raise(py, "InputError", format!("an image array is H x W x 3 or 4, got {h} x {w} x {c}")));
        }
        let s = a.as_slice().map_err(|_| raise(py, "InputError", "the image array is not C-contiguous".into()))?;
        let n = h * w;
        let mut rgb = vec![0f32; 3 * n];
        let mut alpha = (c == 4).then(|| vec![0f32; n]);
        for i in 0..n {
            for ch in 0..3 {
                let v = f(s[i * c + ch]);
                if v.is_nan() {
                    return Err(raise(
                        py,
                        "InputError",
                        format!("NaN in channel {ch} at pixel (row {}, column {})", i / w, i % w),
                    ));
                }
                rgb[ch * n + i] = v * 2.0 - 1.0;
            }
            if let Some(al) = alpha.as_mut() {
                let v = f(s[i * c + 3]);
                if v.is_nan() {
                    return Err(raise(
                        py,
                        "InputError",
                        format!("NaN in the alpha channel at pixel (row {}, column {})", i / w, i % w),
                    ));
                }
                al[i] = v;
            }
        }
        Ok((rgb, alpha, h, w))
    }
    let (rgb, alpha, h, w, kind) = if let Ok(a) = image.extract::<PyReadonlyArray3<'_, u8>>() {
        let (r, al, h, w) = split(py, a, |v| v as f32 / 255.0)?;
        (r, al, h, w, "uint8")
    } else if let Ok(a) = image.extract::<PyReadonlyArray3<'_, u16>>() {
        let (r, al, h, w) = split(py, a, |v| v as f32 / 65535.0)?;
        (r, al, h, w, "uint16")
    } else if let Ok(a) = image.extract::<PyReadonlyArray3<'_, f32>>() {
        let (r, al, h, w) = split(py, a, |v| if v.is_nan() { v } else { v.clamp(0.0, 1.0) })?;
        (r, al, h, w, "float32")
    } else {
        return Err(raise(py, "InputError", "an image is an H x W x 3 or 4 uint8, uint16 or float32 array".into()));
    };
    let rgb = Tensor::from_vec(rgb, (1, 3, h, w), &Device::Cpu).map_err(|e| tensor_err(py, e))?;
    let alpha = match alpha {
        Some(a) => Some(Tensor::from_vec(a, (1, 1, h, w), &Device::Cpu).map_err(|e| tensor_err(py, e))?),
        None => None,
    };
    Ok((rgb, alpha, kind))
}

/// The output planes as an `H x W x C` array of the input's sample type: 8 and 16 bits rounded to
/// nearest as the library writes files (`round((x + 1) / 2 * max)`, `round(a * max)`, clamped),
/// float32 in [0, 1].
fn to_array<'py>(py: Python<'py>, rgb: &Tensor, alpha: Option<&Tensor>, kind: &str) -> PyResult<Bound<'py, PyAny>> {
    let (_, _, h, w) = rgb.dims4().map_err(|e| tensor_err(py, e))?;
    let rgb = rgb.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| tensor_err(py, e))?;
    let alpha = match alpha {
        Some(a) => Some(a.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| tensor_err(py, e))?),
        None => None,
    };
    let c = if alpha.is_some() { 4 } else { 3 };
    let n = h * w;
    let mut out = vec![0f32; n * c];
    for i in 0..n {
        for ch in 0..3 {
            out[i * c + ch] = ((rgb[ch * n + i] + 1.0) * 0.5).clamp(0.0, 1.0);
        }
        if let Some(a) = &alpha {
            out[i * c + 3] = a[i].clamp(0.0, 1.0);
        }
    }
    let shape = (h, w, c);
    let err = |e: numpy::ndarray::ShapeError| raise(py, "InfditError", e.to_string());
    // The colour in f64 as the file writer computes it; alpha the same way.
    let quant = |v: f32, max: f64| (v as f64 * max).round().clamp(0.0, max);
    Ok(match kind {
        "uint8" => {
            let v = (0..n * c)
                .map(|k| {
                    let i = k / c;
                    let ch = k % c;
                    if ch < 3 {
                        ((rgb[ch * n + i] as f64 + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8
                    } else {
                        quant(out[k], 255.0) as u8
                    }
                })
                .collect();
            Array3::from_shape_vec(shape, v).map_err(err)?.into_pyarray(py).into_any()
        }
        "uint16" => {
            let v = (0..n * c)
                .map(|k| {
                    let i = k / c;
                    let ch = k % c;
                    if ch < 3 {
                        ((rgb[ch * n + i] as f64 + 1.0) / 2.0 * 65535.0).round().clamp(0.0, 65535.0) as u16
                    } else {
                        quant(out[k], 65535.0) as u16
                    }
                })
                .collect();
            Array3::from_shape_vec(shape, v).map_err(err)?.into_pyarray(py).into_any()
        }
        _ => Array3::from_shape_vec(shape, out).map_err(err)?.into_pyarray(py).into_any(),
    })
}

/// A plan as a dict: sizes, passes, work, memory.
fn plan_dict<'py>(py: Python<'py>, plan: &ImagePlan) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("input", plan.input)?;
    d.set_item("output", plan.output)?;
    let passes: Vec<usize> = plan.passes.iter().map(|p| p.geometry.scale.factor()).collect();
    d.set_item("passes", PyList::new(py, passes)?)?;
    d.set_item("alpha", plan.alpha.map(|a| a.name()))?;
    d.set_item("alpha_passes", plan.alpha_passes)?;
    d.set_item("work", plan.work)?;
    d.set_item("memory", plan.memory)?;
    d.set_item("steps", plan.steps)?;
    d.set_item("evaluations", plan.evaluations)?;
    d.set_item("resize", plan.resize)?;
    Ok(d)
}

/// A loaded model (native half of `infdit.Upscaler`).
#[pyclass(frozen, module = "infdit._infdit", name = "Upscaler")]
struct PyUpscaler {
    inner: Upscaler,
}

#[pymethods]
impl PyUpscaler {
    /// Loads the model: the built-in one when `model` is None.
    #[new]
    #[pyo3(signature = (model=None, config=None, clip=None, device="cpu", dtype=None))]
    fn new(
        py: Python<'_>,
        model: Option<PathBuf>,
        config: Option<PathBuf>,
        clip: Option<PathBuf>,
        device: &str,
        dtype: Option<&str>,
    ) -> PyResult<Self> {
        let device = device.parse().map_err(|e: String| raise(py, "OptionError", format!("device: {e}")))?;
        let dtype = match dtype {
            None => None,
            Some("f32" | "float32") => Some(DType::F32),
            Some("bf16" | "bfloat16") => Some(DType::BF16),
            Some("f16" | "float16") => Some(DType::F16),
            Some(s) => return Err(raise(py, "OptionError", format!("dtype: '{s}': give 'f32', 'bf16' or 'f16'"))),
        };
        let spec = lib(py, ModelSpec::from_paths(model.as_deref(), config.as_deref(), clip.as_deref()))?;
        let load = LoadOptions { device, dtype };
        let r = py.detach(|| Upscaler::new(&spec, &load));
        Ok(Self { inner: lib(py, r)? })
    }

    /// Where the model runs (`cpu`, or the GPU).
    #[getter]
    fn device(&self) -> String {
        self.inner.device().describe()
    }

    /// The network's dtype.
    #[getter]
    fn dtype(&self) -> String {
        format!("{:?}", self.inner.dtype()).to_lowercase()
    }

    /// Upscales an `H x W x 3|4` C-contiguous array (uint8, uint16 or float32); returns an array
    /// of the same sample type and channels.
    #[pyo3(signature = (image, opts=None, progress=None))]
    fn upscale<'py>(
        &self,
        py: Python<'py>,
        image: &Bound<'py, PyAny>,
        opts: Option<&Bound<'py, PyDict>>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let o = options(py, opts)?;
        if o.noise.is_some() {
            return Err(raise(py, "OptionError", "noise: a noise file goes with upscale_file".into()));
        }
        let (rgb, alpha, kind) = planes(py, image)?;
        let mut img = LoadedImage::from_rgb(rgb);
        img.alpha = alpha;
        let watch = Watch::new();
        let r = py.detach(|| {
            let mut total = 0u64;
            self.inner.upscale(
                &img,
                &o,
                &mut |ev: &Event| watch.event(ev, &mut total, progress.as_ref()),
                Some(&watch.cancel),
            )
        });
        let out = watch.finish(py, r)?;
        to_array(py, &out.rgb, out.alpha.as_ref(), kind)
    }

    /// Upscales the file `src` into `dst` as `infdit upscale` does (metadata carried over, atomic
    /// write); returns the plan that ran.
    #[pyo3(signature = (src, dst, opts=None, progress=None))]
    fn upscale_file<'py>(
        &self,
        py: Python<'py>,
        src: PathBuf,
        dst: PathBuf,
        opts: Option<&Bound<'py, PyDict>>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let o = options(py, opts)?;
        let watch = Watch::new();
        let r = py.detach(|| {
            let mut total = 0u64;
            self.inner.upscale_file(
                &src,
                &dst,
                &o,
                &mut |ev: &Event| watch.event(ev, &mut total, progress.as_ref()),
                Some(&watch.cancel),
            )
        });
        let report = watch.finish(py, r)?;
        plan_dict(py, &report.plan)
    }

    /// The plan of a `width x height` image (with an alpha channel or not), nothing run.
    #[pyo3(signature = (width, height, has_alpha=false, opts=None))]
    fn dry_run<'py>(
        &self,
        py: Python<'py>,
        width: usize,
        height: usize,
        has_alpha: bool,
        opts: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let o = options(py, opts)?;
        let planner = lib(py, self.inner.planner(&o))?;
        let plan = lib(py, planner.plan(width, height, has_alpha, o.alpha))?;
        plan_dict(py, &plan)
    }

    /// The plan of upscaling the file `src` into `dst` with every check `upscale_file` makes first
    /// (the output folder is not created), nothing run.
    #[pyo3(signature = (src, dst, opts=None))]
    fn dry_run_file<'py>(
        &self,
        py: Python<'py>,
        src: PathBuf,
        dst: PathBuf,
        opts: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let o = options(py, opts)?;
        let planner = lib(py, self.inner.planner(&o))?;
        let fp = lib(py, infdit::upscale::plan_file(&planner, &src, &dst, &o, false))?;
        let d = plan_dict(py, &fp.plan)?;
        d.set_item("holds_16_bits", fp.output.holds_16_bits)?;
        Ok(d)
    }
}

/// PSNR-Y, SSIM-Y (with `crop_border`) and the seam score (for `block`-px blocks) of `restored`
/// against `reference`, two `H x W x 3` uint8 arrays.
#[pyfunction]
#[pyo3(signature = (restored, reference, crop_border=4, block=128))]
fn eval<'py>(
    py: Python<'py>,
    restored: PyReadonlyArray3<'py, u8>,
    reference: PyReadonlyArray3<'py, u8>,
    crop_border: usize,
    block: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let rgb = |a: &PyReadonlyArray3<'py, u8>, what: &str| -> PyResult<image::RgbImage> {
        let (h, w, c) = (a.shape()[0], a.shape()[1], a.shape()[2]);
        let s = a.as_slice().map_err(|_| raise(py, "InputError", format!("{what}: not C-contiguous")))?;
        if c != 3 {
            return Err(raise(py, "InputError", format!("{what}: an H x W x 3 array, got {h} x {w} x {c}")));
        }
        let (wu, hu) = (u32::try_from(w), u32::try_from(h));
        match (wu, hu) {
            (Ok(wu), Ok(hu)) => image::RgbImage::from_raw(wu, hu, s.to_vec())
                .ok_or_else(|| raise(py, "InputError", format!("{what}: {h} x {w} is not an image size"))),
            _ => Err(raise(py, "InputError", format!("{what}: {h} x {w} is not an image size"))),
        }
    };
    if block == 0 {
        return Err(raise(py, "OptionError", "block: the seam block must be at least 1 pixel".into()));
    }
    let (a, b) = (rgb(&restored, "restored")?, rgb(&reference, "reference")?);
    let row = py
        .detach(|| infdit::metrics::evaluate("image", &a, &b, crop_border, block))
        .map_err(|e| raise(py, "InputError", e.to_string()))?;
    let d = PyDict::new(py);
    d.set_item("psnr_y", row.psnr_y)?;
    d.set_item("ssim_y", row.ssim_y)?;
    d.set_item("seam", row.seam)?;
    Ok(d)
}

/// The colour and alpha of an image file as the library loads it (EXIF orientation applied):
/// `H x W x 3|4` uint16 for 16-bit and float files, else uint8.
#[pyfunction]
#[pyo3(signature = (path, max_pixels=64 << 20))]
fn imread<'py>(py: Python<'py>, path: PathBuf, max_pixels: u64) -> PyResult<Bound<'py, PyAny>> {
    let limits = infdit::imageio::LoadLimits::for_pixels(max_pixels);
    let img = py
        .detach(|| infdit::imageio::load_image(&path, &limits))
        .map_err(|e| raise(py, "InputError", e.to_string()))?;
    let kind = if img.bit_depth > 8 { "uint16" } else { "uint8" };
    to_array(py, &img.rgb, img.alpha.as_ref(), kind)
}

/// The CPU kernel path this process runs and the instructions beyond it that its kernels use:
/// `avx512 (bf16 dot product, AMX tiles)`, `avx2`, `neon` or `portable` (`INFDIT_KERNELS` forces one).
#[pyfunction]
fn cpu_kernels() -> String {
    infdit::kernels::describe()
}

/// The native module.
#[pymodule]
fn _infdit(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // SAFETY: sets a global allocator option (no pointers); -1 = never purge freed memory.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    m.add_class::<PyUpscaler>()?;
    m.add_function(wrap_pyfunction!(eval, m)?)?;
    m.add_function(wrap_pyfunction!(imread, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_kernels, m)?)?;
    m.add("BUILTIN_LABEL", infdit::loaded::BUILTIN_LABEL)?;
    Ok(())
}
