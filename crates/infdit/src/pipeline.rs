//! From a low-resolution image to the upscaled sample: model loading, the official input
//! preparation (§2, §7), the EDM denoiser in whole-image mode, and the sampling loop.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};

use crate::clip::ClipVision;
use crate::config::ModelConfig;
use crate::diffusion::noise::Noise;
use crate::diffusion::{Denoise, EdmScalings, HeunConfig, initial_state};
use crate::error::{InfditError, Result};
use crate::imageio::resize::{Bicubic, center_crop_offsets, resize_tensor, resize_tensor_rows};
use crate::model::blocks::{BlockGrid, BlockPos, WholeImageKv, blocks_to_image, image_to_blocks, take_blocks};
use crate::model::{ImageCond, InfDit};
use crate::schedule::BlockDenoiser;
pub use crate::schedule::state::FinalSample;
use crate::schedule::state::{FileStore, RamStore, STATE_FILE, Slot, StateStore};
use crate::weights::{CLIP_PREFIX, Checkpoint, WeightLoader};

/// A loaded model: the DiT and, when configured, its CLIP tower.
#[derive(Debug, Clone)]
pub struct Model {
    /// The configuration it was built from.
    pub cfg: ModelConfig,
    /// The diffusion transformer.
    pub dit: InfDit,
    /// The CLIP image tower.
    pub clip: Option<ClipVision>,
    /// Dead keys that were present in the checkpoint and skipped.
    pub skipped_dead_keys: Vec<String>,
    /// A digest of every weight read (DiT and CLIP; see [`WeightLoader::digest`]), part of the
    /// resume fingerprint so that a checkpoint of another model is never resumed.
    pub weights_digest: u64,
}

impl Model {
    /// Loads a model from checkpoint files: `weights` is the official `.pt`, a converted
    /// `.safetensors`, or any file in the official key layout; `clip` optionally supplies the CLIP
    /// tower (open_clip or Hugging Face layout) when `weights` lacks it.
    pub fn load(cfg: &ModelConfig, weights: &Path, clip: Option<&Path>, dtype: DType, dev: &Device) -> Result<Self> {
        let mut ck = Checkpoint::open(weights)?;
        if let (Some(ccfg), Some(path)) = (&cfg.clip, clip) {
            let extra = Checkpoint::open(path)?;
            ck.add_clip_from(&extra, ccfg.layers)?;
        }
        Self::from_checkpoint(cfg, ck, dtype, dev)
    }

    /// Builds a model from an opened checkpoint, strictly: every problem is reported by key.
    pub fn from_checkpoint(cfg: &ModelConfig, ck: Checkpoint, dtype: DType, dev: &Device) -> Result<Self> {
        cfg.validate()?;
        check_has_network(&ck)?;
        if cfg.clip.is_some() && !ck.has_clip() {
            return Err(InfditError::Config(format!(
                "{}: the checkpoint has no CLIP tower (image_encoder.model.visual.*); give it with --clip PATH \
                 (open_clip_pytorch_model.bin, open_clip_model.safetensors or Hugging Face CLIP weights)",
                ck.origin()
            )));
        }
        let loader = WeightLoader::new(ck, dtype, dev);
        let dit = InfDit::load(&cfg.dit, &loader)?;
        let clip = match &cfg.clip {
            Some(c) => Some(ClipVision::load(c, &loader.pp(CLIP_PREFIX.trim_end_matches('.')))?),
            None => None,
        };
        let weights_digest = loader.digest();
        let skipped_dead_keys = loader.finish()?;
        Ok(Self { cfg: cfg.clone(), dit, clip, skipped_dead_keys, weights_digest })
    }

    /// Every tensor the model reads from a checkpoint, with its shape, in the official key layout
    /// (dead keys excluded; see [`crate::weights::dead_key_shapes`]). Allocates nothing.
    pub fn expected_keys(cfg: &ModelConfig) -> Result<Vec<(String, Vec<usize>)>> {
        let loader = WeightLoader::new(Checkpoint::default(), DType::F32, &Device::Cpu);
        InfDit::load(&cfg.dit, &loader)?;
        if let Some(c) = &cfg.clip {
            ClipVision::load(c, &loader.pp(CLIP_PREFIX.trim_end_matches('.')))?;
        }
        match loader.finish() {
            Err(crate::weights::WeightError::Mismatch(r)) => Ok(r.missing),
            Err(e) => Err(e.into()),
            Ok(_) => Ok(Vec::new()),
        }
    }

    /// Parameters of the DiT part (CLIP excluded, dead keys excluded), from the config alone
    /// ([`ModelConfig::parameter_count`]: arithmetic, nothing is built or allocated).
    pub fn parameter_count(cfg: &ModelConfig) -> Result<usize> {
        cfg.validate()?;
        Ok(cfg.parameter_count() as usize)
    }

