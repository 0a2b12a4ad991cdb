//! `infdit upscale`: image files in, upscaled files out, with any size, alpha, 16-bit and
//! metadata kept; one file, or batches of files, folders and globs; any scale factor or output
//! size through repeated x4/x2 passes and an antialiased downscale; Ctrl-C stops cleanly.

mod inputs;
mod progress;
mod scale;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use infdit::device::OpenedDevice;
use infdit::diffusion::HeunConfig;
use infdit::diffusion::noise::Noise;
use infdit::imageio::resize::{Bicubic, center_crop_offsets, resize_tensor};
use infdit::imageio::{LoadLimits, SaveOptions, crop, fill_transparent, load_image, save_image_atomic};
use infdit::model::blocks::BlockGrid;
use infdit::pipeline::{
    Mode, Model, OutputCrop, PassScale, SampleOptions, prepare_official, prepare_padded, sample_with_noise,
};
use infdit::schedule::{MemoryPlan, Placement};
use infdit::{InfditError, ModelConfig};

use self::inputs::{Template, canonical_target, collect, is_batch, output_extension};
use self::progress::Reporter;
use self::scale::{PassGeometry, Target, geometry, plan_passes};
use super::{dtype, heun_config, load_model, model_config, model_label, open_device, run_dtype, sampler_defaults};
use crate::args::{AlphaArg, CropArg, ModeArg, ResizeArg, UpscaleArgs};

/// Exit code of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: u8 = 130;

fn load_noise(path: &Path, h: usize, w: usize) -> Result<Tensor> {
    let mut t = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("{}: cannot read the noise file", path.display()))?;
    let eps = t.remove("eps").with_context(|| format!("{}: no tensor named 'eps'", path.display()))?;
    if eps.dims() != [1, 3, h, w] {
        bail!("{}: eps has shape {:?}, the output needs (1, 3, {h}, {w})", path.display(), eps.dims());
    }
    Ok(eps.to_dtype(DType::F32)?)
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

/// Whether the output format (by extension) stores 16-bit samples.
fn holds_16_bits(out: &Path) -> bool {
    let ext = out.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    matches!(ext.as_str(), "png" | "tif" | "tiff")
}

/// The seed of pass `k`'s noise: the user's seed for the first pass (so a one-pass run is
/// unchanged), a different stream for each later pass.
fn pass_seed(seed: u64, k: u64) -> u64 {
    seed.wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

fn pass_name(p: PassScale) -> &'static str {
    match p {
        PassScale::X4 => "x4",
        PassScale::X2 => "x2",
    }
}

/// Settings shared by every file of a run, validated once.
struct Settings {
    /// Where the network runs.
    device: OpenedDevice,
    target: Target,
    kind: Bicubic,
    act: DType,
    kv_dtype: DType,
    heun: HeunConfig,
    budget: usize,
    limits: LoadLimits,
    official: bool,
    batch: bool,
    cancel: Arc<AtomicBool>,
}

/// One file to upscale.
#[derive(Debug, Clone)]
struct Job {
    input: PathBuf,
    output: PathBuf,
    /// The output relative to the output folder (batches), which also names its checkpoint folder.
    rel_out: Option<PathBuf>,
    /// Why the job cannot run, found while planning (output collisions, output is an input).
    error: Option<String>,
}

/// How each network evaluation of a pass runs, and its memory plan.
fn choose_mode(
    a: &UpscaleArgs,
    cfg: &ModelConfig,
    params: usize,
    grid: &BlockGrid,
    s: &Settings,
) -> Result<(Mode, MemoryPlan)> {
    let dit = &cfg.dit;
    // The plan counts the sampler state in a state folder, not in memory, with --state-dir; on a
    // GPU it is a plan of GPU memory (the sampler state and images are in host memory, and with
    // --kv-offload the K/V cache too).
    let placed = Placement { gpu: s.device.is_gpu(), kv_offload: a.kv_offload, state_dir: a.state_dir.is_some() };
    let plan = |n: Option<usize>| MemoryPlan::estimate_placed(dit, params, grid, n, s.act, s.kv_dtype, placed);
    Ok(match a.mode {
        ModeArg::Whole => (Mode::WholeImage, plan(None)),
        ModeArg::Blocks => {
            let n = match a.block_batch {
                Some(n) => n,
                None => MemoryPlan::default_batch(dit, params, grid, s.act, s.kv_dtype, s.budget, placed)
                    .with_context(|| {
                        format!(
                            "even --block-batch 1 needs about {}, above the memory budget of {} bytes",
                            plan(Some(1)),
                            s.budget
                        )
                    })?,
            };
            let plan = plan(Some(n));
            (Mode::Blocks { block_batch: n, kv_dtype: s.kv_dtype }, plan)
        }
    })
}

/// The passes for an input of `w x h` and the final output size.
fn passes_for(s: &Settings, w: usize, h: usize, block_px: usize) -> Result<(Vec<PassGeometry>, (usize, usize))> {
    if s.official {
        let pass = match s.target {
            Target::Factor(4.0) => PassScale::X4,
            Target::Factor(2.0) => PassScale::X2,
            _ => bail!("--crop official works with --scale 4 or 2 only"),
        };
        let g = geometry(w, h, &[pass], block_px, true);
        if g[0].grid.0 == 0 || g[0].grid.1 == 0 {
            bail!("image {w}x{h} is smaller than 32 px on a side (needed by --crop official)");
        }
        let out = g[0].output;
        return Ok((g, out));
    }
    let (tw, th) = s.target.output_size(w, h)?;
    Ok((geometry(w, h, &plan_passes(w, h, tw, th), block_px, false), (tw, th)))
}

