//! Finding image files in folders: the one walker behind `infdit upscale`'s folder and glob
//! inputs, `infdit eval` and the training data.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Extensions of the formats infdit reads, compared case-insensitively.
pub const IMAGE_EXTENSIONS: [&str; 7] = ["png", "jpg", "jpeg", "webp", "tif", "tiff", "bmp"];

/// Whether the file name has one of [`IMAGE_EXTENSIONS`].
pub fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Whether a file or folder name is hidden (starts with a dot).
pub fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.to_string_lossy().starts_with('.')
}

/// A recursive search for image files: sorted by path, hidden entries skipped, each folder
/// visited once (symlink loops are cut), optionally one folder left out.
#[derive(Debug, Default)]
pub struct ImageWalker {
    skip: Option<PathBuf>,
    visited: HashSet<PathBuf>,
    /// Subfolders that could not be read, with the error (the search goes on without them).
    pub unreadable: Vec<(PathBuf, std::io::Error)>,
    /// Entries with an image extension that are not regular files (a FIFO, a device, a socket),
    /// with what they are: never read (a FIFO would block forever), reported by the caller.
    pub not_regular: Vec<(PathBuf, &'static str)>,
}

impl ImageWalker {
    /// A walker that does not descend into `skip` (e.g. the output folder, so that a rerun does
    /// not take earlier outputs as inputs) unless it is the folder searched itself.
    pub fn new(skip: Option<&Path>) -> Self {
        Self { skip: skip.and_then(|d| d.canonicalize().ok()), ..Self::default() }
    }

    /// The image files below `root`; an error only when `root` itself cannot be read.
    pub fn images_below(&mut self, root: &Path) -> std::io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        self.walk(root, root, &mut out)?;
        Ok(out)
    }

    fn walk(&mut self, root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        let canon = dir.canonicalize()?;
        if (dir != root && self.skip.as_deref() == Some(canon.as_path())) || !self.visited.insert(canon) {
            return Ok(());
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter(|e| !is_hidden(&e.file_name()))
            .map(|e| e.path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                if let Err(e) = self.walk(root, &p, out) {
                    self.unreadable.push((p, e));
                }
            } else if is_image(&p) {
                match std::fs::metadata(&p) {
                    Ok(m) if m.is_file() => out.push(p),
                    Ok(m) => self.not_regular.push((p, crate::files::kind_of(&m.file_type()))),
                    // A dangling symlink: not an image file.
                    Err(_) => {}
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_images_sorted_skipping_hidden_and_the_skip_folder() {
        let d = std::env::temp_dir().join(format!("infdit-find-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        for f in ["b.PNG", "a/c.jpg", "a/notes.txt", ".hidden/x.png", "a/.y.png", "out/z.png"] {
            let p = d.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"").unwrap();
        }
        let mut w = ImageWalker::new(Some(&d.join("out")));
        let found = w.images_below(&d).unwrap();
        assert_eq!(found, vec![d.join("a/c.jpg"), d.join("b.PNG")]);
        // The skip folder itself, when searched, is searched.
        assert_eq!(
            ImageWalker::new(Some(&d.join("out"))).images_below(&d.join("out")).unwrap(),
            vec![d.join("out/z.png")]
        );
        assert!(w.unreadable.is_empty());
        assert!(ImageWalker::new(None).images_below(&d.join("missing")).is_err());
        assert!(is_image(Path::new("x.TIFF")) && !is_image(Path::new(".x.png.1.partial")));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