    /// The conditioning vector of an LR image (1, 3, h, w) in [-1, 1]: the CLIP embedding, or zeros
    /// for a model without CLIP.
    pub fn clip_vector(&self, lr: &Tensor, kind: Bicubic) -> Result<Tensor> {
        match &self.clip {
            Some(c) => Ok(c.embed_image(lr, kind)?),
            None => Ok(Tensor::zeros((1, self.cfg.dit.vector_dim), DType::F32, lr.device())?),
        }
    }
}

/// Refuses a checkpoint that holds none of the DiT's tensors (another model's file, a CLIP
/// tower alone) with that message, rather than with a list of every missing key or a hint about
/// the CLIP tower.
fn check_has_network(ck: &Checkpoint) -> Result<()> {
    if ck.keys().any(|k| k.starts_with("transformer.layers.") || k.starts_with("mixins.")) {
        return Ok(());
    }
    Err(InfditError::Config(format!(
        "{}: holds none of the Inf-DiT network's tensors (transformer.layers.*, mixins.*): not an Inf-DiT \
         checkpoint ({} tensors, e.g. {})",
        ck.origin(),
        ck.len(),
        ck.keys().take(3).collect::<Vec<_>>().join(", ")
    )))
}

/// The upscaling factor of one model pass, as the official script offers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassScale {
    /// The native 4x.
    X4,
    /// The official 2x mode: the LR is first halved so the model still sees HR/LR = 4.
    X2,
}

impl PassScale {
    /// The factor.
    pub fn factor(self) -> usize {
        match self {
            PassScale::X4 => 4,
            PassScale::X2 => 2,
        }
    }
}

/// The upsampled LR that the network gets as extra input channels (`concat_lr`), at output size:
/// either held whole, or described by its LR source and computed band by band, so that huge
/// outputs never hold it at once.
#[derive(Debug, Clone)]
pub enum ConcatLr {
    /// The image itself, (1, 3, H, W).
    Tensor(Tensor),
    /// `clamp(resize(src, height, width, kind), -1, 1)` of an LR-size `src` (1, 3, h, w). A band of
    /// rows ([`ConcatLr::rows`]) equals the same rows of the whole upsample bit for bit
    /// ([`crate::imageio::resize::resize_planar_rows`]).
    Upsample {
        /// The LR image (1, 3, h, w) in [-1, 1].
        src: Tensor,
        /// Output height.
        height: usize,
        /// Output width.
        width: usize,
        /// The bicubic kernel.
        kind: Bicubic,
    },
}

impl ConcatLr {
    /// (height, width) of the upsampled image.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            ConcatLr::Tensor(t) => {
                let (_, _, h, w) = t.dims4()?;
                Ok((h, w))
            }
            ConcatLr::Upsample { height, width, .. } => Ok((*height, *width)),
        }
    }

    /// Rows `y0..y1`, (1, 3, y1 - y0, W), on the device of the source.
    pub fn rows(&self, y0: usize, y1: usize) -> Result<Tensor> {
        match self {
            ConcatLr::Tensor(t) => Ok(t.narrow(2, y0, y1.saturating_sub(y0))?),
            ConcatLr::Upsample { src, height, width, kind } => {
                Ok(resize_tensor_rows(src, *height, *width, *kind, y0..y1)?.clamp(-1f32, 1f32)?)
            }
        }
    }

    /// The whole image (1, 3, H, W).
    pub fn full(&self) -> Result<Tensor> {
        match self {
            ConcatLr::Tensor(t) => Ok(t.clone()),
            ConcatLr::Upsample { src, height, width, kind } => {
                Ok(resize_tensor(src, *height, *width, *kind)?.clamp(-1f32, 1f32)?)
            }
        }
    }

    /// On `dev`: a held image is moved there, an upsample's source too (bands are then made there).
    pub fn to_device(&self, dev: &Device) -> Result<Self> {
        Ok(match self {
            ConcatLr::Tensor(t) => ConcatLr::Tensor(t.to_device(dev)?),
            ConcatLr::Upsample { src, height, width, kind } => {
                ConcatLr::Upsample { src: src.to_device(dev)?, height: *height, width: *width, kind: *kind }
            }
        })
    }

    /// Mixes what determines the image into a fingerprint: a held image by its values, an
    /// upsample by its source, size and kernel (cheap, and independent of the output size).
    fn fingerprint(&self, h: &mut crate::resume::Fnv) -> Result<()> {
        match self {
            ConcatLr::Tensor(t) => h.tensor(t)?,
            ConcatLr::Upsample { src, height, width, kind } => {
                h.bytes(format!("upsample {height}x{width} {kind:?}").as_bytes());
                h.tensor(src)?;
            }
        }
        Ok(())
    }
}

