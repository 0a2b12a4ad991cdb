//! Planning one image: the output size of a request, the model passes that reach it (x4 and x2),
//! the block geometry and memory plan of each pass, and the work in block evaluations. All of it
//! from the image header and the model config, so it is known, and checked, before the model runs.

use candle_core::DType;

use crate::config::{ModelConfig, PassChain};
use crate::diffusion::HeunConfig;
use crate::error::{InfditError, Result};
use crate::model::blocks::BlockGrid;
use crate::official::CROP_MULTIPLE;
use crate::prepare::PassScale;
use crate::sampling::Mode;
use crate::schedule::{MemoryPlan, Placement};

/// The output size asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// `round(W * s) x round(H * s)`.
    Factor(f64),
    /// A width and/or a height; one alone keeps the aspect ratio.
    Size {
        /// Output width.
        width: Option<u32>,
        /// Output height.
        height: Option<u32>,
    },
}

impl Default for Target {
    /// 4x, the model's native factor.
    fn default() -> Self {
        Target::Factor(4.0)
    }
}

/// Largest output side accepted (the memory plan refuses far smaller images anyway).
pub const MAX_SIDE: usize = 1 << 24;

impl Target {
    /// A short name of the target for output file names: `x4`, `x1.5`, `w1024`, `h768` or
    /// `1024x768`.
    pub fn token(&self) -> String {
        match *self {
            Target::Factor(s) => format!("x{s}"),
            Target::Size { width: Some(w), height: Some(h) } => format!("{w}x{h}"),
            Target::Size { width: Some(w), height: None } => format!("w{w}"),
            Target::Size { width: None, height: Some(h) } => format!("h{h}"),
            Target::Size { width: None, height: None } => "x4".into(),
        }
    }

    /// Checks the request itself: a finite factor above 0, sizes above 0.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Target::Factor(s) if !(s.is_finite() && s > 0.0) => {
                Err(InfditError::Config(format!("the scale factor {s} must be a finite number above 0")))
            }
            Target::Size { width: Some(0), .. } | Target::Size { height: Some(0), .. } => {
                Err(InfditError::Config("an output width or height must be at least 1".into()))
            }
            _ => Ok(()),
        }
    }

    /// The output size (width, height) of a `w x h` input, at least 1 x 1.
    pub fn output_size(&self, w: usize, h: usize) -> Result<(usize, usize)> {
        let (w, h) = (w as f64, h as f64);
        let (tw, th) = match *self {
            Target::Factor(s) => (w * s, h * s),
            Target::Size { width: Some(tw), height: Some(th) } => (tw as f64, th as f64),
            Target::Size { width: Some(tw), height: None } => (tw as f64, h * tw as f64 / w),
            Target::Size { width: None, height: Some(th) } => (w * th as f64 / h, th as f64),
            Target::Size { width: None, height: None } => (w * 4.0, h * 4.0),
        };
        let (tw, th) = (tw.round().max(1.0), th.round().max(1.0));
        if !(tw <= MAX_SIDE as f64 && th <= MAX_SIDE as f64) {
            return Err(InfditError::TooLarge(format!(
                "the output would be {tw} x {th} pixels, above the largest supported side of {MAX_SIDE}"
            )));
        }
        Ok((tw as usize, th as usize))
    }
}

/// What the planner may use to reach a target: the model's 2x mode
/// ([`crate::config::SamplerDefaults::x2_mode`]) and its pass chaining
/// ([`crate::config::SamplerDefaults::chain`]). Those two fields, apart from the sampler settings
/// they are stored with (`From<&SamplerDefaults>`): the planner needs no steps or sigma, and serde
/// cannot flatten a struct into the strict (`deny_unknown_fields`) config object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassRule {
    /// Plans may use one x2 pass.
    pub x2_mode: bool,
    /// How passes are chained for a factor they do not give exactly.
    pub chain: PassChain,
}

impl From<&crate::config::SamplerDefaults> for PassRule {
    fn from(d: &crate::config::SamplerDefaults) -> Self {
        Self { x2_mode: d.x2_mode, chain: d.chain }
    }
}

