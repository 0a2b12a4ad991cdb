//! Parity with the official Inf-DiT code: every tensor of `shared/parity` and `shared/parity2`.
//!
//! Tolerances (about 5-10x the fp32-vs-fp64 noise floor of the parity READMEs):
//! clip_vector and cond_c 2e-6; hidden states 2e-5; denoised_0/10 5e-6; denoised_19 1e-6 plus the
//! network output F = (D - c_skip x)/c_out within 1e-4; x_step_k 2e-6 max|x| + 5e-6; sample 1e-5;
//! output PNGs identical except at most 0.1% of pixels off by one.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use infdit::diffusion::{EdmScalings, HeunConfig, heun_sample, initial_state};
use infdit::imageio::resize::Bicubic;
use infdit::imageio::{load_rgb, tensor_to_rgb8};
use infdit::prepare::{PassScale, prepare_official};
use infdit::schedule::WholeImageDenoiser;

fn f_of(d: &Tensor, x: &Tensor, sigma: f32) -> Tensor {
    // F = (D - c_skip x) / c_out in f64 from the f32 values.
    let s = EdmScalings::new(sigma);
    let d = d.to_dtype(DType::F64).unwrap();
    let x = x.to_dtype(DType::F64).unwrap();
    ((d - (x * s.c_skip as f64).unwrap()).unwrap() / s.c_out as f64).unwrap()
}

/// Everything of one case except the 20-step trajectory.
fn check_network(case_name: &str) {
    let c = case(case_name);
    let m = model(case_name);
    let lr = &c["lr"];
    let clip = m.clip_vector(lr, Bicubic::Antialias).unwrap();
    assert_close(&format!("{case_name} clip_vector"), &clip, &c["clip_vector"], 2e-6);

    let concat_lr = match c.get("concat_lr") {
        Some(t) => t.clone(),
        None => {
            let (set, _) = set_of(case_name);
            let png = load_rgb(&shared(set).join(format!("case_{case_name}_lr.png")), 1 << 30).unwrap();
            prepare_official(&png, PassScale::X4, 128, Bicubic::Antialias).unwrap().concat_lr.full().unwrap()
        }
    };
    let eps = &c["eps"];
    let sig = sigmas(&c);
    let mut den = WholeImageDenoiser::new(&m.dit, &clip, lr, &concat_lr).unwrap();
    for i in [0usize, 10, 19] {
        let cond = den.cond_vector(sig[i]).unwrap();
        assert_close(&format!("{case_name} cond_c_{i}"), &cond, &c[&format!("cond_c_{i}")], 2e-6);
        let x = x_in(&concat_lr, eps, sig[i]);
        let mut trace = Vec::new();
        let d = den.denoise_traced(&x, sig[i], Some(&mut trace)).unwrap();
        let expect = &c[&format!("denoised_{i}")];
        assert_close(&format!("{case_name} denoised_{i}"), &d, expect, if i == 19 { 1e-6 } else { 5e-6 });
        assert_close(&format!("{case_name} F_{i}"), &f_of(&d, &x, sig[i]), &f_of(expect, &x, sig[i]), 1e-4);
        if i == 10 {
            for (l, h) in trace.iter().enumerate() {
                if let Some(e) = c.get(&format!("hidden_10_layer{l}")) {
                    assert_close(&format!("{case_name} hidden_10_layer{l}"), h, e, 2e-5);
                }
            }
            if let Some(e) = c.get("hidden_10_layer0_block11") {
                // Interior block (1,1) of a 3x3 grid: token rows/cols 32..64 of the 96x96 grid.
                let h0 = trace[0].reshape((96, 96, trace[0].dim(2).unwrap())).unwrap();
                let blk = h0.narrow(0, 32, 32).unwrap().narrow(1, 32, 32).unwrap();
                let blk = blk.reshape((1, 1024, blk.dim(2).unwrap())).unwrap();
                assert_close(&format!("{case_name} hidden_10_layer0_block11"), &blk, e, 2e-5);
            }
        }
    }
}

/// The 20-step Heun run from the injected noise: trajectory, sample and the output PNG.
fn check_sampling(case_name: &str) {
    let c = case(case_name);
    let m = model(case_name);
    let (set, _) = set_of(case_name);
    let lr = &c["lr"];
    let concat_lr = match c.get("concat_lr") {
        Some(t) => t.clone(),
        None => {
            let png = load_rgb(&shared(set).join(format!("case_{case_name}_lr.png")), 1 << 30).unwrap();
            prepare_official(&png, PassScale::X4, 128, Bicubic::Antialias).unwrap().concat_lr.full().unwrap()
        }
    };
    let clip = m.clip_vector(lr, Bicubic::Antialias).unwrap();
    let sig = sigmas(&c);
    let x0 = initial_state(&concat_lr, &c["eps"], sig[0]).unwrap();
    let mut den = WholeImageDenoiser::new(&m.dit, &clip, lr, &concat_lr).unwrap();
    let mut checked = 0;
    let sample = heun_sample(&mut den, x0, &sig, 0, &mut |k, x| {
        if let Some(e) = c.get(&format!("x_step_{k}")) {
            let tol = 2e-6 * max_of(e) + 5e-6;
            assert_close(&format!("{case_name} x_step_{k}"), x, e, tol);
            checked += 1;
        }
        Ok(())
    })
    .unwrap();
    if let Some(e) = c.get("sample") {
        assert_close(&format!("{case_name} sample"), &sample, e, 1e-5);
    }
    if case_name == "a" {
        assert_eq!(checked, 11, "case a stores 11 trajectory steps");
    }
    let ours = tensor_to_rgb8(&sample).unwrap();
    let theirs = image::open(shared(set).join(format!("case_{case_name}_sr.png"))).unwrap().to_rgb8();
    assert_eq!(ours.dimensions(), theirs.dimensions());
    let mut off = 0usize;
    for (a, b) in ours.as_raw().iter().zip(theirs.as_raw()) {
        let d = (*a as i32 - *b as i32).abs();
        assert!(d <= 1, "{case_name}: a pixel differs by {d}");
        off += (d == 1) as usize;
    }
    let n = ours.as_raw().len();
    println!("{case_name} PNG: {off} of {n} values off by one");
    assert!(off * 1000 <= n, "{case_name}: {off} of {n} values off by one (> 0.1%)");
}

