//! A loaded model: the diffusion transformer and, when configured, its CLIP tower, from a
//! checkpoint file, a model folder or the model built into the library.

pub mod random;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::clip::ClipVision;
use crate::config::{ModelConfig, SamplerDefaults};
use crate::error::{InfditError, Result};
use crate::imageio::resize::Bicubic;
use crate::model::InfDit;
use crate::weights::{CLIP_PREFIX, Checkpoint, WeightLoader};

/// A loaded model: the DiT and, when configured, its CLIP tower.
#[derive(Debug, Clone)]
pub struct Model {
    /// The configuration it was built from.
    pub cfg: ModelConfig,
    /// The diffusion transformer.
    pub dit: InfDit,
    /// The CLIP image tower.
    pub clip: Option<ClipVision>,
    /// Dead keys that were present in the checkpoint and skipped.
    pub skipped_dead_keys: Vec<String>,
    /// A digest of every weight read (DiT and CLIP; see [`WeightLoader::digest`]), part of the
    /// resume fingerprint so that a checkpoint of another model is never resumed.
    pub weights_digest: u64,
}

impl Model {
    /// Loads a model from checkpoint files: `weights` is the official `.pt`, a converted
    /// `.safetensors`, or any file in the official key layout; `clip` optionally supplies the CLIP
    /// tower (open_clip or Hugging Face layout) when `weights` lacks it.
    pub fn load(cfg: &ModelConfig, weights: &Path, clip: Option<&Path>, dtype: DType, dev: &Device) -> Result<Self> {
        let mut ck = Checkpoint::open(weights)?;
        if let (Some(ccfg), Some(path)) = (&cfg.clip, clip) {
            let extra = Checkpoint::open(path)?;
            ck.add_clip_from(&extra, ccfg.layers)?;
        }
        Self::from_checkpoint(cfg, ck, dtype, dev)
    }

    /// Builds a model from an opened checkpoint, strictly: every problem is reported by key.
    pub fn from_checkpoint(cfg: &ModelConfig, ck: Checkpoint, dtype: DType, dev: &Device) -> Result<Self> {
        cfg.validate()?;
        check_has_network(&ck)?;
        // A checkpoint with the network but without the CLIP tower needs the tower from another file.
        if cfg.clip.is_some() && !ck.has_clip() {
            return Err(InfditError::MissingClip { checkpoint: ck.origin() });
        }
        let loader = WeightLoader::new(ck, dtype, dev);
        let dit = InfDit::load(&cfg.dit, &loader)?;
        let clip = match &cfg.clip {
            Some(c) => Some(ClipVision::load(c, &loader.pp(CLIP_PREFIX.trim_end_matches('.')))?),
            None => None,
        };
        let weights_digest = loader.digest();
        let skipped_dead_keys = loader.finish()?;
        Ok(Self { cfg: cfg.clone(), dit, clip, skipped_dead_keys, weights_digest })
    }

    /// Every tensor the model reads from a checkpoint, with its shape, in the official key layout
    /// (dead keys excluded; see [`crate::weights::dead_key_shapes`]). Allocates nothing.
    pub fn expected_keys(cfg: &ModelConfig) -> Result<Vec<(String, Vec<usize>)>> {
        let loader = WeightLoader::new(Checkpoint::default(), DType::F32, &Device::Cpu);
        InfDit::load(&cfg.dit, &loader)?;
        if let Some(c) = &cfg.clip {
            ClipVision::load(c, &loader.pp(CLIP_PREFIX.trim_end_matches('.')))?;
        }
        match loader.finish() {
            Err(crate::weights::WeightError::Mismatch(r)) => Ok(r.missing),
            Err(e) => Err(e.into()),
            Ok(_) => Ok(Vec::new()),
        }
    }

    /// Parameters of the DiT part (CLIP excluded, dead keys excluded), from the config alone
    /// ([`ModelConfig::parameter_count`]: arithmetic, nothing is built or allocated).
    pub fn parameter_count(cfg: &ModelConfig) -> Result<usize> {
        cfg.validate()?;
        Ok(cfg.parameter_count() as usize)
    }

    /// The conditioning vector of an LR image (1, 3, h, w) in [-1, 1]: the CLIP embedding, or zeros
    /// for a model without CLIP.
    pub fn clip_vector(&self, lr: &Tensor, kind: Bicubic) -> Result<Tensor> {
        match &self.clip {
            Some(c) => Ok(c.embed_image(lr, kind)?),
            None => Ok(Tensor::zeros((1, self.cfg.dit.vector_dim), DType::F32, lr.device())?),
        }
    }
}

