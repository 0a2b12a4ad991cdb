//! Progress of `infdit upscale`: a batch bar (all files, in units of block evaluations, so its ETA
//! weighs big images right) above the image bar (passes, steps, evaluations, blocks), or JSON
//! lines on standard output, or nothing.

use std::time::{Duration, Instant};

use indicatif::{HumanDuration, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
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

/// A bar style; `{eta_left}` is ", ETA 3m" once the bar has a rate to estimate from, else nothing
/// (indicatif's own `{eta}` reads "0s" until the first step and after the last).
fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).expect("valid progress template").progress_chars("=> ").with_key(
        "eta_left",
        |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            if let Some(eta) = eta_left(s.pos(), s.len(), s.eta()) {
                let _ = write!(w, ", ETA {:#}", HumanDuration(eta));
            }
        },
    )
}

/// The ETA worth showing: none before the first unit of work (no rate yet: indicatif's estimate is
/// then 0) or once all is done.
fn eta_left(pos: u64, len: Option<u64>, eta: Duration) -> Option<Duration> {
    let left = len?.saturating_sub(pos);
    (pos > 0 && left > 0 && !eta.is_zero()).then_some(eta)
}

/// A sampler report as the bars and `--json` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    /// Block evaluations finished in the pass (the bars' unit).
    work_done: u64,
    /// The evaluation shown: the one under way, or the last once all are done (from 1).
    eval: usize,
    /// Blocks finished in that evaluation: `blocks_total` once all evaluations are done.
    blocks: usize,
}

/// Reads a [`Progress`] whichever way the sampler counts the blocks of a finished evaluation: block
/// mode reports 0 blocks of the next one (`evals_done` = k, `blocks_done` = 0), whole-image mode all
/// blocks of the finished one, already counted in `evals_done` (`blocks_done` = `blocks_total`).
fn counts(p: &Progress) -> Counts {
    let partial = if p.blocks_done >= p.blocks_total { 0 } else { p.blocks_done };
    let finished = p.evals_total > 0 && p.evals_done >= p.evals_total;
    Counts {
        work_done: (p.evals_done.min(p.evals_total) * p.blocks_total + if finished { 0 } else { partial }) as u64,
        eval: (p.evals_done + 1).min(p.evals_total),
        blocks: if finished { p.blocks_total } else { partial },
    }
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
            b.set_style(style("files [{bar:30}] {percent:>3}% {msg} {elapsed} elapsed{eta_left}"));
            b
        });
        let image = multi.add(ProgressBar::new(1));
        image.set_style(style("{prefix} [{bar:30}] {msg} {elapsed} elapsed{eta_left}"));
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
        let c = counts(p);
        let pos = offset + c.work_done;
        self.emit(json!({
            "event": "progress",
            "pass": pass,
            "passes": passes,
            "plane": if alpha { "alpha" } else { "colour" },
            "steps_done": p.steps_done,
            "steps_total": p.steps_total,
            "evals_done": p.evals_done,
            "evals_total": p.evals_total,
            "blocks_done": c.blocks,
            "blocks_total": p.blocks_total,
            "work_done": pos,
            "elapsed_s": self.elapsed_s(),
        }));
        let plane = if alpha { "alpha, " } else { "" };
        let pass_text = if passes > 1 { format!("{plane}pass {}/{passes}, ", pass + 1) } else { String::new() };
        self.image.set_message(format!(
            "{pass_text}step {}/{}, evaluation {}/{}, block {}/{}",
            (p.steps_done + 1).min(p.steps_total),
            p.steps_total,
            c.eval,
            p.evals_total,
            c.blocks,
            p.blocks_total
        ));
        // After the message, so that no frame shows the new position with the old counts.
        self.image.set_position(pos);
        if let Some(b) = &self.batch {
            b.set_position(self.batch_done + pos);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn progress(evals_done: usize, blocks_done: usize) -> Progress {
        Progress { evals_done, evals_total: 3, steps_done: 0, steps_total: 2, blocks_done, blocks_total: 4 }
    }

    /// Block mode: k evaluations done and b blocks of the next; the last report (all evaluations
    /// done, 0 blocks of a next one) reads as the last evaluation with all of its blocks.
    #[test]
    fn block_mode_counts() {
        let c = |e, b| counts(&progress(e, b));
        assert_eq!(c(0, 0), Counts { work_done: 0, eval: 1, blocks: 0 });
        assert_eq!(c(0, 3), Counts { work_done: 3, eval: 1, blocks: 3 });
        assert_eq!(c(1, 0), Counts { work_done: 4, eval: 2, blocks: 0 });
        assert_eq!(c(2, 1), Counts { work_done: 9, eval: 3, blocks: 1 });
        assert_eq!(c(3, 0), Counts { work_done: 12, eval: 3, blocks: 4 });
    }

    /// Whole-image mode reports the blocks of the evaluation it has just counted: no double count
    /// (the bar was one evaluation ahead), and the same last report as block mode.
    #[test]
    fn whole_image_mode_counts() {
        let c = |e, b| counts(&progress(e, b));
        assert_eq!(c(1, 4), Counts { work_done: 4, eval: 2, blocks: 0 });
        assert_eq!(c(2, 4), Counts { work_done: 8, eval: 3, blocks: 0 });
        assert_eq!(c(3, 4), Counts { work_done: 12, eval: 3, blocks: 4 });
    }

    #[test]
    fn eta_only_with_a_rate_and_work_left() {
        let s = Duration::from_secs(5);
        assert_eq!(eta_left(0, Some(10), Duration::ZERO), None);
        assert_eq!(eta_left(0, Some(10), s), None);
        assert_eq!(eta_left(3, Some(10), s), Some(s));
        assert_eq!(eta_left(3, Some(10), Duration::ZERO), None);
        assert_eq!(eta_left(10, Some(10), s), None);
        assert_eq!(eta_left(3, None, s), None);
    }

    /// A terminal that keeps what is drawn.
    #[derive(Debug, Clone, Default)]
    struct Screen(Arc<Mutex<String>>);

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            200
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(&format!("{s}\n"))
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().push_str(s);
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The image bar as drawn: no "ETA 0s" before the first block, and the last report of a run
    /// reads "evaluation 3/3, block 4/4" (it read "block 0/4").
    #[test]
    fn image_bar_starts_without_eta_and_ends_at_the_full_count() {
        let screen = Screen::default();
        let mut rep = Reporter::new(true, false, false, 1, 12);
        let target = ProgressDrawTarget::term_like(Box::new(screen.clone()));
        rep.image.set_draw_target(target);
        rep.begin_image("img".into(), 12);
        rep.sample(0, 1, 0, false, &progress(0, 0));
        rep.image.tick();
        let first = screen.0.lock().unwrap().clone();
        assert!(first.contains("block 0/4") && first.contains("elapsed") && !first.contains("ETA"), "{first:?}");
        rep.sample(0, 1, 0, false, &Progress { steps_done: 2, ..progress(3, 0) });
        rep.finish();
        let last = screen.0.lock().unwrap().clone();
        assert!(last.contains("step 2/2, evaluation 3/3, block 4/4"), "{last:?}");
    }
}
