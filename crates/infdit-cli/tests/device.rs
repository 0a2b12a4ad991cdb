//! `--device`, `--kv-offload` and the GPU parts of `infdit bench`, as far as a machine without a
//! GPU can check them: a GPU request is refused by a CPU-only build (and runs on the CPU with a
//! warning in a CUDA build), `--kv-offload` gives the same image, and the benchmark commands run.
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure

mod common;

use common::{infdit, shared, tmpdir};
use std::process::Output;

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `--model`/`--config` of the tiny2 parity model (with its CLIP tower).
fn tiny2() -> Vec<std::ffi::OsString> {
    let p = shared("parity2");
    vec!["--model".into(), p.join("tiny2.safetensors").into(), "--config".into(), p.join("config.json").into()]
}

fn upscale(out: &std::path::Path, extra: &[&str]) -> Output {
    infdit()
        .arg("upscale")
        .arg(shared("parity2").join("case_d_lr.png"))
        .arg("-o")
        .arg(out)
        .args(tiny2())
        .args(["--steps", "2", "--block-batch", "2", "--quiet"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn version_says_whether_cuda_is_built_in() {
    let o = infdit().arg("--version").output().unwrap();
    assert!(o.status.success());
    let v = stdout_of(&o);
    if cfg!(feature = "cuda") {
        assert!(v.contains("(with CUDA)"), "{v}");
    } else {
        assert!(v.contains("(CPU only)"), "{v}");
    }
}

/// Bad `--device` values are usage errors (exit 2) on every command that has the flag.
#[test]
fn bad_device_values_are_usage_errors() {
    for cmd in ["upscale", "eval", "bench"] {
        for bad in ["tpu", "cuda:x", "cuda:-1", "cuda0"] {
            let mut c = infdit();
            c.arg(cmd);
            match cmd {
                "upscale" => c.args(["in.png", "-o", "out.png"]),
                "eval" => c.args(["--hr", "in.png"]),
                _ => c.arg("denoise"),
            };
            let o = c.args(["--device", bad]).output().unwrap();
            assert_eq!(o.status.code(), Some(2), "{cmd} --device {bad}: {}", stderr_of(&o));
            assert!(stderr_of(&o).contains("--device"), "{}", stderr_of(&o));
        }
    }
}

/// `--device cuda`: in a CPU-only build a clear error (exit 1) that says how to build with CUDA,
/// before any work and without writing anything; in a CUDA build on a machine without a GPU a
/// warning, then the run on the CPU.
#[test]
fn gpu_request_without_cuda_or_without_a_gpu() {
    let dir = tmpdir("request");
    let out = dir.join("out.png");
    let hr = shared("parity").join("case_b_lr.png");
    let runs: Vec<(&str, Output)> = vec![
        ("upscale", upscale(&out, &["--device", "cuda"])),
        ("upscale cuda:1", upscale(&dir.join("out1.png"), &["--device", "cuda:1", "--dry-run"])),
        (
            "eval",
            infdit()
                .args(["eval", "--hr"])
                .arg(&hr)
                .args(tiny2())
                .args(["--steps", "1", "--device", "cuda", "--limit", "1"])
                .output()
                .unwrap(),
        ),
        (
            "bench",
            infdit()
                .args(["bench", "denoise"])
                .args(tiny2())
                .args(["--size", "128x128", "--repeat", "1", "--device", "cuda"])
                .output()
                .unwrap(),
        ),
    ];
    for (what, o) in runs {
        let err = stderr_of(&o);
        if cfg!(feature = "cuda") {
            if o.status.success() {
                assert!(err.contains("warning: no usable NVIDIA GPU") && err.contains("running on the CPU"), "{err}");
            }
        } else {
            assert_eq!(o.status.code(), Some(1), "{what}: {err}");
            assert!(err.contains("built without CUDA support") && err.contains("bench/build-cuda.sh"), "{what}: {err}");
        }
    }
    if !cfg!(feature = "cuda") {
        assert!(!out.exists());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--device cpu` and `--kv-offload` give the image of a plain run, byte for byte; `--kv-offload`
/// has no meaning in whole-image mode.
#[test]
fn kv_offload_and_cpu_device_give_the_same_image() {
    let dir = tmpdir("offload");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(name);
        let o = upscale(&out, extra);
        assert!(o.status.success(), "{name}: {}", stderr_of(&o));
        std::fs::read(out).unwrap()
    };
    let plain = run("plain.png", &[]);
    assert!(plain == run("cpu.png", &["--device", "cpu"]));
    assert!(plain == run("offload.png", &["--kv-offload"]), "--kv-offload changed the image");
    assert!(plain == run("offload-bf16kv.png", &["--kv-offload", "--kv-dtype", "f32"]));
    let o = upscale(&dir.join("whole.png"), &["--kv-offload", "--mode", "whole"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr_of(&o);
    assert!(err.contains("--kv-offload") && err.contains("is for the block scheduler"), "{err}");
    // --verbose names the device, the CPU kernel path and the cache's place.
    let o = upscale(&dir.join("v.png"), &["--kv-offload", "--verbose"]);
    assert!(o.status.success());
    let err = stderr_of(&o);
    assert!(err.contains("device: cpu") && err.contains("--kv-offload") && err.contains("memory plan"), "{err}");
    let kernels = format!("device: cpu, kernels {}", infdit::kernels::describe());
    assert!(err.contains(&kernels), "{kernels} not in {err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `infdit bench denoise` with several sizes and both --kv-offload settings prints one line per
/// measurement with the time per block (no GPU peak on the CPU); `bench compare` on the CPU
/// agrees with itself exactly.
#[test]
fn bench_sizes_offload_and_compare() {
    let o = infdit()
        .args(["bench", "denoise"])
        .args(tiny2())
        .args(["--size", "128x128,128x256", "--warmup", "128x128", "--repeat", "1", "--kv-offload", "both"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let out = stdout_of(&o);
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("infdit_denoise")).collect();
    assert_eq!(lines.len(), 4, "{out}");
    for (l, (size, blocks, kv)) in
        lines.iter().zip([("128x128", 1, "off"), ("128x128", 1, "on"), ("128x256", 2, "off"), ("128x256", 2, "on")])
    {
        assert!(l.contains(&format!("size={size} ")) && l.contains(&format!("blocks={blocks} ")), "{l}");
        assert!(l.contains(&format!("kv_offload={kv} ")) && l.contains("mode=blocks1 "), "{l}");
        assert!(l.contains("per_block_s=") && l.contains("peak_gpu_mib=na") && l.contains("device=cpu"), "{l}");
    }
    // The old form still gives the whole-image line.
    let o = infdit()
        .args(["bench", "denoise"])
        .args(tiny2())
        .args(["--size", "128x128", "--repeat", "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(stdout_of(&o).contains("mode=whole kv_offload=na"), "{}", stdout_of(&o));

    let o = infdit()
        .args(["bench", "compare"])
        .args(tiny2())
        .args(["--size", "256x256", "--dtype", "bf16"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let out = stdout_of(&o);
    assert!(out.contains("f32_max_abs_diff=0.000e0") && out.contains("f32_kv_offload_max_abs_diff=0.000e0"), "{out}");
    assert!(out.contains("bf16_kv_offload_max_abs_diff=0.000e0") && out.trim_end().ends_with("OK"), "{out}");
}
