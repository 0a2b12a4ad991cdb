//! RoPE and the head transpose in one op with a hand-written backward.
//!
//! `z` (N, T, H, d) -> (N, H, T, d) rotated: for each channel pair (2k, 2k+1),
//! `o[2k] = z[2k] cos[2k] - z[2k+1] sin[2k]`, `o[2k+1] = z[2k+1] cos[2k+1] + z[2k] sin[2k+1]`
//! ([`crate::model::rope::apply_rope`]). The backward is the transposed map:
//! `dz[2k] = g[2k] cos[2k] + g[2k+1] sin[2k+1]`, `dz[2k+1] = g[2k+1] cos[2k+1] - g[2k] sin[2k]`.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, tensor, with_f32};

struct HeadsRope {
    /// (N or 1, T, d) each.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl HeadsRope {
    /// cos/sin offset of batch entry `b` (the tables broadcast over N when they hold one entry).
    fn table(&self, b: usize, t: usize, d: usize) -> usize {
        if self.cos.len() == t * d { 0 } else { b * t * d }
    }
}

fn check(dims: &[usize], tables: usize) -> Result<(usize, usize, usize, usize)> {
    let [n, t, h, d] = dims else { candle_core::bail!("heads_rope: expected (N, T, H, d), got {dims:?}") };
    let (n, t, h, d) = (*n, *t, *h, *d);
    if d % 2 != 0 || (tables != t * d && tables != n * t * d) {
        candle_core::bail!("heads_rope: tables of {tables} values for (N, T, H, d) = {dims:?}")
    }
    Ok((n, t, h, d))
}

impl CustomOp1 for HeadsRope {
    fn name(&self) -> &'static str {
        "train-heads-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let z = slice(s, l, "heads_rope")?;
        let (n, t, h, d) = check(l.dims(), self.cos.len())?;
        let mut out = vec![0f32; z.len()];
        // One (batch, head) item per task: (T, d) of output.
        out.par_chunks_mut(t * d).enumerate().for_each(|(i, o)| {
            let (b, hh) = (i / h, i % h);
            let base = self.table(b, t, d);
            for ti in 0..t {
                let src = &z[((b * t + ti) * h + hh) * d..][..d];
                let (c, s) = (&self.cos[base + ti * d..][..d], &self.sin[base + ti * d..][..d]);
                let dst = &mut o[ti * d..][..d];
                for k in (0..d).step_by(2) {
                    dst[k] = src[k] * c[k] - src[k + 1] * s[k];
                    dst[k + 1] = src[k + 1] * c[k + 1] + src[k] * s[k + 1];
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, h, t, d))))
    }

    fn bwd(&self, z: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, t, h, d) = check(z.dims(), self.cos.len())?;
        let mut dz = vec![0f32; z.elem_count()];
        with_f32(&grad.detach(), |g| {
            // One (batch, token) row of dz per task: (H, d).
            dz.par_chunks_mut(h * d).enumerate().for_each(|(i, dst)| {
                let (b, ti) = (i / t, i % t);
                let base = self.table(b, t, d) + ti * d;
                let (c, s) = (&self.cos[base..][..d], &self.sin[base..][..d]);
                for hh in 0..h {
                    let gi = &g[((b * h + hh) * t + ti) * d..][..d];
                    let o = &mut dst[hh * d..][..d];
                    for k in (0..d).step_by(2) {
                        o[k] = gi[k] * c[k] + gi[k + 1] * s[k + 1];
                        o[k + 1] = gi[k + 1] * c[k + 1] - gi[k] * s[k];
                    }
                }
            })
        })?;
        let _ = n;
        Ok(Some(tensor(dz, z.dims())?))
    }
}

/// `z` (N, T, H, d) f32 CPU -> (N, H, T, d) with RoPE applied; `cos`/`sin` hold (N, T, d) or (T, d)
/// values (any shape with that many elements, e.g. (N, 1, T, d)).
pub fn heads_rope(z: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let cos = cos.flatten_all()?.to_vec1::<f32>()?;
    let sin = sin.flatten_all()?.to_vec1::<f32>()?;
    z.contiguous()?.apply_op1(HeadsRope { cos, sin })
}

/// The same from differentiable candle primitives.
pub fn heads_rope_reference(z: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    crate::model::rope::apply_rope(&z.transpose(1, 2)?, cos, sin)
}
