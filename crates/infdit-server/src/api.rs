//! The HTTP side: routes, the token check, limits, and the JSON of a job (docs/api.md).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Multipart, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use infdit::InfditError;
use infdit::imageio::{ImageIoError, LoadLimits, load_image};
use infdit::upscale::plan_file;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::store::{JobRow, JobState, now_ms};
use crate::{App, JobOptions, lock, queue, web};

type AppState = Arc<App>;

/// An error answer: `{"error": "...", "code": "..."}` with a status.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None }
    }

    fn not_found(id: &str) -> Self {
        let shown: String = id.chars().take(40).collect();
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("no job '{shown}'"))
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("internal error: {e}"))
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> Self {
        Self::internal(format!("job store: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(json!({"error": self.message, "code": self.code}))).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}

/// A library error at job creation as an answer.
fn library_error(e: &InfditError, message: String) -> ApiError {
    use ImageIoError as I;
    let (status, code) = match e {
        InfditError::InvalidOption { .. } | InfditError::Config(_) => (StatusCode::BAD_REQUEST, "invalid_option"),
        InfditError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        InfditError::Image(I::TooLarge { .. } | I::LimitExceeded { .. }) => {
            (StatusCode::PAYLOAD_TOO_LARGE, "too_many_pixels")
        }
        InfditError::Image(I::UnsupportedFormat { .. }) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "not_an_image"),
        InfditError::Image(_) => (StatusCode::BAD_REQUEST, "bad_image"),
        InfditError::ImageSize { .. } | InfditError::Output { .. } => {
            (StatusCode::UNPROCESSABLE_ENTITY, "cannot_upscale")
        }
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    ApiError::new(status, code, message)
}

/// Serves until Ctrl-C or SIGTERM.
pub(crate) async fn run(app: AppState) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(app.cfg.bind).await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let router = router(app.clone());
    let stop = app.clone();
    axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            stop.shutdown.store(true, Ordering::SeqCst);
            // Ends the event streams (an empty id).
            let _ = stop.events.send(String::new());
        })
        .await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

fn router(app: AppState) -> Router {
    let api = Router::new()
        .route(
            "/api/jobs",
            post(create).get(list).layer(DefaultBodyLimit::max(app.cfg.max_upload.saturating_add(1 << 20))),
        )
        .route("/api/jobs/{id}", get(get_job).delete(delete_job))
        .route("/api/jobs/{id}/cancel", post(cancel))
        .route("/api/jobs/{id}/retry", post(retry))
        .route("/api/jobs/{id}/input", get(input_file))
        .route("/api/jobs/{id}/output", get(output_file))
        .route("/api/jobs/{id}/events", get(job_events))
        .route("/api/events", get(all_events))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth));
    Router::new()
        .route("/", get(page))
        .route("/app.js", get(|| async { asset(web::APP_JS, "text/javascript; charset=utf-8") }))
        .route("/app.css", get(|| async { asset(web::APP_CSS, "text/css; charset=utf-8") }))
        .route("/health", get(health))
        .merge(api)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such path (see docs/api.md)") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this path does not take that method")
        })
        .layer(middleware::from_fn_with_state(app.clone(), count))
        .with_state(app)
}

fn asset(body: &'static str, kind: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// Counts requests and answers by class.
async fn count(State(app): State<AppState>, req: Request, next: Next) -> Response {
    app.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let r = next.run(req).await;
    if r.status().is_client_error() {
        app.metrics.client_errors.fetch_add(1, Ordering::Relaxed);
    } else if r.status().is_server_error() {
        app.metrics.server_errors.fetch_add(1, Ordering::Relaxed);
    }
    r
}

/// Whether two strings are equal, in a time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of a request: `Authorization: Bearer T`, or `?token=T` (links, images and event
/// streams, which cannot set headers).
fn request_token<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<&'a str> {
    if let Some(t) =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(t.trim());
    }
    query?.split('&').find_map(|kv| kv.strip_prefix("token="))
}

