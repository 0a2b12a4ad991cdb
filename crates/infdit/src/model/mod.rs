//! The Inf-DiT diffusion transformer (spec §3).
//!
//! Hidden states are kept **block-major**: a batch of n blocks is (n, T, D) with T = 1024 tokens per
//! block in block-local row-major order. Every part of the network except the UniBA attention is
//! per token or per block, so whole-image mode and the block scheduler share this code; they differ
//! only in the [`blocks::KvSource`] that supplies each block's neighbourhood keys.

pub mod blocks;
pub mod grad;
pub mod layer;
pub mod ops;
pub mod rope;

use candle_core::{DType, Device, Module, Result, Tensor};

use crate::config::DitConfig;
use crate::weights::WeightLoader;
use blocks::{BlockGrid, BlockPos, KvSource};
use layer::{Layer, LayerInputs, LayerMod, LrKv};
use ops::{Linear, PatchConv, layer_norm, norm_modulate};
use rope::Rope;

/// Per-sigma conditioning: the vector c and every adaLN output derived from it.
#[derive(Debug, Clone)]
pub struct StepCond {
    /// c = SiLU(time + vector), (1, D).
    pub c: Tensor,
    /// Per-layer modulation.
    pub layers: Vec<LayerMod>,
    /// Final layer shift and scale, (1, 1, D) each.
    pub final_shift: Tensor,
    /// See `final_shift`.
    pub final_scale: Tensor,
}

/// Per-image state that does not change with sigma: LR keys/values for the cross-attention, for
/// all block rows or for a band of them.
#[derive(Debug, Clone)]
pub struct ImageCond {
    /// The block grid of the output.
    pub grid: BlockGrid,
    /// LR keys/values of the (zero-)padded feature map, rows from `lr_row0` on.
    pub lr: LrKv,
    /// Row of the full padded LR feature map that `lr` starts at.
    pub lr_row0: usize,
    /// Column of the full padded LR feature map that `lr` starts at.
    pub lr_col0: usize,
    /// RoPE position of the image's first token (row, column): 0 at inference; training draws a
    /// random start per batch so the network sees every part of the position table.
    pub rope_offset: (usize, usize),
}

/// The Inf-DiT network.
#[derive(Debug, Clone)]
pub struct InfDit {
    cfg: DitConfig,
    patch_embed: PatchConv,
    time_1: Linear,
    time_2: Linear,
    vec_1: Linear,
    vec_2: Linear,
    layers: Vec<Layer>,
    proj_lr: PatchConv,
    final_adaln: Linear,
    final_linear: Linear,
    rope: Rope,
    time_freqs: Vec<f32>,
    dtype: DType,
    device: Device,
}

/// Time-embedding frequencies `(1/10000)^(j/half)` in fp32, j = 0..half.
pub fn time_freqs(channels: usize) -> Vec<f32> {
    let half = channels / 2;
    (0..half)
        .map(|j| {
            let e = j as f32 / half as f32;
            (1e-4f32 as f64).powf(e as f64) as f32
        })
        .collect()
}

