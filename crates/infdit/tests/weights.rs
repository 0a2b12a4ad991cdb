//! Checkpoint loading: .pt vs safetensors, strict key checking, CLIP from other layouts, parameter
//! counts of the released configuration, conversion.
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use infdit::imageio::resize::Bicubic;
use infdit::loaded::Model;
use infdit::weights::{Checkpoint, HF_CLIP_BLOCK_NAMES, WeightError, convert::convert, dead_key_shapes, is_dead_key};
use infdit::{InfditError, ModelConfig};

fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    a.dtype() == b.dtype() && a.dims() == b.dims() && bits(a) == bits(b)
}

#[test]
fn pt_and_safetensors_load_bit_identical() {
    for (set, stem, count) in [("parity", "tiny", 110), ("parity2", "tiny2", 112)] {
        let dir = shared(set);
        let pt = Checkpoint::open(&dir.join(format!("{stem}_mp_rank_00_model_states.pt"))).unwrap();
        let st = Checkpoint::open(&dir.join(format!("{stem}.safetensors"))).unwrap();
        assert_eq!(pt.len(), count);
        assert_eq!(pt.keys().collect::<Vec<_>>(), st.keys().collect::<Vec<_>>());
        for k in pt.keys() {
            let a = pt.load(k, &Device::Cpu).unwrap();
            let b = st.load(k, &Device::Cpu).unwrap();
            assert!(same_bits(&a, &b), "{set}: {k} differs between .pt and safetensors");
        }
        // And both build the model (strictly): only the documented dead keys are skipped.
        let m = Model::from_checkpoint(&config(set), pt, DType::F32, &Device::Cpu).unwrap();
        assert!(m.skipped_dead_keys.iter().all(|k| is_dead_key(k)));
        let depth = m.cfg.dit.depth;
        // k_layer_norm (2 per layer) + position_embeddings + 4 CLIP text remnants.
        assert_eq!(m.skipped_dead_keys.len(), 2 * depth + 1 + 4, "{:?}", m.skipped_dead_keys);
    }
}

#[test]
fn strict_loading_names_every_problem() {
    let dir = shared("parity");
    let full = candle_core::safetensors::load(dir.join("tiny.safetensors"), &Device::Cpu).unwrap();
    let mut tensors: Vec<(String, Tensor)> = full.into_iter().collect();
    tensors.retain(|(k, _)| k != "mixins.final_layer.linear.bias");
    tensors.push(("mixins.adaln_layer.surprise.weight".into(), Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()));
    for (k, t) in tensors.iter_mut() {
        if k == "time_embed.mlp.2.weight" {
            *t = Tensor::zeros((128, 127), DType::F32, &Device::Cpu).unwrap();
        }
    }
    let ck = Checkpoint::from_tensors("broken.safetensors", tensors);
    let err = Model::from_checkpoint(&config("parity"), ck, DType::F32, &Device::Cpu).unwrap_err();
    let InfditError::Weights(WeightError::Mismatch(r)) = &err else { panic!("unexpected error {err}") };
    assert_eq!(r.missing, vec![("mixins.final_layer.linear.bias".to_string(), vec![48])]);
    assert_eq!(r.unexpected, vec!["mixins.adaln_layer.surprise.weight".to_string()]);
    assert_eq!(r.shape, vec![("time_embed.mlp.2.weight".to_string(), vec![128, 128], vec![128, 127])]);
    let msg = err.to_string();
    println!("{msg}");
    assert!(msg.contains("broken.safetensors"));
    assert!(msg.contains("missing key: mixins.final_layer.linear.bias (expected shape [48])"));
    assert!(msg.contains("unexpected key: mixins.adaln_layer.surprise.weight"));
    assert!(
        msg.contains("shape mismatch: time_embed.mlp.2.weight: model expects [128, 128], checkpoint has [128, 127]")
    );
}

#[test]
fn missing_dead_keys_and_rope_tables_are_fine() {
    let dir = shared("parity");
    let full = candle_core::safetensors::load(dir.join("tiny.safetensors"), &Device::Cpu).unwrap();
    let ck = Checkpoint::from_tensors("lean", full.into_iter().filter(|(k, _)| !is_dead_key(k)));
    let m = Model::from_checkpoint(&config("parity"), ck, DType::F32, &Device::Cpu).unwrap();
    assert!(m.skipped_dead_keys.is_empty());
}

