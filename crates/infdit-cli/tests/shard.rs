//! Sharded batches on one machine (docs/scale-out.md): `upscale --shard`, `batch status|retry`,
//! SIGTERM, and `plan wavefront`, with the built-in model. The real Slurm cluster is tests/slurm.rs.
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{images, infdit, noisy_png, tmpdir};

/// Six small images of different sizes (so that balancing by work differs from by count).
fn inputs(dir: &Path) -> PathBuf {
    let inp = dir.join("in");
    for (i, (w, h)) in [(16, 16), (48, 40), (24, 16), (32, 32), (16, 24), (40, 48)].into_iter().enumerate() {
        let sub = if i % 3 == 0 { "sub/" } else { "" };
        noisy_png(&inp.join(format!("{sub}img{i}.png")), w, h, i as u32);
    }
    inp
}

fn run(c: &mut Command) -> Output {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{c:?}: {}", String::from_utf8_lossy(&o.stderr));
    o
}

fn upscale(inp: &Path, out: &Path, extra: &[&str]) -> Command {
    upscale_steps(inp, out, "2", extra)
}

fn upscale_steps(inp: &Path, out: &Path, steps: &str, extra: &[&str]) -> Command {
    let mut c = infdit();
    c.arg("upscale").arg(inp).arg("-o").arg(out).args(["--steps", steps]).args(extra);
    for v in ["SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_COUNT"] {
        c.env_remove(v);
    }
    c.env_remove("JOB_COMPLETION_INDEX").env_remove("INFDIT_SHARD_COUNT");
    c
}

fn status_json(out: &Path) -> serde_json::Value {
    let o = run(infdit().args(["batch", "status", "--json"]).arg(out));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn partition(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join(".infdit/partition.json")).unwrap()).unwrap()
}