/// Network evaluations x blocks over all passes (the progress units), twice when the alpha plane
/// goes through the model too.
fn work_of(s: &Settings, passes: &[PassGeometry], alpha_model: bool) -> u64 {
    let colour: u64 = passes.iter().map(|p| (s.heun.evaluations() * p.grid.0 * p.grid.1) as u64).sum();
    if alpha_model { 2 * colour } else { colour }
}

/// Width and height of an image file from its header, EXIF orientation applied, and whether it
/// has an alpha channel, without decoding the pixels.
fn probe(path: &Path, max_pixels: u64) -> Result<(usize, usize, bool)> {
    use image::ImageDecoder;
    use image::metadata::Orientation;
    let file = std::fs::File::open(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let mut reader = image::ImageReader::new(std::io::BufReader::new(file));
    if let Ok(f) = image::ImageFormat::from_path(path) {
        reader.set_format(f);
    }
    let reader = reader.with_guessed_format().map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let mut dec =
        reader.into_decoder().map_err(|e| anyhow!("{}: cannot read the image header: {e}", path.display()))?;
    let (w, h) = dec.dimensions();
    let has_alpha = dec.color_type().has_alpha();
    let turned = matches!(
        dec.orientation().unwrap_or(Orientation::NoTransforms),
        Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH
    );
    let (w, h) = if turned { (h as usize, w as usize) } else { (w as usize, h as usize) };
    if w == 0 || h == 0 {
        bail!("{}: image has zero size ({w} x {h})", path.display());
    }
    if (w as u64) * (h as u64) > max_pixels {
        bail!("{}: image is {w} x {h} = {} pixels, above the limit of {max_pixels}", path.display(), w * h);
    }
    Ok((w, h, has_alpha))
}

/// The one-line message of a file's failure, naming the input when the error does not.
fn file_error(input: &Path, e: &anyhow::Error) -> String {
    // The error chain on one line, leaving out causes the message above already quotes.
    let mut msg = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if msg.is_empty() {
            msg = c;
        } else if !msg.contains(&c) {
            msg = format!("{msg}: {c}");
        }
    }
    let name = input.display().to_string();
    if msg.contains(&name) { msg } else { format!("{name}: {msg}") }
}

fn is_interrupted(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<InfditError>(), Some(InfditError::Interrupted { .. }))
}

/// Builds the list of jobs: the single file, or every input found with its mirrored output.
fn plan_jobs(a: &UpscaleArgs, s: &Settings) -> Result<(Vec<Job>, Vec<String>)> {
    if !s.batch {
        let input = a.inputs[0].clone();
        let mut job = Job { input: input.clone(), output: a.output.clone(), rel_out: None, error: None };
        if canonical_target(&input) == canonical_target(&a.output) {
            job.error =
                Some(format!("{}: the output path is the input image; refusing to overwrite it", a.output.display()));
        }
        return Ok((vec![job], Vec::new()));
    }
    if a.output.exists() && !a.output.is_dir() {
        bail!(
            "{}: is a file; with several inputs, a folder or a pattern, -o must be a folder (it mirrors the input tree)",
            a.output.display()
        );
    }
    let template = match &a.name {
        Some(t) => Template::parse(t)?,
        None => Template::default_template(),
    };
    let found = collect(&a.inputs, Some(&a.output));
    let token = s.target.token();
    let inputs: HashMap<PathBuf, PathBuf> =
        found.sources.iter().map(|src| (canonical_target(&src.path), src.path.clone())).collect();
    let mut outputs: HashMap<PathBuf, PathBuf> = HashMap::new();
    let mut jobs = Vec::with_capacity(found.sources.len());
    for src in found.sources {
        let stem = src.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let ext = output_extension(&src.path, a.format.map(|f| f.extension()));
        let name = template.render(&stem, &ext, &token);
        let rel_out = src.rel.parent().map_or_else(|| PathBuf::from(&name), |p| p.join(&name));
        let output = a.output.join(&rel_out);
        let target = canonical_target(&output);
        let mut error = None;
        if let Some(i) = inputs.get(&target) {
            error = Some(format!(
                "{}: the output {} is the input {}; refusing to overwrite it (change -o or --name)",
                src.path.display(),
                output.display(),
                i.display()
            ));
        } else if let Some(first) = outputs.get(&target) {
            error = Some(format!(
                "{}: its output {} is also the output of {}; use a --name template that tells them apart",
                src.path.display(),
                output.display(),
                first.display()
            ));
        } else {
            outputs.insert(target, src.path.clone());
        }
        jobs.push(Job { input: src.path, output, rel_out: Some(rel_out), error });
    }
    Ok((jobs, found.errors))
}

