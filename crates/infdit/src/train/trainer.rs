//! The training loop: EDM loss, AdamW, gradient clipping, EMA, checkpoints with exact resume.
//!
//! * Loss (spec §10): `sigma = max(exp(P_mean + P_std n), 0.001)`, `x_noisy = x + sigma eps`,
//!   `loss = lambda(sigma) mean((D(x_noisy; sigma) - x)^2)` with the EDM weight
//!   `lambda = (sigma^2 + sd^2) / (sigma sd)^2` (`sd` = the config's `precond.sigma_data`, 0.5 in
//!   the reference), averaged over the batch. The denoiser is the
//!   whole-image UniBA network ([`crate::schedule::WholeImageDenoiser`]), the path the reference
//!   trains with, with one random RoPE start per batch.
//! * The network runs in f32 through differentiable candle ops only: [`crate::model::ops::attention`]
//!   switches from the fused kernel (no backward) to matmul + a hand-written softmax as soon as an
//!   operand is part of an autograd graph, and the norms are built from primitives.
//! * AdamW written out here (decoupled weight decay, bias correction, linear warm-up) so that its
//!   moments can be saved and a resumed run continues bit for bit; gradients are clipped to a
//!   global L2 norm; the EMA uses the warm-up `min(decay, (1 + t) / (10 + t))`.
//! * Every random draw of step `t` comes from a generator seeded by `(seed, t, sample)`, so a run
//!   resumed from a checkpoint at step `t` draws exactly what the uninterrupted run draws.
//! * The CLIP tower, when the config has one, is frozen: only the DiT is trained.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::data::{Dataset, SampleConfig, TrainSample};
use super::{Sampler, SplitMix64};
use crate::config::ModelConfig;
use crate::error::{InfditError, Result};
use crate::imageio::ImageIoError;
use crate::kernels::MatmulPrecision;
use crate::loaded::Model;
use crate::schedule::WholeImageDenoiser;
use crate::weights::{CLIP_PREFIX, Checkpoint, convert::save_atomic};

/// Optimisation settings. [`Default`] is the paper's recipe (spec §10) with a 16-image batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Optimiser steps to run in total.
    pub steps: usize,
    /// Images per step (gradients averaged).
    pub batch: usize,
    /// Peak learning rate (1e-4).
    pub lr: f64,
    /// Steps of linear learning-rate warm-up (0: none).
    pub warmup: usize,
    /// AdamW decoupled weight decay (1e-4).
    pub weight_decay: f64,
    /// AdamW betas (0.9, 0.999).
    pub betas: (f64, f64),
    /// AdamW epsilon (1e-8).
    pub eps: f64,
    /// Global gradient-norm clip (0.1 in the reference; 0 disables).
    pub grad_clip: f64,
    /// EMA decay (0.999).
    pub ema_decay: f64,
    /// Log-normal sigma: mean of ln sigma (-1.0).
    pub p_mean: f64,
    /// Log-normal sigma: std of ln sigma (1.4).
    pub p_std: f64,
    /// Seed of every random draw.
    pub seed: u64,
    /// The products of the fast backward on the CPU: bf16 operands with f32 sums on AMX tiles
    /// where the CPU has them (the default; f32 elsewhere), or f32. A state saved before this
    /// setting existed trained in f32 ([`MatmulPrecision::F32`] when the field is missing).
    #[serde(default)]
    pub matmul: MatmulPrecision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch: 16,
            lr: 1e-4,
            warmup: 0,
            weight_decay: 1e-4,
            betas: (0.9, 0.999),
            eps: 1e-8,
            grad_clip: 0.1,
            ema_decay: 0.999,
            p_mean: -1.0,
            p_std: 1.4,
            seed: 0,
            matmul: MatmulPrecision::Bf16,
        }
    }
}

