//! End-to-end tests of the `infdit` binary on the parity model.
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure

mod common;

use common::{infdit, real, shared, tmpdir};
use std::path::PathBuf;

use image::GenericImageView;
use std::process::Command;

/// `infdit upscale --noise case.safetensors --rounding truncate` reproduces the official output PNG
/// (case a: identical).
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
        .args(["--rounding", "truncate", "--quiet"])
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

/// An `infdit upscale` command on the tiny2 model: `args` then the model flags.
fn upscale_cmd(args: &[&std::ffi::OsStr]) -> Command {
    let p = shared("parity2");
    let mut c = infdit();
    c.arg("upscale")
        .args(args)
        .args(["--model".as_ref(), p.join("tiny2.safetensors").as_os_str()])
        .args(["--config".as_ref(), p.join("config.json").as_os_str()]);
    c
}

/// An 8x8 RGB PNG cut from a parity input at (x, y).
fn tiny_rgb(path: &std::path::Path, x: u32, y: u32) {
    let src = image::open(shared("parity2").join("case_d_lr.png")).unwrap().to_rgb8();
    image::imageops::crop_imm(&src, x, y, 8, 8).to_image().save(path).unwrap();
}

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json_events(o: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Folders (recursive, hidden entries and non-images skipped), quoted globs and plain files in
/// one batch: the output folder mirrors the input tree with the name template, a bad file fails
/// alone (named, counted, exit 1), and --skip-existing skips what is there.
#[test]
fn batch_mirrors_folders_globs_and_files() {
    let dir = tmpdir("batch");
    let (photos, loose, out) = (dir.join("photos"), dir.join("loose"), dir.join("out"));
    for d in [photos.join("sub"), photos.join(".hidden"), loose.clone()] {
        std::fs::create_dir_all(d).unwrap();
    }
    tiny_rgb(&photos.join("a.png"), 0, 0);
    tiny_rgb(&photos.join("sub/b.png"), 8, 8);
    tiny_rgb(&photos.join(".hidden/c.png"), 16, 0);
    std::fs::write(photos.join("notes.txt"), b"not an image").unwrap();
    std::fs::write(photos.join("sub/broken.png"), b"not a png at all").unwrap();
    tiny_rgb(&loose.join("d.png"), 24, 0);
    tiny_rgb(&loose.join("e.png"), 32, 0);
    tiny_rgb(&dir.join("f.png"), 40, 0);

    let pattern = loose.join("*.png");
    let run = |extra: &[&str]| {
        let mut c = upscale_cmd(&[photos.as_os_str(), pattern.as_os_str(), dir.join("f.png").as_os_str()]);
        c.arg("-o").arg(&out).args(["--steps", "1", "--name", "{stem}-{scale}.{ext}"]).args(extra);
        c.output().unwrap()
    };
    let r = run(&["--json"]);
    let err = stderr_of(&r);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("broken.png"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let made = ["a-x4.png", "sub/b-x4.png", "d-x4.png", "e-x4.png", "f-x4.png"];
    for f in made {
        assert_eq!(image::open(out.join(f)).unwrap().dimensions(), (32, 32), "{f}");
    }
    assert!(!out.join(".hidden").exists() && !out.join("c-x4.png").exists());
    assert!(!out.join("sub/broken-x4.png").exists());
    let events = json_events(&r);
    let summary = events.last().unwrap();
    assert_eq!(summary["event"], "summary");
    assert_eq!(
        (summary["done"].as_u64(), summary["skipped"].as_u64(), summary["failed"].as_u64()),
        (Some(5), Some(0), Some(1))
    );
    // Sorted folder walk first, then the pattern, then the file; six files in all.
    let starts: Vec<(u64, String)> = events
        .iter()
        .filter(|e| e["event"] == "start")
        .map(|e| (e["file_index"].as_u64().unwrap(), e["input"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(starts.len(), 5);
    assert!(starts[0].1.ends_with("photos/a.png") && starts[0].0 == 0, "{starts:?}");
    assert!(starts[4].1.ends_with("f.png") && starts[4].0 == 5, "{starts:?}");
    assert!(events.iter().all(|e| e["event"] == "summary" || e["file_count"] == 6));
    let failed: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "failed").collect();
    assert_eq!(failed.len(), 1);
    assert!(failed[0]["error"].as_str().unwrap().contains("broken.png"));

    // Rerun with --skip-existing: only the missing output is made, the others are untouched.
    std::fs::write(out.join("sub/b-x4.png"), b"marker").unwrap();
    std::fs::remove_file(out.join("e-x4.png")).unwrap();
    let r = run(&["--skip-existing"]);
    let err = stderr_of(&r);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("1 done, 4 skipped, 1 failed"), "{err}");
    assert_eq!(std::fs::read(out.join("sub/b-x4.png")).unwrap(), b"marker");
    assert_eq!(image::open(out.join("e-x4.png")).unwrap().dimensions(), (32, 32));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// In a batch, no output may land on an input: not by name (template giving the input's own
/// name in its own folder), and a collision between two outputs is refused for the second.
#[test]
fn batch_never_overwrites_an_input() {
    let dir = tmpdir("batch-inputs");
    tiny_rgb(&dir.join("a.png"), 0, 0);
    tiny_rgb(&dir.join("b.png"), 8, 0);
    std::fs::write(dir.join("b.jpg"), std::fs::read(dir.join("b.png")).unwrap()).unwrap();
    let before: Vec<Vec<u8>> = ["a.png", "b.png"].iter().map(|f| std::fs::read(dir.join(f)).unwrap()).collect();
    let r = upscale_cmd(&[dir.as_os_str()])
        .arg("-o")
        .arg(&dir)
        .args(["--steps", "1", "--name", "{stem}.png"])
        .output()
        .unwrap();
    let err = stderr_of(&r);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("refusing to overwrite"), "{err}");
    // a.png and b.png would overwrite themselves; b.jpg would write b.png, an input too.
    assert!(err.contains("0 done, 0 skipped, 3 failed"), "{err}");
    let after: Vec<Vec<u8>> = ["a.png", "b.png"].iter().map(|f| std::fs::read(dir.join(f)).unwrap()).collect();
    assert_eq!(before, after);

    // Two inputs with the same stem and --format: the second is refused, the first is written.
    let out = dir.join("out");
    let r = upscale_cmd(&[dir.join("b.png").as_os_str(), dir.join("b.jpg").as_os_str()])
        .arg("-o")
        .arg(&out)
        .args(["--steps", "1", "--format", "png"])
        .output()
        .unwrap();
    let err = stderr_of(&r);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains("b.jpg: its output") && err.contains("also the output of"), "{err}");
    assert_eq!(image::open(out.join("b_x4.png")).unwrap().dimensions(), (32, 32));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// --dry-run prints input -> output, sizes, passes, block grid and memory, writes nothing and
/// does not read the weights (a junk checkpoint file is fine).
#[test]
fn dry_run_plans_without_loading_or_writing() {
    let dir = tmpdir("dry");
    let (inp, out) = (dir.join("in"), dir.join("out"));
    std::fs::create_dir_all(inp.join("sub")).unwrap();
    tiny_rgb(&inp.join("a.png"), 0, 0);
    let big = image::RgbImage::from_pixel(40, 20, image::Rgb([9, 99, 199]));
    big.save(inp.join("sub/wide.png")).unwrap();
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"no weights here").unwrap();
    let r = infdit()
        .arg("upscale")
        .arg(&inp)
        .arg("-o")
        .arg(&out)
        .args(["--model".as_ref(), junk.as_os_str()])
        .args(["--config".as_ref(), shared("parity2").join("config.json").as_os_str()])
        .args(["--scale", "3", "--dry-run", "--block-batch", "1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{}{text}", stderr_of(&r));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].contains("a.png -> ") && lines[0].contains("a_x3.png: 8x8 -> 24x24"), "{}", lines[0]);
    assert!(lines[0].contains("x4 pass to 32x32 (1x1 blocks of 128 px, block batch 1), then a bicubic resize"));
    assert!(lines[0].contains(" MiB"), "{}", lines[0]);
    // 40x20: padded to 64x32 for x4 -> 256x128, 2x1 blocks (width x height, as every size).
    assert!(lines[1].contains("sub/wide_x3.png: 40x20 -> 120x60: x4 pass to 160x80 (2x1 blocks"), "{}", lines[1]);
    assert_eq!(lines[2], "dry run: 2 to upscale, 0 skipped, 0 failed; nothing written");
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// --scale 2/3/8/x1.5 and --width/--height give the exact sizes, through x4/x2 passes and a
/// downscale; 16-bit RGBA stays 16-bit RGBA with its own alpha.
#[test]
fn scale_factors_and_sizes_give_exact_dimensions() {
    let dir = tmpdir("scales");
    let input = dir.join("rgba16.png");
    let img = image::ImageBuffer::from_fn(8, 8, |x, y| {
        image::Rgba([(x * 8000) as u16, (y * 8000) as u16, 30000u16, (x * y * 1000 + 500) as u16])
    });
    image::DynamicImage::ImageRgba16(img).save(&input).unwrap();
    // (flags, output size, passes)
    type Case<'a> = (&'a [&'a str], (u32, u32), &'a [u64]);
    let cases: [Case; 7] = [
        (&["--scale", "2"], (16, 16), &[2]),
        (&["--scale", "3"], (24, 24), &[4]),
        (&["--scale", "8"], (64, 64), &[2, 4]),
        (&["--scale", "x1.5"], (12, 12), &[2]),
        (&["--width", "20"], (20, 20), &[4]),
        (&["--width", "30", "--height", "12"], (30, 12), &[4]),
        (&["--height", "100"], (100, 100), &[4, 4]),
    ];
    for (i, (flags, size, passes)) in cases.iter().enumerate() {
        let out = dir.join(format!("{i}.png"));
        let r = upscale_cmd(&[input.as_os_str()])
            .arg("-o")
            .arg(&out)
            .args(["--steps", "1", "--json"])
            .args(*flags)
            .output()
            .unwrap();
        assert!(r.status.success(), "{flags:?}: {}", stderr_of(&r));
        let img = image::open(&out).unwrap();
        assert_eq!(img.dimensions(), *size, "{flags:?}");
        assert_eq!(img.color(), image::ColorType::Rgba16, "{flags:?}");
        let a: Vec<u16> = img.to_rgba16().pixels().map(|p| p.0[3]).collect();
        assert!(a.iter().min() < a.iter().max(), "{flags:?}: alpha lost");
        let start = json_events(&r).into_iter().find(|e| e["event"] == "start").unwrap();
        let got: Vec<u64> = start["passes"].as_array().unwrap().iter().map(|p| p["scale"].as_u64().unwrap()).collect();
        assert_eq!(&got, passes, "{flags:?}");
        assert_eq!((start["width"].as_u64(), start["height"].as_u64()), (Some(size.0 as u64), Some(size.1 as u64)));
    }
    // --scale and --width together are a usage error; so is a scale that is not a number.
    let r = upscale_cmd(&[input.as_os_str()])
        .arg("-o")
        .arg(dir.join("x.png"))
        .args(["--scale", "2", "--width", "9"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));
    let r =
        upscale_cmd(&[input.as_os_str()]).arg("-o").arg(dir.join("x.png")).args(["--scale", "big"]).output().unwrap();
    assert_eq!(r.status.code(), Some(2));
    assert!(stderr_of(&r).contains("'big' is not a scale factor"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The built-in model plans by its own defaults (`"x2_mode": false`, `"chain": "within"`): x4 passes
/// only, no more than stay within the factor, the final resize taking the rest (docs/benchmarks.md).
#[test]
fn the_built_in_model_plans_x4_passes_within_the_factor() {
    let dir = tmpdir("builtin-plans");
    let input = dir.join("in.png");
    tiny_rgb(&input, 0, 0);
    for (scale, passes) in [("2", vec![4]), ("3", vec![4]), ("4", vec![4]), ("8", vec![4]), ("16", vec![4, 4])] {
        let r = infdit()
            .arg("upscale")
            .arg(&input)
            .arg("-o")
            .arg(dir.join("x.png"))
            .args(["--dry-run", "--json", "--scale", scale])
            .output()
            .unwrap();
        assert!(r.status.success(), "--scale {scale}: {}", stderr_of(&r));
        let plan = json_events(&r).into_iter().find(|e| e.get("passes").is_some()).expect("a plan event");
        let got: Vec<u64> = plan["passes"].as_array().unwrap().iter().map(|p| p["scale"].as_u64().unwrap()).collect();
        assert_eq!(got, passes, "--scale {scale}: {plan}");
    }
    assert!(!dir.join("x.png").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A 16x12 RGBA PNG: colour cut from a parity input, alpha in diagonal bands of 0, 64, 160, 255.
fn tiny_rgba(path: &std::path::Path) {
    let src = image::open(shared("parity").join("case_a_lr.png")).unwrap().to_rgb8();
    let img = image::ImageBuffer::from_fn(16, 12, |x, y| {
        let c = src.get_pixel(x, y).0;
        image::Rgba([c[0], c[1], c[2], [0u8, 64, 160, 255][((x / 4 + y / 6) % 4) as usize]])
    });
    img.save(path).unwrap();
}

/// An `infdit upscale` command on the parity model: `args` then the model flags.
fn parity_upscale(args: &[&std::ffi::OsStr]) -> Command {
    let p = shared("parity");
    let mut c = infdit();
    c.arg("upscale")
        .args(args)
        .args(["--model".as_ref(), p.join("tiny_mp_rank_00_model_states.pt").as_os_str()])
        .args(["--config".as_ref(), p.join("config.json").as_os_str()]);
    c
}

/// `--alpha bicubic` (the default) upscales the alpha plane straight from the input, as before
/// `--alpha` existed; `--alpha model` runs it through the model passes as a gray image with its
/// own noise: a different alpha, the same colour, twice the work in the progress events and plan.
#[test]
fn rgba_alpha_by_bicubic_or_by_the_model() {
    let dir = tmpdir("alpha");
    let input = dir.join("rgba.png");
    tiny_rgba(&input);
    let run = |name: &str, flags: &[&str]| {
        let out = dir.join(name);
        let steps: &[&str] = if flags.contains(&"--steps") { &[] } else { &["--steps", "2"] };
        let mut c = parity_upscale(&[input.as_os_str()]);
        let r = c.arg("-o").arg(&out).arg("--json").args(steps).args(flags).output().unwrap();
        assert!(r.status.success(), "{flags:?}: {}", stderr_of(&r));
        let img = image::open(&out).unwrap();
        assert_eq!(img.color(), image::ColorType::Rgba8, "{flags:?}");
        assert_eq!(img.dimensions(), (64, 48), "{flags:?}");
        (img.to_rgba8(), json_events(&r))
    };
    let (default, _) = run("default.png", &[]);
    let (bicubic, bicubic_events) = run("bicubic.png", &["--alpha", "bicubic"]);
    let (model, model_events) = run("model.png", &["--alpha", "model"]);
    let alpha = |img: &image::RgbaImage| img.pixels().map(|p| p.0[3]).collect::<Vec<u8>>();
    let colour = |img: &image::RgbaImage| img.pixels().flat_map(|p| [p.0[0], p.0[1], p.0[2]]).collect::<Vec<u8>>();

    // Bicubic is the default and gives today's alpha: values of a run made before --alpha existed,
    // and the antialiased bicubic of the input's alpha plane, rounded to 8 bits.
    assert_eq!(default.as_raw(), bicubic.as_raw());
    let known = [((16, 0), 42), ((19, 0), 69), ((33, 0), 152), ((49, 0), 247), ((47, 47), 167), ((48, 47), 88)];
    for ((x, y), v) in known {
        assert_eq!(bicubic.get_pixel(x, y).0[3], v, "alpha at ({x}, {y})");
    }
    let input_alpha: Vec<f32> =
        image::open(&input).unwrap().to_rgba8().pixels().map(|p| p.0[3] as f32 / 255.0).collect();
    let t = candle_core::Tensor::from_vec(input_alpha, (1, 1, 12, 16), &candle_core::Device::Cpu).unwrap();
    let want: Vec<u8> = infdit::imageio::resize::resize_tensor(&t, 48, 64, infdit::imageio::resize::Bicubic::Antialias)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| (v * 255.0).round() as u8)
        .collect();
    assert_eq!(alpha(&bicubic), want);

    // The model's alpha: another image (the random parity model makes noise of it), the colour
    // untouched (the alpha plane's noise is its own).
    let differ = alpha(&model).iter().zip(alpha(&bicubic)).filter(|(m, b)| **m != *b).count();
    assert!(differ > 64 * 48 / 2, "only {differ} alpha values differ");
    assert_eq!(colour(&model), colour(&bicubic));

    // At a tiny sigma the sampler returns about its LR input, so `--alpha model` must give about
    // the bicubic alpha back: the plane went through the passes and came back in place and range.
    let (quiet, _) = run("quiet.png", &["--alpha", "model", "--steps", "1", "--sigma-max", "0.01"]);
    let diffs: Vec<u8> = alpha(&quiet).iter().zip(alpha(&bicubic)).map(|(q, b)| q.abs_diff(b)).collect();
    let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
    assert!(diffs.iter().all(|&d| d <= 4) && mean < 1.0, "max {:?}, mean {mean}", diffs.iter().max());

    // Progress: the alpha passes count in the work and come after the colour's.
    let start = |ev: &[serde_json::Value]| ev.iter().find(|e| e["event"] == "start").unwrap().clone();
    let (sb, sm) = (start(&bicubic_events), start(&model_events));
    assert_eq!((sb["alpha"].as_str(), sb["work"].as_u64()), (Some("bicubic"), Some(3)));
    // `alpha_passes` counts the alpha plane's model passes, in `start` as in `--dry-run`'s `plan`.
    assert_eq!(sb["alpha_passes"].as_u64(), Some(0));
    assert_eq!((sm["alpha"].as_str(), sm["work"].as_u64()), (Some("model"), Some(6)));
    assert_eq!(sm["alpha_passes"].as_u64(), sm["passes"].as_array().map(|p| p.len() as u64));
    let progress: Vec<_> = model_events.iter().filter(|e| e["event"] == "progress").collect();
    let planes: Vec<(u64, &str)> =
        progress.iter().map(|e| (e["pass"].as_u64().unwrap(), e["plane"].as_str().unwrap())).collect();
    assert_eq!(planes.first(), Some(&(0, "colour")));
    assert_eq!(planes.last(), Some(&(1, "alpha")));
    assert!(planes.windows(2).all(|w| w[0].0 <= w[1].0), "{planes:?}");
    assert!(progress.iter().all(|e| e["passes"] == 2));

    // The dry run's plan says how the alpha plane is upscaled.
    let plan = |flags: &[&str]| {
        let r = parity_upscale(&[input.as_os_str()])
            .arg("-o")
            .arg(dir.join("x.png"))
            .arg("--dry-run")
            .args(flags)
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", stderr_of(&r));
        String::from_utf8_lossy(&r.stdout).lines().next().unwrap_or_default().to_string()
    };
    let line = plan(&["--alpha", "model"]);
    assert!(
        line.contains(
            "x4 pass to 64x48 (1x1 blocks of 128 px, block batch 1); alpha: the same 1 model pass again; about "
        ),
        "{line}"
    );
    let line = plan(&[]);
    assert!(line.contains("block batch 1); alpha: bicubic; about "), "{line}");
    assert!(!dir.join("x.png").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// With `--crop official` the alpha plane is centre-cropped exactly as the colour before its resize.
#[test]
fn official_crop_cuts_the_alpha_like_the_colour() {
    let dir = tmpdir("alpha-official");
    let input = dir.join("rgba.png");
    // 40 x 36: the official crop keeps the centre 32 x 32 (offsets 4, 2).
    let img =
        image::RgbaImage::from_fn(40, 36, |x, y| image::Rgba([(x * 6) as u8, (y * 7) as u8, 90, (x * 5 + y) as u8]));
    img.save(&input).unwrap();
    let out = dir.join("out.png");
    let mut c = parity_upscale(&[input.as_os_str()]);
    let r = c.arg("-o").arg(&out).args(["--crop", "official", "--steps", "1"]).output().unwrap();
    assert!(r.status.success(), "{}", stderr_of(&r));
    let got = image::open(&out).unwrap().to_rgba8();
    assert_eq!(got.dimensions(), (128, 128));
    let cropped: Vec<f32> = (0..32)
        .flat_map(|y| (0..32).map(move |x| (x, y)))
        .map(|(x, y)| img.get_pixel(x + 4, y + 2).0[3] as f32 / 255.0)
        .collect();
    let t = candle_core::Tensor::from_vec(cropped, (1, 1, 32, 32), &candle_core::Device::Cpu).unwrap();
    let want = infdit::imageio::resize::resize_tensor(&t, 128, 128, infdit::imageio::resize::Bicubic::Antialias)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (i, (p, w)) in got.pixels().zip(&want).enumerate() {
        assert!((p.0[3] as f32 - w * 255.0).abs() <= 1.0, "alpha {i}: {} vs {}", p.0[3], w * 255.0);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--state-dir` keeps the sampler state in files and gives the same image, leaving nothing behind.
#[test]
fn state_dir_gives_the_same_image_and_cleans_up() {
    let dir = tmpdir("state-dir");
    let input = shared("parity").join("case_b_lr.png");
    let state = dir.join("state");
    let run = |out: &std::path::Path, extra: &[&std::ffi::OsStr]| {
        let mut c = parity_upscale(&[input.as_os_str()]);
        let r =
            c.arg("-o").arg(out).args(["--steps", "2", "--block-batch", "2", "--quiet"]).args(extra).output().unwrap();
        assert!(r.status.success(), "{}", stderr_of(&r));
        std::fs::read(out).unwrap()
    };
    let plain = run(&dir.join("plain.png"), &[]);
    let filed = run(&dir.join("filed.png"), &["--state-dir".as_ref(), state.as_os_str()]);
    assert!(plain == filed, "--state-dir changed the image");
    let left: Vec<_> = walk(&state);
    assert!(left.is_empty(), "files left in the state folder: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn walk(d: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
        }
    }
    out
}

/// 8-bit output rounds to nearest by default; `--rounding truncate` gives the official script's
/// truncation: the same image at most one level darker, on average about half a level.
#[test]
fn rounding_nearest_by_default_truncate_on_request() {
    let dir = tmpdir("rounding");
    let input = shared("parity").join("case_b_lr.png");
    let (near, trunc) = (dir.join("near.png"), dir.join("trunc.png"));
    let (ok, err) = quick_upscale(&input, &near, &["--seed", "3"]);
    assert!(ok, "{err}");
    let (ok, err) = quick_upscale(&input, &trunc, &["--seed", "3", "--rounding", "truncate"]);
    assert!(ok, "{err}");
    let (a, b) = (image::open(&near).unwrap().to_rgb8(), image::open(&trunc).unwrap().to_rgb8());
    let mut sum = 0i64;
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = *x as i64 - *y as i64;
        assert!(d == 0 || d == 1, "{x} vs {y}");
        sum += d;
    }
    let mean = sum as f64 / a.as_raw().len() as f64;
    assert!((0.35..0.65).contains(&mean), "mean difference {mean}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `infdit upscale --help` is one line a flag, in groups (it was 170 lines of paragraphs); the
/// flags whose help was wrong say what they do: `--kv-dtype` is about the K/V cache (its help was
/// `--dtype`'s, "weights and activations"), and `--crop` names no block size (the built-in model's
/// blocks are 64 px, the released model's 128).
#[test]
fn upscale_help_is_grouped_and_short() {
    for flag in ["--help", "-h"] {
        let r = infdit().args(["upscale", flag]).output().unwrap();
        assert!(r.status.success());
        let help = String::from_utf8(r.stdout).unwrap();
        let lines: Vec<&str> = help.lines().collect();
        assert!(lines.len() <= 70, "{flag}: {} lines", lines.len());
        for heading in [
            "Input and output:",
            "Model:",
            "Size:",
            "Sampling:",
            "Performance and memory:",
            "Resume:",
            "Output format and metadata:",
            "Progress and reporting:",
        ] {
            assert!(lines.contains(&heading), "{flag}: no heading {heading:?}");
        }
        let line = |name: &str| *lines.iter().find(|l| l.trim_start().starts_with(name)).unwrap();
        let kv = line("--kv-dtype");
        assert!(kv.contains("cache") && !kv.contains("activations"), "{kv}");
        let crop = line("--crop");
        assert!(!crop.contains("128") && crop.contains("block grid"), "{crop}");
        assert!(help.contains("docs/cli.md"));
    }
}

/// The `--json` progress of a run ends at the full count, in block mode and in whole-image mode:
/// the last `progress` event has every evaluation and every block done (`blocks_done` was 0 in
/// block mode), and `work_done` climbs to the `start` event's `work` (whole-image mode's bar ran
/// one evaluation ahead). The built-in model (64-px blocks, no --model) on a 32 x 48 crop of the
/// quick-start photo: a 128 x 192 output, 2 x 3 blocks; two steps, three evaluations; one run
/// (`--ensemble 1`; the model's own default averages two, and the counts double).
#[test]
fn json_progress_ends_at_the_full_count() {
    let dir = tmpdir("json-full");
    let input = dir.join("in.png");
    let photo = image::open(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/ladybird-256.png")).unwrap();
    photo.crop_imm(100, 100, 32, 48).to_rgb8().save(&input).unwrap();
    for mode in [&["--mode", "blocks", "--block-batch", "1"][..], &["--mode", "whole"]] {
        let r = infdit()
            .arg("upscale")
            .arg(&input)
            .arg("-o")
            .arg(dir.join("out.png"))
            .args(["--steps", "2", "--json", "--ensemble", "1"])
            .args(mode)
            .output()
            .unwrap();
        assert!(r.status.success(), "{mode:?}: {}", stderr_of(&r));
        let events = json_events(&r);
        let start = events.iter().find(|e| e["event"] == "start").unwrap();
        let work = start["work"].as_u64().unwrap();
        assert_eq!((start["blocks"].as_u64(), work), (Some(6), 18), "{mode:?}");
        let progress: Vec<_> = events.iter().filter(|e| e["event"] == "progress").collect();
        let done: Vec<u64> = progress.iter().map(|e| e["work_done"].as_u64().unwrap()).collect();
        assert!(done.windows(2).all(|w| w[0] <= w[1]) && done.iter().all(|&d| d <= work), "{mode:?}: {done:?}");
        let last = progress.last().unwrap();
        let count = |k: &str| last[k].as_u64().unwrap();
        assert_eq!(
            [count("steps_done"), count("evals_done"), count("blocks_done"), count("work_done")],
            [count("steps_total"), count("evals_total"), count("blocks_total"), work],
            "{mode:?}: {last}"
        );
        assert_eq!((count("evals_total"), count("blocks_total")), (3, 6));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