/// Refuses a checkpoint that holds none of the DiT's tensors (another model's file, a CLIP
/// tower alone) with that message, rather than with a list of every missing key or a hint about
/// the CLIP tower.
fn check_has_network(ck: &Checkpoint) -> Result<()> {
    if ck.keys().any(|k| k.starts_with("transformer.layers.") || k.starts_with("mixins.")) {
        return Ok(());
    }
    Err(InfditError::Config(format!(
        "{}: holds none of the Inf-DiT network's tensors (transformer.layers.*, mixins.*): not an Inf-DiT \
         checkpoint ({} tensors, e.g. {})",
        ck.origin(),
        ck.len(),
        ck.keys().take(3).collect::<Vec<_>>().join(", ")
    )))
}

/// The weights of the small model built into the library (see `models/default/MODEL_CARD.md`):
/// what runs when no checkpoint is given.
pub const BUILTIN_WEIGHTS: &[u8] = include_bytes!("../../../../models/default/model.safetensors");
/// Its config, with its sampler defaults.
pub const BUILTIN_CONFIG: &str = include_str!("../../../../models/default/config.json");
/// How the built-in model is named in messages and run fingerprints.
pub const BUILTIN_LABEL: &str = "built-in default model";

/// Which model to run: the one built into the library, or checkpoint files.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ModelSpec {
    /// The small model built into the library ([`BUILTIN_WEIGHTS`], [`BUILTIN_CONFIG`]).
    #[default]
    BuiltIn,
    /// A checkpoint file (the official `.pt`, or safetensors in its key layout).
    Files {
        /// The weights.
        weights: PathBuf,
        /// The config file; `None` is the released config.
        config: Option<PathBuf>,
        /// A separate CLIP tower, for a checkpoint without one.
        clip: Option<PathBuf>,
    },
}

impl ModelSpec {
    /// The model named by paths, as a user gives them: no `model` is the built-in model (which
    /// takes neither a config nor a CLIP file); `model` may be a checkpoint file or a folder
    /// written by training (`model.safetensors` + `config.json`, whose config is used unless
    /// `config` names another).
    pub fn from_paths(model: Option<&Path>, config: Option<&Path>, clip: Option<&Path>) -> Result<Self> {
        let Some(model) = model else {
            if let Some(c) = config {
                return Err(InfditError::Config(format!(
                    "{}: a config file needs a checkpoint (the built-in model has its own config)",
                    c.display()
                )));
            }
            if let Some(c) = clip {
                return Err(InfditError::Config(format!(
                    "{}: a CLIP file needs a checkpoint (the built-in model has no CLIP tower)",
                    c.display()
                )));
            }
            return Ok(Self::BuiltIn);
        };
        let clip = clip.map(Path::to_path_buf);
        if model.is_dir() {
            let weights = model.join("model.safetensors");
            if !weights.is_file() {
                return Err(InfditError::Config(format!(
                    "{}: a model folder must hold model.safetensors (and config.json)",
                    model.display()
                )));
            }
            let config = Some(config.map_or_else(|| model.join("config.json"), Path::to_path_buf));
            return Ok(Self::Files { weights, config, clip });
        }
        Ok(Self::Files { weights: model.to_path_buf(), config: config.map(Path::to_path_buf), clip })
    }

    /// Whether this is the built-in model.
    pub fn is_builtin(&self) -> bool {
        matches!(self, Self::BuiltIn)
    }

    /// The model as named in messages and run fingerprints.
    pub fn label(&self) -> String {
        match self {
            Self::BuiltIn => BUILTIN_LABEL.into(),
            Self::Files { weights, .. } => weights.display().to_string(),
        }
    }

    /// The model's config: the built-in one, the config file, or the released config.
    pub fn config(&self) -> Result<ModelConfig> {
        match self {
            Self::BuiltIn => ModelConfig::from_json_str(BUILTIN_CONFIG),
            Self::Files { config: Some(p), .. } => ModelConfig::from_file(p),
            Self::Files { config: None, .. } => Ok(ModelConfig::released()),
        }
    }

    /// The sampler settings the model's config recommends (steps, starting sigma), if it names any.
    pub fn sampler_defaults(&self) -> Result<Option<SamplerDefaults>> {
        match self {
            Self::BuiltIn => SamplerDefaults::from_json_str(BUILTIN_CONFIG),
            Self::Files { config: Some(p), .. } => SamplerDefaults::from_file(p),
            Self::Files { config: None, .. } => Ok(None),
        }
    }

    /// Loads the model, with its weights in `dtype` on `dev`.
    pub fn load(&self, dtype: DType, dev: &Device) -> Result<Model> {
        let cfg = self.config()?;
        match self {
            Self::BuiltIn => {
                let tensors = candle_core::safetensors::load_buffer(BUILTIN_WEIGHTS, &Device::Cpu)?;
                Model::from_checkpoint(&cfg, Checkpoint::from_tensors(BUILTIN_LABEL, tensors), dtype, dev)
            }
            Self::Files { weights, clip, .. } => Model::load(&cfg, weights, clip.as_deref(), dtype, dev),
        }
    }
}
