//! One DiT transformer layer (spec §3.4, §3.5) and the layer-0 LR cross-attention (§3.8).

use candle_core::{D, DType, Module, Result, Tensor};

use super::blocks::KvSource;
use super::ops::{LayerNorm, Linear, attention, layer_norm, modulate, norm_modulate};
use crate::config::DitConfig;
use crate::kernels::{self, fused};
use crate::weights::WeightLoader;

/// Bytes allowed for one slice of attention scores.
pub(crate) const SCORE_BYTES: usize = 256 << 20;

/// The four adaLN vectors of a layer for the current sigma: shift/scale for attention and MLP.
#[derive(Debug, Clone)]
pub struct LayerMod {
    /// Shift before attention, (1, 1, D).
    pub shift_a: Tensor,
    /// Scale before attention.
    pub scale_a: Tensor,
    /// Shift before the MLP.
    pub shift_m: Tensor,
    /// Scale before the MLP.
    pub scale_m: Tensor,
}

/// The layer-0 cross-attention to the LR window around each block.
#[derive(Debug, Clone)]
pub struct CrossAttention {
    query: Linear,
    key_value: Linear,
    dense: Linear,
    q_ln: LayerNorm,
    k_ln: LayerNorm,
    /// (1, T, H, d)
    q_pos: Tensor,
    /// (1, W*W, H, d)
    k_pos: Tensor,
    post_ln: LayerNorm,
    heads: usize,
    head_dim: usize,
}

/// Keys and values of the padded LR feature map, shared by every call on the same image.
#[derive(Debug, Clone)]
pub struct LrKv {
    /// Normalised keys (Hp, Wp, H, d): the LR-feature map padded by one LR block of zero vectors.
    pub k: Tensor,
    /// Values (Hp, Wp, H, d).
    pub v: Tensor,
}

impl CrossAttention {
    fn load(cfg: &DitConfig, w: &WeightLoader) -> Result<Self> {
        let (dm, h, d) = (cfg.hidden, cfg.heads, cfg.head_dim());
        let ca = w.pp("cross_attention");
        let win = cfg.lr_window() * cfg.lr_window();
        Ok(Self {
            query: Linear::load(&ca, "query", dm, dm)?,
            key_value: Linear::load(&ca, "key_value", dm, 2 * dm)?,
            dense: Linear::load(&ca, "dense", dm, dm)?,
            q_ln: LayerNorm::load(w, "cross_q_ln", d, cfg.ln_eps)?,
            k_ln: LayerNorm::load(w, "cross_k_ln", d, cfg.ln_eps)?,
            q_pos: w.get((1, cfg.tokens_per_block(), h, d), "lr_query_position_embedding")?,
            k_pos: w.get((1, win, h, d), "lr_key_position_embedding")?,
            post_ln: LayerNorm::load(w, "post_cross_attention_layernorm", dm, cfg.ln_eps)?,
            heads: h,
            head_dim: d,
        })
    }

    /// Keys/values of an LR feature map (D, h', w') padded with zero tokens: `top` and `bottom`
    /// rows, `side` columns on each side. Projection and key norm are per token, so they are
    /// applied to the padded map once instead of to each of the overlapping windows (padding
    /// tokens become `LN(b_k)`, `b_v`, exactly what the windows of zero vectors give).
    pub fn lr_kv(&self, feat: &Tensor, top: usize, bottom: usize, side: usize) -> Result<LrKv> {
        self.lr_kv_sides(feat, (top, bottom), (side, side))
    }

    /// [`CrossAttention::lr_kv`] with `(top, bottom)` rows and `(left, right)` columns of padding.
    pub fn lr_kv_sides(&self, feat: &Tensor, rows: (usize, usize), cols: (usize, usize)) -> Result<LrKv> {
        let ((top, bottom), (left, right)) = (rows, cols);
        let (dm, h, w) = feat.dims3()?;
        let padded = feat.pad_with_zeros(1, top, bottom)?.pad_with_zeros(2, left, right)?;
        let (hp, wp) = (h + top + bottom, w + left + right);
        let tokens = padded.reshape((dm, hp * wp))?.t()?.contiguous()?; // (hp wp, D)
        let kv = self.key_value.forward(&tokens)?; // (hp wp, 2D)
        let k = kv.narrow(1, 0, dm)?.reshape((hp, wp, self.heads, self.head_dim))?;
        let v = kv.narrow(1, dm, dm)?.reshape((hp, wp, self.heads, self.head_dim))?;
        Ok(LrKv { k: self.k_ln.forward(&k)?, v: v.contiguous()? })
    }