impl Default for PassRule {
    /// The released model's: 2x mode, the fewest passes that reach the target.
    fn default() -> Self {
        Self { x2_mode: true, chain: PassChain::Reach }
    }
}

/// The passes that take a `w x h` image to `tw x th` (the final resize does the rest). With
/// [`PassChain::Reach`], the fewest passes that reach it (at least one): all x4 except, with
/// `x2_mode`, one x2 (run first, where it is cheapest) when that still reaches it. So 4 gives
/// [x4], 2 [x2], 8 [x2, x4], 16 [x4, x4], 3 [x4], 1.5 [x2], 6 [x2, x4]; without the 2x mode 2 gives
/// [x4] (then a downscale). With [`PassChain::Within`], when those passes overshoot the target
/// and more than one is needed, one pass fewer, all x4 (8 gives [x4], then a 2x upscale).
pub fn plan_passes(w: usize, h: usize, tw: usize, th: usize, rule: PassRule) -> Vec<PassScale> {
    let reaches = |f: u128| f * w as u128 >= tw as u128 && f * h as u128 >= th as u128;
    let overshoots = |f: u128| f * w as u128 > tw as u128 || f * h as u128 > th as u128;
    let mut k = 1;
    while !reaches(4u128.pow(k)) {
        k += 1;
    }
    let mut passes = vec![PassScale::X4; k as usize];
    if rule.x2_mode && reaches(2 * 4u128.pow(k - 1)) {
        passes[0] = PassScale::X2;
    }
    let product: u128 = passes.iter().map(|p| p.factor() as u128).product();
    if rule.chain == PassChain::Within && k > 1 && overshoots(product) {
        passes = vec![PassScale::X4; k as usize - 1];
    }
    passes
}

/// One model pass on an image of any size, as [`crate::prepare::prepare_padded`] (or, with the
/// official crop, [`crate::prepare::prepare_official`]) lays it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassGeometry {
    /// The pass.
    pub scale: PassScale,
    /// Input size (width, height).
    pub input: (usize, usize),
    /// Block rows and columns of the model output.
    pub grid: (usize, usize),
    /// Output size after the crop (width, height).
    pub output: (usize, usize),
}

impl PassGeometry {
    /// Blocks of the model output.
    pub fn blocks(&self) -> usize {
        self.grid.0 * self.grid.1
    }
}

/// The geometry of each pass for a `w x h` input.
pub fn geometry(w: usize, h: usize, passes: &[PassScale], block_px: usize, official: bool) -> Vec<PassGeometry> {
    let (mut w, mut h) = (w, h);
    let mut out = Vec::with_capacity(passes.len());
    for &scale in passes {
        let f = scale.factor();
        let (gw, gh, ow, oh) = if official {
            let (cw, ch) = (w / CROP_MULTIPLE * CROP_MULTIPLE, h / CROP_MULTIPLE * CROP_MULTIPLE);
            (cw * f, ch * f, cw * f, ch * f)
        } else {
            let unit = (block_px / f).max(1);
            (w.div_ceil(unit) * unit * f, h.div_ceil(unit) * unit * f, w * f, h * f)
        };
        out.push(PassGeometry { scale, input: (w, h), grid: (gh / block_px, gw / block_px), output: (ow, oh) });
        (w, h) = (ow, oh);
    }
    out
}

/// One planned pass: its geometry, how each network evaluation runs and what it needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PassPlan {
    /// Sizes and block grid.
    pub geometry: PassGeometry,
    /// Whole image or block scheduler, with the block batch.
    pub mode: Mode,
    /// The memory estimate (of GPU memory on a GPU).
    pub memory: MemoryPlan,
    /// With an ensemble that has transposed runs: their mode and memory estimate (a transposed
    /// input has the transposed block grid, and the K/V cache grows with the width).
    pub transposed: Option<(Mode, MemoryPlan)>,
}

impl PassPlan {
    /// How a run of this pass on its input (`transposed`: on the transposed input) evaluates the
    /// network.
    pub fn mode_for(&self, transposed: bool) -> Mode {
        match (transposed, self.transposed) {
            (true, Some((mode, _))) => mode,
            _ => self.mode,
        }
    }

