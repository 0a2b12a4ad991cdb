//! `infdit serve`: a local web app and HTTP API over the library's [`Upscaler`], with a persistent
//! job queue (SQLite) and a pool of worker threads sharing one loaded model. This crate translates
//! HTTP into library calls; the upscaling is the library's. The API: docs/api.md; the design:
//! docs/serve.md.

mod api;
pub mod options;
mod queue;
pub mod store;
mod web;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use infdit::ModelSpec;
use infdit::upscale::{LoadOptions, Upscaler};

pub use options::JobOptions;
use store::Store;

/// Everything `infdit serve` is started with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on (port 0: any free port; the address is printed on standard output).
    pub bind: SocketAddr,
    /// Folder of the database and the jobs' files.
    pub data_dir: PathBuf,
    /// The model.
    pub model: ModelSpec,
    /// Where the model runs.
    pub load: LoadOptions,
    /// Jobs run at once; `None`: from the device's memory plan ([`default_workers`]).
    pub workers: Option<usize>,
    /// Bearer token required on every API call and on the page; required when `bind` is not a
    /// loopback address.
    pub token: Option<String>,
    /// Largest upload, in bytes.
    pub max_upload: usize,
    /// Largest input image, in pixels (checked from the header, then when decoding).
    pub max_pixels: u64,
    /// Largest number of jobs queued or running.
    pub max_queue: usize,
    /// Jobs a client (IP address) may create per minute; 0: no limit.
    pub rate_limit: u32,
    /// Finished jobs (and their files) are removed after this long.
    pub keep_for: Duration,
    /// At most this many finished jobs are kept (the oldest are removed first).
    pub keep_jobs: usize,
}

impl ServerConfig {
    /// The defaults of `infdit serve` for a data folder.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 7860)),
            data_dir,
            model: ModelSpec::BuiltIn,
            load: LoadOptions::default(),
            workers: None,
            token: None,
            max_upload: 32 << 20,
            max_pixels: 16 << 20,
            max_queue: 256,
            rate_limit: 120,
            keep_for: Duration::from_secs(24 * 3600),
            keep_jobs: 500,
        }
    }

    /// Checks the settings that would make the server unsafe or useless.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !self.bind.ip().is_loopback() && self.token.as_deref().is_none_or(str::is_empty) {
            bail!(
                "--bind {} is reachable from other machines: give --token SECRET (every API call and the page then \
                 need it), or bind to 127.0.0.1",
                self.bind
            );
        }
        if self.token.as_deref().is_some_and(|t| t.len() < 8) {
            bail!("--token: use at least 8 characters");
        }
        if self.workers == Some(0) {
            bail!("--workers: give at least 1");
        }
        if self.max_queue == 0 || self.max_upload == 0 || self.max_pixels == 0 || self.keep_jobs == 0 {
            bail!("--max-queue, --max-upload, --max-pixels and --keep-jobs must be at least 1");
        }
        Ok(())
    }
}

/// Live state of a running job (not stored: the database has the last saved progress).
#[derive(Debug)]
struct Live {
    cancel: Arc<AtomicBool>,
    /// Set when the cancel flag means "the server stops" (the job goes back to the queue).
    stopping: bool,
    done: u64,
    total: u64,
    /// Work done when this run started (a resumed run starts above 0), and when.
    start_done: Option<u64>,
    started: Instant,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
struct Metrics {
    requests: AtomicU64,
    client_errors: AtomicU64,
    server_errors: AtomicU64,
    jobs_created: AtomicU64,
    jobs_done: AtomicU64,
    jobs_failed: AtomicU64,
    jobs_cancelled: AtomicU64,
    upload_bytes: AtomicU64,
    run_ms: AtomicU64,
    rejected: AtomicU64,
}

/// Shared by the HTTP handlers and the workers.
struct App {
    cfg: ServerConfig,
    workers: usize,
    upscaler: Arc<Upscaler>,
    store: Mutex<Store>,
    live: Mutex<HashMap<String, Live>>,
    /// Bumped on every queue change; the workers wait on it.
    wake: (Mutex<u64>, Condvar),
    /// Ids of jobs that changed, for the event streams.
    events: tokio::sync::broadcast::Sender<String>,
    metrics: Metrics,
    rate: Mutex<HashMap<IpAddr, (f64, Instant)>>,
    shutdown: AtomicBool,
    started: Instant,
}

/// Locks a mutex, also after a panic elsewhere (the data are plain rows and counters).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl App {
    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    fn notify(&self, id: &str) {
        let _ = self.events.send(id.to_string());
    }

