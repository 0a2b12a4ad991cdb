//! Regression tests of issue 14 (reliability): each test is named after its finding (F01..F15)
//! and failed before the fix. Damaged, foreign or concurrently used resume state is refused with a
//! message naming the file, never used.
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use infdit::checkpoint::state::STATE_FILE;
use infdit::diffusion::HeunConfig;
use infdit::diffusion::noise::Noise;
use infdit::loaded::Model;
use infdit::sampling::{Mode, SampleOptions, sample_with_noise};

const RECORD: &str = "infdit-state.safetensors";

/// A fresh, empty temporary folder for one test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("infdit-rel-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn blocks() -> Mode {
    Mode::Blocks { block_batch: 2, kv_dtype: DType::F32 }
}

/// Runs `steps` of 4 with a checkpoint (and a state folder when `sd` is given), then stops.
fn stopped(ck: &Path, sd: Option<&Path>, stop: usize) -> SampleOptions {
    SampleOptions {
        heun: HeunConfig { steps: 4, ..HeunConfig::default() },
        mode: blocks(),
        checkpoint_dir: Some(ck.to_path_buf()),
        state_dir: sd.map(Path::to_path_buf),
        stop_after_steps: Some(stop),
        ..Default::default()
    }
}

fn resume(o: &SampleOptions) -> SampleOptions {
    SampleOptions { stop_after_steps: None, ..o.clone() }
}

/// The error of a run that must fail, as text.
fn run_err(m: &Model, noise: &Noise, opts: &SampleOptions) -> String {
    let (p, _, clip) = random_inputs(2, 2, 7);
    match sample_with_noise(m, &p, &clip, noise, opts, &mut |_| {}) {
        Ok(o) => panic!("the run succeeded (resumed from {}), expected a refusal", o.resumed_from),
        Err(e) => e.to_string(),
    }
}

