//! Batch inputs: files, folders (recursive) and glob patterns to a list of images, each with the
//! relative path its output mirrors; the output name template.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use anyhow::{Result, bail};
use infdit::imageio::find::{IMAGE_EXTENSIONS, ImageWalker, is_image};

/// Extensions infdit writes.
const WRITABLE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "webp", "tif", "tiff"];

/// One input image found on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The file, as found.
    pub path: PathBuf,
    /// Where its output goes, relative to the output folder, before renaming: the path below the
    /// folder (or the glob's literal base) it was found in, or the bare file name.
    pub rel: PathBuf,
}

/// What the command-line inputs expand to.
#[derive(Debug, Default)]
pub struct Collected {
    /// The images, in command-line order, folders sorted, duplicates removed.
    pub sources: Vec<Source>,
    /// Inputs that gave nothing: one message each, naming the input.
    pub errors: Vec<String>,
}

fn ext_lower(p: &Path) -> Option<String> {
    p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase)
}

/// Whether an argument is a glob pattern (and not an existing path that happens to hold `*`).
pub fn is_pattern(arg: &Path) -> bool {
    let s = arg.to_string_lossy();
    !arg.exists() && s.contains(['*', '?', '['])
}

/// Whether the inputs make a batch: several of them, a folder or a pattern.
pub fn is_batch(args: &[PathBuf]) -> bool {
    args.len() > 1 || args.iter().any(|a| a.is_dir() || is_pattern(a))
}

/// Expands the inputs. `skip_dir` (the output folder) is not searched when it lies below a folder
/// given or is reached by a pattern, so a rerun does not pick up earlier outputs; given itself as
/// an input folder, it is.
pub fn collect(args: &[PathBuf], skip_dir: Option<&Path>) -> Collected {
    let skip = skip_dir.and_then(|d| d.canonicalize().ok());
    let mut c = Collected::default();
    let mut seen = HashSet::new();
    let mut push = |c: &mut Collected, s: Source| {
        let key = s.path.canonicalize().unwrap_or_else(|_| s.path.clone());
        if seen.insert(key) {
            c.sources.push(s);
        }
    };
    for arg in args {
        if arg.is_dir() {
            match walk(&mut ImageWalker::new(skip.as_deref()), arg, &mut c.errors) {
                Err(e) => c.errors.push(format!("{}: {e}", arg.display())),
                Ok(found) if found.is_empty() => c.errors.push(format!(
                    "{}: no image files ({}) in this folder",
                    arg.display(),
                    IMAGE_EXTENSIONS.join(", ")
                )),
                Ok(found) => found.into_iter().for_each(|s| push(&mut c, s)),
            }
        } else if is_pattern(arg) {
            match expand_pattern(arg, skip.as_deref(), &mut c.errors) {
                Ok(found) if found.is_empty() => {
                    c.errors.push(format!("{}: the pattern matches no image files", arg.display()))
                }
                Ok(found) => found.into_iter().for_each(|s| push(&mut c, s)),
                Err(e) => c.errors.push(format!("{}: {e}", arg.display())),
            }
        } else if arg.is_file() {
            let rel = PathBuf::from(arg.file_name().unwrap_or(arg.as_os_str()));
            push(&mut c, Source { path: arg.clone(), rel });
        } else if let Ok(m) = std::fs::metadata(arg) {
            c.errors.push(not_regular(arg, infdit::files::kind_of(&m.file_type())));
        } else {
            c.errors.push(format!("{}: no such file, folder or matching pattern", arg.display()));
        }
    }
    c
}

/// The error for an input that is not a regular file (a FIFO would block the run forever).
fn not_regular(p: &Path, kind: &str) -> String {
    format!("{}: is {kind}, not a regular file (infdit reads only regular files)", p.display())
}