    /// Cross-attention of `x` (n, T, D) (already normalised by the caller) to the windows
    /// whose top-left corners in the padded map are `corners` (one per block).
    fn forward(&self, x: &Tensor, lr: &LrKv, corners: &[(usize, usize)], window: usize) -> Result<Tensor> {
        let (n, t, dm) = x.dims3()?;
        let (h, d) = (self.heads, self.head_dim);
        let q = self.query.forward(x)?.reshape((n, t, h, d))?;
        let q = self.q_ln.forward(&q)?.broadcast_add(&self.q_pos)?.transpose(1, 2)?; // (n,H,T,d)
        let take = |m: &Tensor| -> Result<Tensor> {
            let parts = corners
                .iter()
                .map(|&(r, c)| m.narrow(0, r, window)?.narrow(1, c, window)?.reshape((1, window * window, h, d)))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)
        };
        let k = take(&lr.k)?.broadcast_add(&self.k_pos)?.transpose(1, 2)?;
        let v = take(&lr.v)?.transpose(1, 2)?;
        let ctx = attention(&q.to_dtype(x.dtype())?, &k.to_dtype(x.dtype())?, &v.to_dtype(x.dtype())?, SCORE_BYTES)?;
        let ctx = ctx.transpose(1, 2)?.reshape((n, t, dm))?;
        self.dense.forward(&ctx)
    }
}

/// One transformer layer with UniBA self-attention.
#[derive(Debug, Clone)]
pub struct Layer {
    index: usize,
    qkv: Linear,
    dense: Linear,
    up: Linear,
    down: Linear,
    /// `q_layer_norm[l]`, applied to Q **and** K (the reference's bug the weights depend on).
    qk_ln: LayerNorm,
    /// `re_pos_embed[l]`: (1, H, 4, 1, d) offsets added to the four key groups.
    block_pos: Tensor,
    adaln: Linear,
    cross: Option<CrossAttention>,
    hidden: usize,
    heads: usize,
    head_dim: usize,
    eps: f64,
}

/// Everything a layer needs besides the hidden state.
pub struct LayerInputs<'a> {
    /// RoPE cos/sin broadcastable to (n, H, T, d).
    pub rope: (&'a Tensor, &'a Tensor),
    /// Neighbourhood K/V provider.
    pub kv: &'a mut dyn KvSource,
    /// LR keys/values and window corners, used by layer 0.
    pub lr: (&'a LrKv, &'a [(usize, usize)], usize),
}

impl Layer {
    /// Loads layer `l`. `re_pos` is the whole `re_pos_embed` (depth, 4, H, d).
    pub fn load(cfg: &DitConfig, root: &WeightLoader, l: usize, re_pos: &Tensor) -> Result<Self> {
        let (dm, h, d) = (cfg.hidden, cfg.heads, cfg.head_dim());
        let t = root.pp("transformer.layers").pp(l);
        let mixin = root.pp("mixins.adaln_layer");
        let block_pos = re_pos.get(l)?.transpose(0, 1)?.unsqueeze(2)?.unsqueeze(0)?.contiguous()?; // (1,H,4,1,d)
        Ok(Self {
            index: l,
            qkv: Linear::load(&t.pp("attention"), "query_key_value", dm, 3 * dm)?,
            dense: Linear::load(&t.pp("attention"), "dense", dm, dm)?,
            up: Linear::load(&t.pp("mlp"), "dense_h_to_4h", dm, cfg.mlp_hidden)?,
            down: Linear::load(&t.pp("mlp"), "dense_4h_to_h", cfg.mlp_hidden, dm)?,
            qk_ln: LayerNorm::load(&mixin.pp("q_layer_norm"), &l.to_string(), d, cfg.ln_eps)?,
            block_pos,
            adaln: Linear::load(&mixin.pp("adaLN_modulations").pp(l), "1", dm, 4 * dm)?,
            cross: if l == 0 { Some(CrossAttention::load(cfg, &mixin)?) } else { None },
            hidden: dm,
            heads: h,
            head_dim: d,
            eps: cfg.ln_eps,
        })
    }

    /// The cross-attention of layer 0.
    pub fn cross(&self) -> Option<&CrossAttention> {
        self.cross.as_ref()
    }

    /// adaLN vectors from `silu_c` = SiLU(c), (1, D).
    pub fn modulation(&self, silu_c: &Tensor) -> Result<LayerMod> {
        let m = self.adaln.forward(silu_c)?; // (1, 4D)
        let part = |i: usize| m.narrow(1, i * self.hidden, self.hidden)?.unsqueeze(1);
        Ok(LayerMod { shift_a: part(0)?, scale_a: part(1)?, shift_m: part(2)?, scale_m: part(3)? })
    }

