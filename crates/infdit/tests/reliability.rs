//! Regression tests of issue 14 (reliability): each test is named after its finding (F01..F15)
//! and failed before the fix. Damaged, foreign or concurrently used resume state is refused with a
//! message naming the file, never used.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use infdit::diffusion::HeunConfig;
use infdit::diffusion::noise::Noise;
use infdit::pipeline::{Mode, Model, SampleOptions, sample_with_noise};
use infdit::schedule::state::STATE_FILE;

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

fn run_ok(m: &Model, noise: &Noise, opts: &SampleOptions) -> infdit::pipeline::SampleOutcome {
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
    let mut ck_b = infdit::weights::random::random_checkpoint(&cfg, 4).unwrap();
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
