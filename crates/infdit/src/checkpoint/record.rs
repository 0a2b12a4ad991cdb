//! Saving and resuming the sampler state between steps.
//!
//! After each completed step the state `x` is written to `infdit-state.safetensors` in the
//! checkpoint folder, atomically (temporary file, fsync, rename), together with the number of steps
//! done and a fingerprint of the run's inputs and settings. A later run with the same inputs resumes
//! from it; because the noise, the sampler and every network evaluation are deterministic, the
//! final image is bit-identical to an uninterrupted run.
//!
//! With a state folder (`SampleOptions::state_dir`) the state already lives in a file there; the
//! record in the checkpoint folder then holds no tensor, only the step count and fingerprint, and
//! is written once that file is synced (see [`crate::checkpoint::state`]).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{InfditError, Result};

/// 64-bit FNV-1a, enough to tell runs apart (not a cryptographic hash).
#[derive(Debug, Clone)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Mixes bytes in.
    pub fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= x as u64;
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
    /// Mixes a tensor's shape and f32 values in.
    pub fn tensor(&mut self, t: &Tensor) -> candle_core::Result<()> {
        self.bytes(format!("{:?}", t.dims()).as_bytes());
        for v in t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
            self.bytes(&v.to_bits().to_le_bytes());
        }
        Ok(())
    }
    /// The hash.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// A saved state: the step count, and `x` unless the state lives in a state folder's file
/// ([`crate::checkpoint::state::FileStore`]), which the record then stands for.
#[derive(Debug, Clone)]
pub struct SavedState {
    /// The state (1, 3, H, W), or `None` when it is in the state folder.
    pub x: Option<Tensor>,
    /// Steps done.
    pub steps_done: usize,
}

/// Writes the state atomically: `x`, or with `None` a record that the state after `steps_done`
/// steps is in the state folder (which must be durable before this is called).
pub fn save_state(path: &Path, x: Option<&Tensor>, steps_done: usize, fingerprint: &str) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| InfditError::io(dir, e))?;
    let mut t = HashMap::new();
    match x {
        Some(x) => t.insert("x".to_string(), x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?),
        None => t.insert("in_state_dir".to_string(), Tensor::new(&[1u8], &Device::Cpu)?),
    };
    t.insert("steps_done".to_string(), Tensor::new(&[steps_done as u32], &Device::Cpu)?);
    t.insert("fingerprint".to_string(), Tensor::new(fingerprint.as_bytes(), &Device::Cpu)?);
    let tmp = path.with_extension("safetensors.partial");
    candle_core::safetensors::save(&t, &tmp)?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| InfditError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| InfditError::io(path, e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads a saved state: `Ok(None)` when there is none, an error when it belongs to another run.
pub fn load_state(path: &Path, fingerprint: &str) -> Result<Option<SavedState>> {
    if !path.exists() {
        return Ok(None);
    }
    let mut t = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| InfditError::Resume {
        path: path.to_path_buf(),
        reason: format!("unreadable saved state: {e}"),
    })?;
    let bad = |what: &str| InfditError::Resume { path: path.to_path_buf(), reason: format!("saved state {what}") };
    let fp = t.remove("fingerprint").ok_or_else(|| bad("has no fingerprint"))?.to_vec1::<u8>()?;
    if fp != fingerprint.as_bytes() {
        return Err(bad(
            "belongs to a different run (other input, noise, model or sampler settings); remove it or use another checkpoint folder",
        ));
    }
    let steps = t.remove("steps_done").ok_or_else(|| bad("has no step count"))?.to_vec1::<u32>()?;
    let x = match (t.remove("x"), t.contains_key("in_state_dir")) {
        (Some(x), _) => Some(x),
        (None, true) => None,
        (None, false) => return Err(bad("has no state tensor")),
    };
    Ok(Some(SavedState { x, steps_done: *steps.first().ok_or_else(|| bad("has an empty step count"))? as usize }))
}