    /// Q, K (per-head QK LayerNorm and RoPE applied) and V as (n, H, T, d) from the normalised
    /// input `a` (n, T, D). For CPU inference the bias, split, norm, rotation and transpose are
    /// one fused pass per part ([`fused::heads`]); otherwise plain candle ops.
    fn qkv_heads(&self, a: &Tensor, rope: (&Tensor, &Tensor)) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, t, dm) = a.dims3()?;
        let (h, d) = (self.heads, self.head_dim);
        let (cos, sin) = rope;
        if kernels::applies(&[a, self.qkv.weight()]) {
            let qkv = self.qkv.forward_no_bias(a)?;
            let (w, b, eps) = self.qk_ln.parts();
            let nr = fused::NormRope { weight: w, bias: b, eps, cos, sin };
            let bias = self.qkv.bias();
            return Ok((
                fused::heads(&qkv, bias, 0, h, d, Some(&nr), a.dtype())?,
                fused::heads(&qkv, bias, 1, h, d, Some(&nr), a.dtype())?,
                fused::heads(&qkv, bias, 2, h, d, None, a.dtype())?,
            ));
        }
        let [q, k, v] = if self.qkv.trains(a) {
            // Training: three products with the rows of W for Q, K and V, so that no slice of the
            // (n, T, 3D) product is taken (candle's backward of a slice zero-pads it to the whole).
            let part = |i: usize| self.qkv.rows(i * dm, dm)?.forward(a)?.reshape((n, t, h, d));
            [part(0)?, part(1)?, part(2)?]
        } else {
            let qkv = self.qkv.forward(a)?; // (n, T, 3D)
            let part = |i: usize| qkv.narrow(D::Minus1, i * dm, dm)?.reshape((n, t, h, d));
            [part(0)?, part(1)?, part(2)?]
        };
        let rope = |z: Tensor| -> Result<Tensor> {
            if crate::model::grad::applies(&[&z, cos, sin]) {
                return crate::model::grad::heads_rope(&self.qk_ln.forward(&z)?, cos, sin);
            }
            let z = self.qk_ln.forward(&z)?.transpose(1, 2)?; // (n, H, T, d)
            super::rope::apply_rope(&z.to_dtype(DType::F32)?, cos, sin)?.to_dtype(a.dtype())
        };
        Ok((rope(q)?, rope(k)?, v.transpose(1, 2)?.contiguous()?))
    }

    /// `x + proj(z)`: fused with the projection's bias for CPU inference.
    fn residual(x: &Tensor, proj: &Linear, z: &Tensor) -> Result<Tensor> {
        match proj.bias() {
            Some(b) if kernels::applies(&[x, z, proj.weight(), b]) => {
                fused::add_bias_residual(x, &proj.forward_no_bias(z)?, b)
            }
            _ => x + proj.forward(z)?,
        }
    }

    /// The MLP `down(gelu(up(z)))`, with the up projection's bias fused into the GELU for CPU
    /// inference.
    fn mlp_hidden(&self, z: &Tensor) -> Result<Tensor> {
        if kernels::applies(&[z, self.up.weight()]) {
            return fused::bias_gelu(&self.up.forward_no_bias(z)?, self.up.bias());
        }
        let y = self.up.forward(z)?;
        if crate::model::grad::applies(&[&y]) {
            return crate::model::grad::gelu(&y);
        }
        y.gelu()
    }

    /// The layer on a batch of blocks: `x` is (n, T, D), tokens block-local row-major.
    pub fn forward(&self, x: &Tensor, m: &LayerMod, inp: &mut LayerInputs<'_>) -> Result<Tensor> {
        let (n, t, dm) = x.dims3()?;
        let (h, d) = (self.heads, self.head_dim);
        let a = norm_modulate(x, &m.shift_a, &m.scale_a, self.eps)?;
        let (q, k, v) = self.qkv_heads(&a, inp.rope)?;
        let (k4, v4) = inp.kv.neighbourhood(self.index, &k, &v)?;
        let pos = self.block_pos.to_dtype(k4.dtype())?;
        let k4 = if crate::model::grad::trains(&[&k4, &pos]) {
            crate::model::grad::add_group_pos(&k4, &pos)?
        } else {
            k4.reshape((n, h, 4, t, d))?.broadcast_add(&pos)?.reshape((n, h, 4 * t, d))?
        };
        let ctx = attention(&q, &k4, &v4, SCORE_BYTES)?.transpose(1, 2)?.reshape((n, t, dm))?;
        let mut x = Self::residual(x, &self.dense, &ctx)?;
        let mlp_in = match &self.cross {
            Some(cross) => {
                let (lr, corners, window) = inp.lr;
                x = (&x + cross.forward(&layer_norm(&x, self.eps)?, lr, corners, window)?)?;
                modulate(&cross.post_ln.forward(&x)?, &m.shift_m, &m.scale_m)?
            }
            None => norm_modulate(&x, &m.shift_m, &m.scale_m, self.eps)?,
        };
        if let Some(y) = self.mlp_training(&mlp_in)? {
            return x + y;
        }
        Self::residual(&x, &self.down, &self.mlp_hidden(&mlp_in)?)
    }

    /// Training (f32 on the CPU, in an autograd graph): `down(gelu(up(z)))` with the GELU fused
    /// into the down projection ([`crate::model::grad::gelu_linear`]); `None` elsewhere.
    fn mlp_training(&self, z: &Tensor) -> Result<Option<Tensor>> {
        let (w, Some(b)) = (self.down.weight(), self.down.bias()) else { return Ok(None) };
        if !(self.up.trains(z) && self.down.trains(z)) {
            return Ok(None);
        }
        Ok(Some(crate::model::grad::gelu_linear(&self.up.forward(z)?, w, b)?))
    }
}
