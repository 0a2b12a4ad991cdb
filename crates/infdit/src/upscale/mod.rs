//! The whole upscaling pipeline, image in, image out: [`Upscaler`] loads a model once, and
//! [`Upscaler::upscale`] (an image in memory) or [`Upscaler::upscale_file`] (file to file, with the
//! metadata carried over and an atomic write) runs everything `infdit upscale` does for one image:
//! the model passes that reach any output size (x4, x2, then an exact resize), the alpha plane,
//! the official crop or padding, 16-bit output, ICC and EXIF, and resume after each sampler step and
//! each pass. [`Planner`] knows all of it from the image header and the model config, so every check
//! that can be made before the model runs is made before it runs ([`plan_file`]).

mod ensemble;
mod named;
mod options;
mod output;
mod plan;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};

pub use self::ensemble::ENSEMBLE_SIZES;
use self::ensemble::Flip;
pub use self::named::NamedOptions;
pub use self::options::{Crop, Evaluation, MAX_STEPS, UpscaleOptions};
pub use self::output::{OutputCheck, check_output};
pub use self::plan::{
    AlphaMode, ImagePlan, MAX_SIDE, PassGeometry, PassPlan, PassRule, Planner, Target, geometry, plan_passes,
};
use crate::config::{ModelConfig, SamplerDefaults};
use crate::device::{DeviceRequest, OpenedDevice};
use crate::diffusion::noise::Noise;
use crate::error::{InfditError, Result};
use crate::imageio::resize::{Bicubic, center_crop_offsets, resize_tensor};
use crate::imageio::{LoadLimits, LoadedImage, SaveOptions, crop, fill_transparent, load_image, save_image_atomic};
use crate::loaded::{Model, ModelSpec};
use crate::official::CROP_MULTIPLE;
use crate::prepare::{OutputCrop, prepare_official, prepare_padded};
use crate::sampling::{FinalSample, Progress, SampleOptions, sample_with_noise};
use crate::schedule::Placement;

/// Where the model runs and in which precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadOptions {
    /// CPU or a GPU. A GPU that cannot be used falls back to the CPU (see [`Upscaler::device`]).
    pub device: DeviceRequest,
    /// The network's dtype; `None`: f32 on the CPU (the official fp32 results), bf16 on a GPU.
    pub dtype: Option<DType>,
}

/// Something that happened while upscaling one image, for a front end to show.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// The image is loaded and its plan is final.
    Start(&'a ImagePlan),
    /// A model pass begins.
    Pass(PassStart<'a>),
    /// A pass resumed from a saved state after this many sampler steps.
    Resumed {
        /// The pass, among the image's passes (the alpha plane's included).
        pass: usize,
        /// Steps already done.
        steps_done: usize,
    },
    /// Sampler progress inside a pass.
    Progress(PassProgress),
}

/// A model pass that begins.
#[derive(Debug, Clone, Copy)]
pub struct PassStart<'a> {
    /// The pass, among the image's passes (the alpha plane's included).
    pub pass: usize,
    /// The image's passes (the alpha plane's included).
    pub passes: usize,
    /// Whether this is a pass of the alpha plane.
    pub alpha: bool,
    /// The pass among its plane's passes (the colour's, or the alpha plane's).
    pub plane_pass: usize,
    /// Its plane's passes.
    pub plane_passes: usize,
    /// What the pass does and needs.
    pub plan: &'a PassPlan,
}

/// Sampler progress inside one model pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassProgress {
    /// The pass, among the image's passes (the alpha plane's included).
    pub pass: usize,
    /// The image's passes (the alpha plane's included).
    pub passes: usize,
    /// Whether this is a pass of the alpha plane.
    pub alpha: bool,
    /// Block evaluations of the image done before this pass.
    pub work_offset: u64,
    /// The sampler's counters in this pass.
    pub sample: Progress,
}

impl PassProgress {
    /// Block evaluations of the image done so far (of [`ImagePlan::work`]).
    pub fn work_done(&self) -> u64 {
        self.work_offset + self.sample.blocks_evaluated()
    }
}

/// The result of [`Upscaler::upscale`].
#[derive(Debug, Clone)]
pub struct UpscaledImage {
    /// The colour, (1, 3, H, W) f32 in [-1, 1] on the CPU.
    pub rgb: Tensor,
    /// The alpha plane, (1, 1, H, W) f32 in [0, 1], when the input had one and it was kept.
    pub alpha: Option<Tensor>,
    /// Output width.
    pub width: usize,
    /// Output height.
    pub height: usize,
}

