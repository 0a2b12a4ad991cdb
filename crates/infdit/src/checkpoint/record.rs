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
use crate::hash::crc_f32;

/// The first line of an error's message (candle appends a backtrace when `RUST_BACKTRACE` is set).
fn first_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// A saved state: the step count, and `x` unless the state lives in a state folder's file
/// ([`crate::checkpoint::state::FileStore`]), which the record then stands for.
#[derive(Debug, Clone)]
pub struct SavedState {
    /// The state (1, 3, H, W), or `None` when it is in the state folder.
    pub x: Option<Tensor>,
    /// Steps done.
    pub steps_done: usize,
    /// With the state in a state folder: the CRC-32 of each block of `x` there, in raster order,
    /// checked when the state file is opened.
    pub block_checksums: Option<Vec<u32>>,
}

/// The checksum of a record: covers the fingerprint, the step count, and `x` or the block checksums.
fn record_checksum(fingerprint: &str, steps_done: u32, x: Option<&[f32]>, blocks: Option<&[u32]>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(fingerprint.as_bytes());
    h.update(&steps_done.to_le_bytes());
    if let Some(x) = x {
        h.update(b"x");
        h.update(&crc_f32(x).to_le_bytes());
    }
    if let Some(b) = blocks {
        h.update(b"blocks");
        for c in b {
            h.update(&c.to_le_bytes());
        }
    }
    h.finalize()
}

/// Writes the state `x` after `steps_done` steps atomically, with a checksum over everything in it.
/// `x` must be given; a record for a state folder is written by [`save_block_record`].
pub fn save_state(path: &Path, x: Option<&Tensor>, steps_done: usize, fingerprint: &str) -> Result<()> {
    let Some(x) = x else {
        return Err(InfditError::Internal(format!(
            "{}: a record for a state folder needs its block checksums: use save_block_record",
            path.display()
        )));
    };
    let x = x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let values = x.flatten_all()?.to_vec1::<f32>()?;
    let sum = record_checksum(fingerprint, steps_u32(path, steps_done)?, Some(&values), None);
    let mut t = HashMap::new();
    t.insert("x".to_string(), x);
    write_record(path, t, steps_done, fingerprint, sum)
}

/// Writes a record that the state after `steps_done` steps is in the state folder, whose blocks
/// of `x` have the CRC-32s `block_checksums` (the folder's file must be durable already).
pub fn save_block_record(path: &Path, block_checksums: &[u32], steps_done: usize, fingerprint: &str) -> Result<()> {
    let sum = record_checksum(fingerprint, steps_u32(path, steps_done)?, None, Some(block_checksums));
    let mut t = HashMap::new();
    t.insert("in_state_dir".to_string(), Tensor::new(&[1u8], &Device::Cpu)?);
    t.insert("block_checksums".to_string(), Tensor::new(block_checksums, &Device::Cpu)?);
    write_record(path, t, steps_done, fingerprint, sum)
}

fn steps_u32(path: &Path, steps_done: usize) -> Result<u32> {
    u32::try_from(steps_done)
        .map_err(|_| InfditError::Internal(format!("{}: step count {steps_done} too large", path.display())))
}

fn write_record(
    path: &Path,
    mut t: HashMap<String, Tensor>,
    steps_done: usize,
    fingerprint: &str,
    checksum: u32,
) -> Result<()> {
    let dir = crate::atomic::parent_dir(path);
    std::fs::create_dir_all(&dir).map_err(|e| InfditError::io(&dir, e))?;
    t.insert("steps_done".to_string(), Tensor::new(&[steps_u32(path, steps_done)?], &Device::Cpu)?);
    t.insert("fingerprint".to_string(), Tensor::new(fingerprint.as_bytes(), &Device::Cpu)?);
    t.insert("checksum".to_string(), Tensor::new(&[checksum], &Device::Cpu)?);
    crate::atomic::write_atomic(
        path,
        |tmp| {
            candle_core::safetensors::save(&t, tmp).map_err(|e| match e {
                candle_core::Error::Io(e) => InfditError::io(tmp, e),
                e => InfditError::Resume {
                    path: tmp.to_path_buf(),
                    reason: format!("cannot write the resume state: {}", first_line(&e)),
                },
            })
        },
        InfditError::io,
    )
}

