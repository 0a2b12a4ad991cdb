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
pub const DEVICE_HELP: &str =
    "Where the network runs: cpu, cuda or cuda:N (needs a CUDA build; no usable GPU: the CPU, with a warning)";

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
    /// Sharded batches (upscale --shard): status across all shards, retry of the failed and missing files
    Batch(BatchArgs),
    /// Plans judged before running: one huge image over several GPUs, simulated (plan wavefront)
    Plan(PlanArgs),
    /// Run the web app and HTTP API: a persistent job queue over one loaded model (docs/serve.md)
    Serve(ServeArgs),
}

/// `infdit batch`.
#[derive(Debug, clap::Args)]
pub struct BatchArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: BatchCommand,
}

/// `infdit batch` subcommands.
#[derive(Debug, Subcommand)]
pub enum BatchCommand {
    /// Summarise a sharded batch across all its shards: done, failed, missing, by shard
    Status(BatchStatusArgs),
    /// List the failed and missing files of a sharded batch; with --run, upscale exactly those
    Retry(BatchRetryArgs),
}

/// `infdit batch status`.
#[derive(Debug, clap::Args)]
pub struct BatchStatusArgs {
    /// The batch's output folder (the -o of its `upscale --shard` runs)
    #[arg(value_name = "OUT")]
    pub output: PathBuf,
    /// Also list every failed and missing file
    #[arg(long, short)]
    pub verbose: bool,
    /// One JSON object on standard output
    #[arg(long)]
    pub json: bool,
}

/// `infdit batch retry`.
#[derive(Debug, clap::Args)]
pub struct BatchRetryArgs {
    /// The batch's output folder
    #[arg(value_name = "OUT")]
    pub output: PathBuf,
    /// Upscale the failed and missing files now, in this process, with the batch's own command line
    #[arg(long)]
    pub run: bool,
    /// The list as JSON lines
    #[arg(long)]
    pub json: bool,
}

/// `infdit plan`.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// What to plan.
    #[command(subcommand)]
    pub command: PlanCommand,
}

/// `infdit plan` subcommands.
#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Simulate one image's block sweep as a wavefront over several devices: makespan, speed-up, memory
    Wavefront(WavefrontArgs),
}

/// How block columns are spread over the devices of `plan wavefront`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AssignArg {
    /// Contiguous strips of columns (only the strip edges travel).
    Strips,
    /// Column c on device c mod D (every block's K/V travels).
    Cyclic,
}

/// `infdit plan wavefront`.
#[derive(Debug, clap::Args)]
pub struct WavefrontArgs {
    /// Output size WxH in pixels (the last pass's; e.g. 16384x16384)
    #[arg(long, value_name = "WxH")]
    pub size: String,
    /// Device counts to compare, comma-separated
    #[arg(long, value_name = "N,N,..", default_value = "1,2,4,8", value_delimiter = ',')]
    pub devices: Vec<usize>,
    /// Milliseconds of one block's forward through all layers [default: the model's FLOPs per block at --tflops]
    #[arg(long, value_name = "T")]
    pub block_time_ms: Option<f64>,
    /// Sustained TFLOP/s of one device, for the default block time
    #[arg(long, value_name = "F", default_value_t = 400.0)]
    pub tflops: f64,
    /// Link bandwidth out of each device, in gigabits per second (NVLink 4: 3600 each way; PCIe 5 x16: 512; NDR InfiniBand: 400)
    #[arg(long, value_name = "B", default_value_t = 400.0)]
    pub link_gbps: f64,
    /// Latency of one transfer, microseconds
    #[arg(long, value_name = "US", default_value_t = 10.0)]
    pub link_latency_us: f64,
    /// Network evaluations chained (1: one evaluation; 39: the released sampler's 20 steps)
    #[arg(long, value_name = "E", default_value_t = 1)]
    pub evaluations: usize,
    /// Column assignment: contiguous strips or cyclic
    #[arg(long, value_enum, value_name = "strips|cyclic", hide_possible_values = true, default_value_t = AssignArg::Strips)]
    pub assign: AssignArg,
    /// Block batch side n of each device's memory plan
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub block_batch: usize,
    /// Model config (default: the released model)
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// One JSON line per device count
    #[arg(long)]
    pub json: bool,
}

