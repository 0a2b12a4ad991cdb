//! Training: the autograd path equals inference, every parameter gets the right gradient, the loss
//! goes down, and a resumed run continues bit for bit.
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use infdit::config::{DitConfig, ModelConfig, Precond};
use infdit::loaded::Model;
use infdit::loaded::random::{random_checkpoint, training_init};
use infdit::model::grad::MatmulPrecision;
use infdit::schedule::WholeImageDenoiser;
use infdit::train::bench::synthetic_picture;
use infdit::train::{
    Dataset, SampleConfig, Sampler, SplitMix64, TrainConfig, TrainSample, Trainer, edm_loss, edm_weight,
};
use infdit::weights::Checkpoint;

fn tiny() -> ModelConfig {
    ModelConfig {
        dit: DitConfig {
            hidden: 32,
            depth: 2,
            heads: 2,
            mlp_hidden: 64,
            patch: 8,
            in_channels: 6,
            out_channels: 3,
            block_px: 64,
            vector_dim: 8,
            time_channels: 16,
            image_size: 128,
            sr_scale: 4,
            lr_patch: 2,
            ln_eps: 1e-6,
            precond: Precond::default(),
        },
        clip: None,
    }
}

fn dataset() -> Dataset {
    Dataset::from_images((0..3).map(|i| (PathBuf::from(format!("pic{i}")), synthetic_picture(i, 160, 200))).collect())
}

fn sample_cfg() -> SampleConfig {
    SampleConfig { crop: 128, degrade_prob: 0.5, ..Default::default() }
}

fn fixed_sample(seed: u64) -> TrainSample {
    dataset().sample(&SampleConfig { lr_dropout: 0.0, ..sample_cfg() }, &mut SplitMix64::new(seed)).unwrap()
}

fn unit_noise(seed: u64, like: &Tensor) -> Tensor {
    let mut r = SplitMix64::new(seed);
    let v: Vec<f32> = (0..like.elem_count()).map(|_| r.normal() as f32).collect();
    Tensor::from_vec(v, like.shape(), &Device::Cpu).unwrap()
}