fn authorized(app: &App, headers: &HeaderMap, query: Option<&str>) -> bool {
    match &app.cfg.token {
        None => true,
        Some(t) => request_token(headers, query).is_some_and(|given| same(&percent_decode(given), t)),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn auth(State(app): State<AppState>, req: Request, next: Next) -> Response {
    if authorized(&app, req.headers(), req.uri().query()) {
        next.run(req).await
    } else {
        let mut r = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this server needs its token: send 'Authorization: Bearer TOKEN' (or ?token=TOKEN)",
        )
        .into_response();
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        r
    }
}

async fn page(State(app): State<AppState>, headers: HeaderMap, req: Request) -> Response {
    if authorized(&app, &headers, req.uri().query()) {
        ([(header::CACHE_CONTROL, "no-cache")], Html(web::INDEX_HTML)).into_response()
    } else {
        (StatusCode::UNAUTHORIZED, Html(web::TOKEN_HTML)).into_response()
    }
}

async fn health(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    let (queued, running) = {
        let counts = app.store().counts()?;
        let get = |s: &str| counts.iter().find(|(k, _)| k == s).map_or(0, |(_, n)| *n);
        (get("queued"), get("running"))
    };
    Ok(Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "workers": app.workers,
        "queued": queued,
        "running": running,
        "device": if app.upscaler.device().device.is_cuda() { "cuda" } else { "cpu" },
        "uptime_seconds": app.started.elapsed().as_secs(),
    })))
}

/// Resident memory of this process (Linux), in bytes.
fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

async fn metrics(State(app): State<AppState>) -> Result<Response, ApiError> {
    let counts = app.store().counts()?;
    let m = &app.metrics;
    let mut s = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, u64)>| {
        s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in lines {
            s.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    let c = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    metric("infdit_http_requests_total", "counter", "HTTP requests served.", vec![(String::new(), c(&m.requests))]);
    metric(
        "infdit_http_errors_total",
        "counter",
        "HTTP answers with an error status.",
        vec![("{class=\"4xx\"}".into(), c(&m.client_errors)), ("{class=\"5xx\"}".into(), c(&m.server_errors))],
    );
    metric(
        "infdit_jobs",
        "gauge",
        "Jobs in the store by state.",
        ["queued", "running", "done", "failed", "cancelled"]
            .iter()
            .map(|st| {
                let n = counts.iter().find(|(k, _)| k == st).map_or(0, |(_, n)| *n);
                (format!("{{state=\"{st}\"}}"), n as u64)
            })
            .collect(),
    );
    metric("infdit_jobs_created_total", "counter", "Jobs accepted.", vec![(String::new(), c(&m.jobs_created))]);
    metric(
        "infdit_jobs_rejected_total",
        "counter",
        "Uploads refused (limits, bad input).",
        vec![(String::new(), c(&m.rejected))],
    );
    metric(
        "infdit_jobs_finished_total",
        "counter",
        "Job runs that ended, by result.",
        vec![
            ("{state=\"done\"}".into(), c(&m.jobs_done)),
            ("{state=\"failed\"}".into(), c(&m.jobs_failed)),
            ("{state=\"cancelled\"}".into(), c(&m.jobs_cancelled)),
        ],
    );
    metric(
        "infdit_job_run_seconds_total",
        "counter",
        "Time workers spent running jobs.",
        vec![(String::new(), c(&m.run_ms) / 1000)],
    );
    metric(
        "infdit_upload_bytes_total",
        "counter",
        "Bytes of accepted uploads.",
        vec![(String::new(), c(&m.upload_bytes))],
    );
    metric("infdit_workers", "gauge", "Jobs that can run at once.", vec![(String::new(), app.workers as u64)]);
    metric(
        "infdit_process_resident_memory_bytes",
        "gauge",
        "Resident memory of the server.",
        vec![(String::new(), rss_bytes().unwrap_or(0))],
    );
    metric(
        "infdit_uptime_seconds",
        "gauge",
        "Seconds since start.",
        vec![(String::new(), app.started.elapsed().as_secs())],
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s).into_response())
}

