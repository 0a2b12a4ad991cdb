//! Fuzz target: arbitrary bytes as a model config and as sampler settings. Must never panic.
//! Run with `cargo +nightly fuzz run config` from `fuzz/` (see `fuzz/README.md`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../src/state_config.rs"]
mod state_config;

fuzz_target!(|data: &[u8]| {
    let _ = state_config::config(data);
});
