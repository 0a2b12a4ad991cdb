//! `infdit bench denoise`: times one denoiser call D(x; sigma) and reports its model FLOPs.
//!
//! The inputs are deterministic pseudo-random values (LR image in [-1, 1], its nearest 4x upsample as
//! `concat_lr`, x = concat_lr + sigma * noise) and a zero conditioning vector (CLIP is not timed).
//! One warm-up call, then `--repeat` timed calls; prints best and median seconds per call.
//! bench/cpu.sh compares it with bench/pytorch_baseline.py on the same network.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

use infdit::config::DitConfig;
use infdit::pipeline::WholeImageDenoiser;
use infdit::schedule::BlockDenoiser;

use super::{dtype, load_model};
use crate::args::{BenchArgs, BenchTarget, ModeArg};

/// Model FLOPs of one denoiser call on an `h x w` (HR pixels) image, counting a multiply-add as 2.
///
/// With N = (h/p)(w/p) tokens, D the width, M the MLP width, L the depth:
/// * per layer and token, linears: `2 (3D^2 + D^2 + 2 D M)` (QKV, output projection, MLP);
/// * per layer and query token, UniBA attention: `2 * 2 * 4 T * D` (QK^T and PV over the 4 groups of
///   T = 1024 keys: [self, top-left, left, top]);
/// * layer 0 LR cross-attention, per token: `2 (2 D^2)` (query and output projections) and
///   `2 * 2 * W^2 * D` (attention over the W x W = 48 x 48 = 2304 window keys); once per image the
///   key/value projection of the zero-padded LR feature map, `2 (h'+2b)(w'+2b) D (2D)` with
///   h' = h / (sr_scale lr_patch) and b = lr_block, and the LR convolution `2 h' w' D 3 lr_patch^2`;
/// * patch embedding `2 N D in_ch p^2` and final linear `2 N D out_ch p^2`.
///
/// Not counted (linear in N·D or per image, negligible): LayerNorms, RoPE, softmax, GELU, the adaLN
/// and time/vector MLPs.
pub fn denoise_flops(cfg: &DitConfig, h: usize, w: usize) -> f64 {
    let (d, m, l) = (cfg.hidden as f64, cfg.mlp_hidden as f64, cfg.depth as f64);
    let p = cfg.patch as f64;
    let n = (h / cfg.patch * (w / cfg.patch)) as f64;
    let t = (cfg.block_tokens() * cfg.block_tokens()) as f64;
    let win = (cfg.lr_window() * cfg.lr_window()) as f64;
    let linears = 2.0 * (3.0 * d * d + d * d + 2.0 * d * m);
    let attn = 2.0 * 2.0 * 4.0 * t * d;
    let layers = l * n * (linears + attn);
    let cross_tok = n * (2.0 * 2.0 * d * d + 2.0 * 2.0 * win * d);
    let lr_div = cfg.sr_scale * cfg.lr_patch;
    let (hl, wl) = ((h / lr_div) as f64, (w / lr_div) as f64);
    let b = cfg.lr_block() as f64;
    let lr_kv = 2.0 * (hl + 2.0 * b) * (wl + 2.0 * b) * d * 2.0 * d;
    let lr_conv = 2.0 * hl * wl * d * 3.0 * (cfg.lr_patch * cfg.lr_patch) as f64;
    let embed = 2.0 * n * d * cfg.in_channels as f64 * p * p;
    let fin = 2.0 * n * d * cfg.out_channels as f64 * p * p;
    layers + cross_tok + lr_kv + lr_conv + embed + fin
}

fn parse_size(s: &str) -> Result<(usize, usize)> {
    let (a, b) = s.split_once(['x', 'X']).with_context(|| format!("--size {s}: expected HxW"))?;
    Ok((a.trim().parse().context("--size height")?, b.trim().parse().context("--size width")?))
}

