//! `infdit train` end to end on a tiny model: outputs, resume, and using the trained folder; and the
//! built-in default model.
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure

mod common;

use common::{infdit, tmpdir};
use std::path::Path;

/// A smooth picture with edges.
fn write_picture(path: &Path, w: u32, h: u32, seed: u32) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let v = |c: u32| {
            let s = ((x * (3 + c) + y * (5 + seed)) % 97) as f32 / 96.0;
            let edge = if (x / 13 + y / 21) % 2 == 0 { 40.0 } else { 0.0 };
            (s * 200.0 + edge) as u8
        };
        image::Rgb([v(0), v(1), v(2)])
    });
    img.save(path).unwrap();
}

const TINY: &str = r#"{"dit": {"hidden": 32, "depth": 2, "heads": 2, "mlp_hidden": 64, "patch": 8,
  "in_channels": 6, "out_channels": 3, "block_px": 64, "vector_dim": 8, "time_channels": 16,
  "image_size": 128, "sr_scale": 4, "lr_patch": 2, "ln_eps": 1e-6}, "clip": null}"#;

fn run(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let out = infdit().args(args).output().unwrap();
    assert!(out.status.success(), "infdit {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn train_writes_a_usable_model_and_resumes() {
    let dir = tmpdir("train");
    let data = dir.join("photos");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    write_picture(&data.join("a.png"), 150, 100, 1);
    write_picture(&data.join("sub/b.png"), 90, 120, 2);
    write_picture(&data.join("small.png"), 40, 40, 3); // below the crop: skipped
    let cfg = dir.join("tiny.json");
    std::fs::write(&cfg, TINY).unwrap();
    let out = dir.join("run");
    let train = |steps: &str| {
        let o = run(&[
            "train".as_ref(),
            data.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
            "--config".as_ref(),
            cfg.as_os_str(),
            "--steps".as_ref(),
            steps.as_ref(),
            "--batch".as_ref(),
            "1".as_ref(),
            "--crop".as_ref(),
            "64".as_ref(),
            "--checkpoint-every".as_ref(),
            "2".as_ref(),
            "--sample-steps".as_ref(),
            "2".as_ref(),
            "--sample-sigma-max".as_ref(),
            "3".as_ref(),
            "--lr".as_ref(),
            "1e-3".as_ref(),
        ]);
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let log = train("2");
    assert!(log.contains("2 training images (1 skipped)"), "{log}");
    assert!(log.contains("step 2: bicubic"), "{log}");
    for f in
        ["model.safetensors", "config.json", "train-state.safetensors", "train-state.json", "samples/step_000002.png"]
    {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let conf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(conf["sampler"]["steps"], 2);
    assert_eq!(conf["sampler"]["sigma_max"], 3.0);
    let log = train("4");
    assert!(log.contains("resuming from step 2"), "{log}");
    let csv = std::fs::read_to_string(out.join("loss.csv")).unwrap();
    let steps: Vec<&str> = csv.lines().skip(1).map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(steps, ["1", "2", "3", "4"], "{csv}");

    // The folder is a model: upscale with it (its sampler defaults apply).
    let input = dir.join("in.png");
    write_picture(&input, 20, 12, 4);
    let result = dir.join("out.png");
    let o = run(&[
        "upscale".as_ref(),
        input.as_os_str(),
        "-o".as_ref(),
        result.as_os_str(),
        "--model".as_ref(),
        out.as_os_str(),
    ]);
    assert!(o.status.success());
    assert_eq!(image::open(&result).unwrap().to_rgb8().dimensions(), (80, 48));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_training_settings_are_refused_with_a_reason() {
    let dir = tmpdir("train-bad");
    let cfg = dir.join("tiny.json");
    std::fs::write(&cfg, TINY).unwrap();
    let o = infdit()
        .args(["train".as_ref(), dir.as_os_str(), "--out".as_ref(), dir.join("o").as_os_str()])
        .args(["--config".as_ref(), cfg.as_os_str(), "--crop".as_ref(), "100".as_ref()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--crop: 100 is not a positive multiple of the 64-px block"));
    let o = infdit()
        .args(["train".as_ref(), dir.as_os_str(), "--out".as_ref(), dir.join("o").as_os_str()])
        .args(["--config".as_ref(), cfg.as_os_str(), "--crop".as_ref(), "64".as_ref()])
        .args(["--soften-prob", "1.5"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--soften-prob: 1.5 is not a probability"));
    let o = infdit()
        .args(["train".as_ref(), dir.as_os_str(), "--out".as_ref(), dir.join("o").as_os_str()])
        .args(["--config".as_ref(), cfg.as_os_str(), "--crop".as_ref(), "64".as_ref()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no usable training image"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// With no --model, the model built into the binary upscales.
#[test]
fn the_built_in_model_upscales_without_any_flag() {
    let dir = tmpdir("builtin");
    let input = dir.join("in.png");
    write_picture(&input, 40, 24, 5);
    let result = dir.join("out.png");
    run(&["upscale".as_ref(), input.as_os_str(), "-o".as_ref(), result.as_os_str(), "--quiet".as_ref()]);
    assert_eq!(image::open(&result).unwrap().to_rgb8().dimensions(), (160, 96));
    std::fs::remove_dir_all(&dir).unwrap();
}
