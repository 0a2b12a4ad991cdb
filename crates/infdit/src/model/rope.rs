//! 2-D rotary position embedding (spec §3.6).
//!
//! Head channels `0..d/2` rotate with the token row, `d/2..d` with the token column. Each axis has
//! `d/4` frequencies `theta_i = 1 / 10000^(2i/(d/2))` (fp32), each used for one adjacent channel
//! pair ("GPT-J" interleaved rotation). Positions are taken modulo the table side (1024 for the
//! released model). The angles are `fl32(pos * theta)` and their cos/sin are taken in fp32, as the
//! reference builds its table; when a checkpoint carries the table itself (`rope.freqs_cos/sin`),
//! those stored values are used instead.

use candle_core::{D, DType, Device, Result, Tensor};

/// RoPE tables for blocks of tokens.
#[derive(Debug, Clone)]
pub struct Rope {
    head_dim: usize,
    modulo: usize,
    theta: Vec<f32>,
    /// Stored tables (modulo, modulo, head_dim) from the checkpoint, when present.
    stored: Option<(Tensor, Tensor)>,
}

/// Per-axis inverse frequencies in fp32: `1 / fl32(10000 ^ fl32(2i / axis_dim))`.
pub fn rope_theta(axis_dim: usize) -> Vec<f32> {
    (0..axis_dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / axis_dim as f32;
            let p = 10000f64.powf(e as f64) as f32;
            1.0f32 / p
        })
        .collect()
}

impl Rope {
    /// Tables for `head_dim` channels and positions modulo `modulo`; `stored` are the checkpoint's
    /// `(freqs_cos, freqs_sin)` of shape (modulo, modulo, head_dim), if any.
    pub fn new(head_dim: usize, modulo: usize, stored: Option<(Tensor, Tensor)>) -> Self {
        Self { head_dim, modulo, theta: rope_theta(head_dim / 2), stored }
    }

    /// cos and sin for a rectangle of tokens starting at token (row0, col0), `rows x cols` tokens in
    /// row-major order: two (rows*cols, head_dim) f32 tensors.
    pub fn cos_sin(
        &self,
        row0: usize,
        col0: usize,
        rows: usize,
        cols: usize,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let m = self.modulo;
        if let Some((c, s)) = &self.stored {
            let ri: Vec<u32> = (0..rows).map(|r| ((row0 + r) % m) as u32).collect();
            let ci: Vec<u32> = (0..cols).map(|q| ((col0 + q) % m) as u32).collect();
            let ri = Tensor::new(ri.as_slice(), dev)?;
            let ci = Tensor::new(ci.as_slice(), dev)?;
            let take = |t: &Tensor| -> Result<Tensor> {
                t.to_device(dev)?
                    .index_select(&ri, 0)?
                    .index_select(&ci, 1)?
                    .reshape((rows * cols, self.head_dim))?
                    .to_dtype(DType::F32)
            };
            return Ok((take(c)?, take(s)?));
        }
        let d = self.head_dim;
        let half = d / 2;
        let mut cos = vec![0f32; rows * cols * d];
        let mut sin = vec![0f32; rows * cols * d];
        for r in 0..rows {
            let pr = ((row0 + r) % m) as f32;
            for q in 0..cols {
                let pc = ((col0 + q) % m) as f32;
                let base = (r * cols + q) * d;
                for ch in 0..d {
                    let (pos, i) = if ch < half { (pr, ch / 2) } else { (pc, (ch - half) / 2) };
                    let ang = pos * self.theta[i];
                    cos[base + ch] = ang.cos();
                    sin[base + ch] = ang.sin();
                }
            }
        }
        Ok((Tensor::from_vec(cos, (rows * cols, d), dev)?, Tensor::from_vec(sin, (rows * cols, d), dev)?))
    }
}

/// Applies the rotation to `t` (..., T, d) with `cos`/`sin` broadcastable to it:
/// `t'[2k] = t[2k] cos - t[2k+1] sin`, `t'[2k+1] = t[2k+1] cos + t[2k] sin`.
pub fn apply_rope(t: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let d = dims[dims.len() - 1];
    let mut pair = dims.clone();
    *pair.last_mut().expect("a tensor with a last dimension") = d / 2;
    pair.push(2);
    let tp = t.reshape(pair)?;
    let x0 = tp.narrow(D::Minus1, 0, 1)?;
    let x1 = tp.narrow(D::Minus1, 1, 1)?;
    let rot = Tensor::cat(&[x1.neg()?, x0], D::Minus1)?.reshape(dims)?;
    t.broadcast_mul(cos)?.broadcast_add(&rot.broadcast_mul(sin)?)
}
