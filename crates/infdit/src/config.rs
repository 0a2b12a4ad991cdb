//! Model configuration: the DiT network and the CLIP image tower.
//!
//! Two file formats are accepted by [`ModelConfig::from_file`]:
//! * the project's own JSON (`{"dit": {...}, "clip": {...}}`, the serde form of [`ModelConfig`]);
//! * the parity/official description (`official_cli_flags` with the official flag names, and the CLIP
//!   tower under `clip.open_clip_model_config`), as in `shared/parity/config.json`.
//!
//! The built-in default, [`ModelConfig::released`], is the released Inf-DiT checkpoint (hidden 1280,
//! depth 28, 16 heads, patch 4, block 128, open_clip ViT-L/14).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{InfditError, Result};

/// Hyper-parameters of the diffusion transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DitConfig {
    /// Hidden width D (`--hidden-size`). Released: 1280.
    pub hidden: usize,
    /// Number of transformer layers (`--num-layers`). Released: 28.
    pub depth: usize,
    /// Attention heads (`--num-attention-heads`). Released: 16 (head dim 80).
    pub heads: usize,
    /// MLP inner width. Released: 4 * hidden = 5120.
    pub mlp_hidden: usize,
    /// Patch size in pixels (`--patch-size`). Released: 4.
    pub patch: usize,
    /// Input channels: noisy RGB plus upsampled LR RGB (`--in-channels`). Released: 6.
    pub in_channels: usize,
    /// Output channels (`--out-channels`). Released: 3.
    pub out_channels: usize,
    /// UniBA block size in pixels (`--image-block-size`). Released: 128.
    pub block_px: usize,
    /// CLIP embedding width fed to the condition MLP (`--vector-dim`). Released: 768.
    pub vector_dim: usize,
    /// Sinusoid channels of the time embedding. Released: 192.
    pub time_channels: usize,
    /// `--image-size`; fixes the RoPE table side `8 * image_size / patch` and the position modulo.
    pub image_size: usize,
    /// Ratio HR/LR the network was built for (`--sr-scale`, a model constant). Released: 4.
    pub sr_scale: usize,
    /// Patch size of the LR convolution feeding the layer-0 cross-attention. Released: 2.
    pub lr_patch: usize,
    /// LayerNorm epsilon of the transformer. Released: 1e-6.
    pub ln_eps: f64,
    /// How the network output becomes the denoised image. Absent from a config file means the
    /// released preconditioning.
    #[serde(default, skip_serializing_if = "Precond::is_released")]
    pub precond: Precond,
}

/// The EDM preconditioning around the network (spec §3.7): `D(x; sigma)` from the network output.
///
/// The released model uses `sigma_data` 0.5 on the image itself. infdit adds a residual mode for
/// its own small models (not in the reference, no released checkpoint uses it): the diffusion runs
/// on `x - u`, the difference from the upsampled LR image `u`, the network sees
/// `[c_in^2 sd (x - u), u]` (the LR unscaled; the noisy residual fades out at high noise, see
/// [`crate::diffusion::Precond::network_input`]), and `D = u + c_skip (x - u) + c_out F`. With a zero final layer this denoiser
/// returns the bicubic upsampling, so every step of training starts from bicubic quality.
///
/// In residual mode a model can also ask for **coring** (`"coring": [low, high]`): each denoised
/// residual `r = D - u` is firmly shrunk, per sample: dropped where `|r| <= low`, kept whole where
/// `|r| >= high`, and in between ramped linearly from 0 to `high` (Gao and Bruce's firm shrinkage:
/// `sign(r) max(0, min(|r|, high (|r| - low) / (high - low)))`). The faint corrections that a small
/// model draws on flat areas, where it knows no better than the upsampling, then leave the upsampling
/// as it is instead of flipping the rounding of some pixels, while edges keep their full correction
/// ([`crate::diffusion::Precond::core`]). Training never applies it.
///
/// It can also ask for a **flat-area gate** (`"flat_gate": full`): the (cored) residual is scaled at
/// each output pixel by `min(range / full, 1)`, upsampled from the LR, where `range` is the LR's luma
/// range in the 3 x 3 neighbourhood: corrections fade out where the LR is flat and stay whole wherever
/// it varies by `full` or more ([`crate::diffusion::gate`]). Training never applies it either.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Precond {
    /// EDM's data standard deviation. Released: 0.5.
    pub sigma_data: f32,
    /// Residual mode (see the type docs). Released: false.
    pub residual: bool,
    /// Residual mode: the coring thresholds `[low, high]` in image units (`[-1, 1]`, so one 8-bit
    /// level is `2 / 255`); `None` (the default, and absent from a file): no coring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coring: Option<[f32; 2]>,
    /// Residual mode: the LR luma range (image units) from which the flat-area gate keeps a
    /// correction whole; `None` (the default, and absent from a file): no gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flat_gate: Option<f32>,
}

