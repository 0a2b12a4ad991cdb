//! Shared helpers for the integration tests: locating the golden vectors and comparing tensors.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use infdit::ModelConfig;
use infdit::loaded::Model;
use infdit::weights::Checkpoint;

/// `../shared/<set>` of the repository (override with INFDIT_SHARED_DIR).
pub fn shared(set: &str) -> PathBuf {
    let base = std::env::var("INFDIT_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared")));
    base.join(set)
}

/// The parity set a case belongs to and its weight file stem.
pub fn set_of(case: &str) -> (&'static str, &'static str) {
    match case {
        "a" | "b" | "c" => ("parity", "tiny"),
        _ => ("parity2", "tiny2"),
    }
}

/// All tensors of a case file.
pub fn case(case: &str) -> HashMap<String, Tensor> {
    let (set, _) = set_of(case);
    let p = shared(set).join(format!("case_{case}.safetensors"));
    candle_core::safetensors::load(&p, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The config of a parity set, read from its official-format config.json.
pub fn config(set: &str) -> ModelConfig {
    ModelConfig::from_file(&shared(set).join("config.json")).expect("parity config parses")
}

/// The tiny model of a case's set, f32 on CPU, from the safetensors file.
pub fn model(case: &str) -> Model {
    model_in(case, DType::F32)
}

/// [`model`] with the network in `dtype`.
pub fn model_in(case: &str, dtype: DType) -> Model {
    let (set, stem) = set_of(case);
    let ck = Checkpoint::open(&shared(set).join(format!("{stem}.safetensors"))).expect("weights open");
    Model::from_checkpoint(&config(set), ck, dtype, &Device::Cpu).expect("model builds")
}

/// max |a - b| over all elements (f64).
pub fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// max |a|.
pub fn max_of(a: &Tensor) -> f64 {
    a.to_dtype(DType::F64).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// Asserts max |a - b| <= tol and prints the figure (visible with --nocapture).
pub fn assert_close(label: &str, a: &Tensor, b: &Tensor, tol: f64) -> f64 {
    let d = max_abs(a, b);
    println!("{label}: max abs diff {d:.3e} (tolerance {tol:.1e})");
    assert!(d <= tol, "{label}: max abs diff {d:e} > tolerance {tol:e}");
    d
}

/// `x_in_i = fl32(concat_lr + fl32(eps * sigma_i))`.
pub fn x_in(concat_lr: &Tensor, eps: &Tensor, sigma: f32) -> Tensor {
    infdit::diffusion::initial_state(concat_lr, eps, sigma).unwrap()
}

/// The stored sigma table.
pub fn sigmas(c: &HashMap<String, Tensor>) -> Vec<f32> {
    c["sigmas"].to_vec1::<f32>().unwrap()
}

/// A random-weight model of the released architecture, scaled down (no CLIP tower), f32 on CPU.
pub fn tiny_random(depth: usize, hidden: usize, heads: usize, seed: u64) -> Model {
    use infdit::config::DitConfig;
    let cfg = ModelConfig {
        dit: DitConfig { hidden, depth, heads, mlp_hidden: 2 * hidden, vector_dim: 8, ..DitConfig::released() },
        clip: None,
    };
    let ck = infdit::loaded::random::random_checkpoint(&cfg, seed).unwrap();
    Model::from_checkpoint(&cfg, ck, DType::F32, &Device::Cpu).unwrap()
}

/// Random inputs for a `rows x cols` grid of 128-px blocks: the prepared LR, the noise eps and a
/// zero CLIP vector (8 wide, as [`tiny_random`]'s `vector_dim`).
pub fn random_inputs(rows: usize, cols: usize, seed: u64) -> (infdit::prepare::Prepared, Tensor, Tensor) {
    use infdit::diffusion::noise::image_noise;
    use infdit::model::blocks::BlockGrid;
    use infdit::prepare::{ConcatLr, Prepared};
    let dev = Device::Cpu;
    let grid = BlockGrid { rows, cols, block_px: 128 };
    // A smooth random LR image: noise at 1/4 resolution, blurred by the upsampling.
    let lr = (image_noise(seed, &BlockGrid { rows, cols, block_px: 32 }, 3, &dev).unwrap() * 0.3).unwrap();
    let kind = infdit::imageio::resize::Bicubic::Antialias;
    let concat_lr = ConcatLr::Upsample { src: lr.clone(), height: rows * 128, width: cols * 128, kind };
    let eps = image_noise(seed + 1, &grid, 3, &dev).unwrap();
    let clip = Tensor::zeros((1, 8), DType::F32, &dev).unwrap();
    (Prepared { lr, concat_lr, grid }, eps, clip)
}

/// The bit patterns of a tensor's values as f32 (for bit-identity checks).
pub fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}
