//! The tanh GELU with a hand-written backward:
//! `y = x/2 (1 + tanh u) = x s`, `s = sigmoid(2u)`, `u = sqrt(2/pi) (x + 0.044715 x^3)`,
//! `dy/dx = s + 2 x s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 x^2)`. `s` as the inference kernel
//! computes it ([`crate::kernels::fused::gelu_sigmoid`], the same formula as the inference
//! kernel's); the row loops are compiled for each instruction set ([`crate::kernels::multiversion`]).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, tensor, with_f32};
use crate::kernels::fused::{GELU_CUBIC, SQRT_2_OVER_PI, gelu_sigmoid};

const CHUNK: usize = 1 << 14;

crate::kernels::multiversion! {
    fn forward_rows(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            let (num, den) = gelu_sigmoid(v);
            *o = v * num / den;
        }
    }
}

crate::kernels::multiversion! {
    fn backward_rows(x: &[f32], g: &[f32], dx: &mut [f32]) {
        for ((d, &v), &g) in dx.iter_mut().zip(x).zip(g) {
            let (num, den) = gelu_sigmoid(v);
            let s = num / den;
            *d = g * (s + 2.0 * v * s * (1.0 - s) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * v * v));
        }
    }
}

/// The GELU of each value of `x`, in parallel chunks.
pub(crate) fn values(x: &[f32]) -> Vec<f32> {
    let path = crate::kernels::path();
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| forward_rows(path, x, o));
    out
}

/// `g gelu'(x)`, in parallel chunks: the input gradient for the output gradient `g`.
pub(crate) fn input_grad(x: &[f32], g: &[f32]) -> Vec<f32> {
    let path = crate::kernels::path();
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|((d, x), g)| backward_rows(path, x, g, d));
    dx
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "train-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "gelu")?;
        Ok((CpuStorage::F32(values(x)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_f32(&x.detach(), |x| with_f32(&grad.detach(), |g| input_grad(x, g)))??;
        Ok(Some(tensor(dx, x.dims())?))
    }
}

/// The tanh GELU of an f32 CPU tensor (candle's `gelu`) with the backward above.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}
