//! End-to-end tests of the `infdit` binary on the parity model.

use std::path::PathBuf;

use image::GenericImageView;
use std::process::Command;

fn shared(set: &str) -> PathBuf {
    let base = std::env::var("INFDIT_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared")));
    base.join(set)
}

fn infdit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_infdit"))
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("infdit-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `infdit upscale --noise case.safetensors` reproduces the official output PNG (case a: identical).
#[test]
fn upscale_with_injected_noise_reproduces_the_official_png() {
    let p = shared("parity");
    let dir = tmpdir("upscale");
    let out = dir.join("a_sr.png");
    let status = infdit()
        .arg("upscale")
        .arg(p.join("case_a_lr.png"))
        .arg("-o")
        .arg(&out)
        .args(["--model".as_ref(), p.join("tiny_mp_rank_00_model_states.pt").as_os_str()])
        .args(["--config".as_ref(), p.join("config.json").as_os_str()])
        .args(["--noise".as_ref(), p.join("case_a.safetensors").as_os_str()])
        .arg("--quiet")
        .status()
        .unwrap();
    assert!(status.success());
    let ours = image::open(&out).unwrap().to_rgb8();
    let theirs = image::open(p.join("case_a_sr.png")).unwrap().to_rgb8();
    assert_eq!(ours.dimensions(), (128, 128));
    assert!(ours.as_raw() == theirs.as_raw(), "case a output differs from the official PNG");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A seeded run (no --noise) works, is deterministic, and never overwrites its input.
#[test]
fn seeded_upscale_is_deterministic_and_protects_the_input() {
    let p = shared("parity2");
    let dir = tmpdir("seeded");
    let run = |out: &PathBuf| {
        infdit()
            .arg("upscale")
            .arg(p.join("case_d_lr.png"))
            .arg("-o")
            .arg(out)
            .args(["--model".as_ref(), p.join("tiny2.safetensors").as_os_str()])
            .args(["--config".as_ref(), p.join("config.json").as_os_str()])
            .args(["--seed", "7", "--steps", "3", "--quiet"])
            .output()
            .unwrap()
    };
    let (o1, o2) = (dir.join("1.png"), dir.join("2.png"));
    assert!(run(&o1).status.success());
    assert!(run(&o2).status.success());
    assert_eq!(std::fs::read(&o1).unwrap(), std::fs::read(&o2).unwrap());
    assert_eq!(image::open(&o1).unwrap().to_rgb8().dimensions(), (384, 128));

    // Output path == input path: refused, input untouched.
    let input = dir.join("in.png");
    std::fs::copy(p.join("case_d_lr.png"), &input).unwrap();
    let before = std::fs::read(&input).unwrap();
    let r = infdit()
        .arg("upscale")
        .arg(&input)
        .arg("-o")
        .arg(&input)
        .args(["--model".as_ref(), p.join("tiny2.safetensors").as_os_str()])
        .args(["--config".as_ref(), p.join("config.json").as_os_str()])
        .args(["--steps", "1", "--quiet"])
        .output()
        .unwrap();
    assert!(!r.status.success());
    assert_eq!(std::fs::read(&input).unwrap(), before);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Bad inputs give one clear error naming the file, exit code 1, no panic.
#[test]
fn bad_inputs_get_clear_errors() {
    let p = shared("parity");
    let dir = tmpdir("bad");
    let junk = dir.join("junk.png");
    std::fs::write(&junk, b"not a png at all").unwrap();
    let r = infdit()
        .arg("upscale")
        .arg(&junk)
        .arg("-o")
        .arg(dir.join("out.png"))
        .args(["--model".as_ref(), p.join("tiny.safetensors").as_os_str()])
        .args(["--config".as_ref(), p.join("config.json").as_os_str()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("junk.png"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // A checkpoint for another config: every mismatch is named.
    let r = infdit()
        .arg("inspect")
        .args(["--model".as_ref(), shared("parity2").join("tiny2.safetensors").as_os_str()])
        .args(["--config".as_ref(), p.join("config.json").as_os_str()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1));
    assert!(err.contains("shape mismatch: mixins.adaln_layer.re_pos_embed"), "{err}");
    assert!(
        err.contains("missing key: mixins.adaln_layer.q_layer_norm")
            || err.contains("unexpected key: mixins.adaln_layer.q_layer_norm.3"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `infdit convert` writes a safetensors file that loads to the same model.
#[test]
fn convert_then_upscale() {
    let p = shared("parity");
    let dir = tmpdir("convert");
    let st = dir.join("tiny-bf16.safetensors");
    let r = infdit()
        .arg("convert")
        .arg(p.join("tiny_mp_rank_00_model_states.pt"))
        .arg("-o")
        .arg(&st)
        .args(["--dtype", "bf16"])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let r = infdit()
        .arg("inspect")
        .args(["--model".as_ref(), st.as_os_str()])
        .args(["--config".as_ref(), p.join("config.json").as_os_str()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(out.contains("110 tensors"), "{out}");
    assert!(out.contains("matches the config; 11 dead keys skipped"), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn real(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../infdit/tests/data/real")).join(name)
}

/// Runs a one-step upscale with the tiny2 model; returns (status ok, stderr).
fn quick_upscale(input: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> (bool, String) {
    let p = shared("parity2");
    let r = infdit()
        .arg("upscale")
        .arg(input)
        .arg("-o")
        .arg(out)
        .args(["--model".as_ref(), p.join("tiny2.safetensors").as_os_str()])
        .args(["--config".as_ref(), p.join("config.json").as_os_str()])
        .args(["--steps", "1", "--quiet"])
        .args(extra)
        .output()
        .unwrap();
    (r.status.success(), String::from_utf8_lossy(&r.stderr).into_owned())
}

/// Any input size: reflect-padded to the grid and cropped back to exactly 4x (or 2x) the input.
#[test]
fn any_size_input_gives_exactly_scale_times_the_input() {
    let dir = tmpdir("anysize");
    let src = image::open(shared("parity").join("case_b_lr.png")).unwrap().to_rgb8();
    let odd = image::imageops::crop_imm(&src, 3, 5, 37, 45).to_image();
    let input = dir.join("odd.png");
    odd.save(&input).unwrap();
    let out = dir.join("odd_x4.png");
    let (ok, err) = quick_upscale(&input, &out, &[]);
    assert!(ok, "{err}");
    assert_eq!(image::open(&out).unwrap().dimensions(), (148, 180));
    let out2 = dir.join("odd_x2.png");
    let (ok, err) = quick_upscale(&input, &out2, &["--scale", "2"]);
    assert!(ok, "{err}");
    assert_eq!(image::open(&out2).unwrap().dimensions(), (74, 90));
    // The official crop keeps the old behaviour: 32x32 -> 128x128.
    let out3 = dir.join("odd_official.png");
    let (ok, err) = quick_upscale(&input, &out3, &["--crop", "official"]);
    assert!(ok, "{err}");
    assert_eq!(image::open(&out3).unwrap().dimensions(), (128, 128));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Alpha, 16-bit, gray and ICC survive an upscale; --strip-metadata drops the profile.
#[test]
fn alpha_depth_gray_and_icc_are_kept() {
    let dir = tmpdir("formats");
    // 16-bit RGBA -> 16-bit RGBA PNG.
    let out = dir.join("rgba16.png");
    let (ok, err) = quick_upscale(&real("basn6a16.png"), &out, &[]);
    assert!(ok, "{err}");
    let img = image::open(&out).unwrap();
    assert_eq!(img.color(), image::ColorType::Rgba16);
    assert_eq!(img.dimensions(), (128, 128));
    // Alpha comes from the input's alpha plane (upscaled), not from the model: basn6a16's alpha
    // varies, so the output alpha must too.
    let a: Vec<u16> = img.to_rgba16().pixels().map(|p| p.0[3]).collect();
    assert!(a.iter().min() < a.iter().max());
    // 2-bit gray -> gray.
    let out = dir.join("gray.png");
    let (ok, err) = quick_upscale(&real("basn0g02.png"), &out, &[]);
    assert!(ok, "{err}");
    assert!(matches!(image::open(&out).unwrap().color(), image::ColorType::L8 | image::ColorType::L16));
    // ICC profile carried over, then stripped on request.
    let icc_in = real("HUAWEI-EVA-L09-16bit_709_g1_dt.png");
    let icc_of = |p: &std::path::Path| {
        use image::ImageDecoder;
        let mut d =
            image::codecs::png::PngDecoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap())).unwrap();
        d.icc_profile().unwrap()
    };
    let out = dir.join("icc.png");
    let (ok, err) = quick_upscale(&icc_in, &out, &[]);
    assert!(ok, "{err}");
    assert_eq!(icc_of(&out), icc_of(&icc_in));
    assert!(icc_of(&out).is_some());
    assert_eq!(image::open(&out).unwrap().color(), image::ColorType::Rgb16);
    let out = dir.join("stripped.png");
    let (ok, err) = quick_upscale(&icc_in, &out, &["--strip-metadata"]);
    assert!(ok, "{err}");
    assert_eq!(icc_of(&out), None);
    // JPEG output of an RGBA input: a clear refusal naming the output, no file left behind.
    let out = dir.join("rgba.jpg");
    let (ok, err) = quick_upscale(&real("basn6a08.png"), &out, &[]);
    assert!(!ok);
    assert!(err.contains("rgba.jpg"), "{err}");
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--json` prints one JSON object per line: start, progress events (monotonic), done.
#[test]
fn json_progress_events() {
    let dir = tmpdir("json");
    let out = dir.join("j.png");
    let p = shared("parity2");
    let r = infdit()
        .arg("upscale")
        .arg(p.join("case_d_lr.png"))
        .arg("-o")
        .arg(&out)
        .args(["--model".as_ref(), p.join("tiny2.safetensors").as_os_str()])
        .args(["--config".as_ref(), p.join("config.json").as_os_str()])
        .args(["--steps", "2", "--block-batch", "1", "--json"])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let events: Vec<serde_json::Value> =
        String::from_utf8_lossy(&r.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.first().unwrap()["event"], "start");
    assert_eq!(events.first().unwrap()["blocks"], 3);
    assert_eq!(events.last().unwrap()["event"], "done");
    let progress: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "progress").collect();
    // 3 evaluations x 3 blocks, plus the start and per-step reports.
    assert!(progress.len() >= 9, "{} progress events", progress.len());
    let done: Vec<u64> =
        progress.iter().map(|e| e["evals_done"].as_u64().unwrap() * 3 + e["blocks_done"].as_u64().unwrap()).collect();
    assert!(done.windows(2).all(|w| w[0] <= w[1]), "{done:?}");
    let last = progress.last().unwrap();
    assert_eq!((last["steps_done"].as_u64(), last["evals_done"].as_u64()), (Some(2), Some(3)));
    std::fs::remove_dir_all(&dir).unwrap();
}