pub(crate) fn upscale(a: UpscaleArgs) -> Result<ExitCode> {
    if a.block_batch == Some(0) {
        bail!("--block-batch must be at least 1");
    }
    let target = match (a.scale, a.width, a.height) {
        (Some(f), _, _) => Target::Factor(f),
        (None, None, None) => Target::Factor(4.0),
        (None, width, height) => Target::Size { width, height },
    };
    let batch = is_batch(&a.inputs) || a.output.is_dir();
    if !batch && a.name.is_some() {
        bail!("--name applies when -o is a folder (several inputs, a folder or a pattern); here -o names the file");
    }
    if !batch && a.format.is_some() {
        bail!("--format applies when -o is a folder; for one file the extension of -o picks the format");
    }
    let official = a.crop == CropArg::Official;
    if official && !matches!(target, Target::Factor(f) if f == 4.0 || f == 2.0) {
        bail!("--crop official works with --scale 4 or 2 only");
    }
    if a.kv_offload && a.mode == ModeArg::Whole {
        bail!("--kv-offload is for the block scheduler (--mode blocks): whole-image mode has no K/V cache");
    }
    let device = open_device(a.device)?;
    let act = run_dtype(a.dtype, &device);
    // The memory budget: of host memory on the CPU, of GPU memory on a GPU.
    let budget = match (a.max_memory, infdit::device::gpu_memory(&device.device)) {
        (Some(b), _) => b,
        (None, Some((free, _))) => infdit::device::default_gpu_budget(free),
        (None, None) => default_memory_budget(),
    };
    let s = Settings {
        device,
        target,
        kind: match a.resize {
            ResizeArg::Antialias => Bicubic::Antialias,
            ResizeArg::Classic => Bicubic::Classic,
        },
        act,
        kv_dtype: a.kv_dtype.map(dtype).unwrap_or(act),
        heun: heun_config(sampler_defaults(&a.model)?, a.steps, a.sigma_max)?,
        budget: budget as usize,
        limits: LoadLimits::for_pixels(a.max_pixels),
        official,
        batch,
        cancel: Arc::new(AtomicBool::new(false)),
    };
    let (jobs, errors) = plan_jobs(&a, &s)?;
    if batch && jobs.is_empty() && !errors.is_empty() {
        for e in &errors {
            eprintln!("error: {e}");
        }
        bail!("no input images");
    }
    let cfg = model_config(&a.model)?;
    if a.dry_run {
        return dry_run(&a, &s, &cfg, &jobs, &errors);
    }
    if a.verbose {
        let bf = |b: usize| b as f64 / (1u64 << 30) as f64;
        let mem = match infdit::device::gpu_memory(&s.device.device) {
            Some((free, total)) => {
                format!(", {:.1} of {:.1} GiB GPU memory free", bf(free as usize), bf(total as usize))
            }
            None => String::new(),
        };
        eprintln!(
            "device: {}, network dtype {act:?}, K/V cache {:?}{}{mem}; memory budget {:.1} GiB",
            s.device.describe(),
            s.kv_dtype,
            if a.kv_offload { " in host memory (--kv-offload)" } else { "" },
            bf(s.budget)
        );
    }
    if !s.device.is_gpu()
        && !a.quiet
        && let Some(why) = cpu_dtype_note(act, infdit::kernels::bf16_gemm::available())
    {
        eprintln!("note: {why}; use it to save memory, not time");
    }
    let flag = s.cancel.clone();
    let quiet = a.quiet;
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            // Second Ctrl-C: quit at once. An output is still never partial (it appears by a
            // rename), though a write under way may leave its hidden `.partial` file behind.
            std::process::exit(EXIT_INTERRUPTED as i32);
        }
        if !quiet {
            eprintln!("\ninterrupt: stopping at the next network evaluation (press Ctrl-C again to quit at once)");
        }
    })
    .context("cannot install the Ctrl-C handler")?;

    // Sizes from the headers, for the batch bar's total.
    let works: Vec<u64> = jobs
        .iter()
        .map(|j| {
            probe(&j.input, a.max_pixels)
                .and_then(|(w, h, alpha)| Ok((passes_for(&s, w, h, cfg.dit.block_px)?.0, alpha)))
                .map_or(0, |(g, alpha)| work_of(&s, &g, alpha && a.alpha == AlphaArg::Model))
        })
        .collect();
    let mut rep = Reporter::new(a.quiet, a.json, batch, jobs.len(), works.iter().sum());
    for e in &errors {
        rep.line(&format!("error: {e}"));
    }
    let mut model: Option<Model> = None;
    let (mut done, mut skipped, mut failed) = (0usize, 0usize, errors.len());
    let mut interrupted = false;
    let mut not_done = 0;
    for (i, job) in jobs.iter().enumerate() {
        if s.cancel.load(Ordering::SeqCst) {
            interrupted = true;
            not_done = jobs.len() - i;
            break;
        }
        rep.begin_file(i, job.input.display().to_string(), works[i]);
        if let Some(e) = &job.error {
            rep.emit(json!({"event": "failed", "input": job.input.display().to_string(), "error": e}));
            rep.line(&format!("error: {e}"));
            failed += 1;
            rep.end_file();
            continue;
        }
        if a.skip_existing && job.output.exists() {
            rep.emit(json!({
                "event": "skipped",
                "input": job.input.display().to_string(),
                "output": job.output.display().to_string(),
                "reason": "output exists",
            }));
            if rep.chatty() && (!batch || a.verbose) {
                rep.line(&format!("skipped {}: {} exists", job.input.display(), job.output.display()));
            }
            skipped += 1;
            rep.end_file();
            continue;
        }
        match upscale_file(&a, &s, &cfg, job, &mut model, &mut rep) {
            Ok((w, h)) => {
                done += 1;
                if rep.chatty() {
                    if !batch {
                        rep.finish();
                    }
                    rep.line(&format!("wrote {} ({w}x{h})", job.output.display()));
                }
            }
            Err(e) if is_interrupted(&e) => {
                interrupted = true;
                not_done = jobs.len() - i;
                rep.emit(json!({"event": "interrupted", "input": job.input.display().to_string()}));
                let resume = match &a.checkpoint_dir {
                    Some(d) => format!("; its last completed step is kept in {}: rerun to resume", d.display()),
                    None => "; its output was not written".into(),
                };
                rep.line(&format!("interrupted while upscaling {}{resume}", job.input.display()));
                break;
            }
            Err(e) if e.downcast_ref::<ModelLoadError>().is_some() => return Err(e),
            Err(e) => {
                let msg = file_error(&job.input, &e);
                rep.emit(json!({"event": "failed", "input": job.input.display().to_string(), "error": msg}));
                rep.line(&format!("error: {msg}"));
                failed += 1;
            }
        }
        rep.end_file();
    }
    rep.finish();
    if batch {
        rep.emit_run(json!({
            "event": "summary",
            "done": done,
            "skipped": skipped,
            "failed": failed,
            "interrupted": interrupted,
            "not_done": not_done,
        }));
        if rep.chatty() {
            let stop = if interrupted { format!(", interrupted ({not_done} not done)") } else { String::new() };
            eprintln!("{done} done, {skipped} skipped, {failed} failed{stop}");
        }
    }
    Ok(if interrupted {
        ExitCode::from(EXIT_INTERRUPTED)
    } else if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// A model that cannot be loaded stops the whole run, not just one file.
#[derive(Debug)]
struct ModelLoadError(anyhow::Error);

impl std::fmt::Display for ModelLoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for ModelLoadError {}

/// Folder of the sampler state of a file's pass `k` (None without --checkpoint-dir): the
/// checkpoint folder itself for the first pass of a single file; in a batch, the file's own
/// folder `<DIR>/<output relative to -o>.state`; later passes in `pass<k+1>` below it.
fn state_dir(a: &UpscaleArgs, job: &Job) -> Option<PathBuf> {
    let d = a.checkpoint_dir.as_ref()?;
    Some(match &job.rel_out {
        Some(rel) => d.join(format!("{}.state", rel.display())),
        None => d.clone(),
    })
}

/// The stream index of the alpha plane's first pass: its noise seeds, `pass_seed(seed,
/// ALPHA_STREAM + k)`, never equal the colour's `pass_seed(seed, k)` (the multiplier is odd).
const ALPHA_STREAM: u64 = 1 << 32;

/// The alpha plane (1, 1, H, W) in [0, 1] as the gray RGB image (1, 3, H, W) in [-1, 1] that the
/// model passes take.
fn alpha_to_image(alpha: &Tensor) -> Result<Tensor> {
    Ok(alpha.to_dtype(DType::F32)?.affine(2.0, -1.0)?.repeat((1, 3, 1, 1))?)
}

/// The model's output for the alpha plane back to alpha: the mean of its channels, in [0, 1].
fn image_to_alpha(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(DType::F32)?.mean_keepdim(1)?.affine(0.5, 0.5)?.clamp(0f32, 1f32)?)
}