fn clip0() -> Tensor {
    Tensor::zeros((1, 8), DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn autograd_forward_equals_the_inference_forward() {
    let cfg = tiny();
    let ck = random_checkpoint(&cfg, 3).unwrap();
    let plain = Model::from_checkpoint(&cfg, ck.clone(), DType::F32, &Device::Cpu).unwrap();
    let trainer = Trainer::new(&cfg, &ck, TrainConfig::default()).unwrap();
    let tracked = trainer.model(false).unwrap();
    let s = fixed_sample(1);
    let x = (&s.hr + (unit_noise(2, &s.hr) * 0.7).unwrap()).unwrap();
    let run = |m: &Model| {
        let mut den = WholeImageDenoiser::new(&m.dit, &clip0(), &s.lr, &s.concat_lr).unwrap();
        den.set_rope_offset((5, 9));
        den.denoise_traced(&x, 0.7, None).unwrap()
    };
    let (a, b) = (run(&plain), run(&tracked));
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 2e-5, "autograd path differs from the fused inference path by {diff}");
}

/// Loss of the tiny model with `ck`, on a fixed example.
fn loss_of(cfg: &ModelConfig, ck: Checkpoint, s: &TrainSample, eps: &Tensor) -> f64 {
    let m = Model::from_checkpoint(cfg, ck, DType::F32, &Device::Cpu).unwrap();
    edm_loss(&m, s, &clip0(), 0.8, eps, (3, 7)).unwrap().to_scalar::<f32>().unwrap() as f64
}

/// The tiny model (seed 5) with every weight a `Var`: its config and checkpoint, the parameter
/// names, the vars and the model.
fn tracked_tiny_model() -> (ModelConfig, Checkpoint, Vec<String>, Vec<Var>, Model) {
    let cfg = tiny();
    let ck = random_checkpoint(&cfg, 5).unwrap();
    let keys: Vec<String> = ck.keys().map(String::from).collect();
    let vars: Vec<Var> = keys.iter().map(|k| Var::from_tensor(&ck.load(k, &Device::Cpu).unwrap()).unwrap()).collect();
    let var_ck = Checkpoint::from_tensors("vars", keys.iter().cloned().zip(vars.iter().map(|v| v.as_tensor().clone())));
    let m = Model::from_checkpoint(&cfg, var_ck, DType::F32, &Device::Cpu).unwrap();
    (cfg, ck, keys, vars, m)
}

#[test]
fn every_parameter_gets_its_gradient() {
    let (cfg, ck, keys, vars, m) = tracked_tiny_model();
    let s = fixed_sample(4);
    let eps = unit_noise(9, &s.hr);
    let loss = edm_loss(&m, &s, &clip0(), 0.8, &eps, (3, 7)).unwrap();
    let grads = loss.backward().unwrap();
    let mut zero = Vec::new();
    for (k, v) in keys.iter().zip(&vars) {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{k} gets no gradient"));
        let a = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(a.is_finite(), "{k}: gradient {a}");
        if a == 0.0 {
            zero.push(k.clone());
        }
    }
    // With no CLIP the conditioning vector is zero, so only the first vector-MLP weight has no
    // gradient; everything else must.
    assert!(zero.iter().all(|k| k.contains("vector") || k.contains("vec")), "zero gradients: {zero:?}");
    assert!(zero.len() <= 1, "zero gradients: {zero:?}");

    // Central finite differences on a few single values across the network.
    let picks = ["query_key_value.weight", "re_pos_embed", "lr_key_position_embedding", "final_layer.linear.weight"];
    for pick in picks {
        let (i, k) = keys.iter().enumerate().find(|(_, k)| k.contains(pick)).unwrap_or_else(|| panic!("no key {pick}"));
        let t = ck.load(k, &Device::Cpu).unwrap();
        let flat = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let g = grads.get(vars[i].as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The entry with the largest gradient, for a well-conditioned difference.
        let j = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
        let h = 1e-2f32;
        let with = |d: f32| {
            let mut v = flat.clone();
            v[j] += d;
            let mut c = ck.clone();
            c.insert(k.clone(), Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap());
            loss_of(&cfg, c, &s, &eps)
        };
        let fd = (with(h) - with(-h)) / (2.0 * h as f64);
        let rel = (fd - g[j] as f64).abs() / fd.abs().max(1e-3);
        assert!(rel < 0.05, "{k}[{j}]: autograd {} vs finite difference {fd}", g[j]);
    }
}

/// The fast backward (fused ops, the default) with f32 products and the plain candle-autograd
/// path give the same loss and the same gradient for every parameter of a tiny network (f32;
/// tolerance relative to each parameter's largest gradient).
#[test]
fn fast_backward_equals_the_autograd_path() {
    fast_against_autograd(MatmulPrecision::F32, 1e-5, 1e-3);
}

/// With bf16 products (AMX tiles where the CPU has them; f32 elsewhere) the loss and every
/// gradient stay within bf16 rounding of the f32 autograd path.
#[test]
fn bf16_products_stay_within_rounding_of_the_autograd_path() {
    fast_against_autograd(MatmulPrecision::Bf16, 2e-3, 3e-2);
}

fn fast_against_autograd(matmul: MatmulPrecision, loss_tol: f32, grad_tol: f32) {
    use infdit::model::grad::{GradPath, with_matmul, with_path};
    let (_, _, keys, vars, m) = tracked_tiny_model();
    let s = fixed_sample(4);
    let eps = unit_noise(9, &s.hr);
    let run = |path: GradPath| {
        with_path(path, || {
            with_matmul(matmul, || {
                let loss = edm_loss(&m, &s, &clip0(), 0.8, &eps, (3, 7)).unwrap();
                (loss.to_scalar::<f32>().unwrap(), loss.backward().unwrap())
            })
        })
    };
    let (lf, gf) = run(GradPath::Fast);
    let (la, ga) = run(GradPath::Autograd);
    eprintln!("{} products ({} here): loss {lf} vs {la}", matmul, with_matmul(matmul, infdit::model::grad::products));
    assert!((lf - la).abs() <= loss_tol * la.abs().max(1.0), "loss {lf} vs {la}");
    let largest = vars
        .iter()
        .filter_map(|v| ga.get(v.as_tensor()))
        .map(|a| a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap())
        .fold(0f32, f32::max);
    let mut worst = (0f32, String::new());
    for (k, v) in keys.iter().zip(&vars) {
        let (Some(f), Some(a)) = (gf.get(v.as_tensor()), ga.get(v.as_tensor())) else {
            assert!(
                gf.get(v.as_tensor()).is_none() && ga.get(v.as_tensor()).is_none(),
                "{k}: gradient on one path only"
            );
            continue;
        };
        let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = (f - a).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let rel = diff / scale.max(1e-6);
        if rel > worst.0 {
            worst = (rel, k.clone());
        }
        // A gradient that is zero in exact arithmetic (the cross-attention key norm's bias: the
        // softmax ignores a shift shared by all keys) is rounding noise on either path: compared
        // with a floor of 1e-3 of the largest gradient of the network.
        assert!(
            diff <= grad_tol * scale.max(1e-3 * largest) + 1e-7,
            "{k}: gradients differ by {diff} (largest {scale})"
        );
    }
    eprintln!("largest relative gradient difference: {:e} ({})", worst.0, worst.1);
}

fn eval_loss(t: &Trainer) -> f64 {
    let m = t.model(true).unwrap();
    let mut sum = 0.0;
    for (i, sigma) in [0.05f32, 0.3, 1.0, 3.0].into_iter().enumerate() {
        let s = fixed_sample(100 + i as u64);
        sum += edm_loss(&m, &s, &clip0(), sigma, &unit_noise(200 + i as u64, &s.hr), (0, 0))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
    }
    sum / 4.0
}

#[test]
fn training_lowers_the_loss() {
    let cfg = tiny();
    let tc = TrainConfig { batch: 2, lr: 3e-3, warmup: 5, grad_clip: 1.0, ema_decay: 0.9, ..Default::default() };
    let mut t = Trainer::new(&cfg, &random_checkpoint(&cfg, 11).unwrap(), tc).unwrap();
    let data = dataset();
    let before = eval_loss(&t);
    for _ in 0..30 {
        let st = t.train_step(&data, &sample_cfg()).unwrap();
        assert!(st.loss.is_finite() && st.grad_norm.is_finite());
        // The optimiser state holds values, not the step's autograd graph (which made a 1.3M
        // parameter run grow to 24 GB in 700 steps before it was detached).
        assert!(!t.state_records_ops(), "step {}", t.step());
    }
    let after = eval_loss(&t);
    eprintln!("eval loss {before:.4} -> {after:.4}");
    assert!(after < 0.7 * before, "eval loss {before} -> {after}");
    assert_eq!(t.step(), 30);
}

fn params(t: &Trainer, dir: &std::path::Path, name: &str) -> Vec<(String, Vec<f32>)> {
    let p = dir.join(name);
    t.save_weights(&p, false).unwrap();
    let mut m: Vec<_> = candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    m.sort_by(|a, b| a.0.cmp(&b.0));
    m
}

#[test]
fn resumed_training_is_bit_identical() {
    let cfg = tiny();
    let tc = TrainConfig { batch: 1, lr: 1e-3, seed: 42, ..Default::default() };
    let init = random_checkpoint(&cfg, 12).unwrap();
    let data = dataset();
    let dir = std::env::temp_dir().join(format!("infdit-train-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    let mut straight = Trainer::new(&cfg, &init, tc.clone()).unwrap();
    for _ in 0..3 {
        straight.train_step(&data, &sample_cfg()).unwrap();
    }
    let mut first = Trainer::new(&cfg, &init, tc.clone()).unwrap();
    for _ in 0..2 {
        first.train_step(&data, &sample_cfg()).unwrap();
    }
    first.save_state(&dir, &sample_cfg()).unwrap();
    let mut resumed = Trainer::new(&cfg, &init, TrainConfig { steps: 7, ..tc.clone() }).unwrap();
    assert!(resumed.load_state(&dir, &sample_cfg()).unwrap());
    assert_eq!(resumed.step(), 2);
    resumed.train_step(&data, &sample_cfg()).unwrap();
    assert_eq!(params(&straight, &dir, "a.safetensors"), params(&resumed, &dir, "b.safetensors"));

    // Other settings are refused.
    let mut other = Trainer::new(&cfg, &init, TrainConfig { lr: 2e-3, ..tc.clone() }).unwrap();
    let err = other.load_state(&dir, &sample_cfg()).unwrap_err().to_string();
    assert!(err.contains("other settings (train.lr: saved 0.001, now 0.002)"), "{err}");

    // A state saved before the products' precision was a setting trained in f32: it resumes as f32
    // and is refused, with the reason, by a run that asks for bf16.
    let meta_path = dir.join("train-state.json");
    let mut meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    meta["train"].as_object_mut().unwrap().remove("matmul").unwrap();
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    let mut as_f32 = Trainer::new(&cfg, &init, TrainConfig { matmul: MatmulPrecision::F32, ..tc.clone() }).unwrap();
    assert!(as_f32.load_state(&dir, &sample_cfg()).unwrap());
    let mut as_bf16 = Trainer::new(&cfg, &init, TrainConfig { matmul: MatmulPrecision::Bf16, ..tc }).unwrap();
    let err = as_bf16.load_state(&dir, &sample_cfg()).unwrap_err().to_string();
    assert!(err.contains(r#"train.matmul: saved "f32", now "bf16""#), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The batch's examples are drawn in parallel (each from its own random stream): a step's result
/// does not depend on how many threads drew them.
#[test]
fn training_steps_do_not_depend_on_the_thread_count() {
    let cfg = tiny();
    let tc = TrainConfig { batch: 3, lr: 1e-3, seed: 5, ..Default::default() };
    let init = random_checkpoint(&cfg, 13).unwrap();
    let data = dataset();
    let dir = std::env::temp_dir().join(format!("infdit-train-threads-{}", std::process::id()));
    let run = |threads: usize, name: &str| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut t = Trainer::new_on(&cfg, &init, tc.clone(), &Device::Cpu).unwrap();
            for _ in 0..2 {
                t.train_step(&data, &sample_cfg()).unwrap();
            }
            assert_eq!(t.device().location(), Device::Cpu.location());
            params(&t, &dir, name)
        })
    };
    std::fs::create_dir_all(&dir).unwrap();
    let (one, three) = (run(1, "one.safetensors"), run(3, "three.safetensors"));
    assert_eq!(one, three);
    // Training moved the weights: the comparison is not between two copies of the start.
    let moved = one
        .iter()
        .any(|(k, v)| init.load(k, &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap() != *v);
    assert!(moved);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn edm_weight_is_the_reference_formula() {
    assert!((edm_weight(0.5) - (0.25 + 0.25) / 0.0625).abs() < 1e-12);
    assert!((edm_weight(2.0) - 4.25).abs() < 1e-12);
}

/// In residual mode the loss goes through the residual denoiser with the config's sigma_data: with
/// the zero-initialised final layer, `D = u + c_skip (x - u)` and the loss is
/// `lambda(sigma) mean((D - hr)^2)`, `lambda = (sigma^2 + sd^2) / (sigma sd)^2`.
#[test]
fn residual_loss_uses_the_config_preconditioning() {
    let mut cfg = tiny();
    cfg.dit.precond = Precond { sigma_data: 0.05, residual: true, ..Precond::default() };
    let model = Model::from_checkpoint(&cfg, training_init(&cfg, 4).unwrap(), DType::F32, &Device::Cpu).unwrap();
    let mut rng = SplitMix64::new(9);
    let s = dataset().sample(&SampleConfig { lr_dropout: 0.0, ..sample_cfg() }, &mut rng).unwrap();
    let clip = clip0();
    let eps = Tensor::randn(0f32, 1.0, s.hr.dims(), &Device::Cpu).unwrap();
    let sigma = 0.7f32;
    let loss = edm_loss(&model, &s, &clip, sigma, &eps, (0, 0)).unwrap().to_scalar::<f32>().unwrap() as f64;
    let sc = cfg.dit.precond.scalings(sigma);
    let x = (&s.hr + (&eps * sigma as f64).unwrap()).unwrap();
    let d = (&s.concat_lr + ((&x - &s.concat_lr).unwrap() * sc.c_skip as f64).unwrap()).unwrap();
    let mse = (d - &s.hr).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let weight = cfg.dit.precond.loss_weight(sigma as f64);
    let formula = (0.49 + 0.0025) / (0.7f64 * 0.05).powi(2);
    assert!((weight - formula).abs() < 1e-6 * formula, "{weight} vs {formula}");
    assert!((loss - weight * mse).abs() <= 1e-4 * loss, "{loss} vs {}", weight * mse);
}

/// Coring and the flat-area gate are inference settings: a model whose config asks for them trains
/// exactly as one whose config does not (the residuals they drop or fade would otherwise get no or
/// less gradient), and keeps them in the config it saves.
#[test]
fn training_leaves_coring_and_the_flat_gate_out() {
    let mut plain = tiny();
    plain.dit.precond = Precond { sigma_data: 0.05, residual: true, ..Precond::default() };
    let mut cored = plain.clone();
    cored.dit.precond.coring = Some([0.05, 0.1]);
    cored.dit.precond.flat_gate = Some(0.2);
    let init = training_init(&plain, 3).unwrap();
    let tc = TrainConfig { batch: 2, lr: 1e-3, seed: 8, ..Default::default() };
    let dir = std::env::temp_dir().join(format!("infdit-train-coring-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |cfg: &ModelConfig, name: &str| {
        let mut t = Trainer::new(cfg, &init, tc.clone()).unwrap();
        let stats = t.train_step(&dataset(), &sample_cfg()).unwrap();
        assert_eq!(t.model_cfg.dit.precond, cfg.dit.precond);
        (stats.loss, params(&t, &dir, name))
    };
    let (a, b) = (run(&plain, "plain.safetensors"), run(&cored, "cored.safetensors"));
    assert_eq!(a.0, b.0);
    assert!(a.1 == b.1, "a cored config trained differently");
    std::fs::remove_dir_all(&dir).unwrap();
}