/// Image files below `dir` (the shared walker), each with its path relative to `dir`; unreadable
/// subfolders are skipped with a warning, not fatal for their siblings; image-named entries that
/// are not regular files (FIFOs, devices) are errors in `errors`.
fn walk(walker: &mut ImageWalker, dir: &Path, errors: &mut Vec<String>) -> std::io::Result<Vec<Source>> {
    let found = walker.images_below(dir);
    for (p, e) in walker.unreadable.drain(..) {
        eprintln!("warning: {}: skipped: {e}", p.display());
    }
    for (p, kind) in walker.not_regular.drain(..) {
        errors.push(not_regular(&p, kind));
    }
    Ok(found?
        .into_iter()
        .map(|path| {
            let rel = path.strip_prefix(dir).map(Path::to_path_buf).unwrap_or_else(|_| path.clone());
            Source { path, rel }
        })
        .collect())
}

/// The leading components of a pattern that hold no glob character.
pub fn pattern_base(pattern: &Path) -> PathBuf {
    let mut base = PathBuf::new();
    for comp in pattern.components() {
        if comp.as_os_str().to_string_lossy().contains(['*', '?', '[']) {
            break;
        }
        base.push(comp);
    }
    base
}

fn expand_pattern(pattern: &Path, skip: Option<&Path>, errors: &mut Vec<String>) -> Result<Vec<Source>> {
    let text = pattern.to_str().ok_or_else(|| anyhow::anyhow!("the pattern is not valid UTF-8"))?;
    let opts = glob::MatchOptions { require_literal_leading_dot: true, ..Default::default() };
    let paths = glob::glob_with(text, opts).map_err(|e| anyhow::anyhow!("bad pattern: {e}"))?;
    let base = pattern_base(pattern);
    let mut out = Vec::new();
    let mut walker = ImageWalker::new(skip);
    for p in paths.filter_map(|p| p.ok()) {
        if skip.is_some_and(|d| p.canonicalize().is_ok_and(|c| c.starts_with(d))) {
            continue;
        }
        if p.is_dir() {
            for s in walk(&mut walker, &p, errors)? {
                let rel = p.strip_prefix(&base).unwrap_or(&p).join(&s.rel);
                out.push(Source { path: s.path, rel });
            }
        } else if p.is_file() && is_image(&p) {
            let rel = p.strip_prefix(&base).map(Path::to_path_buf).unwrap_or_else(|_| p.clone());
            out.push(Source { path: p, rel });
        } else if is_image(&p)
            && let Ok(m) = std::fs::metadata(&p)
        {
            errors.push(not_regular(&p, infdit::files::kind_of(&m.file_type())));
        }
    }
    // `rel` must stay inside the output folder.
    for s in &mut out {
        if s.rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            s.rel = PathBuf::from(s.path.file_name().unwrap_or_default());
        }
    }
    Ok(out)
}

/// The extension of an output: `--format`'s, else the input's when infdit writes it (as spelt),
/// else `png`.
pub fn output_extension(input: &Path, format: Option<&str>) -> String {
    if let Some(f) = format {
        return f.to_string();
    }
    match (input.extension().and_then(|e| e.to_str()), ext_lower(input)) {
        (Some(e), Some(l)) if WRITABLE_EXTENSIONS.contains(&l.as_str()) => e.to_string(),
        _ => "png".into(),
    }
}

/// A parsed `--name` template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Piece>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Stem,
    Ext,
    Scale,
}

impl Template {
    /// The default, `{stem}_{scale}.{ext}`.
    pub fn default_template() -> Self {
        Self::parse("{stem}_{scale}.{ext}").expect("valid default template")
    }

