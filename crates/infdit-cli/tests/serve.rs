//! `infdit serve` end to end: the real binary on 127.0.0.1 with a real SQLite file, the built-in
//! model, tiny images. The API, bad requests, limits and the token, kill -9 and resume, a bounded
//! load, and the page in headless Chromium (serve_browser below).
#![allow(clippy::unwrap_used)] // tests stop at the first failure

mod serve_common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::Value;
use serve_common::{Server, multipart, png, raw, request, scratch, target_dir};

fn decode(bytes: &[u8]) -> image::DynamicImage {
    image::load_from_memory(bytes).unwrap()
}

/// Upload, progress, events, download, list, cancel, retry, delete, health and metrics, against
/// the SQLite file the server keeps.
#[test]
fn api_runs_jobs_and_keeps_them_in_sqlite() {
    let dir = scratch("api");
    let s = Server::start(&dir.join("data"), &["--workers", "1"]);
    let img = png(16, 16, 1);
    let r = s.upload("../../photo one.png", &img, r#"{"scale": 4, "steps": 1, "seed": 5}"#);
    assert_eq!(r.status, 201, "{}", r.text());
    let j = r.json();
    let id = j["id"].as_str().unwrap().to_string();
    assert_eq!(r.header("location").unwrap(), format!("/api/jobs/{id}"));
    assert_eq!(j["name"], "photo one.png", "the name is the last path component only");
    assert_eq!((j["input"]["width"].as_i64(), j["output"]["width"].as_i64()), (Some(16), Some(64)));
    assert!(j["progress"]["total"].as_u64().unwrap() > 0);

    let done = s.wait_final(&id, 60);
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["progress"]["fraction"], 1.0);
    assert_eq!(done["attempts"], 1);
    assert!(done["timings"]["run_seconds"].as_f64().unwrap() > 0.0);
    let out = s.request("GET", &format!("/api/jobs/{id}/output"), &[], b"");
    assert_eq!(out.status, 200);
    assert_eq!(out.header("content-type"), Some("image/png"));
    let o = decode(&out.body);
    assert_eq!((o.width(), o.height()), (64, 64));
    let dl = s.request("GET", &format!("/api/jobs/{id}/output?download=1"), &[], b"");
    assert_eq!(dl.header("content-disposition"), Some("attachment; filename=\"photo_one_64x64.png\""));
    let input = s.request("GET", &format!("/api/jobs/{id}/input"), &[], b"");
    assert_eq!(input.body, img, "the input comes back as uploaded");

    // The event stream of a finished job: its state, then the end of the stream.
    let ev = s.request("GET", &format!("/api/jobs/{id}/events"), &[], b"");
    assert_eq!(ev.header("content-type"), Some("text/event-stream"));
    let text = ev.text();
    assert!(text.starts_with("event: job\ndata: {"), "{text}");
    assert!(text.contains("\"state\":\"done\""), "{text}");

    // Same options, same output: one seed, one image.
    let r2 = s.upload("b.png", &img, r#"{"scale": 4, "steps": 1, "seed": 5}"#);
    let id2 = r2.json()["id"].as_str().unwrap().to_string();
    assert_eq!(s.wait_final(&id2, 60)["state"], "done");
    let out2 = s.request("GET", &format!("/api/jobs/{id2}/output"), &[], b"");
    assert_eq!(out2.body, out.body);

    // Cancel a queued job (behind a slow one), retry it, it finishes.
    let slow = s.upload("slow.png", &png(32, 32, 2), r#"{"steps": 8}"#).json()["id"].as_str().unwrap().to_string();
    let queued = s.upload("q.png", &img, r#"{"steps": 1}"#).json();
    let qid = queued["id"].as_str().unwrap().to_string();
    let c = s.request("POST", &format!("/api/jobs/{qid}/cancel"), &[], b"");
    assert_eq!(c.status, 200, "{}", c.text());
    assert_eq!(c.json()["state"], "cancelled");
    let again = s.request("POST", &format!("/api/jobs/{qid}/cancel"), &[], b"");
    assert_eq!((again.status, again.json()["code"].as_str()), (409, Some("not_cancellable")));
    // Cancel the running one too: it stops at its next network evaluation.
    let c = s.request("POST", &format!("/api/jobs/{slow}/cancel"), &[], b"");
    assert_eq!(c.status, 200);
    assert_eq!(s.wait_final(&slow, 60)["state"], "cancelled");
    let r = s.request("POST", &format!("/api/jobs/{qid}/retry"), &[], b"");
    assert_eq!(r.status, 200);
    // Queued again; an idle worker may have taken it already.
    assert!(matches!(r.json()["state"].as_str(), Some("queued" | "running" | "done")), "{}", r.text());
    assert_eq!(s.wait_final(&qid, 60)["state"], "done");
    let r = s.request("POST", &format!("/api/jobs/{qid}/retry"), &[], b"");
    assert_eq!((r.status, r.json()["code"].as_str()), (409, Some("not_retryable")));

    let (st, list) = s.get_json("/api/jobs");
    assert_eq!(st, 200);
    let ids: Vec<&str> = list["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [id.as_str(), id2.as_str(), slow.as_str(), qid.as_str()], "listed in queue order");

    // The SQLite file holds the same.
    let db = rusqlite::Connection::open(dir.join("data/infdit.sqlite")).unwrap();
    let version: i64 = db.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
    assert_eq!(version, 1);
    let states: Vec<(String, String)> = db
        .prepare("SELECT id, state FROM jobs ORDER BY position")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let expect = [(&id, "done"), (&id2, "done"), (&slow, "cancelled"), (&qid, "done")];
    assert_eq!(states, expect.map(|(i, s)| (i.clone(), s.to_string())));
    assert!(dir.join(format!("data/jobs/{id}/output.png")).is_file());
    assert!(!dir.join(format!("data/jobs/{slow}/checkpoint")).exists(), "a cancelled job's resume state goes");

    let d = s.request("DELETE", &format!("/api/jobs/{id}"), &[], b"");
    assert_eq!(d.status, 204);
    assert!(!dir.join(format!("data/jobs/{id}")).exists());
    assert_eq!(s.get_json(&format!("/api/jobs/{id}")).0, 404);

    let (st, h) = s.get_json("/health");
    assert_eq!((st, h["status"].as_str(), h["workers"].as_u64()), (200, Some("ok"), Some(1)));
    let m = s.request("GET", "/metrics", &[], b"").text();
    assert!(m.contains("infdit_jobs_created_total 4\n"), "{m}");
    assert!(m.contains("infdit_jobs{state=\"done\"} 2\n"), "{m}");
    assert!(m.contains("infdit_jobs_finished_total{state=\"cancelled\"} 2\n"), "{m}");
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Broken and hostile requests each get a 4xx JSON error naming the problem, and the server
/// stays healthy; the limits (upload size, pixels, rate, queue) answer 413/429.
#[test]
fn bad_requests_get_4xx_and_leave_the_server_healthy() {
    let dir = scratch("bad");
    let s = Server::start(
        &dir.join("data"),
        &["--max-upload", "64K", "--max-pixels", "4096", "--rate-limit", "20", "--max-queue", "3"],
    );
    let img = png(16, 16, 3);
    let bad = |r: &serve_common::Reply, status: u16, code: &str| {
        assert_eq!(r.status, status, "{}", r.text());
        let j = r.json();
        assert_eq!(j["code"], code, "{j}");
        assert!(j["error"].as_str().is_some_and(|e| e.len() > 10), "{j}");
    };
    // A truncated upload: the body ends before its Content-Length.
    let (ct, body) = multipart(&[("image", Some("a.png"), &img)]);
    let head = format!(
        "POST /api/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut cut = head.into_bytes();
    cut.extend_from_slice(&body[..body.len() / 2]);
    bad(&raw(s.port, &cut, true), 400, "bad_upload");
    // A truncated image file, a non-image, a GIF (not read), an empty file.
    let truncated = &img[..img.len() - 30];
    bad(&s.upload("t.png", truncated, "{}"), 400, "bad_image");
    bad(&s.upload("notes.png", b"just some text, not an image at all", "{}"), 415, "not_an_image");
    bad(&s.upload("e.png", b"", "{}"), 400, "bad_image");
    // Wrong content types.
    let r = s.request("POST", "/api/jobs", &[("Content-Type", "application/json")], br#"{"scale": 4}"#);
    bad(&r, 415, "bad_upload");
    // Invalid JSON, an unknown option, an option out of range.
    bad(&s.upload("a.png", &img, r#"{"scale": 4,"#), 400, "invalid_json");
    bad(&s.upload("a.png", &img, r#"{"noise": "/etc/passwd"}"#), 400, "invalid_option");
    bad(&s.upload("a.png", &img, r#"{"steps": 0}"#), 400, "invalid_option");
    bad(&s.upload("a.png", &img, r#"{"ensemble": 3}"#), 400, "invalid_option");
    bad(&s.upload("a.png", &img, r#"{"scale": "big"}"#), 400, "invalid_option");
    // No image part, an unknown part.
    let (ct, body) = multipart(&[("options", None, b"{}")]);
    bad(&s.request("POST", "/api/jobs", &[("Content-Type", &ct)], &body), 400, "bad_upload");
    let (ct, body) = multipart(&[("file", Some("../../x"), &img)]);
    bad(&s.request("POST", "/api/jobs", &[("Content-Type", &ct)], &body), 400, "bad_upload");
    // Over the limits: bytes and pixels.
    bad(&s.upload("big.png", &vec![0x89; 100 << 10], "{}"), 413, "upload_too_large");
    bad(&s.upload("p.png", &png(100, 100, 1), "{}"), 413, "too_many_pixels");
    // An output past the largest side (docs/api.md: `scale`).
    bad(&s.upload("a.png", &img, r#"{"scale": 1e9}"#), 413, "too_large");
    // Huge headers: hyper's own limit.
    let huge = "a".repeat(600 << 10);
    let r = raw(s.port, format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {huge}\r\n\r\n").as_bytes(), false);
    assert_eq!(r.status, 431);
    // Unknown job ids, a path in an id, unknown paths and methods.
    for p in ["/api/jobs/0123456789abcdef", "/api/jobs/..%2F..%2Fetc%2Fpasswd", "/api/jobs/zz/output"] {
        let r = s.request("GET", p, &[], b"");
        bad(&r, 404, "not_found");
    }
    bad(&s.request("POST", "/api/jobs/0123456789abcdef/cancel", &[], b""), 404, "not_found");
    bad(&s.request("DELETE", "/api/jobs/nope", &[], b""), 404, "not_found");
    bad(&s.request("GET", "/etc/passwd", &[], b""), 404, "not_found");
    bad(&s.request("PUT", "/api/jobs", &[], b""), 405, "method_not_allowed");

    // Nothing was queued, nothing is left behind in the data folder.
    let (_, list) = s.get_json("/api/jobs");
    assert_eq!(list["jobs"].as_array().unwrap().len(), 0);
    assert_eq!(std::fs::read_dir(dir.join("data/jobs")).unwrap().count(), 0);

    // The queue limit: 3 jobs queued or running, the 4th is refused.
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = s.upload("q.png", &img, r#"{"steps": 12}"#);
        assert_eq!(r.status, 201, "upload {i}: {}", r.text());
        ids.push(r.json()["id"].as_str().unwrap().to_string());
    }
    let r = s.upload("q.png", &img, r#"{"steps": 1}"#);
    bad(&r, 429, "queue_full");
    assert!(r.header("retry-after").is_some());
    for id in &ids {
        s.request("POST", &format!("/api/jobs/{id}/cancel"), &[], b"");
    }
    // The rate limit: 20 uploads a minute from one client, about 19 used above.
    let mut limited = None;
    for _ in 0..10 {
        let r = s.upload("r.png", b"not an image", "{}");
        if r.status == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("no 429 within 30 uploads at 20 a minute");
    bad(&r, 429, "rate_limited");
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);

    let (st, h) = s.get_json("/health");
    assert_eq!((st, h["status"].as_str()), (200, Some("ok")));
    let m = s.request("GET", "/metrics", &[], b"").text();
    assert!(m.contains("infdit_http_errors_total{class=\"5xx\"} 0\n"), "{m}");
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Beyond loopback the server needs a token; with one, every API call and the page need it.
#[test]
fn the_token_guards_the_api_and_the_page() {
    let dir = scratch("token");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_infdit"))
        .args(["serve", "--bind", "0.0.0.0:0", "--data-dir"])
        .arg(dir.join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("give --token"), "{}", String::from_utf8_lossy(&out.stderr));

    let s = Server::start(&dir.join("data"), &["--token", "s3cret-token"]);
    // Without --workers, the number comes from the device's memory plan.
    let up = infdit::Upscaler::new(&infdit::ModelSpec::BuiltIn, &Default::default()).unwrap();
    let want = infdit_server::default_workers(&up).unwrap();
    assert!((1..=2).contains(&want), "at most 2 on the CPU: {want}");
    assert_eq!(s.get_json("/health").1["workers"].as_u64(), Some(want as u64));
    assert_eq!(s.request("GET", "/api/jobs", &[], b"").status, 401);
    assert_eq!(s.request("GET", "/api/jobs", &[("Authorization", "Bearer wrong-token")], b"").status, 401);
    assert_eq!(s.request("GET", "/metrics", &[], b"").status, 401);
    assert_eq!(s.upload("a.png", &png(8, 8, 0), "{}").status, 401);
    assert_eq!(s.request("GET", "/api/jobs", &[("Authorization", "Bearer s3cret-token")], b"").status, 200);
    assert_eq!(s.request("GET", "/api/jobs?token=s3cret-token", &[], b"").status, 200);
    let page = s.request("GET", "/", &[], b"");
    assert_eq!(page.status, 401);
    assert!(page.text().contains("needs its token"));
    let page = s.request("GET", "/?token=s3cret-token", &[], b"");
    assert_eq!(page.status, 200);
    assert!(page.text().contains("<script src=\"app.js\">"));
    assert_eq!(s.request("GET", "/health", &[], b"").status, 200);
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Retention: beyond `--keep-jobs` finished jobs, the oldest go with their files; a second server
/// on the same data folder is refused.
#[test]
fn retention_removes_the_oldest_finished_jobs() {
    let dir = scratch("retention");
    // One worker: with more, the jobs finish in any order and "oldest" is not the upload order.
    let s = Server::start(&dir.join("data"), &["--keep-jobs", "2", "--workers", "1"]);
    let ids: Vec<String> = (0..3)
        .map(|i| {
            let r = s.upload("r.png", &png(8, 8, i), r#"{"steps": 1, "scale": 2}"#);
            assert_eq!(r.status, 201, "{}", r.text());
            r.json()["id"].as_str().unwrap().to_string()
        })
        .collect();
    let t = Instant::now();
    let kept = loop {
        let (_, list) = s.get_json("/api/jobs");
        let jobs: Vec<(String, String)> = list["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| (j["id"].as_str().unwrap().to_string(), j["state"].as_str().unwrap().to_string()))
            .collect();
        if jobs.len() == 2 && jobs.iter().all(|(_, s)| s == "done") {
            break jobs;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{jobs:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(kept.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(), [ids[1].as_str(), ids[2].as_str()]);
    assert!(!dir.join("data/jobs").join(&ids[0]).exists(), "the removed job's files go too");
    assert_eq!(s.get_json(&format!("/api/jobs/{}", ids[0])).0, 404);

    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_infdit"))
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(st) = second.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > Duration::from_secs(30) {
            second.kill().unwrap();
            panic!("a second server on the same data folder kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("another infdit serve uses this data folder"), "{err}");
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Any file below `dir` whose name is `name`.
fn find_file(dir: &std::path::Path, name: &str) -> bool {
    std::fs::read_dir(dir).into_iter().flatten().flatten().any(|e| {
        let p = e.path();
        if p.is_dir() { find_file(&p, name) } else { p.file_name().is_some_and(|n| n == name) }
    })
}

/// The interrupted-job tests' set-up: a 32 x 32 `in.png` upscaled with 10 steps and `seed` by the CLI into
/// `ref.png` (the uninterrupted run), and the same job uploaded to a one-worker server on `dir/data`:
/// the reference file, the server and the job's id.
fn reference_and_job(dir: &std::path::Path, seed: u64) -> (std::path::PathBuf, Server, String) {
    let input = dir.join("in.png");
    std::fs::write(&input, png(32, 32, 9)).unwrap();
    let reference = dir.join("ref.png");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_infdit"))
        .args(["upscale", "-q", "--steps", "10", "--seed", &seed.to_string()])
        .arg(&input)
        .arg("-o")
        .arg(&reference)
        .status()
        .unwrap();
    assert!(st.success());
    let s = Server::start(&dir.join("data"), &["--workers", "1"]);
    let r = s.upload("in.png", &std::fs::read(&input).unwrap(), &format!(r#"{{"steps": 10, "seed": {seed}}}"#));
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    (reference, s, id)
}

/// Waits (at most 120 s) until job `id` has saved a sampler step; its checkpoint folder.
fn wait_for_checkpoint(data: &std::path::Path, id: &str) -> std::path::PathBuf {
    let ck = data.join("jobs").join(id).join("checkpoint");
    let t = Instant::now();
    while !find_file(&ck, "infdit-state.safetensors") {
        assert!(t.elapsed() < Duration::from_secs(120), "no checkpoint after 120 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    ck
}

/// kill -9 while a job runs (after its first sampler step is saved), with two jobs queued behind
/// it: after a restart the job resumes from its saved step and gives the image of an
/// uninterrupted run, bit for bit, and the queued jobs run in their order.
#[test]
fn a_job_killed_mid_run_resumes_after_a_restart_bit_identical() {
    let dir = scratch("restart");
    let data = dir.join("data");
    let (reference, s, id) = reference_and_job(&dir, 3);
    let b = s.upload("b.png", &png(16, 16, 1), r#"{"steps": 1}"#).json()["id"].as_str().unwrap().to_string();
    let c = s.upload("c.png", &png(16, 16, 2), r#"{"steps": 1}"#).json()["id"].as_str().unwrap().to_string();
    wait_for_checkpoint(&data, &id);
    s.kill();
    let db = rusqlite::Connection::open(data.join("infdit.sqlite")).unwrap();
    let state: String = db.query_row("SELECT state FROM jobs WHERE id = ?1", [&id], |r| r.get(0)).unwrap();
    assert_eq!(state, "running", "killed while running");
    assert!(!data.join("jobs").join(&id).join("output.png").exists());

    let s = Server::start(&data, &["--workers", "1"]);
    let j = s.wait_final(&id, 120);
    assert_eq!(j["state"], "done", "{j}");
    assert_eq!(j["attempts"], 2);
    let resumed = j["resumed_steps"].as_i64().unwrap();
    assert!((1..10).contains(&resumed), "resumed from step {resumed}");
    let out = s.request("GET", &format!("/api/jobs/{id}/output"), &[], b"");
    let want = std::fs::read(&reference).unwrap();
    assert_eq!(decode(&out.body).to_rgb8().into_raw(), decode(&want).to_rgb8().into_raw(), "pixels differ");
    assert_eq!(out.body, want, "file bytes differ");
    let (jb, jc) = (s.wait_final(&b, 60), s.wait_final(&c, 60));
    assert_eq!((jb["state"].as_str(), jc["state"].as_str()), (Some("done"), Some("done")));
    let started = |j: &Value| j["timings"]["started_ms"].as_i64().unwrap();
    assert!(started(&j) <= started(&jb) && started(&jb) <= started(&jc), "queue order kept: {j} {jb} {jc}");
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SIGTERM while a job runs (after its first sampler step is saved): the server exits with status 0, the
/// job is queued again with its checkpoint, and after a restart it finishes with the uninterrupted run's bytes.
#[test]
fn sigterm_stops_the_server_and_the_running_job_goes_back_to_the_queue() {
    let dir = scratch("sigterm");
    let data = dir.join("data");
    let (reference, s, id) = reference_and_job(&dir, 4);
    let ck = wait_for_checkpoint(&data, &id);
    // A clean stop: exit status 0, the job queued again (not failed, not cancelled), its last step kept.
    let status = s.terminate(60);
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let db = rusqlite::Connection::open(data.join("infdit.sqlite")).unwrap();
    let (state, error): (String, Option<String>) =
        db.query_row("SELECT state, error FROM jobs WHERE id = ?1", [&id], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    assert_eq!((state.as_str(), error), ("queued", None));
    drop(db);
    assert!(find_file(&ck, "infdit-state.safetensors"), "the checkpoint was kept");
    assert!(!data.join("jobs").join(&id).join("output.png").exists());

    // The next start finishes it from the kept step, with the uninterrupted run's bytes.
    let s = Server::start(&data, &["--workers", "1"]);
    let j = s.wait_final(&id, 120);
    assert_eq!(j["state"], "done", "{j}");
    let resumed = j["resumed_steps"].as_i64().unwrap();
    assert!((1..10).contains(&resumed), "resumed from step {resumed}");
    let out = s.request("GET", &format!("/api/jobs/{id}/output"), &[], b"");
    assert_eq!(out.body, std::fs::read(&reference).unwrap(), "file bytes differ");
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Percentile `p` (0-100) of sorted durations, in milliseconds.
fn pct(sorted: &[Duration], p: usize) -> f64 {
    sorted[(sorted.len() - 1) * p / 100].as_secs_f64() * 1e3
}

/// A bounded load: N uploads (200 by default; SERVE_LOAD_JOBS) from 8 concurrent clients, each
/// polling its jobs; nothing is lost, every job is accounted for, memory stays bounded. Prints
/// the latency and memory figures (bench/serve-load.sh).
#[test]
fn load_uploads_from_8_clients_are_all_accounted_for() {
    let n: usize = std::env::var("SERVE_LOAD_JOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let clients = 8;
    let dir = scratch("load");
    let s = Server::start(&dir.join("data"), &["--workers", "2", "--rate-limit", "0", "--max-queue", "1000"]);
    let port = s.port;
    let rss_idle = s.peak_rss();
    let t0 = Instant::now();
    let results: Vec<(Vec<String>, Vec<Duration>, Vec<Duration>)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                sc.spawn(move || {
                    let (mut ids, mut up, mut get) = (Vec::new(), Vec::new(), Vec::new());
                    for k in (c..n).step_by(clients) {
                        let img = png(8, 8, k as u32);
                        let (ct, body) = multipart(&[
                            ("image", Some("l.png"), &img),
                            ("options", None, br#"{"steps": 1, "scale": 2}"#),
                        ]);
                        let t = Instant::now();
                        let r = request(port, "POST", "/api/jobs", &[("Content-Type", &ct)], &body);
                        up.push(t.elapsed());
                        assert_eq!(r.status, 201, "{}", r.text());
                        ids.push(r.json()["id"].as_str().unwrap().to_string());
                        let t = Instant::now();
                        let r = request(port, "GET", &format!("/api/jobs/{}", ids[ids.len() - 1]), &[], b"");
                        get.push(t.elapsed());
                        assert_eq!(r.status, 200);
                    }
                    (ids, up, get)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let submitted = t0.elapsed();
    let ids: Vec<String> = results.iter().flat_map(|r| r.0.clone()).collect();
    let mut up: Vec<Duration> = results.iter().flat_map(|r| r.1.clone()).collect();
    let mut get: Vec<Duration> = results.iter().flat_map(|r| r.2.clone()).collect();
    assert_eq!(ids.len(), n);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), n, "ids are unique");
    // Every job finishes.
    let t = Instant::now();
    loop {
        let (_, list) = s.get_json("/api/jobs");
        let jobs = list["jobs"].as_array().unwrap();
        assert_eq!(jobs.len(), n, "every job is listed");
        let done = jobs.iter().filter(|j| j["state"] == "done").count();
        assert!(jobs.iter().all(|j| j["state"] != "failed"), "a job failed");
        if done == n {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(600), "{done} of {n} done after 600 s");
        std::thread::sleep(Duration::from_millis(250));
    }
    let all = t0.elapsed();
    let listed: HashSet<String> = {
        let (_, list) = s.get_json("/api/jobs");
        list["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(listed, ids.iter().cloned().collect::<HashSet<_>>());
    for id in &ids {
        assert!(s.data.join("jobs").join(id).join("output.png").is_file());
    }
    let m = s.request("GET", "/metrics", &[], b"").text();
    assert!(m.contains(&format!("infdit_jobs_created_total {n}\n")), "{m}");
    assert!(m.contains(&format!("infdit_jobs_finished_total{{state=\"done\"}} {n}\n")), "{m}");
    let peak = s.peak_rss();
    up.sort();
    get.sort();
    eprintln!(
        "serve load: {n} uploads from {clients} clients (8x8 PNG, scale 2, 1 step, 2 workers): submitted in {:.2} s, all \
         done in {:.2} s ({:.1} jobs/s); upload latency p50 {:.1} ms p95 {:.1} ms max {:.1} ms; GET job p50 {:.1} ms \
         p95 {:.1} ms max {:.1} ms; server peak RSS {:.0} MiB (idle {:.0} MiB)",
        submitted.as_secs_f64(),
        all.as_secs_f64(),
        n as f64 / all.as_secs_f64(),
        pct(&up, 50),
        pct(&up, 95),
        pct(&up, 100),
        pct(&get, 50),
        pct(&get, 95),
        pct(&get, 100),
        peak as f64 / (1 << 20) as f64,
        rss_idle as f64 / (1 << 20) as f64,
    );
    assert!(peak < 2 << 30, "server peak RSS {peak} bytes: memory is not bounded");
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A WebDriver session of chromedriver (W3C protocol over HTTP, no client library).
struct Browser {
    driver: std::process::Child,
    port: u16,
    session: String,
}

impl Browser {
    fn cmd(&self, method: &str, path: &str, body: &Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let body = if method == "GET" { String::new() } else { body.to_string() };
        let r = request(self.port, method, &path, &[("Content-Type", "application/json")], body.as_bytes());
        assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
        r.json()["value"].clone()
    }

    fn js(&self, script: &str, args: Value) -> Value {
        self.cmd("POST", "/execute/sync", &serde_json::json!({"script": script, "args": args}))
    }

    fn element(&self, css: &str) -> Value {
        let v = self.cmd("POST", "/element", &serde_json::json!({"using": "css selector", "value": css}));
        v["element-6066-11e4-a52e-4f735466cecf"].clone()
    }

    /// A screenshot, decoded, and saved as `path`.
    fn screenshot(&self, path: &std::path::Path) -> image::DynamicImage {
        let b64 = self.cmd("GET", "/screenshot", &Value::Null);
        let png = base64(b64.as_str().unwrap());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, &png).unwrap();
        decode(&png)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = request(self.port, "DELETE", &format!("/session/{}", self.session), &[], b"");
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let clean: Vec<u8> = s.bytes().filter(|c| !matches!(c, b'=' | b'\n' | b'\r')).collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &c)| acc | (u32::from(val(c)) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

fn encode_base64(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Chromium and chromedriver, or `None` (a skip outside CI; a failure in CI, which installs them).
fn browser_binaries() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let dirs: Vec<std::path::PathBuf> = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
    let find = |names: &[&str]| names.iter().flat_map(|n| dirs.iter().map(move |d| d.join(n))).find(|p| p.is_file());
    let chromium = std::env::var_os("CHROMIUM")
        .map(Into::into)
        .or_else(|| find(&["chromium", "chromium-browser", "google-chrome"]));
    let driver = std::env::var_os("CHROMEDRIVER").map(Into::into).or_else(|| find(&["chromedriver"]));
    match (chromium, driver) {
        (Some(c), Some(d)) => Some((c, d)),
        _ if std::env::var_os("CI").is_some() => {
            panic!("CI is set but chromium and/or chromedriver are missing (apt-get install chromium chromium-driver)")
        }
        _ => {
            eprintln!("SKIPPED serve_page_in_headless_chromium: chromium and chromedriver are not installed");
            None
        }
    }
}

fn start_browser(chromium: &std::path::Path, driver: &std::path::Path, w: u32, h: u32) -> Browser {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = std::process::Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && request(port, "GET", "/status", &[], b"").json()["value"]["ready"] == true
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium.to_str().unwrap(),
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     format!("--window-size={w},{h}"), "--hide-scrollbars", "--force-device-scale-factor=1"]
        }
    }}});
    let r = request(port, "POST", "/session", &[("Content-Type", "application/json")], caps.to_string().as_bytes());
    assert_eq!(r.status, 200, "new session: {}", r.text());
    let session = r.json()["value"]["sessionId"].as_str().unwrap().to_string();
    Browser { driver: child, port, session }
}

/// The page in headless Chromium: an image dropped on it is uploaded, its job runs, the result
/// opens in the before/after viewer at 1:1 pixels; dragging the divider moves the split and the
/// output's clip; the keyboard zooms; at phone width the page is one column without horizontal
/// scrolling. Screenshots: target/serve-artifacts/.
#[test]
fn serve_page_in_headless_chromium() {
    let Some((chromium, driver)) = browser_binaries() else { return };
    let dir = scratch("browser");
    let s = Server::start(&dir.join("data"), &[]);
    let b = start_browser(&chromium, &driver, 1280, 860);
    b.cmd("POST", "/url", &serde_json::json!({"url": format!("http://127.0.0.1:{}/", s.port)}));
    assert_eq!(b.js("return document.title", serde_json::json!([])), "infdit — upscaler");
    // The options, typed as a user would: 2 steps.
    let steps = b.element("#steps");
    b.cmd("POST", &format!("/element/{}/value", steps.as_str().unwrap()), &serde_json::json!({"text": "2"}));
    // ... and an ensemble of 2 runs, picked from its list.
    let two_runs = b.element("#ensemble option[value='2']");
    b.cmd("POST", &format!("/element/{}/click", two_runs.as_str().unwrap()), &serde_json::json!({}));
    // Drop a 24x24 image on the drop zone (a real drop event with the file in its DataTransfer).
    let img = png(24, 24, 4);
    b.js(
        "const bin = atob(arguments[0]); const a = new Uint8Array(bin.length);
         for (let i = 0; i < bin.length; i++) a[i] = bin.charCodeAt(i);
         const dt = new DataTransfer(); dt.items.add(new File([a], 'dropped.png', {type: 'image/png'}));
         const z = document.getElementById('drop');
         for (const t of ['dragenter', 'dragover', 'drop'])
           z.dispatchEvent(new DragEvent(t, {dataTransfer: dt, bubbles: true, cancelable: true}));",
        serde_json::json!([encode_base64(&img)]),
    );
    // Wait for the result in the viewer.
    let t = Instant::now();
    let shown = loop {
        let v = b.js(
            "const a = document.getElementById('after'), bf = document.getElementById('before');
             return {viewer: !document.getElementById('viewer').hidden, w: a.naturalWidth, h: a.naturalHeight,
                     ok: a.complete && bf.complete && bf.naturalWidth > 0,
                     states: [...document.querySelectorAll('.job')].map(j => j.dataset.state),
                     notice: document.getElementById('notice').textContent}",
            serde_json::json!([]),
        );
        if v["viewer"] == true && v["ok"] == true && v["w"] == 96 {
            break v;
        }
        assert!(t.elapsed() < Duration::from_secs(90), "no result on the page after 90 s: {v}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(shown["h"], 96);
    assert_eq!(shown["states"], serde_json::json!(["done"]));
    let meta = b.js("return document.querySelector('.job .meta').textContent", serde_json::json!([]));
    assert!(meta.as_str().unwrap().starts_with("24×24 → 96×96 · 100%"), "{meta}");
    assert_eq!(b.js("return document.getElementById('zoom-label').textContent", serde_json::json!([])), "100%");
    // The job the page made is the server's.
    let (_, list) = s.get_json("/api/jobs");
    assert_eq!(list["jobs"][0]["name"], "dropped.png");
    assert_eq!(list["jobs"][0]["options"]["steps"], 2);
    assert_eq!(list["jobs"][0]["options"]["ensemble"], 2);
    assert_eq!(list["jobs"][0]["options"]["scale"], 4.0);
    b.screenshot(&target_dir().join("serve-e2e-before-drag.png"));

    // Drag the divider (at the stage's centre) 30 px to the left.
    let stage = b.element("#stage");
    let geo = |b: &Browser| {
        b.js(
            "const s = document.getElementById('stage').getBoundingClientRect(); const st = window.infdit.state;
             return {w: s.width, split: Number(document.getElementById('split').value),
                     label: document.getElementById('split-label').textContent,
                     clip: document.getElementById('after').style.clipPath, x: st.x, zoom: st.zoom,
                     divider: document.getElementById('divider').getBoundingClientRect().left - s.left}",
            serde_json::json!([]),
        )
    };
    let g0 = geo(&b);
    assert_eq!(g0["split"], 50);
    let origin = serde_json::json!({"element-6066-11e4-a52e-4f735466cecf": stage});
    b.cmd(
        "POST",
        "/actions",
        &serde_json::json!({"actions": [{"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"}, "actions": [
            {"type": "pointerMove", "origin": origin, "x": 0, "y": 0, "duration": 0},
            {"type": "pointerDown", "button": 0},
            {"type": "pointerMove", "origin": "pointer", "x": -15, "y": 0, "duration": 100},
            {"type": "pointerMove", "origin": "pointer", "x": -15, "y": 0, "duration": 100},
            {"type": "pointerUp", "button": 0}
        ]}]}),
    );
    let g1 = geo(&b);
    let w = g1["w"].as_f64().unwrap();
    let want = ((0.5 * w - 30.0) / w * 100.0).round();
    assert_eq!(g1["split"].as_f64().unwrap(), want, "{g1}");
    assert_eq!(g1["label"], format!("{want}%"));
    assert!((g1["divider"].as_f64().unwrap() - (0.5 * w - 30.0)).abs() <= 2.0, "{g1}");
    // The output is clipped at the divider, in image pixels (zoom 1: screen pixels).
    let cut = ((0.5 * w - 30.0) - g1["x"].as_f64().unwrap()) / g1["zoom"].as_f64().unwrap();
    let clip = g1["clip"].as_str().unwrap();
    let shown_cut: f64 = clip.trim_start_matches("inset(0px 0px 0px ").trim_end_matches("px)").parse().unwrap_or(-1.0);
    assert!((shown_cut - cut).abs() < 1.0 && (10.0..40.0).contains(&cut), "clip {clip}, expected {cut}");
    // The keyboard: '+' on the stage zooms in to 200 %, '0' back to 1:1.
    b.cmd("POST", &format!("/element/{}/value", stage.as_str().unwrap()), &serde_json::json!({"text": "+"}));
    assert_eq!(b.js("return document.getElementById('zoom-label').textContent", serde_json::json!([])), "200%");
    let shot = b.screenshot(&target_dir().join("serve-e2e.png"));
    assert!(shot.width() == 1280 && shot.height() > 500, "{} x {}", shot.width(), shot.height());
    b.cmd("POST", &format!("/element/{}/value", stage.as_str().unwrap()), &serde_json::json!({"text": "0"}));
    assert_eq!(b.js("return document.getElementById('zoom-label').textContent", serde_json::json!([])), "100%");

    // Phone width: one column, nothing wider than the screen.
    b.cmd("POST", "/window/rect", &serde_json::json!({"width": 390, "height": 844}));
    let phone = b.js(
        "const r = (s) => document.querySelector(s).getBoundingClientRect();
         return {inner: window.innerWidth, scroll: document.documentElement.scrollWidth,
                 stacked: r('#viewer').top >= r('#add').bottom && r('#queue').top >= r('#viewer').bottom}",
        serde_json::json!([]),
    );
    assert_eq!(phone["stacked"], true, "{phone}");
    assert!(phone["scroll"].as_f64().unwrap() <= phone["inner"].as_f64().unwrap(), "{phone}");
    b.screenshot(&target_dir().join("serve-e2e-phone.png"));
    drop(b);
    drop(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Not a test: the screenshot of docs/img/serve.png, of a server already running.
/// `SERVE_URL=http://127.0.0.1:PORT/#view=ID SERVE_SHOT=docs/img/serve.png cargo test -p infdit-cli --test serve
/// -- --ignored screenshot_for_the_docs`
#[test]
#[ignore = "takes the docs' screenshot of a running server (SERVE_URL, SERVE_SHOT)"]
fn screenshot_for_the_docs() {
    let Some((chromium, driver)) = browser_binaries() else { return };
    let url = std::env::var("SERVE_URL").unwrap();
    let out = std::path::PathBuf::from(std::env::var("SERVE_SHOT").unwrap());
    let b = start_browser(&chromium, &driver, 1280, 860);
    b.cmd("POST", "/url", &serde_json::json!({ "url": url }));
    std::thread::sleep(Duration::from_secs(3));
    b.js(
        "const s = window.infdit.state; s.split = 0.5; document.getElementById('zoom-1').click();",
        serde_json::json!([]),
    );
    std::thread::sleep(Duration::from_secs(1));
    b.screenshot(&out);
}