impl InfDit {
    /// Builds the network from the official state-dict layout.
    pub fn load(cfg: &DitConfig, w: &WeightLoader) -> Result<Self> {
        cfg.validate().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (dm, h, d) = (cfg.hidden, cfg.heads, cfg.head_dim());
        let mixin = w.pp("mixins.adaln_layer");
        let re_pos = mixin.get((cfg.depth, 4, h, d), "re_pos_embed")?;
        let layers = (0..cfg.depth).map(|l| Layer::load(cfg, w, l, &re_pos)).collect::<Result<Vec<_>>>()?;
        let m = cfg.rope_positions();
        let stored = match (
            mixin.get_opt((m, m, d), "rope.freqs_cos", DType::F32)?,
            mixin.get_opt((m, m, d), "rope.freqs_sin", DType::F32)?,
        ) {
            (Some(c), Some(s)) => Some((c, s)),
            _ => None,
        };
        let te = w.pp("time_embed.mlp");
        let ce = w.pp("cond_embed.map_vector");
        let fl = w.pp("mixins.final_layer");
        Ok(Self {
            cfg: cfg.clone(),
            patch_embed: PatchConv::load(&w.pp("mixins.patch_embed"), "proj", cfg.in_channels, dm, cfg.patch, true)?,
            time_1: Linear::load(&te, "0", cfg.time_channels, dm)?,
            time_2: Linear::load(&te, "2", dm, dm)?,
            vec_1: Linear::load(&ce, "0", cfg.vector_dim, dm)?,
            vec_2: Linear::load(&ce, "2", dm, dm)?,
            layers,
            proj_lr: PatchConv::load(&mixin, "proj_lr", 3, dm, cfg.lr_patch, true)?,
            final_adaln: Linear::load(&fl.pp("adaLN_modulation"), "1", dm, 2 * dm)?,
            final_linear: Linear::load(&fl, "linear", dm, cfg.patch * cfg.patch * cfg.out_channels)?,
            rope: Rope::new(d, m, stored),
            time_freqs: time_freqs(cfg.time_channels),
            dtype: w.dtype(),
            device: w.device().clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DitConfig {
        &self.cfg
    }

    /// The compute dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The conditioning for one sigma: `c = SiLU(TimeMLP(sinusoid(c_noise)) + VecMLP(v))` and all
    /// adaLN vectors. `clip` is the (1, vector_dim) image embedding.
    pub fn step_cond(&self, c_noise: f32, clip: &Tensor) -> Result<StepCond> {
        let mut emb = Vec::with_capacity(self.cfg.time_channels);
        let args: Vec<f32> = self.time_freqs.iter().map(|f| c_noise * f).collect();
        emb.extend(args.iter().map(|a| a.cos()));
        emb.extend(args.iter().map(|a| a.sin()));
        let emb = Tensor::from_vec(emb, (1, self.cfg.time_channels), &self.device)?.to_dtype(self.dtype)?;
        let t = self.time_2.forward(&candle_nn::ops::silu(&self.time_1.forward(&emb)?)?)?;
        let v = clip.to_dtype(self.dtype)?;
        let u = self.vec_2.forward(&candle_nn::ops::silu(&self.vec_1.forward(&v)?)?)?;
        let c = candle_nn::ops::silu(&(t + u)?)?;
        let sc = candle_nn::ops::silu(&c)?;
        let layers = self.layers.iter().map(|l| l.modulation(&sc)).collect::<Result<Vec<_>>>()?;
        let f = self.final_adaln.forward(&sc)?;
        let dm = self.cfg.hidden;
        Ok(StepCond {
            c,
            layers,
            final_shift: f.narrow(1, 0, dm)?.unsqueeze(1)?,
            final_scale: f.narrow(1, dm, dm)?.unsqueeze(1)?,
        })
    }

    /// Per-image conditioning from the LR image (1, 3, h, w) in [-1, 1] (not scaled by c_in) for an
    /// output grid; requires `h = grid height / sr_scale`.
    pub fn image_cond(&self, lr: &Tensor, grid: BlockGrid) -> Result<ImageCond> {
        self.image_cond_rows(lr, grid, 0, grid.rows)
    }

    /// The same for block rows `row0..row1` only: the LR features those blocks' windows read (one
    /// LR block above and below the band), so memory grows with the width, not the area.
    pub fn image_cond_rows(&self, lr: &Tensor, grid: BlockGrid, row0: usize, row1: usize) -> Result<ImageCond> {
        self.image_cond_window(lr, grid, row0, row1, None)
    }

    /// The same for the blocks of rows `row0..row1` and, when given, columns `cols` only (one LR
    /// block around them), so that memory does not grow with the image at all. `lr` may be in
    /// host memory: only the part read goes to the model's device. The features of a token do not
    /// depend on the window it is computed in.
    pub fn image_cond_window(
        &self,
        lr: &Tensor,
        grid: BlockGrid,
        row0: usize,
        row1: usize,
        cols: Option<(usize, usize)>,
    ) -> Result<ImageCond> {
        let (_, c, h, w) = lr.dims4()?;
        let s = self.cfg.sr_scale;
        let (col0, col1) = cols.unwrap_or((0, grid.cols));
        if c != 3
            || h * s != grid.height()
            || w * s != grid.width()
            || row0 >= row1
            || row1 > grid.rows
            || col0 >= col1
            || col1 > grid.cols
        {
            candle_core::bail!(
                "LR image {c}x{h}x{w} (rows {row0}..{row1}, columns {col0}..{col1}) does not match the output grid \
                 {}x{} at scale {s}",
                grid.height(),
                grid.width()
            )
        }
        let (lb, lp) = (self.cfg.lr_block(), self.cfg.lr_patch);
        let (hf, wf) = (h / lp, w / lp);
        // Feature rows/columns the windows cover, clipped to the image; the rest is zero padding.
        let clip = |a: usize, b: usize, len: usize| {
            let want0 = (lb * a) as isize - lb as isize;
            let f0 = want0.max(0) as usize;
            let f1 = (lb * b + lb).min(len);
            (f0, f1, (f0 as isize - want0) as usize, lb * b + lb - f1)
        };
        let (f0, f1, top, bottom) = clip(row0, row1, hf);
        let (g0, g1, left, right) = match cols {
            None => (0, wf, lb, lb),
            Some(_) => clip(col0, col1, wf),
        };
        let mut band = lr.narrow(2, f0 * lp, (f1 - f0) * lp)?;
        if cols.is_some() {
            band = band.narrow(3, g0 * lp, (g1 - g0) * lp)?;
        }
        let band = crate::device::to_device_compact(&band, &self.device)?.to_dtype(self.dtype)?;
        let feat = self.proj_lr.forward(&band)?; // (1, rows*cols, D)
        let feat = feat.squeeze(0)?.t()?.reshape((self.cfg.hidden, f1 - f0, g1 - g0))?;
        let cross = self.layers[0].cross().expect("layer 0 has the cross-attention");
        Ok(ImageCond {
            grid,
            lr: cross.lr_kv_sides(&feat, (top, bottom), (left, right))?,
            lr_row0: lb * row0,
            lr_col0: lb * col0,
            rope_offset: (0, 0),
        })
    }

    /// The network F on a batch of blocks. `x_in` is (n, in_channels, bp, bp): the blocks of
    /// `c_in * [x || concat_lr]` at `pos`. Returns (n, out_channels, bp, bp). When `trace` is given,
    /// the hidden state after every layer is pushed to it, (n, T, D) each.
    pub fn forward_blocks(
        &self,
        x_in: &Tensor,
        pos: &[BlockPos],
        step: &StepCond,
        image: &ImageCond,
        kv: &mut dyn KvSource,
        mut trace: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let n = pos.len();
        let bt = self.cfg.block_tokens();
        let mut x = self.patch_embed.forward(&x_in.to_dtype(self.dtype)?)?; // (n, T, D)
        // RoPE tables for the batch: (n, 1, T, d).
        let mut cos = Vec::with_capacity(n);
        let mut sin = Vec::with_capacity(n);
        let (r0, c0) = image.rope_offset;
        for p in pos {
            let (c, s) = self.rope.cos_sin(r0 + p.row * bt, c0 + p.col * bt, bt, bt, &self.device)?;
            cos.push(c.unsqueeze(0)?);
            sin.push(s.unsqueeze(0)?);
        }
        let cos = Tensor::stack(&cos, 0)?;
        let sin = Tensor::stack(&sin, 0)?;
        let lb = self.cfg.lr_block();
        let corners: Vec<(usize, usize)> =
            pos.iter().map(|p| (p.row * lb - image.lr_row0, p.col * lb - image.lr_col0)).collect();
        let mut inputs = LayerInputs { rope: (&cos, &sin), kv, lr: (&image.lr, &corners, self.cfg.lr_window()) };
        for (layer, m) in self.layers.iter().zip(&step.layers) {
            x = layer.forward(&x, m, &mut inputs)?;
            if let Some(t) = trace.as_deref_mut() {
                t.push(x.clone());
            }
        }
        // SAT's final_layernorm, then the final layer's norm_final: two LayerNorms in a row.
        let eps = self.cfg.ln_eps;
        let z = norm_modulate(&layer_norm(&x, eps)?, &step.final_shift, &step.final_scale, eps)?;
        let o = self.final_linear.forward(&z)?; // (n, T, p*p*C) ordered (py, px, c)
        let (p, co) = (self.cfg.patch, self.cfg.out_channels);
        o.to_dtype(DType::F32)?
            .reshape((n, bt, bt, p, p, co))?
            .permute((0, 5, 1, 3, 2, 4))? // (n, c, ty, py, tx, px)
            .reshape((n, co, bt * p, bt * p))
    }
}
