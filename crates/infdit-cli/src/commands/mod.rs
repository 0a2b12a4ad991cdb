//! One function per subcommand; `run` dispatches.

mod bench;
mod eval;
mod upscale;

use std::process::ExitCode;

use anyhow::Result;
use candle_core::{DType, Device};

use infdit::ModelConfig;
use infdit::pipeline::Model;
use infdit::weights::{Checkpoint, convert::convert};

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

pub(crate) fn model_config(a: &ModelArgs) -> Result<ModelConfig> {
    Ok(match &a.config {
        Some(p) => ModelConfig::from_file(p)?,
        None => ModelConfig::released(),
    })
}

pub(crate) fn load_model(a: &ModelArgs, dt: DType, dev: &Device) -> Result<Model> {
    let cfg = model_config(a)?;
    Ok(Model::load(&cfg, &a.model, a.clip.as_deref(), dt, dev)?)
}

fn convert_cmd(a: ConvertArgs) -> Result<()> {
    let s = convert(&a.input, &a.output, a.dtype.map(dtype))?;
    eprintln!("wrote {}: {} tensors, {} values, {} bytes", a.output.display(), s.tensors, s.elements, s.bytes);
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
