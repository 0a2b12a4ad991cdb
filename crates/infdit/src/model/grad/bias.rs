//! A bias added to the rows of a dense layer's output, with a hand-written backward: `y = x + b`
//! with `b` (F) broadcast over the rows of `x` (..., F); `dx = g`, `db = sum over rows of g`.
//!
//! candle's `broadcast_add` gets its bias gradient from a generic strided `sum_keepdim` over the
//! broadcast dimensions, about 10 % of a training step of the built-in model in a profile; here the
//! rows are summed in row blocks, in parallel, then the blocks' sums added up in order.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, tensor, with_f32};

/// Rows per parallel task.
const ROWS: usize = 256;

struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "train-add-bias"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sb: &CpuStorage, lb: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, b) = (slice(sx, lx, "add_bias x")?, slice(sb, lb, "add_bias b")?);
        let f = b.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(f * ROWS).zip(x.par_chunks(f * ROWS)).for_each(|(o, x)| {
            for (orow, xrow) in o.chunks_exact_mut(f).zip(x.chunks_exact(f)) {
                for ((o, x), b) in orow.iter_mut().zip(xrow).zip(b) {
                    *o = x + b;
                }
            }
        });
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let f = b.elem_count();
        let db = with_f32(&grad.detach(), |g| row_sum(g, f))?;
        Ok((Some(grad.clone()), Some(tensor(db, b.dims())?)))
    }
}

/// The sum of the rows of `g` (rows of `f` values): in blocks of [`ROWS`] rows, in parallel, the
/// blocks' sums then added in order (the same bits for any thread count).
pub(crate) fn row_sum(g: &[f32], f: usize) -> Vec<f32> {
    if f == 0 {
        return Vec::new();
    }
    let partial: Vec<Vec<f32>> = g
        .par_chunks(f * ROWS)
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

/// `x + b` for an f32 CPU tensor `x` (..., F) and a bias `b` (F), with the backward above.
pub fn add_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let f = x.dim(candle_core::D::Minus1)?;
    if b.dims() != [f] {
        candle_core::bail!("add_bias: bias {:?} for rows of {f}", b.dims())
    }
    x.contiguous()?.apply_op2(&b.contiguous()?, AddBias)
}
