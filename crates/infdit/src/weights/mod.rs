//! Checkpoint loading: official `.pt` (torch zip pickle, state dict under `'module'`), safetensors,
//! open_clip and Hugging Face CLIP files; strict, name-by-name checking against the model.
//!
//! The model constructors ask a [`WeightLoader`] for each tensor by name and shape. The loader never
//! stops at the first problem: it records every missing key and shape mismatch, hands out a zero
//! placeholder so construction can go on, and [`WeightLoader::finish`] then reports all problems at
//! once, plus every key of the checkpoint that nothing asked for (unexpected keys). Only the dead keys
//! listed in [`is_dead_key`] may be left unused.

pub mod convert;

pub use crate::error::{MismatchReport, WeightError};

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};

/// Where the CLIP tower lives in the official state dict.
pub const CLIP_PREFIX: &str = "image_encoder.model.";

/// open_clip residual-block tensor prefixes and their Hugging Face `CLIPEncoderLayer` names (each
/// with `.weight` and `.bias`); the packed `attn.in_proj_*` maps to `self_attn.{q,k,v}_proj`.
pub const HF_CLIP_BLOCK_NAMES: [(&str, &str); 5] = [
    ("attn.out_proj", "self_attn.out_proj"),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
];

/// Keys present in official checkpoints that have no effect on any output (spec §9.2, parity README).
/// They may be absent, and are ignored when present.
pub fn is_dead_key(key: &str) -> bool {
    if let Some(rest) = key.strip_prefix("mixins.adaln_layer.k_layer_norm.") {
        // Official bug: q_layer_norm is applied to K, k_layer_norm is never read.
        return rest.ends_with(".weight") || rest.ends_with(".bias");
    }
    matches!(
        key,
        "transformer.position_embeddings.weight"
            | "image_encoder.model.token_embedding.weight"
            | "image_encoder.model.positional_embedding"
            | "image_encoder.model.text_projection"
            | "image_encoder.model.logit_scale"
    )
}

/// The dead keys an official checkpoint of this DiT config carries, with their shapes
/// (`max_sequence_length` is the official `--max-sequence-length`, 256 in the released script).
pub fn dead_key_shapes(cfg: &crate::config::DitConfig, max_sequence_length: usize) -> Vec<(String, Vec<usize>)> {
    let mut v = Vec::new();
    for l in 0..cfg.depth {
        for p in ["weight", "bias"] {
            v.push((format!("mixins.adaln_layer.k_layer_norm.{l}.{p}"), vec![cfg.head_dim()]));
        }
    }
    v.push(("transformer.position_embeddings.weight".into(), vec![max_sequence_length, cfg.hidden]));
    v
}

/// One tensor of a checkpoint, read lazily.
#[derive(Clone)]
enum TensorRef {
    Pt(pytorch_reader::Tensor),
    St(Arc<MmapedSafetensors>, String),
    Owned(Tensor),
}

/// A set of named tensors read from one or more files; tensor data is read on demand.
#[derive(Clone, Default)]
pub struct Checkpoint {
    tensors: BTreeMap<String, (TensorRef, Vec<usize>)>,
    origin: Vec<PathBuf>,
}

fn parse_err(path: &Path, msg: impl fmt::Display) -> WeightError {
    WeightError::Parse { path: path.to_path_buf(), msg: msg.to_string() }
}

fn dtype_from_pt(d: pytorch_reader::DType) -> Option<DType> {
    use pytorch_reader::DType as P;
    Some(match d {
        P::F64 => DType::F64,
        P::F32 => DType::F32,
        P::F16 => DType::F16,
        P::BF16 => DType::BF16,
        P::I64 => DType::I64,
        P::I32 => DType::I32,
        P::I16 => DType::I16,
        P::U32 => DType::U32,
        P::U8 | P::Bool => DType::U8,
        P::I8 | P::U64 | P::U16 => return None,
    })
}

