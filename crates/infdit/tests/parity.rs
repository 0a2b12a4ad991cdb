//! Parity with the official Inf-DiT code: every tensor of `shared/parity` and `shared/parity2`.
//!
//! Tolerances (the `TOL_*` constants below) are about 5-10x the fp32-vs-fp64 noise floor of the
//! parity READMEs; output PNGs are identical except at most 0.1% of values off by one. Every golden
//! tensor a case holds is checked, and a missing one fails the test (see [`golden`]).
//!
//! Kernel paths (docs/kernels.md): with `INFDIT_KERNELS` set, every check runs on that path only (the
//! aarch64 emulation script runs neon and portable that way). Without it, the network checks (f32, bf16,
//! f16) and the two smallest sampling cases (a: one block, e: the 2x mode) run on every path this CPU
//! supports, so an AVX-512 machine checks its AVX2 and portable paths against the vectors too; the
//! larger sampling cases (b, c, d) run on the fastest path, to keep the suite's time.
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure

mod common;

/// `clip_vector` and the conditioning vectors (about 5-10x the fp32-vs-fp64 noise floor).
const TOL_VECTOR: f64 = 2e-6;
/// Hidden states after each layer.
const TOL_HIDDEN: f64 = 2e-5;
/// `D(x; sigma)` at the schedule's indices 0 and 10.
const TOL_DENOISED: f64 = 5e-6;
/// `D(x; sigma)` at index 19 (sigma 0.002, where D is nearly x).
const TOL_DENOISED_LAST: f64 = 1e-6;
/// The network output F = (D - c_skip x) / c_out.
const TOL_NETWORK_OUTPUT: f64 = 1e-4;
/// The trajectory: relative to the state's largest value, plus an absolute floor.
const TOL_STEP_REL: f64 = 2e-6;
const TOL_STEP_ABS: f64 = 5e-6;
/// The final sample.
const TOL_SAMPLE: f64 = 1e-5;
/// The stored resampled inputs (`concat_lr`, the 2x mode's LR).
const TOL_RESIZE: f64 = 1e-6;
/// Reduced precision: max |F - F_ref| / max |F_ref| in bf16 and f16.
const TOL_BF16_REL: f64 = 3e-2;
const TOL_F16_REL: f64 = 5e-3;
/// Output PNG: at most this fraction of values off by one (none by more).
const MAX_OFF_BY_ONE: f64 = 1e-3;

/// The golden tensors each case holds (its README; the rest were left out to fit the size cap).
/// A test that expects one and does not find it fails: nothing is skipped.
struct Golden {
    /// `hidden_10_layer<l>` for every layer.
    hidden_layers: bool,
    /// `hidden_10_layer0_block11`, the interior block of a 3x3 grid.
    block11: bool,
    /// `x_step_<k>` for these k.
    steps: &'static [usize],
    /// `sample` (and `concat_lr`).
    sample: bool,
}

fn golden(case_name: &str) -> Golden {
    let none = Golden { hidden_layers: false, block11: false, steps: &[], sample: true };
    match case_name {
        "a" => Golden { hidden_layers: true, steps: &[0, 1, 2, 3, 4, 5, 9, 10, 14, 17, 18], ..none },
        "c" => Golden { block11: true, ..none },
        "d" => Golden { sample: false, ..none },
        _ => none,
    }
}

/// A golden tensor that must be there.
fn key<'a>(c: &'a std::collections::HashMap<String, Tensor>, case_name: &str, k: &str) -> &'a Tensor {
    c.get(k).unwrap_or_else(|| panic!("case {case_name}: the golden vectors have no '{k}'"))
}

/// The upsampled LR: stored, or (where the README says it was left out) prepared from the PNG.
fn concat_lr_of(case_name: &str, c: &std::collections::HashMap<String, Tensor>) -> Tensor {
    let (set, _) = set_of(case_name);
    if golden(case_name).sample {
        return key(c, case_name, "concat_lr").clone();
    }
    let png = load_rgb(&shared(set).join(format!("case_{case_name}_lr.png")), 1 << 30).unwrap();
    let bp = config(set).dit.block_px;
    prepare_official(&png, PassScale::X4, bp, Bicubic::Antialias).unwrap().concat_lr.full().unwrap()
}