impl Default for Precond {
    fn default() -> Self {
        Self { sigma_data: 0.5, residual: false, coring: None, flat_gate: None }
    }
}

impl Precond {
    /// Largest coring threshold accepted: 0.1 in image units, about 13 8-bit levels (beyond that it
    /// would erase real detail, not faint noise).
    pub const MAX_CORING: f32 = 0.1;

    /// Largest flat-gate range accepted: 0.5 in image units, a quarter of the whole luma range
    /// (beyond that the gate would fade real edges).
    pub const MAX_FLAT_GATE: f32 = 0.5;

    /// The same preconditioning without its inference-only settings (coring, flat gate): what
    /// training runs the network through.
    pub fn for_training(&self) -> Self {
        Self { coring: None, flat_gate: None, ..*self }
    }

    /// Whether this is the released preconditioning.
    pub fn is_released(&self) -> bool {
        *self == Self::default()
    }
}

/// Hyper-parameters of the open_clip ViT image tower (vision part only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipConfig {
    /// Input side in pixels. ViT-L/14: 224.
    pub image_size: usize,
    /// Patch size. ViT-L/14: 14.
    pub patch: usize,
    /// Transformer width. ViT-L/14: 1024.
    pub width: usize,
    /// Number of residual blocks. ViT-L/14: 24.
    pub layers: usize,
    /// Attention heads (width / head_width). ViT-L/14: 16.
    pub heads: usize,
    /// MLP width. ViT-L/14: 4096.
    pub mlp_hidden: usize,
    /// Embedding width after `proj`. ViT-L/14: 768.
    pub output_dim: usize,
    /// LayerNorm epsilon. open_clip: 1e-5.
    pub ln_eps: f64,
    /// Normalisation mean (OpenAI CLIP values).
    pub mean: [f32; 3],
    /// Normalisation std (OpenAI CLIP values).
    pub std: [f32; 3],
}

/// The whole model: DiT plus (optionally) the CLIP tower that makes its conditioning vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The diffusion transformer.
    pub dit: DitConfig,
    /// The CLIP image tower. `None` for models trained without CLIP conditioning: the
    /// conditioning vector is then all zeros.
    pub clip: Option<ClipConfig>,
}

/// Upper bounds of the config values, so that no config can make infdit allocate or loop without
/// limit (the released model is far inside every one of them).
pub mod limits {
    /// Largest hidden width, MLP width, CLIP width, vector and embedding widths.
    pub const MAX_WIDTH: usize = 1 << 16;
    /// Most transformer layers (DiT or CLIP).
    pub const MAX_DEPTH: usize = 512;
    /// Most attention heads.
    pub const MAX_HEADS: usize = 1024;
    /// Largest patch, block, image or CLIP input side in pixels.
    pub const MAX_SIDE: usize = 1 << 14;
    /// Most channels in or out of the network.
    pub const MAX_CHANNELS: usize = 64;
    /// Most values in the computed RoPE table (`rope_positions()^2 * head_dim`; released: 84 M).
    pub const MAX_ROPE_VALUES: u128 = 1 << 30;
    /// Most parameters of the DiT plus the CLIP tower (released: 754 M).
    pub const MAX_PARAMETERS: u128 = 8_000_000_000;
}

/// OpenAI CLIP normalisation constants (used by open_clip and by Inf-DiT's preprocessing).
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
/// See [`CLIP_MEAN`]. Written as published (more digits than f32 holds; the f32 values are the same).
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