/// A job as JSON (docs/api.md), with the live progress of a running one.
fn job_json(app: &App, store: &crate::store::Store, j: &JobRow) -> Value {
    let live = lock(&app.live);
    let l = live.get(&j.id);
    let (done, total) = l.map_or((j.work_done as u64, j.work_total as u64), |l| (l.done, l.total.max(1)));
    let eta = l.and_then(|l| {
        let start = l.start_done?;
        let rate = (l.done.saturating_sub(start)) as f64 / l.started.elapsed().as_secs_f64().max(1e-3);
        (rate > 0.0).then(|| (l.total.saturating_sub(l.done)) as f64 / rate)
    });
    let running_ms = l.map_or(0, |l| l.started.elapsed().as_millis() as i64);
    drop(live);
    let place = (j.state == JobState::Queued).then(|| store.queue_place(j.position).unwrap_or(0));
    let options: Value = serde_json::from_str(&j.options).unwrap_or(Value::Null);
    let base = format!("/api/jobs/{}", j.id);
    json!({
        "id": j.id,
        "state": j.state.as_str(),
        "name": j.input_name,
        "options": options,
        "queue_position": place,
        "input": {"width": j.in_size.0, "height": j.in_size.1, "bytes": j.input_bytes, "format": j.input_ext},
        "output": {"width": j.out_size.0, "height": j.out_size.1, "format": j.output_ext},
        "progress": {
            "done": done,
            "total": total,
            "fraction": if j.state == JobState::Done { 1.0 } else if total > 0 { done as f64 / total as f64 } else { 0.0 },
        },
        "eta_seconds": eta.map(|e| (e * 10.0).round() / 10.0),
        "timings": {
            "created_ms": j.created_ms,
            "started_ms": j.started_ms,
            "finished_ms": j.finished_ms,
            "run_seconds": (j.run_ms + running_ms) as f64 / 1000.0,
        },
        "attempts": j.attempts,
        "resumed_steps": j.resumed_steps,
        "error": j.error,
        "links": {
            "self": base,
            "input": format!("{base}/input"),
            "output": (j.state == JobState::Done).then(|| format!("{base}/output")),
            "events": format!("{base}/events"),
        },
    })
}

fn find(app: &App, id: &str) -> Result<Value, ApiError> {
    if !valid_id(id) {
        return Err(ApiError::not_found(id));
    }
    let store = app.store();
    let j = store.get(id)?.ok_or_else(|| ApiError::not_found(id))?;
    Ok(job_json(app, &store, &j))
}

/// Job ids are 16 lowercase hex digits; anything else is no job (and never a path).
fn valid_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A new job id: 64 random bits (the standard library's randomly keyed hasher, the time and a
/// counter).
fn new_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(N.fetch_add(1, Ordering::Relaxed));
    h.write_i64(now_ms());
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// The name of an upload for display: its last path component, printable characters only.
fn display_name(name: Option<&str>) -> String {
    let n = name.unwrap_or("image");
    let n = n.rsplit(['/', '\\']).next().unwrap_or(n);
    let n: String = n.chars().filter(|c| !c.is_control() && !matches!(c, '"' | '<' | '>')).take(120).collect();
    if n.trim().is_empty() || n == "." || n == ".." { "image".into() } else { n }
}

fn check_rate(app: &App, ip: std::net::IpAddr) -> Result<(), ApiError> {
    let per_min = app.cfg.rate_limit;
    if per_min == 0 {
        return Ok(());
    }
    let cap = f64::from(per_min);
    let mut rate = lock(&app.rate);
    if rate.len() > 10_000 {
        rate.retain(|_, (_, t)| t.elapsed() < Duration::from_secs(120));
    }
    let (tokens, last) = rate.entry(ip).or_insert((cap, Instant::now()));
    *tokens = (*tokens + last.elapsed().as_secs_f64() * cap / 60.0).min(cap);
    *last = Instant::now();
    if *tokens >= 1.0 {
        *tokens -= 1.0;
        Ok(())
    } else {
        let wait = ((1.0 - *tokens) * 60.0 / cap).ceil() as u64;
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many uploads: at most {per_min} a minute per client; try again in {wait} s"),
        );
        e.retry_after = Some(wait.max(1));
        Err(e)
    }
}

fn check_queue(app: &App) -> Result<(), ApiError> {
    let active = app.store().active()?;
    if active as usize >= app.cfg.max_queue {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            format!("the queue is full ({} jobs queued or running); try again later", app.cfg.max_queue),
        );
        e.retry_after = Some(10);
        return Err(e);
    }
    Ok(())
}

fn upload_error(e: axum::extract::multipart::MultipartError, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "upload_too_large",
            format!("the upload is larger than the limit of {limit} bytes"),
        )
    } else {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_upload",
            format!("the upload could not be read (cut short?): {}", e.body_text()),
        )
    }
}

