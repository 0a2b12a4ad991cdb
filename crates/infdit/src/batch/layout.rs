//! Where a sharded batch keeps its bookkeeping in the shared output tree: `OUT/.infdit/`.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{InfditError, Result};

/// The bookkeeping folders of a batch whose outputs go below `root`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchDir {
    /// The output folder.
    pub root: PathBuf,
}

/// The name of the bookkeeping folder below the output folder.
pub const META_DIR: &str = ".infdit";

impl BatchDir {
    /// The bookkeeping of the batch writing below `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    /// `OUT/.infdit`.
    pub fn meta(&self) -> PathBuf {
        self.root.join(META_DIR)
    }
    /// The saved partition, `OUT/.infdit/partition.json`.
    pub fn partition_path(&self) -> PathBuf {
        self.meta().join("partition.json")
    }
    /// The per-file records, `OUT/.infdit/records/`.
    pub fn records(&self) -> PathBuf {
        self.meta().join("records")
    }
    /// The resume checkpoints of the files under way, `OUT/.infdit/checkpoints/`.
    pub fn checkpoints(&self) -> PathBuf {
        self.meta().join("checkpoints")
    }
    /// The record of the file `name` (its output relative to the output folder): `records/<name>.json`.
    pub fn record_path(&self, name: &str) -> PathBuf {
        self.records().join(format!("{name}.json"))
    }
    /// Whether a batch has left its bookkeeping here.
    pub fn exists(&self) -> bool {
        self.partition_path().is_file()
    }
}

/// Writes `value` as pretty JSON to `path` atomically ([`crate::atomic::write_atomic`]), creating
/// its folder.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| InfditError::Internal(format!("{}: cannot encode: {e}", path.display())))?;
    let dir = crate::atomic::parent_dir(path);
    std::fs::create_dir_all(&dir).map_err(|e| InfditError::io(&dir, e))?;
    crate::atomic::write_atomic(
        path,
        |tmp| std::fs::write(tmp, text.as_bytes()).map_err(|e| InfditError::io(tmp, e)),
        InfditError::io,
    )
}

/// This machine's name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`, else `unknown`).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}