#[test]
fn case_a_network() {
    check_network("a");
}
#[test]
fn case_b_network() {
    check_network("b");
}
#[test]
fn case_c_network() {
    check_network("c");
}
#[test]
fn case_d_network() {
    check_network("d");
}
#[test]
fn case_e_network() {
    check_network("e");
}
#[test]
fn case_a_sampling() {
    check_sampling("a");
}
#[test]
fn case_b_sampling() {
    check_sampling("b");
}
#[test]
fn case_c_sampling() {
    check_sampling("c");
}
#[test]
fn case_d_sampling() {
    check_sampling("d");
}
#[test]
fn case_e_sampling() {
    check_sampling("e");
}

/// The network in bf16 and f16 (on this CPU the bf16 dot-product kernels where it has them): the
/// network output F at sigma index 10 within a few bf16 roundings of the reference, measured as
/// max |F - F_ref| / max |F_ref| (printed).
fn check_reduced_precision(case_name: &str) {
    let c = case(case_name);
    let lr = &c["lr"];
    let (set, _) = set_of(case_name);
    let png = load_rgb(&shared(set).join(format!("case_{case_name}_lr.png")), 1 << 30).unwrap();
    let concat_lr = prepare_official(&png, PassScale::X4, 128, Bicubic::Antialias).unwrap().concat_lr.full().unwrap();
    let sig = sigmas(&c)[10];
    let x = x_in(&concat_lr, &c["eps"], sig);
    let expect = f_of(&c["denoised_10"], &x, sig);
    for (dt, tol) in [(DType::BF16, 3e-2), (DType::F16, 5e-3)] {
        let m = model_in(case_name, dt);
        let clip = m.clip_vector(lr, Bicubic::Antialias).unwrap();
        let mut den = WholeImageDenoiser::new(&m.dit, &clip, lr, &concat_lr).unwrap();
        let d = den.denoise_traced(&x, sig, None).unwrap();
        let rel = max_abs(&f_of(&d, &x, sig), &expect) / max_of(&expect);
        println!("{case_name} {dt:?}: max |F - F_ref| / max |F_ref| = {rel:.2e}");
        assert!(rel < tol, "{case_name} {dt:?}: {rel:.2e}");
    }
}

#[test]
fn case_a_network_bf16_f16() {
    check_reduced_precision("a");
}
#[test]
fn case_d_network_bf16_f16() {
    check_reduced_precision("d");
}

#[test]
fn sigma_table_matches_the_reference() {
    let c = case("a");
    let stored = sigmas(&c);
    let ours = HeunConfig::default().sigmas();
    assert_eq!(ours.len(), 21);
    for (i, (a, b)) in ours.iter().zip(&stored).enumerate() {
        let rel = ((a - b) / b.max(1e-30)).abs();
        assert!(rel <= 2.5e-7, "sigma {i}: ours {a:e}, reference {b:e}");
    }
    assert_eq!(ours[20], 0.0);
    let exact = ours.iter().zip(&stored).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
    println!("sigma table: {exact} of 21 bit-identical");
}

#[test]
fn official_preparation_reproduces_the_stored_inputs() {
    for case_name in ["a", "b", "c", "d"] {
        let c = case(case_name);
        let (set, _) = set_of(case_name);
        let png = load_rgb(&shared(set).join(format!("case_{case_name}_lr.png")), 1 << 30).unwrap();
        let p = prepare_official(&png, PassScale::X4, 128, Bicubic::Antialias).unwrap();
        assert_close(&format!("{case_name} lr"), &p.lr, &c["lr"], 0.0);
        if let Some(e) = c.get("concat_lr") {
            assert_close(&format!("{case_name} concat_lr"), &p.concat_lr.full().unwrap(), e, 1e-6);
        }
    }
    // The official 2x mode (case e): LR halved, concat_lr at 2x.
    let c = case("e");
    let png = load_rgb(&shared("parity2").join("case_e_lr.png"), 1 << 30).unwrap();
    assert_close("e lr_input", &png, &c["lr_input"], 0.0);
    let p = prepare_official(&png, PassScale::X2, 128, Bicubic::Antialias).unwrap();
    assert_close("e concat_lr (2x)", &p.concat_lr.full().unwrap(), &c["concat_lr"], 1e-6);
    assert_close("e lr (2x, downsampled)", &p.lr, &c["lr"], 1e-6);
    assert_eq!((p.grid.rows, p.grid.cols), (2, 1));
    let _ = Device::Cpu;
}
