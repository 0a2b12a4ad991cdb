//! The UniBA block scheduler equals whole-image mode (fp32 rounding), on the parity models and on
//! random models with non-square and ragged grids; resume is bit-identical.
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use infdit::checkpoint::state::STATE_FILE;
use infdit::config::{DitConfig, ModelConfig, Precond};
use infdit::diffusion::noise::Noise;
use infdit::diffusion::noise::image_noise;
use infdit::diffusion::{HeunConfig, heun_sample, initial_state};
use infdit::imageio::resize::Bicubic;
use infdit::loaded::Model;
use infdit::loaded::random::{random_checkpoint, training_init};
use infdit::model::blocks::BlockGrid;
use infdit::prepare::{ConcatLr, PassScale, Prepared};
use infdit::sampling::{Mode, SampleOptions, sample, sample_with_noise};
use infdit::schedule::WholeImageDenoiser;
use infdit::schedule::{BlockDenoiser, MemoryPlan, Placement, batches};

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
                infdit::prepare::prepare_official(&png, PassScale::X4, 128, Bicubic::Antialias)
                    .unwrap()
                    .concat_lr
                    .full()
                    .unwrap()
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

/// Random weights, grids 1x7, 9x1, 3x4, 2x5: n = 1, 2, 3 (ragged batches) equal whole-image mode.
#[test]
fn scheduler_matches_whole_image_on_random_grids() {
    let m = tiny_random(2, 32, 2, 11);
    for (rows, cols) in [(1, 7), (9, 1), (3, 4), (2, 5)] {
        let (p, eps, clip) = random_inputs(rows, cols, (rows * 10 + cols) as u64);
        let cl = p.concat_lr.full().unwrap();
        let x = initial_state(&cl, &eps, 1.5).unwrap();
        let whole = WholeImageDenoiser::new(&m.dit, &clip, &p.lr, &cl).unwrap().denoise_traced(&x, 1.5, None).unwrap();
        for n in [1, 2, 3] {
            let d = BlockDenoiser::new(&m.dit, &clip, &p.lr, &cl, n, DType::F32).unwrap().sweep(&x, 1.5).unwrap();
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
        concat_lr: ConcatLr::Tensor(c["concat_lr"].clone()),
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
    let cl = p.concat_lr.full().unwrap();
    let x = initial_state(&cl, &eps, 0.7).unwrap();
    let mut f32s = BlockDenoiser::new(&m.dit, &clip, &p.lr, &cl, 2, DType::F32).unwrap();
    let d32 = f32s.sweep(&x, 0.7).unwrap();
    // Per block and layer: K and V of 1024 tokens x 32 channels, f32.
    let per_block_layer = 2 * 1024 * 32 * 4;
    let limit = (5 + 2 + 1) * 2 * per_block_layer;
    println!("peak cache {} bytes, bound {limit}", f32s.peak_cache_bytes);
    assert!(f32s.peak_cache_bytes <= limit);
    assert!(f32s.peak_cache_bytes >= 5 * 2 * per_block_layer);
    for dt in [DType::BF16, DType::F16] {
        let mut s = BlockDenoiser::new(&m.dit, &clip, &p.lr, &cl, 2, dt).unwrap();
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
    let stopped = SampleOptions {
        heun,
        mode,
        checkpoint_dir: Some(dir.clone()),
        stop_after_steps: Some(3),
        state_dir: None,
        cancel: None,
        kv_offload: false,
    };
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

/// A fresh, empty temporary folder for one test.
fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("infdit-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// With a state folder (per-block state in a file, upsampled LR and noise made one block row at a
/// time, the Heun update done inside the sweeps) the sample is bit-identical to the in-memory
/// scheduler and to whole-image Heun steps over the scheduler's denoiser, for n = 1 and 2 on a
/// 3x3 grid (ragged for n = 2). The result reads back whole, by rows, as 8 bits, and saves band by band to the
/// same PNG bytes as the tensor; the scratch file is gone.
#[test]
fn state_dir_sample_is_bit_identical() {
    let m = tiny_random(2, 32, 2, 31);
    let (p, _, clip) = random_inputs(3, 3, 41);
    let seed = 77;
    let eps = image_noise(seed, &p.grid, 3, &Device::Cpu).unwrap();
    let heun = HeunConfig { steps: 3, ..HeunConfig::default() };
    let sigmas = heun.sigmas();
    let dir = temp_dir("state-dir");
    let out_dir = temp_dir("state-dir-out");
    let cl = p.concat_lr.full().unwrap();
    for n in [1, 2] {
        let mode = Mode::Blocks { block_batch: n, kv_dtype: DType::F32 };
        let mut den = BlockDenoiser::new(&m.dit, &clip, &p.lr, &cl, n, DType::F32).unwrap();
        let x0 = initial_state(&cl, &eps, sigmas[0]).unwrap();
        let reference = heun_sample(&mut den, x0.clone(), &sigmas, 0, &mut |_, _| Ok(())).unwrap();
        assert!(max_abs(&reference, &x0) > 1.0, "the sampler moved the state");

        let ram = sample(&m, &p, &clip, &eps, &SampleOptions { heun, mode, ..Default::default() }, &mut |_| {})
            .unwrap()
            .sample
            .unwrap();
        assert_eq!(bits(&ram), bits(&reference), "n={n}: in-memory store vs whole-image Heun");

        let opts = SampleOptions { heun, mode, state_dir: Some(dir.clone()), ..Default::default() };
        let mut evals = 0;
        let out =
            sample_with_noise(&m, &p, &clip, &Noise::Seeded(seed), &opts, &mut |pr| evals = pr.evals_done).unwrap();
        assert_eq!(evals, heun.evaluations());
        assert!(out.sample.is_none(), "with a state folder the sample stays in the file");
        let fin = out.final_sample.unwrap();
        assert!(!fin.in_memory());
        assert_eq!(fin.dims().unwrap(), (384, 384));
        assert_eq!(bits(&fin.to_tensor().unwrap()), bits(&reference), "n={n}: file store vs whole-image Heun");
        assert_eq!(bits(&fin.rows(100, 300).unwrap()), bits(&reference.narrow(2, 100, 200).unwrap()));
        let rgb = fin.to_rgb8(5, 7, 300, 350).unwrap();
        let expect =
            infdit::imageio::tensor_to_rgb8(&infdit::imageio::crop(&reference, 5, 7, 300, 350).unwrap()).unwrap();
        assert_eq!(rgb.dimensions(), (350, 300));
        assert_eq!(rgb.as_raw(), expect.as_raw());
        // Saved band by band from the file: the same bytes as saving the tensor, 8 and 16 bits.
        let window = fin.window(5, 7, 300, 350).unwrap();
        let cropped = infdit::imageio::crop(&reference, 5, 7, 300, 350).unwrap();
        for bit_depth in [8, 16] {
            let opts = infdit::imageio::SaveOptions { bit_depth, ..Default::default() };
            let (a, b) = (out_dir.join(format!("a{bit_depth}.png")), out_dir.join(format!("b{bit_depth}.png")));
            infdit::imageio::save_image_atomic(&a, &window, None, false, &opts, &[]).unwrap();
            infdit::imageio::save_image_atomic(&b, &cropped, None, false, &opts, &[]).unwrap();
            assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "{bit_depth}-bit PNG");
        }
        assert_eq!(entries(&dir), Vec::<String>::new(), "the scratch file is unlinked");
    }
    // Whole-image mode has no use for a state folder.
    let opts = SampleOptions { heun, mode: Mode::WholeImage, state_dir: Some(dir.clone()), ..Default::default() };
    let err = sample(&m, &p, &clip, &eps, &opts, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("block mode"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&out_dir).unwrap();
}

/// Parity case b (2x3 blocks; n = 2 leaves a ragged batch column), prepared from its PNG so the
/// upsampled LR is made band by band: with a state folder the 20-step sample matches the official
/// one, and equals the in-memory scheduler's bit for bit.
#[test]
fn state_dir_sample_matches_parity_case() {
    let c = case("b");
    let m = model("b");
    let png = infdit::imageio::load_rgb(&shared("parity").join("case_b_lr.png"), 1 << 30).unwrap();
    let prep = infdit::prepare::prepare_official(&png, PassScale::X4, 128, Bicubic::Antialias).unwrap();
    assert!(matches!(prep.concat_lr, ConcatLr::Upsample { .. }));
    assert_eq!(max_abs(&prep.lr, &c["lr"]), 0.0);
    let dir = temp_dir("state-dir-parity");
    let opts = SampleOptions { mode: Mode::Blocks { block_batch: 2, kv_dtype: DType::F32 }, ..Default::default() };
    let ram = sample(&m, &prep, &c["clip_vector"], &c["eps"], &opts, &mut |_| {}).unwrap().sample.unwrap();
    let opts = SampleOptions { state_dir: Some(dir.clone()), ..opts };
    let file = sample(&m, &prep, &c["clip_vector"], &c["eps"], &opts, &mut |_| {}).unwrap();
    let file = file.final_sample.unwrap().to_tensor().unwrap();
    assert_close("case b state-dir sample", &file, &c["sample"], 1e-5);
    assert_eq!(bits(&file), bits(&ram));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The upsampled LR made one band of rows at a time equals the whole resize bit for bit: padded
/// inputs of odd sizes, 4x and the 2x mode, both kernels, every block row and unaligned bands.
#[test]
fn concat_lr_bands_equal_full_resize() {
    let dev = Device::Cpu;
    for (h, w) in [(45, 70), (32, 32), (100, 33)] {
        let img = (image_noise(h as u64 * 1000 + w as u64, &BlockGrid { rows: 1, cols: 1, block_px: 128 }, 3, &dev)
            .unwrap()
            .narrow(2, 0, h.min(128))
            .unwrap()
            .narrow(3, 0, w.min(128))
            .unwrap()
            * 0.4)
            .unwrap();
        for scale in [PassScale::X4, PassScale::X2] {
            for kind in [Bicubic::Antialias, Bicubic::Classic] {
                let (prep, _, _) = infdit::prepare::prepare_padded(&img, scale, 128, kind).unwrap();
                let ConcatLr::Upsample { src, height, width, .. } = &prep.concat_lr else {
                    panic!("prepare_padded describes the upsample")
                };
                let full = prep.concat_lr.full().unwrap();
                let direct = infdit::imageio::resize::resize_tensor(src, *height, *width, kind)
                    .unwrap()
                    .clamp(-1f32, 1f32)
                    .unwrap();
                assert_eq!(bits(&full), bits(&direct));
                let mut bands: Vec<(usize, usize)> = (0..prep.grid.rows).map(|r| (r * 128, (r + 1) * 128)).collect();
                bands.extend([(0, 1), (3, height - 2), (height - 5, *height)]);
                for (y0, y1) in bands {
                    let band = prep.concat_lr.rows(y0, y1).unwrap();
                    assert_eq!(
                        bits(&band),
                        bits(&full.narrow(2, y0, y1 - y0).unwrap()),
                        "{w}x{h} {scale:?} {kind:?} rows {y0}..{y1}"
                    );
                }
            }
        }
    }
}

/// With both a checkpoint folder and a state folder the state file is the checkpoint: a run
/// stopped after 2 steps and resumed gives the uninterrupted sample bit for bit, and both files
/// are gone afterwards. Resuming it without the state folder is refused with a clear message; a
/// checkpoint of an in-memory run resumes with a state folder.
#[test]
fn state_dir_resume_is_bit_identical() {
    let m = tiny_random(2, 32, 2, 23);
    let (p, _, clip) = random_inputs(2, 3, 13);
    let noise = Noise::Seeded(5);
    let heun = HeunConfig { steps: 5, ..HeunConfig::default() };
    let mode = Mode::Blocks { block_batch: 2, kv_dtype: DType::F32 };
    let plain = SampleOptions { heun, mode, ..Default::default() };
    let full = sample_with_noise(&m, &p, &clip, &noise, &plain, &mut |_| {}).unwrap().sample.unwrap();
    let ck = temp_dir("resume-ck");
    let sd = temp_dir("resume-sd");
    let record = ck.join("infdit-state.safetensors");
    let stopped = SampleOptions {
        checkpoint_dir: Some(ck.clone()),
        state_dir: Some(sd.clone()),
        stop_after_steps: Some(2),
        ..plain.clone()
    };
    let first = sample_with_noise(&m, &p, &clip, &noise, &stopped, &mut |_| {}).unwrap();
    assert!(first.final_sample.is_none() && first.sample.is_none());
    assert_eq!(first.steps_done, 2);
    assert!(record.exists());
    assert_eq!(entries(&sd), vec![STATE_FILE.to_string()]);

    let no_folder = SampleOptions { state_dir: None, stop_after_steps: None, ..stopped.clone() };
    let err = sample_with_noise(&m, &p, &clip, &noise, &no_folder, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("the same state folder"), "{err}");

    let resumed = SampleOptions { stop_after_steps: None, ..stopped.clone() };
    let mut seen = Vec::new();
    let second = sample_with_noise(&m, &p, &clip, &noise, &resumed, &mut |pr| seen.push(pr)).unwrap();
    assert_eq!(second.resumed_from, 2);
    assert_eq!(seen[0].evals_done, 4);
    assert_eq!(bits(&second.final_sample.unwrap().to_tensor().unwrap()), bits(&full));
    assert!(!record.exists(), "record removed after a finished run");
    assert_eq!(entries(&sd), Vec::<String>::new(), "state file removed after a finished run");

    // An in-memory run's checkpoint (it holds x) continues with a state folder.
    let in_memory = SampleOptions { state_dir: None, stop_after_steps: Some(3), ..stopped.clone() };
    assert!(sample_with_noise(&m, &p, &clip, &noise, &in_memory, &mut |_| {}).unwrap().sample.is_none());
    let third = sample_with_noise(&m, &p, &clip, &noise, &resumed, &mut |_| {}).unwrap();
    assert_eq!(third.resumed_from, 3);
    assert_eq!(bits(&third.final_sample.unwrap().to_tensor().unwrap()), bits(&full));
    assert!(!record.exists());
    assert_eq!(entries(&sd), Vec::<String>::new());
    std::fs::remove_dir_all(&ck).unwrap();
    std::fs::remove_dir_all(&sd).unwrap();
}

/// The memory plan with a state folder: from a 1024x1024 to a 1024x8192 output only the 8-bit
/// output image and the LR image grow (3 + 1.5 bytes per added pixel), against 72 + 1.5 with the
/// sampler state in memory; the weights, K/V cache and activations do not depend on the height.
#[test]
fn memory_plan_with_state_dir_is_flat_in_height() {
    let cfg = DitConfig { hidden: 64, depth: 2, heads: 2, mlp_hidden: 128, vector_dim: 8, ..DitConfig::released() };
    let short = BlockGrid { rows: 8, cols: 8, block_px: 128 };
    let tall = BlockGrid { rows: 64, cols: 8, block_px: 128 };
    let plan = |g: &BlockGrid, dir: bool| MemoryPlan::estimate_for(&cfg, 1000, g, Some(1), DType::F32, DType::F32, dir);
    let added = 1024 * 7168;
    for dir in [false, true] {
        let (a, b) = (plan(&short, dir), plan(&tall, dir));
        assert_eq!((a.weights, a.kv_cache, a.activations), (b.weights, b.kv_cache, b.activations));
        let per_px = if dir { 3 } else { 72 };
        assert_eq!(b.image_state - a.image_state, per_px * added + 3 * added / 2, "state_dir {dir}");
    }
    assert_eq!(plan(&tall, false), MemoryPlan::estimate(&cfg, 1000, &tall, Some(1), DType::F32, DType::F32));
    // At 1024x8192: about 560 MiB in memory, under 64 MiB (mostly the 24 MiB output) in a folder.
    println!("1024x8192: in memory {}, state folder {}", plan(&tall, false), plan(&tall, true));
    assert!(plan(&tall, false).image_state > 500 << 20);
    assert!(plan(&tall, true).image_state < 64 << 20);
}

/// A residual model's flat-area gate is in the plan: its LR-size map, plus the whole output-size
/// gate (whole-image mode) or one batch row of it and the batch's blocks (scheduler; on a GPU only
/// the batch's blocks when the cache is offloaded), one f32 channel each.
#[test]
fn memory_plan_counts_the_flat_gate() {
    let plain = DitConfig {
        hidden: 64,
        depth: 2,
        heads: 2,
        mlp_hidden: 128,
        vector_dim: 8,
        precond: Precond { sigma_data: 0.05, residual: true, ..Precond::default() },
        ..DitConfig::released()
    };
    let gated = DitConfig { precond: Precond { flat_gate: Some(0.05), ..plain.precond }, ..plain.clone() };
    let grid = BlockGrid { rows: 4, cols: 6, block_px: 128 };
    let px = 512 * 768;
    let plan = |c: &DitConfig, batch, gpu, kv_offload| {
        let placement = Placement { gpu, kv_offload, state_dir: false };
        MemoryPlan::estimate_placed(c, 1000, &grid, batch, DType::F32, DType::F32, placement)
    };
    let lr_map = px / 16 * 4;
    let (row, blocks) = (2 * 128 * 768 * 4, 4 * 128 * 128 * 4);
    for (batch, gpu, offload, extra) in [
        (None, false, false, lr_map + px * 4),
        (Some(2), false, false, lr_map + row + blocks),
        (Some(2), true, false, row + blocks),
        (Some(2), true, true, blocks),
    ] {
        let (a, b) = (plan(&plain, batch, gpu, offload), plan(&gated, batch, gpu, offload));
        assert_eq!((a.weights, a.kv_cache, a.activations), (b.weights, b.kv_cache, b.activations));
        assert_eq!(b.image_state - a.image_state, extra, "batch {batch:?} gpu {gpu} offload {offload}");
    }
}

/// The residual preconditioning of infdit's own models: block mode equals whole-image mode, it is
/// not the released denoiser, and with the zero-initialised final layer of a new training run the
/// denoiser is `u + c_skip (x - u)`: the upsampled LR image, whatever the noise level.
#[test]
fn residual_preconditioning_blocks_match_and_zero_network_gives_the_upsampled_lr() {
    let precond = Precond { sigma_data: 0.05, residual: true, ..Precond::default() };
    let dit =
        DitConfig { hidden: 32, depth: 2, heads: 2, mlp_hidden: 64, vector_dim: 8, precond, ..DitConfig::released() };
    let cfg = ModelConfig { dit, clip: None };
    let released = ModelConfig { dit: DitConfig { precond: Precond::default(), ..cfg.dit.clone() }, clip: None };
    let load = |c: &ModelConfig, ck| Model::from_checkpoint(c, ck, DType::F32, &Device::Cpu).unwrap();
    let (p, eps, clip) = random_inputs(2, 3, 7);
    let cl = p.concat_lr.full().unwrap();
    let sigma = 0.8;
    let x = initial_state(&cl, &eps, sigma).unwrap();
    let whole_of = |m: &Model| {
        WholeImageDenoiser::new(&m.dit, &clip, &p.lr, &cl).unwrap().denoise_traced(&x, sigma, None).unwrap()
    };

    let m = load(&cfg, random_checkpoint(&cfg, 21).unwrap());
    let whole = whole_of(&m);
    for n in [1, 2] {
        let d = BlockDenoiser::new(&m.dit, &clip, &p.lr, &cl, n, DType::F32).unwrap().sweep(&x, sigma).unwrap();
        let r = rel(&d, &whole);
        assert!(r <= REL_BOUND, "n={n}: {r:e}");
    }
    let other = whole_of(&load(&released, random_checkpoint(&released, 21).unwrap()));
    assert!(rel(&other, &whole) > 0.1, "the residual denoiser equals the released one");

    let zero = load(&cfg, training_init(&cfg, 21).unwrap());
    let c_skip = precond.scalings(sigma).c_skip as f64;
    let want = (&cl + ((&x - &cl).unwrap() * c_skip).unwrap()).unwrap();
    for d in [
        whole_of(&zero),
        BlockDenoiser::new(&zero.dit, &clip, &p.lr, &cl, 2, DType::F32).unwrap().sweep(&x, sigma).unwrap(),
    ] {
        let diff =
            (d - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "{diff}");
    }

    // Coring (a residual-mode setting of the model): block mode still equals whole-image mode, and
    // the zero network's residual c_skip (x - u) comes out through `Precond::core` (whose values the
    // diffusion module's unit test checks).
    let cored_cfg = |c: &ModelConfig| {
        let mut c = c.clone();
        c.dit.precond.coring = Some([0.002, 0.006]);
        c
    };
    let cored = load(&cored_cfg(&cfg), random_checkpoint(&cfg, 21).unwrap());
    let whole_cored = whole_of(&cored);
    assert!(rel(&whole_cored, &whole) > 1e-3, "coring changed nothing");
    let d = BlockDenoiser::new(&cored.dit, &clip, &p.lr, &cl, 2, DType::F32).unwrap().sweep(&x, sigma).unwrap();
    assert!(rel(&d, &whole_cored) <= REL_BOUND, "{:e}", rel(&d, &whole_cored));
    let zero = load(&cored_cfg(&cfg), training_init(&cfg, 21).unwrap());
    let r = ((&x - &cl).unwrap() * c_skip).unwrap();
    let want = (&cl + cored.dit.config().precond.core(r).unwrap()).unwrap();
    let diff = (whole_of(&zero) - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-6, "{diff}");

    // The flat-area gate (another residual-mode setting): block mode, batched or not and with the
    // cache offloaded, still equals whole-image mode; the zero network's cored residual comes out
    // scaled by the image's gate, which is 0 nowhere here (random LR) but below 1 somewhere.
    let gated_cfg = |c: &ModelConfig| {
        let mut c = cored_cfg(c);
        c.dit.precond.flat_gate = Some(0.5);
        c
    };
    let gated = load(&gated_cfg(&cfg), random_checkpoint(&cfg, 21).unwrap());
    let whole_gated = whole_of(&gated);
    assert!(rel(&whole_gated, &whole_cored) > 1e-3, "the gate changed nothing");
    for (n, offload) in [(1, false), (2, false), (2, true)] {
        let d = BlockDenoiser::new(&gated.dit, &clip, &p.lr, &cl, n, DType::F32)
            .unwrap()
            .with_kv_offload(offload)
            .sweep(&x, sigma)
            .unwrap();
        assert!(rel(&d, &whole_gated) <= REL_BOUND, "n={n} offload={offload}: {:e}", rel(&d, &whole_gated));
    }
    let zero = load(&gated_cfg(&cfg), training_init(&cfg, 21).unwrap());
    let (_, _, h, w) = cl.dims4().unwrap();
    let pre = zero.dit.config().precond;
    let gate = pre.flat_gate_of(&p.lr, h, w).unwrap().unwrap().full().unwrap();
    let g = gate.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(g.iter().all(|&v| v > 0.0 && v <= 1.0) && g.iter().any(|&v| v < 1.0));
    let r = pre.core(((&x - &cl).unwrap() * c_skip).unwrap()).unwrap();
    let want = (&cl + r.broadcast_mul(&gate).unwrap()).unwrap();
    let diff = (whole_of(&zero) - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-6, "{diff}");
}
