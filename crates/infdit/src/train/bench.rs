//! `infdit bench train`: the throughput of training steps, for the fast backward
//! ([`super::grad`]) and the plain candle-autograd path it replaces, in the same process.
//!
//! Inputs are synthetic (smooth colour fields with hard edges, in memory) so that no image folder
//! is needed; the step is the real [`Trainer::train_step`] (sampling, degradation, forward,
//! backward, AdamW, EMA) from a random initialisation (not the zero final layer of a new run, so
//! that every gradient is non-zero).

use std::path::PathBuf;
use std::time::Instant;

use super::data::{Dataset, SampleConfig};
use super::trainer::{TrainConfig, Trainer};
use super::{Image, Sampler, SplitMix64};
use crate::config::{DitConfig, ModelConfig};
use crate::error::Result;
use crate::loaded::random::random_checkpoint;
use crate::model::grad::{self, GradPath, MatmulPrecision};

/// Model FLOPs of one forward pass of the network on one `crop x crop` training image, counting a
/// multiply-add as 2: the dense layers (QKV, output projection, MLP: `2 (4 D^2 + 2 D M)` per token
/// and layer), the UniBA self-attention (`2 * 2 * 4 T * D` per token and layer: QK^T and PV over
/// the 4 key groups of T tokens), the layer-0 cross-attention (`2 * 2 D^2` projections and
/// `2 * 2 W^2 D` attention per token, W = the LR window side), the LR key/value projection and
/// convolution, the patch embedding and the final linear. LayerNorms, RoPE, softmax, GELU and the
/// adaLN/time MLPs are not counted. This is the same count as `infdit bench denoise`.
pub fn forward_flops(cfg: &DitConfig, crop: usize) -> f64 {
    let (d, m, l) = (cfg.hidden as f64, cfg.mlp_hidden as f64, cfg.depth as f64);
    let p = cfg.patch as f64;
    let n = ((crop / cfg.patch) * (crop / cfg.patch)) as f64;
    let t = (cfg.block_tokens() * cfg.block_tokens()) as f64;
    let win = (cfg.lr_window() * cfg.lr_window()) as f64;
    let linears = 2.0 * (3.0 * d * d + d * d + 2.0 * d * m);
    let attn = 2.0 * 2.0 * 4.0 * t * d;
    let cross_tok = n * (2.0 * 2.0 * d * d + 2.0 * 2.0 * win * d);
    let hl = (crop / (cfg.sr_scale * cfg.lr_patch)) as f64;
    let b = cfg.lr_block() as f64;
    let lr_kv = 2.0 * (hl + 2.0 * b) * (hl + 2.0 * b) * d * 2.0 * d;
    let lr_conv = 2.0 * hl * hl * d * 3.0 * (cfg.lr_patch * cfg.lr_patch) as f64;
    let embed = 2.0 * n * d * cfg.in_channels as f64 * p * p;
    let fin = 2.0 * n * d * cfg.out_channels as f64 * p * p;
    l * n * (linears + attn) + cross_tok + lr_kv + lr_conv + embed + fin
}

/// FLOPs of one training example: forward plus backward, the backward counted as twice the
/// forward (every product `Y = A B` needs `dA = dY B^T` and `dB = A^T dY`; attention's backward
/// recomputes no product of the forward in this count).
pub fn train_flops(cfg: &DitConfig, crop: usize) -> f64 {
    3.0 * forward_flops(cfg, crop)
}

/// One measured configuration.
#[derive(Debug, Clone)]
pub struct TrainBench {
    /// The path measured.
    pub path: GradPath,
    /// The precision the fast backward's products ran in (on this CPU; autograd's are f32).
    pub matmul: MatmulPrecision,
    /// Seconds per optimiser step, best of the timed steps.
    pub best_step_s: f64,
    /// Median seconds per step.
    pub median_step_s: f64,
    /// Crops per second at the median.
    pub crops_per_s: f64,
    /// Model GFLOP/s at the median ([`train_flops`] x batch / step time).
    pub gflops: f64,
}

/// Worker threads of the pool the kernels run on.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// A deterministic synthetic training picture `h x w`.
pub fn synthetic_picture(seed: u64, h: usize, w: usize) -> Image {
    let mut r = SplitMix64::new(seed);
    let (a, b, c) = (r.uniform(0.02, 0.1), r.uniform(0.02, 0.1), r.uniform(0.0, 6.0));
    let mut data = Vec::with_capacity(3 * h * w);
    for ch in 0..3 {
        for y in 0..h {
            for x in 0..w {
                let s = ((x as f64 * a + y as f64 * b + c + ch as f64).sin() * 0.35 + 0.5)
                    + if (x / 24 + y / 40) % 2 == 0 { 0.1 } else { -0.1 };
                data.push(s.clamp(0.0, 1.0) as f32);
            }
        }
    }
    Image::new(3, h, w, data)
}

/// Runs `warmup` + `steps` optimiser steps of a `batch` of `crop`-pixel crops with the given
/// backward (and, for the fast one, products in `matmul`) on `device` and times the last `steps`
/// (on a GPU the fast backward does not apply: both paths are candle's autograd there).
pub fn bench_train(
    cfg: &ModelConfig,
    (crop, batch): (usize, usize),
    warmup: usize,
    steps: usize,
    (path, matmul): (GradPath, MatmulPrecision),
    device: &candle_core::Device,
) -> Result<TrainBench> {
    if steps == 0 || batch == 0 {
        return Err(crate::error::InfditError::Config("bench_train: give at least one step and one crop".into()));
    }
    let side = crop + crop / 2;
    let data = Dataset::from_images(
        (0..4).map(|i| (PathBuf::from(format!("synthetic{i}")), synthetic_picture(i, side, side))).collect(),
    );
    let sample = SampleConfig { crop, scale: cfg.dit.sr_scale, ..Default::default() };
    let tc = TrainConfig { steps: warmup + steps, batch, matmul, ..Default::default() };
    let mut trainer = Trainer::new_on(cfg, &random_checkpoint(cfg, 1)?, tc, device)?;
    let mut times = Vec::with_capacity(steps);
    grad::with_path(path, || -> Result<()> {
        for i in 0..warmup + steps {
            let t0 = Instant::now();
            trainer.train_step(&data, &sample)?;
            if i >= warmup {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        Ok(())
    })?;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let per_step = train_flops(&cfg.dit, crop) * batch as f64;
    let matmul = if path == GradPath::Fast && device.is_cpu() { matmul.effective() } else { MatmulPrecision::F32 };
    Ok(TrainBench {
        path,
        matmul,
        best_step_s: times[0],
        median_step_s: median,
        crops_per_s: batch as f64 / median,
        gflops: per_step / median / 1e9,
    })
}
