//! The record of one file of a sharded batch: done, failed (with the error) or interrupted, when,
//! where and how long; a small JSON file written atomically below `OUT/.infdit/records/`.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::layout::{BatchDir, write_json_atomic};
use crate::error::{InfditError, Result};

/// How a file's last attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The output was written.
    Done,
    /// The file failed (the record holds the error); a retry runs it again.
    Failed,
    /// The worker was stopped (SIGTERM, Ctrl-C) while on this file; its checkpoint is kept and
    /// the next attempt resumes it.
    Interrupted,
}

/// One file's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    /// The output relative to the output folder (the file's name in the batch).
    pub name: String,
    /// The input file, as given.
    pub input: String,
    /// How the attempt ended.
    pub outcome: Outcome,
    /// The error of a failed file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The shard that ran it, `K/N`.
    pub shard: String,
    /// The machine that ran it.
    pub host: String,
    /// The process that ran it.
    pub pid: u32,
    /// When the attempt ended, seconds since 1970.
    pub finished_unix: u64,
    /// Seconds the attempt took.
    pub elapsed_s: f64,
    /// The file's work in block evaluations.
    pub work: u64,
}

/// Seconds since 1970 now.
pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl FileRecord {
    /// Writes the record atomically (a reader sees the old record or the new one, never a part).
    pub fn write(&self, dir: &BatchDir) -> Result<()> {
        write_json_atomic(&dir.record_path(&self.name), self)
    }

    /// Reads the record of `name`: `Ok(None)` when there is none, an error when it is damaged.
    pub fn read(dir: &BatchDir, name: &str) -> Result<Option<Self>> {
        let path = dir.record_path(name);
        let text = match crate::files::read_small_text(&path, 1 << 20) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(InfditError::io(&path, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| InfditError::Config(format!("{}: damaged record: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_and_read_back() {
        let root = std::env::temp_dir().join(format!("infdit-record-{}", std::process::id()));
        let dir = BatchDir::new(&root);
        assert_eq!(FileRecord::read(&dir, "a/b.png").unwrap(), None);
        let r = FileRecord {
            name: "a/b.png".into(),
            input: "in/a/b.png".into(),
            outcome: Outcome::Failed,
            error: Some("in/a/b.png: not an image".into()),
            shard: "1/4".into(),
            host: "node7".into(),
            pid: 42,
            finished_unix: 1_700_000_000,
            elapsed_s: 1.5,
            work: 390,
        };
        r.write(&dir).unwrap();
        assert!(root.join(".infdit/records/a/b.png.json").is_file());
        assert_eq!(FileRecord::read(&dir, "a/b.png").unwrap(), Some(r.clone()));
        let text = std::fs::read_to_string(dir.record_path("a/b.png")).unwrap();
        assert!(text.contains("\"outcome\": \"failed\""), "{text}");
        std::fs::write(dir.record_path("a/b.png"), "{\"name\": 1").unwrap();
        assert!(FileRecord::read(&dir, "a/b.png").unwrap_err().to_string().contains("damaged record"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
