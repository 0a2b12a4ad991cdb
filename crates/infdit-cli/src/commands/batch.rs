//! `infdit batch status|retry`: a sharded batch's state across all its shards, from the output
//! tree's bookkeeping (the library's [`infdit::batch::Summary`]).

use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use serde_json::json;

use infdit::batch::{BatchDir, Counts, FileState, ShardSpec, Summary};

use crate::args::{BatchArgs, BatchCommand, BatchRetryArgs, BatchStatusArgs, Cli, Command};

/// Runs `infdit batch ...`.
pub(crate) fn batch(a: BatchArgs) -> Result<ExitCode> {
    match a.command {
        BatchCommand::Status(s) => status(&s),
        BatchCommand::Retry(r) => retry(r),
    }
}

fn read(out: &std::path::Path) -> Result<Summary> {
    Summary::read(&BatchDir::new(out)).map_err(|e| match e {
        // The batch's own bookkeeping (no batch here, a damaged partition): the message as it is.
        infdit::InfditError::Config(msg) => anyhow!(msg),
        other => anyhow!("{}", super::upscale::flag_message(&other)),
    })
}

fn counts_json(c: &Counts) -> serde_json::Value {
    json!({"files": c.files(), "done": c.done, "failed": c.failed, "missing": c.missing,
           "work_done": c.work_done, "work_total": c.work_total})
}

fn state_name(s: &FileState) -> &'static str {
    match s {
        FileState::Done => "done",
        FileState::Failed(_) => "failed",
        FileState::Missing(_) => "missing",
    }
}

fn state_detail(s: &FileState) -> String {
    match s {
        FileState::Done => String::new(),
        FileState::Failed(e) => e.clone(),
        FileState::Missing(why) => (*why).to_string(),
    }
}

fn status(a: &BatchStatusArgs) -> Result<ExitCode> {
    let s = read(&a.output)?;
    let n = s.partition.shards;
    if a.json {
        let shards: Vec<_> = s.shards.iter().map(counts_json).collect();
        let files: Vec<_> = s
            .to_retry()
            .map(|e| {
                json!({"name": e.name, "input": e.input, "shard": e.shard, "state": state_name(&e.state),
                            "detail": state_detail(&e.state)})
            })
            .collect();
        let mut total = counts_json(&s.total);
        total["shards"] = json!(n);
        total["by_shard"] = json!(shards);
        total["not_done"] = json!(files);
        total["complete"] = json!(s.total.done == s.total.files());
        println!("{total}");
        return Ok(ExitCode::SUCCESS);
    }
    let t = &s.total;
    let pct = |c: &Counts| if c.work_total > 0 { 100.0 * c.work_done as f64 / c.work_total as f64 } else { 100.0 };
    println!(
        "{}: {} files in {n} shards: {} done, {} failed, {} missing ({:.1} % of the work done)",
        a.output.display(),
        t.files(),
        t.done,
        t.failed,
        t.missing,
        pct(t)
    );
    for (k, c) in s.shards.iter().enumerate() {
        println!(
            "  shard {k}/{n}: {} files, {} done, {} failed, {} missing; work {} block evaluations",
            c.files(),
            c.done,
            c.failed,
            c.missing,
            c.work_total
        );
    }
    for e in s.to_retry() {
        if matches!(e.state, FileState::Failed(_)) || a.verbose {
            let at = e
                .record
                .as_ref()
                .map(|r| format!(" [{} on {}, {:.1} s]", r.shard, r.host, r.elapsed_s))
                .unwrap_or_default();
            println!("  {} {} (shard {}): {}{at}", state_name(&e.state), e.name, e.shard, state_detail(&e.state));
        }
    }
    if t.done == t.files() {
        println!("complete");
    } else {
        println!("not complete: `infdit batch retry {}` lists the rest, --run runs them", a.output.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn retry(a: BatchRetryArgs) -> Result<ExitCode> {
    let s = read(&a.output)?;
    let todo: Vec<_> = s.to_retry().collect();
    if !a.run {
        for e in &todo {
            if a.json {
                println!(
                    "{}",
                    json!({"name": e.name, "input": e.input, "shard": e.shard, "state": state_name(&e.state),
                           "detail": state_detail(&e.state)})
                );
            } else {
                println!("{}\t{}\t{}\t{}", state_name(&e.state), e.input, e.name, state_detail(&e.state));
            }
        }
        if !a.json {
            eprintln!("{} to retry ({} failed, {} missing)", todo.len(), s.total.failed, s.total.missing);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if todo.is_empty() {
        eprintln!("nothing to retry: every file is done");
        return Ok(ExitCode::SUCCESS);
    }
    let p = &s.partition;
    if p.command.is_empty() {
        bail!("{}: the batch's command line is not recorded; rerun its upscale command instead", a.output.display());
    }
    let cli = Cli::try_parse_from(&p.command)
        .map_err(|e| anyhow!("the batch's recorded command line no longer parses: {e}"))?;
    let Command::Upscale(mut up) = cli.command else {
        bail!("the batch's recorded command line is not an upscale");
    };
    if !p.cwd.is_empty() {
        std::env::set_current_dir(&p.cwd).with_context(|| format!("cannot enter the batch's folder {}", p.cwd))?;
    }
    // Every shard's failed and missing files, in this process; the done ones are skipped by their records.
    up.shard = Some(ShardSpec::Fixed(infdit::batch::Shard { index: 0, count: p.shards }));
    up.retry_all = true;
    up.dry_run = false;
    super::upscale::upscale(up)
}