/// Network inputs prepared from an image.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The LR the network sees (CLIP and cross-attention), (1, 3, H/4, W/4), not clipped.
    pub lr: Tensor,
    /// The bicubic upsample at output size, clipped to [-1, 1], (1, 3, H, W); [`prepare_official`]
    /// and [`prepare_padded`] describe it ([`ConcatLr::Upsample`]) rather than compute it.
    pub concat_lr: ConcatLr,
    /// The output block grid.
    pub grid: BlockGrid,
}

/// The official preparation (`--round 32` center crop, antialiased bicubic): `input` is (1, 3, h, w)
/// in [-1, 1]. The output side must come out as whole blocks, which the official code requires too.
pub fn prepare_official(input: &Tensor, scale: PassScale, block_px: usize, kind: Bicubic) -> Result<Prepared> {
    let (_, _, h0, w0) = input.dims4()?;
    let (h, w) = (h0 / 32 * 32, w0 / 32 * 32);
    if h == 0 || w == 0 {
        return Err(InfditError::Input(format!("image {w0}x{h0} is smaller than 32 px on a side")));
    }
    let (top, left) = center_crop_offsets(h0, w0, h, w);
    let lr = input.narrow(2, top, h)?.narrow(3, left, w)?;
    let f = scale.factor();
    let (oh, ow) = (h * f, w * f);
    if oh % block_px != 0 || ow % block_px != 0 {
        return Err(InfditError::Input(format!(
            "with the official crop, a {w}x{h} input gives a {ow}x{oh} output that is not a multiple of the \
             {block_px}-px block (the official 2x mode needs sides that are multiples of 64)"
        )));
    }
    let concat_lr = ConcatLr::Upsample { src: lr.clone(), height: oh, width: ow, kind };
    let lr = match scale {
        PassScale::X4 => lr,
        PassScale::X2 => resize_tensor(&lr, h / 2, w / 2, kind)?,
    };
    let grid = BlockGrid::for_image(oh, ow, block_px)?;
    Ok(Prepared { lr, concat_lr, grid })
}

/// Where the requested output lies inside the model's output, after [`prepare_padded`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputCrop {
    /// First output row.
    pub top: usize,
    /// First output column.
    pub left: usize,
    /// Output height (the input height times the pass factor).
    pub height: usize,
    /// Output width.
    pub width: usize,
}

/// Preparation for any input size: the input (1, 3, h, w) in [-1, 1] is reflect-padded (split
/// evenly between the two sides) to the next multiple of the LR block (32 px for 4x, 64 px for the
/// 2x mode), prepared as the official pipeline does, and the returned crop cuts the exact
/// `factor * h x factor * w` result out of the model's output. No pixel of the input is lost,
/// unlike the official center crop ([`prepare_official`]).
///
/// Also returns the image CLIP should see: the unpadded input (4x) or its half-size version (2x),
/// so the global embedding is not skewed by the mirrored margins.
pub fn prepare_padded(
    input: &Tensor,
    scale: PassScale,
    block_px: usize,
    kind: Bicubic,
) -> Result<(Prepared, OutputCrop, Tensor)> {
    let (_, _, h0, w0) = input.dims4()?;
    if h0 == 0 || w0 == 0 {
        return Err(InfditError::Input(format!("image {w0}x{h0} is empty")));
    }
    let f = scale.factor();
    // LR multiple that makes the output whole blocks (32 for 4x, 64 for 2x with 128-px blocks).
    let unit = block_px / f;
    let (h, w) = (h0.div_ceil(unit) * unit, w0.div_ceil(unit) * unit);
    let (top, left) = ((h - h0) / 2, (w - w0) / 2);
    let padded = crate::imageio::pad_reflect(input, top, h - h0 - top, left, w - w0 - left)?;
    let concat_lr = ConcatLr::Upsample { src: padded.clone(), height: h * f, width: w * f, kind };
    let lr = match scale {
        PassScale::X4 => padded,
        PassScale::X2 => resize_tensor(&padded, h / 2, w / 2, kind)?,
    };
    let grid = BlockGrid::for_image(h * f, w * f, block_px)?;
    let clip_input = match scale {
        PassScale::X4 => input.clone(),
        PassScale::X2 => resize_tensor(input, (h0 / 2).max(1), (w0 / 2).max(1), kind)?,
    };
    Ok((
        Prepared { lr, concat_lr, grid },
        OutputCrop { top: top * f, left: left * f, height: h0 * f, width: w0 * f },
        clip_input,
    ))
}