/// What one file's model passes share, for the colour and the alpha plane alike.
struct FileRun<'a> {
    a: &'a UpscaleArgs,
    s: &'a Settings,
    cfg: &'a ModelConfig,
    model: &'a Model,
    params: usize,
    name: String,
    passes: &'a [PassGeometry],
    /// Block evaluations of each pass (the progress units).
    work: &'a [u64],
    /// The output size.
    target: (usize, usize),
    /// Model passes of the file, the alpha plane's included (progress).
    total_passes: usize,
}

/// One image run through a file's passes: the colour, or the alpha plane as a gray image.
struct PlaneRun<'a> {
    /// The alpha plane's passes (progress, --verbose).
    alpha: bool,
    /// Seed stream of the first pass (pass `k` draws noise from `pass_seed(seed, stream + k)`).
    stream: u64,
    /// Noise of the (single) pass from a file (--noise, colour only).
    noise: Option<&'a Path>,
    /// Folder of the sampler state (--checkpoint-dir).
    state: Option<PathBuf>,
    /// Also save the last pass's output in `state`, as more work follows it.
    keep_last: bool,
    /// Index of the first pass among the file's passes, and the work done before it (progress).
    first_pass: usize,
    work_offset: u64,
}

impl PlaneRun<'_> {
    fn pass_dir(&self, k: usize) -> Option<PathBuf> {
        self.state.as_ref().map(|b| if k == 0 { b.clone() } else { b.join(format!("pass{}", k + 1)) })
    }

    fn pass_output(&self, k: usize) -> Option<PathBuf> {
        self.state.as_ref().map(|b| b.join(format!("pass{}-output.safetensors", k + 1)))
    }

    /// Removes the saved pass outputs and the emptied pass folders of a finished file.
    fn clean(&self, passes: usize) {
        if let Some(b) = &self.state {
            for k in 0..passes {
                if let Some(f) = self.pass_output(k) {
                    let _ = std::fs::remove_file(f);
                }
                if k > 0 {
                    let _ = std::fs::remove_dir(b.join(format!("pass{}", k + 1)));
                }
            }
        }
    }
}

