//! Issue 14, F13: two inputs with the same file name, run at the same time with one `--state-dir`
//! and their own `--checkpoint-dir`s, each get their own state file and their own correct image.
#![allow(clippy::unwrap_used)] // tests stop at the first failure

mod common;

use std::path::Path;
use std::process::Command;

use common::{infdit, tmpdir};

fn image(path: &Path, seed: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_fn(24, 20, |x, y| {
        image::Rgb([(x as u8 * 9) ^ seed, (y as u8 * 11).wrapping_add(seed), seed])
    })
    .save(path)
    .unwrap();
}

fn upscale(input: &Path, output: &Path, extra: &[&std::ffi::OsStr]) -> Command {
    let mut c = infdit();
    c.arg("upscale").arg(input).arg("-o").arg(output).args(["--steps", "3", "--quiet"]).args(extra);
    c
}

#[test]
fn f13_same_named_inputs_share_a_state_folder_safely() {
    let dir = tmpdir("f13");
    let (a, b) = (dir.join("a/img.png"), dir.join("b/img.png"));
    image(&a, 17);
    image(&b, 201);
    // The references: each alone, the state in memory, one run (a state folder makes the built-in
    // model's default ensemble of two give way to one run).
    for (input, out) in [(&a, "ref-a.png"), (&b, "ref-b.png")] {
        let o = upscale(input, &dir.join(out), &["--ensemble".as_ref(), "1".as_ref()]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // Both at once, one state folder, a checkpoint folder each.
    let state = dir.join("state");
    let run = |input: &Path, out: &str, ck: &str| {
        let (s, c) = (state.as_os_str().to_owned(), dir.join(ck).into_os_string());
        upscale(input, &dir.join(out), &["--state-dir".as_ref(), &s, "--checkpoint-dir".as_ref(), &c]).spawn().unwrap()
    };
    let (ra, rb) = (run(&a, "a.png", "ck-a"), run(&b, "b.png", "ck-b"));
    for (child, name) in [(ra, "a"), (rb, "b")] {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
    }
    for (out, reference) in [("a.png", "ref-a.png"), ("b.png", "ref-b.png")] {
        let got = std::fs::read(dir.join(out)).unwrap();
        assert!(got == std::fs::read(dir.join(reference)).unwrap(), "{out} differs from the run alone");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
