//! Everything a run keeps on disk to be resumed, and what makes sure a saved state is only used by
//! the run that wrote it: fingerprints ([`crate::hash`]), the record of the sampler state after each step
//! ([`record`]), the state folder's per-block file ([`state`]), and the saved output of each finished
//! model pass ([`save_pass`], [`load_pass`]).

pub mod record;
pub mod state;

use std::path::Path;

use candle_core::Tensor;

pub use record::{FolderLock, SavedState, load_state, lock_folder, save_block_record, save_state};

use crate::error::{InfditError, Result};
use crate::hash::Fnv;

/// The fingerprint of a run of model passes: the input image, the noise file's bytes (when the
/// noise comes from a file), and `settings`, a description of every other setting that decides the
/// passes' outputs (scales, seed, sampler, dtypes, kernel, model).
pub fn passes_fingerprint(input: &Tensor, noise: Option<&Path>, settings: &str) -> Result<String> {
    let mut h = Fnv::default();
    h.tensor(input)?;
    if let Some(n) = noise {
        h.bytes(&std::fs::read(n).map_err(|e| InfditError::io(n, e))?);
    }
    h.bytes(settings.as_bytes());
    Ok(format!("{:016x}", h.finish()))
}

/// Saves the output `x` of the pass that completes `passes_done` passes, with the run's fingerprint.
pub fn save_pass(file: &Path, x: &Tensor, passes_done: usize, fingerprint: &str) -> Result<()> {
    save_state(file, Some(x), passes_done, fingerprint)
}

/// The output saved by [`save_pass`] in `file` for this run, if there is one.
pub fn load_pass(file: &Path, fingerprint: &str) -> Result<Option<Tensor>> {
    Ok(match load_state(file, fingerprint)? {
        Some(SavedState { x: Some(t), .. }) => Some(t),
        _ => None,
    })
}
