//! A real single-node Slurm cluster (Debian's slurm-wlm and munge, started by
//! deploy/slurm/local-cluster.sh in a temporary folder) runs deploy/slurm/infdit-array.sbatch:
//! an array of 4 tasks over a folder of small images gives the single-machine outputs bit for
//! bit; a task re-queued mid-run (`scontrol requeue`: SIGTERM, then back in the queue) resumes its
//! checkpoint and finishes; `infdit batch status` reports it all. Needs root. Without Slurm the
//! test is skipped, unless CI is set (CI installs it: .ci/run), where that is a failure.
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{images, infdit, noisy_png, tmpdir};

fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// What is missing to run the test, if anything.
fn missing() -> Option<String> {
    for tool in ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo"] {
        let found = ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists());
        if !found {
            return Some(format!("{tool} is not installed (apt-get install slurm-wlm munge)"));
        }
    }
    let uid = Command::new("id").arg("-u").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.as_deref() != Some("0") {
        return Some("the test cluster's slurmd must run as root".into());
    }
    None
}

/// The cluster, stopped (its own daemons, by their pid files) when dropped.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

impl Cluster {
    fn start(dir: &Path) -> Self {
        let o = Command::new(repo().join("deploy/slurm/local-cluster.sh")).arg("start").arg(dir).output().unwrap();
        let c = Cluster { dir: dir.to_path_buf(), conf: dir.join("slurm.conf") };
        assert!(o.status.success(), "the cluster did not start: {}", String::from_utf8_lossy(&o.stderr));
        c
    }
    fn cmd(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        c.env("SLURM_CONF", &self.conf).env("PATH", format!("{}:/usr/sbin", std::env::var("PATH").unwrap_or_default()));
        c
    }
    fn ok(&self, c: &mut Command) -> String {
        let o = c.output().unwrap();
        assert!(
            o.status.success(),
            "{c:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }
    /// `sbatch` of the deploy script over `inp` into `out` (relative to `cwd`).
    fn sbatch(&self, cwd: &Path, array: &str, inp: &str, out: &str, flags: &[&str]) -> String {
        let mut c = self.cmd("sbatch");
        c.current_dir(cwd)
            .arg("--parsable")
            .arg(format!("--array={array}"))
            .arg(format!("--export=ALL,INFDIT={}", env!("CARGO_BIN_EXE_infdit")))
            .arg(repo().join("deploy/slurm/infdit-array.sbatch"))
            .args([inp, out])
            .args(flags);
        self.ok(&mut c)
    }
    /// Jobs still in the queue, as `id state reason` lines.
    fn queue(&self) -> String {
        self.ok(self.cmd("squeue").args(["-h", "-o", "%i %T %r"]))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("deploy/slurm/local-cluster.sh")).arg("stop").arg(&self.dir).status();
    }
}

fn run(c: &mut Command) -> Output {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{c:?}: {}", String::from_utf8_lossy(&o.stderr));
    o
}

fn status(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&run(infdit().args(["batch", "status", "--json"]).arg(out)).stdout).unwrap()
}

