//! Everything that can be known before the model runs is checked before it runs, and `--dry-run`
//! gives the same verdicts (issue 13, point 2; issue 14, F04 and F06).
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure

mod common;

use std::path::Path;

use common::{infdit, tmpdir};

/// A 16 x 12 RGBA image whose left half is fully transparent.
fn rgba(path: &Path) {
    let img = image::RgbaImage::from_fn(16, 12, |x, y| {
        let a = if x < 8 { 0 } else { 255 };
        image::Rgba([(x * 12) as u8, (y * 15) as u8, 40, a])
    });
    img.save(path).unwrap();
}

/// A 16 x 12 RGB image.
fn rgb(path: &Path) {
    image::RgbImage::from_fn(16, 12, |x, y| image::Rgb([(x * 12) as u8, (y * 15) as u8, 40])).save(path).unwrap();
}

/// Runs `infdit upscale IN -o OUT ARGS --steps 1` with the built-in model.
fn upscale(input: &Path, output: &Path, args: &[&str]) -> std::process::Output {
    infdit()
        .arg("upscale")
        .arg(input)
        .arg("-o")
        .arg(output)
        .args(["--steps", "1", "--quiet"])
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn an_output_format_that_cannot_hold_the_image_is_refused_before_any_work() {
    let dir = tmpdir("checks-format");
    let (alpha, plain) = (dir.join("alpha.png"), dir.join("plain.png"));
    rgba(&alpha);
    rgb(&plain);
    let ck = dir.join("ck");
    let ck_arg = ck.to_str().unwrap();
    for (input, out, words) in [
        (&alpha, dir.join("x.jpg"), "JPEG has no alpha channel"),
        (&plain, dir.join("x.xyz"), "cannot write '.xyz' files"),
        (&plain, dir.join("x"), "no file extension"),
    ] {
        // The run refuses with the reason, and no sampler step ran (no checkpoint was written).
        let r = upscale(input, &out, &["--checkpoint-dir", ck_arg]);
        assert_eq!(r.status.code(), Some(1), "{}", stderr(&r));
        assert!(stderr(&r).contains(words), "{}", stderr(&r));
        assert!(!ck.exists(), "work was done before the refusal");
        assert!(!out.exists());
        // The dry run gives the same verdict.
        let d = upscale(input, &out, &["--dry-run"]);
        assert_eq!(d.status.code(), Some(1), "{}", stderr(&d));
        assert!(stderr(&d).contains(words), "{}", stderr(&d));
    }
    // The JPEG message names the flag that helps, and with it the image is flattened on the background.
    let r = upscale(&alpha, &dir.join("x.jpg"), &[]);
    assert!(stderr(&r).contains("--alpha drop"), "{}", stderr(&r));
    let out = dir.join("flat.jpg");
    let r = upscale(&alpha, &out, &["--alpha", "drop", "--background", "ff0000", "--sigma-max", "0.01"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let img = image::open(&out).unwrap();
    assert_eq!(img.color(), image::ColorType::Rgb8);
    assert_eq!((img.width(), img.height()), (64, 48));
    // The transparent left half became the red background (JPEG and the sampler move it a little).
    let p = img.to_rgb8().get_pixel(8, 24).0;
    assert!(p[0] > 200 && p[1] < 60 && p[2] < 60, "{p:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_missing_output_folder_is_made_and_the_dry_run_says_so() {
    let dir = tmpdir("checks-folder");
    let input = dir.join("in.png");
    rgb(&input);
    let out = dir.join("no/such/dir/o.png");
    let d = upscale(&input, &out, &["--dry-run"]);
    let text = String::from_utf8_lossy(&d.stdout);
    assert!(d.status.success(), "{}", stderr(&d));
    assert!(text.contains(&format!("creates the folder {}", dir.join("no/such/dir").display())), "{text}");
    assert!(!dir.join("no").exists(), "the dry run makes nothing");
    let r = upscale(&input, &out, &[]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(image::image_dimensions(&out).unwrap(), (64, 48));
    // A file where a folder is needed is refused before any work, in both.
    std::fs::write(dir.join("file"), b"x").unwrap();
    let blocked = dir.join("file/o.png");
    for extra in [&[][..], &["--dry-run"][..]] {
        let r = upscale(&input, &blocked, extra);
        assert_eq!(r.status.code(), Some(1));
        assert!(stderr(&r).contains("is a file"), "{}", stderr(&r));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_plan_whose_later_pass_does_not_fit_is_refused_before_the_first_pass() {
    let dir = tmpdir("checks-plan");
    let input = dir.join("in.png");
    rgb(&input);
    let ck = dir.join("ck");
    let out = dir.join("o.png");
    // x16 is two x4 passes; the second does not fit a 1 MiB budget even one block at a time.
    let args = ["--scale", "16", "--max-memory", "1M", "--checkpoint-dir", ck.to_str().unwrap()];
    let r = upscale(&input, &out, &args);
    assert_eq!(r.status.code(), Some(1), "{}", stderr(&r));
    let e = stderr(&r);
    assert!(e.contains("memory budget") && e.contains("--max-memory"), "{e}");
    // The first pass never ran: no pass output and no sampler state were saved.
    assert!(!ck.exists(), "a pass ran before the refusal");
    assert!(!out.exists());
    let d = upscale(&input, &out, &[&args[..4], &["--dry-run"]].concat());
    assert_eq!(d.status.code(), Some(1));
    assert!(stderr(&d).contains("memory budget"), "{}", stderr(&d));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--ensemble` averages runs on mirrored/transposed inputs: a bad size, or one with an option it
/// does not go with, is refused by flag before the model runs; a good one writes the output, which
/// differs from the single run's.
#[test]
fn the_ensemble_flag_is_checked_and_runs() {
    let dir = tmpdir("checks-ensemble");
    let input = dir.join("in.png");
    rgb(&input);
    let out = dir.join("out.png");
    for (args, words) in [
        (&["--ensemble", "3"][..], "--ensemble: 3: give 1, 2, 4 or 8 runs"),
        (&["--ensemble", "2", "--crop", "official", "--scale", "4"][..], "--ensemble: the official crop"),
        (&["--ensemble", "8", "--state-dir", "st"][..], "a state folder"),
    ] {
        let r = upscale(&input, &out, args);
        assert_eq!(r.status.code(), Some(1), "{}", stderr(&r));
        assert!(stderr(&r).contains(words), "{args:?}: {}", stderr(&r));
        assert!(!out.exists());
    }
    let single = dir.join("single.png");
    assert!(upscale(&input, &single, &["--ensemble", "1"]).status.success());
    let r = upscale(&input, &out, &["--ensemble", "8"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let (a, b) = (image::open(&single).unwrap().to_rgb8(), image::open(&out).unwrap().to_rgb8());
    assert_eq!(a.dimensions(), (64, 48));
    assert_eq!(a.dimensions(), b.dimensions());
    assert_ne!(a.as_raw(), b.as_raw());

    // Without the flag the built-in model runs with its own setting (config.json: an ensemble of
    // 2), which gives way to one run with a state folder instead of refusing it.
    let (default, two) = (dir.join("default.png"), dir.join("two.png"));
    let r = upscale(&input, &default, &["--verbose"]);
    assert!(stderr(&r).contains("1 Heun steps from sigma 20, ensemble of 2"), "{}", stderr(&r));
    assert!(upscale(&input, &two, &["--ensemble", "2"]).status.success());
    let bytes = |p: &std::path::Path| std::fs::read(p).unwrap();
    assert_eq!(bytes(&default), bytes(&two));
    let stated = dir.join("stated.png");
    let r = upscale(&input, &stated, &["--verbose", "--state-dir", dir.join("st").to_str().unwrap()]);
    assert!(stderr(&r).contains("ensemble of 1"), "{}", stderr(&r));
    assert_eq!(bytes(&stated), bytes(&single));
}
