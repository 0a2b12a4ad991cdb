//! Times the parts of one training example (data, forward, backward) for a config:
//! `cargo run --release -p infdit --example train_profile -- CONFIG.json IMAGE_DIR CROP`.
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use infdit::ModelConfig;
use infdit::loaded::random::random_checkpoint;
use infdit::train::{Dataset, SampleConfig, Sampler, SplitMix64, TrainConfig, Trainer, edm_loss};

fn main() -> infdit::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let cfg = ModelConfig::from_file(std::path::Path::new(&args[1]))?;
    let crop: usize = args[3].parse().unwrap();
    let data = Dataset::load(&[args[2].clone().into()], crop, 1024)?;
    let t = Trainer::new(&cfg, &random_checkpoint(&cfg, 0)?, TrainConfig::default())?;
    let sc = SampleConfig { crop, ..Default::default() };
    let mut rng = SplitMix64::new(1);
    for round in 0..3 {
        let t0 = Instant::now();
        let s = data.sample(&sc, &mut rng)?;
        let t1 = Instant::now();
        let model = t.model(false)?;
        let eps: Vec<f32> = (0..s.hr.elem_count()).map(|_| rng.normal() as f32).collect();
        let eps = Tensor::from_vec(eps, s.hr.shape(), &Device::Cpu)?;
        let clip = Tensor::zeros((1, cfg.dit.vector_dim), DType::F32, &Device::Cpu)?;
        let t2 = Instant::now();
        let loss = edm_loss(&model, &s, &clip, 0.5, &eps, (0, 0))?;
        let t3 = Instant::now();
        let g = loss.backward()?;
        let t4 = Instant::now();
        drop(g);
        eprintln!(
            "round {round}: data {:.3}s  model+noise {:.3}s  forward {:.3}s  backward {:.3}s",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64(),
            (t4 - t3).as_secs_f64()
        );
    }
    Ok(())
}