/// What [`Upscaler::upscale_file`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct FileReport {
    /// Output width.
    pub width: usize,
    /// Output height.
    pub height: usize,
    /// The plan that ran.
    pub plan: ImagePlan,
}

/// What [`plan_file`] finds about one file before anything runs.
#[derive(Debug, Clone, PartialEq)]
pub struct FilePlan {
    /// The image's plan.
    pub plan: ImagePlan,
    /// What writing its output does.
    pub output: OutputCheck,
}

/// Half of the memory available now (Linux `/proc/meminfo`), at most 8 GiB; 4 GiB when unknown.
pub fn default_host_budget() -> u64 {
    let avail = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    avail.map_or(4 << 30, |b| (b / 2).min(8 << 30))
}

/// The memory budget of a run: `max_memory`, else of GPU memory on a GPU, of host memory on the CPU.
fn budget(opts: &UpscaleOptions, dev: &Device) -> u64 {
    match (opts.max_memory, crate::device::gpu_memory(dev)) {
        (Some(b), _) => b,
        (None, Some((free, _))) => crate::device::default_gpu_budget(free),
        (None, None) => default_host_budget(),
    }
}

/// The network dtype for a device: the requested one, else f32 on the CPU and bf16 on a GPU.
pub fn network_dtype(requested: Option<DType>, dev: &OpenedDevice) -> DType {
    requested.unwrap_or(if dev.is_gpu() { DType::BF16 } else { DType::F32 })
}

/// The planner of a run of `cfg` with `opts` on `dev` in `act` (options validated here).
pub fn planner(
    cfg: &ModelConfig,
    defaults: Option<SamplerDefaults>,
    opts: &UpscaleOptions,
    dev: &OpenedDevice,
    act: DType,
) -> Result<Planner> {
    opts.validate()?;
    cfg.validate()?;
    Ok(Planner {
        params: Model::parameter_count(cfg)?,
        cfg: cfg.clone(),
        heun: opts.heun(defaults)?,
        act,
        kv_dtype: opts.kv_dtype.unwrap_or(act),
        budget: budget(opts, &dev.device) as usize,
        placement: Placement { gpu: dev.is_gpu(), kv_offload: opts.kv_offload, state_dir: opts.state_dir.is_some() },
        official: opts.crop == Crop::Official,
        whole_image: opts.evaluation == Evaluation::WholeImage,
        block_batch: match opts.evaluation {
            Evaluation::Blocks { block_batch } => block_batch,
            Evaluation::WholeImage => None,
        },
        target: opts.target,
        rule: defaults.as_ref().map_or_else(PassRule::default, PassRule::from),
        ensemble: opts.ensemble_for(defaults)?,
    })
}

/// Everything that can be known about upscaling `input` to `output` before the model runs, from
/// the image header (size, orientation, alpha) and the model config: the plan of every pass (an
/// image whose last pass does not fit the memory budget is refused here, not after its first
/// passes), and the output checks. With `create`, a missing output folder is made.
pub fn plan_file(
    planner: &Planner,
    input: &Path,
    output: &Path,
    opts: &UpscaleOptions,
    create: bool,
) -> Result<FilePlan> {
    let info = crate::imageio::probe(input, &LoadLimits::for_pixels(opts.max_pixels))?;
    let plan = planner.plan(info.width as usize, info.height as usize, info.has_alpha, opts.alpha)?;
    if opts.noise.is_some() && plan.passes.len() > 1 {
        return Err(InfditError::InvalidOption {
            option: "noise",
            reason: format!(
                "a noise file needs a single model pass (a scale of 4 or 2); this output takes {}",
                plan.passes.len()
            ),
        });
    }
    let output = check_output(output, info.has_alpha, opts.alpha, &[input], create)?;
    Ok(FilePlan { plan, output })
}

