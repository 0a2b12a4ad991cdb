//! One function per subcommand; `run` dispatches.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};

use infdit::ModelConfig;
use infdit::diffusion::HeunConfig;
use infdit::diffusion::noise::image_noise;
use infdit::imageio::resize::Bicubic;
use infdit::imageio::{load_rgb, save_rgb8_atomic, tensor_to_rgb8};
use infdit::pipeline::{Mode, Model, PassScale, SampleOptions, prepare_official, sample};
use infdit::schedule::MemoryPlan;
use infdit::weights::{Checkpoint, convert::convert};

use crate::args::{
    Cli, Command, ConvertArgs, DTypeArg, InspectArgs, ModeArg, ModelArgs, RandomModelArgs, ResizeArg, ScaleArg, UpscaleArgs,
};

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Upscale(a) => upscale(a),
        Command::Convert(a) => convert_cmd(a),
        Command::Inspect(a) => inspect(a),
        Command::RandomModel(a) => random_model(a),
    }
    .map(|()| ExitCode::SUCCESS)
}

fn dtype(d: DTypeArg) -> DType {
    match d {
        DTypeArg::F32 => DType::F32,
        DTypeArg::Bf16 => DType::BF16,
        DTypeArg::F16 => DType::F16,
    }
}

fn model_config(a: &ModelArgs) -> Result<ModelConfig> {
    Ok(match &a.config {
        Some(p) => ModelConfig::from_file(p)?,
        None => ModelConfig::released(),
    })
}

fn load_model(a: &ModelArgs, dt: DType, dev: &Device) -> Result<Model> {
    let cfg = model_config(a)?;
    Ok(Model::load(&cfg, &a.model, a.clip.as_deref(), dt, dev)?)
}

fn load_noise(path: &Path, h: usize, w: usize) -> Result<Tensor> {
    let mut t = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("{}: cannot read the noise file", path.display()))?;
    let eps = t.remove("eps").with_context(|| format!("{}: no tensor named 'eps'", path.display()))?;
    if eps.dims() != [1, 3, h, w] {
        bail!("{}: eps has shape {:?}, the output needs (1, 3, {h}, {w})", path.display(), eps.dims());
    }
    Ok(eps.to_dtype(DType::F32)?)
}

