//! The tanh GELU with a hand-written backward:
//! `y = x/2 (1 + tanh u)`, `u = sqrt(2/pi) (x + 0.044715 x^3)`,
//! `dy/dx = (1 + tanh u)/2 + x/2 (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)`.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, tensor, with_f32};

const K: f32 = 0.797_884_6; // sqrt(2/pi)
const A: f32 = 0.044_715;
const CHUNK: usize = 1 << 14;

/// `tanh u` as `1 - 2 / (1 + e^{2u})`: one `exp` instead of libm's `tanhf` (which goes through
/// `expm1f`); exact at both saturations, absolute error about 1e-7.
#[inline]
fn tanh(u: f32) -> f32 {
    1.0 - 2.0 / (1.0 + (2.0 * u).exp())
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "train-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "gelu")?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| {
            for (o, &v) in o.iter_mut().zip(x) {
                *o = 0.5 * v * (1.0 + tanh(K * v * (1.0 + A * v * v)));
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let mut dx = vec![0f32; x.elem_count()];
        with_f32(&x.detach(), |x| {
            with_f32(&grad.detach(), |g| {
                dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).zip(g.par_chunks(CHUNK)).for_each(|((d, x), g)| {
                    for ((d, &v), &g) in d.iter_mut().zip(x).zip(g) {
                        let t = tanh(K * v * (1.0 + A * v * v));
                        *d = g * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * K * (1.0 + 3.0 * A * v * v));
                    }
                })
            })
        })??;
        Ok(Some(tensor(dx, x.dims())?))
    }
}

/// The tanh GELU of an f32 CPU tensor (candle's `gelu`) with the backward above.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}
