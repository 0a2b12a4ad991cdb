//! Atomic file writes: the one protocol behind every file infdit writes as a result (images,
//! converted checkpoints, resume records).
//!
//! The data goes to a hidden temporary file in the destination's folder, named
//! `.<start of the name>.infdit-<pid>-<n>.partial` (at most [`MAX_TEMP_NAME`] bytes, so any legal
//! output name works), which is fsynced and renamed over the destination; the folder is then
//! fsynced. A reader therefore sees the old file or the complete new one, never a part. A failed
//! write removes its temporary file; a killed process leaves it behind, and
//! [`remove_stale_partials`] (called before the first write into each folder) removes those of
//! earlier runs.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

/// Longest temporary name, in bytes (file systems allow 255).
pub const MAX_TEMP_NAME: usize = 160;
/// Bytes of the destination's name kept at the start of the temporary name.
const NAME_PREFIX: usize = 100;
const TAG: &str = ".infdit-";
const SUFFIX: &str = ".partial";

/// When this run started, as far as stale temporary files are concerned: the first call of
/// [`run_start`] (or [`mark_run_start`], which a program calls first thing).
pub fn run_start() -> SystemTime {
    *START.get_or_init(SystemTime::now)
}

static START: OnceLock<SystemTime> = OnceLock::new();

/// Fixes [`run_start`] to now, unless it is already fixed.
pub fn mark_run_start() {
    let _ = run_start();
}

/// How old a temporary file must be before a run that shares its folders with other machines
/// ([`mark_shared_run_start`]) takes it as stale: a day, far longer than any one write.
pub const SHARED_STALE_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Fixes [`run_start`] for a run whose output folders other machines write into at the same time
/// (a sharded batch on a shared file system): there a writer's process id cannot be checked, so
/// only temporary files older than [`SHARED_STALE_AGE`] before now count as left by killed runs.
/// No effect if [`run_start`] is already fixed.
pub fn mark_shared_run_start() {
    static_start(SystemTime::now().checked_sub(SHARED_STALE_AGE).unwrap_or(SystemTime::UNIX_EPOCH));
}

fn static_start(at: SystemTime) {
    let _ = START.get_or_init(|| at);
}

/// The temporary name for writing `out`: `.<prefix>.infdit-<pid>-<n>.partial` in the same folder.
pub fn temp_path(out: &Path) -> std::io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let Some(name) = out.file_name() else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "the output path has no file name"));
    };
    let mut t = OsString::from(".");
    t.push(name_prefix(name, NAME_PREFIX));
    t.push(format!("{TAG}{}-{}{SUFFIX}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    debug_assert!(t.len() <= MAX_TEMP_NAME);
    Ok(out.with_file_name(t))
}

/// At most `max` bytes of the start of `name` (whole characters where the name is not Unix bytes).
fn name_prefix(name: &std::ffi::OsStr, max: usize) -> OsString {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let b = name.as_bytes();
        std::ffi::OsStr::from_bytes(&b[..b.len().min(max)]).to_os_string()
    }
    #[cfg(not(unix))]
    {
        let s = name.to_string_lossy();
        let mut end = s.len().min(max);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        OsString::from(&s[..end])
    }
}

/// Whether `name` is a temporary name of this program: the current form
/// `.<prefix>.infdit-<pid>-<n>.partial`, or `.<name>.<pid>.<n>.partial` of earlier versions.
/// Returns the writer's process id.
pub fn partial_owner(name: &str) -> Option<u32> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let body = name.strip_prefix('.')?.strip_suffix(SUFFIX)?;
    if let Some((_, tail)) = body.rsplit_once(TAG) {
        let (pid, n) = tail.split_once('-')?;
        return (digits(pid) && digits(n)).then(|| pid.parse().ok()).flatten();
    }
    let (rest, n) = body.rsplit_once('.')?;
    let (stem, pid) = rest.rsplit_once('.')?;
    (!stem.is_empty() && digits(pid) && digits(n)).then(|| pid.parse().ok()).flatten()
}

/// Removes this program's temporary files in `dir` (see [`partial_owner`]) last modified before
/// `before`, unless they belong to a process that is still running (checked on Linux). Returns
/// the files removed. Other files are never touched; failures to remove are ignored.
pub fn remove_stale_partials(dir: &Path, before: SystemTime) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return removed };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(partial_owner) else { continue };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let Ok(meta) = e.metadata() else { continue };
        if !meta.is_file() || !meta.modified().is_ok_and(|m| m < before) {
            continue;
        }
        if std::fs::remove_file(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

/// [`remove_stale_partials`] of `dir` with the run's start, once per folder per process.
fn clean_once(dir: &Path) {
    static DONE: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
    let start = run_start();
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if done.get_or_insert_with(HashSet::new).insert(dir.to_path_buf()) {
        remove_stale_partials(dir, start);
    }
}

/// The folder of `out` (`.` for a bare name).
pub fn parent_dir(out: &Path) -> PathBuf {
    match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes `out` atomically: `write` fills the temporary file whose path it is given (creating
/// it), then the file is fsynced and renamed over `out`, and the folder fsynced. On any failure
/// the temporary file is removed and `out` is untouched. `io` turns an I/O failure on a path into
/// the caller's error type.
pub fn write_atomic<E>(
    out: &Path,
    write: impl FnOnce(&Path) -> Result<(), E>,
    io: impl Fn(&Path, std::io::Error) -> E,
) -> Result<(), E> {
    let dir = parent_dir(out);
    clean_once(&dir);
    let tmp = temp_path(out).map_err(|e| io(out, e))?;
    let finish = || -> Result<(), E> {
        write(&tmp)?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, out).map_err(|e| io(out, e))
    };
    if let Err(e) = finish() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // Persist the rename itself; not every platform/filesystem supports syncing a directory.
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f10_temp_names_fit_for_the_longest_legal_name() {
        let long = "a".repeat(250) + ".png";
        let t = temp_path(&Path::new("/tmp").join(&long)).unwrap();
        let n = t.file_name().unwrap().len();
        assert!(n <= MAX_TEMP_NAME, "{n}");
        assert_eq!(partial_owner(t.file_name().unwrap().to_str().unwrap()), Some(std::process::id()));
    }

    #[test]
    fn partial_names_are_recognised_strictly() {
        assert_eq!(partial_owner(".img.png.infdit-12-3.partial"), Some(12));
        assert_eq!(partial_owner(".img.png.12.3.partial"), Some(12));
        for other in
            ["img.png.12.3.partial", ".img.png.partial", ".img.png.x.3.partial", ".a.infdit-1-.partial", "x.png"]
        {
            assert_eq!(partial_owner(other), None, "{other}");
        }
    }
}