/// Polls `f` every 200 ms until it gives Some, at most `limit`.
fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn slurm_array_shards_a_batch_and_a_requeued_task_resumes() {
    if let Some(why) = missing() {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set and the Slurm test cannot run: {why}");
        }
        eprintln!("SKIPPED the Slurm test: {why}");
        return;
    }
    let t_all = Instant::now();
    let dir = tmpdir("slurm");
    // Eight small images of varied sizes, two in a subfolder.
    let sizes = [(16, 16), (48, 40), (24, 16), (32, 32), (16, 24), (40, 48), (16, 16), (32, 16)];
    for (i, (w, h)) in sizes.into_iter().enumerate() {
        let sub = if i % 3 == 0 { "sub/" } else { "" };
        noisy_png(&dir.join(format!("in/{sub}img{i}.png")), w, h, i as u32);
    }
    let t0 = Instant::now();
    let cluster = Cluster::start(&dir.join("cluster"));
    let t_start = t0.elapsed();

    // 1. An array of 4 tasks; every output equals the single-machine run's, bit for bit.
    let t0 = Instant::now();
    // (Polled every 200 ms rather than `sbatch --wait`, which polls after 2, 8 and 32 s and so
    // measures its own back-off.)
    let job = cluster.sbatch(&dir, "0-3", "in", "out", &["--steps", "2"]);
    wait_for("the array of 4 to finish", Duration::from_secs(300), || cluster.queue().is_empty().then_some(()));
    let t_array = t0.elapsed();
    run(infdit().current_dir(&dir).args(["upscale", "in", "-o", "single", "--steps", "2", "-q"]));
    let (single, sharded) = (images(&dir.join("single"), Some("png")), images(&dir.join("out"), Some("png")));
    assert_eq!(single.len(), 8);
    assert_eq!(single, sharded, "the array's outputs differ from the single-machine run");
    let s = status(&dir.join("out"));
    assert_eq!((s["done"].as_u64(), s["failed"].as_u64(), s["missing"].as_u64()), (Some(8), Some(0), Some(0)));
    assert_eq!(s["shards"], 4);
    for k in 0..4 {
        let log = std::fs::read_to_string(dir.join(format!("infdit-{job}_{k}.log"))).unwrap();
        assert!(log.contains(&format!("shard {k}/4: ")), "task {k}: {log}");
    }

    // 2. A task re-queued mid-run: SIGTERM stops it with its checkpoint in the shared tree, the
    // new attempt resumes and finishes its file.
    noisy_png(&dir.join("in2/large.png"), 96, 96, 42);
    noisy_png(&dir.join("in2/a.png"), 16, 16, 1);
    noisy_png(&dir.join("in2/b.png"), 24, 16, 2);
    let t0 = Instant::now();
    let job = cluster.sbatch(&dir, "0-1", "in2", "out2", &["--steps", "4", "-v"]);
    let out2 = dir.join("out2");
    let state = out2.join(".infdit/checkpoints/large_x4.png.state/infdit-state.safetensors");
    wait_for("the large file's first checkpoint", Duration::from_secs(300), || state.exists().then_some(()));
    let partition: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out2.join(".infdit/partition.json")).unwrap()).unwrap();
    let k = partition["files"]["large_x4.png"]["shard"].as_u64().unwrap();
    let task = format!("{job}_{k}");
    cluster.ok(cluster.cmd("scontrol").args(["requeue", &task]));
    let record = out2.join(".infdit/records/large_x4.png.json");
    wait_for("the interrupted record", Duration::from_secs(120), || {
        std::fs::read_to_string(&record).ok().filter(|r| r.contains("\"interrupted\"")).map(|_| ())
    });
    // Slurm holds a re-queued batch job back (BeginTime, about 2 minutes); let it go now.
    wait_for("the requeued task to be pending", Duration::from_secs(120), || {
        let q = cluster.queue();
        q.lines().any(|l| l.starts_with(&task) && l.contains("PENDING")).then_some(())
    });
    cluster.ok(cluster.cmd("scontrol").args(["update", &format!("JobId={task}"), "StartTime=now"]));
    wait_for("the array to finish", Duration::from_secs(300), || cluster.queue().is_empty().then_some(()));
    let t_requeue = t0.elapsed();
    let log = std::fs::read_to_string(dir.join(format!("infdit-{task}.log"))).unwrap();
    assert!(log.contains("interrupted while upscaling in2/large.png"), "{log}");
    assert!(log.contains("attempt 2"), "{log}");
    assert!(log.contains("pass 1: resumed from step"), "{log}");
    let s = status(&out2);
    assert_eq!((s["done"].as_u64(), s["complete"].as_bool()), (Some(3), Some(true)), "{s}");
    assert!(!state.exists(), "the checkpoint is removed once the output is written");
    run(infdit().current_dir(&dir).args(["upscale", "in2", "-o", "single2", "--steps", "4", "-q"]));
    assert_eq!(images(&dir.join("single2"), Some("png")), images(&out2, Some("png")), "the resumed outputs differ");
    let status_text = String::from_utf8_lossy(&run(infdit().args(["batch", "status"]).arg(&out2)).stdout).to_string();
    assert!(status_text.contains("3 done, 0 failed, 0 missing"), "{status_text}");
    drop(cluster);
    eprintln!(
        "slurm test: cluster start {:.1} s, array of 4 over 8 images {:.1} s, requeue run {:.1} s, whole test {:.1} s",
        t_start.as_secs_f64(),
        t_array.as_secs_f64(),
        t_requeue.as_secs_f64(),
        t_all.elapsed().as_secs_f64()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