/// Deterministic values in [-1, 1) (splitmix64).
fn uniform(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Runs `infdit bench`.
pub fn bench(a: BenchArgs) -> Result<()> {
    match a.target {
        BenchTarget::Denoise => bench_denoise(a),
    }
}

fn bench_denoise(a: BenchArgs) -> Result<()> {
    let dev = Device::Cpu;
    let (h, w) = parse_size(&a.size)?;
    let dt = dtype(a.dtype);
    let model = load_model(&a.model, dt, &dev)?;
    let cfg = model.cfg.dit.clone();
    let bp = cfg.block_px;
    if h == 0 || w == 0 || h % bp != 0 || w % bp != 0 {
        bail!("--size {h}x{w}: both sides must be positive multiples of the block size {bp}");
    }
    let s = cfg.sr_scale;
    let lr = Tensor::from_vec(uniform(a.seed, 3 * (h / s) * (w / s)), (1, 3, h / s, w / s), &dev)?;
    let concat_lr = lr.upsample_nearest2d(h, w)?;
    let noise = Tensor::from_vec(uniform(a.seed ^ 0xA5A5, 3 * h * w), (1, 3, h, w), &dev)?;
    let x = (&concat_lr + (noise * a.sigma as f64)?)?;
    let clip = Tensor::zeros((1, cfg.vector_dim), DType::F32, &dev)?;

    let mode = match (a.mode, a.block_batch) {
        (Some(ModeArg::Whole), _) | (None, None) => None,
        (_, Some(0)) => bail!("--block-batch must be at least 1"),
        (Some(ModeArg::Blocks), n) | (None, n) => Some(n.unwrap_or(1)),
    };
    let mut whole;
    let mut blocks;
    let mut call: Box<dyn FnMut() -> Result<Tensor>> = match mode {
        None => {
            whole = WholeImageDenoiser::new(&model.dit, &clip, &lr, &concat_lr)?;
            Box::new(|| Ok(whole.denoise_traced(&x, a.sigma, None)?))
        }
        Some(n) => {
            blocks = BlockDenoiser::new(&model.dit, &clip, &lr, &concat_lr, n, dt)?;
            Box::new(|| Ok(blocks.sweep(&x, a.sigma)?))
        }
    };
    let out = call()?; // warm-up
    let check = out.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    if !check.is_finite() {
        bail!("the denoiser output is not finite");
    }
    let mut times = Vec::with_capacity(a.repeat.max(1));
    for _ in 0..a.repeat.max(1) {
        let t0 = Instant::now();
        let y = call()?;
        drop(y);
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let best = times[0];
    let median = if times.len() % 2 == 1 {
        times[times.len() / 2]
    } else {
        (times[times.len() / 2 - 1] + times[times.len() / 2]) / 2.0
    };
    let flops = denoise_flops(&cfg, h, w);
    let mode_s = match mode {
        None => "whole".to_string(),
        Some(n) => format!("blocks{n}"),
    };
    println!(
        "infdit_denoise best_s={best:.6} median_s={median:.6} gflop={:.3} gflops={:.2} size={h}x{w} dtype={:?} \
         mode={mode_s} threads={} repeat={}",
        flops / 1e9,
        flops / best / 1e9,
        a.dtype,
        candle_core::utils::get_num_threads(),
        times.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_of_small_config() {
        let cfg = DitConfig {
            hidden: 64,
            depth: 2,
            heads: 2,
            mlp_hidden: 128,
            patch: 4,
            in_channels: 6,
            out_channels: 3,
            block_px: 128,
            vector_dim: 8,
            time_channels: 192,
            image_size: 512,
            sr_scale: 4,
            lr_patch: 2,
            ln_eps: 1e-6,
        };
        // one 128x128 block: N = 1024 tokens, LR 32x32 -> features 16x16, padded 48x48.
        let n = 1024.0;
        let per_layer = n * (2.0 * (4.0 * 64.0 * 64.0 + 2.0 * 64.0 * 128.0) + 16.0 * 1024.0 * 64.0);
        let cross = n * (4.0 * 64.0 * 64.0 + 4.0 * 2304.0 * 64.0) + 2.0 * 48.0 * 48.0 * 64.0 * 128.0;
        let small = 2.0 * 256.0 * 64.0 * 12.0 + 2.0 * n * 64.0 * 96.0 + 2.0 * n * 64.0 * 48.0;
        let want = 2.0 * per_layer + cross + small;
        assert!((denoise_flops(&cfg, 128, 128) - want).abs() < 1e-6 * want);
    }
}