impl Checkpoint {
    /// Opens a checkpoint by its extension: `.safetensors`, or a torch pickle (`.pt`, `.pth`, `.bin`,
    /// `.ckpt`). For torch files, the tensors under the top-level key `'module'` are taken when it
    /// exists (the official DeepSpeed/SAT layout), else the top-level state dict.
    pub fn open(path: &Path) -> Result<Self, WeightError> {
        if !path.exists() {
            return Err(parse_err(path, "no such file"));
        }
        // A FIFO would block the reader forever, a device never end.
        crate::files::check_regular(path).map_err(|e| parse_err(path, e))?;
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        let mut ck = Checkpoint { origin: vec![path.to_path_buf()], ..Default::default() };
        if ext == "safetensors" {
            // SAFETY: the file is mapped read-only; infdit never writes to a checkpoint it reads, and
            // the documented contract of the CLI is that inputs are not modified while it runs.
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| parse_err(path, e))?;
            let st = Arc::new(st);
            for (name, view) in st.tensors() {
                ck.tensors.insert(name.clone(), (TensorRef::St(st.clone(), name), view.shape().to_vec()));
            }
        } else {
            let reader = match pytorch_reader::PytorchReader::with_top_level_key(path, "module") {
                Ok(r) => r,
                Err(_) => pytorch_reader::PytorchReader::new(path).map_err(|e| parse_err(path, e))?,
            };
            for (name, t) in reader.into_tensors() {
                let shape = t.shape().to_vec();
                ck.tensors.insert(name, (TensorRef::Pt(t), shape));
            }
        }
        if ck.tensors.is_empty() {
            return Err(parse_err(path, "the file holds no tensors"));
        }
        Ok(ck)
    }

    /// Builds a checkpoint from tensors in memory (tests, conversions).
    pub fn from_tensors(origin: &str, tensors: impl IntoIterator<Item = (String, Tensor)>) -> Self {
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| {
                let s = t.dims().to_vec();
                (k, (TensorRef::Owned(t), s))
            })
            .collect();
        Checkpoint { tensors, origin: vec![PathBuf::from(origin)] }
    }

    /// Names of all tensors, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there is no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Shape of a tensor.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|(_, s)| s.as_slice())
    }

    /// The file(s) the tensors came from, for messages.
    pub fn origin(&self) -> String {
        self.origin.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" + ")
    }

    /// Reads one tensor in its stored dtype onto `device`.
    pub fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        let Some((r, shape)) = self.tensors.get(name) else { candle_core::bail!("no tensor named {name}") };
        match r {
            TensorRef::Owned(t) => t.to_device(device),
            TensorRef::St(st, n) => st.load(n, device),
            TensorRef::Pt(t) => {
                let dtype = dtype_from_pt(t.dtype())
                    .ok_or_else(|| candle_core::Error::Msg(format!("unsupported dtype {:?}", t.dtype())))?;
                let bytes = t.read().map_err(candle_core::Error::wrap)?;
                if shape.is_empty() {
                    // candle represents scalars as shape ().
                    Tensor::from_raw_buffer(&bytes, dtype, &[], device)
                } else {
                    Tensor::from_raw_buffer(&bytes, dtype, shape, device)
                }
            }
        }
    }

    /// [`load`](Self::load), also returning the CRC-32 of the tensor's stored bytes (its data as
    /// in the file; for a tensor held in memory, of its values as f32).
    pub fn load_with_crc(&self, name: &str, device: &Device) -> candle_core::Result<(Tensor, u32)> {
        let Some((r, shape)) = self.tensors.get(name) else { candle_core::bail!("no tensor named {name}") };
        match r {
            TensorRef::Owned(t) => {
                let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                Ok((t.to_device(device)?, crate::hash::crc_f32(&v)))
            }
            TensorRef::St(st, n) => {
                let crc = crc32fast::hash(st.get(n)?.data());
                Ok((st.load(n, device)?, crc))
            }
            TensorRef::Pt(t) => {
                let dtype = dtype_from_pt(t.dtype())
                    .ok_or_else(|| candle_core::Error::Msg(format!("unsupported dtype {:?}", t.dtype())))?;
                let bytes = t.read().map_err(candle_core::Error::wrap)?;
                let crc = crc32fast::hash(&bytes);
                let dims: &[usize] = if shape.is_empty() { &[] } else { shape };
                Ok((Tensor::from_raw_buffer(&bytes, dtype, dims, device)?, crc))
            }
        }
    }

    /// Adds the tensors of `other` whose names start with `from`, renamed to start with `to`
    /// instead. Existing names are not replaced. Returns how many were added.
    pub fn merge_renamed(&mut self, other: &Checkpoint, from: &str, to: &str) -> usize {
        let mut n = 0;
        for (k, v) in &other.tensors {
            if let Some(rest) = k.strip_prefix(from) {
                let nk = format!("{to}{rest}");
                if let std::collections::btree_map::Entry::Vacant(e) = self.tensors.entry(nk) {
                    e.insert(v.clone());
                    n += 1;
                }
            }
        }
        if n > 0 {
            self.origin.extend(other.origin.iter().cloned());
        }
        n
    }

    /// Inserts a tensor held in memory.
    pub fn insert(&mut self, name: String, t: Tensor) {
        let s = t.dims().to_vec();
        self.tensors.insert(name, (TensorRef::Owned(t), s));
    }

    /// Whether the checkpoint carries a CLIP vision tower in the official layout.
    pub fn has_clip(&self) -> bool {
        self.keys().any(|k| k.starts_with("image_encoder.model.visual."))
    }

    /// Adds a CLIP vision tower from a separate file: open_clip's own weights
    /// (`open_clip_pytorch_model.bin` / `open_clip_model.safetensors`, keys `visual.*`) or the Hugging
    /// Face transformers layout (`vision_model.*` and `visual_projection.weight`, as in
    /// `CLIPVisionModelWithProjection` or `CLIPModel`). The tower is renamed into the official
    /// layout (`image_encoder.model.visual.*`); HF tensors are converted (q/k/v packed into `in_proj`,
    /// projection transposed).
    pub fn add_clip_from(&mut self, clip: &Checkpoint, layers: usize) -> Result<(), WeightError> {
        let path = PathBuf::from(clip.origin());
        let target = format!("{CLIP_PREFIX}visual.");
        if clip.keys().any(|k| k.starts_with("visual.")) {
            self.merge_renamed(clip, "visual.", &target);
            return Ok(());
        }
        if clip.keys().any(|k| k.starts_with(&target)) {
            self.merge_renamed(clip, &target, &target);
            return Ok(());
        }
        if !clip.keys().any(|k| k.starts_with("vision_model.")) {
            return Err(parse_err(
                &path,
                "no CLIP vision tower found (expected open_clip keys 'visual.*' or Hugging Face keys 'vision_model.*')",
            ));
        }
        let dev = Device::Cpu;
        let get = |k: &str| -> Result<Tensor, WeightError> {
            clip.load(k, &dev).map_err(|e| parse_err(&path, format!("{k}: {e}")))
        };
        let hf = "vision_model.";
        let mut put = |k: String, t: Tensor| self.insert(format!("{target}{k}"), t);
        let conv = get(&format!("{hf}embeddings.patch_embedding.weight"))?;
        put("conv1.weight".into(), conv);
        put("class_embedding".into(), get(&format!("{hf}embeddings.class_embedding"))?);
        put("positional_embedding".into(), get(&format!("{hf}embeddings.position_embedding.weight"))?);
        for (ours, theirs) in [("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")] {
            put(format!("{ours}.weight"), get(&format!("{hf}{theirs}.weight"))?);
            put(format!("{ours}.bias"), get(&format!("{hf}{theirs}.bias"))?);
        }
        for l in 0..layers {
            let src = format!("{hf}encoder.layers.{l}.");
            let dst = format!("transformer.resblocks.{l}.");
            let cat = |what: &str| -> Result<Tensor, WeightError> {
                let parts = ["q_proj", "k_proj", "v_proj"]
                    .iter()
                    .map(|p| get(&format!("{src}self_attn.{p}.{what}")))
                    .collect::<Result<Vec<_>, _>>()?;
                Tensor::cat(&parts, 0).map_err(|e| parse_err(&path, e))
            };
            put(format!("{dst}attn.in_proj_weight"), cat("weight")?);
            put(format!("{dst}attn.in_proj_bias"), cat("bias")?);
            for (ours, theirs) in HF_CLIP_BLOCK_NAMES {
                put(format!("{dst}{ours}.weight"), get(&format!("{src}{theirs}.weight"))?);
                put(format!("{dst}{ours}.bias"), get(&format!("{src}{theirs}.bias"))?);
            }
        }
        let proj = get("visual_projection.weight")?;
        let proj = proj.t().and_then(|t| t.contiguous()).map_err(|e| parse_err(&path, e))?;
        put("proj".into(), proj);
        self.origin.push(path);
        Ok(())
    }
}