/// `infdit serve` (docs/serve.md).
#[derive(Debug, clap::Args)]
#[command(after_help = "The page is at http://ADDR/; the HTTP API: docs/api.md; the design and limits: docs/serve.md")]
pub struct ServeArgs {
    /// Address and port to listen on (port 0: any free port); beyond loopback, --token is required
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:7860")]
    pub bind: std::net::SocketAddr,
    /// Folder of the job database and the jobs' files [default: $XDG_DATA_HOME/infdit/serve, else
    /// ~/.local/share/infdit/serve]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value = "cpu", value_name = "DEVICE", help = DEVICE_HELP)]
    pub device: DeviceRequest,
    /// Network precision [default: f32 on the CPU, bf16 on a GPU]
    #[arg(long, value_enum, value_name = "f32|bf16|f16", hide_possible_values = true)]
    pub dtype: Option<DTypeArg>,
    /// Jobs run at once, sharing the model and splitting the memory budget [default: as many as the memory
    /// budget holds for a 1024x1024 input, at most 2 on the CPU and 4 on a GPU]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: Option<u32>,
    /// Bearer token required on every API call and on the page (or set INFDIT_TOKEN)
    #[arg(long, value_name = "SECRET")]
    pub token: Option<String>,
    /// Largest upload (K/M/G suffixes)
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, default_value = "32M")]
    pub max_upload: u64,
    /// Largest input image, in pixels
    #[arg(long, value_name = "N", default_value_t = 16 << 20)]
    pub max_pixels: u64,
    /// Most jobs queued or running at once; more uploads get 429
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_queue: usize,
    /// Uploads per minute per client address (0: no limit); more get 429
    #[arg(long, value_name = "N", default_value_t = 120)]
    pub rate_limit: u32,
    /// Finished jobs and their files are removed after this many hours
    #[arg(long, value_name = "H", default_value_t = 24.0)]
    pub keep_hours: f64,
    /// At most this many finished jobs are kept (the oldest are removed first)
    #[arg(long, value_name = "N", default_value_t = 500)]
    pub keep_jobs: usize,
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

/// Precision of the training products (`infdit train --matmul`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MatmulArg {
    /// bf16 operands, f32 sums (AMX tiles where the CPU has them, else f32).
    Bf16,
    /// f32 operands and sums.
    F32,
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
    /// UniBA block scheduler with a K/V cache; memory grows with the width (default).
    Blocks,
    /// The whole image in one forward (the official "full" mode); memory grows with the area.
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

/// Model selection shared by the subcommands that build a model (docs/cli.md, "Model selection").
#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// Checkpoint (official .pt, or safetensors in its layout) or `infdit train` folder [default: the
    /// built-in model]
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Model config, infdit or official JSON [default: the model folder's, else the released model's]
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// CLIP tower weights (open_clip or Hugging Face), when the checkpoint lacks them
    #[arg(long, value_name = "PATH")]
    pub clip: Option<PathBuf>,
}

/// Help headings of `infdit upscale --help` (docs/cli.md lists the flags in the same groups).
mod heading {
    pub const IO: &str = "Input and output";
    pub const MODEL: &str = "Model";
    pub const SIZE: &str = "Size";
    pub const SAMPLING: &str = "Sampling";
    pub const PERF: &str = "Performance and memory";
    pub const RESUME: &str = "Resume";
    pub const FORMAT: &str = "Output format and metadata";
    pub const PROGRESS: &str = "Progress and reporting";
}