impl TrainConfig {
    /// Checks the settings before anything is trained: at least one step and one image per step,
    /// a positive learning rate, AdamW's betas in `[0, 1)` and a positive epsilon, a weight decay,
    /// gradient clip (0: none) and log-normal sigma that are numbers (the spread positive), an EMA
    /// decay in `[0, 1]`. An error names the field ([`InfditError::InvalidOption`]).
    pub fn validate(&self) -> Result<()> {
        let bad = |option, reason: String| Err(InfditError::InvalidOption { option, reason });
        for (option, n) in [("steps", self.steps), ("batch", self.batch)] {
            if n == 0 {
                return bad(option, "must be at least 1".into());
            }
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        let at_least_0 = |v: f64| v.is_finite() && v >= 0.0;
        let checks = [
            ("lr", self.lr, positive(self.lr), "is not a positive learning rate"),
            ("weight_decay", self.weight_decay, at_least_0(self.weight_decay), "is not a weight decay (0 or more)"),
            ("grad_clip", self.grad_clip, at_least_0(self.grad_clip), "is not a gradient-norm clip (0: none)"),
            ("ema_decay", self.ema_decay, (0.0..=1.0).contains(&self.ema_decay), "is not an EMA decay (give 0 to 1)"),
            ("p_mean", self.p_mean, self.p_mean.is_finite(), "is not a number"),
            ("p_std", self.p_std, positive(self.p_std), "is not a positive spread"),
            ("eps", self.eps, positive(self.eps), "is not a positive epsilon"),
        ];
        if let Some(&(option, v, _, why)) = checks.iter().find(|c| !c.2) {
            return bad(option, format!("{v} {why}"));
        }
        let (b1, b2) = self.betas;
        if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
            return bad("betas", format!("({b1}, {b2}) are not AdamW betas (each in [0, 1))"));
        }
        Ok(())
    }
}

/// What one optimiser step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Steps completed, this one included.
    pub step: usize,
    /// Mean weighted EDM loss over the batch.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Geometric mean of the batch's sigmas.
    pub sigma: f64,
}

/// The released EDM loss weight `(sigma^2 + 0.25) / (0.5 sigma)^2` ([`crate::diffusion::Precond::loss_weight`]).
pub fn edm_weight(sigma: f64) -> f64 {
    crate::diffusion::Precond::default().loss_weight(sigma)
}

/// The weighted EDM loss of one example (a scalar tensor in the autograd graph), through `model`
/// as it is ([`Trainer`] passes its network without the config's coring and flat gate).
/// `clip` is the (1, vector_dim) conditioning vector, `eps` the unit noise at the HR size.
pub fn edm_loss(
    model: &Model,
    s: &TrainSample,
    clip: &Tensor,
    sigma: f32,
    eps: &Tensor,
    rope_offset: (usize, usize),
) -> Result<Tensor> {
    let x_noisy = (&s.hr + (eps * sigma as f64)?)?;
    let mut den = WholeImageDenoiser::new(&model.dit, clip, &s.lr, &s.concat_lr)?;
    den.set_rope_offset(rope_offset);
    let d = den.denoise_traced(&x_noisy, sigma, None)?;
    let weight = model.dit.config().precond.loss_weight(sigma as f64);
    Ok(((d - &s.hr)?.sqr()?.mean_all()? * weight)?)
}

fn stream(seed: u64, step: usize, sample: usize) -> SplitMix64 {
    let mut s = SplitMix64::new(seed ^ 0x5851_F42D_4C95_7F2D);
    let a = s.next_u64() ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut s = SplitMix64::new(a);
    SplitMix64::new(s.next_u64() ^ (sample as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9))
}

/// A trainer: the DiT parameters as variables, the AdamW moments, the EMA copy and the step.
pub struct Trainer {
    /// The network's config.
    pub model_cfg: ModelConfig,
    /// Optimisation settings.
    pub cfg: TrainConfig,
    names: Vec<String>,
    params: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    ema: Vec<Tensor>,
    frozen: Vec<(String, Tensor)>,
    step: usize,
    device: Device,
}

const STATE_FILE: &str = "train-state.safetensors";
const META_FILE: &str = "train-state.json";

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    step: usize,
    model: ModelConfig,
    train: TrainConfig,
    sample: SampleConfigMeta,
}

/// The parts of [`SampleConfig`] a resumed run must agree on (the degradation is code, not data).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SampleConfigMeta {
    crop: usize,
    scale: usize,
    resize_prob: f64,
    flip_prob: f64,
    degrade_prob: f64,
    lr_dropout: f64,
    /// Absent from the states of runs made before softening existed (which never softened).
    #[serde(default)]
    soften_prob: f64,
}

impl From<&SampleConfig> for SampleConfigMeta {
    fn from(s: &SampleConfig) -> Self {
        Self {
            crop: s.crop,
            scale: s.scale,
            resize_prob: s.resize_prob,
            flip_prob: s.flip_prob,
            degrade_prob: s.degrade_prob,
            lr_dropout: s.lr_dropout,
            soften_prob: s.soften_prob,
        }
    }
}

