//! `infdit bench denoise`: times one denoiser call D(x; sigma) and reports its model FLOPs, the time
//! per block and, on a GPU, the peak GPU memory; `infdit bench compare` checks a device against the
//! CPU.
//!
//! The inputs are deterministic pseudo-random values (LR image in [-1, 1], its nearest 4x upsample as
//! `concat_lr`, x = concat_lr + sigma * noise) and a zero conditioning vector (CLIP is not timed).
//! One warm-up call, then `--repeat` timed calls; prints best and median seconds per call.
//! bench/cpu.sh compares it with bench/pytorch_baseline.py on the same network, bench/gpu.sh on a
//! GPU.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

use infdit::config::DitConfig;
use infdit::device::OpenedDevice;
use infdit::loaded::Model;
use infdit::model::blocks::{BlockGrid, blocks_to_image, take_blocks};
use infdit::schedule::WholeImageDenoiser;
use infdit::schedule::{BlockDenoiser, MemoryPlan, Placement};

use super::load_model;
use crate::args::{BenchArgs, BenchTarget, ModeArg, OffloadArg};

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

/// `--size`: one or more HxW, comma-separated.
fn parse_sizes(s: &str) -> Result<Vec<(usize, usize)>> {
    let sizes = s.split(',').filter(|p| !p.trim().is_empty()).map(parse_size).collect::<Result<Vec<_>>>()?;
    if sizes.is_empty() {
        bail!("--size: give at least one HxW");
    }
    Ok(sizes)
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
        BenchTarget::Compare => compare(a),
        BenchTarget::Train => bench_train(a),
    }
}

/// The random inputs of one call at `h x w`, in host memory: LR (1, 3, h/s, w/s), its nearest
/// upsample `concat_lr` and x = concat_lr + sigma * noise (1, 3, h, w).
struct Inputs {
    lr: Tensor,
    concat_lr: Tensor,
    x: Tensor,
}

fn inputs(cfg: &DitConfig, h: usize, w: usize, sigma: f32, seed: u64) -> Result<Inputs> {
    let bp = cfg.block_px;
    if h == 0 || w == 0 || !h.is_multiple_of(bp) || !w.is_multiple_of(bp) {
        bail!("--size {h}x{w}: both sides must be positive multiples of the block size {bp}");
    }
    let (dev, s) = (Device::Cpu, cfg.sr_scale);
    let lr = Tensor::from_vec(uniform(seed, 3 * (h / s) * (w / s)), (1, 3, h / s, w / s), &dev)?;
    let concat_lr = lr.upsample_nearest2d(h, w)?;
    let noise = Tensor::from_vec(uniform(seed ^ 0xA5A5, 3 * h * w), (1, 3, h, w), &dev)?;
    let x = (&concat_lr + (noise * sigma as f64)?)?;
    Ok(Inputs { lr, concat_lr, x })
}

/// The block batch side for a grid: `--block-batch`, else on a GPU the largest that fits the GPU
/// memory plan, else 1.
fn block_batch(
    a: &BenchArgs,
    model: &Model,
    dev: &OpenedDevice,
    dt: DType,
    grid: &BlockGrid,
    offload: bool,
) -> Result<usize> {
    if let Some(n) = a.block_batch {
        return Ok(n);
    }
    let free = infdit::device::gpu_memory(&dev.device);
    if !dev.is_gpu() && a.max_memory.is_none() {
        return Ok(1);
    }
    let budget = match (a.max_memory, free) {
        (Some(b), _) => b,
        (None, Some((f, _))) => infdit::device::default_gpu_budget(f),
        (None, None) => 4 << 30,
    } as usize;
    let placed = Placement { gpu: dev.is_gpu(), kv_offload: offload, state_dir: false };
    let params = Model::parameter_count(&model.cfg)?;
    MemoryPlan::largest_batch_placed(&model.cfg.dit, params, grid, dt, dt, budget, placed)
        .with_context(|| format!("even --block-batch 1 does not fit the memory budget of {budget} bytes"))
}

fn mib(b: Option<u64>) -> String {
    b.map_or_else(|| "na".into(), |b| format!("{:.1}", b as f64 / (1u64 << 20) as f64))
}

