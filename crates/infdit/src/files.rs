//! Checks on the files infdit reads: only regular files (a FIFO would block forever, a device
//! such as `/dev/zero` never ends).

use std::path::Path;

/// `Ok` when `path` (symlinks followed) is a regular file; an error whose message says what it is
/// otherwise (the caller names the path).
pub fn check_regular(path: &Path) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_file() {
        return Ok(());
    }
    let kind = kind_of(&meta.file_type());
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("is {kind}, not a regular file (infdit reads only regular files)"),
    ))
}

/// Words for a file type ("a folder", "a FIFO (named pipe)", ...).
pub fn kind_of(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a folder"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

/// The text of a small regular file (a config): refused when not a regular file or larger than
/// `max_bytes`, so a mistaken path to a device or a huge file cannot exhaust memory.
pub fn read_small_text(path: &Path, max_bytes: u64) -> std::io::Result<String> {
    check_regular(path)?;
    let len = std::fs::metadata(path)?.len();
    if len > max_bytes {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("is {len} bytes, more than the {max_bytes} a config file may have"),
        ));
    }
    std::fs::read_to_string(path)
}
