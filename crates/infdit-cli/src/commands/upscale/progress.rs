//! Progress of `infdit upscale`: a batch bar (all files, in units of block evaluations, so its ETA
//! weighs big images right) above the image bar (passes, steps, evaluations, blocks), or JSON
//! lines on standard output, or nothing.

use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};

use infdit::sampling::Progress;

/// Where the progress of a run goes.
pub struct Reporter {
    multi: MultiProgress,
    batch: Option<ProgressBar>,
    image: ProgressBar,
    json: bool,
    quiet: bool,
    file_index: usize,
    file_count: usize,
    /// Work of the files already finished (batch bar units).
    batch_done: u64,
    /// Work of the current file.
    current_work: u64,
    started: Instant,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).expect("valid progress template").progress_chars("=> ")
}

impl Reporter {
    /// Bars on standard error unless `quiet` or `json`; a batch bar when `batch`, over
    /// `total_work` units.
    pub fn new(quiet: bool, json: bool, batch: bool, file_count: usize, total_work: u64) -> Self {
        let multi = if quiet || json {
            MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
        } else {
            MultiProgress::new()
        };
        let batch = batch.then(|| {
            let b = multi.add(ProgressBar::new(total_work.max(1)));
            b.set_style(style("files [{bar:30}] {percent:>3}% {msg} {elapsed} elapsed, ETA {eta}"));
            b
        });
        let image = multi.add(ProgressBar::new(1));
        image.set_style(style("{prefix} [{bar:30}] {msg} {elapsed} elapsed, ETA {eta}"));
        Self {
            multi,
            batch,
            image,
            json,
            quiet,
            file_index: 0,
            file_count,
            batch_done: 0,
            current_work: 0,
            started: Instant::now(),
        }
    }

    /// Whether human-readable lines ("wrote", the summary) are printed.
    pub fn chatty(&self) -> bool {
        !self.quiet && !self.json
    }

    /// Prints a line on standard error without tearing the bars.
    pub fn line(&self, msg: &str) {
        self.multi.suspend(|| eprintln!("{msg}"));
    }

    /// Prints a JSON event (with the file index and count) when `--json` is on.
    pub fn emit(&self, mut v: Value) {
        if self.json {
            if let Some(o) = v.as_object_mut() {
                o.insert("file_index".into(), json!(self.file_index));
                o.insert("file_count".into(), json!(self.file_count));
            }
            println!("{v}");
        }
    }

    /// Prints a JSON event about the whole run when `--json` is on.
    pub fn emit_run(&self, v: Value) {
        if self.json {
            println!("{v}");
        }
    }

    /// A new file: its index, name and estimated work (from the header).
    pub fn begin_file(&mut self, index: usize, name: String, estimate: u64) {
        self.file_index = index;
        self.current_work = estimate;
        self.started = Instant::now();
        if let Some(b) = &self.batch {
            b.set_message(format!("file {}/{}", index + 1, self.file_count));
            self.image.reset();
            self.image.set_position(0);
            self.image.set_prefix(name);
            self.image.set_message("loading");
        }
    }

    /// The current file is loaded: the image bar's label and the file's exact work.
    pub fn begin_image(&mut self, label: String, work: u64) {
        if let Some(b) = &self.batch
            && work != self.current_work
        {
            let len = b.length().unwrap_or(0);
            b.set_length((len + work).saturating_sub(self.current_work).max(1));
        }
        self.current_work = work;
        self.image.reset();
        self.image.set_length(work.max(1));
        self.image.set_position(0);
        self.image.set_prefix(label);
        self.image.set_message("");
    }

    /// Seconds since the current file began.
    pub fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// A sampler report in pass `pass` of the file's `passes` (those of the alpha plane
    /// included), whose work starts at `offset` in the file; `alpha` for the alpha plane's passes.
    pub fn sample(&self, pass: usize, passes: usize, offset: u64, alpha: bool, p: &Progress) {
        self.emit(json!({
            "event": "progress",
            "pass": pass,
            "passes": passes,
            "plane": if alpha { "alpha" } else { "colour" },
            "steps_done": p.steps_done,
            "steps_total": p.steps_total,
            "evals_done": p.evals_done,
            "evals_total": p.evals_total,
            "blocks_done": p.blocks_done,
            "blocks_total": p.blocks_total,
            "elapsed_s": self.elapsed_s(),
        }));
        let pos = offset + (p.evals_done * p.blocks_total + p.blocks_done) as u64;
        self.image.set_position(pos);
        if let Some(b) = &self.batch {
            b.set_position(self.batch_done + pos);
        }
        let plane = if alpha { "alpha, " } else { "" };
        let pass_text = if passes > 1 { format!("{plane}pass {}/{passes}, ", pass + 1) } else { String::new() };
        self.image.set_message(format!(
            "{pass_text}step {}/{}, evaluation {}/{}, block {}/{}",
            (p.steps_done + 1).min(p.steps_total),
            p.steps_total,
            (p.evals_done + 1).min(p.evals_total),
            p.evals_total,
            p.blocks_done,
            p.blocks_total
        ));
    }

    /// The current file is over (done, skipped or failed): the batch bar moves past its work.
    pub fn end_file(&mut self) {
        self.batch_done += self.current_work;
        if let Some(b) = &self.batch {
            b.set_position(self.batch_done);
        }
    }

    /// Removes the bars (the image bar stays, finished, for a single file).
    pub fn finish(&self) {
        match &self.batch {
            Some(b) => {
                b.finish_and_clear();
                self.image.finish_and_clear();
            }
            None => self.image.finish(),
        }
    }
}