    /// Parses a template: `{stem}`, `{ext}`, `{scale}`, `{{`, `}}` and plain text, no path
    /// separator.
    pub fn parse(s: &str) -> Result<Self> {
        if s.contains(['/', '\\']) {
            bail!("--name '{s}': a name template cannot hold a path separator");
        }
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                    let piece = match name.as_str() {
                        "stem" => Piece::Stem,
                        "ext" => Piece::Ext,
                        "scale" => Piece::Scale,
                        _ => bail!("--name '{s}': unknown placeholder {{{name}}} (use {{stem}}, {{ext}}, {{scale}})"),
                    };
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(piece);
                }
                '}' => bail!("--name '{s}': unmatched '}}' (write '}}}}' for a brace)"),
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        let t = Self(pieces);
        let probe = t.render("a", "png", "x4");
        if probe.is_empty() || probe == "." || probe == ".." {
            bail!("--name '{s}' gives an empty file name");
        }
        Ok(t)
    }

    /// The file name for one input, keeping the stem's bytes as they are (a file name need not be
    /// UTF-8: `x\xff.png` and `x\xfe.png` must not both become `x\u{FFFD}_x4.png`).
    pub fn render_os(&self, stem: &std::ffi::OsStr, ext: &str, scale: &str) -> std::ffi::OsString {
        let mut out = std::ffi::OsString::new();
        for p in &self.0 {
            match p {
                Piece::Text(t) => out.push(t),
                Piece::Stem => out.push(stem),
                Piece::Ext => out.push(ext),
                Piece::Scale => out.push(scale),
            }
        }
        out
    }

    /// The file name for one input ([`Template::render_os`] of a UTF-8 stem).
    pub fn render(&self, stem: &str, ext: &str, scale: &str) -> String {
        self.render_os(stem.as_ref(), ext, scale).to_string_lossy().into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_and_reject_bad_input() {
        let t = Template::default_template();
        assert_eq!(t.render("cat", "png", "x4"), "cat_x4.png");
        let t = Template::parse("{{{stem}}}-{scale}.jpg").unwrap();
        assert_eq!(t.render("a", "png", "x1.5"), "{a}-x1.5.jpg");
        assert!(Template::parse("{stem}/{ext}").is_err());
        assert!(Template::parse("{size}.png").unwrap_err().to_string().contains("unknown placeholder {size}"));
        assert!(Template::parse("a}.png").is_err());
        assert!(Template::parse("").is_err());
    }

    /// F09: names that are not UTF-8 keep their bytes, so two of them never collide.
    #[cfg(unix)]
    #[test]
    fn f09_non_utf8_stems_keep_their_bytes() {
        use std::os::unix::ffi::{OsStrExt, OsStringExt};
        let t = Template::default_template();
        let a = t.render_os(std::ffi::OsStr::from_bytes(b"x\xff"), "png", "x4");
        let b = t.render_os(std::ffi::OsStr::from_bytes(b"x\xfe"), "png", "x4");
        assert_ne!(a, b);
        assert_eq!(a.into_vec(), b"x\xff_x4.png".to_vec());
        // Found in a folder, the relative path keeps them apart too.
        let d = std::env::temp_dir().join(format!("infdit-f09-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        for n in [&b"x\xff.png"[..], b"x\xfe.png"] {
            std::fs::write(d.join(std::ffi::OsStr::from_bytes(n)), b"").unwrap();
        }
        let c = collect(std::slice::from_ref(&d), None);
        let rels: HashSet<_> = c.sources.iter().map(|s| s.rel.clone()).collect();
        assert_eq!(rels.len(), 2, "{:?}", c.sources);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn pattern_bases_and_extensions() {
        assert_eq!(pattern_base(Path::new("photos/**/*.jpg")), PathBuf::from("photos"));
        assert_eq!(pattern_base(Path::new("*.png")), PathBuf::new());
        assert_eq!(pattern_base(Path::new("/a/b?/c.png")), PathBuf::from("/a"));
        assert_eq!(output_extension(Path::new("a/b.JPG"), None), "JPG");
        assert_eq!(output_extension(Path::new("a/b.bmp"), None), "png");
        assert_eq!(output_extension(Path::new("a/b.bmp"), Some("webp")), "webp");
    }
}
