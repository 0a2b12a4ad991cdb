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
    assert_eq!(stdout.matches("| case_b_sr.png |").count(), 2, "{stdout}");
    let bic = summary_value(&stdout, "mean_psnr_y bicubic");
    assert!(bic.is_finite() && bic > 10.0, "bicubic PSNR-Y {bic}");
    let model = summary_value(&stdout, "mean_psnr_y model");
    assert!(model.is_finite(), "model PSNR-Y {model}");
    let written = image::open(dir.join("case_b_sr.png")).unwrap();
    assert_eq!((written.width(), written.height()), (384, 256));
    std::fs::remove_dir_all(&dir).unwrap();
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
    assert_eq!(stdout.matches("| case_b_sr.png |").count(), 2, "{stdout}");
    assert!(stdout.contains("mean (1 image)"), "{stdout}");
    let bic = summary_value(&stdout, "mean_psnr_y bicubic");
    assert!(bic.is_finite() && bic > 10.0, "bicubic PSNR-Y {bic}");
    std::fs::remove_dir_all(&dir).unwrap();
}
