//! Scaled dot-product attention with a hand-written backward.
//!
//! `O = softmax(Q K^T s) V` for Q (N, H, Tq, d), K and V (N, H, Tk, d), s = 1/sqrt(d). The forward
//! keeps nothing but its output; the backward recomputes the probabilities of one (batch, head)
//! item at a time (one Tq x Tk buffer per worker) and uses the output it is given:
//!
//! * `P = softmax(Q K^T s)` (row maximum subtracted, f32),
//! * `dV = P^T dO`, `dP = dO V^T`, `D_i = sum_c dO_ic O_ic`,
//! * `dS = P (dP - D) s`, `dQ = dS K`, `dK = dS^T Q`.
//!
//! Products are single-threaded gemm calls (in the precision [`super::products`] gives: f32, or bf16
//! on AMX tiles); the (batch, head) items are spread over the rayon
//! pool, each written by one worker, so the results do not depend on the number of threads.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, tensor, with_f32};
use crate::kernels::{MatmulPrecision, Path, sum_f32};

thread_local! {
    /// Per-worker score buffers (kept between calls: fresh 1 MB buffers per item cost page faults).
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with this worker's two scratch buffers of `n` values each (contents unspecified).
fn with_scratch<R>(n: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    SCRATCH.with(|c| {
        let mut c = c.borrow_mut();
        let (a, b) = &mut *c;
        if a.len() < n {
            a.resize(n, 0.0);
            b.resize(n, 0.0);
        }
        f(&mut a[..n], &mut b[..n])
    })
}

struct Attention {
    scale: f32,
}

struct Dims {
    items: usize,
    tq: usize,
    tk: usize,
    d: usize,
}

fn dims(q: &[usize], k: &[usize], v: &[usize]) -> Result<Dims> {
    if q.len() != 4 || k.len() != 4 || v.len() != 4 || k != v || q[0] != k[0] || q[1] != k[1] || q[3] != k[3] {
        candle_core::bail!("attention: shapes q {q:?}, k {k:?}, v {v:?} do not fit (N, H, T, d)")
    }
    Ok(Dims { items: q[0] * q[1], tq: q[2], tk: k[2], d: q[3] })
}

/// `e^x` for the softmax (`x <= 0` after the row maximum is subtracted; clamped at -87): `2^n 2^f` with
/// `n = round(x log2 e)` and `2^f`, `|f| <= 1/2`, by its Taylor series to degree 7 (truncation
/// below 1e-8 relative; the f32 rounding of `x log2 e` makes the relative error up to 4e-6 near
/// -87, below 1e-6 on [-10, 0], tested). Written without calls so that the row
/// loop vectorises; libm's scalar `expf` was 9% of a training step.
#[inline(always)]
pub(crate) fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C: [f32; 8] = [
        1.0,
        std::f32::consts::LN_2,
        0.240_226_5,
        0.055_504_11,
        0.009_618_129,
        0.001_333_355_8,
        0.000_154_035_3,
        0.000_015_252_734,
    ];
    let y = x.max(-87.0) * LOG2E;
    let (f, two_n) = crate::kernels::split_exp2(y);
    let p = C[0] + f * (C[1] + f * (C[2] + f * (C[3] + f * (C[4] + f * (C[5] + f * (C[6] + f * C[7]))))));
    two_n * p
}

/// The largest value of `x` (NaN-free scores), by 16 independent maxima so that the loop vectorises;
/// the result is the same as a serial maximum's (the maximum does not depend on the order).
#[inline(always)]
fn max_f32(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, y) in acc.iter_mut().zip(c) {
            *a = if *y > *a { *y } else { *a };
        }
    }
    chunks.remainder().iter().chain(&acc).fold(f32::NEG_INFINITY, |m, y| if *y > m { *y } else { m })
}

crate::kernels::multiversion! {
    fn softmax_rows(p: &mut [f32], tk: usize, scale: f32) {
        for row in p.chunks_exact_mut(tk) {
            let mx = max_f32(row);
            for s in row.iter_mut() {
                *s = exp_nonpos((*s - mx) * scale);
            }
            // 16 partial sums (vectorised; a serial sum was a scalar loop of dependent adds).
            let sum = sum_f32(row);
            let inv = 1.0 / sum;
            for s in row.iter_mut() {
                *s *= inv;
            }
        }
    }
}

crate::kernels::multiversion! {
    fn score_grad_rows(p: &[f32], dp: &mut [f32], g: &[f32], o: &[f32], tk: usize, d: usize, scale: f32) {
        // dS = P (dP - D) s, D_r = sum_c dO_rc O_rc (a serial sum).
        for ((pr, dpr), (gr, or)) in p.chunks_exact(tk).zip(dp.chunks_exact_mut(tk)).zip(g.chunks_exact(d).zip(o.chunks_exact(d))) {
            let dr: f32 = gr.iter().zip(or).map(|(a, b)| a * b).sum();
            for (x, &pp) in dpr.iter_mut().zip(pr) {
                *x = pp * (*x - dr) * scale;
            }
        }
    }
}

