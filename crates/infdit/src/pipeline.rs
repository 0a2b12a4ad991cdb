//! From a low-resolution image to the upscaled sample: model loading, the official input
//! preparation (§2, §7), the EDM denoiser in whole-image mode, and the sampling loop.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::clip::ClipVision;
use crate::config::ModelConfig;
use crate::diffusion::{Denoise, EdmScalings, HeunConfig, heun_sample, initial_state};
use crate::error::{InfditError, Result};
use crate::imageio::resize::{Bicubic, center_crop_offsets, resize_tensor};
use crate::model::blocks::{BlockGrid, WholeImageKv, blocks_to_image, image_to_blocks};
use crate::model::{ImageCond, InfDit};
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
        let skipped_dead_keys = loader.finish()?;
        Ok(Self { cfg: cfg.clone(), dit, clip, skipped_dead_keys })
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

    /// The conditioning vector of an LR image (1, 3, h, w) in [-1, 1]: the CLIP embedding, or zeros
    /// for a model without CLIP.
    pub fn clip_vector(&self, lr: &Tensor, kind: Bicubic) -> Result<Tensor> {
        match &self.clip {
            Some(c) => Ok(c.embed_image(lr, kind)?),
            None => Ok(Tensor::zeros((1, self.cfg.dit.vector_dim), DType::F32, lr.device())?),
        }
    }
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

/// Network inputs prepared from an image.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The LR the network sees (CLIP and cross-attention), (1, 3, H/4, W/4), not clipped.
    pub lr: Tensor,
    /// The bicubic upsample at output size, clipped to [-1, 1], (1, 3, H, W).
    pub concat_lr: Tensor,
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
    let concat_lr = resize_tensor(&lr, oh, ow, kind)?.clamp(-1f32, 1f32)?;
    let lr = match scale {
        PassScale::X4 => lr,
        PassScale::X2 => resize_tensor(&lr, h / 2, w / 2, kind)?,
    };
    let grid = BlockGrid::for_image(oh, ow, block_px)?;
    Ok(Prepared { lr, concat_lr, grid })
}

/// Progress of a sampling run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Network evaluations finished.
    pub evals_done: usize,
    /// Network evaluations in the run.
    pub evals_total: usize,
    /// Sampler steps finished.
    pub steps_done: usize,
    /// Sampler steps in the run.
    pub steps_total: usize,
}

/// The EDM denoiser on the whole image at once (the reference's `full` inference).
pub struct WholeImageDenoiser<'a> {
    model: &'a InfDit,
    clip: Tensor,
    image: ImageCond,
    concat_lr: Tensor,
    kv: WholeImageKv,
    /// Called after each evaluation with the number of evaluations so far.
    pub on_eval: Option<Box<dyn FnMut(usize) + 'a>>,
    evals: usize,
}

impl<'a> WholeImageDenoiser<'a> {
    /// A denoiser for one image: `clip` (1, vector_dim), `lr` (1, 3, h, w), `concat_lr` (1, 3, H, W).
    pub fn new(model: &'a InfDit, clip: &Tensor, lr: &Tensor, concat_lr: &Tensor) -> Result<Self> {
        let (_, _, h, w) = concat_lr.dims4()?;
        let grid = BlockGrid::for_image(h, w, model.config().block_px)?;
        let dev = model.device();
        Ok(Self {
            model,
            clip: clip.to_device(dev)?,
            image: model.image_cond(&lr.to_device(dev)?, grid)?,
            concat_lr: concat_lr.to_device(dev)?,
            kv: WholeImageKv::new(&grid, dev)?,
            on_eval: None,
            evals: 0,
        })
    }

    /// `D(x; sigma)` with, when `trace` is given, the hidden state after each layer in row-major
    /// token order (1, N, D).
    pub fn denoise_traced(&mut self, x: &Tensor, sigma: f32, trace: Option<&mut Vec<Tensor>>) -> Result<Tensor> {
        let s = EdmScalings::new(sigma);
        let step = self.model.step_cond(s.c_noise, &self.clip)?;
        let x_in = Tensor::cat(&[(x * s.c_in as f64)?, (&self.concat_lr * s.c_in as f64)?], 1)?;
        let bp = self.model.config().block_px;
        let grid = self.image.grid;
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
        let d = ((f * s.c_out as f64)? + (x * s.c_skip as f64)?)?;
        self.evals += 1;
        if let Some(cb) = self.on_eval.as_mut() {
            cb(self.evals);
        }
        Ok(d)
    }

    /// The conditioning vector c for a sigma (after the SiLU), (1, D).
    pub fn cond_vector(&self, sigma: f32) -> Result<Tensor> {
        Ok(self.model.step_cond(EdmScalings::new(sigma).c_noise, &self.clip)?.c)
    }
}

/// Block-major hidden states (n, T, D) of a full grid to row-major tokens (1, N, D).
pub fn blocks_tokens_to_row_major(h: &Tensor, grid: &BlockGrid, bt: usize) -> candle_core::Result<Tensor> {
    let d = h.dim(2)?;
    h.reshape((grid.rows, grid.cols, bt, bt, d))?
        .permute((0, 2, 1, 3, 4))?
        .reshape((1, grid.rows * bt * grid.cols * bt, d))
}

impl Denoise for WholeImageDenoiser<'_> {
    fn denoise(&mut self, x: &Tensor, sigma: f32, _index: usize) -> candle_core::Result<Tensor> {
        self.denoise_traced(x, sigma, None).map_err(|e| match e {
            InfditError::Candle(e) => e,
            e => candle_core::Error::Msg(e.to_string()),
        })
    }
}

/// Samples in whole-image mode from `eps` (1, 3, H, W): the 20-step Heun run of the reference.
pub fn sample_whole_image(
    model: &Model,
    prep: &Prepared,
    clip_vec: &Tensor,
    eps: &Tensor,
    heun: &HeunConfig,
    progress: &mut dyn FnMut(Progress),
) -> Result<Tensor> {
    let sigmas = heun.sigmas();
    let dev = model.dit.device();
    let x0 = initial_state(&prep.concat_lr.to_device(dev)?, &eps.to_device(dev)?, sigmas[0])?;
    let total = heun.evaluations();
    let steps_total = heun.steps;
    let progress = std::cell::RefCell::new(progress);
    let done_steps = std::cell::Cell::new(0usize);
    let mut den = WholeImageDenoiser::new(&model.dit, clip_vec, &prep.lr, &prep.concat_lr)?;
    den.on_eval = Some(Box::new(|e| {
        (progress.borrow_mut())(Progress { evals_done: e, evals_total: total, steps_done: done_steps.get(), steps_total })
    }));
    let out = heun_sample(&mut den, x0, &sigmas, 0, &mut |k, x| {
        done_steps.set(k + 1);
        check_finite(x, k)
    })?;
    Ok(out)
}

/// Fails when the sampler state holds a NaN or infinity (a broken model or input).
pub fn check_finite(x: &Tensor, step: usize) -> candle_core::Result<()> {
    let s = x.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    if s.is_finite() {
        Ok(())
    } else {
        candle_core::bail!("the sampler state is not finite after step {step}: check the model weights and input")
    }
}