/// The image format of an upload, from its first bytes: the extension it is stored under.
fn sniff(bytes: &[u8]) -> Option<&'static str> {
    match image::guess_format(bytes).ok()? {
        image::ImageFormat::Png => Some("png"),
        image::ImageFormat::Jpeg => Some("jpg"),
        image::ImageFormat::WebP => Some("webp"),
        image::ImageFormat::Tiff => Some("tif"),
        image::ImageFormat::Bmp => Some("bmp"),
        _ => None,
    }
}

async fn create(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let r = create_inner(&app, peer, multipart).await;
    if r.is_err() {
        app.metrics.rejected.fetch_add(1, Ordering::Relaxed);
    }
    r
}

async fn create_inner(
    app: &AppState,
    peer: SocketAddr,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    check_rate(app, peer.ip())?;
    check_queue(app)?;
    let limit = app.cfg.max_upload;
    let mut multipart = multipart.map_err(|e| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bad_upload",
            format!(
                "send multipart/form-data with an 'image' file part and an optional 'options' JSON part ({})",
                e.body_text()
            ),
        )
    })?;
    let (mut image, mut name, mut options) = (None::<Vec<u8>>, None, None::<String>);
    while let Some(mut field) = multipart.next_field().await.map_err(|e| upload_error(e, limit))? {
        match field.name() {
            Some("image") => {
                if image.is_some() {
                    return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_upload", "one 'image' part per job"));
                }
                name = Some(display_name(field.file_name()));
                let mut bytes = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(|e| upload_error(e, limit))? {
                    if bytes.len() + chunk.len() > limit {
                        return Err(ApiError::new(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "upload_too_large",
                            format!("the image is larger than the limit of {limit} bytes"),
                        ));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                image = Some(bytes);
            }
            Some("options") => {
                let text = field.text().await.map_err(|e| upload_error(e, limit))?;
                if text.len() > 64 << 10 {
                    return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", "the options are too long"));
                }
                options = Some(text);
            }
            other => {
                let other: String = other.unwrap_or("").chars().take(40).collect();
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_upload",
                    format!("unknown form part '{other}': give 'image' and optionally 'options'"),
                ));
            }
        }
    }
    let bytes =
        image.ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "bad_upload", "no 'image' part in the upload"))?;
    if bytes.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_image", "the image is empty (0 bytes)"));
    }
    let opts: JobOptions = match options.as_deref().map(str::trim) {
        None | Some("") => JobOptions::default(),
        Some(t) => serde_json::from_str(t).map_err(|e| {
            let code = if e.is_data() { "invalid_option" } else { "invalid_json" };
            ApiError::new(StatusCode::BAD_REQUEST, code, format!("options: {e}"))
        })?,
    };
    opts.to_upscale(app.cfg.max_pixels).map_err(|e| library_error(&e, e.to_string()))?;
    let name = name.unwrap_or_else(|| "image".into());
    let ext = sniff(&bytes).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not_an_image",
            format!("{name} is not an image this server reads (PNG, JPEG, WebP, TIFF or BMP)"),
        )
    })?;
    let out_ext = opts.output_extension(Some(ext)).map_err(|e| library_error(&e, e.to_string()))?;
    let id = new_id();
    let dir = app.store().job_dir(&id);
    let input = dir.join(format!("input.{ext}"));
    let output = dir.join(format!("output.{out_ext}"));
    let checked = {
        let (app, dir, input, output, opts, name) =
            (app.clone(), dir.clone(), input.clone(), output.clone(), opts.clone(), name.clone());
        let size = bytes.len();
        tokio::task::spawn_blocking(move || check_upload(&app, &dir, &input, &output, &opts, &name, &bytes))
            .await
            .map_err(ApiError::internal)?
            .map(|c| (c, size))
    };
    let ((in_size, out_size, work), size) = match checked {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    let row = JobRow {
        id: id.clone(),
        position: 0,
        state: JobState::Queued,
        options: serde_json::to_string(&opts).map_err(ApiError::internal)?,
        input_name: name,
        input_ext: ext.into(),
        output_ext: out_ext.into(),
        input_bytes: size as i64,
        in_size,
        out_size,
        work_done: 0,
        work_total: work as i64,
        created_ms: now_ms(),
        started_ms: None,
        finished_ms: None,
        run_ms: 0,
        attempts: 0,
        resumed_steps: 0,
        error: None,
    };
    let json = {
        let store = app.store();
        // Checked again here: the queue may have filled while the upload was read.
        if store.active()? as usize >= app.cfg.max_queue {
            drop(store);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(check_queue(app).err().unwrap_or_else(|| ApiError::internal("queue")));
        }
        if let Err(e) = store.insert(&row) {
            drop(store);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
        let j = store.get(&id)?.ok_or_else(|| ApiError::internal("the new job vanished"))?;
        job_json(app, &store, &j)
    };
    app.metrics.jobs_created.fetch_add(1, Ordering::Relaxed);
    app.metrics.upload_bytes.fetch_add(size as u64, Ordering::Relaxed);
    app.wake_workers();
    app.notify(&id);
    let mut r = (StatusCode::CREATED, Json(json)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/api/jobs/{id}")) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

/// What [`check_upload`] finds: the input size, the output size, the work.
type Checked = ((i64, i64), (i64, i64), u64);

/// Stores the upload and checks it as a run would, before it is queued: the options against the
/// model, the plan from the header ([`plan_file`]), and a full decode with the CLI's limits.
/// Returns the input and output sizes and the work.
fn check_upload(
    app: &App,
    dir: &FsPath,
    input: &FsPath,
    output: &FsPath,
    opts: &JobOptions,
    name: &str,
    bytes: &[u8],
) -> Result<Checked, ApiError> {
    std::fs::create_dir_all(dir).map_err(ApiError::internal)?;
    std::fs::write(input, bytes).map_err(ApiError::internal)?;
    let err = |e: InfditError| library_error(&e, queue::user_message(&e, dir, input, output, name));
    let uo = queue::run_options(app, opts, dir).map_err(err)?;
    let planner = app.upscaler.planner(&uo).map_err(err)?;
    let fp = plan_file(&planner, input, output, &uo, false).map_err(err)?;
    load_image(input, &LoadLimits::for_pixels(uo.max_pixels)).map_err(|e| err(InfditError::Image(e)))?;
    let p = &fp.plan;
    Ok(((p.input.0 as i64, p.input.1 as i64), (p.output.0 as i64, p.output.1 as i64), p.work))
}

async fn list(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    let store = app.store();
    let jobs: Vec<Value> = store.list()?.iter().map(|j| job_json(&app, &store, j)).collect();
    Ok(Json(json!({ "jobs": jobs })))
}

async fn get_job(State(app): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    find(&app, &id).map(Json)
}

async fn cancel(State(app): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    find(&app, &id)?;
    let cancelled = app.store().cancel_queued(&id)?;
    if cancelled {
        app.metrics.jobs_cancelled.fetch_add(1, Ordering::Relaxed);
    } else {
        let live = lock(&app.live);
        match live.get(&id) {
            Some(l) => l.cancel.store(true, Ordering::SeqCst),
            None => {
                drop(live);
                let state = find(&app, &id)?["state"].as_str().unwrap_or("").to_string();
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "not_cancellable",
                    format!("the job is {state}: only queued or running jobs can be cancelled"),
                ));
            }
        }
    }
    app.notify(&id);
    find(&app, &id).map(Json)
}

async fn retry(State(app): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let j = find(&app, &id)?;
    check_queue(&app)?;
    if !app.store().retry(&id)? {
        let state = j["state"].as_str().unwrap_or("");
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_retryable",
            format!("the job is {state}: only failed or cancelled jobs can be retried"),
        ));
    }
    app.wake_workers();
    app.notify(&id);
    find(&app, &id).map(Json)
}