use candle_core::{DType, Device, Tensor};
use common::*;
use infdit::diffusion::{EdmScalings, HeunConfig, heun_sample, initial_state};
use infdit::imageio::resize::Bicubic;
use infdit::imageio::{load_rgb, tensor_to_rgb8};
use infdit::kernels;
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
    assert_close(&format!("{case_name} clip_vector"), &clip, &c["clip_vector"], TOL_VECTOR);
    let g = golden(case_name);
    let concat_lr = concat_lr_of(case_name, &c);
    let eps = &c["eps"];
    let sig = sigmas(&c);
    let mut den = WholeImageDenoiser::new(&m.dit, &clip, lr, &concat_lr).unwrap();
    for i in [0usize, 10, 19] {
        let cond = den.cond_vector(sig[i]).unwrap();
        assert_close(&format!("{case_name} cond_c_{i}"), &cond, &c[&format!("cond_c_{i}")], TOL_VECTOR);
        let x = x_in(&concat_lr, eps, sig[i]);
        let mut trace = Vec::new();
        let d = den.denoise_traced(&x, sig[i], Some(&mut trace)).unwrap();
        let expect = &c[&format!("denoised_{i}")];
        let tol = if i == 19 { TOL_DENOISED_LAST } else { TOL_DENOISED };
        assert_close(&format!("{case_name} denoised_{i}"), &d, expect, tol);
        let (f, f_ref) = (f_of(&d, &x, sig[i]), f_of(expect, &x, sig[i]));
        assert_close(&format!("{case_name} F_{i}"), &f, &f_ref, TOL_NETWORK_OUTPUT);
        if i == 10 && g.hidden_layers {
            assert_eq!(trace.len(), m.cfg.dit.depth);
            for (l, h) in trace.iter().enumerate() {
                let e = key(&c, case_name, &format!("hidden_10_layer{l}"));
                assert_close(&format!("{case_name} hidden_10_layer{l}"), h, e, TOL_HIDDEN);
            }
        }
        if i == 10 && g.block11 {
            // Interior block (1,1) of a 3x3 grid: the middle third of the token rows and columns.
            let e = key(&c, case_name, "hidden_10_layer0_block11");
            let bt = m.cfg.dit.block_tokens();
            let (_, _, h, w) = concat_lr.dims4().unwrap();
            let (rows, cols) = (h / m.cfg.dit.patch, w / m.cfg.dit.patch);
            let h0 = trace[0].reshape((rows, cols, trace[0].dim(2).unwrap())).unwrap();
            let blk = h0.narrow(0, bt, bt).unwrap().narrow(1, bt, bt).unwrap();
            let blk = blk.reshape((1, bt * bt, blk.dim(2).unwrap())).unwrap();
            assert_close(&format!("{case_name} hidden_10_layer0_block11"), &blk, e, TOL_HIDDEN);
        }
    }
}

/// The 20-step Heun run from the injected noise: trajectory, sample and the output PNG.
fn check_sampling(case_name: &str) {
    let c = case(case_name);
    let m = model(case_name);
    let (set, _) = set_of(case_name);
    let lr = &c["lr"];
    let g = golden(case_name);
    let concat_lr = concat_lr_of(case_name, &c);
    let clip = m.clip_vector(lr, Bicubic::Antialias).unwrap();
    let sig = sigmas(&c);
    let x0 = initial_state(&concat_lr, &c["eps"], sig[0]).unwrap();
    let mut den = WholeImageDenoiser::new(&m.dit, &clip, lr, &concat_lr).unwrap();
    let mut checked = 0;
    let sample = heun_sample(&mut den, x0, &sig, 0, &mut |k, x| {
        if g.steps.contains(&k) {
            let e = key(&c, case_name, &format!("x_step_{k}"));
            let tol = TOL_STEP_REL * max_of(e) + TOL_STEP_ABS;
            assert_close(&format!("{case_name} x_step_{k}"), x, e, tol);
            checked += 1;
        }
        Ok(())
    })
    .unwrap();
    if g.sample {
        assert_close(&format!("{case_name} sample"), &sample, key(&c, case_name, "sample"), TOL_SAMPLE);
    }
    assert_eq!(checked, g.steps.len(), "case {case_name}: trajectory steps checked");
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
    assert!(off as f64 <= MAX_OFF_BY_ONE * n as f64, "{case_name}: {off} of {n} values off by one (> 0.1%)");
}