/// Progress of a sampling run (all counters at once, so a front end can show any of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Network evaluations finished (counting those done before a resume).
    pub evals_done: usize,
    /// Network evaluations in the run.
    pub evals_total: usize,
    /// Sampler steps finished.
    pub steps_done: usize,
    /// Sampler steps in the run.
    pub steps_total: usize,
    /// Blocks finished in the current evaluation (block mode; whole-image mode reports 0 or all).
    pub blocks_done: usize,
    /// Blocks in the image.
    pub blocks_total: usize,
}

/// How one network evaluation is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The whole image in one forward (the reference's `full` inference); memory grows with the area.
    WholeImage,
    /// The UniBA block scheduler: `block_batch x block_batch` blocks per forward, raster order,
    /// keys/values cached in `kv_dtype`; memory grows with the width.
    Blocks {
        /// Blocks per batch side (n >= 1).
        block_batch: usize,
        /// Storage precision of the K/V cache.
        kv_dtype: DType,
    },
}

/// Settings of a sampling run.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// Sampler settings.
    pub heun: HeunConfig,
    /// Whole image or block scheduler.
    pub mode: Mode,
    /// Where to save the state after each step, and resume from.
    pub checkpoint_dir: Option<std::path::PathBuf>,
    /// Stop (returning no sample) once this many steps are done; for interruption and tests.
    pub stop_after_steps: Option<usize>,
    /// Block mode only: keep the sampler's image-size state (x, the Heun derivative and Euler
    /// point) in a file in this folder instead of memory, and compute the upsampled LR and the
    /// initial state one block row at a time, so memory stays bounded whatever the height. The
    /// file is read and written block by block; it needs 36 bytes per output pixel of disk, 48
    /// with `checkpoint_dir`, when it is also the resume state (kept there until the run
    /// finishes); without `checkpoint_dir` it is deleted as soon as it is opened and vanishes with
    /// the process. The result is bit-identical to the in-memory run, and comes back as
    /// [`SampleOutcome::final_sample`] read from that file ([`SampleOutcome::sample`] is `None`).
    pub state_dir: Option<std::path::PathBuf>,
    /// Set from another thread (a Ctrl-C handler) to stop the run: [`sample`] checks it before
    /// every network evaluation (whole image) or block batch (scheduler) and returns
    /// [`InfditError::Interrupted`]. The saved state of the last completed step, if any, is kept,
    /// so the run can be resumed.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Block mode: keep the scheduler's K/V cache in host memory and copy what each block batch
    /// needs to the model's device ([`BlockDenoiser::with_kv_offload`]); for a model on a GPU,
    /// whose memory then does not grow with the image. Bit-identical results.
    pub kv_offload: bool,
}

impl PartialEq for SampleOptions {
    /// Field by field; two cancellation flags are equal when they are the same flag.
    fn eq(&self, o: &Self) -> bool {
        let Self { heun, mode, checkpoint_dir, stop_after_steps, state_dir, cancel, kv_offload } = self;
        let same_flag = match (cancel, &o.cancel) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        *heun == o.heun
            && *mode == o.mode
            && *checkpoint_dir == o.checkpoint_dir
            && *stop_after_steps == o.stop_after_steps
            && *state_dir == o.state_dir
            && *kv_offload == o.kv_offload
            && same_flag
    }
}

/// A denoiser that refuses to start an evaluation once the cancellation flag is set.
struct Cancellable<'a, 'b> {
    inner: &'a mut dyn Denoise,
    flag: &'b AtomicBool,
}

impl Denoise for Cancellable<'_, '_> {
    fn denoise(&mut self, x: &Tensor, sigma: f32, index: usize) -> candle_core::Result<Tensor> {
        if self.flag.load(Ordering::Relaxed) {
            candle_core::bail!("interrupted");
        }
        self.inner.denoise(x, sigma, index)
    }
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            heun: HeunConfig::default(),
            mode: Mode::Blocks { block_batch: 1, kv_dtype: DType::F32 },
            checkpoint_dir: None,
            stop_after_steps: None,
            state_dir: None,
            cancel: None,
            kv_offload: false,
        }
    }
}

/// The result of [`sample`].
#[derive(Debug, Clone)]
pub struct SampleOutcome {
    /// The final sample (1, 3, H, W), or `None` when the run stopped early or kept its state in a
    /// state folder (then see `final_sample`).
    pub sample: Option<Tensor>,
    /// The final sample, in memory or in the state folder's file, readable band by band (e.g.
    /// [`FinalSample::to_rgb8`]); `None` when the run stopped early.
    pub final_sample: Option<FinalSample>,
    /// Steps done, including those done before a resume.
    pub steps_done: usize,
    /// Step the run resumed from (0 for a fresh run).
    pub resumed_from: usize,
    /// Peak size of the block scheduler's K/V cache in bytes (0 in whole-image mode).
    pub peak_kv_cache_bytes: usize,
}

