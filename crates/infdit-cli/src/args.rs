//! Command-line flags, as typed by the user (clap derive). Validation into library types happens in
//! `commands`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use infdit::device::DeviceRequest;

/// Inf-DiT image upscaler: any-resolution 4x diffusion upsampling on the CPU or an NVIDIA GPU.
#[derive(Debug, Parser)]
#[command(name = "infdit", version = VERSION, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `infdit --version`: the version and whether the binary has the CUDA backend.
const VERSION: &str = if cfg!(feature = "cuda") {
    concat!(env!("CARGO_PKG_VERSION"), " (with CUDA)")
} else {
    concat!(env!("CARGO_PKG_VERSION"), " (CPU only)")
};

/// Help of `--device`.
pub const DEVICE_HELP: &str = "Where the network runs: cpu, cuda (the first NVIDIA GPU) or cuda:N. A GPU needs a \
     binary built with CUDA (bench/build-cuda.sh) and falls back to the CPU, with a warning, when none is usable.";

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Upscale an image, or a batch of files, folders and globs.
    Upscale(UpscaleArgs),
    /// Convert a checkpoint (official .pt or safetensors) to safetensors.
    Convert(ConvertArgs),
    /// Show a checkpoint's tensors and check it against a config.
    Inspect(InspectArgs),
    /// Write a checkpoint of deterministic random weights for a config (benchmarks, tests).
    RandomModel(RandomModelArgs),
    /// Time one network evaluation (benchmarks; see bench/cpu.sh).
    Bench(BenchArgs),
    /// Evaluate a model against bicubic on HR images: PSNR-Y, SSIM-Y, seam score
    Eval(EvalArgs),
    /// Train or fine-tune a model on image folders (EDM loss, AdamW, EMA; resumable)
    Train(TrainArgs),
}

/// `infdit random-model`.
#[derive(Debug, clap::Args)]
pub struct RandomModelArgs {
    /// Model config (default: the released one).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Output safetensors file.
    #[arg(short, long, value_name = "PATH")]
    pub output: PathBuf,
    /// Seed of the weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stored dtype.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
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

/// Parses `--scale`: a factor > 0 such as `4`, `2`, `8`, `3`, `1.5`, optionally written `x4`.
pub fn parse_scale(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let num = t.strip_prefix(['x', 'X']).unwrap_or(t);
    let v: f64 = num.parse().map_err(|_| format!("'{s}' is not a scale factor (e.g. 4, 2, 8, 3, 1.5 or x4)"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("scale '{s}' must be a number above 0"));
    }
    if v > 4096.0 {
        return Err(format!("scale '{s}' is above the largest supported factor, 4096"));
    }
    Ok(v)
}

/// Output format of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// PNG (8 or 16 bits, alpha).
    Png,
    /// JPEG (8 bits, no alpha; --jpeg-quality).
    #[value(alias = "jpg")]
    Jpeg,
    /// Lossless WebP (8 bits, alpha).
    Webp,
    /// TIFF (8 or 16 bits, alpha).
    #[value(alias = "tif")]
    Tiff,
}

impl FormatArg {
    /// The file extension written.
    pub fn extension(self) -> &'static str {
        match self {
            FormatArg::Png => "png",
            FormatArg::Jpeg => "jpg",
            FormatArg::Webp => "webp",
            FormatArg::Tiff => "tif",
        }
    }
}

/// How inputs meet the block grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CropArg {
    /// Reflect-pad to the grid and crop the output back to exactly scale x the input.
    Pad,
    /// The official center crop to a multiple of 32 px (drops up to 31 px per side).
    Official,
}

/// How a network evaluation is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// UniBA block scheduler with a K/V cache (default).
    Blocks,
    /// The whole image in one forward (the official "full" mode).
    Whole,
}

/// Parses a byte count with an optional K/M/G/T suffix (powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => return Err(format!("unknown size suffix in '{s}' (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("'{s}' is not a byte count"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("'{s}' must be a positive size"));
    }
    Ok((v * mult as f64) as u64)
}