/// The seed of pass `k`'s noise: the user's seed for the first pass (so a one-pass run is
/// unchanged), a different stream for each later pass.
fn pass_seed(seed: u64, k: u64) -> u64 {
    seed.wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The stream index of the alpha plane's first pass: its noise seeds, `pass_seed(seed,
/// ALPHA_STREAM + k)`, never equal the colour's `pass_seed(seed, k)` (the multiplier is odd).
const ALPHA_STREAM: u64 = 1 << 32;

/// The alpha plane (1, 1, H, W) in [0, 1] as the gray RGB image (1, 3, H, W) in [-1, 1] that the
/// model passes take.
fn alpha_to_image(alpha: &Tensor) -> Result<Tensor> {
    Ok(alpha.to_dtype(DType::F32)?.affine(2.0, -1.0)?.repeat((1, 3, 1, 1))?)
}

/// The model's output for the alpha plane back to alpha: the mean of its channels, in [0, 1].
fn image_to_alpha(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(DType::F32)?.mean_keepdim(1)?.affine(0.5, 0.5)?.clamp(0f32, 1f32)?)
}

/// `rgb` (1, 3, H, W) in [-1, 1] composited over `background` with `alpha` (1, 1, H, W) in [0, 1].
fn flatten(rgb: &Tensor, alpha: &Tensor, background: [u8; 3]) -> Result<Tensor> {
    let bg: Vec<f32> = background.iter().map(|&v| v as f32 / 127.5 - 1.0).collect();
    let bg = Tensor::from_vec(bg, (1, 3, 1, 1), rgb.device())?;
    let a = alpha.to_dtype(DType::F32)?;
    let keep = rgb.broadcast_mul(&a)?;
    let under = bg.broadcast_mul(&a.affine(-1.0, 1.0)?)?;
    Ok((keep + under)?)
}

/// A hash of what determines the passes' outputs, so that a saved pass output is only reused by
/// the same run (the sampler's own state has its own fingerprint).
fn passes_fingerprint(
    planner: &Planner,
    model_label: &str,
    opts: &UpscaleOptions,
    seed: u64,
    noise: Option<&Path>,
    input: &Tensor,
    passes: &[PassPlan],
) -> Result<String> {
    let scales: Vec<usize> = passes.iter().map(|p| p.geometry.scale.factor()).collect();
    let settings = format!(
        "{scales:?}/{seed}/{:?}/{:?}/{:?}/{:?}/{:?}/{model_label}/ensemble {}",
        planner.heun, planner.act, planner.kv_dtype, opts.resize, planner.cfg, planner.ensemble
    );
    crate::checkpoint::passes_fingerprint(input, noise, &settings)
}

fn load_noise(path: &Path, h: usize, w: usize) -> Result<Tensor> {
    let bad = |reason: String| InfditError::Noise { path: path.to_path_buf(), reason };
    let mut t = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| bad(format!("cannot read the noise file: {e}")))?;
    let eps = t.remove("eps").ok_or_else(|| bad("no tensor named 'eps'".into()))?;
    if eps.dims() != [1, 3, h, w] {
        return Err(bad(format!("eps has shape {:?}, the output needs (1, 3, {h}, {w})", eps.dims())));
    }
    Ok(eps.to_dtype(DType::F32)?)
}

/// The colour result of a run: in memory, or (one pass with a state folder) the sampler's final
/// state on disk with the window that is the output, read band by band when it is written.
enum Colour {
    Tensor(Tensor),
    Final(FinalSample, OutputCrop),
}

/// One image run through the passes: the colour, or the alpha plane as a gray image.
struct Plane<'a> {
    alpha: bool,
    /// Seed stream of the first pass (pass `k` draws noise from `pass_seed(seed, stream + k)`).
    stream: u64,
    /// Noise of the (single) pass from a file (colour only).
    noise: Option<&'a Path>,
    /// Folder of the resume state.
    state: Option<PathBuf>,
    /// Also save the last pass's output in `state`, as more work follows it.
    keep_last: bool,
    /// Index of the first pass among the image's passes, and the work done before it.
    first_pass: usize,
    work_offset: u64,
}

impl Plane<'_> {
    fn pass_dir(&self, k: usize) -> Option<PathBuf> {
        self.state.as_ref().map(|b| if k == 0 { b.clone() } else { b.join(format!("pass{}", k + 1)) })
    }

    fn pass_output(&self, k: usize) -> Option<PathBuf> {
        self.state.as_ref().map(|b| b.join(format!("pass{}-output.safetensors", k + 1)))
    }

    /// Removes the saved pass outputs and the emptied pass folders of a finished image.
    fn clean(&self, passes: usize) {
        if let Some(b) = &self.state {
            for k in 0..passes {
                if let Some(f) = self.pass_output(k) {
                    let _ = std::fs::remove_file(f);
                }
                // The resume state of the ensemble's transformed runs (emptied by their samplers).
                if let Some(d) = self.pass_dir(k) {
                    for f in &Flip::all()[1..] {
                        let _ = std::fs::remove_dir(d.join(f.name()));
                    }
                }
                if k > 0 {
                    let _ = std::fs::remove_dir(b.join(format!("pass{}", k + 1)));
                }
            }
        }
    }
}

