//! What a user can ask of one upscale, typed and validated once: [`UpscaleOptions`].

use std::path::PathBuf;

use candle_core::DType;

use super::plan::{AlphaMode, Target};
use crate::config::ENSEMBLE_SIZES;
use crate::config::SamplerDefaults;
use crate::diffusion::HeunConfig;
use crate::error::{InfditError, Result};
use crate::imageio::Rounding;
use crate::imageio::resize::Bicubic;

/// Largest number of sampler steps accepted ([`HeunConfig::MAX_STEPS`]).
pub const MAX_STEPS: usize = HeunConfig::MAX_STEPS;

/// How an input whose size is not a multiple of the model's block grid is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Crop {
    /// Reflect-padded to the block grid, and the result cropped back to exactly the requested
    /// size: no pixel is lost.
    #[default]
    Pad,
    /// The official centre crop to a multiple of [`crate::official::CROP_MULTIPLE`] pixels
    /// (x4 or x2 only), for parity with the official code.
    Official,
}

/// How each network evaluation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evaluation {
    /// The UniBA block scheduler (memory grows with the width): `block_batch x block_batch` blocks
    /// per forward, or the largest that fits the memory budget (capped on the CPU) when `None`.
    Blocks {
        /// A fixed block batch (at least 1).
        block_batch: Option<usize>,
    },
    /// The whole image in one forward (memory grows with the area).
    WholeImage,
}

impl Default for Evaluation {
    fn default() -> Self {
        Evaluation::Blocks { block_batch: None }
    }
}

/// Everything that decides how one image is upscaled; `Default` is what `infdit upscale IN -o OUT`
/// does. Where the network runs and in which precision are the [`super::Upscaler`]'s (the model is
/// loaded once for them).
#[derive(Debug, Clone, PartialEq)]
pub struct UpscaleOptions {
    /// The output size.
    pub target: Target,
    /// The noise seed (each later pass, and the alpha plane, draw streams derived from it).
    pub seed: u64,
    /// A safetensors file with the initial noise (`eps`, shape (1, 3, H, W) of the output), for
    /// comparisons with the official code; one model pass only.
    pub noise: Option<PathBuf>,
    /// Sampler steps; `None` is the model's own default, else the released 20.
    pub steps: Option<usize>,
    /// Starting sigma; `None` is the model's own default, else the released 40.
    pub sigma_max: Option<f32>,
    /// Padding (any size) or the official crop.
    pub crop: Crop,
    /// The bicubic kernel of every resize (the upsampled LR, the alpha plane).
    pub resize: Bicubic,
    /// What the alpha plane goes through.
    pub alpha: AlphaMode,
    /// Block scheduler or whole image.
    pub evaluation: Evaluation,
    /// Storage precision of the scheduler's K/V cache; `None` is the network's.
    pub kv_dtype: Option<DType>,
    /// Keep the K/V cache in host memory (a model on a GPU).
    pub kv_offload: bool,
    /// Memory budget in bytes (of GPU memory on a GPU); `None`: half the available host memory,
    /// at most 8 GiB, or 90 % of the free GPU memory.
    pub max_memory: Option<u64>,
    /// Largest input accepted, in pixels (checked from the header, before decoding).
    pub max_pixels: u64,
    /// Folder of this image's resume state: the state after every sampler step, and each finished
    /// pass. A rerun with the same options resumes there.
    pub checkpoint_dir: Option<PathBuf>,
    /// Keep the sampler's image-size state in a file below this folder instead of memory (block
    /// scheduler): memory then stays flat in the image height.
    pub state_dir: Option<PathBuf>,
    /// Write no ICC profile or EXIF (by default the input's are carried over).
    pub strip_metadata: bool,
    /// JPEG quality, 1 to 100.
    pub jpeg_quality: u8,
    /// How 8-bit samples are made.
    pub rounding: Rounding,
    /// Self-ensemble: every model pass runs on the input and on `ensemble - 1` transformed copies
    /// (mirrored and/or transposed; 1: none; 2, 4 or 8, in the measured order of `ensemble.rs`),
    /// and the results, mapped back, are averaged. `ensemble` times the work. `None`: the model's
    /// own setting (config `"sampler": {"ensemble": N}`), else 1; a model's setting gives way to
    /// a single run where an ensemble cannot go (see [`Self::ensemble_for`]).
    pub ensemble: Option<usize>,
}

impl Default for UpscaleOptions {
    fn default() -> Self {
        Self {
            target: Target::default(),
            seed: 0,
            noise: None,
            steps: None,
            sigma_max: None,
            crop: Crop::Pad,
            resize: Bicubic::Antialias,
            alpha: AlphaMode::Bicubic,
            evaluation: Evaluation::default(),
            kv_dtype: None,
            kv_offload: false,
            max_memory: None,
            max_pixels: 64 << 20,
            checkpoint_dir: None,
            state_dir: None,
            strip_metadata: false,
            jpeg_quality: 95,
            rounding: Rounding::Nearest,
            ensemble: None,
        }
    }
}

