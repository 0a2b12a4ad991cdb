//! Fuzz target: arbitrary bytes as an image file through `load_image` (small limits), then
//! reflection padding to a multiple of 32. Must never panic. Run with
//! `cargo +nightly fuzz run decode_prepare` from `fuzz/` (see `fuzz/README.md`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../src/harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| {
    let _ = harness::decode_prepare(data, &std::env::temp_dir());
});