impl DitConfig {
    /// The released Inf-DiT network (spec §3.1).
    pub fn released() -> Self {
        Self {
            hidden: 1280,
            depth: 28,
            heads: 16,
            mlp_hidden: 5120,
            patch: 4,
            in_channels: 6,
            out_channels: 3,
            block_px: 128,
            vector_dim: 768,
            time_channels: 192,
            image_size: 512,
            sr_scale: 4,
            lr_patch: 2,
            ln_eps: 1e-6,
            precond: Precond::default(),
        }
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
    /// Tokens along one side of a block (128 / 4 = 32).
    pub fn block_tokens(&self) -> usize {
        self.block_px / self.patch
    }
    /// Tokens in one block (1024).
    pub fn tokens_per_block(&self) -> usize {
        self.block_tokens() * self.block_tokens()
    }
    /// Side of the RoPE position table and modulo of the positions (`8 * image_size / patch` = 1024).
    pub fn rope_positions(&self) -> usize {
        8 * self.image_size / self.patch
    }
    /// LR-feature tokens per block side for the cross-attention (`block_px / sr_scale / lr_patch` = 16).
    pub fn lr_block(&self) -> usize {
        self.block_px / self.sr_scale / self.lr_patch
    }
    /// Side of the LR window around a block (3x3 LR blocks = 48).
    pub fn lr_window(&self) -> usize {
        3 * self.lr_block()
    }

    /// Parameters the network reads from a checkpoint (dead keys and the optional stored RoPE
    /// tables excluded), computed from the config alone. Saturates instead of overflowing.
    pub fn parameter_count(&self) -> u64 {
        let c = |v: usize| v as u128;
        let (dm, l, mlp, p) = (c(self.hidden), c(self.depth), c(self.mlp_hidden), c(self.patch));
        let d = c(self.hidden.checked_div(self.heads).unwrap_or(0));
        let lin = |i: u128, o: u128| i * o + o;
        let per_layer = lin(dm, 3 * dm) + lin(dm, dm) + lin(dm, mlp) + lin(mlp, dm) + 2 * d + lin(dm, 4 * dm);
        let win = c(self.lr_window()) * c(self.lr_window());
        let tokens = c(self.block_px.checked_div(self.patch).unwrap_or(0)).pow(2);
        let cross = lin(dm, dm) + lin(dm, 2 * dm) + lin(dm, dm) + 4 * d + tokens * dm + win * dm + 2 * dm;
        let out = p * p * c(self.out_channels);
        let total = 4 * l * dm
            + l * per_layer
            + if l > 0 { cross } else { 0 }
            + lin(c(self.in_channels) * p * p, dm)
            + lin(c(self.time_channels), dm)
            + lin(dm, dm)
            + lin(c(self.vector_dim), dm)
            + lin(dm, dm)
            + lin(3 * c(self.lr_patch) * c(self.lr_patch), dm)
            + lin(dm, 2 * dm)
            + lin(dm, out);
        total.min(u64::MAX as u128) as u64
    }

    /// Checks the relations between the fields that the network relies on, and that every size
    /// is within [`limits`].
    pub fn validate(&self) -> Result<()> {
        use limits::*;
        let mut errs = Vec::new();
        for (name, v, max) in [
            ("hidden", self.hidden, MAX_WIDTH),
            ("depth", self.depth, MAX_DEPTH),
            ("heads", self.heads, MAX_HEADS),
            ("mlp_hidden", self.mlp_hidden, MAX_WIDTH),
            ("patch", self.patch, MAX_SIDE),
            ("in_channels", self.in_channels, MAX_CHANNELS),
            ("out_channels", self.out_channels, MAX_CHANNELS),
            ("block_px", self.block_px, MAX_SIDE),
            ("vector_dim", self.vector_dim, MAX_WIDTH),
            ("time_channels", self.time_channels, MAX_WIDTH),
            ("image_size", self.image_size, MAX_SIDE),
            ("sr_scale", self.sr_scale, MAX_SIDE),
            ("lr_patch", self.lr_patch, MAX_SIDE),
        ] {
            if v == 0 || v > max {
                errs.push(format!("{name} {v} must be between 1 and {max}"));
            }
        }
        if !(self.ln_eps.is_finite() && self.ln_eps > 0.0) {
            errs.push(format!("ln_eps {} must be a positive number", self.ln_eps));
        }
        if !errs.is_empty() {
            // The relations below divide by these values.
            return Err(InfditError::Config(errs.join("; ")));
        }
        let rope = (self.rope_positions() as u128).pow(2) * (self.head_dim() as u128);
        if rope > MAX_ROPE_VALUES {
            errs.push(format!(
                "image_size {} with patch {} makes a RoPE table of {rope} values (at most {MAX_ROPE_VALUES})",
                self.image_size, self.patch
            ));
        }
        if self.rope_positions() == 0 {
            errs.push(format!("image_size {} must be at least patch / 8 ({})", self.image_size, self.patch / 8));
        }
        if u128::from(self.parameter_count()) > MAX_PARAMETERS {
            errs.push(format!("{} parameters (at most {MAX_PARAMETERS})", self.parameter_count()));
        }
        if self.heads == 0 || !self.hidden.is_multiple_of(self.heads) {
            errs.push(format!("hidden {} is not divisible by heads {}", self.hidden, self.heads));
        } else if !self.head_dim().is_multiple_of(4) {
            errs.push(format!("head dim {} must be a multiple of 4 for 2-D RoPE", self.head_dim()));
        }
        if self.patch == 0 || !self.block_px.is_multiple_of(self.patch) {
            errs.push(format!("block {} px is not a multiple of patch {}", self.block_px, self.patch));
        }
        if self.sr_scale == 0 || self.lr_patch == 0 || !self.block_px.is_multiple_of(self.sr_scale * self.lr_patch) {
            errs.push(format!(
                "block {} px is not a multiple of sr_scale {} x lr_patch {}",
                self.block_px, self.sr_scale, self.lr_patch
            ));
        }
        if self.in_channels != 2 * self.out_channels {
            errs.push(format!(
                "in_channels {} must be twice out_channels {} (noisy image and upsampled LR)",
                self.in_channels, self.out_channels
            ));
        }
        if !self.time_channels.is_multiple_of(2) || self.time_channels == 0 {
            errs.push(format!("time_channels {} must be even", self.time_channels));
        }
        if !self.rope_positions().is_multiple_of(self.block_tokens().max(1)) {
            errs.push("the RoPE table side must be a multiple of the block side in tokens".into());
        }
        if !(self.precond.sigma_data.is_finite() && self.precond.sigma_data > 0.0) {
            errs.push(format!("precond.sigma_data {} must be a positive number", self.precond.sigma_data));
        }
        if let Some([low, high]) = self.precond.coring {
            if !(low > 0.0 && low < high && high <= Precond::MAX_CORING) {
                errs.push(format!(
                    "precond.coring [{low}, {high}] must be two thresholds 0 < low < high <= {}",
                    Precond::MAX_CORING
                ));
            } else if !self.precond.residual {
                errs.push("precond.coring needs the residual preconditioning (precond.residual true)".into());
            }
        }
        if let Some(full) = self.precond.flat_gate {
            if !(full > 0.0 && full <= Precond::MAX_FLAT_GATE) {
                errs.push(format!("precond.flat_gate {full} must be a range 0 < range <= {}", Precond::MAX_FLAT_GATE));
            } else if !self.precond.residual {
                errs.push("precond.flat_gate needs the residual preconditioning (precond.residual true)".into());
            }
        }
        for (name, v) in [("depth", self.depth), ("mlp_hidden", self.mlp_hidden), ("vector_dim", self.vector_dim)] {
            if v == 0 {
                errs.push(format!("{name} must be > 0"));
            }
        }
        if errs.is_empty() { Ok(()) } else { Err(InfditError::Config(errs.join("; "))) }
    }
}

impl ClipConfig {
    /// open_clip ViT-L-14 (the tower Inf-DiT uses, `datacomp_xl_s13b_b90k` weights), exact GELU.
    pub fn vit_l_14() -> Self {
        Self {
            image_size: 224,
            patch: 14,
            width: 1024,
            layers: 24,
            heads: 16,
            mlp_hidden: 4096,
            output_dim: 768,
            ln_eps: 1e-5,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }
    /// Number of tokens (patches plus the class token).
    pub fn tokens(&self) -> usize {
        let g = self.image_size / self.patch;
        g * g + 1
    }
    /// Parameters of the vision tower, computed from the config alone. Saturates.
    pub fn parameter_count(&self) -> u64 {
        let c = |v: usize| v as u128;
        let (w, mlp, p) = (c(self.width), c(self.mlp_hidden), c(self.patch));
        let tokens = c(self.image_size.checked_div(self.patch).unwrap_or(0)).pow(2) + 1;
        let block = 2 * w + 3 * w * w + 3 * w + w * w + w + 2 * w + mlp * w + mlp + w * mlp + w;
        let total = c(self.layers) * block + 3 * p * p * w + w + tokens * w + 4 * w + w * c(self.output_dim);
        total.min(u64::MAX as u128) as u64
    }

    /// Checks the relations between the fields and that every size is within [`limits`].
    pub fn validate(&self) -> Result<()> {
        use limits::*;
        for (name, v, max) in [
            ("image_size", self.image_size, MAX_SIDE),
            ("patch", self.patch, MAX_SIDE),
            ("width", self.width, MAX_WIDTH),
            ("layers", self.layers, MAX_DEPTH),
            ("heads", self.heads, MAX_HEADS),
            ("mlp_hidden", self.mlp_hidden, MAX_WIDTH),
            ("output_dim", self.output_dim, MAX_WIDTH),
        ] {
            if v == 0 || v > max {
                return Err(InfditError::Config(format!("CLIP {name} {v} must be between 1 and {max}")));
            }
        }
        if !(self.ln_eps.is_finite() && self.ln_eps > 0.0) {
            return Err(InfditError::Config(format!("CLIP ln_eps {} must be a positive number", self.ln_eps)));
        }
        if !(self.std.iter().all(|s| s.is_finite() && *s > 0.0) && self.mean.iter().all(|m| m.is_finite())) {
            return Err(InfditError::Config("CLIP mean and std must be finite, std positive".into()));
        }
        if self.heads == 0 || !self.width.is_multiple_of(self.heads) {
            return Err(InfditError::Config(format!(
                "CLIP width {} is not divisible by heads {}",
                self.width, self.heads
            )));
        }
        if self.patch == 0 || !self.image_size.is_multiple_of(self.patch) {
            return Err(InfditError::Config(format!(
                "CLIP image size {} is not a multiple of patch {}",
                self.image_size, self.patch
            )));
        }
        Ok(())
    }
}

/// Self-ensemble sizes accepted: 1 (the input alone), 2, 4 or 8 (every symmetry of the square).
pub const ENSEMBLE_SIZES: [usize; 4] = [1, 2, 4, 8];

/// Sampler settings a model was tuned for, stored beside its config as `"sampler": {...}`: the
/// defaults of `infdit upscale` for that model (flags override them). A model trained briefly
/// samples best from a lower starting noise than the released model's 40.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerDefaults {
    /// Heun steps.
    pub steps: usize,
    /// Starting sigma.
    pub sigma_max: f32,
    /// Whether the model's 2x mode (the LR halved first, so the network still sees a 4x step)
    /// was trained, as the released model's was (`"x2_mode"`, default true). A model trained at
    /// 4x only (`infdit train`, the built-in model) is worse than bicubic in that mode, so its
    /// plans use x4 passes only: a 2x output is an x4 pass and a downscale.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub x2_mode: bool,
    /// How a factor that the model's passes do not give exactly is reached (`"chain"`, default
    /// `"reach"`).
    #[serde(default, skip_serializing_if = "is_reach")]
    pub chain: PassChain,
    /// Self-ensemble size the model is run with unless the options say otherwise (`"ensemble"`,
    /// 1, 2, 4 or 8; default 1): a small one-step model gains more from averaging its runs on
    /// mirrored inputs than a many-step sampler would.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ensemble: Option<usize>,
}

/// How the planner chains model passes for a factor that they do not give exactly (8, 12, 3):
/// the final exact resize takes the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PassChain {
    /// The fewest passes that reach the target, then a downscale (8 is x4, x4 and a 2x downscale):
    /// the most model detail, at up to 16x the work. For the released model.
    #[default]
    Reach,
    /// At least one pass, and no more than stay within the target, then a bicubic upscale (8 is
    /// x4 and a 2x upscale). For a small model whose second pass adds about as much as a bicubic
    /// resize does (measured for the built-in model in docs/benchmarks.md).
    Within,
}