fn dtype_name(dt: DType) -> &'static str {
    match dt {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

fn bench_denoise(a: BenchArgs) -> Result<()> {
    let sizes = parse_sizes(&a.size)?;
    let dev = super::open_device(a.device)?;
    let dt = super::run_dtype(a.dtype, &dev);
    let model = load_model(&a.model, dt, &dev.device)?;
    let cfg = model.cfg.dit.clone();
    let clip = Tensor::zeros((1, cfg.vector_dim), DType::F32, &Device::Cpu)?;
    let offloads: &[bool] = match a.kv_offload {
        OffloadArg::Off => &[false],
        OffloadArg::On => &[true],
        OffloadArg::Both => &[false, true],
    };
    let blocks_mode = a.block_batch.is_some()
        || a.max_memory.is_some()
        || a.kv_offload != OffloadArg::Off
        || (dev.is_gpu() && a.mode.is_none());
    let mode = match (a.mode, blocks_mode) {
        (_, _) if a.block_batch == Some(0) => bail!("--block-batch must be at least 1"),
        (Some(ModeArg::Whole), true) if a.block_batch.is_some() || a.kv_offload != OffloadArg::Off => {
            bail!("--block-batch and --kv-offload are for --mode blocks")
        }
        (Some(ModeArg::Whole), _) | (None, false) => ModeArg::Whole,
        _ => ModeArg::Blocks,
    };
    let warmup = match &a.warmup {
        Some(s) => parse_size(s)?,
        None => sizes[0],
    };
    // One call of the denoiser on `inp` with the block batch `n` and the offload setting (None:
    // whole-image mode).
    let call = |inp: &Inputs, n: Option<usize>, offload: Option<bool>| -> Result<Tensor> {
        Ok(match (n, offload) {
            (Some(n), Some(o)) => {
                let mut den = BlockDenoiser::new(&model.dit, &clip, &inp.lr, &inp.concat_lr, n, dt)?.with_kv_offload(o);
                sweep_to_host(&mut den, &inp.x, a.sigma)?
            }
            _ => {
                let concat = inp.concat_lr.to_device(&dev.device)?;
                let x = inp.x.to_device(&dev.device)?;
                WholeImageDenoiser::new(&model.dit, &clip, &inp.lr, &concat)?.denoise_traced(&x, a.sigma, None)?
            }
        })
    };
    let batch_for = |h: usize, w: usize, offload: Option<bool>| -> Result<Option<usize>> {
        let grid = BlockGrid::for_image(h, w, cfg.block_px)?;
        offload.map(|o| block_batch(&a, &model, &dev, dt, &grid, o)).transpose()
    };
    let mut warmed = Vec::new();
    for &(h, w) in &sizes {
        let inp = inputs(&cfg, h, w, a.sigma, a.seed)?;
        let grid = BlockGrid::for_image(h, w, cfg.block_px)?;
        let modes: Vec<Option<bool>> = match mode {
            ModeArg::Whole => vec![None],
            ModeArg::Blocks => offloads.iter().map(|&o| Some(o)).collect(),
        };
        for offload in modes {
            let n = batch_for(h, w, offload)?;
            // One warm-up call per setting (kernels loaded, allocator warm) before its first timing.
            if !warmed.contains(&offload) {
                let (wh, ww) = warmup;
                let out = call(&inputs(&cfg, wh, ww, a.sigma, a.seed)?, batch_for(wh, ww, offload)?, offload)?;
                let check = out.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                if !check.is_finite() {
                    bail!("the denoiser output is not finite");
                }
                warmed.push(offload);
            }
            let mut times = Vec::with_capacity(a.repeat.max(1));
            let (mut peak, mut reserved) = (None::<u64>, None::<u64>);
            for _ in 0..a.repeat.max(1) {
                infdit::device::reset_gpu_peak(&dev.device)?;
                let t0 = Instant::now();
                let y = call(&inp, n, offload)?;
                dev.device.synchronize()?;
                times.push(t0.elapsed().as_secs_f64());
                drop(y);
                let m = |a: Option<u64>, b: Option<u64>| match (a, b) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                peak = m(peak, infdit::device::gpu_peak(&dev.device));
                reserved = m(reserved, infdit::device::gpu_peak_reserved(&dev.device));
            }
            times.sort_by(f64::total_cmp);
            let best = times[0];
            let median = if times.len() % 2 == 1 {
                times[times.len() / 2]
            } else {
                (times[times.len() / 2 - 1] + times[times.len() / 2]) / 2.0
            };
            let flops = denoise_flops(&cfg, h, w);
            let mode_s = n.map_or_else(|| "whole".to_string(), |n| format!("blocks{n}"));
            let kv = match offload {
                None => "na",
                Some(true) => "on",
                Some(false) => "off",
            };
            println!(
                "infdit_denoise best_s={best:.6} median_s={median:.6} per_block_s={:.6} blocks={} gflop={:.3} \
                 gflops={:.2} size={h}x{w} dtype={} mode={mode_s} kv_offload={kv} device={} peak_gpu_mib={} \
                 peak_gpu_reserved_mib={} threads={} repeat={} kernels={}",
                best / grid.len() as f64,
                grid.len(),
                flops / 1e9,
                flops / best / 1e9,
                dtype_name(dt),
                dev.name(),
                mib(peak),
                mib(reserved),
                candle_core::utils::get_num_threads(),
                times.len(),
                infdit::kernels::path()
            );
        }
    }
    Ok(())
}

/// One sweep as upscale runs it: the input blocks come from host memory and each batch's result
/// goes back there at once (so GPU memory holds no image-size tensor); the image is put together
/// in host memory.
fn sweep_to_host(den: &mut BlockDenoiser, x: &Tensor, sigma: f32) -> Result<Tensor> {
    let grid = den.grid();
    let mut out: Vec<Option<Tensor>> = vec![None; grid.len()];
    den.sweep_blocks::<candle_core::Error>(sigma, &mut |pos| take_blocks(x, grid.block_px, pos), &mut |pos, _, d| {
        let d = d.to_device(&Device::Cpu)?;
        for (i, p) in pos.iter().enumerate() {
            out[p.row * grid.cols + p.col] = Some(d.get(i)?);
        }
        Ok(())
    })?;
    let blocks: Vec<Tensor> = out.into_iter().map(|t| t.expect("every block is produced")).collect();
    Ok(blocks_to_image(&Tensor::stack(&blocks, 0)?, &grid)?)
}

fn max_abs(t: &Tensor) -> Result<f32> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F32)?.to_scalar::<f32>()?)
}

