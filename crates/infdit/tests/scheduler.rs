//! The UniBA block scheduler equals whole-image mode (fp32 rounding), on the parity models and on
//! random models with non-square and ragged grids; resume is bit-identical.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use infdit::config::{DitConfig, ModelConfig};
use infdit::diffusion::noise::image_noise;
use infdit::diffusion::{HeunConfig, initial_state};
use infdit::imageio::resize::Bicubic;
use infdit::model::blocks::BlockGrid;
use infdit::pipeline::{Mode, Model, PassScale, Prepared, SampleOptions, WholeImageDenoiser, sample};
use infdit::schedule::{BlockDenoiser, batches};
use infdit::weights::random::random_checkpoint;

/// Relative bound: max |a - b| / max |b|.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(a, b) / max_of(b).max(1e-30)
}

const REL_BOUND: f64 = 1e-5;

#[test]
fn batches_cover_ragged_grids_in_raster_order() {
    let g = BlockGrid { rows: 3, cols: 5, block_px: 128 };
    let b = batches(&g, 2);
    assert_eq!(b.len(), 6);
    assert_eq!((b[2].col0, b[2].col1, b[2].row1), (4, 5, 2));
    assert_eq!((b[5].row0, b[5].row1, b[5].col0, b[5].col1), (2, 3, 4, 5));
    let mut all: Vec<_> = b.iter().flat_map(|x| x.blocks()).collect();
    all.sort();
    assert_eq!(all, g.raster());
}

/// Scheduler D == whole-image D on every parity case, for n = 1, 2, 3.
#[test]
fn scheduler_matches_whole_image_on_parity_cases() {
    for case_name in ["a", "b", "c", "d", "e"] {
        let c = case(case_name);
        let m = model(case_name);
        let lr = &c["lr"];
        let clip = &c["clip_vector"];
        let concat_lr = match c.get("concat_lr") {
            Some(t) => t.clone(),
            None => {
                let (set, _) = set_of(case_name);
                let png =
                    infdit::imageio::load_rgb(&shared(set).join(format!("case_{case_name}_lr.png")), 1 << 30).unwrap();
                infdit::pipeline::prepare_official(&png, PassScale::X4, 128, Bicubic::Antialias).unwrap().concat_lr
            }
        };
        let sig = sigmas(&c);
        let x = x_in(&concat_lr, &c["eps"], sig[10]);
        let whole =
            WholeImageDenoiser::new(&m.dit, clip, lr, &concat_lr).unwrap().denoise_traced(&x, sig[10], None).unwrap();
        for n in [1, 2, 3] {
            let mut s = BlockDenoiser::new(&m.dit, clip, lr, &concat_lr, n, DType::F32).unwrap();
            let d = s.sweep(&x, sig[10]).unwrap();
            let r = rel(&d, &whole);
            println!("case {case_name} n={n}: relative diff to whole-image {r:.2e}");
            assert!(r <= REL_BOUND, "case {case_name} n={n}: {r:e}");
            // And the official output itself.
            assert_close(&format!("case {case_name} n={n} denoised_10"), &d, &c["denoised_10"], 5e-6);
        }
    }
}

fn tiny_random(depth: usize, hidden: usize, heads: usize, seed: u64) -> Model {
    let cfg = ModelConfig {
        dit: DitConfig { hidden, depth, heads, mlp_hidden: 2 * hidden, vector_dim: 8, ..DitConfig::released() },
        clip: None,
    };
    let ck = random_checkpoint(&cfg, seed).unwrap();
    Model::from_checkpoint(&cfg, ck, DType::F32, &Device::Cpu).unwrap()
}

fn random_inputs(rows: usize, cols: usize, seed: u64) -> (Prepared, Tensor, Tensor) {
    let dev = Device::Cpu;
    let grid = BlockGrid { rows, cols, block_px: 128 };
    // A smooth random LR image: noise at 1/4 resolution, blurred by the upsampling.
    let lr = (image_noise(seed, &BlockGrid { rows, cols, block_px: 32 }, 3, &dev).unwrap() * 0.3).unwrap();
    let concat_lr = infdit::imageio::resize::resize_tensor(&lr, rows * 128, cols * 128, Bicubic::Antialias)
        .unwrap()
        .clamp(-1f32, 1f32)
        .unwrap();
    let eps = image_noise(seed + 1, &grid, 3, &dev).unwrap();
    let clip = Tensor::zeros((1, 8), DType::F32, &dev).unwrap();
    (Prepared { lr, concat_lr, grid }, eps, clip)
}

/// Random weights, grids 1x7, 9x1, 3x4, 2x5: n = 1, 2, 3 (ragged batches) equal whole-image mode.
#[test]
fn scheduler_matches_whole_image_on_random_grids() {
    let m = tiny_random(2, 32, 2, 11);
    for (rows, cols) in [(1, 7), (9, 1), (3, 4), (2, 5)] {
        let (p, eps, clip) = random_inputs(rows, cols, (rows * 10 + cols) as u64);
        let x = initial_state(&p.concat_lr, &eps, 1.5).unwrap();
        let whole =
            WholeImageDenoiser::new(&m.dit, &clip, &p.lr, &p.concat_lr).unwrap().denoise_traced(&x, 1.5, None).unwrap();
        for n in [1, 2, 3] {
            let d =
                BlockDenoiser::new(&m.dit, &clip, &p.lr, &p.concat_lr, n, DType::F32).unwrap().sweep(&x, 1.5).unwrap();
            let r = rel(&d, &whole);
            println!("{rows}x{cols} n={n}: {r:.2e}");
            assert!(r <= REL_BOUND, "{rows}x{cols} n={n}: relative diff {r:e}");
        }
    }
}

