//! Command-line flags, as typed by the user (clap derive). Validation into library types happens in
//! `commands`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Inf-DiT image upscaler: any-resolution 4x diffusion upsampling on CPU.
#[derive(Debug, Parser)]
#[command(name = "infdit", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Upscale an image.
    Upscale(UpscaleArgs),
    /// Convert a checkpoint (official .pt or safetensors) to safetensors.
    Convert(ConvertArgs),
    /// Show a checkpoint's tensors and check it against a config.
    Inspect(InspectArgs),
}

/// Compute precision of the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    /// 32-bit float (exact parity with the official fp32 code).
    F32,
    /// bfloat16 weights and activations (norms and softmax in f32).
    Bf16,
    /// float16 weights and activations (norms and softmax in f32).
    F16,
}

/// Scale of one model pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScaleArg {
    /// Native 4x.
    #[value(name = "4")]
    X4,
    /// The official 2x mode.
    #[value(name = "2")]
    X2,
}

/// Bicubic kernel for the upsampled LR, the 2x-mode downsample and the CLIP resize.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ResizeArg {
    /// torchvision >= 0.17 tensor default (antialiased, a = -0.5), as the released pipeline runs.
    Antialias,
    /// Classic bicubic (a = -0.75, no antialias), torchvision <= 0.16.
    Classic,
}

/// Model selection shared by the subcommands that build a model.
#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// Checkpoint: the official mp_rank_00_model_states.pt, or a safetensors file in its key layout.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// Model config: infdit JSON, or the parity/official JSON (official flag names). Default: the
    /// released Inf-DiT (hidden 1280, depth 28, 16 heads, ViT-L/14 CLIP).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// CLIP tower weights when the checkpoint lacks them: open_clip_pytorch_model.bin,
    /// open_clip_model.safetensors, or Hugging Face CLIP weights (model.safetensors / pytorch_model.bin).
    #[arg(long, value_name = "PATH")]
    pub clip: Option<PathBuf>,
}

/// `infdit upscale`.
#[derive(Debug, clap::Args)]
pub struct UpscaleArgs {
    /// Input image (PNG, JPEG, WebP, TIFF, BMP).
    pub input: PathBuf,
    /// Output image (PNG, JPEG, WebP, TIFF by extension). Written atomically; never the input.
    #[arg(short, long, value_name = "PATH")]
    pub output: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Initial noise eps from a safetensors file (key `eps`, shape (1,3,H,W) of the output) instead
    /// of the seeded generator, e.g. to compare with the official code on the same noise.
    #[arg(long, value_name = "FILE")]
    pub noise: Option<PathBuf>,
    /// Network precision.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
    /// Upscaling factor of the pass (the official 4x, or its 2x mode).
    #[arg(long, value_enum, default_value_t = ScaleArg::X4)]
    pub scale: ScaleArg,
    /// Sampler steps (the released config: 20, i.e. 39 network evaluations).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Bicubic kernel of the input preparation.
    #[arg(long, value_enum, default_value_t = ResizeArg::Antialias)]
    pub resize: ResizeArg,
    /// Largest input accepted, in pixels (guards against decompression bombs).
    #[arg(long, default_value_t = 64 << 20)]
    pub max_pixels: u64,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// `infdit convert`.
#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// Input checkpoint (.pt/.pth/.bin torch pickle, or safetensors).
    pub input: PathBuf,
    /// Output safetensors file.
    #[arg(short, long, value_name = "PATH")]
    pub output: PathBuf,
    /// Float dtype of the output; default: keep each tensor's dtype.
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
}

/// `infdit inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// List every tensor with its shape.
    #[arg(long)]
    pub list: bool,
}