fn run_ok(m: &Model, noise: &Noise, opts: &SampleOptions) -> infdit::sampling::SampleOutcome {
    let (p, _, clip) = random_inputs(2, 2, 7);
    sample_with_noise(m, &p, &clip, noise, opts, &mut |_| {}).unwrap()
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// F11: zeroed blocks in the state file are refused on resume (naming the file), not used.
#[test]
fn f11_zeroed_block_in_state_file_is_refused() {
    let m = tiny_random(1, 32, 2, 3);
    let (ck, sd) = (temp_dir("f11z-ck"), temp_dir("f11z-sd"));
    let opts = stopped(&ck, Some(&sd), 2);
    let noise = Noise::Seeded(1);
    run_ok(&m, &noise, &opts);
    let file = sd.join(STATE_FILE);
    // The x copies start after the 4096-byte header; zero a stretch of each of the two.
    let len = std::fs::metadata(&file).unwrap().len();
    let block = 3 * 128 * 128 * 4u64;
    for start in [4096 + block / 2, 4096 + 4 * block + block / 2] {
        assert!(start + 4096 < len);
        patch(&file, start, &[0u8; 4096]);
    }
    let err = run_err(&m, &noise, &resume(&opts));
    assert!(err.contains(STATE_FILE) && err.contains("damaged"), "{err}");
}

/// F11: a flipped byte in the saved state tensor is refused.
#[test]
fn f11_flipped_byte_in_saved_state_is_refused() {
    let m = tiny_random(1, 32, 2, 3);
    let ck = temp_dir("f11f-ck");
    let opts = stopped(&ck, None, 2);
    let noise = Noise::Seeded(2);
    run_ok(&m, &noise, &opts);
    let record = ck.join(RECORD);
    let len = std::fs::metadata(&record).unwrap().len();
    let mut b = [0u8; 1];
    use std::os::unix::fs::FileExt;
    std::fs::File::open(&record).unwrap().read_exact_at(&mut b, len / 2).unwrap();
    patch(&record, len / 2, &[b[0] ^ 0x40]);
    let err = run_err(&m, &noise, &resume(&opts));
    assert!(err.contains(RECORD) && err.contains("damaged"), "{err}");
}

/// F11: a step count edited in the record (to the last step, or past it) is refused.
#[test]
fn f11_edited_steps_done_is_refused() {
    let m = tiny_random(1, 32, 2, 3);
    let noise = Noise::Seeded(3);
    for (sd, steps) in [(false, 4u32), (true, 4), (false, 9)] {
        let ck = temp_dir(&format!("f11s-ck-{sd}-{steps}"));
        let sdir = temp_dir(&format!("f11s-sd-{sd}-{steps}"));
        let opts = stopped(&ck, sd.then_some(sdir.as_path()), 1);
        run_ok(&m, &noise, &opts);
        let record = ck.join(RECORD);
        let mut t = candle_core::safetensors::load(&record, &Device::Cpu).unwrap();
        t.insert("steps_done".into(), Tensor::new(&[steps], &Device::Cpu).unwrap());
        candle_core::safetensors::save(&t, &record).unwrap();
        let err = run_err(&m, &noise, &resume(&opts));
        assert!(err.contains(RECORD) && err.contains("damaged"), "{err}");
    }
}

/// F12: a checkpoint of a model that differs in one network tensor (same config) is not resumed.
#[test]
fn f12_resume_with_other_weights_is_refused() {
    let a = tiny_random(1, 32, 2, 4);
    let cfg = a.cfg.clone();
    let mut ck_b = infdit::loaded::random::random_checkpoint(&cfg, 4).unwrap();
    let key = "transformer.layers.0.attention.dense.weight";
    let w = ck_b.load(key, &Device::Cpu).unwrap();
    ck_b.insert(key.into(), (w + 1e-3).unwrap());
    let b = Model::from_checkpoint(&cfg, ck_b, DType::F32, &Device::Cpu).unwrap();
    let ck = temp_dir("f12-ck");
    let opts = stopped(&ck, None, 1);
    let noise = Noise::Seeded(4);
    run_ok(&a, &noise, &opts);
    let err = run_err(&b, &noise, &resume(&opts));
    assert!(err.contains("different run"), "{err}");
    // The same weights resume.
    assert_eq!(run_ok(&a, &noise, &resume(&opts)).resumed_from, 1);
}

/// F13: a checkpoint folder in use by another process is refused, naming the folder.
#[test]
fn f13_checkpoint_folder_in_use_is_refused() {
    let m = tiny_random(1, 32, 2, 5);
    let ck = temp_dir("f13c-ck");
    let holder = std::fs::File::open(&ck).unwrap();
    holder.try_lock().unwrap();
    let err = run_err(&m, &Noise::Seeded(5), &stopped(&ck, None, 1));
    assert!(err.contains(&ck.display().to_string()) && err.contains("another infdit process"), "{err}");
    drop(holder);
    run_ok(&m, &Noise::Seeded(5), &stopped(&ck, None, 1));
}

/// F13: a state file in use by another process is refused; another run's resume state in a
/// shared state folder is never truncated, and that run still resumes.
#[test]
fn f13_shared_state_folder_keeps_the_other_runs_state() {
    let m = tiny_random(1, 32, 2, 6);
    let (ck_a, ck_b, sd) = (temp_dir("f13s-cka"), temp_dir("f13s-ckb"), temp_dir("f13s-sd"));
    let (na, nb) = (Noise::Seeded(6), Noise::Seeded(7));
    let a = stopped(&ck_a, Some(&sd), 2);
    run_ok(&m, &na, &a);
    let before = std::fs::read(sd.join(STATE_FILE)).unwrap();
    let err = run_err(&m, &nb, &stopped(&ck_b, Some(&sd), 1));
    assert!(err.contains(STATE_FILE) && err.contains("another run"), "{err}");
    assert!(std::fs::read(sd.join(STATE_FILE)).unwrap() == before, "a's state was changed");
    // Locked by a running process: refused.
    let holder = std::fs::OpenOptions::new().read(true).write(true).open(sd.join(STATE_FILE)).unwrap();
    holder.try_lock().unwrap();
    let err = run_err(&m, &na, &resume(&a));
    assert!(err.contains(STATE_FILE) && err.contains("another infdit process"), "{err}");
    drop(holder);
    let done = run_ok(&m, &na, &resume(&a));
    assert_eq!(done.resumed_from, 2);
    assert!(done.final_sample.is_some());
}

/// F05: a step count that cannot be allocated is refused, by the sampler and in a config's
/// `"sampler"` settings, instead of panicking ("capacity overflow") or aborting.
#[test]
fn f05_huge_step_counts_are_refused() {
    let m = tiny_random(1, 32, 2, 8);
    for steps in [usize::MAX, 1 << 32, 10_001] {
        let opts = SampleOptions { heun: HeunConfig { steps, ..HeunConfig::default() }, ..Default::default() };
        let err = run_err(&m, &Noise::Seeded(1), &opts);
        assert!(err.contains("steps") && err.contains("10000"), "{err}");
        let json = format!(r#"{{"sampler": {{"steps": {steps}, "sigma_max": 40.0}}}}"#);
        let err = infdit::config::SamplerDefaults::from_json_str(&json).unwrap_err().to_string();
        assert!(err.contains("steps"), "{err}");
    }
}

/// The released config as JSON with `field` of the DiT set to `value`.
fn dit_with(field: &str, value: u64) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&infdit::ModelConfig::released().to_json()).unwrap();
    v["dit"][field] = value.into();
    v.to_string()
}