struct LoaderState {
    ck: Checkpoint,
    device: Device,
    used: RefCell<BTreeSet<String>>,
    report: RefCell<MismatchReport>,
    digest: RefCell<crate::hash::Fnv>,
}

/// Hands out the tensors of a [`Checkpoint`] to model constructors, checking names and shapes, and
/// converting to the model's dtype and device. Cheap to clone; clones share their bookkeeping.
#[derive(Clone)]
pub struct WeightLoader {
    state: Rc<LoaderState>,
    prefix: String,
    dtype: DType,
}

impl WeightLoader {
    /// A loader over `ck` producing tensors of `dtype` on `device`.
    pub fn new(ck: Checkpoint, dtype: DType, device: &Device) -> Self {
        let report = MismatchReport { origin: ck.origin(), ..Default::default() };
        Self {
            state: Rc::new(LoaderState {
                ck,
                device: device.clone(),
                used: RefCell::new(BTreeSet::new()),
                report: RefCell::new(report),
                digest: RefCell::new(crate::hash::Fnv::default()),
            }),
            prefix: String::new(),
            dtype,
        }
    }

    /// The same loader (shared bookkeeping) producing tensors of another dtype.
    pub fn with_dtype(&self, dtype: DType) -> Self {
        Self { state: self.state.clone(), prefix: self.prefix.clone(), dtype }
    }