/// [`ModelConfig::parameter_count`] equals the number of values of a really built random model.
#[test]
fn f08_parameter_count_equals_a_built_model() {
    for (depth, hidden, heads) in [(1, 32, 2), (2, 64, 4), (3, 48, 3)] {
        let m = common::tiny_random(depth, hidden, heads, 1);
        let ck = infdit::loaded::random::random_checkpoint(&m.cfg, 1).unwrap();
        let built: usize =
            ck.keys().filter(|k| !is_dead_key(k)).map(|k| ck.shape(k).unwrap().iter().product::<usize>()).sum();
        assert_eq!(m.cfg.parameter_count() as usize, built, "depth {depth} hidden {hidden}");
        assert_eq!(Model::parameter_count(&m.cfg).unwrap(), built);
    }
}

#[test]
fn released_config_parameter_counts() {
    let cfg = ModelConfig::released();
    let keys = Model::expected_keys(&cfg).unwrap();
    let count = |pred: &dyn Fn(&str) -> bool| -> usize {
        keys.iter().filter(|(k, _)| pred(k)).map(|(_, s)| s.iter().product::<usize>()).sum()
    };
    let dead: usize = dead_key_shapes(&cfg.dit, 256).iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    let dit = count(&|k| !k.starts_with("image_encoder.")) + dead;
    let clip = count(&|k| k.starts_with("image_encoder.model.visual."));
    assert_eq!(dit, 753_762_928);
    assert_eq!(clip, 303_966_208);
    assert_eq!(dead, 327_680 + 4_480);
    // The arithmetic counts agree with the walk (F08: `--dry-run` counts without building).
    assert_eq!(cfg.parameter_count() as usize, dit - dead);
    assert_eq!(cfg.clip_parameter_count() as usize, clip);
    // The same walk on the parity configs agrees with their checkpoints, key for key.
    for (set, stem) in [("parity", "tiny"), ("parity2", "tiny2")] {
        let cfg = config(set);
        let ck = Checkpoint::open(&shared(set).join(format!("{stem}.safetensors"))).unwrap();
        let mut want: Vec<(String, Vec<usize>)> = Model::expected_keys(&cfg).unwrap();
        want.sort();
        let have: Vec<(String, Vec<usize>)> =
            ck.keys().filter(|k| !is_dead_key(k)).map(|k| (k.to_string(), ck.shape(k).unwrap().to_vec())).collect();
        assert_eq!(want, have, "{set}");
        let dit: usize = want
            .iter()
            .filter(|(k, _)| !k.starts_with("image_encoder."))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let clip: usize = want.iter().map(|(_, s)| s.iter().product::<usize>()).sum::<usize>() - dit;
        assert_eq!((cfg.parameter_count() as usize, cfg.clip_parameter_count() as usize), (dit, clip), "{set}");
    }
}