    fn wake_workers(&self) {
        *lock(&self.wake.0) += 1;
        self.wake.1.notify_all();
    }
}

/// The size of input the default worker count is planned for: 1024 x 1024 at x4, the CLI's defaults.
pub const TYPICAL_INPUT: (usize, usize) = (1024, 1024);

/// How many jobs run at once when `--workers` is not given, from the device's memory plan: as many
/// as the device's memory budget holds with each job planned as the library plans a
/// [`TYPICAL_INPUT`] with the default options (the block scheduler's memory grows with the width, so
/// this also holds for taller inputs), at least 1, and at most 4 on a GPU and 2 on the CPU. One job
/// already uses every CPU core or the whole GPU; a second one overlaps the work of a job that is not
/// the network (decoding, resizing, encoding, the first and last passes' bicubic) and costs memory
/// only, so more gain nothing.
pub fn default_workers(upscaler: &Upscaler) -> infdit::Result<usize> {
    let planner = upscaler.planner(&infdit::UpscaleOptions::default())?;
    let (w, h) = TYPICAL_INPUT;
    let need = planner.plan(w, h, false, infdit::upscale::AlphaMode::Bicubic)?.memory.max(1);
    let cap = if upscaler.device().is_gpu() { 4 } else { 2 };
    Ok((planner.budget / need).clamp(1, cap))
}

/// Runs the server until Ctrl-C or SIGTERM: loads the model, opens the store (jobs left running
/// go back to the queue and resume from their last saved step), starts the workers and serves.
/// Prints `listening on http://ADDR` on standard output once it accepts connections.
pub fn serve(cfg: ServerConfig) -> anyhow::Result<()> {
    cfg.validate()?;
    let store = Store::open(&cfg.data_dir).with_context(|| format!("cannot open {}", cfg.data_dir.display()))?;
    let requeued = store.requeue_running()?;
    if requeued > 0 {
        eprintln!("{requeued} job(s) left running by the last server are queued again and resume where they stopped");
    }
    let upscaler = Arc::new(Upscaler::new(&cfg.model, &cfg.load)?);
    if let Some(why) = &upscaler.device().fallback {
        eprintln!("warning: {why}");
    }
    let workers = match cfg.workers {
        Some(n) => n,
        None => {
            let n = default_workers(&upscaler)?;
            eprintln!("{n} worker(s): jobs that fit the memory budget at once (--workers to choose)");
            n
        }
    };
    let (events, _) = tokio::sync::broadcast::channel(1024);
    let app = Arc::new(App {
        workers,
        upscaler,
        store: Mutex::new(store),
        live: Mutex::new(HashMap::new()),
        wake: (Mutex::new(0), Condvar::new()),
        events,
        metrics: Metrics::default(),
        rate: Mutex::new(HashMap::new()),
        shutdown: AtomicBool::new(false),
        started: Instant::now(),
        cfg,
    });
    queue::sweep(&app);
    let handles: Vec<_> = (0..workers)
        .map(|i| {
            let app = app.clone();
            std::thread::Builder::new().name(format!("infdit-worker-{i}")).spawn(move || queue::worker(&app))
        })
        .collect::<std::io::Result<_>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = rt.block_on(api::run(app.clone()));
    // Stop the workers: a running job stops at its next network evaluation, keeps its last step
    // and goes back to the queue.
    app.shutdown.store(true, Ordering::SeqCst);
    for live in lock(&app.live).values_mut() {
        live.stopping = true;
        live.cancel.store(true, Ordering::SeqCst);
    }
    app.wake_workers();
    for h in handles {
        let _ = h.join();
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}