fn diff(a: &Tensor, b: &Tensor) -> Result<(f32, f32)> {
    let d = (a.to_device(&Device::Cpu)?.to_dtype(DType::F32)? - b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?;
    Ok((d.max(0)?.to_scalar::<f32>()?, d.mean(0)?.to_scalar::<f32>()?))
}

/// `infdit bench compare`: the same block-scheduler call on the CPU in f32 and on `--device` in
/// f32 and in `--dtype`, with and without --kv-offload.
fn compare(a: BenchArgs) -> Result<()> {
    let (h, w) = parse_sizes(&a.size)?[0];
    let dev = super::open_device(a.device)?;
    let dt = super::run_dtype(a.dtype, &dev);
    let n = match a.block_batch {
        Some(0) => bail!("--block-batch must be at least 1"),
        Some(n) => n,
        None => 2,
    };
    let cpu_model = load_model(&a.model, DType::F32, &Device::Cpu)?;
    let cfg = cpu_model.cfg.dit.clone();
    let inp = inputs(&cfg, h, w, a.sigma, a.seed)?;
    let clip = Tensor::zeros((1, cfg.vector_dim), DType::F32, &Device::Cpu)?;
    let sweep = |m: &Model, dt: DType, offload: bool| -> Result<Tensor> {
        let mut den = BlockDenoiser::new(&m.dit, &clip, &inp.lr, &inp.concat_lr, n, dt)?.with_kv_offload(offload);
        sweep_to_host(&mut den, &inp.x, a.sigma)
    };
    let reference = sweep(&cpu_model, DType::F32, false)?;
    let scale = max_abs(&reference)?;
    let mut line = format!(
        "compare size={h}x{w} block_batch={n} device={} reference=cpu-f32 max_abs_output={scale:.4}",
        dev.name()
    );
    let mut ok = true;
    let mut dtypes = vec![DType::F32];
    if dt != DType::F32 {
        dtypes.push(dt);
    }
    for d in dtypes {
        let model = if d == DType::F32 && dev.device.is_cpu() {
            cpu_model.clone()
        } else {
            load_model(&a.model, d, &dev.device)?
        };
        let plain = sweep(&model, d, false)?;
        let offloaded = sweep(&model, d, true)?;
        let (mx, mean) = diff(&plain, &reference)?;
        let (off, _) = diff(&offloaded, &plain)?;
        let name = dtype_name(d);
        line += &format!(
            " {name}_max_abs_diff={mx:.3e} {name}_mean_abs_diff={mean:.3e} {name}_kv_offload_max_abs_diff={off:.3e}"
        );
        // f32 on the device must agree closely with the CPU; offloading must change nothing.
        ok &= off == 0.0 && mx.is_finite() && (d != DType::F32 || mx <= 1e-3 * scale.max(1.0));
    }
    println!("{line} {}", if ok { "OK" } else { "FAIL" });
    if !ok {
        bail!(
            "the device's result differs from the CPU's beyond the tolerance (f32: 1e-3 of the output) or --kv-offload changed it"
        );
    }
    Ok(())
}

/// `infdit bench train`: the library's [`infdit::train::bench::bench_train`] for the built-in
/// training config (or `--config`) and a larger one (hidden 256, depth 8, 4 heads, MLP 1024): the fast
/// backward with f32 products, with bf16 products where the CPU has AMX, and the autograd path;
/// `--repeat` timed steps of a batch of 4 128-px crops after one warm-up step.
fn bench_train(a: BenchArgs) -> Result<()> {
    use infdit::config::ModelConfig;
    use infdit::model::grad::{GradPath, MatmulPrecision};
    use infdit::train::bench::{bench_train as run, train_flops};
    if a.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let base = match &a.model.config {
        Some(p) => ModelConfig::from_file(p)?,
        None => ModelConfig::from_json_str(infdit::loaded::BUILTIN_CONFIG)?,
    };
    let mut large = base.clone();
    large.dit.hidden = 256;
    large.dit.depth = 8;
    large.dit.heads = 4;
    large.dit.mlp_hidden = 1024;
    let dev = super::open_device(a.device)?;
    // A GPU gets crops big enough to keep it busy, and only candle's autograd (the fast
    // backward's fused ops are CPU kernels). On the CPU: the fast backward with f32 products, with
    // bf16 products where the CPU runs them (AMX), and the autograd path it replaced.
    let bf16 = MatmulPrecision::bf16_runs();
    let ((crop, batch), runs): (_, Vec<(GradPath, MatmulPrecision)>) = if dev.is_gpu() {
        ((512, 8), vec![(GradPath::Autograd, MatmulPrecision::F32)])
    } else {
        let mut runs = vec![(GradPath::Fast, MatmulPrecision::F32)];
        if bf16 {
            runs.push((GradPath::Fast, MatmulPrecision::Bf16));
        }
        runs.push((GradPath::Autograd, MatmulPrecision::F32));
        ((128, 4), runs)
    };
    println!(
        "device {}  threads {}  kernels {}  bf16 products {}  crop {crop}  batch {batch}  timed steps {}",
        dev.describe(),
        infdit::train::bench::threads(),
        infdit::kernels::path(),
        if bf16 { "amx" } else { "no (no AMX on this CPU): f32" },
        a.repeat
    );
    for (label, cfg) in [("built-in", &base), ("large", &large)] {
        let d = &cfg.dit;
        println!(
            "{label}: hidden {} depth {} heads {} mlp {} patch {} block {}  {:.2} GFLOP per crop (fwd+bwd)",
            d.hidden,
            d.depth,
            d.heads,
            d.mlp_hidden,
            d.patch,
            d.block_px,
            train_flops(d, crop) / 1e9
        );
        let mut rates = Vec::new();
        for &run_of in &runs {
            let r = run(cfg, (crop, batch), 1, a.repeat, run_of, &dev.device)?;
            let name = match r.path {
                GradPath::Fast => format!("fast {}", r.matmul),
                GradPath::Autograd => "autograd".to_string(),
            };
            println!(
                "  {name:<9}  step best {:.3} s  median {:.3} s  {:.2} crops/s  {:.1} GFLOP/s",
                r.best_step_s, r.median_step_s, r.crops_per_s, r.gflops
            );
            rates.push((name, r.path, r.crops_per_s));
        }
        if let Some(&(_, _, autograd)) = rates.iter().find(|r| r.1 == GradPath::Autograd) {
            for (name, _, rate) in rates.iter().filter(|r| r.1 == GradPath::Fast) {
                println!("  ratio {name}/autograd: {:.2}x", rate / autograd);
            }
        }
    }
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
            ..DitConfig::released()
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
