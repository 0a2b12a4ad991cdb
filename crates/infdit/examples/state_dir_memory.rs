//! Peak resident memory of one block-mode upscale, with the sampler state in memory or in a state
//! folder (`SampleOptions::state_dir`), through the library as `infdit upscale` would call it.
//! A benchmark, not a test: see `bench/memory.sh` for the command-line tool's figures.
//!
//! ```text
//! cargo run --release -p infdit --example state_dir_memory -- \
//!     --config bench/small-config.json --input in.png --output out.png [--state-dir DIR] \
//!     [--block-batch 1] [--steps 1] [--seed 0]
//! ```
//!
//! The model has random weights (seed 1) built from the config; the input is any RGB image (the
//! output is 4x its size, reflect-padded to the block grid and cropped back). Without a state
//! folder it does what `infdit upscale --mode blocks` does: whole-image noise tensor, sample
//! tensor, `save_image_atomic`. With one: seeded per-block noise, the state in the folder, the
//! output quantised band by band from the state file by `save_image_atomic`. Prints the output
//! size and the peak resident set size (VmHWM of /proc/self/status, Linux).

use std::path::PathBuf;

use candle_core::{DType, Device};
use infdit::ModelConfig;
use infdit::diffusion::HeunConfig;
use infdit::diffusion::noise::{Noise, image_noise};
use infdit::imageio::resize::Bicubic;
use infdit::imageio::{LoadLimits, SaveOptions, crop, load_image, save_image_atomic};
use infdit::loaded::Model;
use infdit::loaded::random::random_checkpoint;
use infdit::prepare::{PassScale, prepare_padded};
use infdit::sampling::{Mode, SampleOptions, sample, sample_with_noise};

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
    let dev = Device::Cpu;
    let cfg = ModelConfig::from_file(&a.config)?;
    let model = Model::from_checkpoint(&cfg, random_checkpoint(&cfg, 1)?, DType::F32, &dev)?;
    let loaded = load_image(&a.input, &LoadLimits::for_pixels(1 << 32))?;
    let kind = Bicubic::Antialias;
    let (prep, c, clip_input) = prepare_padded(&loaded.rgb, PassScale::X4, cfg.dit.block_px, kind)?;
    let clip = model.clip_vector(&clip_input, kind)?;
    let opts = SampleOptions {
        heun: HeunConfig { steps: a.steps, ..HeunConfig::default() },
        mode: Mode::Blocks { block_batch: a.block_batch, kv_dtype: DType::F32 },
        state_dir: a.state_dir.clone(),
        ..SampleOptions::default()
    };
    let save = SaveOptions::default();
    let sampled_peak = match &a.state_dir {
        None => {
            let eps = image_noise(a.seed, &prep.grid, 3, &dev)?;
            let out = sample(&model, &prep, &clip, &eps, &opts, &mut |_| {})?;
            let peak = peak_rss();
            let x = out.sample.ok_or("no sample")?;
            let x = crop(&x, c.top, c.left, c.height, c.width)?;
            save_image_atomic(&a.output, &x, None, false, &save, &[a.input.as_path()])?;
            peak
        }
        Some(_) => {
            let out = sample_with_noise(&model, &prep, &clip, &Noise::Seeded(a.seed), &opts, &mut |_| {})?;
            let peak = peak_rss();
            let fin = out.final_sample.ok_or("no sample")?;
            let window = fin.window(c.top, c.left, c.height, c.width)?;
            save_image_atomic(&a.output, &window, None, false, &save, &[a.input.as_path()])?;
            peak
        }
    };
    let mib = |b: Option<u64>| b.map_or(f64::NAN, |b| b as f64 / (1u64 << 20) as f64);
    println!(
        "output {}x{} ({} blocks), block batch {}, {} steps, state {}: peak RSS {:.0} MiB after sampling, {:.0} MiB \
         after writing the PNG",
        c.width,
        c.height,
        prep.grid.len(),
        a.block_batch,
        a.steps,
        a.state_dir.as_ref().map_or("in memory".to_string(), |d| format!("in {}", d.display())),
        mib(sampled_peak),
        mib(peak_rss())
    );
    Ok(())
}
