//! LayerNorm over the last dimension followed by a per-channel affine map (LayerNorm's weight and
//! bias, or adaLN's `1 + scale` and `shift`), with a hand-written backward.
//!
//! `y = xhat g + b`, `xhat = (x - mean) rstd`, `rstd = 1 / sqrt(var + eps)` (two-pass statistics
//! in f32, as [`crate::model::ops::layer_norm_plain`]). Backward, per row of C values:
//! `dxhat = dy g`, `dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))`; `dg = sum_rows dy
//! xhat`, `db = sum_rows dy`. The column sums are taken over fixed chunks of rows in parallel and
//! added in chunk order, so they do not depend on the number of threads; the row sums use 16
//! partial sums and the row loops are compiled per instruction set ([`crate::kernels::multiversion`]),
//! the same bits on each.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, tensor, with_f32};
use crate::kernels::{dot_f32, sum_f32, sum_map_f32};

/// Rows per chunk of the parallel loops (fixed: the sums' order depends on it only).
const ROWS: usize = 64;

struct LnAffine {
    eps: f32,
}

/// Mean and 1/std of one row (sums with 16 partial sums, so that the loops vectorise).
#[inline(always)]
fn stats(x: &[f32], eps: f32) -> (f32, f32) {
    let c = x.len() as f32;
    let mean = sum_f32(x) / c;
    let var = sum_map_f32(x, |v| (v - mean) * (v - mean)) / c;
    (mean, 1.0 / (var + eps).sqrt())
}

crate::kernels::multiversion! {
    fn forward_rows(x: &[f32], g: &[f32], b: &[f32], out: &mut [f32], eps: f32) {
        let c = g.len();
        for (orow, xrow) in out.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
            let (mean, rstd) = stats(xrow, eps);
            for (((o, &x), &g), &b) in orow.iter_mut().zip(xrow).zip(g).zip(b) {
                *o = (x - mean) * rstd * g + b;
            }
        }
    }
}

crate::kernels::multiversion! {
    fn backward_rows(x: &[f32], dy: &[f32], g: &[f32], dx: &mut [f32], dg: &mut [f32], db: &mut [f32], eps: f32) {
        let c = g.len();
        let (mut xhat, mut dh) = (vec![0f32; c], vec![0f32; c]);
        for ((dxr, xr), dyr) in dx.chunks_exact_mut(c).zip(x.chunks_exact(c)).zip(dy.chunks_exact(c)) {
            let (mean, rstd) = stats(xr, eps);
            for i in 0..c {
                xhat[i] = (xr[i] - mean) * rstd;
                dh[i] = dyr[i] * g[i];
                dg[i] += dyr[i] * xhat[i];
                db[i] += dyr[i];
            }
            let (m1, m2) = (sum_f32(&dh) / c as f32, dot_f32(&dh, &xhat) / c as f32);
            for i in 0..c {
                dxr[i] = rstd * (dh[i] - m1 - xhat[i] * m2);
            }
        }
    }
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
        let path = crate::kernels::path();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(ROWS * c)
            .zip(x.par_chunks(ROWS * c))
            .for_each(|(o, x)| forward_rows(path, x, g, b, o, self.eps));
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
        let path = crate::kernels::path();
        let mut dx = vec![0f32; x.elem_count()];
        let partials: Vec<(Vec<f32>, Vec<f32>)> = with_f32(&x.detach(), |x| {
            with_f32(&g.detach(), |g| {
                with_f32(&grad.detach(), |dy| {
                    dx.par_chunks_mut(ROWS * c)
                        .zip(x.par_chunks(ROWS * c))
                        .zip(dy.par_chunks(ROWS * c))
                        .map(|((dxc, xc), dyc)| {
                            let (mut dg, mut db) = (vec![0f32; c], vec![0f32; c]);
                            backward_rows(path, xc, dyc, g, dxc, &mut dg, &mut db, self.eps);
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
