//! Stopping a run: the library's cancellation flag (in-process) and Ctrl-C on the binary.
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure

mod common;

use common::{real, shared, tmpdir};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device};
use image::GenericImageView;
use infdit::diffusion::HeunConfig;
use infdit::diffusion::noise::image_noise;
use infdit::imageio::load_rgb;
use infdit::imageio::resize::Bicubic;
use infdit::loaded::Model;
use infdit::prepare::{PassScale, prepare_padded};
use infdit::sampling::{SampleOptions, sample};
use infdit::{InfditError, ModelConfig};

/// The flag stops the sampler before the next network evaluation with `Interrupted`, keeps the
/// state of the last completed step, and a rerun resumes to the uninterrupted result, bit for bit.
#[test]
fn cancel_flag_stops_at_the_next_evaluation_and_the_run_resumes() {
    let p = shared("parity2");
    let cfg = ModelConfig::from_file(&p.join("config.json")).unwrap();
    let dev = Device::Cpu;
    let model = Model::load(&cfg, &p.join("tiny2.safetensors"), None, DType::F32, &dev).unwrap();
    let lr = load_rgb(&real("basn6a08.png"), 1 << 20).unwrap();
    let (prep, _, clip_in) = prepare_padded(&lr, PassScale::X4, cfg.dit.block_px, Bicubic::Antialias).unwrap();
    let clip = model.clip_vector(&clip_in, Bicubic::Antialias).unwrap();
    let eps = image_noise(5, &prep.grid, 3, &dev).unwrap();
    let heun = HeunConfig { steps: 3, ..HeunConfig::default() };
    let full = sample(&model, &prep, &clip, &eps, &SampleOptions { heun, ..Default::default() }, &mut |_| {}).unwrap();

    let dir = tmpdir("cancel");
    let flag = Arc::new(AtomicBool::new(false));
    let opts =
        SampleOptions { heun, checkpoint_dir: Some(dir.clone()), cancel: Some(flag.clone()), ..Default::default() };
    // Step 1 is evaluations 1-2, step 2 evaluations 3-4: stop once evaluation 3 is done.
    let mut most = 0;
    let r = sample(&model, &prep, &clip, &eps, &opts, &mut |pr| {
        most = most.max(pr.evals_done);
        if pr.evals_done == 3 {
            flag.store(true, Ordering::SeqCst);
        }
    });
    assert!(matches!(r, Err(InfditError::Interrupted { steps_done: 1 })), "{r:?}");
    assert_eq!(most, 3, "an evaluation ran after the flag was set");
    assert!(dir.join("infdit-state.safetensors").exists());

    flag.store(false, Ordering::SeqCst);
    let resumed = sample(&model, &prep, &clip, &eps, &opts, &mut |_| {}).unwrap();
    assert_eq!(resumed.resumed_from, 1);
    let (a, b) = (full.sample.unwrap(), resumed.sample.unwrap());
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0);
    assert!(!dir.join("infdit-state.safetensors").exists(), "the state is removed once the run is done");

    // A flag set before the run stops it before the first evaluation.
    flag.store(true, Ordering::SeqCst);
    let opts = SampleOptions { heun, cancel: Some(flag), ..Default::default() };
    let mut evals = 0;
    let r = sample(&model, &prep, &clip, &eps, &opts, &mut |pr| evals = evals.max(pr.evals_done));
    assert!(matches!(r, Err(InfditError::Interrupted { steps_done: 0 })), "{r:?}");
    assert_eq!(evals, 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Ctrl-C (SIGINT) on the binary: exit code 130, no output and no temporary file, the last step
/// kept in --checkpoint-dir; rerunning the command resumes and gives the uninterrupted image.
/// The signal is sent once the first step is saved, with 3 of the 5 evaluations to go, so the run
/// cannot finish first.
#[cfg(unix)]
#[test]
fn ctrl_c_exits_130_without_partial_output_and_resumes() {
    use std::process::Command;

    let p = shared("parity2");
    let dir = tmpdir("ctrlc");
    let (out, ck) = (dir.join("out.png"), dir.join("ck"));
    let cmd = |out: &PathBuf, ck: Option<&PathBuf>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_infdit"));
        c.arg("upscale")
            .arg(real("basn6a08.png"))
            .arg("-o")
            .arg(out)
            .args(["--model".as_ref(), p.join("tiny2.safetensors").as_os_str()])
            .args(["--config".as_ref(), p.join("config.json").as_os_str()])
            .args(["--steps", "3", "--json"]);
        if let Some(ck) = ck {
            c.arg("--checkpoint-dir").arg(ck);
        }
        c
    };
    let (r, _) = interrupt_when(&mut cmd(&out, Some(&ck)), |v| v["steps_done"].as_u64().unwrap() >= 1);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(!out.exists());
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("ck")], "only the checkpoint folder remains");
    assert!(ck.join("infdit-state.safetensors").exists());

    let r = cmd(&out, Some(&ck)).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let straight = dir.join("straight.png");
    let r = cmd(&straight, None).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&straight).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `cmd` with its JSON events on a pipe and sends it SIGINT at the first progress event for
