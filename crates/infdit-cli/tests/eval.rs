//! End-to-end tests of `infdit eval` on the tiny parity2 model.
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure

mod common;

use common::{shared, tmpdir};
use std::path::PathBuf;
use std::process::{Command, Output};

fn eval(hr: &[PathBuf], extra: &[&str]) -> Output {
    let p2 = shared("parity2");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_infdit"));
    cmd.arg("eval").arg("--hr").args(hr);
    cmd.args(["--model".as_ref(), p2.join("tiny2.safetensors").as_os_str()]);
    cmd.args(["--config".as_ref(), p2.join("config.json").as_os_str()]);
    cmd.args(["--steps", "1"]).args(extra);
    cmd.output().unwrap()
}

/// The value after `key=` in the summary line.
fn summary_value(stdout: &str, key: &str) -> f64 {
    let line = stdout.lines().find(|l| l.starts_with("mean_psnr_y ")).expect("summary line");
    // `key` is e.g. "mean_psnr_y bicubic": find the section, then the named value.
    let (section, name) = key.split_once(' ').unwrap();
    let rest = line.split(section).nth(1).unwrap();
    let v = rest.split_whitespace().find_map(|w| w.strip_prefix(&format!("{name}="))).unwrap();
    v.parse().unwrap()
}

/// The model's and bicubic's tables (before the comparison table).
fn tables(stdout: &str) -> &str {
    stdout.split("## comparison").next().unwrap()
}

/// The comparison table.
fn comparison(stdout: &str) -> &str {
    stdout.split("## comparison").nth(1).expect("a comparison table")
}

/// The cells of the comparison row that starts with `| {image} | {method} |`.
fn row(stdout: &str, image: &str, method: &str) -> Vec<String> {
    let start = format!("| {image} | {method} |");
    let line = comparison(stdout)
        .lines()
        .find(|l| l.starts_with(&start))
        .unwrap_or_else(|| panic!("no row {start} in\n{stdout}"));
    line.trim_matches('|').split(" | ").map(|c| c.trim().to_string()).collect()
}