impl Trainer {
    /// Starts from `init` (random weights for a new model, or a checkpoint to fine-tune), which
    /// must hold every key of `model_cfg` (checked strictly, by building the model once); trains on
    /// the CPU.
    pub fn new(model_cfg: &ModelConfig, init: &Checkpoint, cfg: TrainConfig) -> Result<Self> {
        Self::new_on(model_cfg, init, cfg, &Device::Cpu)
    }

    /// [`new`](Self::new) on `device`: the weights, the optimiser state, the network's activations
    /// and the loss live there; the examples are drawn and degraded on the CPU (as on the CPU, the
    /// same draws for the same seed) and moved there. On a GPU the network runs through candle's
    /// autograd over primitive ops (the fast backward's fused ops are CPU kernels), in f32.
    pub fn new_on(model_cfg: &ModelConfig, init: &Checkpoint, cfg: TrainConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        // Strict check of names and shapes before anything is trained.
        let keys = Model::expected_keys(model_cfg)?;
        Model::from_checkpoint(model_cfg, init.clone(), DType::F32, &Device::Cpu)?;
        let (mut names, mut params, mut frozen) = (Vec::new(), Vec::new(), Vec::new());
        for (k, _) in keys {
            let t = init.load(&k, &Device::Cpu)?.to_dtype(DType::F32)?.to_device(device)?;
            if k.starts_with(CLIP_PREFIX) {
                frozen.push((k, t));
            } else {
                params.push(Var::from_tensor(&t)?);
                names.push(k);
            }
        }
        let zeros = |p: &Var| p.as_tensor().zeros_like();
        let m = params.iter().map(zeros).collect::<candle_core::Result<Vec<_>>>()?;
        let v = params.iter().map(zeros).collect::<candle_core::Result<Vec<_>>>()?;
        let ema = params.iter().map(|p| p.as_tensor().copy()).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            model_cfg: model_cfg.clone(),
            cfg,
            names,
            params,
            m,
            v,
            ema,
            frozen,
            step: 0,
            device: device.clone(),
        })
    }

    /// Steps completed.
    pub fn step(&self) -> usize {
        self.step
    }

    /// Number of trained values.
    pub fn trainable_values(&self) -> usize {
        self.params.iter().map(|p| p.elem_count()).sum()
    }

    fn checkpoint(&self, ema: bool) -> Checkpoint {
        let dit = self.names.iter().zip(0..).map(|(n, i)| {
            let t = if ema { self.ema[i].clone() } else { self.params[i].as_tensor().clone() };
            (n.clone(), t)
        });
        Checkpoint::from_tensors("training state", dit.chain(self.frozen.iter().cloned()))
    }

    /// The model with the current weights (`ema`: the EMA copy), sharing the variables' storage.
    pub fn model(&self, ema: bool) -> Result<Model> {
        Model::from_checkpoint(&self.model_cfg, self.checkpoint(ema), DType::F32, &self.device)
    }

    /// The network as training runs it: the current weights, without the config's coring and flat
    /// gate (inference settings, [`crate::config::Precond::for_training`]: trained through them, the
    /// network would get no gradient wherever its residual is faint or the LR flat). Saved configs
    /// keep them.
    fn training_model(&self) -> Result<Model> {
        let mut cfg = self.model_cfg.clone();
        cfg.dit.precond = cfg.dit.precond.for_training();
        Model::from_checkpoint(&cfg, self.checkpoint(false), DType::F32, &self.device)
    }

    /// Where the weights live and the network runs.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// One optimiser step on `batch` fresh examples from `data`.
    pub fn train_step(&mut self, data: &Dataset, sample_cfg: &SampleConfig) -> Result<StepStats> {
        sample_cfg.validate(self.model_cfg.dit.block_px)?;
        let step = self.step;
        let model = self.training_model()?;
        let dc = &self.model_cfg.dit;
        // One random RoPE start per batch, as the reference: within the table minus the crop.
        let crop_tokens = sample_cfg.crop / dc.patch;
        let max_off = dc.rope_positions().saturating_sub(crop_tokens);
        let mut r = stream(self.cfg.seed, step, usize::MAX);
        let offset = (r.below(max_off + 1), r.below(max_off + 1));
        let mut grads: Vec<Option<Tensor>> = vec![None; self.params.len()];
        let (mut loss_sum, mut log_sigma) = (0.0, 0.0);
        // The batch's examples are drawn in parallel: each from its own stream, so the draws do
        // not depend on the thread count.
        let (seed, p_mean, p_std) = (self.cfg.seed, self.cfg.p_mean, self.cfg.p_std);
        let draws = {
            use rayon::prelude::*;
            (0..self.cfg.batch)
                .into_par_iter()
                .map(|i| -> Result<(TrainSample, f32, Tensor)> {
                    let mut rng = stream(seed, step, i);
                    let s = data.sample(sample_cfg, &mut rng)?;
                    let sigma = (p_mean + p_std * rng.normal()).exp().max(0.001) as f32;
                    let n = s.hr.elem_count();
                    let eps: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
                    let eps = Tensor::from_vec(eps, s.hr.shape(), &Device::Cpu)?;
                    Ok((s, sigma, eps))
                })
                .collect::<Result<Vec<_>>>()?
        };
        // Each example's forward and backward is independent: on the CPU (fast backward) they run
        // in parallel, as many at a time as the pool has threads (the dense products inside each then mostly
        // run on one thread, and candle's element-wise ops, which run on the calling thread,
        // stop leaving the other cores idle). The gradients are summed afterwards in the batch's
        // order, so the step is the same bits for any thread count (and as the serial loop).
        let example = |s: TrainSample, sigma: f32, eps: Tensor| -> Result<(f64, f32, Vec<Option<Tensor>>)> {
            let (s, eps) = (s.to_device(&self.device)?, eps.to_device(&self.device)?);
            let clip = model.clip_vector(&s.lr, crate::imageio::resize::Bicubic::Antialias)?;
            let loss = edm_loss(&model, &s, &clip, sigma, &eps, offset)?;
            let lv = loss.to_scalar::<f32>()? as f64;
            if !lv.is_finite() {
                return Ok((lv, sigma, Vec::new()));
            }
            let g = loss.backward()?;
            // Detached: a gradient computed from tracked activations records its ops, and kept in
            // the optimiser state it would hold this step's whole graph alive.
            Ok((lv, sigma, self.params.iter().map(|p| g.get(p.as_tensor()).map(|t| t.detach())).collect()))
        };
        // The backward chosen on this thread (`grad::with_path`, thread-local) holds on the workers too;
        // the products' precision is this run's setting.
        let (path, matmul) = (crate::model::grad::path(), self.cfg.matmul);
        let one = |(s, sigma, eps): (TrainSample, f32, Tensor)| -> Result<(f64, f32, Vec<Option<Tensor>>)> {
            crate::model::grad::with_path(path, || crate::model::grad::with_matmul(matmul, || example(s, sigma, eps)))
        };
        // The autograd path keeps the serial loop it had before the fast backward (the baseline
        // `infdit bench train` compares with).
        let parallel = self.device.is_cpu() && path == crate::model::grad::GradPath::Fast;
        let at_once = if parallel { rayon::current_num_threads().max(1) } else { 1 };
        let mut draws = draws.into_iter().peekable();
        while draws.peek().is_some() {
            let chunk: Vec<_> = draws.by_ref().take(at_once).collect();
            let results = if chunk.len() > 1 {
                use rayon::prelude::*;
                chunk.into_par_iter().map(one).collect::<Vec<_>>()
            } else {
                chunk.into_iter().map(one).collect()
            };
            for r in results {
                let (lv, sigma, g) = r?;
                if !lv.is_finite() {
                    return Err(InfditError::NonFinite(format!("training step {}: the loss is {lv}", step + 1)));
                }
                loss_sum += lv;
                log_sigma += (sigma as f64).ln();
                for (acc, gi) in grads.iter_mut().zip(g) {
                    if let Some(gi) = gi {
                        *acc = Some(match acc.take() {
                            Some(a) => (a + gi)?,
                            None => gi,
                        });
                    }
                }
            }
        }
        drop(model);
        let b = self.cfg.batch as f64;
        let grads = grads
            .into_iter()
            .zip(&self.params)
            .map(|(g, p)| match g {
                Some(g) => g / b,
                None => p.as_tensor().zeros_like(),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut sq = 0f64;
        for g in &grads {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            return Err(InfditError::NonFinite(format!(
                "training step {}: the gradient norm is {grad_norm}",
                step + 1
            )));
        }
        let clip = if self.cfg.grad_clip > 0.0 && grad_norm > self.cfg.grad_clip {
            self.cfg.grad_clip / grad_norm
        } else {
            1.0
        };
        let t = (step + 1) as f64;
        let lr = self.cfg.lr * if self.cfg.warmup > 0 { (t / self.cfg.warmup as f64).min(1.0) } else { 1.0 };
        let (b1, b2) = self.cfg.betas;
        let (bc1, bc2) = (1.0 - b1.powf(t), 1.0 - b2.powf(t));
        let decay = self.cfg.ema_decay.min((1.0 + t) / (10.0 + t));
        for (i, g) in grads.iter().enumerate() {
            let g = (g * clip)?;
            self.m[i] = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?.detach();
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?.detach();
            let upd = ((&self.m[i] / bc1)? / ((&self.v[i] / bc2)?.sqrt()? + self.cfg.eps)?)?;
            // The parameter is a variable: arithmetic on it records ops; the new value must not.
            let p = self.params[i].as_tensor().detach();
            let new = ((p * (1.0 - lr * self.cfg.weight_decay))? - (upd * lr)?)?.detach();
            self.params[i].set(&new)?;
            self.ema[i] = ((&self.ema[i] * decay)? + (new * (1.0 - decay))?)?.detach();
        }
        self.step += 1;
        Ok(StepStats { step: self.step, loss: loss_sum / b, grad_norm, lr, sigma: (log_sigma / b).exp() })
    }

    /// Whether any optimiser state (moments, EMA) still records autograd ops: it must not, or each
    /// step would keep the previous steps' graphs alive (memory growing without bound).
    #[doc(hidden)]
    pub fn state_records_ops(&self) -> bool {
        self.m.iter().chain(&self.v).chain(&self.ema).any(|t| t.track_op())
    }

    /// Writes the EMA weights (`ema`) or the raw weights, DiT and frozen CLIP, as safetensors in the
    /// official key layout, atomically.
    pub fn save_weights(&self, path: &Path, ema: bool) -> Result<()> {
        let ck = self.checkpoint(ema);
        let mut map = HashMap::new();
        for k in ck.keys() {
            map.insert(k.to_string(), ck.load(k, &Device::Cpu)?);
        }
        save_atomic(&map, path)?;
        Ok(())
    }

    /// Saves everything a resumed run needs into `dir` (atomically, file by file; the metadata,
    /// which names the step, is written last).
    pub fn save_state(&self, dir: &Path, sample_cfg: &SampleConfig) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| InfditError::io(dir, e))?;
        let mut map = HashMap::new();
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
        for (i, n) in self.names.iter().enumerate() {
            map.insert(format!("param/{n}"), cpu(self.params[i].as_tensor())?);
            map.insert(format!("adam_m/{n}"), cpu(&self.m[i])?);
            map.insert(format!("adam_v/{n}"), cpu(&self.v[i])?);
            map.insert(format!("ema/{n}"), cpu(&self.ema[i])?);
        }
        save_atomic(&map, &dir.join(STATE_FILE))?;
        let meta =
            Meta { step: self.step, model: self.model_cfg.clone(), train: self.cfg.clone(), sample: sample_cfg.into() };
        let text = serde_json::to_string_pretty(&meta).map_err(|e| InfditError::Internal(e.to_string()))?;
        write_atomic(&dir.join(META_FILE), text.as_bytes())
    }

    /// Restores a state saved by [`save_state`](Self::save_state) into this trainer (built with the
    /// same configs). Returns `false` when `dir` holds no state. The total `steps` may differ (to
    /// extend a run); every other setting must match.
    pub fn load_state(&mut self, dir: &Path, sample_cfg: &SampleConfig) -> Result<bool> {
        let meta_path = dir.join(META_FILE);
        if !meta_path.exists() {
            return Ok(false);
        }
        let text = std::fs::read_to_string(&meta_path).map_err(|e| InfditError::io(&meta_path, e))?;
        let meta: Meta = serde_json::from_str(&text).map_err(|e| InfditError::Training {
            path: meta_path.clone(),
            reason: format!("not a training state: {e}"),
        })?;
        let mut want = self.cfg.clone();
        want.steps = meta.train.steps;
        let sample = SampleConfigMeta::from(sample_cfg);
        if meta.model != self.model_cfg || meta.train != want || meta.sample != sample {
            let mut changed = differing("model", &meta.model, &self.model_cfg);
            changed.extend(differing("train", &meta.train, &want));
            changed.extend(differing("sample", &meta.sample, &sample));
            return Err(InfditError::Config(format!(
                "{}: the saved run used other settings ({}); resume with the same model config and training \
                 flags (only --steps may change), or use another --out folder",
                meta_path.display(),
                changed.join("; ")
            )));
        }
        let path = dir.join(STATE_FILE);
        let st = candle_core::safetensors::load(&path, &self.device).map_err(|e| InfditError::Training {
            path: path.clone(),
            reason: format!("unreadable training state: {e}"),
        })?;
        let get = |k: String| {
            st.get(&k)
                .cloned()
                .ok_or_else(|| InfditError::Training { path: path.clone(), reason: format!("no tensor {k}") })
        };
        for (i, n) in self.names.clone().iter().enumerate() {
            let p = get(format!("param/{n}"))?;
            if p.dims() != self.params[i].dims() {
                return Err(InfditError::Training {
                    path: path.clone(),
                    reason: format!("{n} has shape {:?}", p.dims()),
                });
            }
            self.params[i].set(&p)?;
            self.m[i] = get(format!("adam_m/{n}"))?;
            self.v[i] = get(format!("adam_v/{n}"))?;
            self.ema[i] = get(format!("ema/{n}"))?;
        }
        self.step = meta.step;
        Ok(true)
    }
}