/// F07: config values that divided by zero or overflowed inside infdit (patch 0, block size 0,
/// image size 0 or 2^62) are refused by the config reader with a message naming the field.
#[test]
fn f07_zero_and_huge_config_values_are_refused() {
    for (field, value) in [("patch", 0), ("block_px", 0), ("image_size", 0), ("image_size", 1 << 62), ("sr_scale", 0)] {
        let r = std::panic::catch_unwind(|| infdit::ModelConfig::from_json_str(&dit_with(field, value)));
        let err = r.unwrap_or_else(|_| panic!("{field} {value}: the config reader panicked")).unwrap_err().to_string();
        assert!(err.contains(field), "{field} {value}: {err}");
    }
}

/// F08: sizes that would allocate without limit (hidden 1e9, 1e6 layers, huge heads) are refused
/// by the config reader, and counting parameters builds nothing (it used to abort or run for
/// minutes).
#[test]
fn f08_huge_dimensions_are_refused_and_counting_builds_nothing() {
    for (field, value) in [("hidden", 1_000_000_000), ("depth", 1_000_000), ("heads", 1 << 40), ("mlp_hidden", 1 << 40)]
    {
        let err = infdit::ModelConfig::from_json_str(&dit_with(field, value)).unwrap_err().to_string();
        assert!(err.contains(field), "{field} {value}: {err}");
    }
    // A config built in code, past the reader: the count is refused, not attempted.
    let mut cfg = infdit::ModelConfig::released();
    cfg.dit.hidden = 1_000_000_000;
    cfg.dit.heads = 16;
    cfg.dit.mlp_hidden = 4;
    assert!(Model::parameter_count(&cfg).is_err());
    cfg.dit = infdit::config::DitConfig { depth: 100_000, ..infdit::config::DitConfig::released() };
    assert!(Model::parameter_count(&cfg).is_err());
}

/// Runs `f` on another thread; fails the test when it takes more than 20 s (a hang).
fn within_20s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(20)).unwrap_or_else(|_| panic!("{what}: hung"))
}

/// F01: a PNG whose ICC profile inflates far past any real profile (32 MiB of zeros, 32 KiB in
/// the file) is refused before it is inflated, naming the limit.
#[test]
fn f01_icc_bomb_is_refused() {
    use image::ImageEncoder;
    let d = temp_dir("f01");
    let p = d.join("bomb.png");
    let mut buf = Vec::new();
    let mut enc = image::codecs::png::PngEncoder::new(&mut buf);
    enc.set_icc_profile(vec![0u8; 32 << 20]).unwrap();
    enc.write_image(&[128u8; 32 * 32 * 3], 32, 32, image::ExtendedColorType::Rgb8).unwrap();
    assert!(buf.len() < 1 << 20, "{} bytes", buf.len());
    std::fs::write(&p, &buf).unwrap();
    let err = infdit::imageio::load_image(&p, &infdit::imageio::LoadLimits::default())
        .map(|_| ())
        .expect_err("the ICC bomb was loaded")
        .to_string();
    assert!(err.contains("bomb.png") && err.contains("ICC") && err.contains("limit"), "{err}");
}