fn is_reach(c: &PassChain) -> bool {
    *c == PassChain::Reach
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

impl SamplerDefaults {
    /// Largest number of sampler steps (the released sampler takes 20; each step is two network
    /// evaluations over the whole image).
    pub const MAX_STEPS: usize = 10_000;
    /// Largest starting sigma.
    pub const MAX_SIGMA: f32 = 1000.0;

    /// Checks the settings: 1..=[`Self::MAX_STEPS`] steps, a starting sigma above 0 and at most
    /// [`Self::MAX_SIGMA`].
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.steps > Self::MAX_STEPS {
            return Err(InfditError::Config(format!(
                "sampler settings out of range: {} steps (give 1 to {})",
                self.steps,
                Self::MAX_STEPS
            )));
        }
        if !(self.sigma_max > 0.0 && self.sigma_max <= Self::MAX_SIGMA) {
            return Err(InfditError::Config(format!(
                "sampler settings out of range: starting sigma {} (give a value above 0 and at most {})",
                self.sigma_max,
                Self::MAX_SIGMA
            )));
        }
        if let Some(n) = self.ensemble
            && !ENSEMBLE_SIZES.contains(&n)
        {
            return Err(InfditError::Config(format!(
                "sampler settings out of range: ensemble {n} (give 1, 2, 4 or 8)"
            )));
        }
        Ok(())
    }

    /// The `"sampler"` object of a config file's JSON text, if any.
    pub fn from_json_str(text: &str) -> Result<Option<Self>> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| InfditError::Config(format!("invalid JSON: {e}")))?;
        match value.get("sampler") {
            None => Ok(None),
            Some(v) => {
                let d: Self = serde_json::from_value(v.clone())
                    .map_err(|e| InfditError::Config(format!("invalid sampler settings: {e}")))?;
                d.validate()?;
                Ok(Some(d))
            }
        }
    }
    /// The same from a file.
    pub fn from_file(path: &Path) -> Result<Option<Self>> {
        let text = crate::files::read_small_text(path, 16 << 20).map_err(|e| InfditError::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            InfditError::Config(m) => InfditError::Config(format!("{}: {m}", path.display())),
            e => e,
        })
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self::released()
    }
}

