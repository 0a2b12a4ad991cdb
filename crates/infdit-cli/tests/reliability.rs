//! Regression tests of issue 14 (reliability) through the real binary, named after the findings.
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs `c`, killing it after `secs` (then the test fails: it hung).
fn output_within(mut c: Command, secs: u64) -> Output {
    let mut child = c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("hung for {secs} s; stderr: {}", String::from_utf8_lossy(&o.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn mkfifo(p: &Path) {
    assert!(Command::new("mkfifo").arg(p).status().unwrap().success(), "mkfifo");
}

/// An 8x8 RGB PNG.
fn tiny_png(p: &Path) {
    image::RgbImage::from_pixel(8, 8, image::Rgb([10, 120, 230])).save(p).unwrap();
}

fn model_args(c: &mut Command) -> &mut Command {
    let p = shared("parity2");
    c.args(["--model".as_ref(), p.join("tiny2.safetensors").as_os_str()])
        .args(["--config".as_ref(), p.join("config.json").as_os_str()])
}

/// F03: a FIFO given as the input, `--model` or `--config` (also with `--dry-run`) is refused at
/// once naming it; one inside a folder is reported, not skipped silently.
#[test]
fn f03_fifo_inputs_are_refused_not_waited_on() {
    let d = tmpdir("f03");
    let (png, fifo) = (d.join("a.png"), d.join("pipe.png"));
    tiny_png(&png);
    mkfifo(&fifo);
    let p = shared("parity2");
    // (A single FIFO input with --dry-run is read by the upscale planning's own header reader:
    // the lead's part, through `infdit::imageio::probe`.)
    for (what, args) in [
        (
            "config",
            vec![
                png.as_os_str(),
                "-o".as_ref(),
                d.join("o.png").as_os_str(),
                "--dry-run".as_ref(),
                "--config".as_ref(),
                fifo.as_os_str(),
            ],
        ),
        (
            "model",
            vec![png.as_os_str(), "-o".as_ref(), d.join("o.png").as_os_str(), "--model".as_ref(), fifo.as_os_str()],
        ),
    ] {
        let mut c = infdit();
        c.arg("upscale").args(&args);
        if what == "config" {
            c.args(["--model".as_ref(), p.join("tiny2.safetensors").as_os_str()]);
        }
        if what == "model" {
            c.args(["--config".as_ref(), p.join("config.json").as_os_str(), "--steps".as_ref(), "1".as_ref()]);
        }
        let o = output_within(c, 60);
        let err = stderr_of(&o);
        assert!(!o.status.success() && err.contains("pipe.png") && err.contains("FIFO"), "{what}: {err}");
    }
    // In a folder: reported, the other image still planned.
    let mut c = infdit();
    c.arg("upscale").arg(&d).arg("-o").arg(d.join("out")).arg("--dry-run");
    model_args(&mut c);
    let o = output_within(c, 60);
    let err = stderr_of(&o);
    assert!(err.contains("pipe.png") && err.contains("FIFO"), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// F05: `--steps` beyond the limit is refused by `--dry-run` and by a run, with the limit named
/// (it panicked with "capacity overflow" or aborted on a 16 GiB allocation).
#[test]
fn f05_huge_steps_are_refused_up_front() {
    let d = tmpdir("f05");
    let png = d.join("a.png");
    tiny_png(&png);
    for steps in ["18446744073709551615", "4294967296"] {
        for dry in [true, false] {
            let mut c = infdit();
            c.arg("upscale").arg(&png).arg("-o").arg(d.join("o.png")).args(["--steps", steps]);
            if dry {
                c.arg("--dry-run");
            }
            model_args(&mut c);
            let o = output_within(c, 120);
            let err = stderr_of(&o);
            assert_eq!(o.status.code(), Some(1), "{steps} dry {dry}: {err}");
            assert!(err.contains("--steps") && err.contains("10000") && !err.contains("panicked"), "{err}");
        }
    }
    assert!(!d.join("o.png").exists());
    std::fs::remove_dir_all(&d).unwrap();
}

/// F14: a missing config or model prints its message once, not twice (the error chain repeated
/// the source's text).
#[test]
fn f14_errors_print_their_text_once() {
    let d = tmpdir("f14once");
    let png = d.join("a.png");
    tiny_png(&png);
    let p = shared("parity2");
    for (model, config) in
        [(p.join("tiny2.safetensors"), d.join("missing.json")), (d.join("missing.safetensors"), p.join("config.json"))]
    {
        let mut c = infdit();
        c.arg("upscale")
            .arg(&png)
            .arg("-o")
            .arg(d.join("o.png"))
            .arg("--model")
            .arg(&model)
            .arg("--config")
            .arg(&config);
        let o = output_within(c, 120);
        let err = stderr_of(&o);
        let name = if config.exists() { "missing.safetensors" } else { "missing.json" };
        assert_eq!(err.matches(name).count(), 1, "{err}");
    }
    std::fs::remove_dir_all(&d).unwrap();
}
