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
    /// Network precision.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
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
    /// Sampler steps (the released config: 20, i.e. 39 network evaluations).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Bicubic kernel of the input preparation.
    #[arg(long, value_enum, default_value_t = ResizeArg::Antialias)]
    pub resize: ResizeArg,
    /// How each network evaluation runs: the block scheduler (memory grows with the width), or
    /// the whole image at once (the official "full" mode, memory grows with the area; for checks).
    #[arg(long, value_enum, default_value_t = ModeArg::Blocks)]
    pub mode: ModeArg,
    /// Blocks per batch side for the scheduler (n x n blocks per forward). Default: the largest n
    /// whose memory plan fits --max-memory.
    #[arg(long, value_name = "N")]
    pub block_batch: Option<usize>,
    /// Memory budget in bytes (suffixes K, M, G, T accepted) used to choose --block-batch.
    /// Default: half of the available memory, at most 8G.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    pub max_memory: Option<u64>,
    /// Storage precision of the scheduler's K/V cache. Default: the network's --dtype.
    #[arg(long, value_enum)]
    pub kv_dtype: Option<DTypeArg>,
    /// Save the sampler state here after each step, and resume from it when rerun with the same
    /// command (the result is bit-identical to an uninterrupted run). In a batch, each file uses
    /// `DIR/<output path below -o>.state`; runs of several passes also keep each finished pass.
    #[arg(long, value_name = "DIR")]
    pub checkpoint_dir: Option<PathBuf>,
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
}

/// `infdit bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// What to time.
    #[arg(value_enum)]
    pub target: BenchTarget,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output (HR) size HxW in pixels, multiples of the block size.
    #[arg(long, default_value = "384x384")]
    pub size: String,
    /// Noise level of the call.
    #[arg(long, default_value_t = 1.0)]
    pub sigma: f32,
    /// Network precision.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,
    /// Timed calls (after one warm-up call).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Whole image at once (default), or the block scheduler (default with --block-batch).
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// Block batch side n of the scheduler (implies --mode blocks).
    #[arg(long, value_name = "N")]
    pub block_batch: Option<usize>,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `infdit eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// HR images, or folders (every png/jpg/jpeg/webp/tif/tiff/bmp file in them, sorted).
    #[arg(long, value_name = "PATH", num_args = 1.., required = true)]
    pub hr: Vec<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sampler steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Blocks per batch side for the scheduler.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub block_batch: usize,
    /// Evaluate at most this many images.
    #[arg(long, value_name = "K")]
    pub limit: Option<usize>,
    /// Also write each model output as PNG into this folder.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}
