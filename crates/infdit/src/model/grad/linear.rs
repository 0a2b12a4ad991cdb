//! A dense layer `y = x W^T + b` as one op with a hand-written backward: `dx = g W`,
//! `dW = g^T x`, `db` = the row sum of `g`.
//!
//! Through candle's autograd the same layer is five graph nodes (flatten, transpose of `W`,
//! matmul, unflatten, bias), and candle's backward gives every node's input a zero-filled gradient
//! buffer and adds into it, and takes `dW` through a transposed copy. Here the three products are
//! gemm calls on the stored layouts (no copies), in fixed row blocks spread over the rayon pool:
//! each output value is one gemm sum in a fixed order, so the result does not depend on the thread
//! count.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{gelu, slice, tensor, with_f32};
use crate::kernels::{MatmulPrecision, Strided};

/// Rows of `x` per parallel task.
const ROWS: usize = 512;
/// Rows per parallel task of the bias gradient's row sum.
const SUM_ROWS: usize = 256;
/// Rows of `dW` per parallel task.
const W_ROWS: usize = 256;

/// `x W^T (+ b)` for `x` (rows, k) and `W` (n, k), in blocks of rows.
pub(crate) fn forward(mm: MatmulPrecision, x: &[f32], w: &[f32], b: Option<&[f32]>, n: usize) -> Vec<f32> {
    let k = w.len() / n.max(1);
    let mut y = vec![0f32; x.len() / k.max(1) * n];
    if k == 0 {
        return y;
    }
    y.par_chunks_mut(ROWS * n).zip(x.par_chunks(ROWS * k)).for_each(|(y, x)| {
        let m = x.len() / k;
        mm.matmul_strided(m, n, k, Strided { v: x, rs: k, cs: 1 }, Strided { v: w, rs: 1, cs: k }, y, false);
        if let Some(b) = b {
            for row in y.chunks_exact_mut(n) {
                for (o, b) in row.iter_mut().zip(b) {
                    *o += b;
                }
            }
        }
    });
    y
}

/// `g W` for `g` (rows, n) and `W` (n, k): the input gradient (rows, k).
pub(crate) fn grad_input(mm: MatmulPrecision, g: &[f32], w: &[f32], n: usize) -> Vec<f32> {
    let k = w.len() / n.max(1);
    let mut dx = vec![0f32; g.len() / n.max(1) * k];
    if k == 0 {
        return dx;
    }
    dx.par_chunks_mut(ROWS * k).zip(g.par_chunks(ROWS * n)).for_each(|(dx, g)| {
        let m = g.len() / n;
        mm.matmul_strided(m, k, n, Strided { v: g, rs: n, cs: 1 }, Strided { v: w, rs: k, cs: 1 }, dx, false);
    });
    dx
}

/// `g^T x` for `g` (rows, n) and `x` (rows, k): the weight gradient (n, k), in blocks of its rows
/// (each value one sum over all rows).
pub(crate) fn grad_weight(mm: MatmulPrecision, g: &[f32], x: &[f32], n: usize, k: usize) -> Vec<f32> {
    let rows = g.len().checked_div(n).unwrap_or(0);
    let mut dw = vec![0f32; n * k];
    if k == 0 {
        return dw;
    }
    dw.par_chunks_mut(W_ROWS * k).enumerate().for_each(|(i, dw)| {
        let m = dw.len() / k;
        let a = Strided { v: &g[i * W_ROWS..], rs: 1, cs: n };
        mm.matmul_strided(m, k, rows, a, Strided { v: x, rs: k, cs: 1 }, dw, false);
    });
    dw
}