/// Three shards give the single-machine outputs bit for bit; the partition is balanced by work;
/// files added later keep the others' places and only they run; status and retry see it all.
#[test]
fn shards_equal_one_run_and_additions_run_only_what_is_new() {
    let dir = tmpdir("shards");
    let inp = inputs(&dir);
    let (single, out) = (dir.join("single"), dir.join("out"));
    run(&mut upscale(&inp, &single, &[]));
    for k in 0..3 {
        let o = run(upscale(&inp, &out, &["--shard", &format!("{k}/3")]).arg("-v"));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(&format!("shard {k}/3: ")), "{err}");
    }
    let (a, b) = (images(&single, None), images(&out, None));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "sharded outputs differ from the single run");

    let p = partition(&out);
    let files = p["files"].as_object().unwrap();
    assert_eq!(files.len(), 6);
    let mut loads = [0u64; 3];
    for f in files.values() {
        loads[f["shard"].as_u64().unwrap() as usize] += f["work"].as_u64().unwrap();
    }
    let total: u64 = loads.iter().sum();
    let largest = files.values().map(|f| f["work"].as_u64().unwrap()).max().unwrap();
    assert!(loads.iter().all(|&l| l <= total / 3 + largest), "{loads:?}");
    assert!(p["command"].as_array().unwrap().iter().any(|a| a == "--shard"));

    let s = status_json(&out);
    assert_eq!((s["done"].as_u64(), s["failed"].as_u64(), s["missing"].as_u64()), (Some(6), Some(0), Some(0)));
    assert_eq!(s["complete"], true);
    assert_eq!(s["by_shard"].as_array().unwrap().len(), 3);
    let rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(".infdit/records/sub/img0_x4.png.json")).unwrap())
            .unwrap();
    assert_eq!(rec["outcome"], "done");
    assert!(rec["elapsed_s"].as_f64().unwrap() > 0.0);
    assert!(!rec["host"].as_str().unwrap().is_empty());

    // Two files more: the six keep their shards, each shard runs only its new files.
    noisy_png(&inp.join("new/a.png"), 32, 16, 77);
    noisy_png(&inp.join("new/b.png"), 16, 32, 78);
    let mut ran = 0;
    for k in 0..3 {
        let o = run(upscale(&inp, &out, &["--shard", &format!("{k}/3")]).arg("-v"));
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        let line = err.lines().find(|l| l.starts_with(&format!("shard {k}/3"))).unwrap().to_string();
        ran += line.split(' ').nth(2).unwrap().parse::<usize>().unwrap();
        assert!(line.contains(" of 8 files"), "{line}");
    }
    assert_eq!(ran, 2, "only the new files run");
    let p2 = partition(&out);
    for (name, f) in files {
        assert_eq!(p2["files"][name]["shard"], f["shard"], "{name} moved");
    }
    let s = status_json(&out);
    assert_eq!((s["done"].as_u64(), s["missing"].as_u64()), (Some(8), Some(0)));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A file that fails gets a record with its error; status counts it; retry lists it (and the
/// missing ones: a shard never run), and `retry --run` runs exactly those.
#[test]
fn failed_and_missing_files_are_reported_and_retried() {
    let dir = tmpdir("retry");
    let inp = inputs(&dir);
    std::fs::write(inp.join("broken.png"), b"not a png at all").unwrap();
    let out = dir.join("out");
    // Shard 0 of 2 only; shard 1 is never run.
    let o = upscale(&inp, &out, &["--shard", "0/2"]).output().unwrap();
    let p = partition(&out);
    let broken_shard = p["files"]["broken_x4.png"]["shard"].as_u64().unwrap();
    let s = status_json(&out);
    let n0 = p["files"].as_object().unwrap().values().filter(|f| f["shard"] == 0).count() as u64;
    assert_eq!(s["shards"], 2);
    assert_eq!(s["by_shard"][0]["files"].as_u64(), Some(n0));
    assert_eq!(s["by_shard"][1]["missing"].as_u64(), Some(7 - n0));
    if broken_shard == 0 {
        assert_eq!(o.status.code(), Some(1));
        assert_eq!(s["failed"].as_u64(), Some(1));
        let rec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(".infdit/records/broken_x4.png.json")).unwrap())
                .unwrap();
        assert_eq!(rec["outcome"], "failed");
        assert!(rec["error"].as_str().unwrap().contains("broken.png"), "{rec}");
    }
    let list = run(infdit().args(["batch", "retry", "--json"]).arg(&out));
    let listed: Vec<serde_json::Value> =
        String::from_utf8_lossy(&list.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(listed.len() as u64, 7 - s["done"].as_u64().unwrap());
    assert!(listed.iter().any(|e| e["name"] == "broken_x4.png"));

    // Mend the broken file; the retry runs every failed and missing file, in one process.
    noisy_png(&inp.join("broken.png"), 16, 16, 9);
    let r = run(infdit().args(["batch", "retry", "--run"]).arg(&out));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains(&format!("retry: {} of 7 files to run", listed.len())), "{err}");
    let s = status_json(&out);
    assert_eq!((s["done"].as_u64(), s["complete"].as_bool()), (Some(7), Some(true)));
    let single = dir.join("single");
    run(&mut upscale(&inp, &single, &[]));
    assert_eq!(images(&single, None), images(&out, None));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--shard auto` with exactly what a pod of deploy/k8s/job.yaml sees, and with a Slurm array's
/// variables; clear errors for a bad shard or no engine.
#[test]
fn shard_auto_from_the_engine_environment_and_bad_shards() {
    let dir = tmpdir("auto");
    let inp = inputs(&dir);
    let out = dir.join("out");
    let o = run(upscale(&inp, &out, &["--shard", "auto", "--dry-run"])
        .env("JOB_COMPLETION_INDEX", "2")
        .env("INFDIT_SHARD_COUNT", "3")
        .env("HOSTNAME", "infdit-2-abcde"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("shard 2/3: "), "{err}");
    // The count deploy/k8s/job.yaml passes, for its last index.
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/k8s/job.yaml")).unwrap();
    let field = |key: &str| {
        let line = manifest.lines().map(str::trim).find(|l| l.starts_with(key)).unwrap().to_string();
        line[key.len()..].trim().trim_matches('"').to_string()
    };
    let completions: usize = field("completions:").parse().unwrap();
    let lines: Vec<&str> = manifest.lines().map(str::trim).collect();
    let at = lines.iter().position(|l| *l == "- name: INFDIT_SHARD_COUNT").unwrap();
    let count = lines[at + 1].strip_prefix("value:").unwrap().trim().trim_matches('"').to_string();
    assert_eq!(count.parse::<usize>().unwrap(), completions, "INFDIT_SHARD_COUNT must equal completions");
    let last = (completions - 1).to_string();
    let o = run(upscale(&inp, &out, &["--shard", "auto", "--dry-run"])
        .env("JOB_COMPLETION_INDEX", &last)
        .env("INFDIT_SHARD_COUNT", &count));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("shard {last}/{completions}: ")), "{err}");
    assert!(!out.join(".infdit/partition.json").exists(), "a dry run writes nothing");
    let o = run(upscale(&inp, &out, &["--shard", "auto", "--dry-run"])
        .env("SLURM_ARRAY_TASK_ID", "5")
        .env("SLURM_ARRAY_TASK_MIN", "4")
        .env("SLURM_ARRAY_TASK_MAX", "7")
        .env("SLURM_ARRAY_TASK_COUNT", "4"));
    assert!(String::from_utf8_lossy(&o.stderr).contains("shard 1/4: "));

    let o = upscale(&inp, &out, &["--shard", "auto"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--shard auto: no batch engine"), "{err}");
    let o = upscale(&inp, &out, &["--shard", "auto"]).env("JOB_COMPLETION_INDEX", "0").output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("INFDIT_SHARD_COUNT"));
    let o = upscale(&inp, &out, &["--shard", "5/4"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("below the count (3)") && !err.contains("panick"), "{err}");
    let o = upscale(&inp.join("img1.png"), &dir.join("one.png"), &["--shard", "0/2"]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("--shard applies to a batch"));
    let o = infdit().args(["batch", "status"]).arg(dir.join("nothing")).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no sharded batch here"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A second worker on a file under way skips it (the state folder is locked). SIGTERM (what Slurm
/// and Kubernetes send) stops a worker at the next block batch with its checkpoint in the shared
/// tree and an "interrupted" record; the next attempt resumes it and writes the uninterrupted image.
#[cfg(unix)]
#[test]
fn sigterm_keeps_the_checkpoint_and_the_next_attempt_resumes() {
    let dir = tmpdir("sigterm");
    let inp = dir.join("in");
    noisy_png(&inp.join("big.png"), 64, 64, 3);
    let out = dir.join("out");
    let mut child =
        upscale_steps(&inp, &out, "4", &["--shard", "0/1", "-v"]).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let state = out.join(".infdit/checkpoints/big_x4.png.state/infdit-state.safetensors");
    let t0 = std::time::Instant::now();
    while !state.exists() {
        assert!(t0.elapsed().as_secs() < 300, "no checkpoint after 300 s");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before its first checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A second worker on the same file (a duplicate submission) skips it: the folder is locked.
    let o = run(&mut upscale_steps(&inp, &out, "4", &["--shard", "0/1"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("skipped") && err.contains("another worker is on it"), "{err}");
    assert!(!out.join(".infdit/records/big_x4.png.json").exists() && !out.join("big_x4.png").exists());
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted while upscaling"), "{err}");
    assert!(state.exists() && !out.join("big_x4.png").exists());
    let rec = std::fs::read_to_string(out.join(".infdit/records/big_x4.png.json")).unwrap();
    assert!(rec.contains("\"interrupted\""), "{rec}");
    let s = status_json(&out);
    assert_eq!((s["done"].as_u64(), s["missing"].as_u64()), (Some(0), Some(1)));

    let o = run(&mut upscale_steps(&inp, &out, "4", &["--shard", "0/1", "-v"]));
    assert!(String::from_utf8_lossy(&o.stderr).contains("resumed from step"));
    assert!(!state.exists(), "the checkpoint is removed once the output is written");
    let single = dir.join("single");
    run(&mut upscale_steps(&inp, &single, "4", &[]));
    assert_eq!(images(&single, None), images(&out, None));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The wavefront simulator through the CLI: one device takes blocks x block time; strips on 4
/// devices pipeline row by row.
#[test]
fn plan_wavefront_prints_makespan_speedup_and_memory() {
    let o = run(infdit().args([
        "plan",
        "wavefront",
        "--size",
        "2048x2048",
        "--devices",
        "1,4",
        "--block-time-ms",
        "10",
        "--link-gbps",
        "1000000",
        "--json",
    ]));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    // 16 x 16 blocks of 128 px.
    assert!((lines[0]["makespan_s"].as_f64().unwrap() - 2.56).abs() < 1e-9, "{}", lines[0]);
    let four = lines[1]["makespan_s"].as_f64().unwrap();
    assert!((four - 19.0 * 4.0 * 0.010).abs() < 1e-3, "{four}");
    assert!((lines[1]["speedup"].as_f64().unwrap() - 2.56 / four).abs() < 1e-9);
    assert!(
        lines[1]["memory_per_device_bytes"].as_u64().unwrap() < lines[0]["memory_per_device_bytes"].as_u64().unwrap()
    );
    let o = infdit().args(["plan", "wavefront", "--size", "16384"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("WxH"));
}

/// In a sharded batch other machines write into the same folders, where a writer's process id says
/// nothing: a temporary file of an hour ago is left alone (only a day-old one is stale), while a
/// run on one machine removes it. `--skip-existing` outputs count as done.
#[cfg(unix)]
#[test]
fn shared_folders_keep_recent_partials_of_other_writers() {
    let dir = tmpdir("partials");
    let inp = dir.join("in");
    noisy_png(&inp.join("a.png"), 16, 16, 1);
    noisy_png(&inp.join("b.png"), 16, 16, 2);
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    // Another host's writer (a process id that does not run here), started an hour ago.
    let other = out.join(".a_x4.png.infdit-999999999-0.partial");
    std::fs::write(&other, b"half an image").unwrap();
    assert!(Command::new("touch").args(["-d", "1 hour ago"]).arg(&other).status().unwrap().success());
    std::fs::write(out.join("b_x4.png"), b"already there").unwrap();
    run(&mut upscale(&inp, &out, &["--shard", "0/1", "--skip-existing"]));
    assert!(other.exists(), "a recent temporary file of another writer was removed");
    let s = status_json(&out);
    assert_eq!((s["done"].as_u64(), s["complete"].as_bool()), (Some(2), Some(true)), "{s}");
    // One machine: the killed run's file is stale.
    run(&mut upscale(&inp, &out, &[]));
    assert!(!other.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