/// A minimal uncompressed 2x1 RGB TIFF with 32 bits per sample and no SampleFormat tag
/// (so unsigned integers), values 25 % and 75 % of full scale.
fn tiff_u32_rgb() -> Vec<u8> {
    let mut t = b"II*\0".to_vec();
    t.extend(8u32.to_le_bytes());
    let entries: [(u16, u16, u32, u32); 9] = [
        (256, 3, 1, 2),  // width
        (257, 3, 1, 1),  // height
        (258, 3, 3, 0),  // bits per sample -> offset patched below
        (259, 3, 1, 1),  // no compression
        (262, 3, 1, 2),  // RGB
        (273, 4, 1, 0),  // strip offset -> patched
        (277, 3, 1, 3),  // samples per pixel
        (278, 3, 1, 1),  // rows per strip
        (279, 4, 1, 24), // strip bytes
    ];
    let ifd_len = 2 + entries.len() * 12 + 4;
    let bits_at = 8 + ifd_len as u32;
    let data_at = bits_at + 6;
    t.extend((entries.len() as u16).to_le_bytes());
    for (tag, typ, count, value) in entries {
        let value = match tag {
            258 => bits_at,
            273 => data_at,
            _ => value,
        };
        t.extend(tag.to_le_bytes());
        t.extend(typ.to_le_bytes());
        t.extend(count.to_le_bytes());
        t.extend(value.to_le_bytes());
    }
    t.extend(0u32.to_le_bytes());
    for _ in 0..3 {
        t.extend(32u16.to_le_bytes());
    }
    for v in [0x4000_0000u32, 0xC000_0000] {
        for _ in 0..3 {
            t.extend(v.to_le_bytes());
        }
    }
    t
}

/// F02: a 32-bit unsigned-integer TIFF is not read as float bits (25 % gray came out 128, 75 %
/// black): it is refused with a message that says why.
#[test]
fn f02_tiff_u32_is_not_read_as_float() {
    let d = temp_dir("f02");
    let p = d.join("u32.tif");
    std::fs::write(&p, tiff_u32_rgb()).unwrap();
    match infdit::imageio::load_image(&p, &infdit::imageio::LoadLimits::default()) {
        Ok(img) => panic!("loaded as {:?}", img.rgb.flatten_all().unwrap().to_vec1::<f32>().unwrap()),
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("u32.tif") && e.contains("32-bit unsigned-integer"), "{e}");
        }
    }
}

/// F03: a FIFO given as an image, a checkpoint or a config is refused at once, and one in a
/// searched folder is reported (it was silently skipped; opening it hung forever).
#[test]
fn f03_fifos_are_refused_not_waited_on() {
    let d = temp_dir("f03");
    for name in ["in.png", "model.safetensors", "config.json"] {
        let ok = std::process::Command::new("mkfifo").arg(d.join(name)).status().unwrap().success();
        assert!(ok, "mkfifo");
    }
    let p = d.join("in.png");
    let err = within_20s("load_image", move || {
        infdit::imageio::load_image(&p, &infdit::imageio::LoadLimits::default())
            .map(|_| ())
            .expect_err("loaded")
            .to_string()
    });
    assert!(err.contains("in.png") && err.contains("FIFO"), "{err}");
    let p = d.join("model.safetensors");
    let err = within_20s("Checkpoint::open", move || {
        infdit::weights::Checkpoint::open(&p).map(|_| ()).expect_err("a FIFO is no checkpoint").to_string()
    });
    assert!(err.contains("model.safetensors") && err.contains("FIFO"), "{err}");
    let p = d.join("config.json");
    let err = within_20s("ModelConfig::from_file", move || infdit::ModelConfig::from_file(&p).unwrap_err().to_string());
    assert!(err.contains("config.json") && err.contains("FIFO"), "{err}");
    // /dev/zero is no empty file but a device.
    let err = infdit::imageio::load_image(Path::new("/dev/zero"), &infdit::imageio::LoadLimits::default())
        .map(|_| ())
        .expect_err("/dev/zero loaded")
        .to_string();
    assert!(err.contains("character device"), "{err}");
    let mut walker = infdit::imageio::find::ImageWalker::new(None);
    let found = walker.images_below(&d).unwrap();
    assert!(found.is_empty());
    let listed = format!("{:?}", walker.not_regular);
    assert!(listed.contains("in.png") && listed.contains("FIFO"), "{listed}");
}