#[test]
fn eval_prints_both_tables_and_the_summary() {
    let img = shared("parity").join("case_b_sr.png");
    let dir = tmpdir("ok");
    let out = eval(&[img], &["--out-dir", dir.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("## model"), "{stdout}");
    assert!(stdout.contains("## bicubic"), "{stdout}");
    assert_eq!(stdout.matches("| image | PSNR-Y (dB) | SSIM-Y | seam |").count(), 2, "{stdout}");
    assert_eq!(tables(&stdout).matches("| case_b_sr.png |").count(), 2, "{stdout}");
    // The comparison table comes last: bicubic and the model, one row each for the image.
    assert_eq!(comparison(&stdout).matches("| case_b_sr.png | ").count(), 2, "{stdout}");
    let bic = summary_value(&stdout, "mean_psnr_y bicubic");
    assert!(bic.is_finite() && bic > 10.0, "bicubic PSNR-Y {bic}");
    let model = summary_value(&stdout, "mean_psnr_y model");
    assert!(model.is_finite(), "model PSNR-Y {model}");
    let written = image::open(dir.join("case_b_sr.png")).unwrap();
    assert_eq!((written.width(), written.height()), (384, 256));
    // The default block batch (the upscale's, from the memory plan) and a batch of one block give
    // the same output image.
    let one = tmpdir("one-block");
    let out =
        eval(&[shared("parity").join("case_b_sr.png")], &["--out-dir", one.to_str().unwrap(), "--block-batch", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pixels = |d: &std::path::Path| image::open(d.join("case_b_sr.png")).unwrap().to_rgb8().into_raw();
    assert!(pixels(&dir) == pixels(&one), "the block batch changed the output");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&one).unwrap();
}

#[test]
fn a_bad_file_fails_the_run_but_the_others_are_evaluated() {
    let dir = tmpdir("bad");
    let bad = dir.join("not_an_image.png");
    std::fs::write(&bad, b"this is not an image").unwrap();
    let img = shared("parity").join("case_b_sr.png");
    let out = eval(&[bad.clone(), img], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("not_an_image.png"), "{stderr}");
    assert_eq!(tables(&stdout).matches("| case_b_sr.png |").count(), 2, "{stdout}");
    assert!(stdout.contains("mean (1 image)"), "{stdout}");
    let bic = summary_value(&stdout, "mean_psnr_y bicubic");
    assert!(bic.is_finite() && bic > 10.0, "bicubic PSNR-Y {bic}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_peer_is_scored_beside_bicubic_and_the_model() {
    let img = shared("parity").join("case_b_sr.png");
    let dir = tmpdir("peer");
    let (out_dir, peer) = (dir.join("out"), dir.join("peer"));
    let first = eval(std::slice::from_ref(&img), &["--out-dir", out_dir.to_str().unwrap()]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    // The peer: bicubic's own output under another name, with a time.
    std::fs::create_dir_all(&peer).unwrap();
    std::fs::copy(out_dir.join("case_b_sr_bicubic.png"), peer.join("case_b_sr.png")).unwrap();
    std::fs::write(peer.join("times.tsv"), "case_b_sr\t2.5\n").unwrap();
    let out = eval(&[img], &["--peer", &format!("copy={}", peer.display())]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        comparison(&stdout).contains(
            "| image | method | PSNR-Y (dB) | vs bicubic (dB) | SSIM-Y | seam | flat-area dev. | s / image (median) |"
        ),
        "{stdout}"
    );
    // Columns: image, method, PSNR-Y, vs bicubic, SSIM-Y, seam, flat-area deviation, seconds.
    let bic = row(&stdout, "case_b_sr.png", "bicubic");
    let copy = row(&stdout, "case_b_sr.png", "copy");
    assert_eq!(bic[2], copy[2], "{stdout}");
    assert_eq!(copy[3], "+0.00");
    assert_eq!(bic[4..7], copy[4..7], "{stdout}");
    assert_eq!((bic[7].as_str(), copy[7].as_str()), ("n/a", "2.5"));
    // Bicubic's PSNR-Y in its own table, to 2 decimals.
    let bic_psnr = summary_value(&stdout, "mean_psnr_y bicubic");
    assert_eq!(bic[2], format!("{bic_psnr:.2}"));
    // The model (a checkpoint given by --model) is timed.
    let model = row(&stdout, "case_b_sr.png", "model");
    assert!(model[7].parse::<f64>().unwrap() > 0.0, "{stdout}");
    let mean = row(&stdout, "**mean (1 image)**", "copy");
    assert_eq!(mean[3], "+0.00 (0/1 ahead)");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn peer_errors_are_clear() {
    let img = shared("parity").join("case_b_sr.png");
    let dir = tmpdir("peer-errors");
    let fails = |peer: &str| {
        let out = eval(std::slice::from_ref(&img), &["--peer", peer]);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(fails("no-equals-sign").contains("--peer no-equals-sign: expected NAME=DIR"));
    assert!(fails(&format!("x={}", dir.join("missing").display())).contains("is not a folder"));
    assert!(fails(&format!("bicubic={}", dir.display())).contains("the name is taken"));
    std::fs::write(dir.join("times.tsv"), "case_b_sr 2.5\n").unwrap();
    assert!(fails(&format!("x={}", dir.display())).contains("times.tsv:1: expected `stem<TAB>seconds`"));
    std::fs::remove_file(dir.join("times.tsv")).unwrap();
    // No output for the image: that image fails, the run exits 1, the message names the file.
    let e = fails(&format!("x={}", dir.display()));
    assert!(e.contains("peer: x: cannot read") && e.contains("case_b_sr.png"), "{e}");
    // An output of the wrong size.
    image::RgbImage::new(16, 16).save(dir.join("case_b_sr.png")).unwrap();
    let e = fails(&format!("x={}", dir.display()));
    assert!(e.contains("is 16x16, the HR image 384x256"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn other_degradation_factors_are_upscaled_back_to_the_hr_size() {
    let img = shared("parity").join("case_b_sr.png"); // 384 x 256
    let mut bicubic = Vec::new();
    // An integer factor crops the HR to a multiple of it; another factor keeps the HR's size and
    // asks the model for exactly that size, as `--width` does.
    for (scale, size) in [("2", (384, 256)), ("3", (384, 255)), ("2.5", (384, 256))] {
        let dir = tmpdir(&format!("scale{scale}"));
        let out = eval(std::slice::from_ref(&img), &["--scale", scale, "--out-dir", dir.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "--scale {scale}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        for name in ["case_b_sr.png", "case_b_sr_bicubic.png", "case_b_sr_hr.png"] {
            let im = image::open(dir.join(name)).unwrap();
            assert_eq!((im.width(), im.height()), size, "--scale {scale}: {name}");
        }
        bicubic.push(summary_value(&stdout, "mean_psnr_y bicubic"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // A milder degradation is easier to undo.
    assert!(bicubic[0] > bicubic[1], "bicubic PSNR-Y at x2 {} and x3 {}", bicubic[0], bicubic[1]);
    for bad in ["0.5", "nan"] {
        let out = eval(std::slice::from_ref(&img), &["--scale", bad]);
        assert_eq!(out.status.code(), Some(1), "--scale {bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--scale"), "--scale {bad}");
    }
}