/// What one image's passes share, for the colour and the alpha plane alike.
struct Run<'a> {
    up: &'a Upscaler,
    planner: &'a Planner,
    opts: &'a UpscaleOptions,
    plan: &'a ImagePlan,
    /// A name of the image for its state files (the input's file stem, or `image`).
    name: String,
    /// Model passes of the image, the alpha plane's included.
    total_passes: usize,
    cancel: Option<&'a Arc<AtomicBool>>,
    /// Give the last pass's result as the sampler's final state when it can be (streamed output).
    stream: bool,
}

/// A unique key per process and call, for state files nobody resumes.
fn unique_key() -> String {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

impl Run<'_> {
    /// The state folder of pass `k` of a plane (the options' `state_dir`): named after the image and
    /// keyed by its checkpoint folder, so that two images never share one (and a resumed run finds
    /// its own); without a checkpoint folder, by this process and call.
    fn state_dir(&self, plane: &Plane, k: usize) -> Option<PathBuf> {
        let dir = self.opts.state_dir.as_ref()?;
        let key = match &self.opts.checkpoint_dir {
            Some(ck) => {
                let mut h = crate::hash::Fnv::default();
                h.bytes(crate::imageio::canonical_target(ck).as_os_str().as_encoded_bytes());
                format!("{:016x}", h.finish())
            }
            None => unique_key(),
        };
        let what = if plane.alpha { "alpha" } else { "colour" };
        Some(dir.join(format!("{}.{key}.{what}.pass{}", self.name, k + 1)))
    }

    /// Runs `x` (1, 3, H, W) in [-1, 1] through the passes (resuming after the last saved one),
    /// then resizes it to the output size; the result is in [-1, 1] (unclamped when the last pass
    /// gives the output size, as the output conversion clamps).
    fn passes(&self, p: &Plane, mut x: Tensor, events: &mut dyn FnMut(&Event)) -> Result<Colour> {
        let (planner, opts, plan) = (self.planner, self.opts, self.plan);
        let model = &self.up.model;
        let bp = planner.cfg.dit.block_px;
        let (tw, th) = plan.output;
        let passes = &plan.passes;
        let last = passes.len() - 1;
        // Saved pass outputs: every pass before the last, and the last one too when work follows.
        let saved = if p.keep_last { passes.len() } else { last };
        let seed = pass_seed(opts.seed, p.stream);
        let fingerprint = if p.state.is_some() && saved > 0 {
            Some(passes_fingerprint(planner, &self.up.label, opts, seed, p.noise, &x, passes)?)
        } else {
            None
        };
        // Resume after the last finished pass whose output was saved.
        let mut first = 0;
        if let Some(fp) = &fingerprint {
            for k in (0..saved).rev() {
                let Some(file) = p.pass_output(k) else { continue };
                if let Some(t) = crate::checkpoint::load_pass(&file, fp)? {
                    x = t;
                    first = k + 1;
                    break;
                }
            }
        }
        let mut offset = p.work_offset + plan.pass_work[..first].iter().sum::<u64>();
        for (k, pass) in passes.iter().enumerate().skip(first) {
            if self.cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                return Err(InfditError::Interrupted { steps_done: 0 });
            }
            let scale = pass.geometry.scale;
            let index = p.first_pass + k;
            events(&Event::Pass(PassStart {
                pass: index,
                passes: self.total_passes,
                alpha: p.alpha,
                plane_pass: k,
                plane_passes: passes.len(),
                plan: pass,
            }));
            // The self-ensemble: the pass on each transformed input, mapped back and averaged (one
            // run, the input itself, without it).
            let flips = Flip::of_ensemble(planner.ensemble);
            let run_work = plan.pass_work[k] / flips.len() as u64;
            let mut sum: Option<Tensor> = None;
            for (j, &flip) in flips.iter().enumerate() {
                let input = flip.apply(&x)?;
                let (prep, out_crop, clip_input) = if planner.official {
                    let pr = prepare_official(&input, scale, bp, opts.resize)?;
                    let c = OutputCrop { top: 0, left: 0, height: pr.grid.height(), width: pr.grid.width() };
                    let clip_input = pr.lr.clone();
                    (pr, c, clip_input)
                } else {
                    prepare_padded(&input, scale, bp, opts.resize)?
                };
                let (h, w) = (prep.grid.height(), prep.grid.width());
                // Seeded noise is drawn block by block inside the sampler (the same values as image_noise).
                let noise = match p.noise {
                    Some(file) => Noise::Image(load_noise(file, h, w)?),
                    None => Noise::Seeded(pass_seed(opts.seed, p.stream + k as u64)),
                };
                let clip = model.clip_vector(&clip_input, opts.resize)?;
                let sopts = SampleOptions {
                    heun: planner.heun,
                    mode: pass.mode_for(flip.transposes()),
                    checkpoint_dir: p.pass_dir(k).map(|d| if flip == Flip::NONE { d } else { d.join(flip.name()) }),
                    stop_after_steps: None,
                    cancel: self.cancel.cloned(),
                    state_dir: self.state_dir(p, k),
                    kv_offload: opts.kv_offload,
                };
                let work_offset = offset + j as u64 * run_work;
                let out = sample_with_noise(model, &prep, &clip, &noise, &sopts, &mut |s| {
                    events(&Event::Progress(PassProgress {
                        pass: index,
                        passes: self.total_passes,
                        alpha: p.alpha,
                        work_offset,
                        sample: s,
                    }))
                })?;
                if out.resumed_from > 0 {
                    events(&Event::Resumed { pass: index, steps_done: out.resumed_from });
                }
                let fin = out.final_sample.ok_or_else(|| InfditError::Interrupted { steps_done: out.steps_done })?;
                // One pass that gives the output size with its state on disk: the output is written
                // band by band from the state file, never held whole.
                if self.stream
                    && flips.len() == 1
                    && k == last
                    && !fin.in_memory()
                    && (out_crop.width, out_crop.height) == (tw, th)
                {
                    return Ok(Colour::Final(fin, out_crop));
                }
                // Whole-image mode leaves the result on the model's device; the rest is done on the CPU.
                let y = fin.to_tensor()?.to_device(&Device::Cpu)?;
                let y = flip.invert(&crop(&y, out_crop.top, out_crop.left, out_crop.height, out_crop.width)?)?;
                sum = Some(match sum {
                    Some(s) => (s + y)?,
                    None => y,
                });
            }
            let sum = sum.ok_or_else(|| InfditError::Internal("an ensemble of no runs".into()))?;
            x = if flips.len() > 1 { (sum / flips.len() as f64)? } else { sum };
            let (_, _, xh, xw) = x.dims4()?;
            if k < last || (xw, xh) != (tw, th) {
                // The next pass and the resize expect images in [-1, 1].
                x = x.clamp(-1f32, 1f32)?;
            }
            if k < saved
                && let (Some(file), Some(fp)) = (p.pass_output(k), &fingerprint)
            {
                crate::checkpoint::save_pass(&file, &x, k + 1, fp)?;
            }
            offset += plan.pass_work[k];
        }
        let (_, _, h, w) = x.dims4()?;
        if (w, h) != (tw, th) {
            // The exact size: an antialiased bicubic downscale of the last pass.
            x = resize_tensor(&x, th, tw, Bicubic::Antialias)?.clamp(-1f32, 1f32)?;
        }
        Ok(Colour::Tensor(x))
    }

    /// The colour and the alpha plane of `img` upscaled.
    fn image(&self, img: &LoadedImage, events: &mut dyn FnMut(&Event)) -> Result<(Colour, Option<Tensor>)> {
        let (opts, plan) = (self.opts, self.plan);
        let (tw, th) = plan.output;
        // Colour under fully transparent pixels is arbitrary; fill it from the visible neighbours so
        // it does not bleed into the upscaled edges (or, to drop the alpha, composite it).
        let rgb = match (&img.alpha, opts.alpha) {
            (Some(a), AlphaMode::Drop { background }) => flatten(&img.rgb, a, background)?,
            (Some(a), _) => fill_transparent(&img.rgb, a)?,
            (None, _) => img.rgb.clone(),
        };
        let alpha_model = img.alpha.is_some() && opts.alpha == AlphaMode::Model;
        let base = opts.checkpoint_dir.clone();
        let colour = Plane {
            alpha: false,
            stream: 0,
            noise: opts.noise.as_deref(),
            state: base.clone(),
            keep_last: alpha_model,
            first_pass: 0,
            work_offset: 0,
        };
        let x = self.passes(&colour, rgb, events)?;
        // The alpha plane is upscaled on its own: through the model as a gray image (its own noise
        // and state folder), or bicubic from the input straight to the output size; in [0, 1].
        let alpha_plane = Plane {
            alpha: true,
            stream: ALPHA_STREAM,
            noise: None,
            state: base.as_ref().map(|b| b.join("alpha")),
            keep_last: false,
            first_pass: plan.passes.len(),
            work_offset: plan.pass_work.iter().sum(),
        };
        let alpha = match (&img.alpha, opts.alpha) {
            (None, _) | (Some(_), AlphaMode::Drop { .. }) => None,
            (Some(al), AlphaMode::Model) => match self.passes(&alpha_plane, alpha_to_image(al)?, events)? {
                Colour::Tensor(t) => Some(image_to_alpha(&t)?),
                Colour::Final(f, c) => Some(image_to_alpha(&crop(&f.to_tensor()?, c.top, c.left, c.height, c.width)?)?),
            },
            (Some(al), AlphaMode::Bicubic) => {
                // With the official centre crop, the alpha is cut exactly as the colour was.
                let al = if self.planner.official {
                    let (_, _, ah, aw) = al.dims4()?;
                    let (ch, cw) = (ah / CROP_MULTIPLE * CROP_MULTIPLE, aw / CROP_MULTIPLE * CROP_MULTIPLE);
                    let (top, left) = center_crop_offsets(ah, aw, ch, cw);
                    crop(al, top, left, ch, cw)?
                } else {
                    al.clone()
                };
                Some(resize_tensor(&al, th, tw, opts.resize)?.clamp(0f32, 1f32)?)
            }
        };
        // The saved pass outputs and emptied state folders are no longer needed.
        if let Some(b) = &base {
            alpha_plane.clean(plan.passes.len());
            let _ = std::fs::remove_dir(b.join("alpha"));
            colour.clean(plan.passes.len());
        }
        Ok((x, alpha))
    }
}