/// `infdit upscale`. One line of help per flag, so that `--help` stays short (long help, or the
/// descriptions of enum values, would switch clap to its multi-line layout); the details are in
/// docs/cli.md. Enum flags show their values in the value name and hide clap's list.
#[derive(Debug, clap::Args)]
#[command(after_help = "Every flag in detail, the JSON events and the exit codes: docs/cli.md")]
pub struct UpscaleArgs {
    /// Input images (PNG, JPEG, WebP, TIFF, BMP), folders (searched recursively) and quoted globs
    #[arg(required = true, num_args = 1.., value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// Output image; with several inputs, a folder or a glob: the output folder (mirrors the inputs)
    #[arg(short, long, value_name = "PATH", help_heading = heading::IO)]
    pub output: PathBuf,
    /// Output file names in a batch, from {stem}, {ext} and {scale} [default: {stem}_{scale}.{ext}]
    #[arg(long, value_name = "TEMPLATE", help_heading = heading::IO)]
    pub name: Option<String>,
    /// Skip inputs whose output file already exists
    #[arg(long, help_heading = heading::IO)]
    pub skip_existing: bool,
    /// Print the plan (outputs, sizes, passes, block grids, memory); load no model, write nothing
    #[arg(long, help_heading = heading::IO)]
    pub dry_run: bool,
    /// Run shard K of N of the batch (K from 0), or auto: from a Slurm job array or a Kubernetes Indexed Job
    #[arg(long, value_name = "K/N|auto", value_parser = infdit::batch::parse_shard, help_heading = heading::IO)]
    pub shard: Option<infdit::batch::ShardSpec>,
    /// Set by `batch retry --run`: every shard's failed and missing files (not a flag).
    #[arg(skip)]
    pub retry_all: bool,
    /// Largest input accepted, in pixels (a guard against decompression bombs)
    #[arg(long, value_name = "N", default_value_t = 64 << 20, help_heading = heading::IO)]
    pub max_pixels: u64,
    #[command(flatten, next_help_heading = heading::MODEL)]
    pub model: ModelArgs,
    /// Any factor > 0: 4 native, 2 the official 2x mode, others by x4/x2 passes and a resize [default: 4]
    #[arg(long, value_name = "S", value_parser = parse_scale, conflicts_with_all = ["width", "height"],
          help_heading = heading::SIZE)]
    pub scale: Option<f64>,
    /// Output width in pixels (alone: the height keeps the aspect ratio)
    #[arg(long, value_name = "PX", value_parser = clap::value_parser!(u32).range(1..), help_heading = heading::SIZE)]
    pub width: Option<u32>,
    /// Output height in pixels (alone: the width keeps the aspect ratio)
    #[arg(long, value_name = "PX", value_parser = clap::value_parser!(u32).range(1..), help_heading = heading::SIZE)]
    pub height: Option<u32>,
    /// Fit the model's block grid by reflect padding (all pixels kept) or the official centre crop to a
    /// multiple of 32
    #[arg(long, value_enum, value_name = "pad|official", hide_possible_values = true,
          default_value_t = CropArg::Pad, help_heading = heading::SIZE)]
    pub crop: CropArg,
    /// Seed of the initial noise
    #[arg(long, default_value_t = 0, help_heading = heading::SAMPLING)]
    pub seed: u64,
    /// Initial noise from a safetensors file (key `eps`, the output's shape) instead of the seed
    #[arg(long, value_name = "FILE", help_heading = heading::SAMPLING)]
    pub noise: Option<PathBuf>,
    /// Sampler steps [default: the model's own, else 20 (39 network evaluations)]
    #[arg(long, value_name = "N", help_heading = heading::SAMPLING)]
    pub steps: Option<usize>,
    /// Self-ensemble: average N runs on mirrored/transposed inputs (1, 2, 4 or 8; N times the time) [default: the model's own (the built-in model's: 2), else 1]
    #[arg(long, value_name = "N", help_heading = heading::SAMPLING)]
    pub ensemble: Option<usize>,
    /// Starting sigma of the sampler [default: the model's own, else 40]
    #[arg(long, value_name = "S", help_heading = heading::SAMPLING)]
    pub sigma_max: Option<f32>,
    /// Bicubic kernel of the input preparation: antialiased (torchvision >= 0.17) or classic
    #[arg(long, value_enum, value_name = "antialias|classic", hide_possible_values = true,
          default_value_t = ResizeArg::Antialias, help_heading = heading::SAMPLING)]
    pub resize: ResizeArg,
    /// Alpha plane: bicubic to the output size, through the model's passes (twice the model time), or
    /// dropped (flattened on --background; needed for JPEG output)
    #[arg(long, value_enum, value_name = "bicubic|model|drop", hide_possible_values = true,
          default_value_t = AlphaArg::Bicubic, help_heading = heading::SAMPLING)]
    pub alpha: AlphaArg,
    /// Background colour for --alpha drop, as RRGGBB hex
    #[arg(long, value_name = "RRGGBB", value_parser = parse_colour, default_value = "ffffff",
          help_heading = heading::SAMPLING)]
    pub background: [u8; 3],
    #[arg(long, default_value = "cpu", value_name = "DEVICE", help = DEVICE_HELP, help_heading = heading::PERF)]
    pub device: DeviceRequest,
    /// Network precision [default: f32 on the CPU, bf16 on a GPU]
    #[arg(long, value_enum, value_name = "f32|bf16|f16", hide_possible_values = true, help_heading = heading::PERF)]
    pub dtype: Option<DTypeArg>,
    /// Block scheduler (memory grows with the width) or whole image (the official "full" mode)
    #[arg(long, value_enum, value_name = "blocks|whole", hide_possible_values = true,
          default_value_t = ModeArg::Blocks, help_heading = heading::PERF)]
    pub mode: ModeArg,
    /// Blocks per batch side [default: the largest n that fits --max-memory; CPU: at most 4096 tokens
    /// a forward]
    #[arg(long, value_name = "N", help_heading = heading::PERF)]
    pub block_batch: Option<usize>,
    /// Memory budget that picks --block-batch (K/M/G/T) [default: half the available memory, at most
    /// 8G; GPU: 90% of the free memory - 512M]
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes, help_heading = heading::PERF)]
    pub max_memory: Option<u64>,
    /// Precision of the keys/values the block scheduler caches between batches [default: --dtype's]
    #[arg(long, value_enum, value_name = "f32|bf16|f16", hide_possible_values = true, help_heading = heading::PERF)]
    pub kv_dtype: Option<DTypeArg>,
    /// GPU: keep the scheduler's K/V cache in host memory, so GPU memory does not grow with the output
    #[arg(long, help_heading = heading::PERF)]
    pub kv_offload: bool,
    /// Keep the sampler's image-size state (36 bytes a pixel) in files in DIR, not in memory (block mode)
    #[arg(long, value_name = "DIR", help_heading = heading::PERF)]
    pub state_dir: Option<PathBuf>,
    /// Save the sampler state in DIR after each step; rerun the same command to resume
    #[arg(long, value_name = "DIR", help_heading = heading::RESUME)]
    pub checkpoint_dir: Option<PathBuf>,
    /// Output format in a batch [default: the input's when writable, else png]
    #[arg(long, value_enum, value_name = "png|jpeg|webp|tiff", hide_possible_values = true, help_heading = heading::FORMAT)]
    pub format: Option<FormatArg>,
    /// 8-bit samples: round to nearest, or truncate like the official script (bit-exact comparisons)
    #[arg(long, value_enum, value_name = "nearest|truncate", hide_possible_values = true,
          default_value_t = RoundingArg::Nearest, help_heading = heading::FORMAT)]
    pub rounding: RoundingArg,
    /// JPEG output quality (1-100)
    #[arg(long, value_name = "Q", default_value_t = 95, value_parser = clap::value_parser!(u8).range(1..=100),
          help_heading = heading::FORMAT)]
    pub jpeg_quality: u8,
    /// Drop the input's ICC profile and EXIF instead of carrying them over
    #[arg(long, help_heading = heading::FORMAT)]
    pub strip_metadata: bool,
    /// Print the memory plan and the chosen settings
    #[arg(long, short, help_heading = heading::PROGRESS)]
    pub verbose: bool,
    /// No progress bars, no "wrote" lines, no summary (errors are still printed)
    #[arg(long, short, help_heading = heading::PROGRESS)]
    pub quiet: bool,
    /// Progress as JSON lines on standard output instead of bars (events: docs/cli.md)
    #[arg(long, help_heading = heading::PROGRESS)]
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
    /// Training steps (sampling, forward, backward, AdamW) with the fast backward (f32 products, and
    /// bf16 products where the CPU has AMX) and with plain candle autograd, for the built-in training
    /// config (or --config) and a larger one; prints crops/s, GFLOP/s and the ratios.
    Train,
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
    /// The degradation factor: each HR image is downscaled by it (antialiased bicubic, 8-bit) and
    /// upscaled back to its size by the model's whole plan (passes, then a resize), and by bicubic.
    #[arg(long, value_name = "S", default_value_t = 4.0)]
    pub scale: f64,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Blocks per batch side for the scheduler [default: as `infdit upscale` picks it, from the memory
    /// plan; the results are the same, only the time differs].
    #[arg(long, value_name = "N")]
    pub block_batch: Option<usize>,
    /// Self-ensemble of the model's upscales: average N runs on mirrored/transposed inputs (1, 2, 4, 8) [default: the model's own (the built-in model's: 2), else 1].
    #[arg(long, value_name = "N")]
    pub ensemble: Option<usize>,
    /// Evaluate at most this many images.
    #[arg(long, value_name = "K")]
    pub limit: Option<usize>,
    /// Also write each model output as PNG into this folder (`{stem}.png`), with the LR input,
    /// the bicubic baseline and the HR reference beside it (`{stem}_lr.png`, `_bicubic`, `_hr`).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Also score another upscaler's outputs of the same LR inputs (the `_lr.png` files that --out-dir
    /// writes): DIR/{stem}.png for each HR image, 4x the LR, scored like the model and shown in the
    /// comparison table as NAME. An optional DIR/times.tsv (`stem<TAB>seconds` lines) gives its seconds.
    /// Repeatable.
    #[arg(long, value_name = "NAME=DIR")]
    pub peer: Vec<String>,
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
    /// Probability that an HR crop is first softened (a random Gaussian or short motion blur), so the model also learns soft photos.
    #[arg(long, default_value_t = 0.0)]
    pub soften_prob: f64,
    /// Downscale training images so their longer side is at most this many pixels when loaded (0: keep).
    #[arg(long, default_value_t = 0)]
    pub max_side: usize,
    /// Seed of every random draw (crops, degradations, sigmas, noise).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Precision of the training products on the CPU: bf16 (operands rounded to bf16, sums in f32, on
    /// AMX tiles where the CPU has them, else f32) or f32. A run resumes with the setting it started with.
    #[arg(long, value_enum, default_value_t = MatmulArg::Bf16)]
    pub matmul: MatmulArg,
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
    /// Where the network trains: cpu, cuda or cuda:N (a CUDA build; on a GPU in f32 through candle's
    /// autograd, the examples still drawn on the CPU). A run resumes on another device, not bit for bit.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: DeviceRequest,
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
