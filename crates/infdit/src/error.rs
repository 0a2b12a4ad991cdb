//! The library's error type. Every variant says whose fault it is and names the file where one is involved.

use std::fmt;
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
    Weights(#[from] WeightError),
    /// The configuration needs a CLIP tower and the checkpoint has none: the CLIP weights must be
    /// given as a separate file.
    #[error(
        "{checkpoint}: the checkpoint has no CLIP tower (image_encoder.model.visual.*); give the CLIP weights \
         as a separate file (open_clip_pytorch_model.bin, open_clip_model.safetensors or Hugging Face CLIP weights)"
    )]
    MissingClip {
        /// The checkpoint file(s).
        checkpoint: String,
    },
    /// An option of a run is out of range or contradicts another; `option` is its field name in
    /// the settings concerned ([`crate::upscale::UpscaleOptions`], [`crate::train::TrainConfig`],
    /// [`crate::train::SampleConfig`]; front ends name their own flag for it).
    #[error("{option}: {reason}")]
    InvalidOption {
        /// The option.
        option: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The work does not fit a limit: the output side, the memory budget.
    #[error("{0}")]
    TooLarge(String),
    /// An output cannot be written where or how it was asked for (format, folder, permissions),
    /// found before any work is done.
    #[error("{}: {reason}", path.display())]
    Output {
        /// The output file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// An image file could not be read or written (it names the file and the problem).
    #[error("{0}")]
    Image(#[from] crate::imageio::ImageIoError),
    /// An image has a size the requested work cannot use.
    #[error("image {width}x{height}: {reason}")]
    ImageSize {
        /// Width in pixels.
        width: usize,
        /// Height in pixels.
        height: usize,
        /// Why it cannot be used.
        reason: String,
    },
    /// A noise file (the official initial noise) cannot be used.
    #[error("{}: {reason}", path.display())]
    Noise {
        /// The noise file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Training images, or a training run's saved state, cannot be used.
    #[error("{}: {reason}", path.display())]
    Training {
        /// The file or folder concerned.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A saved sampler state cannot be resumed: damaged, from another run, or incomplete. It is
    /// never used then.
    #[error("{}: {reason}", path.display())]
    Resume {
        /// The state file or folder.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// An internal invariant does not hold: a bug in infdit, to be reported.
    #[error("internal error (a bug in infdit; please report it): {0}")]
    Internal(String),
    /// The computation produced a non-finite value.
    #[error("numerical failure: {0}")]
    NonFinite(String),
    /// The run was stopped through [`crate::sampling::SampleOptions::cancel`] (Ctrl-C).
    #[error("interrupted after {steps_done} completed sampler steps")]
    Interrupted {
        /// Steps completed (and saved, with a checkpoint folder) before the stop.
        steps_done: usize,
    },
    /// A resume state (checkpoint record or state file) fails its integrity checks: it is refused,
    /// never used.
    #[error("{}: damaged resume state: {reason}; remove it (and the run's checkpoint record) to start over", path.display())]
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

/// A problem with a checkpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WeightError {
    /// The file could not be opened or parsed as a checkpoint.
    #[error("{}: cannot read checkpoint: {msg}", path.display())]
    Parse {
        /// The checkpoint file.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// A checkpoint could not be written (full disk, no permission, ...).
    #[error("{}: cannot write checkpoint: {msg}", path.display())]
    Write {
        /// The file being written.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// The checkpoint does not match the model.
    #[error("{}", Mismatch(.0))]
    Mismatch(Box<MismatchReport>),
}

/// Every difference between a checkpoint and the model, by key.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MismatchReport {
    /// The checkpoint file(s).
    pub origin: String,
    /// Keys the model needs that the checkpoint lacks, with the expected shape.
    pub missing: Vec<(String, Vec<usize>)>,
    /// Keys in the checkpoint that the model does not use and that are not documented dead keys.
    pub unexpected: Vec<String>,
    /// Keys whose shape differs: (key, expected, found).
    pub shape: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Keys whose data could not be read or converted.
    pub unreadable: Vec<(String, String)>,
}

struct Mismatch<'a>(&'a MismatchReport);
impl fmt::Display for Mismatch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        write!(
            f,
            "{}: checkpoint does not match the model ({} missing, {} unexpected, {} wrong shape, {} unreadable)",
            r.origin,
            r.missing.len(),
            r.unexpected.len(),
            r.shape.len(),
            r.unreadable.len()
        )?;
        for (k, s) in &r.missing {
            write!(f, "\n  missing key: {k} (expected shape {s:?})")?;
        }
        for k in &r.unexpected {
            write!(f, "\n  unexpected key: {k}")?;
        }
        for (k, e, g) in &r.shape {
            write!(f, "\n  shape mismatch: {k}: model expects {e:?}, checkpoint has {g:?}")?;
        }
        for (k, m) in &r.unreadable {
            write!(f, "\n  unreadable: {k}: {m}")?;
        }
        Ok(())
    }
}