/// Which kernel paths a check runs on (see the module note).
#[derive(Clone, Copy)]
enum Paths {
    /// Every path the CPU supports, unless `INFDIT_KERNELS` names one.
    Every,
    /// The one `INFDIT_KERNELS` names, else the fastest.
    Default,
}

/// Runs `check` on the kernel paths `which` selects, naming each path it runs.
fn on_paths(which: Paths, what: &str, check: impl Fn()) {
    let paths = match which {
        Paths::Every if std::env::var_os("INFDIT_KERNELS").is_none() => kernels::supported_paths(),
        _ => vec![kernels::default_path()],
    };
    for p in paths {
        println!("{what}: kernel path {p}");
        kernels::with_path(p, &check).unwrap();
    }
}

#[test]
fn case_a_network() {
    on_paths(Paths::Every, "a network", || check_network("a"));
}
#[test]
fn case_b_network() {
    on_paths(Paths::Every, "b network", || check_network("b"));
}
#[test]
fn case_c_network() {
    on_paths(Paths::Every, "c network", || check_network("c"));
}
#[test]
fn case_d_network() {
    on_paths(Paths::Every, "d network", || check_network("d"));
}
#[test]
fn case_e_network() {
    on_paths(Paths::Every, "e network", || check_network("e"));
}
#[test]
fn case_a_sampling() {
    on_paths(Paths::Every, "a sampling", || check_sampling("a"));
}
#[test]
fn case_b_sampling() {
    on_paths(Paths::Default, "b sampling", || check_sampling("b"));
}
#[test]
fn case_c_sampling() {
    on_paths(Paths::Default, "c sampling", || check_sampling("c"));
}
#[test]
fn case_d_sampling() {
    on_paths(Paths::Default, "d sampling", || check_sampling("d"));
}
#[test]
fn case_e_sampling() {
    on_paths(Paths::Every, "e sampling", || check_sampling("e"));
}

/// The network in bf16 and f16 (on this CPU the bf16 dot-product kernels where it has them): the
/// network output F at sigma index 10 within a few bf16 roundings of the reference, measured as
/// max |F - F_ref| / max |F_ref| (printed).
fn check_reduced_precision(case_name: &str) {
    let c = case(case_name);
    let lr = &c["lr"];
    let (set, _) = set_of(case_name);
    let png = load_rgb(&shared(set).join(format!("case_{case_name}_lr.png")), 1 << 30).unwrap();
    let bp = config(set).dit.block_px;
    let concat_lr = prepare_official(&png, PassScale::X4, bp, Bicubic::Antialias).unwrap().concat_lr.full().unwrap();
    let sig = sigmas(&c)[10];
    let x = x_in(&concat_lr, &c["eps"], sig);
    let expect = f_of(&c["denoised_10"], &x, sig);
    for (dt, tol) in [(DType::BF16, TOL_BF16_REL), (DType::F16, TOL_F16_REL)] {
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
    on_paths(Paths::Every, "a bf16/f16", || check_reduced_precision("a"));
}
#[test]
fn case_d_network_bf16_f16() {
    on_paths(Paths::Every, "d bf16/f16", || check_reduced_precision("d"));
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
        let bp = config(set).dit.block_px;
        let p = prepare_official(&png, PassScale::X4, bp, Bicubic::Antialias).unwrap();
        assert_close(&format!("{case_name} lr"), &p.lr, &c["lr"], 0.0);
        if golden(case_name).sample {
            let e = key(&c, case_name, "concat_lr");
            assert_close(&format!("{case_name} concat_lr"), &p.concat_lr.full().unwrap(), e, TOL_RESIZE);
        }
    }
    // The official 2x mode (case e): LR halved, concat_lr at 2x.
    let c = case("e");
    let png = load_rgb(&shared("parity2").join("case_e_lr.png"), 1 << 30).unwrap();
    assert_close("e lr_input", &png, &c["lr_input"], 0.0);
    let bp = config("parity2").dit.block_px;
    let p = prepare_official(&png, PassScale::X2, bp, Bicubic::Antialias).unwrap();
    assert_close("e concat_lr (2x)", &p.concat_lr.full().unwrap(), &c["concat_lr"], TOL_RESIZE);
    assert_close("e lr (2x, downsampled)", &p.lr, &c["lr"], TOL_RESIZE);
    assert_eq!((p.grid.rows, p.grid.cols), (2, 1));
    let _ = Device::Cpu;
}