/// What a denoiser needs of one image, on the model's device.
#[derive(Debug, Clone)]
pub struct DenoiserInputs {
    /// (1, vector_dim)
    pub clip: Tensor,
    /// The LR the network sees, (1, 3, h, w).
    pub lr: Tensor,
    /// (1, 3, H, W)
    pub concat_lr: Tensor,
    /// The output block grid.
    pub grid: BlockGrid,
}

impl DenoiserInputs {
    /// `clip` (1, vector_dim), `lr` (1, 3, h, w), `concat_lr` (1, 3, H, W).
    pub fn new(model: &InfDit, clip: &Tensor, lr: &Tensor, concat_lr: &Tensor) -> candle_core::Result<Self> {
        let (_, _, h, w) = concat_lr.dims4()?;
        let dev = model.device();
        Ok(Self {
            clip: clip.to_device(dev)?,
            lr: lr.to_device(dev)?,
            concat_lr: concat_lr.to_device(dev)?,
            grid: BlockGrid::for_image(h, w, model.config().block_px)?,
        })
    }
}

/// The EDM denoiser on the whole image at once (the reference's `full` inference).
pub struct WholeImageDenoiser<'a> {
    model: &'a InfDit,
    inputs: DenoiserInputs,
    image: ImageCond,
    kv: WholeImageKv,
    /// Called after each evaluation with the number of evaluations so far.
    pub on_eval: Option<Box<dyn FnMut(usize) + 'a>>,
    evals: usize,
}

impl<'a> WholeImageDenoiser<'a> {
    /// A denoiser for one image: `clip` (1, vector_dim), `lr` (1, 3, h, w), `concat_lr` (1, 3, H, W).
    pub fn new(model: &'a InfDit, clip: &Tensor, lr: &Tensor, concat_lr: &Tensor) -> Result<Self> {
        let inputs = DenoiserInputs::new(model, clip, lr, concat_lr)?;
        Ok(Self {
            model,
            kv: WholeImageKv::new(&inputs.grid, model.device())?,
            image: model.image_cond(&inputs.lr, inputs.grid)?,
            inputs,
            on_eval: None,
            evals: 0,
        })
    }

    /// Starts the RoPE positions at token (row, column) instead of (0, 0) (training's random start).
    pub fn set_rope_offset(&mut self, offset: (usize, usize)) {
        self.image.rope_offset = offset;
    }

    /// `D(x; sigma)` with, when `trace` is given, the hidden state after each layer in row-major
    /// token order (1, N, D).
    pub fn denoise_traced(&mut self, x: &Tensor, sigma: f32, trace: Option<&mut Vec<Tensor>>) -> Result<Tensor> {
        let pre = self.model.config().precond;
        let s = pre.scalings(sigma);
        let step = self.model.step_cond(s.c_noise, &self.inputs.clip)?;
        let x_in = pre.network_input(x, &self.inputs.concat_lr, &s)?;
        let bp = self.model.config().block_px;
        let grid = self.inputs.grid;
        let pos = grid.raster();
        let mut local = Vec::new();
        let f = self.model.forward_blocks(
            &image_to_blocks(&x_in, bp)?,
            &pos,
            &step,
            &self.image,
            &mut self.kv,
            trace.is_some().then_some(&mut local),
        )?;
        if let Some(t) = trace {
            let bt = self.model.config().block_tokens();
            for h in local {
                t.push(blocks_tokens_to_row_major(&h, &grid, bt)?);
            }
        }
        let f = blocks_to_image(&f, &grid)?;
        let d = pre.denoised(f, x, &self.inputs.concat_lr, &s)?;
        self.evals += 1;
        if let Some(cb) = self.on_eval.as_mut() {
            cb(self.evals);
        }
        Ok(d)
    }

    /// The conditioning vector c for a sigma (after the SiLU), (1, D).
    pub fn cond_vector(&self, sigma: f32) -> Result<Tensor> {
        Ok(self.model.step_cond(EdmScalings::new(sigma).c_noise, &self.inputs.clip)?.c)
    }
}

/// Block-major hidden states (n, T, D) of a full grid to row-major tokens (1, N, D).
pub fn blocks_tokens_to_row_major(h: &Tensor, grid: &BlockGrid, bt: usize) -> candle_core::Result<Tensor> {
    let d = h.dim(2)?;
    h.reshape((grid.rows, grid.cols, bt, bt, d))?.permute((0, 2, 1, 3, 4))?.reshape((
        1,
        grid.rows * bt * grid.cols * bt,
        d,
    ))
}