/// A loaded model, ready to upscale any number of images with any options.
#[derive(Debug, Clone)]
pub struct Upscaler {
    model: Model,
    label: String,
    defaults: Option<SamplerDefaults>,
    device: OpenedDevice,
    dtype: DType,
}

impl Upscaler {
    /// Loads the model of `spec` on the device of `load`.
    pub fn new(spec: &ModelSpec, load: &LoadOptions) -> Result<Self> {
        let device = crate::device::open(load.device)?;
        let dtype = network_dtype(load.dtype, &device);
        Self::load(spec, device, dtype)
    }

    /// Loads the model of `spec` in `dtype` on a device already opened.
    pub fn load(spec: &ModelSpec, device: OpenedDevice, dtype: DType) -> Result<Self> {
        let model = spec.load(dtype, &device.device)?;
        Ok(Self { model, label: spec.label(), defaults: spec.sampler_defaults()?, device, dtype })
    }

    /// An upscaler for a model already in memory (training's sample images, evaluation), named
    /// `label` in run fingerprints, with the sampler defaults `defaults`.
    pub fn from_model(model: Model, label: impl Into<String>, defaults: Option<SamplerDefaults>) -> Self {
        let dtype = model.dit.dtype();
        let dev = model.dit.device().clone();
        let device = OpenedDevice {
            requested: if dev.is_cpu() { DeviceRequest::Cpu } else { DeviceRequest::Cuda(0) },
            device: dev,
            fallback: None,
        };
        Self { model, label: label.into(), defaults, device, dtype }
    }

