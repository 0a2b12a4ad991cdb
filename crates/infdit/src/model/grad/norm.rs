//! LayerNorm over the last dimension followed by a per-channel affine map (LayerNorm's weight and
//! bias, or adaLN's `1 + scale` and `shift`), with a hand-written backward.
//!
//! `y = xhat g + b`, `xhat = (x - mean) rstd`, `rstd = 1 / sqrt(var + eps)` (two-pass statistics
//! in f32, as [`crate::model::ops::layer_norm_plain`]). Backward, per row of C values:
//! `dxhat = dy g`, `dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))`; `dg = sum_rows dy
//! xhat`, `db = sum_rows dy`. The column sums are taken over fixed chunks of rows in parallel and
//! added in chunk order, so they do not depend on the number of threads.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, tensor, with_f32};

/// Rows per chunk of the parallel loops (fixed: the sums' order depends on it only).
const ROWS: usize = 64;

struct LnAffine {
    eps: f32,
}

/// Mean and 1/std of one row.
fn stats(x: &[f32], eps: f32) -> (f32, f32) {
    let c = x.len() as f32;
    let mean = x.iter().sum::<f32>() / c;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LnAffine {
    fn name(&self) -> &'static str {
        "train-ln-affine"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g, b) = (slice(sx, lx, "ln x")?, slice(sg, lg, "ln weight")?, slice(sb, lb, "ln bias")?);
        let c = *lx.dims().last().unwrap_or(&0);
        if c == 0 || g.len() != c || b.len() != c {
            candle_core::bail!("ln_affine: width {c} with weight {} and bias {}", g.len(), b.len())
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(ROWS * c).zip(x.par_chunks(ROWS * c)).for_each(|(o, x)| {
            for (orow, xrow) in o.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                let (mean, rstd) = stats(xrow, self.eps);
                for i in 0..c {
                    orow[i] = (xrow[i] - mean) * rstd * g[i] + b[i];
                }
            }
        });
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = x.dim(candle_core::D::Minus1)?;
        let mut dx = vec![0f32; x.elem_count()];
        let partials: Vec<(Vec<f32>, Vec<f32>)> = with_f32(&x.detach(), |x| {
            with_f32(&g.detach(), |g| {
                with_f32(&grad.detach(), |dy| {
                    dx.par_chunks_mut(ROWS * c)
                        .zip(x.par_chunks(ROWS * c))
                        .zip(dy.par_chunks(ROWS * c))
                        .map(|((dxc, xc), dyc)| {
                            let (mut dg, mut db) = (vec![0f32; c], vec![0f32; c]);
                            let mut xhat = vec![0f32; c];
                            for ((dxr, xr), dyr) in
                                dxc.chunks_exact_mut(c).zip(xc.chunks_exact(c)).zip(dyc.chunks_exact(c))
                            {
                                let (mean, rstd) = stats(xr, self.eps);
                                let (mut m1, mut m2) = (0f32, 0f32);
                                for i in 0..c {
                                    xhat[i] = (xr[i] - mean) * rstd;
                                    let dh = dyr[i] * g[i];
                                    m1 += dh;
                                    m2 += dh * xhat[i];
                                    dg[i] += dyr[i] * xhat[i];
                                    db[i] += dyr[i];
                                }
                                let (m1, m2) = (m1 / c as f32, m2 / c as f32);
                                for i in 0..c {
                                    dxr[i] = rstd * (dyr[i] * g[i] - m1 - xhat[i] * m2);
                                }
                            }
                            (dg, db)
                        })
                        .collect()
                })
            })
        })???;
        let (mut dg, mut db) = (vec![0f32; c], vec![0f32; c]);
        for (pg, pb) in &partials {
            for i in 0..c {
                dg[i] += pg[i];
                db[i] += pb[i];
            }
        }
        Ok((Some(tensor(dx, x.dims())?), Some(tensor(dg, g.dims())?), Some(tensor(db, b.dims())?)))
    }
}

/// `layer_norm(x) * g + b` over the last dimension of an f32 CPU tensor; `g` and `b` hold one value
/// per channel (any shape with that many elements, e.g. (1, 1, C)).
pub fn ln_affine(x: &Tensor, g: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&g.contiguous()?, &b.contiguous()?, LnAffine { eps: eps as f32 })
}

/// The same from differentiable candle primitives.
pub fn ln_affine_reference(x: &Tensor, g: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x.dim(candle_core::D::Minus1)?;
    crate::model::ops::layer_norm_plain(x, eps)?.broadcast_mul(&g.reshape(c)?)?.broadcast_add(&b.reshape(c)?)
}
