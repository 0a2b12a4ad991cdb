//! Peak resident memory of one block-mode upscale, with the sampler state in memory or in a state
//! folder (`UpscaleOptions::state_dir`), through the library's `Upscaler::upscale_file`, the call
//! `infdit upscale` makes. A benchmark, not a test: see `bench/memory.sh` for the command-line
//! tool's figures.
//!
//! ```text
//! cargo run --release -p infdit --example state_dir_memory -- \
//!     --config bench/small-config.json --input in.png --output out.png [--state-dir DIR] \
//!     [--block-batch 1] [--steps 1] [--seed 0]
//! ```
//!
//! The model has random weights (seed 1) built from the config; the input is any RGB image (the
//! output is 4x its size, reflect-padded to the block grid and cropped back). With a state folder
//! the output is written band by band from the sampler's state file. Prints the output size and
//! the peak resident set size (VmHWM of /proc/self/status, Linux) after sampling and after writing.
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure

use std::path::PathBuf;

use candle_core::{DType, Device};
use infdit::Model;
use infdit::ModelConfig;
use infdit::loaded::random::random_checkpoint;
use infdit::upscale::{Evaluation, Event, UpscaleOptions, Upscaler};

struct Args {
    config: PathBuf,
    input: PathBuf,
    output: PathBuf,
    state_dir: Option<PathBuf>,
    block_batch: usize,
    steps: usize,
    seed: u64,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        config: PathBuf::new(),
        input: PathBuf::new(),
        output: PathBuf::new(),
        state_dir: None,
        block_batch: 1,
        steps: 1,
        seed: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--config" => a.config = value()?.into(),
            "--input" => a.input = value()?.into(),
            "--output" => a.output = value()?.into(),
            "--state-dir" => a.state_dir = Some(value()?.into()),
            "--block-batch" => a.block_batch = value()?.parse().map_err(|e| format!("--block-batch: {e}"))?,
            "--steps" => a.steps = value()?.parse().map_err(|e| format!("--steps: {e}"))?,
            "--seed" => a.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    if a.config.as_os_str().is_empty() || a.input.as_os_str().is_empty() || a.output.as_os_str().is_empty() {
        return Err("--config, --input and --output are required".into());
    }
    Ok(a)
}

/// Peak resident set size in bytes (Linux), if known.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    Some(kb * 1024)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = parse()?;
    let cfg = ModelConfig::from_file(&a.config)?;
    let model = Model::from_checkpoint(&cfg, random_checkpoint(&cfg, 1)?, DType::F32, &Device::Cpu)?;
    let up = Upscaler::from_model(model, "random weights, seed 1", None);
    let opts = UpscaleOptions {
        seed: a.seed,
        steps: Some(a.steps),
        evaluation: Evaluation::Blocks { block_batch: Some(a.block_batch) },
        state_dir: a.state_dir.clone(),
        max_pixels: 1 << 32,
        ..UpscaleOptions::default()
    };
    // The peak while sampling: the last progress report comes after the last evaluation.
    let mut sampled_peak = None;
    let mut blocks = 0;
    let done = up.upscale_file(
        &a.input,
        &a.output,
        &opts,
        &mut |ev| match ev {
            Event::Start(plan) => blocks = plan.passes.iter().map(|p| p.geometry.blocks()).sum(),
            Event::Progress(_) => sampled_peak = peak_rss(),
            _ => {}
        },
        None,
    )?;
    let mib = |b: Option<u64>| b.map_or(f64::NAN, |b| b as f64 / (1u64 << 20) as f64);
    println!(
        "output {}x{} ({blocks} blocks), block batch {}, {} steps, state {}: peak RSS {:.0} MiB after sampling, {:.0} MiB \
         after writing the PNG",
        done.width,
        done.height,
        a.block_batch,
        a.steps,
        a.state_dir.as_ref().map_or("in memory".to_string(), |d| format!("in {}", d.display())),
        mib(sampled_peak),
        mib(peak_rss())
    );
    Ok(())
}
