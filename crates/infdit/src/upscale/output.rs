//! Checks of an output file before any work: a format that can hold the image, a folder that
//! exists (or can be made) and can be written, an output that is not an input.

use std::path::{Path, PathBuf};

use image::ImageFormat;

use super::plan::AlphaMode;
use crate::error::{InfditError, Result};
use crate::imageio::{canonical_target, output_format};

/// What writing an output will do, as checked before the model runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputCheck {
    /// The format, from the extension.
    pub format: ImageFormat,
    /// Whether the format stores 16-bit samples (PNG, TIFF): 16-bit inputs then give 16-bit outputs.
    pub holds_16_bits: bool,
    /// The folder that has to be made first, when the output's folder does not exist yet.
    pub creates: Option<PathBuf>,
}

/// The folder of `out` (`.` for a bare file name).
fn folder_of(out: &Path) -> &Path {
    match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Checks that `out` can receive the upscale of an image (with an alpha plane when `has_alpha`,
/// upscaled as `alpha` says) read from `inputs`. With `create`, a missing output folder is made
/// (as `mkdir -p`); without, [`OutputCheck::creates`] names it. A folder that exists is tested by
/// creating and removing an empty file in it, which is what tells whether it can be written (its
/// mode bits do not, for root or on some file systems).
pub fn check_output(
    out: &Path,
    has_alpha: bool,
    alpha: AlphaMode,
    inputs: &[&Path],
    create: bool,
) -> Result<OutputCheck> {
    let fail = |reason: String| InfditError::Output { path: out.to_path_buf(), reason };
    let format = output_format(out).map_err(|e| match e {
        crate::imageio::ImageIoError::UnsupportedFormat { reason, .. } => fail(reason),
        e => fail(e.to_string()),
    })?;
    if format == ImageFormat::Jpeg && has_alpha && !matches!(alpha, AlphaMode::Drop { .. }) {
        return Err(fail(
            "JPEG has no alpha channel and this image has one: write PNG, WebP or TIFF to keep the \
             transparency, or drop the alpha (flatten the image on a background colour)"
                .into(),
        ));
    }
    if out.is_dir() {
        return Err(fail("is a folder; give a file name".into()));
    }
    let target = canonical_target(out);
    if inputs.iter().any(|i| canonical_target(i) == target) {
        return Err(fail("the output path is the input image; refusing to overwrite it".into()));
    }
    let dir = folder_of(out);
    let mut creates = None;
    if !dir.is_dir() {
        // The nearest folder that exists must be a folder, and the rest is made.
        let mut existing = dir;
        while !existing.exists() {
            existing = folder_of(existing);
            if existing == Path::new(".") && !existing.exists() {
                break;
            }
        }
        if existing.exists() && !existing.is_dir() {
            return Err(fail(format!("cannot make its folder: {} is a file", existing.display())));
        }
        if create {
            std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot make the folder {}: {e}", dir.display())))?;
        } else {
            creates = Some(dir.to_path_buf());
            probe_writable(existing).map_err(|e| fail(format!("cannot write in {}: {e}", existing.display())))?;
        }
    }
    if dir.is_dir() {
        probe_writable(dir).map_err(|e| fail(format!("cannot write in the folder {}: {e}", dir.display())))?;
    }
    Ok(OutputCheck { format, holds_16_bits: matches!(format, ImageFormat::Png | ImageFormat::Tiff), creates })
}

/// Creates and removes an empty hidden file in `dir`.
fn probe_writable(dir: &Path) -> std::io::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let p = dir.join(format!(".infdit-probe-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    std::fs::OpenOptions::new().write(true).create_new(true).open(&p)?;
    std::fs::remove_file(&p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("infdit-output-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn formats_that_cannot_hold_the_image_are_refused() {
        let d = tmp("formats");
        let msg = |p: &Path, alpha| check_output(p, alpha, AlphaMode::Bicubic, &[], true).unwrap_err().to_string();
        assert!(msg(&d.join("o.jpg"), true).contains("JPEG has no alpha channel"));
        assert!(msg(&d.join("o.xyz"), false).contains("cannot write '.xyz' files"));
        assert!(msg(&d.join("o"), false).contains("no file extension"));
        let drop = AlphaMode::Drop { background: [255, 255, 255] };
        assert_eq!(check_output(&d.join("o.jpg"), true, drop, &[], true).unwrap().format, ImageFormat::Jpeg);
        let png = check_output(&d.join("o.png"), true, AlphaMode::Bicubic, &[], true).unwrap();
        assert!(png.holds_16_bits && png.creates.is_none());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn missing_folders_are_made_or_named() {
        let d = tmp("folders");
        let out = d.join("a/b/o.png");
        let c = check_output(&out, false, AlphaMode::Bicubic, &[], false).unwrap();
        assert_eq!(c.creates, Some(d.join("a/b")));
        assert!(!d.join("a").exists(), "a dry check makes nothing");
        check_output(&out, false, AlphaMode::Bicubic, &[], true).unwrap();
        assert!(d.join("a/b").is_dir());
        std::fs::write(d.join("f"), b"x").unwrap();
        let e = check_output(&d.join("f/o.png"), false, AlphaMode::Bicubic, &[], true).unwrap_err().to_string();
        assert!(e.contains("is a file"), "{e}");
        let input = d.join("in.png");
        std::fs::write(&input, b"x").unwrap();
        let e = check_output(&input, false, AlphaMode::Bicubic, &[&input], true).unwrap_err().to_string();
        assert!(e.contains("is the input image"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
