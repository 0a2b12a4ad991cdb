//! The bodies of the `resume_state` and `config` fuzz targets, shared with the plain mutation
//! test `crates/infdit/tests/fuzz_state_config.rs` (which includes this file with `#[path]`).
//!
//! * [`resume_state`]: arbitrary bytes as a checkpoint record (`infdit-state.safetensors`) and
//!   as a state file (`infdit-state.blocks`) of a 2x2-block run. Reading them must never panic;
//!   a refusal must be one line naming the file; whatever is accepted must be consistent (the
//!   step count within the run, `x` of the run's shape).
//! * [`config`]: arbitrary bytes as a model config (both formats) and as `"sampler"` settings.
//!   Parsing must never panic; an accepted config must validate, and counting its parameters
//!   (arithmetic, [`infdit::loaded::Model::parameter_count`]) must neither panic nor be huge.

use std::path::Path;

use infdit::checkpoint::load_state;
use infdit::checkpoint::state::{FileStore, STATE_FILE};
use infdit::config::{ModelConfig, SamplerDefaults, limits};
use infdit::model::blocks::BlockGrid;

/// The fingerprint every fuzzed state is read with.
pub const FINGERPRINT: &str = "0123456789abcdef";
/// The run the fuzzed states are checked against: 2x2 blocks of 32 px, 4 steps.
pub const GRID: BlockGrid = BlockGrid { rows: 2, cols: 2, block_px: 32 };
/// Last step of that run.
pub const LAST: usize = 4;

fn one_line_naming(msg: &str, name: &str) {
    assert!(msg.contains(name), "error does not name the file: {msg}");
    assert!(!msg.contains('\n'), "error is not one line: {msg:?}");
}

/// Reads `bytes` as a record and as a state file in `dir`. Returns how many of the two were
/// accepted. Panics on a broken invariant.
pub fn resume_state(bytes: &[u8], dir: &Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let record = dir.join("infdit-state.safetensors");
    std::fs::write(&record, bytes)?;
    let mut accepted = 0;
    match load_state(&record, FINGERPRINT) {
        Ok(None) => panic!("an existing record read as absent"),
        Ok(Some(s)) => match s.check(&record, LAST, GRID.height(), GRID.width()) {
            Ok(()) => {
                assert!(s.steps_done <= LAST);
                if let Some(x) = &s.x {
                    assert_eq!(x.dims(), &[1, 3, GRID.height(), GRID.width()]);
                }
                accepted += 1;
            }
            Err(e) => one_line_naming(&e.to_string(), "infdit-state.safetensors"),
        },
        Err(e) => one_line_naming(&e.to_string(), "infdit-state.safetensors"),
    }
    // The same bytes as a state file, with checksums that cannot all match.
    let state = dir.join(STATE_FILE);
    std::fs::write(&state, bytes)?;
    let sums = [0u32, 1, 2, 3];
    match FileStore::open(dir, GRID, FINGERPRINT, bytes.len() % (LAST + 1), &sums) {
        Ok(_) => accepted += 1,
        Err(e) => one_line_naming(&e.to_string(), STATE_FILE),
    }
    let _ = std::fs::remove_file(&state);
    let _ = std::fs::remove_file(&record);
    Ok(accepted)
}

/// Parses `bytes` as a config and as sampler settings. Returns whether the config was accepted.
/// Panics on a broken invariant.
pub fn config(bytes: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(bytes) else { return false };
    if let Ok(Some(d)) = SamplerDefaults::from_json_str(text) {
        assert!((1..=infdit::diffusion::HeunConfig::MAX_STEPS).contains(&d.steps), "{d:?}");
    }
    match ModelConfig::from_json_str(text) {
        Ok(cfg) => {
            cfg.validate().expect("an accepted config validates");
            let n = infdit::loaded::Model::parameter_count(&cfg).expect("an accepted config counts");
            assert!(n as u128 <= limits::MAX_PARAMETERS, "{n} parameters");
            assert!(cfg.dit.rope_positions() > 0 && cfg.dit.block_tokens() > 0);
            // Its own JSON parses back to a valid config of the same size (floats may move by an
            // ulp: serde_json's default float parsing is not round-trip exact).
            let back = ModelConfig::from_json_str(&cfg.to_json()).expect("own JSON parses");
            assert_eq!(back.parameter_count(), cfg.parameter_count());
            true
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            false
        }
    }
}