/// Runs `x` (1, 3, H, W) in [-1, 1] through the file's passes (resuming after the last saved
/// one), then resizes it to the output size; returns the result in [-1, 1] (unclamped when the
/// last pass gives the output size, as the output conversion clamps).
fn run_passes(f: &FileRun, p: &PlaneRun, mut x: Tensor, rep: &mut Reporter) -> Result<Tensor> {
    let (a, s, passes) = (f.a, f.s, f.passes);
    let bp = f.cfg.dit.block_px;
    let (tw, th) = f.target;
    let last = passes.len() - 1;
    // Saved pass outputs: every pass before the last, and the last one too when work follows.
    let saved = if p.keep_last { passes.len() } else { last };
    let seed = pass_seed(a.seed, p.stream);
    let fingerprint = if p.state.is_some() && saved > 0 {
        Some(passes_fingerprint(a, s, f.cfg, seed, p.noise, &x, passes)?)
    } else {
        None
    };

    // Resume after the last finished pass whose output was saved.
    let mut first = 0;
    if let Some(fp) = &fingerprint {
        for k in (0..saved).rev() {
            let file = p.pass_output(k).expect("with a checkpoint folder");
            if let Some(infdit::resume::SavedState { x: Some(t), .. }) = infdit::resume::load_state(&file, fp)? {
                x = t;
                first = k + 1;
                break;
            }
        }
    }
    let mut offset = p.work_offset + f.work[..first].iter().sum::<u64>();
    for (k, pass) in passes.iter().enumerate().skip(first) {
        if s.cancel.load(Ordering::SeqCst) {
            return Err(InfditError::Interrupted { steps_done: 0 }.into());
        }
        let (prep, out_crop, clip_input) = if s.official {
            let pr = prepare_official(&x, pass.scale, bp, s.kind)?;
            let c = OutputCrop { top: 0, left: 0, height: pr.grid.height(), width: pr.grid.width() };
            let clip_input = pr.lr.clone();
            (pr, c, clip_input)
        } else {
            prepare_padded(&x, pass.scale, bp, s.kind)?
        };
        let (h, w) = (prep.grid.height(), prep.grid.width());
        // Seeded noise is drawn block by block inside the sampler (the same values as image_noise).
        let noise = match p.noise {
            Some(file) => Noise::Image(load_noise(file, h, w)?),
            None => Noise::Seeded(pass_seed(a.seed, p.stream + k as u64)),
        };
        let clip = f.model.clip_vector(&clip_input, s.kind)?;
        let (mode, plan) = choose_mode(a, &f.model.cfg, f.params, &prep.grid, s)?;
        if a.verbose {
            rep.line(&format!(
                "{} {}pass {}/{} ({}): {}x{} -> {}x{} (model output {w}x{h}: {} x {} blocks), mode {mode:?}, budget {:.1} MiB",
                f.name,
                if p.alpha { "alpha " } else { "" },
                k + 1,
                passes.len(),
                pass_name(pass.scale),
                pass.input.0,
                pass.input.1,
                out_crop.width,
                out_crop.height,
                prep.grid.rows,
                prep.grid.cols,
                s.budget as f64 / (1u64 << 20) as f64
            ));
            let what = if s.device.is_gpu() { "GPU memory plan" } else { "memory plan" };
            rep.line(&format!("{what}: {plan}"));
        }
        let opts = SampleOptions {
            heun: s.heun,
            mode,
            checkpoint_dir: p.pass_dir(k),
            stop_after_steps: None,
            cancel: Some(s.cancel.clone()),
            // One state folder per output file, plane and pass (a resumed run finds its own).
            state_dir: a.state_dir.as_ref().map(|d| {
                let stem = Path::new(&f.name).file_name().map_or_else(|| "image".into(), |n| n.to_string_lossy());
                d.join(format!("{stem}.{}.pass{}", if p.alpha { "alpha" } else { "colour" }, k + 1))
            }),
            kv_offload: a.kv_offload,
        };
        let (index, n) = (p.first_pass + k, f.total_passes);
        let out = sample_with_noise(f.model, &prep, &clip, &noise, &opts, &mut |pr| {
            rep.sample(index, n, offset, p.alpha, &pr)
        })?;
        if a.verbose && out.resumed_from > 0 {
            rep.line(&format!("resumed from step {}", out.resumed_from));
        }
        // With a state folder the result is read back from its file; the finished image itself is
        // held in memory for the crop, the next pass and the encoder.
        let y = match out.sample {
            Some(y) => y,
            None => out.final_sample.context("sampling stopped before the last step")?.to_tensor()?,
        };
        // Whole-image mode leaves the result on the model's device; the rest is done on the CPU.
        let y = y.to_device(&Device::Cpu)?;
        x = crop(&y, out_crop.top, out_crop.left, out_crop.height, out_crop.width)?;
        if k < last || (out_crop.width, out_crop.height) != (tw, th) {
            // The next pass and the resize expect images in [-1, 1].
            x = x.clamp(-1f32, 1f32)?;
        }
        if k < saved
            && let (Some(file), Some(fp)) = (p.pass_output(k), &fingerprint)
        {
            infdit::resume::save_state(&file, Some(&x), k + 1, fp)?;
        }
        offset += f.work[k];
    }
    let (_, _, h, w) = x.dims4()?;
    if (w, h) != (tw, th) {
        // The exact size: an antialiased bicubic downscale of the last pass.
        x = resize_tensor(&x, th, tw, Bicubic::Antialias)?.clamp(-1f32, 1f32)?;
    }
    Ok(x)
}