impl ModelConfig {
    /// The released Inf-DiT model: DiT of spec §3 plus open_clip ViT-L/14.
    pub fn released() -> Self {
        Self { dit: DitConfig::released(), clip: Some(ClipConfig::vit_l_14()) }
    }

    /// Parameters of the DiT part (CLIP excluded, dead keys excluded), computed from the config
    /// alone (equal to [`crate::loaded::Model::parameter_count`]; nothing is built).
    pub fn parameter_count(&self) -> u64 {
        self.dit.parameter_count()
    }

    /// Parameters of the CLIP tower (0 without one), from the config alone.
    pub fn clip_parameter_count(&self) -> u64 {
        self.clip.as_ref().map_or(0, ClipConfig::parameter_count)
    }

    /// Validates both parts.
    pub fn validate(&self) -> Result<()> {
        self.dit.validate()?;
        if let Some(c) = &self.clip {
            c.validate()?;
            let total = u128::from(self.parameter_count()) + u128::from(c.parameter_count());
            if total > limits::MAX_PARAMETERS {
                return Err(InfditError::Config(format!(
                    "{total} parameters with the CLIP tower (at most {})",
                    limits::MAX_PARAMETERS
                )));
            }
            if c.output_dim != self.dit.vector_dim {
                return Err(InfditError::Config(format!(
                    "CLIP output_dim {} differs from the DiT vector_dim {}",
                    c.output_dim, self.dit.vector_dim
                )));
            }
        }
        Ok(())
    }