async fn delete_job(State(app): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    find(&app, &id)?;
    let dir = {
        let store = app.store();
        store.delete(&id)?;
        store.job_dir(&id)
    };
    let running = {
        let live = lock(&app.live);
        live.get(&id).inspect(|l| l.cancel.store(true, Ordering::SeqCst)).is_some()
    };
    // A running job's folder goes when its worker stops (at the next network evaluation).
    if !running {
        let _ = tokio::fs::remove_dir_all(&dir).await;
    }
    app.notify(&id);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct FileQuery {
    download: Option<String>,
}

fn mime(ext: &str) -> &'static str {
    match ext {
        "png" => "image/png",
        "jpg" => "image/jpeg",
        "webp" => "image/webp",
        "tif" => "image/tiff",
        "bmp" => "image/bmp",
        _ => "application/octet-stream",
    }
}

async fn send_file(path: PathBuf, ext: &str, name: String, download: bool) -> Result<Response, ApiError> {
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| ApiError::new(StatusCode::NOT_FOUND, "no_file", "the file is not there (removed?)"))?;
    let len = file.metadata().await.map_err(ApiError::internal)?.len();
    let stream = futures_util::stream::unfold(file, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 << 10];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(buf), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    let ascii: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    let disposition = format!("{}; filename=\"{ascii}\"", if download { "attachment" } else { "inline" });
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime(ext)));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}