/// The top-level fields of two serialised settings that differ, as `what.field: saved X, now Y`.
fn differing<T: Serialize>(what: &str, saved: &T, now: &T) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(saved), serde_json::to_value(now))
    else {
        return vec![what.to_string()];
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let none = serde_json::Value::Null;
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (a.get(k).unwrap_or(&none), b.get(k).unwrap_or(&none));
            (x != y).then(|| format!("{what}.{k}: saved {x}, now {y}"))
        })
        .collect()
}

/// Writes `bytes` to `path` atomically (the image writer's temporary file, fsync and rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    crate::imageio::write_atomic(path, &[], |w| w.write_all(bytes).map_err(|e| ImageIoError::io(path, e)))
        .map_err(InfditError::Image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_train_settings_name_their_field() {
        let field = |c: TrainConfig| match c.validate() {
            Err(InfditError::InvalidOption { option, reason }) => format!("{option}: {reason}"),
            other => panic!("{other:?}"),
        };
        assert!(TrainConfig::default().validate().is_ok());
        assert!(
            TrainConfig { grad_clip: 0.0, ema_decay: 0.0, weight_decay: 0.0, ..Default::default() }.validate().is_ok()
        );
        assert_eq!(field(TrainConfig { steps: 0, ..Default::default() }), "steps: must be at least 1");
        assert_eq!(field(TrainConfig { batch: 0, ..Default::default() }), "batch: must be at least 1");
        assert_eq!(
            field(TrainConfig { lr: -1e-4, ..Default::default() }),
            "lr: -0.0001 is not a positive learning rate"
        );
        assert_eq!(
            field(TrainConfig { lr: f64::INFINITY, ..Default::default() }),
            "lr: inf is not a positive learning rate"
        );
        assert_eq!(
            field(TrainConfig { ema_decay: 1.5, ..Default::default() }),
            "ema_decay: 1.5 is not an EMA decay (give 0 to 1)"
        );
        assert_eq!(
            field(TrainConfig { grad_clip: -1.0, ..Default::default() }),
            "grad_clip: -1 is not a gradient-norm clip (0: none)"
        );
        assert_eq!(field(TrainConfig { p_std: 0.0, ..Default::default() }), "p_std: 0 is not a positive spread");
        assert_eq!(field(TrainConfig { p_mean: f64::NAN, ..Default::default() }), "p_mean: NaN is not a number");
        assert_eq!(
            field(TrainConfig { betas: (0.9, 1.0), ..Default::default() }),
            "betas: (0.9, 1) are not AdamW betas (each in [0, 1))"
        );
    }

    #[test]
    fn states_saved_before_softening_existed_still_resume() {
        // The sample settings a run wrote before `soften_prob` existed: such a run never softened.
        let old = r#"{"crop": 256, "scale": 4, "resize_prob": 0.3, "flip_prob": 0.3, "degrade_prob": 0.0, "lr_dropout": 0.0}"#;
        let meta: SampleConfigMeta = serde_json::from_str(old).unwrap();
        let now = SampleConfig { crop: 256, degrade_prob: 0.0, lr_dropout: 0.0, ..SampleConfig::default() };
        assert_eq!(meta, SampleConfigMeta::from(&now));
        // A run that softens does not resume as one that did not.
        assert_ne!(meta, SampleConfigMeta::from(&SampleConfig { soften_prob: 0.2, ..now }));
    }
}
