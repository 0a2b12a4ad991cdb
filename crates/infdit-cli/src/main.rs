//! The `infdit` command: parses arguments and dispatches to a subcommand. Exit codes: 0 success,
//! 1 failure of the work itself, 2 bad usage (clap).

mod args;
mod commands;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