fn row(app: &App, id: &str) -> Result<(JobRow, PathBuf), ApiError> {
    if !valid_id(id) {
        return Err(ApiError::not_found(id));
    }
    let store = app.store();
    let j = store.get(id)?.ok_or_else(|| ApiError::not_found(id))?;
    let dir = store.job_dir(id);
    Ok((j, dir))
}

async fn input_file(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> Result<Response, ApiError> {
    let (j, dir) = row(&app, &id)?;
    send_file(dir.join(format!("input.{}", j.input_ext)), &j.input_ext, j.input_name.clone(), q.download.is_some())
        .await
}

async fn output_file(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> Result<Response, ApiError> {
    let (j, dir) = row(&app, &id)?;
    if j.state != JobState::Done {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_done",
            format!("the job is {}: no output yet", j.state.as_str()),
        ));
    }
    let stem = j.input_name.rsplit_once('.').map_or(j.input_name.as_str(), |(s, _)| s);
    let name = format!("{stem}_{}x{}.{}", j.out_size.0, j.out_size.1, j.output_ext);
    send_file(dir.join(format!("output.{}", j.output_ext)), &j.output_ext, name, q.download.is_some()).await
}

type Events = std::pin::Pin<Box<dyn Stream<Item = Result<SseEvent, Infallible>> + Send>>;

/// Live updates of one job (`job` events with the job's JSON), ending once it is final (or
/// `deleted`).
async fn job_events(State(app): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let first = find(&app, &id)?;
    let rx = app.events.subscribe();
    let stream =
        futures_util::stream::unfold((app, rx, id, Some(first), false), |(app, mut rx, id, first, end)| async move {
            if end {
                return None;
            }
            let send = |j: Value| {
                let fin = j["state"].as_str().is_some_and(|s| matches!(s, "done" | "failed" | "cancelled"));
                (SseEvent::default().event("job").data(j.to_string()), fin)
            };
            if let Some(j) = first {
                let (ev, fin) = send(j);
                return Some((Ok(ev), (app, rx, id, None, fin)));
            }
            loop {
                match rx.recv().await {
                    Ok(changed) if changed.is_empty() => return None,
                    Ok(changed) if changed != id => continue,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
                return match find(&app, &id) {
                    Ok(j) => {
                        let (ev, fin) = send(j);
                        Some((Ok(ev), (app, rx, id, None, fin)))
                    }
                    Err(_) => {
                        let ev = SseEvent::default().event("deleted").data(json!({"id": id}).to_string());
                        Some((Ok(ev), (app, rx, id, None, true)))
                    }
                };
            }
        });
    Ok(Sse::new(Box::pin(stream) as Events).keep_alive(KeepAlive::default()).into_response())
}

/// Live updates of every job: `job` events (the job's JSON) and `deleted` events (`{"id"}`).
async fn all_events(State(app): State<AppState>) -> Response {
    let rx = app.events.subscribe();
    let stream = futures_util::stream::unfold((app, rx), |(app, mut rx)| async move {
        loop {
            let id = match rx.recv().await {
                Ok(id) if id.is_empty() => return None,
                Ok(id) => id,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            };
            let ev = match find(&app, &id) {
                Ok(j) => SseEvent::default().event("job").data(j.to_string()),
                Err(_) => SseEvent::default().event("deleted").data(json!({"id": id}).to_string()),
            };
            return Some((Ok(ev), (app, rx)));
        }
    });
    Sse::new(Box::pin(stream) as Events).keep_alive(KeepAlive::default()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids_are_never_paths() {
        assert_eq!(display_name(Some("../../etc/passwd")), "passwd");
        assert_eq!(display_name(Some("..")), "image");
        assert_eq!(display_name(Some("C:\\x\\a<b>.png")), "ab.png");
        assert!(valid_id(&new_id()));
        assert!(!valid_id("../0123456789abc"));
        assert_ne!(new_id(), new_id());
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert!(same("secret12", "secret12") && !same("secret12", "secret13"));
    }
}
