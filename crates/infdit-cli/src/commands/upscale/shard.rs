//! `upscale --shard`: picks this worker's files from the library's partition, skips the files an
//! earlier attempt finished, and writes each file's record (docs/scale-out.md).

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{Result, anyhow, bail};

use infdit::batch::{BatchDir, FileRecord, Outcome, Partition, Shard, ShardSpec, WorkItem, layout, record};
use infdit::upscale::FilePlan;

use super::Job;
use crate::args::UpscaleArgs;

/// A sharded run: where its bookkeeping goes and which shard it is.
pub(super) struct Sharding {
    pub dir: BatchDir,
    pub shard: Shard,
    /// `batch retry --run`: the failed and missing files of every shard.
    pub all: bool,
    pub partition: Partition,
}

/// The shard of `--shard` (read from the engine's environment for `auto`), or None without the flag.
pub(super) fn resolve(a: &UpscaleArgs, batch: bool) -> Result<Option<Shard>> {
    let Some(spec) = a.shard else { return Ok(None) };
    if !batch {
        bail!("--shard applies to a batch: give several inputs, a folder or a pattern, and -o a folder");
    }
    match spec {
        ShardSpec::Fixed(s) => Ok(Some(s)),
        ShardSpec::Auto => {
            let env: HashMap<String, String> = std::env::vars().collect();
            infdit::batch::shard_from_env(&env).map(Some).map_err(|e| anyhow!("--shard auto: {e}"))
        }
    }
}

/// The name of a job in the partition and the records: its output below -o, `/`-separated.
pub(super) fn job_name(job: &Job) -> String {
    let rel = job.rel_out.as_deref().unwrap_or(job.output.as_path());
    rel.to_string_lossy().replace('\\', "/")
}

impl Sharding {
    /// Partitions every listed job (keeping the saved partition's places), saves the partition
    /// unless `dry_run`, and keeps this shard's jobs that are not done yet. Returns the kept jobs
    /// with their checks, and how many of this shard's files an earlier attempt finished.
    #[allow(clippy::type_complexity)]
    pub fn select(
        a: &UpscaleArgs,
        shard: Shard,
        jobs: Vec<Job>,
        checked: Vec<Result<FilePlan, String>>,
        dry_run: bool,
    ) -> Result<(Self, Vec<Job>, Vec<Result<FilePlan, String>>, usize)> {
        let dir = BatchDir::new(&a.output);
        let items: Vec<WorkItem> = jobs
            .iter()
            .zip(&checked)
            .map(|(j, c)| WorkItem {
                name: job_name(j),
                input: j.input.display().to_string(),
                work: c.as_ref().map_or(0, |p| p.plan.work),
            })
            .collect();
        let previous = Partition::load(&dir.partition_path()).map_err(|e| anyhow!("{e}"))?;
        let count = if a.retry_all { previous.as_ref().map_or(shard.count, |p| p.shards) } else { shard.count };
        let mut partition = Partition::new(&items, count, previous.as_ref());
        partition.command = std::env::args().collect();
        partition.cwd = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default();
        if let Some(p) = &previous
            && a.retry_all
        {
            // A retry keeps the command of the run it retries.
            partition.command = p.command.clone();
            partition.cwd = p.cwd.clone();
        }
        let changed = previous.as_ref().is_none_or(|p| !p.same_assignment(&partition) || p.command.is_empty());
        if changed && !dry_run {
            partition.save(&dir.partition_path()).map_err(|e| anyhow!("{e}"))?;
        }
        let sharding = Self { dir, shard: Shard { index: shard.index, count }, all: a.retry_all, partition };
        let mut done_before = 0;
        let (mut kept, mut kept_checks) = (Vec::new(), Vec::new());
        for (job, check) in jobs.into_iter().zip(checked) {
            let name = job_name(&job);
            if !sharding.all && !sharding.partition.owns(sharding.shard.index, &name) {
                continue;
            }
            let done = matches!(FileRecord::read(&sharding.dir, &name), Ok(Some(r)) if r.outcome == Outcome::Done)
                && job.output.is_file();
            if done {
                done_before += 1;
                continue;
            }
            kept.push(job);
            kept_checks.push(check);
        }
        Ok((sharding, kept, kept_checks, done_before))
    }

    /// The shard label of a record: `K/N`, or the file's own shard in a retry.
    fn label(&self, name: &str) -> String {
        match (self.all, self.partition.files.get(name)) {
            (true, Some(f)) => format!("{}/{} (retry)", f.shard, self.shard.count),
            _ => self.shard.to_string(),
        }
    }

    /// Writes the record of `job`'s attempt (started at `started`); a record that cannot be
    /// written is a warning, not a failure of the file.
    pub fn record(&self, job: &Job, outcome: Outcome, error: Option<String>, work: u64, started: Instant) {
        let name = job_name(job);
        let r = FileRecord {
            shard: self.label(&name),
            name,
            input: job.input.display().to_string(),
            outcome,
            error,
            host: layout::host_name(),
            pid: std::process::id(),
            finished_unix: record::now_unix(),
            elapsed_s: started.elapsed().as_secs_f64(),
            work,
        };
        if let Err(e) = r.write(&self.dir) {
            eprintln!("warning: cannot write the record of {}: {e}", job.input.display());
        }
    }
}