fn upscale(a: UpscaleArgs) -> Result<()> {
    let dev = Device::Cpu;
    let kind = match a.resize {
        ResizeArg::Antialias => Bicubic::Antialias,
        ResizeArg::Classic => Bicubic::Classic,
    };
    let scale = match a.scale {
        ScaleArg::X4 => PassScale::X4,
        ScaleArg::X2 => PassScale::X2,
    };
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if let (Ok(i), Ok(o)) = (a.input.canonicalize(), a.output.canonicalize())
        && i == o
    {
        bail!("{}: the output path is the input image; refusing to overwrite it", a.output.display());
    }
    let input = load_rgb(&a.input, a.max_pixels)?;
    let model = load_model(&a.model, dtype(a.dtype), &dev)?;
    let prep = prepare_official(&input, scale, model.cfg.dit.block_px, kind)
        .with_context(|| a.input.display().to_string())?;
    let (h, w) = (prep.grid.height(), prep.grid.width());
    let eps = match &a.noise {
        Some(p) => load_noise(p, h, w)?,
        None => image_noise(a.seed, &prep.grid, 3, &dev)?,
    };
    let clip = model.clip_vector(&prep.lr, kind)?;
    let heun = HeunConfig { steps: a.steps, ..HeunConfig::default() };
    let act = dtype(a.dtype);
    let kv_dtype = a.kv_dtype.map(dtype).unwrap_or(act);
    let params = Model::parameter_count(&model.cfg)?;
    let budget = a.max_memory.unwrap_or_else(default_memory_budget) as usize;
    let mode = match a.mode {
        ModeArg::Whole => Mode::WholeImage,
        ModeArg::Blocks => {
            let n = match a.block_batch {
                Some(0) => bail!("--block-batch must be at least 1"),
                Some(n) => n,
                None => MemoryPlan::largest_batch(&model.cfg.dit, params, &prep.grid, act, kv_dtype, budget)
                    .with_context(|| {
                        let one = MemoryPlan::estimate(&model.cfg.dit, params, &prep.grid, Some(1), act, kv_dtype);
                        format!("even --block-batch 1 needs about {one}, above the memory budget of {budget} bytes")
                    })?,
            };
            Mode::Blocks { block_batch: n, kv_dtype }
        }
    };
    if a.verbose {
        let batch = match mode {
            Mode::Blocks { block_batch, .. } => Some(block_batch),
            Mode::WholeImage => None,
        };
        let plan = MemoryPlan::estimate(&model.cfg.dit, params, &prep.grid, batch, act, kv_dtype);
        eprintln!(
            "{} -> {w}x{h}: {} x {} blocks, mode {mode:?}, budget {:.1} MiB",
            a.input.display(),
            prep.grid.rows,
            prep.grid.cols,
            budget as f64 / (1u64 << 20) as f64
        );
        eprintln!("memory plan: {plan}");
    }
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new((heun.evaluations() * prep.grid.len()) as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {msg} {elapsed} elapsed, ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{} -> {w}x{h}", a.input.display()));
    let opts = SampleOptions { heun, mode, checkpoint_dir: a.checkpoint_dir.clone(), stop_after_steps: None };
    let blocks_total = prep.grid.len();
    let out = sample(&model, &prep, &clip, &eps, &opts, &mut |p| {
        let done_blocks = p.evals_done * blocks_total + p.blocks_done;
        bar.set_position(done_blocks as u64);
        bar.set_message(format!(
            "step {}/{}, evaluation {}/{}, block {}/{}",
            (p.steps_done + 1).min(p.steps_total),
            p.steps_total,
            (p.evals_done + 1).min(p.evals_total),
            p.evals_total,
            p.blocks_done,
            p.blocks_total
        ));
    })?;
    bar.finish();
    if a.verbose && out.resumed_from > 0 {
        eprintln!("resumed from step {}", out.resumed_from);
    }
    let sample = out.sample.context("sampling stopped before the last step")?;
    let img = tensor_to_rgb8(&sample)?;
    save_rgb8_atomic(&img, &a.output, &[a.input.as_path()])?;
    if !a.quiet {
        eprintln!("wrote {} ({w}x{h})", a.output.display());
    }
    Ok(())
}

/// Half of the memory available now (Linux /proc/meminfo), at most 8 GiB; 4 GiB when unknown.
fn default_memory_budget() -> u64 {
    let avail = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    avail.map_or(4 << 30, |b| (b / 2).min(8 << 30))
}

fn convert_cmd(a: ConvertArgs) -> Result<()> {
    let s = convert(&a.input, &a.output, a.dtype.map(dtype))?;
    eprintln!(
        "wrote {}: {} tensors, {} values, {} bytes",
        a.output.display(),
        s.tensors,
        s.elements,
        s.bytes
    );
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let ck = Checkpoint::open(&a.model.model)?;
    let total: usize = ck.keys().map(|k| ck.shape(k).map(|s| s.iter().product::<usize>()).unwrap_or(0)).sum();
    println!("{}: {} tensors, {} values", a.model.model.display(), ck.len(), total);
    if a.list {
        for k in ck.keys() {
            println!("  {k} {:?}", ck.shape(k).unwrap_or(&[]));
        }
    }
    let model = load_model(&a.model, DType::F32, &Device::Cpu)?;
    println!("matches the config; {} dead keys skipped", model.skipped_dead_keys.len());
    Ok(())
}

fn random_model(a: RandomModelArgs) -> Result<()> {
    let cfg = match &a.config {
        Some(p) => ModelConfig::from_file(p)?,
        None => ModelConfig::released(),
    };
    let ck = infdit::weights::random::random_checkpoint(&cfg, a.seed)?;
    let dt = dtype(a.dtype);
    let mut tensors = std::collections::HashMap::new();
    for k in ck.keys() {
        tensors.insert(k.to_string(), ck.load(k, &Device::Cpu)?.to_dtype(dt)?);
    }
    infdit::weights::convert::save_atomic(&tensors, &a.output)?;
    eprintln!("wrote {} ({} tensors)", a.output.display(), tensors.len());
    Ok(())
}
