//! The `infdit` command: parses arguments and dispatches to a subcommand. Exit codes: 0 success,
//! 1 failure of the work itself, 2 bad usage (clap).

mod args;
mod commands;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc, told never to purge (below): the network makes a fresh tensor per op, and with
/// glibc's malloc (or mimalloc's default 10 ms purge) every large one came from fresh pages, a
/// page fault and zeroing per 4 KiB (18-22 % of a CPU denoiser call in a profile); kept pages are
/// reused instead. One small-config denoiser call with the block scheduler, one thread: 42.6 s ->
/// 21.5 s, peak RSS 510 -> 525 MB (`infdit bench denoise ... --block-batch 1`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_t`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // SAFETY: sets a global allocator option (no pointers); -1 = never purge freed memory.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let cli = args::Cli::parse();
    let training = match &cli.command {
        args::Command::Train(_) => true,
        args::Command::Bench(b) => b.target == args::BenchTarget::Train,
        _ => false,
    };
    if training && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Training spreads its own work over the rayon pool; candle's separate pool of element-wise
        // workers then only competes with it (1.74x -> 2.00x the old path's crops/s with one,
        // docs/training.md). CANDLE_NUM_THREADS set by the user wins.
        // SAFETY: no other thread exists yet (argument parsing spawns none), so nothing reads the
        // environment concurrently.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", message(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes, joined by ": ", leaving out a cause whose text the message already
/// holds (the library's errors include their source's text, which the chain repeats).
fn message(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if msg.contains(&s) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&s);
    }
    msg
}