    /// Reads a config file in either accepted format (see the module docs).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::files::read_small_text(path, 16 << 20).map_err(|e| InfditError::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            InfditError::Config(m) => InfditError::Config(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// Parses a config from JSON text in either accepted format. A top-level `"sampler"` object
    /// (see [`SamplerDefaults`]) is allowed and read by [`SamplerDefaults::from_json_str`].
    pub fn from_json_str(text: &str) -> Result<Self> {
        let mut value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| InfditError::Config(format!("invalid JSON: {e}")))?;
        if let Some(o) = value.as_object_mut() {
            o.remove("sampler");
        }
        let cfg = if value.get("official_cli_flags").is_some() {
            Self::from_official(&value)?
        } else {
            serde_json::from_value(value).map_err(|e| InfditError::Config(format!("invalid config: {e}")))?
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Writes the project's own JSON form.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serialises")
    }

    fn from_official(v: &serde_json::Value) -> Result<Self> {
        use crate::official::flags;
        let given = &v["official_cli_flags"];
        let released = DitConfig::released();
        let int = |name: &str, default: usize| -> Result<usize> {
            match given.get(name) {
                None => Ok(default),
                Some(x) => x.as_u64().map(|x| x as usize).ok_or_else(|| {
                    InfditError::Config(format!("official flag {name} must be an unsigned integer, got {x}"))
                }),
            }
        };
        let hidden = int(flags::HIDDEN_SIZE, released.hidden)?;
        let patch = int(flags::PATCH_SIZE, released.patch)?;
        let mut dit = DitConfig {
            hidden,
            depth: int(flags::NUM_LAYERS, released.depth)?,
            heads: int(flags::NUM_ATTENTION_HEADS, released.heads)?,
            mlp_hidden: hidden.saturating_mul(4),
            patch,
            in_channels: int(flags::IN_CHANNELS, released.in_channels)?,
            out_channels: int(flags::OUT_CHANNELS, released.out_channels)?,
            block_px: int(flags::IMAGE_BLOCK_SIZE, released.block_px)?,
            vector_dim: int(flags::VECTOR_DIM, released.vector_dim)?,
            time_channels: released.time_channels,
            image_size: int(flags::IMAGE_SIZE, released.image_size)?,
            sr_scale: int(flags::SR_SCALE, released.sr_scale)?,
            lr_patch: released.lr_patch,
            ln_eps: given.get(flags::LAYERNORM_EPSILON).and_then(|x| x.as_f64()).unwrap_or(released.ln_eps),
            precond: Precond::default(),
        };
        if let Some(m) = v.pointer("/derived/mlp_hidden").and_then(|x| x.as_u64()) {
            dit.mlp_hidden = m as usize;
        }
        // Flags that change the architecture away from what this implementation provides.
        for flag in flags::RELEASED_SWITCHES {
            let expected = true;
            if let Some(b) = given.get(flag).and_then(|x| x.as_bool())
                && b != expected
            {
                return Err(InfditError::Config(format!(
                    "official flag {flag}={b} is not supported (only the released architecture, {flag}={expected})"
                )));
            }
        }
        let clip =
            match v.pointer("/clip/open_clip_model_config") {
                None => None,
                Some(oc) => {
                    let vc = &oc["vision_cfg"];
                    let g = |name: &str| -> Result<f64> {
                        vc.get(name).and_then(|x| x.as_f64()).ok_or_else(|| {
                            InfditError::Config(format!("clip.open_clip_model_config.vision_cfg.{name} is missing"))
                        })
                    };
                    let width = g("width")? as usize;
                    let head_width = vc.get("head_width").and_then(|x| x.as_f64()).unwrap_or(64.0) as usize;
                    let mlp_ratio = vc.get("mlp_ratio").and_then(|x| x.as_f64()).unwrap_or(4.0);
                    if v.pointer("/clip/quick_gelu").and_then(|x| x.as_bool()) == Some(true) {
                        return Err(InfditError::Config("QuickGELU CLIP towers are not supported".into()));
                    }
                    Some(ClipConfig {
                        image_size: g("image_size")? as usize,
                        patch: g("patch_size")? as usize,
                        width,
                        layers: g("layers")? as usize,
                        heads: width / head_width.max(1),
                        mlp_hidden: (width as f64 * mlp_ratio) as usize,
                        output_dim: oc.get("embed_dim").and_then(|x| x.as_u64()).ok_or_else(|| {
                            InfditError::Config("clip.open_clip_model_config.embed_dim is missing".into())
                        })? as usize,
                        ln_eps: 1e-5,
                        mean: CLIP_MEAN,
                        std: CLIP_STD,
                    })
                }
            };
        Ok(Self { dit, clip })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The released config as JSON with its `precond` replaced.
    fn with_precond(precond: serde_json::Value) -> String {
        let mut v: serde_json::Value = serde_json::from_str(&ModelConfig::released().to_json()).unwrap_or_default();
        v["dit"]["precond"] = precond;
        v.to_string()
    }

    #[test]
    fn coring_is_read_written_and_checked() {
        let cfg = ModelConfig::from_json_str(&with_precond(serde_json::json!(
            {"sigma_data": 0.05, "residual": true, "coring": [0.004, 0.02]}
        )))
        .map_err(|e| e.to_string());
        assert_eq!(cfg.as_ref().map(|c| c.dit.precond.coring), Ok(Some([0.004, 0.02])));
        // Written back only when set: the released config and a config without it keep their text.
        let again = cfg.as_ref().map(|c| ModelConfig::from_json_str(&c.to_json()).map(|c| c.dit.precond.coring));
        assert!(matches!(again, Ok(Ok(Some([0.004, 0.02])))), "{again:?}");
        assert!(!ModelConfig::released().to_json().contains("coring"));
        let plain =
            ModelConfig::from_json_str(&with_precond(serde_json::json!({"sigma_data": 0.05, "residual": true})));
        assert!(plain.is_ok_and(|c| c.dit.precond.coring.is_none()));
        let refused = |p: serde_json::Value| match ModelConfig::from_json_str(&with_precond(p)) {
            Err(e) => e.to_string(),
            Ok(_) => String::from("accepted"),
        };
        let e = refused(serde_json::json!({"sigma_data": 0.5, "residual": false, "coring": [0.004, 0.02]}));
        assert!(e.contains("precond.coring needs the residual preconditioning"), "{e}");
        for bad in [[-0.001, 0.02], [0.02, 0.004], [0.01, 0.01], [0.004, 0.5], [0.0, 0.02]] {
            let e = refused(serde_json::json!({"sigma_data": 0.05, "residual": true, "coring": bad}));
            assert!(e.contains(&format!("precond.coring [{}, {}] must be two thresholds", bad[0], bad[1])), "{e}");
        }
        let e = refused(serde_json::json!({"sigma_data": 0.05, "residual": true, "coring": 0.004}));
        assert!(e.contains("expected an array of length 2"), "{e}");
    }

    #[test]
    fn flat_gate_is_read_written_and_checked() {
        let p = serde_json::json!({"sigma_data": 0.05, "residual": true, "coring": [0.004, 0.02], "flat_gate": 0.05});
        let cfg = ModelConfig::from_json_str(&with_precond(p)).map_err(|e| e.to_string());
        assert_eq!(cfg.as_ref().map(|c| c.dit.precond.flat_gate), Ok(Some(0.05)));
        let again = cfg.as_ref().map(|c| ModelConfig::from_json_str(&c.to_json()).map(|c| c.dit.precond));
        assert!(matches!(again, Ok(Ok(Precond { flat_gate: Some(0.05), coring: Some(_), .. }))), "{again:?}");
        assert!(!ModelConfig::released().to_json().contains("flat_gate"));
        // What training runs: neither inference setting, the rest kept.
        let pre = cfg.map(|c| c.dit.precond.for_training());
        assert_eq!(pre, Ok(Precond { sigma_data: 0.05, residual: true, coring: None, flat_gate: None }));
        let refused = |p: serde_json::Value| match ModelConfig::from_json_str(&with_precond(p)) {
            Err(e) => e.to_string(),
            Ok(_) => String::from("accepted"),
        };
        let e = refused(serde_json::json!({"sigma_data": 0.5, "residual": false, "flat_gate": 0.05}));
        assert!(e.contains("precond.flat_gate needs the residual preconditioning"), "{e}");
        for bad in [0.0, -0.1, 0.75] {
            let e = refused(serde_json::json!({"sigma_data": 0.05, "residual": true, "flat_gate": bad}));
            assert!(e.contains(&format!("precond.flat_gate {bad} must be a range")), "{e}");
        }
    }
}