/// Bicubic kernel for the upsampled LR, the 2x-mode downsample and the CLIP resize.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ResizeArg {
    /// torchvision >= 0.17 tensor default (antialiased, a = -0.5), as the released pipeline runs.
    Antialias,
    /// Classic bicubic (a = -0.75, no antialias), torchvision <= 0.16.
    Classic,
}

/// How the alpha plane of an image with transparency is upscaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AlphaArg {
    /// Bicubic (the --resize kernel) from the input straight to the output size (fast, exact on flat areas).
    Bicubic,
    /// The same model passes as the colour, on the alpha plane as a gray image (doubles the work).
    Model,
    /// No alpha in the output: the image is flattened on the --background colour first.
    Drop,
}

/// How 8-bit output samples are made from the model's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoundingArg {
    /// Round to nearest (unbiased; an unchanged 8-bit pixel comes back as it was).
    Nearest,
    /// Truncate like the official script (half a level darker on average; bit-exact parity).
    Truncate,
}

impl From<RoundingArg> for infdit::imageio::Rounding {
    fn from(r: RoundingArg) -> Self {
        match r {
            RoundingArg::Nearest => Self::Nearest,
            RoundingArg::Truncate => Self::Truncate,
        }
    }
}

/// Model selection shared by the subcommands that build a model.
#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// Checkpoint: the official mp_rank_00_model_states.pt, a safetensors file in its key layout, or
    /// a model folder written by `infdit train` (model.safetensors + config.json). Default: the small
    /// model built into the binary (models/default/MODEL_CARD.md).
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Model config: infdit JSON, or the parity/official JSON (official flag names). Default: the
    /// folder's config.json for a model folder, else the released Inf-DiT (hidden 1280, depth 28,
    /// 16 heads, ViT-L/14 CLIP).
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
    /// Input images (PNG, JPEG, WebP, TIFF, BMP), folders (searched recursively for files with
    /// those extensions, hidden entries skipped) and glob patterns (`'photos/**/*.jpg'`, expanded
    /// by infdit, so they work quoted).
    #[arg(required = true, num_args = 1.., value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// Output. With one input file: the output image (PNG, JPEG, WebP, TIFF by extension). With
    /// several inputs, a folder or a glob (or when it is an existing folder): the output folder,
    /// which mirrors the input tree. Written atomically; an input is never overwritten.
    #[arg(short, long, value_name = "PATH")]
    pub output: PathBuf,
    /// Output file name in a batch: `{stem}` (input name without extension), `{ext}` (--format's
    /// extension, else the input's, else png), `{scale}` (x4, x1.5, w1024, h768 or 1024x768);
    /// `{{`/`}}` for braces. Default: `{stem}_{scale}.{ext}`.
    #[arg(long, value_name = "TEMPLATE")]
    pub name: Option<String>,
    /// Output format in a batch (default: the input's when writable, else PNG).
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// Skip inputs whose output file already exists.
    #[arg(long)]
    pub skip_existing: bool,
    /// Print what would be done (input -> output, sizes, model passes, block grid, estimated
    /// memory) without loading the model or writing anything.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Initial noise eps from a safetensors file (key `eps`, shape (1,3,H,W) of the output) instead
    /// of the seeded generator, e.g. to compare with the official code on the same noise.
    #[arg(long, value_name = "FILE")]
    pub noise: Option<PathBuf>,
    #[arg(long, default_value = "cpu", value_name = "DEVICE", help = DEVICE_HELP)]
    pub device: DeviceRequest,
    /// Network precision. Default: bf16 on a GPU, f32 on the CPU (exact parity; bf16 is about 1.6x faster on a
    /// CPU with AVX-512 BF16, whose dot-product instructions it then uses).
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Upscaling factor (default 4): 4 is the native pass, 2 the official 2x mode; any other factor
    /// S > 0 (8, 16, 3, 1.5, ...) runs the fewest passes (x4, or x2 where that suffices) reaching at
    /// least S, then an antialiased bicubic downscale to round(W*S) x round(H*S). `x4` also accepted.
    #[arg(long, value_parser = parse_scale, conflicts_with_all = ["width", "height"])]
    pub scale: Option<f64>,
    /// Output width in pixels (alone: the height keeps the aspect ratio). Passes as for --scale.
    #[arg(long, value_name = "PX", value_parser = clap::value_parser!(u32).range(1..))]
    pub width: Option<u32>,
    /// Output height in pixels (alone: the width keeps the aspect ratio).
    #[arg(long, value_name = "PX", value_parser = clap::value_parser!(u32).range(1..))]
    pub height: Option<u32>,
    /// Sampler steps (default: the model's own setting — the built-in model's is in its config —
    /// else the released 20, i.e. 39 network evaluations).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Starting sigma of the sampler (default: the model's own setting, else the released 40).
    #[arg(long)]
    pub sigma_max: Option<f32>,
    /// Bicubic kernel of the input preparation.
    #[arg(long, value_enum, default_value_t = ResizeArg::Antialias)]
    pub resize: ResizeArg,
    /// How the alpha plane (transparency) is upscaled. `bicubic` (default): straight from the
    /// input to the output size; flat areas stay exactly opaque or transparent, no extra time.
    /// `model`: through the same model passes as the colour, as a gray image with its own noise
    /// (from --seed), then the same resize; edges follow the model's sharpening, at twice the
    /// model time, and a model trained on photos may add texture to flat areas of the mask.
    #[arg(long, value_enum, default_value_t = AlphaArg::Bicubic)]
    pub alpha: AlphaArg,
    /// The colour that `--alpha drop` flattens transparent images on, as RRGGBB hex (default: white).
    #[arg(long, value_name = "RRGGBB", value_parser = parse_colour, default_value = "ffffff")]
    pub background: [u8; 3],
    /// How each network evaluation runs: the block scheduler (memory grows with the width), or
    /// the whole image at once (the official "full" mode, memory grows with the area; for checks).
    #[arg(long, value_enum, default_value_t = ModeArg::Blocks)]
    pub mode: ModeArg,
    /// Blocks per batch side for the scheduler (n x n blocks per forward). Default: the largest n
    /// whose memory plan fits --max-memory, on the CPU at most the n with 4096 tokens per forward
    /// (2 for 128-px blocks), beyond which a batch costs much memory for little time.
    #[arg(long, value_name = "N")]
    pub block_batch: Option<usize>,
    /// Memory budget in bytes (suffixes K, M, G, T accepted) used to choose --block-batch: of
    /// host memory on the CPU, of GPU memory on a GPU. Default: half of the available memory, at
    /// most 8G; on a GPU 90% of its free memory less 512M.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub max_memory: Option<u64>,
    /// Storage precision of the scheduler's K/V cache. Default: the network's --dtype.
    #[arg(long, value_enum)]
    pub kv_dtype: Option<DTypeArg>,
    /// Keep the block scheduler's K/V cache in host memory and copy what each block batch needs
    /// to the GPU, so that GPU memory does not grow with the output size (block mode; same
    /// results bit for bit; some time for the copies). Nothing changes on the CPU.
    #[arg(long)]
    pub kv_offload: bool,
    /// Save the sampler state here after each step, and resume from it when rerun with the same
    /// command (the result is bit-identical to an uninterrupted run). In a batch, each file uses
    /// `DIR/<output path below -o>.state`; runs of several passes also keep each finished pass.
    /// With --alpha model, the alpha plane's passes keep theirs in an `alpha` folder below.
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Keep the sampler's image-size state (about 36 bytes per output pixel) in files in this folder
    /// instead of in memory, and make the upsampled LR and the initial noise block row by block row
    /// (block mode only): the sampling's memory then grows with the width only. Bit-identical
    /// results. Use a folder on a disk, not a tmpfs.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Print the memory plan and the chosen settings.
    #[arg(long, short)]
    pub verbose: bool,
    /// How inputs of any size meet the 128-px block grid: reflect-pad and crop the result back
    /// (every input pixel is kept), or the official center crop to a multiple of 32 (for parity).
    #[arg(long, value_enum, default_value_t = CropArg::Pad)]
    pub crop: CropArg,
    /// Drop the input's ICC profile and EXIF instead of carrying them over.
    #[arg(long)]
    pub strip_metadata: bool,
    /// JPEG output quality (1-100).
    #[arg(long, default_value_t = 95, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub jpeg_quality: u8,
    /// How 8-bit output samples are made: round to nearest, or truncate as the official script
    /// does (its images are half a level darker on average; use it to compare bit for bit).
    #[arg(long, value_enum, default_value_t = RoundingArg::Nearest)]
    pub rounding: RoundingArg,
    /// Largest input accepted, in pixels (guards against decompression bombs).
    #[arg(long, default_value_t = 64 << 20)]
    pub max_pixels: u64,
    /// No progress bars, no "wrote" lines, no summary (errors are still printed).
    #[arg(long, short)]
    pub quiet: bool,
    /// Progress as JSON lines on standard output (one object per event: `start`, `progress`,
    /// `done`, and in batches `skipped`, `failed`, `summary`; each with `file_index` (from 0) and
    /// `file_count`) instead of the progress bars, for scripts.
    #[arg(long)]
    pub json: bool,
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