impl Denoise for WholeImageDenoiser<'_> {
    fn denoise(&mut self, x: &Tensor, sigma: f32, _index: usize) -> candle_core::Result<Tensor> {
        self.denoise_traced(x, sigma, None).map_err(|e| match e {
            InfditError::Candle(e) => e,
            e => candle_core::Error::Msg(e.to_string()),
        })
    }
}

/// Samples from `eps` (1, 3, H, W): the Heun run of the reference, in whole-image or block mode,
/// optionally saving its state after every step and resuming from it.
pub fn sample(
    model: &Model,
    prep: &Prepared,
    clip_vec: &Tensor,
    eps: &Tensor,
    opts: &SampleOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<SampleOutcome> {
    sample_with_noise(model, prep, clip_vec, &Noise::Image(eps.clone()), opts, progress)
}

/// [`sample`] with the noise given as a [`Noise`]: [`Noise::Seeded`] draws it block by block, so
/// that with [`SampleOptions::state_dir`] no image-size tensor is ever held.
///
/// In block mode each sweep of the scheduler also applies the Heun update to the blocks it has
/// just denoised (the update is elementwise), reading and writing the per-block state in memory
/// or in the state folder's file; the values are those of [`crate::diffusion::heun_step`] on the
/// whole image, bit for bit.
pub fn sample_with_noise(
    model: &Model,
    prep: &Prepared,
    clip_vec: &Tensor,
    noise: &Noise,
    opts: &SampleOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<SampleOutcome> {
    let heun = &opts.heun;
    heun.validate()?;
    let sigmas = heun.sigmas();
    let dev = model.dit.device();
    let grid = prep.grid;
    noise.check(&grid)?;
    if prep.concat_lr.dims()? != (grid.height(), grid.width()) {
        return Err(InfditError::Input(format!(
            "the upsampled LR is {:?}, the output grid {}x{}",
            prep.concat_lr.dims()?,
            grid.height(),
            grid.width()
        )));
    }
    if opts.state_dir.is_some() && opts.mode == Mode::WholeImage {
        return Err(InfditError::Config(
            "a state folder (--state-dir) needs block mode: whole-image mode holds the whole image anyway".into(),
        ));
    }
    let record = opts.checkpoint_dir.as_ref().map(|d| d.join("infdit-state.safetensors"));
    let _checkpoint_lock = lock_checkpoint_dir(opts)?;
    let fingerprint = run_fingerprint(&prep.concat_lr, noise, &grid, clip_vec, heun, model)?;
    let saved = load_checked(record.as_deref(), &fingerprint, sigmas.len() - 1, &grid)?;
    let start = saved.as_ref().map_or(0, |s| s.steps_done);
    let evals_before = |k: usize| if k == 0 { 0 } else { (2 * k).min(heun.evaluations()) };
    let blocks_total = grid.len();
    let base = Progress {
        evals_done: evals_before(start),
        evals_total: heun.evaluations(),
        steps_done: start,
        steps_total: heun.steps,
        blocks_done: 0,
        blocks_total,
    };
    let state = std::cell::Cell::new(base);
    let progress = std::cell::RefCell::new(progress);
    let report = |p: Progress| {
        state.set(p);
        (progress.borrow_mut())(p)
    };
    report(base);
    let last = sigmas.len() - 1;
    let stop = |steps_done: usize| opts.stop_after_steps.is_some_and(|s| steps_done >= s);
    let never = AtomicBool::new(false);
    let flag: &AtomicBool = opts.cancel.as_deref().unwrap_or(&never);
    let step_done = |steps_done: usize| {
        let p = state.get();
        report(Progress { steps_done, ..p });
    };

    let (steps_done, final_sample, peak_kv_cache_bytes) = match opts.mode {
        Mode::WholeImage => {
            let concat_lr = prep.concat_lr.full()?.to_device(dev)?;
            let mut x = match saved {
                Some(crate::resume::SavedState { x: Some(x), .. }) => x.to_device(dev)?,
                Some(_) => return Err(state_dir_needed(record.as_deref())),
                None => initial_state(&concat_lr, &noise.image(&grid, dev)?, sigmas[0])?,
            };
            let mut den = WholeImageDenoiser::new(&model.dit, clip_vec, &prep.lr, &concat_lr)?;
            den.on_eval = Some(Box::new(|_| {
                let p = state.get();
                report(Progress { evals_done: p.evals_done + 1, blocks_done: blocks_total, ..p })
            }));
            let mut den = Cancellable { inner: &mut den, flag };
            let mut steps_done = start;
            for i in start..last {
                if stop(steps_done) {
                    break;
                }
                let stepped = crate::diffusion::heun_step(&mut den, &x, &sigmas, i);
                if flag.load(Ordering::Relaxed) {
                    return Err(InfditError::Interrupted { steps_done });
                }
                x = stepped?;
                check_finite(&x, i)?;
                steps_done = i + 1;
                if let Some(f) = &record {
                    crate::resume::save_state(f, Some(&x), steps_done, &fingerprint)?;
                }
                step_done(steps_done);
            }
            (steps_done, (steps_done == last).then(|| FinalSample::from_tensor(x)), 0)
        }
        Mode::Blocks { block_batch, kv_dtype } => {
            // In memory the upsampled LR is computed once; with a state folder, per batch row. It
            // stays in host memory, as does the sampler state: each block batch goes to the
            // model's device when it is denoised.
            let concat_lr = match &opts.state_dir {
                None => ConcatLr::Tensor(prep.concat_lr.full()?),
                Some(_) => prep.concat_lr.clone(),
            };
            let mut store = match (&opts.state_dir, &saved) {
                (None, _) => StateStore::Ram(RamStore::new(grid)),
                (Some(dir), Some(s @ crate::resume::SavedState { x: None, .. })) => {
                    if !dir.join(STATE_FILE).exists() {
                        return Err(state_dir_needed(record.as_deref()));
                    }
                    let sums = s.block_checksums.as_deref().unwrap_or(&[]);
                    StateStore::File(FileStore::open(dir, grid, &fingerprint, s.steps_done, sums)?)
                }
                (Some(dir), _) => StateStore::File(FileStore::create(dir, grid, &fingerprint, record.is_some())?),
            };
            match saved {
                None => {
                    // x0 = concat_lr + sigma_0 eps, one block row at a time.
                    let bp = grid.block_px;
                    for row in 0..grid.rows {
                        let pos: Vec<BlockPos> = (0..grid.cols).map(|col| BlockPos { row, col }).collect();
                        let local: Vec<BlockPos> = (0..grid.cols).map(|col| BlockPos { row: 0, col }).collect();
                        let band = crate::device::to_device_compact(&concat_lr.rows(row * bp, (row + 1) * bp)?, dev)?;
                        let up = take_blocks(&band, bp, &local)?;
                        let x0 = initial_state(&up, &noise.blocks(&grid, &pos, dev)?, sigmas[0])?;
                        store.write(Slot::X(0), &pos, &x0)?;
                    }
                }
                Some(crate::resume::SavedState { x: Some(x), steps_done, .. }) => {
                    store.write(Slot::X(steps_done), &grid.raster(), &image_to_blocks(&x, grid.block_px)?)?;
                }
                Some(crate::resume::SavedState { x: None, .. }) if opts.state_dir.is_none() => {
                    return Err(state_dir_needed(record.as_deref()));
                }
                Some(_) => {}
            }
            let mut den =
                BlockDenoiser::with_concat_lr(&model.dit, clip_vec, &prep.lr, concat_lr, block_batch, kv_dtype)?
                    .with_kv_offload(opts.kv_offload);
            den.on_batch = Some(Box::new(|s| {
                let p = state.get();
                let evals_done = p.evals_done + (s.blocks_done == s.blocks_total) as usize;
                report(Progress { evals_done, blocks_done: s.blocks_done % s.blocks_total.max(1), ..p })
            }));
            let mut steps_done = start;
            for i in start..last {
                if stop(steps_done) {
                    break;
                }
                heun_step_blocks(&mut den, &mut store, &sigmas, i, dev, flag)?;
                steps_done = i + 1;
                if let Some(f) = &record {
                    match &store {
                        StateStore::Ram(_) => {
                            let x = store.image(Slot::X(steps_done))?;
                            crate::resume::save_state(f, Some(&x), steps_done, &fingerprint)?;
                        }
                        StateStore::File(fs) => {
                            store.sync()?;
                            let sums = fs.checksums(Slot::X(steps_done))?;
                            crate::resume::save_block_record(f, &sums, steps_done, &fingerprint)?;
                        }
                    }
                }
                step_done(steps_done);
            }
            let peak = den.peak_cache_bytes;
            drop(den);
            let fin = if steps_done == last {
                if let StateStore::File(f) = &mut store {
                    // The run is complete: the file is no checkpoint any more, only the result.
                    f.unlink()?;
                }
                Some(store.into_final(Slot::X(last))?)
            } else {
                None
            };
            (steps_done, fin, peak)
        }
    };
    if final_sample.is_some()
        && let Some(f) = &record
    {
        let _ = std::fs::remove_file(f);
    }
    let sample = match &final_sample {
        Some(f) if f.in_memory() => Some(f.to_tensor()?),
        _ => None,
    };
    Ok(SampleOutcome { sample, final_sample, steps_done, resumed_from: start, peak_kv_cache_bytes })
}

/// One Heun step of the block scheduler, done inside its sweeps: the first sweep denoises `x` and
/// stores the derivative and Euler point of each batch (or, for the last step, the new `x`); the
/// second denoises the Euler point and stores the corrected `x`. Bit-identical to
/// [`crate::diffusion::heun_step`] on the whole image (the update is elementwise).
fn heun_step_blocks(
    den: &mut BlockDenoiser<'_>,
    store: &mut StateStore,
    sigmas: &[f32],
    i: usize,
    dev: &Device,
    flag: &AtomicBool,
) -> Result<()> {
    let (s, s_next) = (sigmas[i], sigmas[i + 1]);
    let store = std::cell::RefCell::new(store);
    // Checked before each block batch is read: a Ctrl-C stops the sweep at the next batch.
    let go = || if flag.load(Ordering::Relaxed) { Err(InfditError::Interrupted { steps_done: i }) } else { Ok(()) };
    den.sweep_blocks::<InfditError>(
        s,
        &mut |pos| {
            go()?;
            store.borrow().read(Slot::X(i), pos)
        },
        &mut |pos, x, d1| {
            let (d, euler) = crate::diffusion::heun_euler(x, &d1, s, s_next)?;
            let mut st = store.borrow_mut();
            if s_next <= 0.0 {
                check_finite(&euler, i)?;
                st.write(Slot::X(i + 1), pos, &euler)
            } else {
                st.write(Slot::D, pos, &d)?;
                st.write(Slot::Euler, pos, &euler)
            }
        },
    )?;
    if s_next <= 0.0 {
        return Ok(());
    }
    den.sweep_blocks::<InfditError>(
        s_next,
        &mut |pos| {
            go()?;
            store.borrow().read(Slot::Euler, pos)
        },
        &mut |pos, euler, d2| {
            let mut st = store.borrow_mut();
            let x = st.read(Slot::X(i), pos)?.to_device(dev)?;
            let d = st.read(Slot::D, pos)?.to_device(dev)?;
            let x_new = crate::diffusion::heun_correct(&x, &d, euler, &d2, s, s_next)?;
            check_finite(&x_new, i)?;
            st.write(Slot::X(i + 1), pos, &x_new)
        },
    )
}

/// Locks the checkpoint folder, if any, against a second process for as long as the lock lives.
fn lock_checkpoint_dir(opts: &SampleOptions) -> Result<Option<crate::resume::FolderLock>> {
    let Some(d) = &opts.checkpoint_dir else { return Ok(None) };
    Ok(Some(crate::resume::lock_folder(d, "checkpoint folder (--checkpoint-dir)")?))
}

/// The saved state in `record`, if any, checked against this run (at most `last` steps, the grid's size).
fn load_checked(
    record: Option<&Path>,
    fingerprint: &str,
    last: usize,
    grid: &BlockGrid,
) -> Result<Option<crate::resume::SavedState>> {
    let Some(f) = record else { return Ok(None) };
    let saved = crate::resume::load_state(f, fingerprint)?;
    if let Some(s) = &saved {
        s.check(f, last, grid.height(), grid.width())?;
    }
    Ok(saved)
}

/// The error for a checkpoint whose state is in a state folder this run does not have.
fn state_dir_needed(record: Option<&Path>) -> InfditError {
    InfditError::Input(format!(
        "{}: this checkpoint's state is in a state folder ({}); resume with the same --state-dir, in block mode",
        record.map_or_else(String::new, |p| p.display().to_string()),
        crate::schedule::state::STATE_FILE
    ))
}

/// A hash of everything that determines a run's trajectory, so a saved state is only resumed by
/// the same run.
fn run_fingerprint(
    concat_lr: &ConcatLr,
    noise: &Noise,
    grid: &BlockGrid,
    clip: &Tensor,
    heun: &HeunConfig,
    model: &Model,
) -> Result<String> {
    let mut h = crate::resume::Fnv::default();
    concat_lr.fingerprint(&mut h)?;
    match noise {
        Noise::Image(t) => h.tensor(t)?,
        Noise::Seeded(seed) => h.bytes(format!("seeded noise {seed} on {grid:?}").as_bytes()),
    }
    h.tensor(clip)?;
    h.bytes(format!("{heun:?}/{:?}/{:?}/{:016x}", model.dit.dtype(), model.cfg, model.weights_digest).as_bytes());
    Ok(format!("{:016x}", h.finish()))
}

/// Fails when the sampler state holds a NaN or infinity (a broken model or input).
pub fn check_finite(x: &Tensor, step: usize) -> candle_core::Result<()> {
    let s = x.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    if s.is_finite() {
        Ok(())
    } else {
        candle_core::bail!(
            "the sampler state is not finite after step {step}: check the model weights, the input image and noise, \
             and the sampler settings (--sigma-max)"
        )
    }
}
