//! One function per subcommand; `run` dispatches.

mod batch;
mod bench;
mod eval;
mod plan;
mod serve;
mod train;
pub(crate) mod upscale;

use std::process::ExitCode;

use anyhow::{Result, bail};
use candle_core::{DType, Device};

use infdit::device::{DeviceRequest, OpenedDevice};
use infdit::loaded::Model;
use infdit::weights::{Checkpoint, convert::convert};
use infdit::{ModelConfig, ModelSpec};

use crate::args::{Cli, Command, ConvertArgs, DTypeArg, InspectArgs, ModelArgs, RandomModelArgs};

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Upscale(a) => return upscale::upscale(a),
        Command::Convert(a) => convert_cmd(a),
        Command::Inspect(a) => inspect(a),
        Command::RandomModel(a) => random_model(a),
        Command::Bench(a) => bench::bench(a),
        Command::Eval(a) => eval::eval(a),
        Command::Train(a) => train::train(a),
        Command::Batch(a) => return batch::batch(a),
        Command::Plan(a) => plan::plan(a),
        Command::Serve(a) => serve::serve(a),
    }
    .map(|()| ExitCode::SUCCESS)
}

pub(crate) fn dtype(d: DTypeArg) -> DType {
    match d {
        DTypeArg::F32 => DType::F32,
        DTypeArg::Bf16 => DType::BF16,
        DTypeArg::F16 => DType::F16,
    }
}

/// Opens `--device`: a GPU request in a CPU-only build is an error (naming how to build with
/// CUDA); in a CUDA build without a usable GPU the run goes on on the CPU after a warning on
/// standard error.
pub(crate) fn open_device(req: DeviceRequest) -> Result<OpenedDevice> {
    let d = infdit::device::open(req)?;
    if let Some(why) = &d.fallback {
        eprintln!("warning: {why}");
    }
    Ok(d)
}

/// The network dtype: `--dtype` when given, else the device's default (bf16 on a GPU, f32 on
/// the CPU, also when a GPU was asked for and the CPU is used instead).
pub(crate) fn run_dtype(d: Option<DTypeArg>, dev: &OpenedDevice) -> DType {
    d.map(dtype).unwrap_or(if dev.is_gpu() { DType::BF16 } else { DType::F32 })
}

/// The model named by `--model`, `--config` and `--clip` (no `--model`: the built-in one).
pub(crate) fn model_spec(a: &ModelArgs) -> Result<ModelSpec> {
    ModelSpec::from_paths(a.model.as_deref(), a.config.as_deref(), a.clip.as_deref())
        .map_err(|e| anyhow::anyhow!(e.to_string().replace("a config file needs", "--config needs")))
}

pub(crate) fn load_model(a: &ModelArgs, dt: DType, dev: &Device) -> Result<Model> {
    Ok(model_spec(a)?.load(dt, dev)?)
}

fn convert_cmd(a: ConvertArgs) -> Result<()> {
    let s = convert(&a.input, &a.output, a.dtype.map(dtype))?;
    eprintln!("wrote {}: {} tensors, {} values, {} bytes", a.output.display(), s.tensors, s.elements, s.bytes);
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let ModelSpec::Files { weights, .. } = model_spec(&a.model)? else {
        bail!("give the checkpoint to inspect with --model");
    };
    let ck = Checkpoint::open(&weights)?;
    let total: usize = ck.keys().map(|k| ck.shape(k).map(|s| s.iter().product::<usize>()).unwrap_or(0)).sum();
    println!("{}: {} tensors, {} values", weights.display(), ck.len(), total);
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
    let ck = infdit::loaded::random::random_checkpoint(&cfg, a.seed)?;
    let dt = dtype(a.dtype);
    let mut tensors = std::collections::HashMap::new();
    for k in ck.keys() {
        tensors.insert(k.to_string(), ck.load(k, &Device::Cpu)?.to_dtype(dt)?);
    }
    infdit::weights::convert::save_atomic(&tensors, &a.output)?;
    eprintln!("wrote {} ({} tensors)", a.output.display(), tensors.len());
    Ok(())
}
