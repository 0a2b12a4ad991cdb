//! The workers: each takes the first queued job, runs it through [`Upscaler::upscale_file`] with
//! the job's checkpoint folder (so a job interrupted by a crash resumes from its last sampler
//! step), and records the result. And the retention sweep.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use infdit::InfditError;
use infdit::upscale::Event;

use crate::store::{JobRow, JobState, now_ms};
use crate::{App, JobOptions, Live, lock};

/// The options of a stored job, as the library runs them: the job's own checkpoint folder and,
/// with several workers, an equal share of the device's memory budget each.
pub(crate) fn run_options(app: &App, opts: &JobOptions, dir: &Path) -> infdit::Result<infdit::UpscaleOptions> {
    let mut o = opts.to_upscale(app.cfg.max_pixels)?;
    o.checkpoint_dir = Some(dir.join("checkpoint"));
    if o.max_memory.is_none() && app.workers > 1 {
        let device = &app.upscaler.device().device;
        let total = match infdit::device::gpu_memory(device) {
            Some((free, _)) => infdit::device::default_gpu_budget(free),
            None => infdit::upscale::default_host_budget(),
        };
        o.max_memory = Some(total / app.workers as u64);
    }
    Ok(o)
}

/// An error for a user: the job folder's paths become the names the user knows.
pub(crate) fn user_message(e: &InfditError, dir: &Path, input: &Path, output: &Path, input_name: &str) -> String {
    e.to_string()
        .replace(&input.display().to_string(), input_name)
        .replace(&output.display().to_string(), "the output")
        .replace(&dir.display().to_string(), "job")
}

/// A worker thread: runs queued jobs one at a time until the server stops.
pub(crate) fn worker(app: &Arc<App>) {
    loop {
        if app.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let seen = *lock(&app.wake.0);
        let job = {
            let store = app.store();
            match store.claim() {
                Ok(Some(job)) => {
                    lock(&app.live).insert(
                        job.id.clone(),
                        Live {
                            cancel: Arc::new(AtomicBool::new(false)),
                            stopping: false,
                            done: job.work_done as u64,
                            total: job.work_total as u64,
                            start_done: None,
                            started: Instant::now(),
                        },
                    );
                    Some(job)
                }
                Ok(None) => None,
                Err(e) => {
                    eprintln!("error: job store: {e}");
                    None
                }
            }
        };
        match job {
            Some(job) => {
                app.notify(&job.id);
                run(app, &job);
                sweep(app);
            }
            None => {
                let guard = lock(&app.wake.0);
                if *guard == seen && !app.shutdown.load(Ordering::SeqCst) {
                    let _ = app.wake.1.wait_timeout(guard, Duration::from_secs(2));
                }
            }
        }
    }
}

fn run(app: &Arc<App>, job: &JobRow) {
    let dir = app.store().job_dir(&job.id);
    let started = Instant::now();
    let cancel = lock(&app.live).get(&job.id).map(|l| l.cancel.clone()).unwrap_or_default();
    let input = dir.join(format!("input.{}", job.input_ext));
    let output = dir.join(format!("output.{}", job.output_ext));
    let result = serde_json::from_str::<JobOptions>(&job.options)
        .map_err(|e| InfditError::Internal(format!("stored options of job {}: {e}", job.id)))
        .and_then(|opts| run_options(app, &opts, &dir))
        .and_then(|opts| {
            let mut last_sent = Instant::now() - Duration::from_secs(1);
            let mut events = |ev: &Event| {
                let (done, total, resumed) = {
                    let mut live = lock(&app.live);
                    let Some(l) = live.get_mut(&job.id) else { return };
                    match ev {
                        Event::Start(plan) => {
                            l.total = plan.work;
                        }
                        Event::Progress(p) => {
                            l.done = p.work_done();
                            if l.start_done.is_none() {
                                // The first report of this run: what a resume skipped counts as done
                                // before the run, not in its speed.
                                l.start_done = Some(l.done.saturating_sub(p.sample.blocks_evaluated()));
                                l.started = Instant::now();
                            }
                        }
                        Event::Resumed { steps_done, .. } => {
                            drop(live);
                            let _ =
                                app.store().progress(&job.id, job.work_done, job.work_total, Some(*steps_done as i64));
                            return;
                        }
                        Event::Pass(_) => {}
                    }
                    (l.done, l.total, None::<i64>)
                };
                if matches!(ev, Event::Start(_)) || last_sent.elapsed() >= Duration::from_millis(250) {
                    last_sent = Instant::now();
                    let _ = app.store().progress(&job.id, done as i64, total as i64, resumed);
                    app.notify(&job.id);
                }
            };
            app.upscaler.upscale_file(&input, &output, &opts, &mut events, Some(&cancel))
        });
    let ran_ms = started.elapsed().as_millis() as i64;
    let live = lock(&app.live).remove(&job.id);
    let stopping = live.as_ref().is_some_and(|l| l.stopping);
    let (state, error) = match &result {
        Ok(_) => (JobState::Done, None),
        Err(InfditError::Interrupted { .. }) if stopping => (JobState::Queued, None),
        Err(InfditError::Interrupted { .. }) if cancel.load(Ordering::SeqCst) => (JobState::Cancelled, None),
        Err(e) => (JobState::Failed, Some(user_message(e, &dir, &input, &output, &job.input_name))),
    };
    app.metrics.run_ms.fetch_add(ran_ms as u64, Ordering::Relaxed);
    match state {
        JobState::Done => &app.metrics.jobs_done,
        JobState::Failed => &app.metrics.jobs_failed,
        _ => &app.metrics.jobs_cancelled,
    }
    .fetch_add(u64::from(state.is_final()), Ordering::Relaxed);
    let kept = {
        let store = app.store();
        match store.finish(&job.id, state, error.as_deref(), ran_ms) {
            Ok(kept) => kept,
            Err(e) => {
                eprintln!("error: job store: {e}");
                true
            }
        }
    };
    if !kept {
        // Deleted while it ran.
        let _ = std::fs::remove_dir_all(&dir);
    } else if matches!(state, JobState::Cancelled | JobState::Done) {
        let _ = std::fs::remove_dir_all(dir.join("checkpoint"));
    }
    app.notify(&job.id);
}

/// Removes finished jobs past the retention (age or count) with their files, and job folders
/// that have no job (an upload cut short by a crash).
pub(crate) fn sweep(app: &App) {
    let store = app.store();
    let before = now_ms() - app.cfg.keep_for.as_millis() as i64;
    let expired = store.expired(before, app.cfg.keep_jobs).unwrap_or_default();
    for id in &expired {
        if store.delete(id).unwrap_or(false) {
            let _ = std::fs::remove_dir_all(store.job_dir(id));
        }
    }
    let known: std::collections::HashSet<String> = store.list().unwrap_or_default().into_iter().map(|j| j.id).collect();
    let pending = lock(&app.live).keys().cloned().collect::<Vec<_>>();
    if let Ok(entries) = std::fs::read_dir(store.dir().join("jobs")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let age = e.metadata().and_then(|m| m.modified()).ok().and_then(|m| m.elapsed().ok());
            // A folder being filled by an upload is young: leave those for the next sweep.
            if !known.contains(&name) && !pending.contains(&name) && age.is_some_and(|a| a > Duration::from_secs(600)) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    drop(store);
    for id in expired {
        app.notify(&id);
    }
}