/// The sum of the rows of `g` (rows of `f` values): in blocks of [`SUM_ROWS`] rows, in parallel, the
/// blocks' sums then added in order (the same bits for any thread count).
fn row_sum(g: &[f32], f: usize) -> Vec<f32> {
    if f == 0 {
        return Vec::new();
    }
    let partial: Vec<Vec<f32>> = g
        .par_chunks(f * SUM_ROWS)
        .map(|g| {
            let mut acc = vec![0f32; f];
            for row in g.chunks_exact(f) {
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            acc
        })
        .collect();
    let mut db = vec![0f32; f];
    for p in &partial {
        for (d, v) in db.iter_mut().zip(p) {
            *d += v;
        }
    }
    db
}

/// Shapes of one call: `x` (..., k), `W` (n, k), optional `b` (n); returns n and the output shape.
fn check(lx: &Layout, lw: &Layout, lb: Option<&Layout>) -> Result<(usize, Shape)> {
    let (n, k) = lw.shape().dims2()?;
    let xd = lx.shape().dims();
    if xd.last() != Some(&k) {
        candle_core::bail!("linear: input {xd:?} for a weight ({n}, {k})")
    }
    if let Some(lb) = lb
        && lb.shape().dims() != [n]
    {
        candle_core::bail!("linear: bias {:?} for a weight ({n}, {k})", lb.shape().dims())
    }
    let mut out = xd.to_vec();
    *out.last_mut().expect("checked above") = n;
    Ok((n, Shape::from(out)))
}

/// The input and weight gradients of `x` (..., k), `W` (n, k) for the incoming `grad`.
fn backward(x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, k) = w.dims2()?;
    let g = grad.detach().contiguous()?;
    let (dx, dw) = with_f32(&g, |g| {
        let dx = with_f32(w, |w| grad_input(super::products(), g, w, n))?;
        let dw = with_f32(x, |x| grad_weight(super::products(), g, x, n, k))?;
        Ok::<_, candle_core::Error>((dx, dw))
    })??;
    Ok((tensor(dx, x.dims())?, tensor(dw, &[n, k])?, g))
}

struct LinearBias;

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "train-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, shape) = check(lx, lw, Some(lb))?;
        let (x, w, b) = (slice(sx, lx, "linear x")?, slice(sw, lw, "linear W")?, slice(sb, lb, "linear b")?);
        Ok((CpuStorage::F32(forward(super::products(), x, w, Some(b), n)), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, g) = backward(x, w, grad)?;
        let db = with_f32(&g, |g| row_sum(g, b.elem_count()))?;
        Ok((Some(dx), Some(dw), Some(tensor(db, b.dims())?)))
    }
}

/// `gelu(u) W^T + b`: a dense layer whose input is the tanh GELU of `u`, the GELU recomputed in
/// the backward instead of kept (`du = (g W) gelu'(u)`, `dW = g^T gelu(u)`).
struct GeluLinearBias;

impl CustomOp3 for GeluLinearBias {
    fn name(&self) -> &'static str {
        "train-gelu-linear"
    }

    fn cpu_fwd(
        &self,
        su: &CpuStorage,
        lu: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, shape) = check(lu, lw, Some(lb))?;
        let (u, w, b) =
            (slice(su, lu, "gelu_linear u")?, slice(sw, lw, "gelu_linear W")?, slice(sb, lb, "gelu_linear b")?);
        Ok((CpuStorage::F32(forward(super::products(), &gelu::values(u), w, Some(b), n)), shape))
    }

    fn bwd(
        &self,
        u: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k) = w.dims2()?;
        let g = grad.detach().contiguous()?;
        let (du, dw, db) = with_f32(&g, |g| {
            with_f32(&u.detach(), |u| {
                let da = with_f32(w, |w| grad_input(super::products(), g, w, n))?;
                let dw = grad_weight(super::products(), g, &gelu::values(u), n, k);
                Ok::<_, candle_core::Error>((gelu::input_grad(u, &da), dw, row_sum(g, n)))
            })
        })???;
        Ok((Some(tensor(du, u.dims())?), Some(tensor(dw, &[n, k])?), Some(tensor(db, b.dims())?)))
    }
}

struct LinearNoBias;

impl CustomOp2 for LinearNoBias {
    fn name(&self) -> &'static str {
        "train-linear-no-bias"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, shape) = check(lx, lw, None)?;
        let (x, w) = (slice(sx, lx, "linear x")?, slice(sw, lw, "linear W")?);
        Ok((CpuStorage::F32(forward(super::products(), x, w, None, n)), shape))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = backward(x, w, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `x W^T + b` for f32 CPU tensors `x` (..., k), `W` (n, k), `b` (n), with the backward above.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearBias),
        None => x.apply_op2(&w, LinearNoBias),
    }
}

/// `gelu(u) W^T + b` (the tanh GELU, [`super::gelu`]) for f32 CPU tensors `u` (..., k), `W` (n, k),
/// `b` (n) as one op: the MLP's activation and down projection, without the activation as a graph
/// node (its gradient buffer and the stored activation).
pub fn gelu_linear(u: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    u.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, GeluLinearBias)
}

/// [`linear`] from candle primitives (flatten, matmul with `W^T`, bias broadcast): the reference
/// it is tested against.
pub fn linear_reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let y = x.reshape((x.elem_count() / k.max(1), k))?.matmul(&w.t()?)?;
    let mut out = dims;
    if let Some(last) = out.last_mut() {
        *last = w.dim(0)?;
    }
    let y = y.reshape(out)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}
