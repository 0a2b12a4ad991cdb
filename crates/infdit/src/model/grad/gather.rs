//! The UniBA key/value neighbourhood of whole-image training as one op with a hand-written
//! backward: `out[i, h, g T + t] = in[src[i][g], h, t]` for the four groups g = [self, top-left,
//! left, top] of block i ([`crate::model::blocks::WholeImageKv`]). The backward adds each output
//! group back to its source block, visiting (i, g) in ascending order for every source block, so the
//! sums do not depend on the number of threads (they replace candle's `index_select` + `cat` and their
//! `index_add` backward).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, tensor, with_f32};

struct Gather {
    /// Source block of each of the four groups, per block.
    src: Vec<[usize; 4]>,
}

fn check(dims: &[usize], blocks: usize) -> Result<(usize, usize, usize, usize)> {
    let [n, h, t, d] = dims else { candle_core::bail!("gather: expected (N, H, T, d), got {dims:?}") };
    if *n != blocks {
        candle_core::bail!("gather: {n} blocks for a neighbourhood table of {blocks}")
    }
    Ok((*n, *h, *t, *d))
}

impl CustomOp1 for Gather {
    fn name(&self) -> &'static str {
        "train-neighbourhood"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "gather")?;
        let (n, h, t, d) = check(l.dims(), self.src.len())?;
        let mut out = vec![0f32; 4 * x.len()];
        out.par_chunks_mut(4 * t * d).enumerate().for_each(|(ih, o)| {
            let (i, hh) = (ih / h, ih % h);
            for (g, dst) in o.chunks_exact_mut(t * d).enumerate() {
                let m = self.src[i][g];
                dst.copy_from_slice(&x[(m * h + hh) * t * d..][..t * d]);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, h, 4 * t, d))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, h, t, d) = check(x.dims(), self.src.len())?;
        // Users of each source block, in ascending (i, g) order.
        let mut users = vec![Vec::new(); n];
        for (i, s) in self.src.iter().enumerate() {
            for (g, &m) in s.iter().enumerate() {
                users[m].push((i, g));
            }
        }
        let mut dx = vec![0f32; x.elem_count()];
        with_f32(&grad.detach(), |gr| {
            dx.par_chunks_mut(t * d).enumerate().for_each(|(mh, dst)| {
                let (m, hh) = (mh / h, mh % h);
                for &(i, g) in &users[m] {
                    let src = &gr[((i * h + hh) * 4 + g) * t * d..][..t * d];
                    for (a, b) in dst.iter_mut().zip(src) {
                        *a += b;
                    }
                }
            })
        })?;
        Ok(Some(tensor(dx, x.dims())?))
    }
}

/// `x` (N, H, T, d) f32 CPU -> (N, H, 4T, d): block i's groups are blocks `src[i]`.
pub fn gather(x: &Tensor, src: &[[usize; 4]]) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gather { src: src.to_vec() })
}

/// The same from differentiable candle primitives (`index_select` and `cat`).
pub fn gather_reference(x: &Tensor, src: &[[usize; 4]]) -> Result<Tensor> {
    let parts = (0..4)
        .map(|g| {
            let idx: Vec<u32> = src.iter().map(|s| s[g] as u32).collect();
            x.index_select(&Tensor::new(idx.as_slice(), x.device())?, 0)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 2)
}