/// A PNG of `w` x `h` whose `eXIf` chunk (orientation `o`) follows the image data.
fn png_with_late_exif(w: u32, h: u32, o: u16) -> Vec<u8> {
    let mut png = Vec::new();
    image::RgbImage::from_pixel(w, h, image::Rgb([1, 2, 3]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let mut exif = b"II*\0".to_vec();
    exif.extend(8u32.to_le_bytes());
    exif.extend(1u16.to_le_bytes());
    exif.extend(0x0112u16.to_le_bytes());
    exif.extend(3u16.to_le_bytes());
    exif.extend(1u32.to_le_bytes());
    exif.extend((o as u32).to_le_bytes());
    exif.extend(0u32.to_le_bytes());
    let mut chunk = (exif.len() as u32).to_be_bytes().to_vec();
    let mut body = b"eXIf".to_vec();
    body.extend(&exif);
    chunk.extend(&body);
    chunk.extend(crc32fast::hash(&body).to_be_bytes());
    let iend = png.len() - 12;
    png.splice(iend..iend, chunk);
    png
}

/// F15: the header probe gives the size the load gives, with an EXIF orientation stored after
/// the PNG image data (the plans said 64x32 where the run made 32x64); it reads no pixels and
/// refuses a FIFO.
#[test]
fn f15_probe_applies_a_late_png_orientation() {
    let d = temp_dir("f15");
    let p = d.join("late.png");
    std::fs::write(&p, png_with_late_exif(64, 32, 6)).unwrap();
    let lim = infdit::imageio::LoadLimits::default();
    let info = infdit::imageio::probe(&p, &lim).unwrap();
    let img = infdit::imageio::load_image(&p, &lim).unwrap();
    assert_eq!(img.rgb.dims(), &[1, 3, 64, 32]);
    assert_eq!((info.width, info.height, info.has_alpha), (32, 64, false));
    let fifo = d.join("f.png");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let err = within_20s("probe", move || infdit::imageio::probe(&fifo, &lim).unwrap_err().to_string());
    assert!(err.contains("FIFO"), "{err}");
}

/// F10: a legal 250-byte output name is written (the temporary name `.NAME.PID.N.partial` was
/// longer than 255 bytes: "File name too long" after all the work), and no temporary is left.
#[test]
fn f10_longest_output_names_are_written() {
    let d = temp_dir("f10");
    let img = image::RgbImage::from_pixel(4, 4, image::Rgb([5, 6, 7]));
    let out = d.join(format!("{}.png", "n".repeat(246)));
    assert_eq!(out.file_name().unwrap().len(), 250);
    infdit::imageio::save_rgb8_atomic(&img, &out, &[]).unwrap();
    assert_eq!(image::open(&out).unwrap().to_rgb8(), img);
    assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
}

/// F14: temporary files of killed runs (this program's naming, older than the run, writer gone)
/// are removed when an output is written into their folder; anything else is left alone.
#[test]
fn f14_stale_partial_files_are_cleaned() {
    let d = temp_dir("f14partial");
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    // Process ids above the kernel's limit (4194304 at most) belong to no process.
    let stale = [".a.png.4194305.0.partial", ".b.png.infdit-4194306-3.partial"];
    let kept = [".c.png.partial", "d.png.4194305.0.partial", ".e.png.x.1.partial", "notes.txt"];
    for n in stale.iter().chain(&kept) {
        let f = std::fs::File::create(d.join(n)).unwrap();
        f.set_modified(old).unwrap();
    }
    let img = image::RgbImage::from_pixel(4, 4, image::Rgb([5, 6, 7]));
    infdit::imageio::save_rgb8_atomic(&img, &d.join("out.png"), &[]).unwrap();
    for n in stale {
        assert!(!d.join(n).exists(), "{n} left");
    }
    for n in kept {
        assert!(d.join(n).exists(), "{n} removed");
    }
}

/// F14: a checkpoint with none of the model's tensors says so (it said "give --clip").
#[test]
fn f14_foreign_checkpoint_is_named_as_such() {
    let cfg = infdit::ModelConfig::from_file(&shared("parity").join("config.json")).unwrap();
    assert!(cfg.clip.is_some());
    let t = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    let ck = infdit::weights::Checkpoint::from_tensors("other.safetensors", [("encoder.weight".to_string(), t)]);
    let err = Model::from_checkpoint(&cfg, ck, DType::F32, &Device::Cpu).map(|_| ()).expect_err("built").to_string();
    assert!(
        err.contains("other.safetensors") && err.contains("none of the Inf-DiT") && !err.contains("--clip"),
        "{err}"
    );
}

/// Found by the `config` fuzz harness: an official-format config with a huge `--hidden-size`
/// overflowed computing the MLP width (a panic); it is refused.
#[test]
fn fuzz_official_config_with_huge_hidden_size_is_refused() {
    let text = std::fs::read_to_string(shared("parity").join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["official_cli_flags"]["--hidden-size"] = (1u64 << 62).into();
    let r = std::panic::catch_unwind(|| infdit::ModelConfig::from_json_str(&v.to_string()));
    let err = r.expect("the config reader panicked").unwrap_err().to_string();
    assert!(err.contains("hidden"), "{err}");
}