/// which `when` holds; returns its output (standard error, exit status) and its JSON events.
#[cfg(unix)]
fn interrupt_when(
    cmd: &mut std::process::Command,
    when: impl Fn(&serde_json::Value) -> bool,
) -> (std::process::Output, Vec<serde_json::Value>) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut signalled = false;
    let mut events = Vec::new();
    for line in stdout.lines() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        if !signalled && v["event"] == "progress" && when(&v) {
            let ok = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success();
            assert!(ok);
            signalled = true;
        }
        events.push(v);
    }
    assert!(signalled, "the run ended before the signal");
    (child.wait_with_output().unwrap(), events)
}

/// A two-pass run (--scale 8: x2 then x4) stopped in its second pass keeps the first pass's
/// output and the second pass's last step; the rerun skips the first pass, resumes the second,
/// and writes the image of an uninterrupted run.
#[cfg(unix)]
#[test]
fn two_pass_run_resumes_in_its_second_pass() {
    let p = shared("parity2");
    let dir = tmpdir("twopass");
    let input = dir.join("in.png");
    let src = image::open(p.join("case_d_lr.png")).unwrap().to_rgb8();
    image::imageops::crop_imm(&src, 40, 10, 8, 8).to_image().save(&input).unwrap();
    let (out, ck) = (dir.join("out.png"), dir.join("ck"));
    let cmd = |out: &PathBuf, ck: Option<&PathBuf>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_infdit"));
        c.arg("upscale")
            .arg(&input)
            .arg("-o")
            .arg(out)
            .args(["--model".as_ref(), p.join("tiny2.safetensors").as_os_str()])
            .args(["--config".as_ref(), p.join("config.json").as_os_str()])
            .args(["--steps", "3", "--scale", "8", "--json", "--verbose"]);
        if let Some(ck) = ck {
            c.arg("--checkpoint-dir").arg(ck);
        }
        c
    };
    let (r, _) =
        interrupt_when(&mut cmd(&out, Some(&ck)), |v| v["pass"] == 1 && v["steps_done"].as_u64().unwrap() >= 1);
    assert_eq!(r.status.code(), Some(130), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(!out.exists());
    assert!(ck.join("pass1-output.safetensors").exists());
    assert!(ck.join("pass2/infdit-state.safetensors").exists());

    let r = cmd(&out, Some(&ck)).output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(err.contains("pass 2/2") && !err.contains("pass 1/2"), "the first pass ran again: {err}");
    assert!(err.contains("resumed from step 1"), "{err}");
    assert_eq!(std::fs::read_dir(&ck).unwrap().count(), 0, "state files are removed once the image is written");
    let straight = dir.join("straight.png");
    let r = cmd(&straight, None).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(image::open(&out).unwrap().dimensions(), (64, 64));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&straight).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--alpha model` with --checkpoint-dir, stopped in the alpha plane's pass: the finished colour
/// is kept and the alpha pass's state is in `<DIR>/alpha`; the rerun does not sample the colour
/// again, resumes the alpha pass, writes the image of an uninterrupted run and removes its state.
#[cfg(unix)]
#[test]
fn alpha_model_run_resumes_in_the_alpha_pass() {
    let p = shared("parity2");
    let dir = tmpdir("alpha-resume");
    let (out, ck) = (dir.join("out.png"), dir.join("ck"));
    let cmd = |out: &PathBuf, ck: Option<&PathBuf>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_infdit"));
        c.arg("upscale")
            .arg(real("basn6a08.png"))
            .arg("-o")
            .arg(out)
            .args(["--model".as_ref(), p.join("tiny2.safetensors").as_os_str()])
            .args(["--config".as_ref(), p.join("config.json").as_os_str()])
            .args(["--steps", "3", "--alpha", "model", "--json", "--verbose"]);
        if let Some(ck) = ck {
            c.arg("--checkpoint-dir").arg(ck);
        }
        c
    };
    let (r, _) =
        interrupt_when(&mut cmd(&out, Some(&ck)), |v| v["plane"] == "alpha" && v["steps_done"].as_u64().unwrap() >= 1);
    assert_eq!(r.status.code(), Some(130), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(!out.exists());
    assert!(ck.join("pass1-output.safetensors").exists(), "the colour result is kept");
    assert!(!ck.join("infdit-state.safetensors").exists());
    assert!(ck.join("alpha/infdit-state.safetensors").exists());

    let r = cmd(&out, Some(&ck)).output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert_eq!(err.matches("pass 1/1 (").count(), 1, "the colour was sampled again: {err}");
    assert!(err.contains("alpha pass 1/1 (") && err.contains("resumed from step 1"), "{err}");
    assert_eq!(std::fs::read_dir(&ck).unwrap().count(), 0, "state files are removed once the image is written");
    let straight = dir.join("straight.png");
    let r = cmd(&straight, None).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(image::open(&out).unwrap().color(), image::ColorType::Rgba8);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&straight).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Ctrl-C in a batch stops it: exit 130, the summary counts the files not done, nothing written.
#[cfg(unix)]
#[test]
fn ctrl_c_stops_a_batch() {
    let p = shared("parity2");
    let dir = tmpdir("ctrlc-batch");
    let (inp, out) = (dir.join("in"), dir.join("out"));
    std::fs::create_dir_all(&inp).unwrap();
    for name in ["a.png", "b.png"] {
        std::fs::copy(real("basn6a08.png"), inp.join(name)).unwrap();
    }
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_infdit"));
    c.arg("upscale")
        .arg(&inp)
        .arg("-o")
        .arg(&out)
        .args(["--model".as_ref(), p.join("tiny2.safetensors").as_os_str()])
        .args(["--config".as_ref(), p.join("config.json").as_os_str()])
        .args(["--steps", "3", "--json"]);
    let (r, events) = interrupt_when(&mut c, |v| v["file_index"] == 0 && v["evals_done"].as_u64().unwrap() >= 1);
    assert_eq!(r.status.code(), Some(130), "{}", String::from_utf8_lossy(&r.stderr));
    let summary = events.last().unwrap();
    assert_eq!(summary["event"], "summary");
    assert_eq!(summary["interrupted"], true);
    assert_eq!((summary["done"].as_u64(), summary["not_done"].as_u64()), (Some(0), Some(2)));
    assert!(!events.iter().any(|e| e["file_index"] == 1), "the second file was started");
    let written = std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0);
    assert_eq!(written, 0);
    std::fs::remove_dir_all(&dir).unwrap();
}
