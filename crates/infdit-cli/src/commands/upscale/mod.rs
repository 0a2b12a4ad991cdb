//! `infdit upscale`: the flags to [`UpscaleOptions`], the batch of files (folders, globs, name
//! templates, skip-existing), progress bars or JSON lines, Ctrl-C, exit codes. Everything done to
//! one image is the library's [`Upscaler::upscale_file`].

mod inputs;
pub(crate) mod options;
pub(crate) use options::message as flag_message;
mod progress;
mod shard;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use candle_core::DType;
use serde_json::json;

use infdit::batch::{BatchDir, Outcome};
use infdit::device::OpenedDevice;
use infdit::imageio::canonical_target;
use infdit::upscale::{Event, FilePlan, ImagePlan, Planner, UpscaleOptions, Upscaler, plan_file, planner};
use infdit::{InfditError, ModelSpec};

use self::inputs::{Template, collect, is_batch, output_extension};
use self::progress::Reporter;
use super::{open_device, run_dtype};
use crate::args::UpscaleArgs;

/// Exit code of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: u8 = 130;

/// One file to upscale.
#[derive(Debug, Clone)]
struct Job {
    input: PathBuf,
    output: PathBuf,
    /// The output relative to the output folder (batches), which also names its checkpoint folder.
    rel_out: Option<PathBuf>,
    /// Why the job cannot run, found while listing (output collisions, output is an input).
    error: Option<String>,
}

/// The one-line message of a file's failure, naming the input when the error does not.
fn file_error(input: &std::path::Path, msg: &str) -> String {
    let name = input.display().to_string();
    if msg.contains(&name) { msg.to_string() } else { format!("{name}: {msg}") }
}

fn is_interrupted(e: &InfditError) -> bool {
    matches!(e, InfditError::Interrupted { .. })
}

fn is_locked(e: &InfditError) -> bool {
    matches!(e, InfditError::Locked { .. })
}