/// The 20-step sample: scheduler (n = 2 on a 3x3 grid: ragged) vs the official sample of case c,
/// and vs whole-image mode on a random 2x3 grid.
#[test]
fn scheduler_sample_matches() {
    let c = case("c");
    let m = model("c");
    let prep = Prepared {
        lr: c["lr"].clone(),
        concat_lr: c["concat_lr"].clone(),
        grid: BlockGrid { rows: 3, cols: 3, block_px: 128 },
    };
    let opts = SampleOptions { mode: Mode::Blocks { block_batch: 2, kv_dtype: DType::F32 }, ..Default::default() };
    let out = sample(&m, &prep, &c["clip_vector"], &c["eps"], &opts, &mut |_| {}).unwrap();
    assert_close("case c scheduler sample", out.sample.as_ref().unwrap(), &c["sample"], 1e-5);

    let rm = tiny_random(2, 32, 2, 5);
    let (p, eps, clip) = random_inputs(2, 3, 99);
    let heun = HeunConfig::default();
    let whole = sample(
        &rm,
        &p,
        &clip,
        &eps,
        &SampleOptions { heun, mode: Mode::WholeImage, ..Default::default() },
        &mut |_| {},
    )
    .unwrap();
    for n in [1, 3] {
        let o =
            SampleOptions { heun, mode: Mode::Blocks { block_batch: n, kv_dtype: DType::F32 }, ..Default::default() };
        let s = sample(&rm, &p, &clip, &eps, &o, &mut |_| {}).unwrap();
        let r = rel(s.sample.as_ref().unwrap(), whole.sample.as_ref().unwrap());
        println!("random 2x3 20-step sample n={n}: {r:.2e}");
        assert!(r <= REL_BOUND, "n={n}: {r:e}");
    }
}

/// The cache holds cols + n + 1 blocks per layer at most, and bf16/f16 caches stay close.
#[test]
fn cache_size_and_reduced_precision() {
    let m = tiny_random(2, 32, 2, 3);
    let (p, eps, clip) = random_inputs(4, 5, 7);
    let x = initial_state(&p.concat_lr, &eps, 0.7).unwrap();
    let mut f32s = BlockDenoiser::new(&m.dit, &clip, &p.lr, &p.concat_lr, 2, DType::F32).unwrap();
    let d32 = f32s.sweep(&x, 0.7).unwrap();
    // Per block and layer: K and V of 1024 tokens x 32 channels, f32.
    let per_block_layer = 2 * 1024 * 32 * 4;
    let limit = (5 + 2 + 1) * 2 * per_block_layer;
    println!("peak cache {} bytes, bound {limit}", f32s.peak_cache_bytes);
    assert!(f32s.peak_cache_bytes <= limit);
    assert!(f32s.peak_cache_bytes >= 5 * 2 * per_block_layer);
    for dt in [DType::BF16, DType::F16] {
        let mut s = BlockDenoiser::new(&m.dit, &clip, &p.lr, &p.concat_lr, 2, dt).unwrap();
        let d = s.sweep(&x, 0.7).unwrap();
        let r = rel(&d, &d32);
        println!("{dt:?} cache: relative diff {r:.2e}, peak {} bytes", s.peak_cache_bytes);
        assert!(r < 2e-2, "{dt:?}: {r}");
        assert!(r > 0.0);
        assert_eq!(s.peak_cache_bytes * 2, f32s.peak_cache_bytes);
    }
}

/// Noise is identical whatever the batch size (it depends on the block only), and an interrupted
/// run resumed from its checkpoint gives a bit-identical sample.
#[test]
fn resume_is_bit_identical() {
    let m = tiny_random(2, 32, 2, 21);
    let (p, eps, clip) = random_inputs(2, 2, 5);
    let heun = HeunConfig { steps: 6, ..HeunConfig::default() };
    let mode = Mode::Blocks { block_batch: 1, kv_dtype: DType::F32 };
    let full = sample(&m, &p, &clip, &eps, &SampleOptions { heun, mode, ..Default::default() }, &mut |_| {}).unwrap();
    let dir = std::env::temp_dir().join(format!("infdit-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let stopped =
        SampleOptions { heun, mode, checkpoint_dir: Some(dir.clone()), stop_after_steps: Some(3), cancel: None };
    let first = sample(&m, &p, &clip, &eps, &stopped, &mut |_| {}).unwrap();
    assert!(first.sample.is_none());
    assert_eq!(first.steps_done, 3);
    assert!(dir.join("infdit-state.safetensors").exists());
    let resumed = SampleOptions { stop_after_steps: None, ..stopped.clone() };
    let mut seen = Vec::new();
    let second = sample(&m, &p, &clip, &eps, &resumed, &mut |pr| seen.push(pr)).unwrap();
    assert_eq!(second.resumed_from, 3);
    assert_eq!(seen[0].evals_done, 6);
    assert_eq!(seen.last().unwrap().evals_done, heun.evaluations());
    assert_eq!(max_abs(second.sample.as_ref().unwrap(), full.sample.as_ref().unwrap()), 0.0);
    assert!(!dir.join("infdit-state.safetensors").exists(), "state removed after a finished run");
    // A state from another run is refused.
    let _ = sample(&m, &p, &clip, &eps, &stopped, &mut |_| {}).unwrap();
    let other = (&eps * 0.5).unwrap();
    let err = sample(&m, &p, &clip, &other, &resumed, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("different run"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