    /// The larger memory estimate of its runs.
    pub fn peak_memory(&self) -> usize {
        self.memory.total().max(self.transposed.map_or(0, |(_, m)| m.total()))
    }
}

/// What the alpha plane of an image goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AlphaMode {
    /// Bicubic from the input straight to the output size: no model time, flat areas stay exactly
    /// opaque or transparent.
    #[default]
    Bicubic,
    /// The same model passes as the colour, as a gray image (doubles the model time).
    Model,
    /// No alpha in the output: the colour is composited on this background colour (8-bit sRGB
    /// values) before upscaling.
    Drop {
        /// The background, red, green, blue.
        background: [u8; 3],
    },
}

impl AlphaMode {
    /// The name used in plans and events: `bicubic`, `model` or `drop`.
    pub fn name(&self) -> &'static str {
        match self {
            AlphaMode::Bicubic => "bicubic",
            AlphaMode::Model => "model",
            AlphaMode::Drop { .. } => "drop",
        }
    }
}

/// Everything known about upscaling one image before it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePlan {
    /// Input size (width, height), orientation applied.
    pub input: (usize, usize),
    /// Output size (width, height).
    pub output: (usize, usize),
    /// The colour's passes, in order.
    pub passes: Vec<PassPlan>,
    /// How the alpha plane is upscaled, for an image that has one.
    pub alpha: Option<AlphaMode>,
    /// Model passes of the alpha plane (the colour's again with [`AlphaMode::Model`], else 0).
    pub alpha_passes: usize,
    /// Block evaluations of each colour pass (the progress units).
    pub pass_work: Vec<u64>,
    /// Block evaluations of the whole image, the alpha plane's included.
    pub work: u64,
    /// The largest memory plan of the passes, in bytes.
    pub memory: usize,
    /// Sampler steps of each pass.
    pub steps: usize,
    /// Network evaluations of each pass.
    pub evaluations: usize,
    /// Whether the last pass's output is resized to the output size (an antialiased bicubic).
    pub resize: bool,
}

/// How the sampler and the memory plans of a run are set, fixed once for every image of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Planner {
    /// The model's config.
    pub cfg: ModelConfig,
    /// Parameters of the network (for the memory plans).
    pub params: usize,
    /// The sampler.
    pub heun: HeunConfig,
    /// Network dtype.
    pub act: DType,
    /// K/V cache dtype.
    pub kv_dtype: DType,
    /// Memory budget in bytes (of GPU memory on a GPU).
    pub budget: usize,
    /// Where the run keeps what the plans count.
    pub placement: Placement,
    /// The official centre crop instead of the padding.
    pub official: bool,
    /// Whole image, or the block scheduler with an optional fixed block batch.
    pub whole_image: bool,
    /// A fixed block batch.
    pub block_batch: Option<usize>,
    /// The request.
    pub target: Target,
    /// The model's 2x mode and pass chaining.
    pub rule: PassRule,
    /// Runs of each pass averaged (the self-ensemble, [`UpscaleOptions::ensemble`](super::UpscaleOptions)).
    pub ensemble: usize,
}

impl Planner {
    /// The passes for an input of `w x h` and the final output size.
    pub fn passes(&self, w: usize, h: usize) -> Result<(Vec<PassGeometry>, (usize, usize))> {
        let bp = self.cfg.dit.block_px;
        if self.official {
            let pass = match self.target {
                Target::Factor(4.0) => PassScale::X4,
                Target::Factor(2.0) => PassScale::X2,
                _ => return Err(InfditError::Config("the official crop works with a scale of 4 or 2 only".into())),
            };
            let g = geometry(w, h, &[pass], bp, true);
            if g[0].grid.0 == 0 || g[0].grid.1 == 0 {
                return Err(InfditError::ImageSize {
                    width: w,
                    height: h,
                    reason: format!("smaller than {CROP_MULTIPLE} px on a side, which the official crop needs"),
                });
            }
            let out = g[0].output;
            return Ok((g, out));
        }
        let (tw, th) = self.target.output_size(w, h)?;
        Ok((geometry(w, h, &plan_passes(w, h, tw, th, self.rule), bp, false), (tw, th)))
    }

