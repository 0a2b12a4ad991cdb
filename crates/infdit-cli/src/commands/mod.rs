//! One function per subcommand; `run` dispatches.

mod bench;
mod eval;
mod train;
mod upscale;

use std::process::ExitCode;

use std::path::PathBuf;

use anyhow::{Result, bail};
use candle_core::{DType, Device};

use infdit::ModelConfig;
use infdit::config::SamplerDefaults;
use infdit::device::{DeviceRequest, OpenedDevice};
use infdit::diffusion::HeunConfig;
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
        Command::Train(a) => train::train(a),
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

/// The model shipped inside the binary (see models/default/MODEL_CARD.md): used when no
/// `--model` is given.
const DEFAULT_MODEL_WEIGHTS: &[u8] = include_bytes!("../../../../models/default/model.safetensors");
/// Its config, with its sampler defaults.
const DEFAULT_MODEL_CONFIG: &str = include_str!("../../../../models/default/config.json");

/// Where the weights and the config of a `--model` come from.
enum ModelSource {
    BuiltIn,
    /// A weights file; its config is [`config_file`]'s, else the released one.
    Files {
        weights: PathBuf,
    },
}

fn model_source(a: &ModelArgs) -> Result<ModelSource> {
    match &a.model {
        None if a.config.is_some() => bail!("--config needs --model (the built-in model has its own config)"),
        None => Ok(ModelSource::BuiltIn),
        // A model folder, as `infdit train` writes it: model.safetensors + config.json.
        Some(dir) if dir.is_dir() => {
            let weights = dir.join("model.safetensors");
            if !weights.is_file() {
                bail!("{}: a model folder must hold model.safetensors (and config.json)", dir.display());
            }
            Ok(ModelSource::Files { weights })
        }
        Some(file) => Ok(ModelSource::Files { weights: file.clone() }),
    }
}

/// The model as named in messages and run fingerprints.
pub(crate) fn model_label(a: &ModelArgs) -> String {
    a.model.as_ref().map_or_else(|| "built-in default model".into(), |p| p.display().to_string())
}

/// The config file to read: --config, else the config.json of a model folder given to --model.
fn config_file(a: &ModelArgs) -> Option<PathBuf> {
    match (&a.model, &a.config) {
        (_, Some(c)) => Some(c.clone()),
        (Some(dir), None) if dir.is_dir() => Some(dir.join("config.json")),
        _ => None,
    }
}

pub(crate) fn model_config(a: &ModelArgs) -> Result<ModelConfig> {
    Ok(match (model_source(a)?, config_file(a)) {
        (ModelSource::BuiltIn, _) => ModelConfig::from_json_str(DEFAULT_MODEL_CONFIG)?,
        (_, Some(p)) => ModelConfig::from_file(&p)?,
        (_, None) => ModelConfig::released(),
    })
}

/// The sampler settings the model's config recommends (steps, starting sigma), if it names any.
pub(crate) fn sampler_defaults(a: &ModelArgs) -> Result<Option<SamplerDefaults>> {
    Ok(match (model_source(a)?, config_file(a)) {
        (ModelSource::BuiltIn, _) => SamplerDefaults::from_json_str(DEFAULT_MODEL_CONFIG)?,
        (_, Some(p)) => SamplerDefaults::from_file(&p)?,
        _ => None,
    })
}

/// The sampler: `--steps` / `--sigma-max` when given, else the model's own defaults, else the
/// released settings (20 steps from sigma 40).
pub(crate) fn heun_config(
    defaults: Option<SamplerDefaults>,
    steps: Option<usize>,
    sigma_max: Option<f32>,
) -> Result<HeunConfig> {
    let base = HeunConfig::default();
    let heun = HeunConfig {
        steps: steps.or(defaults.map(|d| d.steps)).unwrap_or(base.steps),
        sigma_max: sigma_max.or(defaults.map(|d| d.sigma_max)).unwrap_or(base.sigma_max),
        ..base
    };
    if heun.steps == 0 || heun.steps > HeunConfig::MAX_STEPS {
        bail!("--steps {} must be between 1 and {}", heun.steps, HeunConfig::MAX_STEPS);
    }
    if !(heun.sigma_max > heun.sigma_min && heun.sigma_max <= HeunConfig::MAX_SIGMA) {
        bail!(
            "--sigma-max {} must be above sigma_min {} and at most {}",
            heun.sigma_max,
            heun.sigma_min,
            HeunConfig::MAX_SIGMA
        );
    }
    heun.validate()?;
    Ok(heun)
}

pub(crate) fn load_model(a: &ModelArgs, dt: DType, dev: &Device) -> Result<Model> {
    let cfg = model_config(a)?;
    Ok(match model_source(a)? {
        ModelSource::BuiltIn => {
            let tensors = candle_core::safetensors::load_buffer(DEFAULT_MODEL_WEIGHTS, &Device::Cpu)?;
            Model::from_checkpoint(&cfg, Checkpoint::from_tensors("built-in default model", tensors), dt, dev)?
        }
        ModelSource::Files { weights } => Model::load(&cfg, &weights, a.clip.as_deref(), dt, dev)?,
    })
}

fn convert_cmd(a: ConvertArgs) -> Result<()> {
    let s = convert(&a.input, &a.output, a.dtype.map(dtype))?;
    eprintln!("wrote {}: {} tensors, {} values, {} bytes", a.output.display(), s.tensors, s.elements, s.bytes);
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let ModelSource::Files { weights } = model_source(&a.model)? else {
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