/// What `infdit bench` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchTarget {
    /// One denoiser call D(x; sigma) on the whole image.
    Denoise,
    /// Checks --device against the CPU: one block-scheduler call on the device (with and without
    /// --kv-offload) and on the CPU in f32, same inputs; prints the largest differences.
    Compare,
}

/// `--kv-offload` of `infdit bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OffloadArg {
    /// The K/V cache on the model's device.
    Off,
    /// The K/V cache in host memory.
    On,
    /// Both, one after the other (one line each).
    Both,
}

/// `infdit bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// What to time.
    #[arg(value_enum)]
    pub target: BenchTarget,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output (HR) size HxW in pixels, multiples of the block size; several, comma-separated
    /// (`1024x1024,2048x2048`), are timed one after the other in one process, after one warm-up.
    #[arg(long, default_value = "384x384")]
    pub size: String,
    /// Noise level of the call.
    #[arg(long, default_value_t = 1.0)]
    pub sigma: f32,
    #[arg(long, default_value = "cpu", value_name = "DEVICE", help = DEVICE_HELP)]
    pub device: DeviceRequest,
    /// Network precision. Default: bf16 on a GPU, f32 on the CPU (exact parity; bf16 is about 1.6x faster on a
    /// CPU with AVX-512 BF16, whose dot-product instructions it then uses).
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Timed calls (after one warm-up call).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Size HxW of the warm-up call (one per --kv-offload setting, before the first timed call).
    /// Default: the first --size.
    #[arg(long, value_name = "HxW")]
    pub warmup: Option<String>,
    /// Whole image at once (default on the CPU), or the block scheduler (default with
    /// --block-batch, --kv-offload, --max-memory or on a GPU).
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// Block batch side n of the scheduler (implies --mode blocks). Default: 1 on the CPU; on a GPU
    /// the largest n whose memory plan fits --max-memory.
    #[arg(long, value_name = "N")]
    pub block_batch: Option<usize>,
    /// Memory budget that picks the block batch on a GPU (of GPU memory; default as for upscale).
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub max_memory: Option<u64>,
    /// The scheduler's K/V cache in host memory (`on`, or just `--kv-offload`), on the model's
    /// device (`off`), or both one after the other.
    #[arg(long, value_enum, value_name = "WHEN", num_args = 0..=1, default_value = "off", default_missing_value = "on")]
    pub kv_offload: OffloadArg,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `infdit eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// HR images, or folders (every image file in them and their subfolders, sorted).
    #[arg(long, value_name = "PATH", num_args = 1.., required = true)]
    pub hr: Vec<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value = "cpu", value_name = "DEVICE", help = DEVICE_HELP)]
    pub device: DeviceRequest,
    /// Network precision. Default: bf16 on a GPU, f32 on the CPU (exact parity; bf16 is about 1.6x faster on a
    /// CPU with AVX-512 BF16, whose dot-product instructions it then uses).
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Sampler steps (default: the model's own setting, else 20).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Starting sigma of the sampler (default: the model's own setting, else 40).
    #[arg(long)]
    pub sigma_max: Option<f32>,
    /// Resize each HR image's shorter side to N px and take the centre N x N before degrading
    /// (e.g. 1024: a 256 -> 1024 test).
    #[arg(long, value_name = "N")]
    pub hr_size: Option<usize>,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Blocks per batch side for the scheduler.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub block_batch: usize,
    /// Evaluate at most this many images.
    #[arg(long, value_name = "K")]
    pub limit: Option<usize>,
    /// Also write each model output as PNG into this folder (`{stem}.png`), with the LR input,
    /// the bicubic baseline and the HR reference beside it (`{stem}_lr.png`, `_bicubic`, `_hr`).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// `infdit train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Training images: files or folders (searched recursively). Images smaller than the crop are skipped.
    #[arg(value_name = "PATH", num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// Output folder: model.safetensors (EMA weights) + config.json, train-state.* (resume), loss.csv,
    /// samples/. A run whose folder already holds a state resumes from it.
    #[arg(short, long, value_name = "DIR")]
    pub out: PathBuf,
    /// Model config (infdit JSON or the official parity JSON); with --init, the checkpoint's config.
    #[arg(long, value_name = "PATH")]
    pub config: PathBuf,
    /// Start from these weights (fine-tuning) instead of random ones.
    #[arg(long, value_name = "PATH")]
    pub init: Option<PathBuf>,
    /// CLIP tower weights when the config has CLIP and --init lacks them (the tower stays frozen).
    #[arg(long, value_name = "PATH")]
    pub clip: Option<PathBuf>,
    /// Optimiser steps in total (a resumed run continues up to this).
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    /// Images per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// HR crop side in pixels (a multiple of the block size; the paper: 512).
    #[arg(long, default_value_t = 512)]
    pub crop: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Linear learning-rate warm-up steps.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0: off).
    #[arg(long, default_value_t = 0.1)]
    pub grad_clip: f64,
    /// EMA decay of the saved weights.
    #[arg(long, default_value_t = 0.999)]
    pub ema_decay: f64,
    /// Log-normal training sigma: mean of ln sigma.
    #[arg(long, default_value_t = -1.0, allow_negative_numbers = true)]
    pub p_mean: f64,
    /// Log-normal training sigma: std of ln sigma.
    #[arg(long, default_value_t = 1.4)]
    pub p_std: f64,
    /// Probability that an LR comes from the Real-ESRGAN degradation (else a clean bicubic downscale).
    #[arg(long, default_value_t = 1.0)]
    pub degrade_prob: f64,
    /// Probability that both LR inputs are replaced by noise (LR dropout).
    #[arg(long, default_value_t = 0.07)]
    pub lr_dropout: f64,
    /// Downscale training images so their longer side is at most this many pixels when loaded (0: keep).
    #[arg(long, default_value_t = 0)]
    pub max_side: usize,
    /// Seed of every random draw (crops, degradations, sigmas, noise).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Save the state, model.safetensors and a sample every this many steps.
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: usize,
    /// Image for the periodic samples (default: the first training image); its centre crop is used.
    #[arg(long, value_name = "PATH")]
    pub sample_image: Option<PathBuf>,
    /// Heun steps and starting sigma of the periodic samples (also written to config.json as the
    /// model's sampler defaults).
    #[arg(long, default_value_t = 20)]
    pub sample_steps: usize,
    /// See --sample-steps.
    #[arg(long, default_value_t = 40.0)]
    pub sample_sigma_max: f32,
    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
}

/// An RRGGBB hex colour (a leading `#` is accepted).
fn parse_colour(s: &str) -> Result<[u8; 3], String> {
    let h = s.strip_prefix('#').unwrap_or(s);
    let bad = || format!("'{s}' is not an RRGGBB hex colour (e.g. ffffff for white)");
    if h.len() != 6 || !h.is_ascii() {
        return Err(bad());
    }
    let c = |i: usize| u8::from_str_radix(&h[i..i + 2], 16).map_err(|_| bad());
    Ok([c(0)?, c(2)?, c(4)?])
}
