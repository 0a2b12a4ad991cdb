//! The library's error type. Every variant says whose fault it is and names the file where one is involved.

use std::path::{Path, PathBuf};

/// Result alias used across the library.
pub type Result<T, E = InfditError> = std::result::Result<T, E>;

/// Errors of the infdit library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InfditError {
    /// The environment: a file could not be read or written. (The I/O error is part of the
    /// message, not a separate source, so that an error chain does not print it twice.)
    #[error("{}: {error}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        error: std::io::Error,
    },
    /// The user's configuration is invalid or not supported.
    #[error("config: {0}")]
    Config(String),
    /// A checkpoint does not fit the configured model (missing, unexpected or mis-shaped tensors),
    /// or cannot be parsed.
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightError),
    /// An input (image, noise file, size) is unusable.
    #[error("{0}")]
    Input(String),
    /// The computation produced a non-finite value.
    #[error("numerical failure: {0}")]
    NonFinite(String),
    /// The run was stopped through [`crate::pipeline::SampleOptions::cancel`] (Ctrl-C).
    #[error("interrupted after {steps_done} completed sampler steps")]
    Interrupted {
        /// Steps completed (and saved, with a checkpoint folder) before the stop.
        steps_done: usize,
    },
    /// A resume state (checkpoint record or state file) fails its integrity checks: it is refused,
    /// never used.
    #[error("{}: damaged resume state: {reason}; remove it (and the run's --checkpoint-dir record) to start over", path.display())]
    DamagedState {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A checkpoint or state folder is in use by another process.
    #[error("{}: another infdit process is using this {what}; wait for it to finish or give this run its own folder", path.display())]
    Locked {
        /// The folder or file that is locked.
        path: PathBuf,
        /// What it is ("checkpoint folder", "state file").
        what: &'static str,
    },
    /// A failure inside the tensor library.
    #[error("tensor error: {0}")]
    Candle(candle_core::Error),
}

// By hand rather than `#[from]`, which would also make the error a source that a chain repeats.
impl From<candle_core::Error> for InfditError {
    fn from(e: candle_core::Error) -> Self {
        Self::Candle(e)
    }
}

impl InfditError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), error: source }
    }
}