    /// The loaded model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Where the model runs (with the reason when a GPU was asked for and the CPU is used).
    pub fn device(&self) -> &OpenedDevice {
        &self.device
    }

    /// The network's dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The planner for `opts` (validated here).
    pub fn planner(&self, opts: &UpscaleOptions) -> Result<Planner> {
        planner(&self.model.cfg, self.defaults, opts, &self.device, self.dtype)
    }

    /// Upscales an image in memory, as [`crate::imageio::load_image`] gives it; the output checks
    /// and resume folders of `opts` apply as for a file.
    pub fn upscale(
        &self,
        image: &LoadedImage,
        opts: &UpscaleOptions,
        events: &mut dyn FnMut(&Event),
        cancel: Option<&Arc<AtomicBool>>,
    ) -> Result<UpscaledImage> {
        let planner = self.planner(opts)?;
        let (_, _, h, w) = image.rgb.dims4()?;
        let plan = planner.plan(w, h, image.alpha.is_some(), opts.alpha)?;
        let (x, alpha) = self.run(&planner, &plan, image, opts, "image", events, cancel, false)?;
        let rgb = match x {
            Colour::Tensor(t) => t,
            Colour::Final(f, c) => crop(&f.to_tensor()?, c.top, c.left, c.height, c.width)?,
        };
        Ok(UpscaledImage { rgb, alpha, width: plan.output.0, height: plan.output.1 })
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        planner: &Planner,
        plan: &ImagePlan,
        image: &LoadedImage,
        opts: &UpscaleOptions,
        name: &str,
        events: &mut dyn FnMut(&Event),
        cancel: Option<&Arc<AtomicBool>>,
        stream: bool,
    ) -> Result<(Colour, Option<Tensor>)> {
        events(&Event::Start(plan));
        let run = Run {
            up: self,
            planner,
            opts,
            plan,
            name: name.to_string(),
            total_passes: plan.passes.len() + plan.alpha_passes,
            cancel,
            stream,
        };
        run.image(image, events)
    }