/// Upscales one file; returns the size written.
fn upscale_file(
    a: &UpscaleArgs,
    s: &Settings,
    cfg: &ModelConfig,
    job: &Job,
    model: &mut Option<Model>,
    rep: &mut Reporter,
) -> Result<(usize, usize)> {
    let dev = s.device.device.clone();
    let loaded = load_image(&job.input, &s.limits)?;
    // Colour under fully transparent pixels is arbitrary; fill it from the visible neighbours so
    // it does not bleed into the upscaled edges.
    let rgb = match &loaded.alpha {
        Some(al) => fill_transparent(&loaded.rgb, al)?,
        None => loaded.rgb.clone(),
    };
    let (_, _, h0, w0) = rgb.dims4()?;
    let bp = cfg.dit.block_px;
    let (passes, (tw, th)) = passes_for(s, w0, h0, bp)?;
    if a.noise.is_some() && passes.len() > 1 {
        bail!("--noise needs a single model pass (--scale 4 or 2); this output takes {}", passes.len());
    }
    let alpha_model = loaded.alpha.is_some() && a.alpha == AlphaArg::Model;
    let work: Vec<u64> = passes.iter().map(|p| (s.heun.evaluations() * p.grid.0 * p.grid.1) as u64).collect();
    let colour_work: u64 = work.iter().sum();
    let total_work = work_of(s, &passes, alpha_model);
    rep.begin_image(format!("{} -> {tw}x{th}", job.input.display()), total_work);
    let pass_list = passes
        .iter()
        .map(|p| json!({"scale": p.scale.factor(), "blocks": p.grid.0 * p.grid.1, "width": p.output.0, "height": p.output.1}))
        .collect::<Vec<_>>();
    rep.emit(json!({
        "event": "start",
        "input": job.input.display().to_string(),
        "output": job.output.display().to_string(),
        "width": tw,
        "height": th,
        "blocks": passes[0].grid.0 * passes[0].grid.1,
        "steps": s.heun.steps,
        "evaluations": s.heun.evaluations(),
        "passes": pass_list,
        "alpha": loaded.alpha.as_ref().map(|_| alpha_name(a.alpha)),
        "alpha_passes": if alpha_model { pass_list.clone() } else { Vec::new() },
        "work": total_work,
    }));
    if model.is_none() {
        if a.model.model.is_none() && !a.quiet {
            rep.line(
                "note: using the small model built into infdit (1.3M parameters, trained for about an hour on a CPU; \
                 a little better than bicubic, see models/default/MODEL_CARD.md); give the released checkpoint \
                 with --model for the paper's quality",
            );
        }
        *model = Some(load_model(&a.model, s.act, &dev).map_err(|e| anyhow::Error::new(ModelLoadError(e)))?);
    }
    let model = model.as_ref().expect("loaded above");
    let f = FileRun {
        a,
        s,
        cfg,
        model,
        params: Model::parameter_count(&model.cfg)?,
        name: job.input.display().to_string(),
        passes: &passes,
        work: &work,
        target: (tw, th),
        total_passes: if alpha_model { 2 * passes.len() } else { passes.len() },
    };
    let base = state_dir(a, job);
    let colour = PlaneRun {
        alpha: false,
        stream: 0,
        noise: a.noise.as_deref(),
        state: base.clone(),
        keep_last: alpha_model,
        first_pass: 0,
        work_offset: 0,
    };
    let x = run_passes(&f, &colour, rgb, rep)?;
    // The alpha plane is upscaled on its own: through the model as a gray image (its own noise
    // and state folder), or bicubic from the input straight to the output size; in [0, 1].
    let alpha_run = PlaneRun {
        alpha: true,
        stream: ALPHA_STREAM,
        noise: None,
        state: base.as_ref().map(|b| b.join("alpha")),
        keep_last: false,
        first_pass: passes.len(),
        work_offset: colour_work,
    };
    let alpha = match &loaded.alpha {
        Some(al) if alpha_model => Some(image_to_alpha(&run_passes(&f, &alpha_run, alpha_to_image(al)?, rep)?)?),
        Some(al) => {
            // With the official centre crop, the alpha is cut exactly as the colour was.
            let al = if s.official {
                let (_, _, ah, aw) = al.dims4()?;
                let (ch, cw) = (ah / 32 * 32, aw / 32 * 32);
                let (top, left) = center_crop_offsets(ah, aw, ch, cw);
                crop(al, top, left, ch, cw)?
            } else {
                al.clone()
            };
            Some(resize_tensor(&al, th, tw, s.kind)?.clamp(0f32, 1f32)?)
        }
        None => None,
    };
    let mut save = if a.strip_metadata { SaveOptions::default() } else { SaveOptions::like_input(&loaded) };
    save.strip_metadata = a.strip_metadata;
    save.jpeg_quality = a.jpeg_quality;
    save.rounding = a.rounding.into();
    if !holds_16_bits(&job.output) {
        save.bit_depth = 8;
    }
    if let Some(dir) = job.output.parent().filter(|d| !d.as_os_str().is_empty())
        && s.batch
    {
        std::fs::create_dir_all(dir).map_err(|e| anyhow!("{}: cannot create the folder: {e}", dir.display()))?;
    }
    save_image_atomic(&job.output, &x, alpha.as_ref(), loaded.grayscale, &save, &[job.input.as_path()])?;
    rep.emit(json!({
        "event": "done",
        "output": job.output.display().to_string(),
        "width": tw,
        "height": th,
        "elapsed_s": rep.elapsed_s(),
    }));
    // The saved pass outputs and emptied state folders are no longer needed.
    if let Some(b) = &base {
        alpha_run.clean(passes.len());
        let _ = std::fs::remove_dir(b.join("alpha"));
        colour.clean(passes.len());
        if let (Some(root), true) = (&a.checkpoint_dir, s.batch) {
            let mut d = Some(b.as_path());
            while let Some(dir) = d.filter(|d| *d != root.as_path()) {
                if std::fs::remove_dir(dir).is_err() {
                    break;
                }
                d = dir.parent();
            }
        }
    }
    Ok((tw, th))
}