#[test]
fn clip_from_open_clip_and_hugging_face_layouts() {
    let dir = shared("parity");
    let full = candle_core::safetensors::load(dir.join("tiny.safetensors"), &Device::Cpu).unwrap();
    let cfg = config("parity");
    let layers = cfg.clip.as_ref().unwrap().layers;
    let width = cfg.clip.as_ref().unwrap().width;
    let dit: Vec<(String, Tensor)> =
        full.iter().filter(|(k, _)| !k.starts_with("image_encoder.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let c = case("a");
    let expect = &c["clip_vector"];

    // Without a tower: a clear refusal.
    let err = Model::from_checkpoint(&cfg, Checkpoint::from_tensors("dit-only", dit.clone()), DType::F32, &Device::Cpu)
        .unwrap_err();
    assert!(err.to_string().contains("no CLIP tower"), "{err}");

    // open_clip's own layout: `visual.*` (plus text-tower keys, ignored).
    let oc: Vec<(String, Tensor)> = full
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("image_encoder.model.").map(|r| (r.to_string(), v.clone())))
        .collect();
    let mut ck = Checkpoint::from_tensors("dit-only", dit.clone());
    ck.add_clip_from(&Checkpoint::from_tensors("open_clip_model.safetensors", oc), layers).unwrap();
    let m = Model::from_checkpoint(&cfg, ck, DType::F32, &Device::Cpu).unwrap();
    assert_close("open_clip layout clip_vector", &m.clip_vector(&c["lr"], Bicubic::Antialias).unwrap(), expect, 2e-6);

    // Hugging Face transformers layout: q/k/v split, fc1/fc2, pre_layrnorm, visual_projection = proj^T.
    let g = |k: &str| full[&format!("image_encoder.model.visual.{k}")].clone();
    let mut hf: Vec<(String, Tensor)> = vec![
        ("vision_model.embeddings.patch_embedding.weight".into(), g("conv1.weight")),
        ("vision_model.embeddings.class_embedding".into(), g("class_embedding")),
        ("vision_model.embeddings.position_embedding.weight".into(), g("positional_embedding")),
        ("vision_model.pre_layrnorm.weight".into(), g("ln_pre.weight")),
        ("vision_model.pre_layrnorm.bias".into(), g("ln_pre.bias")),
        ("vision_model.post_layernorm.weight".into(), g("ln_post.weight")),
        ("vision_model.post_layernorm.bias".into(), g("ln_post.bias")),
        ("visual_projection.weight".into(), g("proj").t().unwrap().contiguous().unwrap()),
    ];
    for l in 0..layers {
        let src = format!("transformer.resblocks.{l}.");
        let dst = format!("vision_model.encoder.layers.{l}.");
        let w = g(&format!("{src}attn.in_proj_weight"));
        let b = g(&format!("{src}attn.in_proj_bias"));
        for (i, n) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            hf.push((format!("{dst}self_attn.{n}.weight"), w.narrow(0, i * width, width).unwrap()));
            hf.push((format!("{dst}self_attn.{n}.bias"), b.narrow(0, i * width, width).unwrap()));
        }
        for (ours, theirs) in HF_CLIP_BLOCK_NAMES {
            hf.push((format!("{dst}{theirs}.weight"), g(&format!("{src}{ours}.weight"))));
            hf.push((format!("{dst}{theirs}.bias"), g(&format!("{src}{ours}.bias"))));
        }
    }
    let mut ck = Checkpoint::from_tensors("dit-only", dit);
    ck.add_clip_from(&Checkpoint::from_tensors("model.safetensors", hf), layers).unwrap();
    let m = Model::from_checkpoint(&cfg, ck, DType::F32, &Device::Cpu).unwrap();
    assert_close("HF layout clip_vector", &m.clip_vector(&c["lr"], Bicubic::Antialias).unwrap(), expect, 2e-6);
}

#[test]
fn convert_pt_to_safetensors_in_three_dtypes() {
    let tmp = std::env::temp_dir().join(format!("infdit-convert-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let src = shared("parity2").join("tiny2_mp_rank_00_model_states.pt");
    let reference = Checkpoint::open(&shared("parity2").join("tiny2.safetensors")).unwrap();
    for (dt, name) in
        [(None, "keep"), (Some(DType::F32), "f32"), (Some(DType::BF16), "bf16"), (Some(DType::F16), "f16")]
    {
        let out = tmp.join(format!("tiny2-{name}.safetensors"));
        let s = convert(&src, &out, dt).unwrap();
        assert_eq!(s.tensors, 112);
        assert_eq!(s.elements, 1_126_393);
        let ck = Checkpoint::open(&out).unwrap();
        for k in reference.keys() {
            let a = ck.load(k, &Device::Cpu).unwrap();
            let b = reference.load(k, &Device::Cpu).unwrap();
            assert_eq!(a.dtype(), dt.unwrap_or(DType::F32), "{k}");
            let want = b.to_dtype(a.dtype()).unwrap();
            assert!(same_bits(&a, &want), "{name}: {k}");
        }
        assert!(!tmp.join(format!(".tiny2-{name}.safetensors.partial")).exists());
    }
    // Refuses to overwrite its input.
    let same = tmp.join("tiny2-keep.safetensors");
    assert!(convert(&same, &same, None).is_err());
    std::fs::remove_dir_all(&tmp).unwrap();
}