    /// Upscales the image file `input` into `output`, as `infdit upscale` does: every check that
    /// can be made before the model runs first ([`plan_file`]: options, sizes, memory, the output's
    /// format, folder and permissions; a missing output folder is made), then the passes, the
    /// input's ICC profile and EXIF carried over (unless stripped), 16-bit samples kept where the
    /// format holds them, and an atomic write (the output appears whole or not at all). With a
    /// state folder and one pass, the output is written band by band from the sampler's state file.
    pub fn upscale_file(
        &self,
        input: &Path,
        output: &Path,
        opts: &UpscaleOptions,
        events: &mut dyn FnMut(&Event),
        cancel: Option<&Arc<AtomicBool>>,
    ) -> Result<FileReport> {
        let planner = self.planner(opts)?;
        let checked = plan_file(&planner, input, output, opts, true)?;
        let image = load_image(input, &LoadLimits::for_pixels(opts.max_pixels))?;
        // The header and the decoded image agree on the size (the orientation applied).
        let (_, _, h, w) = image.rgb.dims4()?;
        let plan = if (w, h) == checked.plan.input {
            checked.plan
        } else {
            planner.plan(w, h, image.alpha.is_some(), opts.alpha)?
        };
        let name = input.file_stem().map_or_else(|| "image".into(), |s| s.to_string_lossy().into_owned());
        let (x, alpha) = self.run(&planner, &plan, &image, opts, &name, events, cancel, true)?;
        let mut save = if opts.strip_metadata { SaveOptions::default() } else { SaveOptions::like_input(&image) };
        save.strip_metadata = opts.strip_metadata;
        save.jpeg_quality = opts.jpeg_quality;
        save.rounding = opts.rounding;
        if !checked.output.holds_16_bits {
            save.bit_depth = 8;
        }
        match &x {
            Colour::Tensor(t) => save_image_atomic(output, t, alpha.as_ref(), image.grayscale, &save, &[input])?,
            Colour::Final(f, c) => {
                let window = f.window(c.top, c.left, c.height, c.width)?;
                save_image_atomic(output, &window, alpha.as_ref(), image.grayscale, &save, &[input])?
            }
        }
        Ok(FileReport { width: plan.output.0, height: plan.output.1, plan })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ensemble of n is the mean of the plain run and the runs on the transformed input, mapped
    /// back; each transformed run is a real, different upscale.
    #[test]
    fn the_ensemble_averages_the_transformed_runs() {
        let up = Upscaler::new(&ModelSpec::BuiltIn, &LoadOptions::default()).unwrap();
        // A 40 x 24 input (off the 16-px LR block grid: the padding lands elsewhere when mirrored;
        // transposed, its block grid is another shape).
        let (h, w) = (24usize, 40usize);
        let v: Vec<f32> = (0..3 * h * w).map(|i| (((i * 37) % 101) as f32 / 50.0 - 1.0) * 0.8).collect();
        let rgb = Tensor::from_vec(v, (1, 3, h, w), &Device::Cpu).unwrap();
        let run = |img: &Tensor, ensemble: usize| {
            let opts = UpscaleOptions { ensemble: Some(ensemble), ..Default::default() };
            up.upscale(&LoadedImage::from_rgb(img.clone()), &opts, &mut |_| {}, None).unwrap().rgb
        };
        let singles: Vec<Tensor> =
            Flip::of_ensemble(8).iter().map(|f| f.invert(&run(&f.apply(&rgb).unwrap(), 1)).unwrap()).collect();
        let diff =
            |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff(&singles[0], &run(&rgb, 1)), 0.0);
        for n in [2, 4, 8] {
            let got = run(&rgb, n);
            assert_eq!(got.dims(), &[1, 3, 4 * h, 4 * w]);
            let expected = (Tensor::stack(&singles[..n], 0).unwrap().sum(0).unwrap() / n as f64).unwrap();
            assert!(diff(&got, &expected) < 1e-5, "ensemble {n}: {}", diff(&got, &expected));
        }
        for s in &singles[1..] {
            assert!(diff(&singles[0], s) > 1e-3, "a transformed run is not a different upscale");
        }
        // Progress counts every run: the total work of an ensemble of 8 is 8 times a single run's.
        let work = |n: usize| {
            let planner = up.planner(&UpscaleOptions { ensemble: Some(n), ..Default::default() }).unwrap();
            planner.plan(w, h, false, AlphaMode::Bicubic).unwrap().work
        };
        assert_eq!(work(8), 8 * work(1));
        let mut last = 0;
        run_with_events(&up, &rgb, 8, &mut |e| {
            if let Event::Progress(p) = e {
                last = p.work_done();
            }
        });
        assert_eq!(last, work(8));
    }