/// Reads a saved state: `Ok(None)` when there is none, an error when it belongs to another run or
/// fails its checks (damaged files are refused, never used).
pub fn load_state(path: &Path, fingerprint: &str) -> Result<Option<SavedState>> {
    if !path.exists() {
        return Ok(None);
    }
    crate::files::check_regular(path).map_err(|e| InfditError::io(path, e))?;
    let damaged = |reason: String| InfditError::DamagedState { path: path.to_path_buf(), reason };
    let mut t = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| damaged(format!("not a readable safetensors file ({})", first_line(&e))))?;
    let mut take = |name: &str| t.remove(name).ok_or_else(|| damaged(format!("no `{name}` entry")));
    let vec_u8 =
        |t: Tensor, name: &str| t.to_vec1::<u8>().map_err(|e| damaged(format!("`{name}`: {}", first_line(&e))));
    let vec_u32 =
        |t: Tensor, name: &str| t.to_vec1::<u32>().map_err(|e| damaged(format!("`{name}`: {}", first_line(&e))));
    let fp = vec_u8(take("fingerprint")?, "fingerprint")?;
    let steps = vec_u32(take("steps_done")?, "steps_done")?;
    let sum = vec_u32(take("checksum")?, "checksum")?;
    let (&[steps], &[sum]) = (steps.as_slice(), sum.as_slice()) else {
        return Err(damaged("`steps_done` or `checksum` is not one value".into()));
    };
    let x = t.remove("x");
    let blocks = match (t.remove("block_checksums"), t.contains_key("in_state_dir")) {
        (Some(b), true) => Some(vec_u32(b, "block_checksums")?),
        (None, true) => return Err(damaged("a state-folder record without block checksums".into())),
        (_, false) => None,
    };
    let values = match &x {
        Some(x) => Some(
            x.to_dtype(DType::F32)
                .and_then(|x| x.flatten_all())
                .and_then(|x| x.to_vec1::<f32>())
                .map_err(|e| damaged(format!("`x`: {}", first_line(&e))))?,
        ),
        None if blocks.is_some() => None,
        None => return Err(damaged("no state tensor".into())),
    };
    let fp = String::from_utf8_lossy(&fp).into_owned();
    if record_checksum(&fp, steps, values.as_deref(), blocks.as_deref()) != sum {
        return Err(damaged("checksum mismatch (the file was changed or damaged after it was written)".into()));
    }
    if fp != fingerprint {
        return Err(InfditError::Resume {
            path: path.to_path_buf(),
            reason: "saved state belongs to a different run (other input, noise, model weights or sampler \
                     settings); remove it or use another checkpoint folder"
                .into(),
        });
    }
    Ok(Some(SavedState { x, steps_done: steps as usize, block_checksums: blocks }))
}

impl SavedState {
    /// Checks a loaded state against the run that resumes it: at most `last` steps done (the
    /// sampler's step count) and, for a held `x`, the shape (1, 3, `height`, `width`).
    pub fn check(&self, path: &Path, last: usize, height: usize, width: usize) -> Result<()> {
        let damaged = |reason: String| InfditError::DamagedState { path: path.to_path_buf(), reason };
        if self.steps_done > last {
            return Err(damaged(format!("{} steps done, but the run has only {last}", self.steps_done)));
        }
        if let Some(x) = &self.x
            && x.dims() != [1, 3, height, width]
        {
            return Err(damaged(format!("state of shape {:?}, the run needs (1, 3, {height}, {width})", x.dims())));
        }
        Ok(())
    }
}

/// A lock on a checkpoint folder, held until dropped (advisory, `flock` on the folder itself).
#[derive(Debug)]
pub struct FolderLock {
    _file: std::fs::File,
}

/// Locks `dir` (created if missing) against a second infdit process, or fails with
/// [`InfditError::Locked`] naming it.
pub fn lock_folder(dir: &Path, what: &'static str) -> Result<FolderLock> {
    std::fs::create_dir_all(dir).map_err(|e| InfditError::io(dir, e))?;
    let file = std::fs::File::open(dir).map_err(|e| InfditError::io(dir, e))?;
    match file.try_lock() {
        Ok(()) => Ok(FolderLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(InfditError::Locked { path: dir.to_path_buf(), what }),
        Err(std::fs::TryLockError::Error(e)) => Err(InfditError::io(dir, e)),
    }
}