    /// A loader whose names are prefixed with `name` (and a dot).
    pub fn pp(&self, name: impl fmt::Display) -> Self {
        Self { state: self.state.clone(), prefix: format!("{}{}.", self.prefix, name), dtype: self.dtype }
    }

    /// The dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device tensors are placed on.
    pub fn device(&self) -> &Device {
        &self.state.device
    }

    fn full(&self, name: &str) -> String {
        format!("{}{}", self.prefix, name)
    }

    /// Whether the checkpoint has `name` (under this loader's prefix).
    pub fn contains(&self, name: &str) -> bool {
        self.state.ck.contains(&self.full(name))
    }

    /// The tensor `name` with the given shape, in the loader's dtype. A missing tensor or a wrong
    /// shape is recorded for [`finish`](Self::finish) and a zero tensor is returned in its place.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> candle_core::Result<Tensor> {
        self.get_as(shape, name, self.dtype)
    }

    /// Like [`get`](Self::get) but converts to `dtype` (e.g. f32 for tensors that stay in full precision).
    pub fn get_as(&self, shape: impl Into<Shape>, name: &str, dtype: DType) -> candle_core::Result<Tensor> {
        let shape: Shape = shape.into();
        let key = self.full(name);
        let st = &self.state;
        // A broadcast scalar: no memory is spent on placeholders (this also lets
        // `expected_keys` walk the released-size model for free).
        let zeros = || Tensor::zeros((), dtype, &st.device)?.broadcast_as(&shape);
        let Some(found) = st.ck.shape(&key) else {
            st.report.borrow_mut().missing.push((key, shape.dims().to_vec()));
            return zeros();
        };
        st.used.borrow_mut().insert(key.clone());
        // A 0-d scalar and a 1-element vector are the same to us only if the model asks for it.
        if found != shape.dims() {
            st.report.borrow_mut().shape.push((key, shape.dims().to_vec(), found.to_vec()));
            return zeros();
        }
        match st.ck.load_with_crc(&key, &st.device).and_then(|(t, crc)| Ok((t.to_dtype(dtype)?, crc))) {
            Ok((t, crc)) => {
                let mut d = st.digest.borrow_mut();
                d.bytes(key.as_bytes());
                d.bytes(format!("{:?}{:?}", found, dtype).as_bytes());
                d.bytes(&crc.to_le_bytes());
                Ok(t)
            }
            Err(e) => {
                st.report.borrow_mut().unreadable.push((key, e.to_string()));
                zeros()
            }
        }
    }

    /// An optional tensor: `None` when absent, checked like [`get`](Self::get) when present.
    pub fn get_opt(&self, shape: impl Into<Shape>, name: &str, dtype: DType) -> candle_core::Result<Option<Tensor>> {
        if self.contains(name) { self.get_as(shape, name, dtype).map(Some) } else { Ok(None) }
    }

    /// Marks every key under `prefix` (full key prefix) as intentionally unused.
    pub fn ignore_prefix(&self, prefix: &str) {
        let keys: Vec<String> = self.state.ck.keys().filter(|k| k.starts_with(prefix)).map(String::from).collect();
        self.state.used.borrow_mut().extend(keys);
    }

    /// A digest of every tensor handed out so far (name, shape, dtype and the CRC-32 of its stored
    /// bytes), in the order they were asked for: two models built from weights that differ in any
    /// tensor get different digests (the resume fingerprint includes it).
    pub fn digest(&self) -> u64 {
        self.state.digest.borrow().finish()
    }

    /// Ends loading: an error listing every missing, unexpected (not dead), mis-shaped or unreadable
    /// key, or `Ok` with the list of dead keys that were present and skipped.
    pub fn finish(self) -> Result<Vec<String>, WeightError> {
        let st = &self.state;
        let used = st.used.borrow();
        let mut report = st.report.borrow().clone();
        let mut dead = Vec::new();
        for k in st.ck.keys() {
            if used.contains(k) {
                continue;
            }
            if is_dead_key(k) {
                dead.push(k.to_string());
            } else {
                report.unexpected.push(k.to_string());
            }
        }
        if report.missing.is_empty()
            && report.unexpected.is_empty()
            && report.shape.is_empty()
            && report.unreadable.is_empty()
        {
            Ok(dead)
        } else {
            Err(WeightError::Mismatch(Box::new(report)))
        }
    }
}