/// Scores of one item, then the row softmax in place: `p` (tq x tk). The row loops run on the
/// kernels' instruction set `path` ([`crate::kernels::multiversion`]; the same bits on each).
fn probabilities(path: Path, mm: MatmulPrecision, q: &[f32], k: &[f32], dm: &Dims, scale: f32, p: &mut [f32]) {
    mm.matmul(dm.tq, dm.tk, dm.d, q, false, k, true, p, false);
    softmax_rows(path, p, dm.tk, scale);
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "train-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = dims(lq.dims(), lk.dims(), lv.dims())?;
        let (q, k, v) = (slice(sq, lq, "attention q")?, slice(sk, lk, "attention k")?, slice(sv, lv, "attention v")?);
        let (qs, ks) = (dm.tq * dm.d, dm.tk * dm.d);
        let (path, mm) = (crate::kernels::path(), super::products());
        let mut out = vec![0f32; dm.items * qs];
        out.par_chunks_mut(qs).enumerate().for_each(|(i, o)| {
            with_scratch(dm.tq * dm.tk, |p, _| {
                probabilities(path, mm, &q[i * qs..][..qs], &k[i * ks..][..ks], &dm, self.scale, p);
                mm.matmul(dm.tq, dm.d, dm.tk, p, false, &v[i * ks..][..ks], false, o, false);
            })
        });
        Ok((CpuStorage::F32(out), lq.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = dims(q.dims(), k.dims(), v.dims())?;
        let (qs, ks) = (dm.tq * dm.d, dm.tk * dm.d);
        let mut dq = vec![0f32; dm.items * qs];
        let mut dk = vec![0f32; dm.items * ks];
        let mut dv = vec![0f32; dm.items * ks];
        let (scale, path, mm) = (self.scale, crate::kernels::path(), super::products());
        with_f32(&q.detach(), |q| {
            with_f32(&k.detach(), |k| {
                with_f32(&v.detach(), |v| {
                    with_f32(&res.detach(), |o| {
                        with_f32(&grad.detach(), |g| {
                            dq.par_chunks_mut(qs)
                                .zip(dk.par_chunks_mut(ks))
                                .zip(dv.par_chunks_mut(ks))
                                .enumerate()
                                .for_each(|(i, ((dqi, dki), dvi))| {
                                    let (qi, ki, vi) = (&q[i * qs..][..qs], &k[i * ks..][..ks], &v[i * ks..][..ks]);
                                    let (oi, gi) = (&o[i * qs..][..qs], &g[i * qs..][..qs]);
                                    with_scratch(dm.tq * dm.tk, |p, dp| {
                                        probabilities(path, mm, qi, ki, &dm, scale, p);
                                        // dV = P^T dO
                                        mm.matmul(dm.tk, dm.d, dm.tq, p, true, gi, false, dvi, false);
                                        // dP = dO V^T
                                        mm.matmul(dm.tq, dm.tk, dm.d, gi, false, vi, true, dp, false);
                                        score_grad_rows(path, p, dp, gi, oi, dm.tk, dm.d, scale);
                                        // dQ = dS K, dK = dS^T Q
                                        mm.matmul(dm.tq, dm.d, dm.tk, dp, false, ki, false, dqi, false);
                                        mm.matmul(dm.tk, dm.d, dm.tq, dp, true, qi, false, dki, false);
                                    })
                                });
                        })
                    })
                })
            })
        })?????;
        let shape_q = q.dims().to_vec();
        let shape_k = k.dims().to_vec();
        Ok((Some(tensor(dq, &shape_q)?), Some(tensor(dk, &shape_k)?), Some(tensor(dv, &shape_k)?)))
    }
}

/// `softmax(q k^T / sqrt(d)) v` for f32 CPU tensors q (N, H, Tq, d), k and v (N, H, Tk, d), as one
/// op with the backward described in the module docs.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let d = q.dim(3)?;
    let op = Attention { scale: 1.0 / (d as f32).sqrt() };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// The same from differentiable candle primitives (the path before the fused op).
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(3)? as f64).sqrt();
    let s = (q.contiguous()?.matmul(&k.contiguous()?.t()?)? * scale)?;
    softmax_differentiable(&s)?.matmul(&v.contiguous()?)
}

/// Softmax over the last dimension from differentiable primitives (the row maximum is a constant
/// shift, so it is detached): candle's fused softmax has no backward pass.
pub fn softmax_differentiable(s: &Tensor) -> Result<Tensor> {
    let max = s.max_keepdim(candle_core::D::Minus1)?.detach();
    let e = s.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?)
}