    fn run_with_events(up: &Upscaler, rgb: &Tensor, ensemble: usize, events: &mut dyn FnMut(&Event)) {
        let opts = UpscaleOptions { ensemble: Some(ensemble), ..Default::default() };
        up.upscale(&LoadedImage::from_rgb(rgb.clone()), &opts, events, None).unwrap();
    }

    #[test]
    fn alpha_maps_to_a_gray_image_and_back() {
        let al = Tensor::from_vec(vec![0f32, 0.25, 1.0], (1, 1, 1, 3), &Device::Cpu).unwrap();
        let img = alpha_to_image(&al).unwrap();
        assert_eq!(img.dims(), [1, 3, 1, 3]);
        let v = img.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v, [-1.0, -0.5, 1.0, -1.0, -0.5, 1.0, -1.0, -0.5, 1.0]);
        let back = image_to_alpha(&img).unwrap();
        assert_eq!(back.dims(), [1, 1, 1, 3]);
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [0.0, 0.25, 1.0]);
        // The mean of the channels, then clamped to [0, 1].
        let out = Tensor::from_vec(vec![1f32, 2.0, -3.0, 0.0, 1.0, -2.0, -1.0, 3.0, -1.0], (1, 3, 1, 3), &Device::Cpu);
        let a = image_to_alpha(&out.unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, [0.5, 1.0, 0.0]);
    }

    #[test]
    fn dropping_the_alpha_composites_on_the_background() {
        // Red, opaque / half / transparent, over white.
        let rgb =
            Tensor::from_vec(vec![1f32, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0], (1, 3, 1, 3), &Device::Cpu);
        let a = Tensor::from_vec(vec![1f32, 0.5, 0.0], (1, 1, 1, 3), &Device::Cpu).unwrap();
        let f = flatten(&rgb.unwrap(), &a, [255, 255, 255]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(f, [1.0, 1.0, 1.0, -1.0, 0.0, 1.0, -1.0, 0.0, 1.0]);
    }

    #[test]
    fn alpha_noise_seeds_differ_from_the_colour_ones() {
        for seed in [0u64, 7, u64::MAX] {
            assert_eq!(pass_seed(seed, 0), seed);
            for k in 0..4 {
                for j in 0..4 {
                    assert_ne!(pass_seed(seed, ALPHA_STREAM + k), pass_seed(seed, j), "seed {seed}, {k} {j}");
                }
            }
        }
    }
}