impl UpscaleOptions {
    /// Checks the options on their own (not against an image or a model); every error names the
    /// option (by its field name) and the value.
    pub fn validate(&self) -> Result<()> {
        let bad = |option: &'static str, reason: String| Err(InfditError::InvalidOption { option, reason });
        self.target.validate().or_else(|e| bad("target", e.to_string()))?;
        if let Some(s) = self.steps
            && !(1..=MAX_STEPS).contains(&s)
        {
            return bad("steps", format!("{s} sampler steps: give 1 to {MAX_STEPS}"));
        }
        if let Some(s) = self.sigma_max
            && !(s.is_finite() && s > HeunConfig::default().sigma_min && s <= 1e6)
        {
            return bad(
                "sigma_max",
                format!(
                    "{s}: the starting sigma must be finite, above {} and at most 1e6",
                    HeunConfig::default().sigma_min
                ),
            );
        }
        if let Evaluation::Blocks { block_batch: Some(0) } = self.evaluation {
            return bad("block_batch", "the block batch must be at least 1".into());
        }
        if self.kv_offload && self.evaluation == Evaluation::WholeImage {
            return bad(
                "kv_offload",
                "the K/V offload is for the block scheduler: whole-image mode has no K/V cache".into(),
            );
        }
        if self.state_dir.is_some() && self.evaluation == Evaluation::WholeImage {
            return bad(
                "state_dir",
                "a state folder needs the block scheduler: whole-image mode holds the whole image anyway".into(),
            );
        }
        if self.crop == Crop::Official && !matches!(self.target, Target::Factor(f) if f == 4.0 || f == 2.0) {
            return bad("crop", "the official crop works with a scale of 4 or 2 only".into());
        }
        if !(1..=100).contains(&self.jpeg_quality) {
            return bad("jpeg_quality", format!("{} is not in 1..=100", self.jpeg_quality));
        }
        if self.max_pixels == 0 {
            return bad("max_pixels", "the pixel limit must be at least 1".into());
        }
        if let Some(n) = self.ensemble {
            if !ENSEMBLE_SIZES.contains(&n) {
                return bad("ensemble", format!("{n}: give 1, 2, 4 or 8 runs"));
            }
            if n > 1
                && let Some(what) = self.single_run_only()
            {
                return bad("ensemble", format!("{what} and an ensemble of {n} runs do not go together"));
            }
        }
        Ok(())
    }

    /// Why these options need a single run, if they do.
    fn single_run_only(&self) -> Option<&'static str> {
        if self.crop == Crop::Official {
            Some("the official crop (for parity with the official code)")
        } else if self.noise.is_some() {
            Some("a noise file (for comparisons with the official code)")
        } else if self.state_dir.is_some() {
            Some("a state folder (the ensemble averages whole outputs in memory)")
        } else {
            None
        }
    }

    /// The ensemble size of a run: the options' where given, else the model's own setting where
    /// these options allow an ensemble (not with the official crop, a noise file or a state folder:
    /// there the model's setting gives way to one run), else 1. A model setting that is not 1, 2, 4
    /// or 8 is an error (as [`SamplerDefaults::validate`] says).
    pub fn ensemble_for(&self, defaults: Option<SamplerDefaults>) -> Result<usize> {
        if let Some(n) = self.ensemble {
            return Ok(n);
        }
        let Some(d) = defaults else { return Ok(1) };
        d.validate()?;
        Ok(match d.ensemble {
            Some(n) if self.single_run_only().is_none() => n,
            _ => 1,
        })
    }

    /// The sampler: the options' steps and starting sigma where given, else the model's own
    /// defaults, else the released settings (20 steps from sigma 40).
    pub fn heun(&self, defaults: Option<SamplerDefaults>) -> Result<HeunConfig> {
        let base = HeunConfig::default();
        let heun = HeunConfig {
            steps: self.steps.or(defaults.map(|d| d.steps)).unwrap_or(base.steps),
            sigma_max: self.sigma_max.or(defaults.map(|d| d.sigma_max)).unwrap_or(base.sigma_max),
            ..base
        };
        if !(1..=MAX_STEPS).contains(&heun.steps) {
            return Err(InfditError::InvalidOption {
                option: "steps",
                reason: format!("{} sampler steps: give 1 to {MAX_STEPS}", heun.steps),
            });
        }
        if !(heun.sigma_max > heun.sigma_min && heun.sigma_max.is_finite()) {
            return Err(InfditError::InvalidOption {
                option: "sigma_max",
                reason: format!("{} must be finite and above sigma_min {}", heun.sigma_max, heun.sigma_min),
            });
        }
        Ok(heun)
    }
}
