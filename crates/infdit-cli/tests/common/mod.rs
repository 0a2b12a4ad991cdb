//! Helpers shared by the CLI's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// `../shared/<set>` of the repository (override with INFDIT_SHARED_DIR).
pub fn shared(set: &str) -> PathBuf {
    let base = std::env::var("INFDIT_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared")));
    base.join(set)
}

/// A real photo of the library's test data.
pub fn real(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../infdit/tests/data/real")).join(name)
}

/// The `infdit` binary under test.
pub fn infdit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_infdit"))
}

/// A fresh, empty scratch folder for this test process.
pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("infdit-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every file below `dir` whose extension is `ext` (any, with `None`), by name relative to `dir`,
/// with its bytes; the sharded runs' bookkeeping folder `.infdit` is left out.
pub fn images(dir: &std::path::Path, ext: Option<&str>) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().unwrap() == ".infdit" {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if ext.is_none_or(|x| p.extension().is_some_and(|e| e == x)) {
                out.insert(p.strip_prefix(dir).unwrap().display().to_string(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// A deterministic noisy RGB image of `w x h`.
pub fn noisy_png(path: &std::path::Path, w: u32, h: u32, seed: u32) {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    let img = image::RgbImage::from_fn(w, h, |i, j| {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let n = (x >> 24) as u8;
        image::Rgb([(i * 7) as u8 ^ n, (j * 5) as u8, n / 2 + (i as u8)])
    });
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
}