    /// How each network evaluation of a pass with this grid runs, and its memory plan; an error
    /// when even one block at a time does not fit the budget.
    pub fn mode(&self, grid: &BlockGrid) -> Result<(Mode, MemoryPlan)> {
        let dit = &self.cfg.dit;
        let plan = |n: Option<usize>| {
            MemoryPlan::estimate_placed(dit, self.params, grid, n, self.act, self.kv_dtype, self.placement)
        };
        if self.whole_image {
            return Ok((Mode::WholeImage, plan(None)));
        }
        let n = match self.block_batch {
            Some(n) => n,
            None => MemoryPlan::default_batch(
                dit,
                self.params,
                grid,
                self.act,
                self.kv_dtype,
                self.budget,
                self.placement,
            )
            .ok_or_else(|| {
                InfditError::TooLarge(format!(
                    "a {} x {} output needs about {} even one block at a time, above the memory budget of {} MiB",
                    grid.width(),
                    grid.height(),
                    plan(Some(1)),
                    self.budget >> 20
                ))
            })?,
        };
        Ok((Mode::Blocks { block_batch: n, kv_dtype: self.kv_dtype }, plan(Some(n))))
    }

    /// The whole plan of a `w x h` image (with an alpha plane when `has_alpha`), every pass
    /// checked: an image whose last pass does not fit is refused before its first pass runs.
    pub fn plan(&self, w: usize, h: usize, has_alpha: bool, alpha: AlphaMode) -> Result<ImagePlan> {
        let bp = self.cfg.dit.block_px;
        let (geoms, output) = self.passes(w, h)?;
        // The ensemble's transposed runs have the transposed grid: it must fit the budget as well.
        let transposes = super::ensemble::Flip::of_ensemble(self.ensemble).iter().any(|f| f.transposes());
        let mut passes = Vec::with_capacity(geoms.len());
        for g in geoms {
            let (rows, cols) = g.grid;
            let (mode, memory) = self.mode(&BlockGrid::for_image(rows * bp, cols * bp, bp)?)?;
            let transposed =
                if transposes { Some(self.mode(&BlockGrid::for_image(cols * bp, rows * bp, bp)?)?) } else { None };
            passes.push(PassPlan { geometry: g, mode, memory, transposed });
        }
        let evals = self.heun.evaluations() as u64;
        let runs = self.ensemble.max(1) as u64;
        let pass_work: Vec<u64> = passes.iter().map(|p| runs * evals * p.geometry.blocks() as u64).collect();
        let colour: u64 = pass_work.iter().sum();
        let alpha = has_alpha.then_some(alpha);
        let alpha_passes = if alpha == Some(AlphaMode::Model) { passes.len() } else { 0 };
        let last = passes.last().map(|p| p.geometry.output);
        Ok(ImagePlan {
            input: (w, h),
            output,
            memory: passes.iter().map(PassPlan::peak_memory).max().unwrap_or(0),
            work: if alpha_passes > 0 { 2 * colour } else { colour },
            resize: last != Some(output),
            steps: self.heun.steps,
            evaluations: self.heun.evaluations(),
            passes,
            alpha,
            alpha_passes,
            pass_work,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PassScale::{X2, X4};

    #[test]
    fn passes_for_common_factors() {
        let plan = |s: f64| {
            let (tw, th) = Target::Factor(s).output_size(100, 60).unwrap();
            (plan_passes(100, 60, tw, th, PassRule::default()), (tw, th))
        };
        assert_eq!(plan(4.0), (vec![X4], (400, 240)));
        assert_eq!(plan(2.0), (vec![X2], (200, 120)));
        assert_eq!(plan(8.0), (vec![X2, X4], (800, 480)));
        assert_eq!(plan(16.0), (vec![X4, X4], (1600, 960)));
        assert_eq!(plan(3.0), (vec![X4], (300, 180)));
        assert_eq!(plan(1.5), (vec![X2], (150, 90)));
        assert_eq!(plan(6.0), (vec![X2, X4], (600, 360)));
        assert_eq!(plan(0.5), (vec![X2], (50, 30)));
        assert_eq!(plan(32.0), (vec![X2, X4, X4], (3200, 1920)));
        let with = |s: f64, rule: PassRule| {
            let (tw, th) = Target::Factor(s).output_size(100, 60).unwrap();
            plan_passes(100, 60, tw, th, rule)
        };
        // A model without a trained 2x mode: x4 passes only.
        let x4 = PassRule { x2_mode: false, chain: PassChain::Reach };
        assert_eq!(with(2.0, x4), vec![X4]);
        assert_eq!(with(1.5, x4), vec![X4]);
        assert_eq!(with(8.0, x4), vec![X4, X4]);
        assert_eq!(with(16.0, x4), vec![X4, X4]);
        assert_eq!(with(32.0, x4), vec![X4, X4, X4]);
        // And passes that stay within the target (the built-in model's rule).
        let within = PassRule { x2_mode: false, chain: PassChain::Within };
        assert_eq!(with(2.0, within), vec![X4]);
        assert_eq!(with(3.0, within), vec![X4]);
        assert_eq!(with(4.0, within), vec![X4]);
        assert_eq!(with(8.0, within), vec![X4]);
        assert_eq!(with(12.0, within), vec![X4]);
        assert_eq!(with(16.0, within), vec![X4, X4]);
        assert_eq!(with(32.0, within), vec![X4, X4]);
        assert_eq!(with(64.0, within), vec![X4, X4, X4]);
        // With the 2x mode an exact [x2, x4] is within; 6x is not, and drops to one x4.
        let both = PassRule { x2_mode: true, chain: PassChain::Within };
        assert_eq!(with(8.0, both), vec![X2, X4]);
        assert_eq!(with(6.0, both), vec![X4]);
    }

    #[test]
    fn sizes_round_and_keep_the_aspect_ratio() {
        assert_eq!(Target::Factor(1.5).output_size(3, 5).unwrap(), (5, 8)); // 4.5 and 7.5 round up
        let w = Target::Size { width: Some(1000), height: None };
        assert_eq!(w.output_size(300, 200).unwrap(), (1000, 667));
        let h = Target::Size { width: None, height: Some(50) };
        assert_eq!(h.output_size(300, 200).unwrap(), (75, 50));
        let both = Target::Size { width: Some(64), height: Some(10) };
        assert_eq!(both.output_size(8, 8).unwrap(), (64, 10));
        // 64/8 = 8 wide: one x2 and one x4 reach it.
        assert_eq!(plan_passes(8, 8, 64, 10, PassRule::default()), vec![X2, X4]);
        assert!(Target::Factor(4096.0).output_size(1 << 20, 1).is_err());
        assert!(Target::Factor(f64::NAN).validate().is_err());
        assert!(Target::Factor(0.0).validate().is_err());
        assert!(Target::Size { width: Some(0), height: None }.validate().is_err());
        assert_eq!(w.token(), "w1000");
        assert_eq!(h.token(), "h50");
        assert_eq!(both.token(), "64x10");
        assert_eq!(Target::Factor(4.0).token(), "x4");
        assert_eq!(Target::Factor(1.5).token(), "x1.5");
    }

    #[test]
    fn pass_geometry_follows_the_padded_preparation() {
        // 37x45 input, x4: padded to 64x64 LR (2x2 blocks), cropped to 148x180.
        let g = geometry(37, 45, &[X4], 128, false);
        assert_eq!(g, vec![PassGeometry { scale: X4, input: (37, 45), grid: (2, 2), output: (148, 180) }]);
        // 8x8 then x2 (unit 64) then x4 (unit 32).
        let g = geometry(8, 8, &[X2, X4], 128, false);
        assert_eq!(g[0].grid, (1, 1));
        assert_eq!(g[0].output, (16, 16));
        assert_eq!(g[1], PassGeometry { scale: X4, input: (16, 16), grid: (1, 1), output: (64, 64) });
        // Official crop: 37x45 -> 32x32 -> 128x128.
        assert_eq!(geometry(37, 45, &[X4], 128, true)[0].output, (128, 128));
    }
}