fn alpha_name(a: AlphaArg) -> &'static str {
    match a {
        AlphaArg::Model => "model",
        AlphaArg::Bicubic => "bicubic",
    }
}

/// A hash of what determines the passes' outputs, so that a saved pass output is only reused by
/// the same run (the sampler's own state has its own fingerprint).
fn passes_fingerprint(
    a: &UpscaleArgs,
    s: &Settings,
    cfg: &ModelConfig,
    seed: u64,
    noise: Option<&Path>,
    input: &Tensor,
    passes: &[PassGeometry],
) -> Result<String> {
    let mut h = infdit::resume::Fnv::default();
    h.tensor(input)?;
    if let Some(n) = noise {
        h.bytes(&std::fs::read(n).with_context(|| format!("{}: cannot read the noise file", n.display()))?);
    }
    let scales: Vec<usize> = passes.iter().map(|p| p.scale.factor()).collect();
    h.bytes(
        format!(
            "{scales:?}/{}/{:?}/{:?}/{:?}/{:?}/{:?}/{}",
            seed,
            s.heun,
            s.act,
            s.kv_dtype,
            s.kind,
            cfg,
            model_label(&a.model)
        )
        .as_bytes(),
    );
    Ok(format!("{:016x}", h.finish()))
}

/// `--dry-run`: what each file would give, from the image headers and the model config; the
/// checkpoint is not opened and nothing is written.
fn dry_run(a: &UpscaleArgs, s: &Settings, cfg: &ModelConfig, jobs: &[Job], errors: &[String]) -> Result<ExitCode> {
    if let Some(m) = &a.model.model
        && !m.exists()
    {
        bail!("{}: no such checkpoint file or model folder", m.display());
    }
    let params = Model::parameter_count(cfg)?;
    let bp = cfg.dit.block_px;
    let (mut run, mut skip, mut fail) = (0usize, 0usize, errors.len());
    for e in errors {
        eprintln!("error: {e}");
    }
    let count = jobs.len();
    let emit = |i: usize, mut v: serde_json::Value| {
        if a.json {
            v["file_index"] = json!(i);
            v["file_count"] = json!(count);
            println!("{v}");
        }
    };
    for (i, job) in jobs.iter().enumerate() {
        let (inp, out) = (job.input.display().to_string(), job.output.display().to_string());
        if let Some(e) = &job.error {
            emit(i, json!({"event": "failed", "input": inp, "error": e}));
            eprintln!("error: {e}");
            fail += 1;
            continue;
        }
        if a.skip_existing && job.output.exists() {
            emit(i, json!({"event": "skipped", "input": inp, "output": out, "reason": "output exists"}));
            if !a.json {
                println!("{inp} -> {out}: skipped, the output exists");
            }
            skip += 1;
            continue;
        }
        let planned = (|| -> Result<_> {
            let (w, h, has_alpha) = probe(&job.input, a.max_pixels)?;
            let (passes, (tw, th)) = passes_for(s, w, h, bp)?;
            if a.noise.is_some() && passes.len() > 1 {
                bail!("--noise needs a single model pass (--scale 4 or 2); this output takes {}", passes.len());
            }
            let mut steps = Vec::new();
            let mut memory = 0;
            for p in &passes {
                let grid = BlockGrid::for_image(p.grid.0 * bp, p.grid.1 * bp, bp)?;
                let (mode, plan) = choose_mode(a, cfg, params, &grid, s)?;
                memory = memory.max(plan.total());
                steps.push((*p, mode));
            }
            let alpha = has_alpha.then_some(a.alpha);
            let work = work_of(s, &passes, alpha == Some(AlphaArg::Model));
            Ok(((w, h), (tw, th), steps, memory, alpha, work))
        })();
        match planned {
            Ok(((w, h), (tw, th), steps, memory, alpha, work)) => {
                run += 1;
                let alpha_passes = if alpha == Some(AlphaArg::Model) { steps.len() } else { 0 };
                let mib = memory as f64 / (1u64 << 20) as f64;
                emit(
                    i,
                    json!({
                        "event": "plan",
                        "input": inp,
                        "output": out,
                        "input_width": w,
                        "input_height": h,
                        "width": tw,
                        "height": th,
                        "passes": steps.iter().map(|(p, mode)| json!({
                            "scale": p.scale.factor(),
                            "rows": p.grid.0,
                            "cols": p.grid.1,
                            "block_batch": match mode { Mode::Blocks { block_batch, .. } => Some(*block_batch), Mode::WholeImage => None },
                        })).collect::<Vec<_>>(),
                        "alpha": alpha.map(alpha_name),
                        "alpha_passes": alpha_passes,
                        "work": work,
                        "memory_bytes": memory,
                    }),
                );
                if !a.json {
                    let desc: Vec<String> = steps
                        .iter()
                        .map(|(p, mode)| {
                            let how = match mode {
                                Mode::Blocks { block_batch, .. } => format!("block batch {block_batch}"),
                                Mode::WholeImage => "whole image".into(),
                            };
                            format!(
                                "{} pass to {}x{} ({} x {} blocks of {bp} px, {how})",
                                pass_name(p.scale),
                                p.output.0,
                                p.output.1,
                                p.grid.0,
                                p.grid.1
                            )
                        })
                        .collect();
                    let last = steps.last().map(|(p, _)| p.output).unwrap_or((tw, th));
                    let resize = if last != (tw, th) { ", then a bicubic resize" } else { "" };
                    let alpha = match alpha {
                        Some(AlphaArg::Model) => {
                            let s = if alpha_passes > 1 { "es" } else { "" };
                            format!("; alpha: the same {alpha_passes} model pass{s} again")
                        }
                        Some(AlphaArg::Bicubic) => "; alpha: bicubic".into(),
                        None => String::new(),
                    };
                    println!(
                        "{inp} -> {out}: {w}x{h} -> {tw}x{th}: {}{resize}{alpha}; about {mib:.1} MiB",
                        desc.join(", then ")
                    );
                }
            }
            Err(e) => {
                let msg = file_error(&job.input, &e);
                emit(i, json!({"event": "failed", "input": inp, "error": msg}));
                eprintln!("error: {msg}");
                fail += 1;
            }
        }
    }
    if a.json {
        println!("{}", json!({"event": "summary", "dry_run": true, "to_do": run, "skipped": skip, "failed": fail}));
    } else {
        println!("dry run: {run} to upscale, {skip} skipped, {fail} failed; nothing written");
    }
    Ok(if fail > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// Why a half-precision network dtype does not pay on this CPU, if it does not: f16 products are
/// converted to f32 (about 1.4x slower than f32 on the parity config), and bf16 runs at about f32
/// speed without the bf16 dot product (1.5x faster with it).
fn cpu_dtype_note(act: DType, bf16_dot: bool) -> Option<&'static str> {
    match act {
        DType::F16 => Some("on the CPU, --dtype f16 is slower than f32 (its matrix products run in f32)"),
        DType::BF16 if !bf16_dot => Some(
            "this CPU has no bf16 dot-product instructions (AVX-512 BF16), so --dtype bf16 runs at about f32 speed",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_dtype_notes() {
        assert!(cpu_dtype_note(DType::F16, true).unwrap().contains("slower than f32"));
        assert!(cpu_dtype_note(DType::BF16, false).unwrap().contains("about f32 speed"));
        assert_eq!(cpu_dtype_note(DType::BF16, true), None);
        assert_eq!(cpu_dtype_note(DType::F32, false), None);
    }

    #[test]
    fn alpha_maps_to_a_gray_image_and_back() {
        let al = Tensor::from_vec(vec![0f32, 0.25, 1.0], (1, 1, 1, 3), &Device::Cpu).unwrap();
        let img = alpha_to_image(&al).unwrap();
        assert_eq!(img.dims(), [1, 3, 1, 3]);
        let v = img.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v, [-1.0, -0.5, 1.0, -1.0, -0.5, 1.0, -1.0, -0.5, 1.0]);
        let back = image_to_alpha(&img).unwrap();
        assert_eq!(back.dims(), [1, 1, 1, 3]);
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [0.0, 0.25, 1.0]);
        // The mean of the channels, then clamped to [0, 1].
        let out = Tensor::from_vec(vec![1f32, 2.0, -3.0, 0.0, 1.0, -2.0, -1.0, 3.0, -1.0], (1, 3, 1, 3), &Device::Cpu);
        let a = image_to_alpha(&out.unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, [0.5, 1.0, 0.0]);
    }

    #[test]
    fn alpha_noise_seeds_differ_from_the_colour_ones() {
        for seed in [0u64, 7, u64::MAX] {
            assert_eq!(pass_seed(seed, 0), seed);
            for k in 0..4 {
                for j in 0..4 {
                    assert_ne!(pass_seed(seed, ALPHA_STREAM + k), pass_seed(seed, j), "seed {seed}, {k} {j}");
                }
            }
        }
    }
}
