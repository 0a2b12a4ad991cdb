//! Fuzz target: arbitrary bytes as a resume record and as a block state file. Must never panic.
//! Run with `cargo +nightly fuzz run resume_state` from `fuzz/` (see `fuzz/README.md`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../src/state_config.rs"]
mod state_config;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("infdit-fuzz-state-{}", std::process::id()));
    let _ = state_config::resume_state(data, &dir);
});