/// Builds the list of jobs: the single file, or every input found with its mirrored output.
fn plan_jobs(a: &UpscaleArgs, batch: bool, token: &str) -> Result<(Vec<Job>, Vec<String>)> {
    if !batch {
        let job = Job { input: a.inputs[0].clone(), output: a.output.clone(), rel_out: None, error: None };
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
    let inputs: HashMap<PathBuf, PathBuf> =
        found.sources.iter().map(|src| (canonical_target(&src.path), src.path.clone())).collect();
    let mut outputs: HashMap<PathBuf, PathBuf> = HashMap::new();
    let mut jobs = Vec::with_capacity(found.sources.len());
    for src in found.sources {
        // The name keeps the input's bytes (a stem that is not UTF-8 is not made lossy).
        let stem = src.path.file_stem().unwrap_or_default();
        let ext = output_extension(&src.path, a.format.map(|f| f.extension()));
        let name = template.render_os(stem, &ext, token);
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

/// The options of one job: its own checkpoint folder (`DIR/<output below -o>.state` in a batch).
fn job_options(base: &UpscaleOptions, a: &UpscaleArgs, job: &Job) -> UpscaleOptions {
    let mut o = base.clone();
    o.checkpoint_dir = a.checkpoint_dir.as_ref().map(|d| match &job.rel_out {
        Some(rel) => d.join(format!("{}.state", rel.display())),
        None => d.clone(),
    });
    o
}

/// Every job checked before any work: the header, the whole pass plan and the output.
fn check_jobs(
    jobs: &[Job],
    base: &UpscaleOptions,
    a: &UpscaleArgs,
    planner: &Planner,
) -> Vec<Result<FilePlan, String>> {
    jobs.iter()
        .map(|job| match &job.error {
            Some(e) => Err(e.clone()),
            None => plan_file(planner, &job.input, &job.output, &job_options(base, a, job), false)
                .map_err(|e| file_error(&job.input, &options::message(&e))),
        })
        .collect()
}

/// What every file of a run shares, set up (and checked) once.
struct Setup {
    opts: UpscaleOptions,
    spec: ModelSpec,
    device: OpenedDevice,
    act: DType,
    planner: Planner,
}

fn setup(a: &UpscaleArgs) -> Result<Setup> {
    let opts = UpscaleOptions::from(a);
    opts.validate().map_err(|e| anyhow!(options::message(&e)))?;
    let m = &a.model;
    let spec = super::model_spec(m)?;
    let device = open_device(a.device)?;
    let act = run_dtype(a.dtype, &device);
    let planner = planner(&spec.config()?, spec.sampler_defaults()?, &opts, &device, act)
        .map_err(|e| anyhow!(options::message(&e)))?;
    Ok(Setup { opts, spec, device, act, planner })
}

/// `--verbose`'s settings line and the CPU precision note.
fn print_settings(a: &UpscaleArgs, s: &Setup) {
    if a.verbose {
        let bf = |b: usize| b as f64 / (1u64 << 30) as f64;
        let mem = match infdit::device::gpu_memory(&s.device.device) {
            Some((free, total)) => {
                format!(", {:.1} of {:.1} GiB GPU memory free", bf(free as usize), bf(total as usize))
            }
            None => String::new(),
        };
        let kernels =
            if s.device.is_gpu() { String::new() } else { format!(", kernels {}", infdit::kernels::describe()) };
        eprintln!(
            "device: {}{kernels}, network dtype {:?}, K/V cache {:?}{}{mem}; memory budget {:.1} GiB",
            s.device.describe(),
            s.act,
            s.planner.kv_dtype,
            if a.kv_offload { " in host memory (--kv-offload)" } else { "" },
            bf(s.planner.budget)
        );
        let (heun, ensemble) = (&s.planner.heun, s.planner.ensemble);
        eprintln!("sampler: {} Heun steps from sigma {}, ensemble of {ensemble}", heun.steps, heun.sigma_max);
    }
    if !s.device.is_gpu()
        && !a.quiet
        && let Some(why) = cpu_dtype_note(s.act, infdit::kernels::bf16_gemm::available())
    {
        eprintln!("note: {why}; use it to save memory, not time");
    }
}

/// The Ctrl-C handler, also run on SIGTERM and SIGHUP (what Slurm and Kubernetes send a job they
/// stop or preempt): the first signal stops the run at the next block batch, keeping its
/// checkpoint; the second quits at once.
fn install_ctrlc(quiet: bool) -> Result<Arc<AtomicBool>> {
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
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
    Ok(cancel)
}

pub(crate) fn upscale(mut a: UpscaleArgs) -> Result<ExitCode> {
    // Stale `.partial` files of killed runs older than this moment are cleaned where outputs go; in
    // a sharded batch, whose folders other machines write into, only those older than a day.
    if a.shard.is_some() {
        infdit::atomic::mark_shared_run_start();
    } else {
        infdit::atomic::mark_run_start();
    }
    let batch = is_batch(&a.inputs) || a.output.is_dir();
    if !batch && a.name.is_some() {
        bail!("--name applies when -o is a folder (several inputs, a folder or a pattern); here -o names the file");
    }
    if !batch && a.format.is_some() {
        bail!("--format applies when -o is a folder; for one file the extension of -o picks the format");
    }
    let shard = shard::resolve(&a, batch)?;
    if shard.is_some() && a.checkpoint_dir.is_none() {
        // A sharded batch keeps its checkpoints in the shared output tree: a re-queued task,
        // wherever it runs, resumes them.
        a.checkpoint_dir = Some(BatchDir::new(&a.output).checkpoints());
    }
    let s = setup(&a)?;
    let (jobs, errors) = plan_jobs(&a, batch, &s.opts.target.token())?;
    if batch && jobs.is_empty() && !errors.is_empty() {
        for e in &errors {
            eprintln!("error: {e}");
        }
        bail!("no input images");
    }
    // Every file is checked before any work: its header, its whole pass plan, its output.
    let checked = check_jobs(&jobs, &s.opts, &a, &s.planner);
    let (sharding, jobs, checked) = match shard {
        Some(sh) => {
            let total = jobs.len();
            let (sharding, jobs, checked, done_before) = shard::Sharding::select(&a, sh, jobs, checked, a.dry_run)?;
            if !a.quiet {
                let work: u64 = checked.iter().map(|c| c.as_ref().map_or(0, |p| p.plan.work)).sum();
                let which = if sharding.all { "retry".to_string() } else { format!("shard {}", sharding.shard) };
                eprintln!(
                    "{which}: {} of {total} files to run ({work} block evaluations); {done_before} done in an earlier attempt",
                    jobs.len()
                );
            }
            (Some(sharding), jobs, checked)
        }
        None => (None, jobs, checked),
    };
    if a.dry_run {
        if let ModelSpec::Files { weights, .. } = &s.spec
            && !weights.exists()
        {
            bail!("{}: no such checkpoint file or model folder", weights.display());
        }
        return dry_run(&a, &s.planner, &jobs, &checked, &errors);
    }
    print_settings(&a, &s);
    let cancel = install_ctrlc(a.quiet)?;
    let works: Vec<u64> = checked.iter().map(|c| c.as_ref().map_or(0, |p| p.plan.work)).collect();
    let mut run = BatchRun {
        rep: Reporter::new(a.quiet, a.json, batch, jobs.len(), works.iter().sum()),
        tally: Tally { failed: errors.len(), ..Tally::default() },
        up: None,
        opts: s.opts.clone(),
        a: &a,
        batch,
        cancel,
        sharding,
    };
    for e in &errors {
        run.rep.line(&format!("error: {e}"));
    }
    let mut setup = Some(s);
    for (i, (job, check)) in jobs.iter().zip(&checked).enumerate() {
        if run.cancel.load(Ordering::SeqCst) {
            run.tally.interrupt(jobs.len() - i);
            break;
        }
        run.rep.begin_file(i, job.input.display().to_string(), works[i]);
        if !run.job(job, check, &mut setup)? {
            run.tally.interrupt(jobs.len() - i);
            break;
        }
        run.rep.end_file();
    }
    Ok(run.finish())
}

/// The counts of a batch, and how it ends.
#[derive(Debug, Default)]
struct Tally {
    done: usize,
    skipped: usize,
    failed: usize,
    interrupted: bool,
    not_done: usize,
}

impl Tally {
    fn interrupt(&mut self, not_done: usize) {
        self.interrupted = true;
        self.not_done = not_done;
    }
}

/// A batch under way: the bars, the counts, the model once loaded.
struct BatchRun<'a> {
    rep: Reporter,
    tally: Tally,
    up: Option<Upscaler>,
    opts: UpscaleOptions,
    a: &'a UpscaleArgs,
    batch: bool,
    cancel: Arc<AtomicBool>,
    /// The bookkeeping of `--shard`.
    sharding: Option<shard::Sharding>,
}

impl BatchRun<'_> {
    /// Runs one job; `false` when Ctrl-C stopped it (the batch stops). A model that cannot be
    /// loaded stops the whole run with an error.
    fn job(&mut self, job: &Job, check: &Result<FilePlan, String>, setup: &mut Option<Setup>) -> Result<bool> {
        let (a, input) = (self.a, job.input.display().to_string());
        if a.skip_existing && job.output.exists() {
            let output = job.output.display().to_string();
            self.rep.emit(json!({"event": "skipped", "input": input, "output": output, "reason": "output exists"}));
            if self.rep.chatty() && (!self.batch || a.verbose) {
                self.rep.line(&format!("skipped {}: {} exists", job.input.display(), job.output.display()));
            }
            self.tally.skipped += 1;
            // The existing output counts as done for the batch's status.
            self.record(job, Outcome::Done, None, check.as_ref().map_or(0, |p| p.plan.work), Instant::now());
            return Ok(true);
        }
        let started = Instant::now();
        let work = check.as_ref().map_or(0, |p| p.plan.work);
        if let Err(msg) = check {
            self.record(job, Outcome::Failed, Some(msg.clone()), work, started);
            self.fail(&input, msg.clone());
            return Ok(true);
        }
        // The model is loaded at the first file that runs (a batch whose files all fail loads nothing).
        if let Some(s) = setup.take() {
            if s.spec.is_builtin() && !a.quiet {
                self.rep.line(
                    "note: using the small model built into infdit (1.3M parameters, trained for about 8 hours on \
                     a 2-core CPU; better than bicubic, see models/default/MODEL_CARD.md); give the released \
                     checkpoint with --model for the paper's quality",
                );
            }
            self.up = Some(Upscaler::load(&s.spec, s.device, s.act).map_err(|e| anyhow!(options::message(&e)))?);
        }
        let up = self.up.as_ref().context("the model is loaded before the first file runs")?;
        let jopts = job_options(&self.opts, a, job);
        let result = {
            let rep = &mut self.rep;
            let mut on_event = |ev: &Event| report(rep, a, job, ev);
            up.upscale_file(&job.input, &job.output, &jopts, &mut on_event, Some(&self.cancel))
        };
        match result {
            Ok(r) => {
                self.record(job, Outcome::Done, None, work, started);
                self.tally.done += 1;
                let (output, elapsed_s) = (job.output.display().to_string(), self.rep.elapsed_s());
                let (width, height) = (r.width, r.height);
                self.rep.emit(json!({"event": "done", "output": output, "width": width, "height": height, "elapsed_s": elapsed_s}));
                if self.rep.chatty() {
                    if !self.batch {
                        self.rep.finish();
                    }
                    self.rep.line(&format!("wrote {output} ({width}x{height})"));
                }
                clean_checkpoint_folders(a, &jopts, self.batch);
                Ok(true)
            }
            Err(e) if is_interrupted(&e) => {
                self.record(job, Outcome::Interrupted, None, work, started);
                self.rep.emit(json!({"event": "interrupted", "input": input}));
                let resume = match &a.checkpoint_dir {
                    Some(d) => format!("; its last completed step is kept in {}: rerun to resume", d.display()),
                    None => "; its output was not written".into(),
                };
                self.rep.line(&format!("interrupted while upscaling {input}{resume}"));
                Ok(false)
            }
            Err(e) if is_locked(&e) && self.sharding.is_some() => {
                // Another worker is on this file: its run writes the output and the record.
                let msg = file_error(&job.input, &options::message(&e));
                self.rep.emit(json!({"event": "skipped", "input": input, "reason": msg}));
                self.rep.line(&format!("skipped {input}: another worker is on it ({msg})"));
                self.tally.skipped += 1;
                Ok(true)
            }
            Err(e) => {
                let msg = file_error(&job.input, &options::message(&e));
                self.record(job, Outcome::Failed, Some(msg.clone()), work, started);
                self.fail(&input, msg);
                Ok(true)
            }
        }
    }

    /// The record of a sharded batch's file, if the run is sharded.
    fn record(&self, job: &Job, outcome: Outcome, error: Option<String>, work: u64, started: Instant) {
        if let Some(sh) = &self.sharding {
            sh.record(job, outcome, error, work, started);
        }
    }

    fn fail(&mut self, input: &str, msg: String) {
        self.rep.emit(json!({"event": "failed", "input": input, "error": msg}));
        self.rep.line(&format!("error: {msg}"));
        self.tally.failed += 1;
    }

    /// The summary and the exit code.
    fn finish(self) -> ExitCode {
        let t = &self.tally;
        self.rep.finish();
        if self.batch {
            self.rep.emit_run(json!({
                "event": "summary",
                "done": t.done,
                "skipped": t.skipped,
                "failed": t.failed,
                "interrupted": t.interrupted,
                "not_done": t.not_done,
            }));
            if self.rep.chatty() {
                let stop =
                    if t.interrupted { format!(", interrupted ({} not done)", t.not_done) } else { String::new() };
                eprintln!("{} done, {} skipped, {} failed{stop}", t.done, t.skipped, t.failed);
            }
        }
        if t.interrupted {
            ExitCode::from(EXIT_INTERRUPTED)
        } else if t.failed > 0 {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        }
    }
}

/// In a batch, the emptied per-file checkpoint folders below `--checkpoint-dir` are removed.
fn clean_checkpoint_folders(a: &UpscaleArgs, jopts: &UpscaleOptions, batch: bool) {
    if let (Some(root), Some(dir), true) = (&a.checkpoint_dir, &jopts.checkpoint_dir, batch) {
        let mut d = Some(dir.as_path());
        while let Some(dir) = d.filter(|d| *d != root.as_path()) {
            if std::fs::remove_dir(dir).is_err() {
                break;
            }
            d = dir.parent();
        }
    }
}

/// The JSON of a plan's passes.
fn passes_json(plan: &ImagePlan) -> Vec<serde_json::Value> {
    plan.passes
        .iter()
        .map(|p| {
            let g = &p.geometry;
            json!({
                "scale": g.scale.factor(),
                "blocks": g.blocks(),
                "rows": g.grid.0,
                "cols": g.grid.1,
                "width": g.output.0,
                "height": g.output.1,
                "block_batch": match p.mode {
                    infdit::sampling::Mode::Blocks { block_batch, .. } => Some(block_batch),
                    infdit::sampling::Mode::WholeImage => None,
                },
            })
        })
        .collect()
}

/// Shows one library event: bars, JSON lines, verbose lines.
fn report(rep: &mut Reporter, a: &UpscaleArgs, job: &Job, ev: &Event) {
    match ev {
        Event::Start(plan) => {
            let (tw, th) = plan.output;
            rep.begin_image(format!("{} -> {tw}x{th}", job.input.display()), plan.work);
            rep.emit(json!({
                "event": "start",
                "input": job.input.display().to_string(),
                "output": job.output.display().to_string(),
                "width": tw,
                "height": th,
                "blocks": plan.passes[0].geometry.blocks(),
                "steps": plan.steps,
                "evaluations": plan.evaluations,
                "passes": passes_json(plan),
                "alpha": plan.alpha.map(|m| m.name()),
                "alpha_passes": plan.alpha_passes,
                "work": plan.work,
            }));
        }
        Event::Pass(p) if a.verbose => {
            let g = &p.plan.geometry;
            rep.line(&format!(
                "{} {}pass {}/{} (x{}): {}x{} -> {}x{} ({}x{} blocks), {:?}; memory plan: {}",
                job.input.display(),
                if p.alpha { "alpha " } else { "" },
                p.plane_pass + 1,
                p.plane_passes,
                g.scale.factor(),
                g.input.0,
                g.input.1,
                g.output.0,
                g.output.1,
                g.grid.1,
                g.grid.0,
                p.plan.mode,
                p.plan.memory
            ));
        }
        Event::Resumed { pass, steps_done } if a.verbose => {
            rep.line(&format!("pass {}: resumed from step {steps_done}", pass + 1));
        }
        Event::Progress(p) => rep.sample(p.pass, p.passes, p.work_offset, p.alpha, &p.sample),
        _ => {}
    }
}

/// `--dry-run`: what each file would give, from the image headers and the model config; the
/// checkpoint is not opened and nothing is written.
fn dry_run(
    a: &UpscaleArgs,
    planner: &Planner,
    jobs: &[Job],
    checked: &[Result<FilePlan, String>],
    errors: &[String],
) -> Result<ExitCode> {
    let bp = planner.cfg.dit.block_px;
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
    for (i, (job, check)) in jobs.iter().zip(checked).enumerate() {
        let (inp, out) = (job.input.display().to_string(), job.output.display().to_string());
        if a.skip_existing && job.output.exists() {
            emit(i, json!({"event": "skipped", "input": inp, "output": out, "reason": "output exists"}));
            if !a.json {
                println!("{inp} -> {out}: skipped, the output exists");
            }
            skip += 1;
            continue;
        }
        let fp = match check {
            Ok(fp) => fp,
            Err(msg) => {
                emit(i, json!({"event": "failed", "input": inp, "error": msg}));
                eprintln!("error: {msg}");
                fail += 1;
                continue;
            }
        };
        run += 1;
        let plan = &fp.plan;
        let ((w, h), (tw, th)) = (plan.input, plan.output);
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
                "passes": passes_json(plan),
                "alpha": plan.alpha.map(|m| m.name()),
                "alpha_passes": plan.alpha_passes,
                "work": plan.work,
                "memory_bytes": plan.memory,
                "creates_folder": fp.output.creates.as_ref().map(|d| d.display().to_string()),
            }),
        );
        if !a.json {
            println!("{inp} -> {out}: {}", describe(fp, bp));
        }
    }
    if a.json {
        println!("{}", json!({"event": "summary", "dry_run": true, "to_do": run, "skipped": skip, "failed": fail}));
    } else {
        println!("dry run: {run} to upscale, {skip} skipped, {fail} failed; nothing written");
    }
    Ok(if fail > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// The dry run's line for one file, after `input -> output: `.
fn describe(fp: &FilePlan, bp: usize) -> String {
    let plan = &fp.plan;
    let ((w, h), (tw, th)) = (plan.input, plan.output);
    let mib = plan.memory as f64 / (1u64 << 20) as f64;
    let desc: Vec<String> = plan
        .passes
        .iter()
        .map(|p| {
            let g = &p.geometry;
            let how = match p.mode {
                infdit::sampling::Mode::Blocks { block_batch, .. } => format!("block batch {block_batch}"),
                infdit::sampling::Mode::WholeImage => "whole image".into(),
            };
            // Width x height, as every size here.
            let (x, ow, oh, cols, rows) = (g.scale.factor(), g.output.0, g.output.1, g.grid.1, g.grid.0);
            format!("x{x} pass to {ow}x{oh} ({cols}x{rows} blocks of {bp} px, {how})")
        })
        .collect();
    let resize = if plan.resize { ", then a bicubic resize" } else { "" };
    let alpha = match plan.alpha {
        Some(infdit::upscale::AlphaMode::Model) => {
            let s = if plan.alpha_passes > 1 { "es" } else { "" };
            format!("; alpha: the same {} model pass{s} again", plan.alpha_passes)
        }
        Some(m) => format!("; alpha: {}", m.name()),
        None => String::new(),
    };
    let folder = match &fp.output.creates {
        Some(d) => format!("; creates the folder {}", d.display()),
        None => String::new(),
    };
    format!("{w}x{h} -> {tw}x{th}: {}{resize}{alpha}; about {mib:.1} MiB{folder}", desc.join(", then "))
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
}
