//! Fused element-wise CPU kernels of the DiT layer, for inference.
//!
//! Each replaces a chain of candle ops that makes one pass over memory and one fresh allocation
//! per op (the profile of one small-config denoiser call on one core: ~13 % in libm's `tanhf`
//! for GELU, ~15 % in page faults of fresh buffers, ~8 % in candle's broadcast maps):
//!
//! * [`layer_norm_affine`]: LayerNorm over the last dimension followed by `* w + b` (the adaLN
//!   modulation `* (1 + scale) + shift`, an affine LayerNorm, or neither), one pass per row;
//! * [`heads`]: one third of a fused QKV projection, plus its bias, cut into heads and transposed
//!   to (N, H, T, d), optionally with the per-head QK LayerNorm (affine) and the interleaved 2-D
//!   RoPE rotation applied on the way;
//! * [`bias_gelu`]: the MLP's bias and tanh-GELU, with a polynomial `exp2` instead of `tanhf`;
//! * [`add_bias_residual`]: `x + (y + b)`, the residual add of a projection with its bias.
//!
//! They take contiguous CPU tensors (f32, bf16 or f16; statistics and arithmetic in f32, one
//! rounding to the output dtype) and have no backward pass: `model::ops` calls them only for
//! CPU tensors outside an autograd graph and uses the plain candle ops otherwise (training, other
//! devices). The tests compare each with that plain path on every kernel path the machine runs.
//! Loops are written so that the compiler vectorises them; on x86-64 the row functions are
//! compiled three times (AVX-512, AVX2 + FMA, baseline) and picked by [`super::path`]; on aarch64
//! the baseline is NEON.

use candle_core::{DType, Result, Tensor};

use super::{Elem, exp2_portable, par_filled, sum_f32, vec_f32, with_slice};
use half::{bf16, f16};
use std::mem::MaybeUninit;

/// Rows per parallel task of the row-wise kernels.
const ROWS_PER_TASK: usize = 64;

macro_rules! dispatch_dtype {
    ($t:expr, $f:ident ( $($arg:expr),* )) => {
        match $t.dtype() {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            dt => candle_core::bail!("fused kernel: unsupported dtype {dt:?}"),
        }
    };
}

// ---------------------------------------------------------------------------------------------
// LayerNorm + affine

/// LayerNorm over the last dimension (no affine, statistics in f32 two-pass: mean, then the mean
/// of squared deviations) followed by `* w + b` per channel when given: `w = 1 + scale, b = shift`
/// is the adaLN modulation. `x` is any shape (..., D), contiguous or not; the result is
/// contiguous, of `x`'s dtype.
pub fn layer_norm_affine(x: &Tensor, w: Option<&Tensor>, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let dm = x.dim(candle_core::D::Minus1)?;
    let w = w.map(vec_f32).transpose()?;
    let b = b.map(vec_f32).transpose()?;
    for v in [&w, &b].into_iter().flatten() {
        if v.len() != dm {
            candle_core::bail!("layer_norm_affine: parameter of {} values for width {dm}", v.len())
        }
    }
    let x = x.contiguous()?;
    let out = dispatch_dtype!(x, ln_run(&x, dm, w.as_deref(), b.as_deref(), eps as f32))?;
    out.reshape(x.shape())
}

fn ln_run<T: Elem>(x: &Tensor, dm: usize, w: Option<&[f32]>, b: Option<&[f32]>, eps: f32) -> Result<Tensor> {
    let path = super::path();
    let out = with_slice::<T, _>(x, |src| {
        let task = dm * ROWS_PER_TASK;
        // SAFETY: `src` is whole rows of `dm` (the caller's last dimension), so each chunk is whole
        // rows, and `ln_row` writes each value of its row (one per value of `row`, of length `dm`).
        unsafe {
            par_filled(src.len(), task, |i, o| {
                let mut row = vec![0f32; dm];
                for (orow, srow) in o.chunks_exact_mut(dm).zip(src[i * task..].chunks_exact(dm)) {
                    ln_row::<T>(path, srow, orow, &mut row, w, b, eps);
                }
            })
        }
    })?;
    Tensor::from_vec(out, x.elem_count(), x.device())
}

multiversion! {
    fn ln_row<T>(src: &[T], out: &mut [MaybeUninit<T>], row: &mut [f32], w: Option<&[f32]>, b: Option<&[f32]>, eps: f32) {
        let n = row.len() as f32;
        for (r, s) in row.iter_mut().zip(src) {
            *r = s.to_f32();
        }
        let mean = sum_f32(row) / n;
        for r in row.iter_mut() {
            *r -= mean;
        }
        let mut acc = [0f32; 16];
        let mut chunks = row.chunks_exact(16);
        for c in &mut chunks {
            for (a, y) in acc.iter_mut().zip(c) {
                *a += y * y;
            }
        }
        let var = (acc.iter().sum::<f32>() + chunks.remainder().iter().map(|y| y * y).sum::<f32>()) / n;
        let rstd = 1.0 / (var + eps).sqrt();
        match (w, b) {
            (Some(w), Some(b)) => {
                for (((o, r), w), b) in out.iter_mut().zip(row.iter()).zip(w).zip(b) {
                    o.write(T::from_f32(r * rstd * w + b));
                }
            }
            (Some(w), None) => {
                for ((o, r), w) in out.iter_mut().zip(row.iter()).zip(w) {
                    o.write(T::from_f32(r * rstd * w));
                }
            }
            (None, Some(b)) => {
                for ((o, r), b) in out.iter_mut().zip(row.iter()).zip(b) {
                    o.write(T::from_f32(r * rstd + b));
                }
            }
            (None, None) => {
                for (o, r) in out.iter_mut().zip(row.iter()) {
                    o.write(T::from_f32(r * rstd));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// QKV split, QK-norm, RoPE

/// The per-head LayerNorm and RoPE tables that [`heads`] applies to queries and keys.
pub struct NormRope<'a> {
    /// LayerNorm weight (d).
    pub weight: &'a Tensor,
    /// LayerNorm bias (d).
    pub bias: &'a Tensor,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// RoPE cosines, (N or 1, 1, T, d) f32, contiguous.
    pub cos: &'a Tensor,
    /// RoPE sines, like `cos`.
    pub sin: &'a Tensor,
}

/// Part `part` (0, 1, 2 = Q, K, V) of a fused QKV projection `qkv` (N, T, 3 H d) without its
/// bias, plus `bias` (3 H d), as heads (N, H, T, d) in `out_dtype`; with `nr`, each head vector
/// is LayerNorm-ed (affine) and then rotated: `t'[2k] = t[2k] cos[2k] - t[2k+1] sin[2k]`,
/// `t'[2k+1] = t[2k+1] cos[2k+1] + t[2k] sin[2k+1]`.
pub fn heads(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    part: usize,
    h: usize,
    d: usize,
    nr: Option<&NormRope<'_>>,
    out_dtype: DType,
) -> Result<Tensor> {
    let (n, t, w3) = qkv.dims3()?;
    if w3 != 3 * h * d || part > 2 {
        candle_core::bail!("heads: qkv width {w3} is not 3 x {h} x {d} (part {part})")
    }
    let bias = match bias {
        Some(b) => vec_f32(&b.narrow(0, part * h * d, h * d)?)?,
        None => vec![0f32; h * d],
    };
    // The norm parameters and RoPE tables as f32 values: (weight, bias, eps, cos, sin, per batch).
    let tables = match nr {
        Some(nr) => {
            let (w, b) = (vec_f32(nr.weight)?, vec_f32(nr.bias)?);
            let (cn, _, ct, cd) = nr.cos.dims4()?;
            if (ct, cd) != (t, d)
                || !(cn == n || cn == 1)
                || nr.sin.dims4()? != (cn, 1, ct, cd)
                || w.len() != d
                || !d.is_multiple_of(2)
            {
                candle_core::bail!(
                    "heads: RoPE tables {:?} / norm {} do not fit ({n}, {t}, {d})",
                    nr.cos.dims(),
                    w.len()
                )
            }
            Some((w, b, nr.eps as f32, vec_f32(nr.cos)?, vec_f32(nr.sin)?, cn == n && n > 1))
        }
        None => None,
    };
    let nr = tables.as_ref().map(|(w, b, eps, cos, sin, per_batch)| RowNormRope {
        w,
        b,
        eps: *eps,
        cos,
        sin,
        per_batch: *per_batch,
    });
    let qkv = qkv.contiguous()?;
    let shape = Shape4 { n, t, h, d, part };
    dispatch_dtype!(qkv, heads_run(&qkv, shape, &bias, nr.as_ref(), out_dtype))
}

#[derive(Clone, Copy)]
struct Shape4 {
    n: usize,
    t: usize,
    h: usize,
    d: usize,
    part: usize,
}

struct RowNormRope<'a> {
    w: &'a [f32],
    b: &'a [f32],
    eps: f32,
    cos: &'a [f32],
    sin: &'a [f32],
    per_batch: bool,
}

fn heads_run<T: Elem>(
    qkv: &Tensor,
    s: Shape4,
    bias: &[f32],
    nr: Option<&RowNormRope<'_>>,
    out_dtype: DType,
) -> Result<Tensor> {
    let Shape4 { n, t, h, d, part } = s;
    let dm = h * d;
    let path = super::path();
    let out: Vec<f32> = with_slice::<T, _>(qkv, |src| {
        // SAFETY: chunk `nh` is the (t, d) values of one (batch, head) pair, written row by row:
        // `plain_head_row` writes each of the `d` values of its row (zipped with `d` source values),
        // `norm_rope_row` each pair (2k, 2k + 1) for k < d / 2, d being even (checked in `heads`).
        unsafe {
            par_filled(n * h * t * d, t * d, |nh, o| {
                let (ni, hi) = (nh / h, nh % h);
                let b = &bias[hi * d..(hi + 1) * d];
                let mut tmp = vec![0f32; d];
                for ti in 0..t {
                    let base = (ni * t + ti) * 3 * dm + part * dm + hi * d;
                    let orow = &mut o[ti * d..(ti + 1) * d];
                    match nr {
                        None => plain_head_row::<T>(path, &src[base..base + d], b, orow),
                        Some(nr) => {
                            let tb = if nr.per_batch { ni * t + ti } else { ti } * d;
                            let tabs = (&nr.cos[tb..tb + d], &nr.sin[tb..tb + d]);
                            norm_rope_row::<T>(
                                path,
                                &src[base..base + d],
                                b,
                                nr.w,
                                nr.b,
                                nr.eps,
                                tabs.0,
                                tabs.1,
                                &mut tmp,
                                orow,
                            );
                        }
                    }
                }
            })
        }
    })?;
    Tensor::from_vec(out, (n, h, t, d), qkv.device())?.to_dtype(out_dtype)
}

multiversion! {
    fn plain_head_row<T>(src: &[T], bias: &[f32], out: &mut [MaybeUninit<f32>]) {
        for ((o, s), b) in out.iter_mut().zip(src).zip(bias) {
            o.write(s.to_f32() + b);
        }
    }
}

multiversion! {
    fn norm_rope_row<T>(
        src: &[T],
        bias: &[f32],
        w: &[f32],
        b: &[f32],
        eps: f32,
        cos: &[f32],
        sin: &[f32],
        tmp: &mut [f32],
        out: &mut [MaybeUninit<f32>]
    ) {
        let n = tmp.len() as f32;
        for ((r, s), bb) in tmp.iter_mut().zip(src).zip(bias) {
            *r = s.to_f32() + bb;
        }
        let mean = sum_f32(tmp) / n;
        let mut var = 0f32;
        for r in tmp.iter_mut() {
            *r -= mean;
            var += *r * *r;
        }
        let rstd = 1.0 / (var / n + eps).sqrt();
        for ((r, w), b) in tmp.iter_mut().zip(w).zip(b) {
            *r = *r * rstd * w + b;
        }
        for k in 0..tmp.len() / 2 {
            let (x0, x1) = (tmp[2 * k], tmp[2 * k + 1]);
            out[2 * k].write(x0 * cos[2 * k] + -x1 * sin[2 * k]);
            out[2 * k + 1].write(x1 * cos[2 * k + 1] + x0 * sin[2 * k + 1]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bias + GELU, bias + residual

/// `gelu_tanh(y + b)` with `b` broadcast over the rows of `y` (..., F) (`b = None`: no bias),
/// computed as `v sigmoid(2 u)`, `u = sqrt(2 / pi) (v + 0.044715 v^3)` (equal to
/// `0.5 v (1 + tanh u)`), with the exponential from a degree-6 polynomial `exp2`.
pub fn bias_gelu(y: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let f = y.dim(candle_core::D::Minus1)?;
    let b = match b {
        Some(b) => vec_f32(b)?,
        None => vec![0f32; f],
    };
    if b.len() != f {
        candle_core::bail!("bias_gelu: bias of {} values for width {f}", b.len())
    }
    let y = y.contiguous()?;
    dispatch_dtype!(y, gelu_run(&y, &b))?.reshape(y.shape())
}

fn gelu_run<T: Elem>(y: &Tensor, b: &[f32]) -> Result<Tensor> {
    let f = b.len();
    let path = super::path();
    let out = with_slice::<T, _>(y, |src| {
        let task = f * 16;
        // SAFETY: `src` is whole rows of `f` (the last dimension), so each chunk is whole rows, and
        // `gelu_row` writes each value of its row (zipped with the `f` values of `b`).
        unsafe {
            par_filled(src.len(), task, |i, o| {
                for (orow, srow) in o.chunks_exact_mut(f).zip(src[i * task..].chunks_exact(f)) {
                    gelu_row::<T>(path, srow, b, orow);
                }
            })
        }
    })?;
    Tensor::from_vec(out, y.elem_count(), y.device())
}

/// `sqrt(2 / pi)`.
pub(crate) const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic coefficient of the tanh GELU.
pub(crate) const GELU_CUBIC: f32 = 0.044_715;

/// `sigmoid(2u) = num / den` for the tanh GELU `v sigmoid(2u)` (`= 0.5 v (1 + tanh u)`),
/// `u = sqrt(2 / pi) (v + 0.044715 v^3)`: with `e = exp(-|2u|) <= 1` (a degree-6 polynomial `exp2`,
/// no call, so that row loops vectorise), `num` is 1 for `u >= 0` and `e` otherwise, `den = 1 + e`.
#[inline(always)]
pub(crate) fn gelu_sigmoid(v: f32) -> (f32, f32) {
    let two_u = 2.0 * SQRT_2_OVER_PI * (v + GELU_CUBIC * v * v * v);
    let e = exp2_portable(-two_u.abs() * std::f32::consts::LOG2_E);
    let num = if two_u >= 0.0 { 1.0 } else { e };
    (num, 1.0 + e)
}

multiversion! {
    fn gelu_row<T>(src: &[T], bias: &[f32], out: &mut [MaybeUninit<T>]) {
        for ((o, s), b) in out.iter_mut().zip(src).zip(bias) {
            let v = s.to_f32() + b;
            let (num, den) = gelu_sigmoid(v);
            o.write(T::from_f32(v * num / den));
        }
    }
}

/// `x + (y + b)` with `b` (F) broadcast over the rows of `y` (..., F), `x` of `y`'s shape: the
/// residual add of a projection `y` whose bias was not added yet. Same rounding as the two candle
/// adds in f32.
pub fn add_bias_residual(x: &Tensor, y: &Tensor, b: &Tensor) -> Result<Tensor> {
    if x.dims() != y.dims() || x.dtype() != y.dtype() {
        candle_core::bail!("add_bias_residual: {:?} {:?} vs {:?} {:?}", x.dims(), x.dtype(), y.dims(), y.dtype())
    }
    let b = vec_f32(b)?;
    if b.len() != y.dim(candle_core::D::Minus1)? {
        candle_core::bail!("add_bias_residual: bias of {} values for {:?}", b.len(), y.dims())
    }
    let (x, y) = (x.contiguous()?, y.contiguous()?);
    dispatch_dtype!(y, residual_run(&x, &y, &b))?.reshape(y.shape())
}

fn residual_run<T: Elem>(x: &Tensor, y: &Tensor, b: &[f32]) -> Result<Tensor> {
    let f = b.len();
    let path = super::path();
    let out = with_slice::<T, _>(x, |xs| {
        with_slice::<T, _>(y, |ys| {
            let task = f * ROWS_PER_TASK;
            // SAFETY: `x` and `y` are whole rows of `f` of the same shape, so each chunk is whole rows,
            // and `residual_row` writes each value of its row (zipped with the `f` values of `b`).
            unsafe {
                par_filled(ys.len(), task, |i, o| {
                    let rows =
                        o.chunks_exact_mut(f).zip(xs[i * task..].chunks_exact(f)).zip(ys[i * task..].chunks_exact(f));
                    for ((orow, xrow), yrow) in rows {
                        residual_row::<T>(path, xrow, yrow, b, orow);
                    }
                })
            }
        })
    })??;
    Tensor::from_vec(out, y.elem_count(), y.device())
}

multiversion! {
    fn residual_row<T>(x: &[T], y: &[T], b: &[f32], out: &mut [MaybeUninit<T>]) {
        for (((o, x), y), b) in out.iter_mut().zip(x).zip(y).zip(b) {
            // Rounded like candle: y + b to T, then x + that to T.
            let yb = T::from_f32(y.to_f32() + b).to_f32();
            o.write(T::from_f32(x.to_f32() + yb));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_rand::rand;
    use crate::model::ops::{LayerNorm, layer_norm_plain, modulate};
    use crate::model::rope::apply_rope;
    use candle_core::{D, Device};

    /// Runs `case` once on every kernel path this CPU runs.
    fn on_every_path(case: fn()) {
        for path in crate::kernels::supported_paths() {
            println!("path {path}");
            crate::kernels::with_path(path, case).unwrap();
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let a = a.to_dtype(DType::F32).unwrap();
        let b = b.to_dtype(DType::F32).unwrap();
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn layer_norm_affine_matches_the_plain_ops() {
        on_every_path(layer_norm_affine_matches_the_plain_ops_on);
    }

    fn layer_norm_affine_matches_the_plain_ops_on() {
        for (dm, rows) in [(48, 7), (64, 130), (80, 3), (512, 65), (17, 5)] {
            let x = (rand(dm as u64, &[2, rows, dm], 3.0) + 0.7).unwrap();
            let shift = rand(1, &[1, 1, dm], 0.5);
            let scale = rand(2, &[1, 1, dm], 0.5);
            let plain = modulate(&layer_norm_plain(&x, 1e-6).unwrap(), &shift, &scale).unwrap();
            let w = (&scale + 1.0).unwrap();
            let fused = layer_norm_affine(&x, Some(&w), Some(&shift), 1e-6).unwrap();
            assert!(max_diff(&fused, &plain) < 2e-6, "{dm}: {}", max_diff(&fused, &plain));
            let bare = layer_norm_affine(&x, None, None, 1e-6).unwrap();
            assert!(max_diff(&bare, &layer_norm_plain(&x, 1e-6).unwrap()) < 2e-6);
            // bf16 in and out: one rounding of the f32 result.
            let xb = x.to_dtype(DType::BF16).unwrap();
            let fb = layer_norm_affine(&xb, Some(&w), Some(&shift), 1e-6).unwrap();
            assert_eq!(fb.dtype(), DType::BF16);
            let want = layer_norm_affine(&xb.to_dtype(DType::F32).unwrap(), Some(&w), Some(&shift), 1e-6).unwrap();
            assert!(max_diff(&fb, &want) <= 0.02 * 4.0, "{dm} bf16");
        }
        // Non-contiguous input.
        let x = rand(9, &[3, 64, 40], 1.0).transpose(1, 2).unwrap();
        let fused = layer_norm_affine(&x, None, None, 1e-5).unwrap();
        assert!(max_diff(&fused, &layer_norm_plain(&x, 1e-5).unwrap()) < 2e-6);
    }

    #[test]
    fn heads_match_split_norm_rope_and_transpose() {
        on_every_path(heads_match_split_norm_rope_and_transpose_on);
    }

    fn heads_match_split_norm_rope_and_transpose_on() {
        for (n, t, h, d) in [(2, 16, 2, 64), (1, 64, 4, 48), (3, 9, 2, 80)] {
            let dm = h * d;
            let qkv = rand(t as u64, &[n, t, 3 * dm], 2.0);
            let bias = rand(5, &[3 * dm], 0.3);
            let lw = (rand(6, &[d], 0.2) + 1.0).unwrap();
            let lb = rand(7, &[d], 0.1);
            let ln = LayerNorm::from_parts(lw.clone(), lb.clone(), 1e-6);
            let ang = rand(8, &[n, 1, t, d], 3.0);
            let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
            let with_bias = qkv.broadcast_add(&bias).unwrap();
            for part in 0..3 {
                let z = with_bias.narrow(D::Minus1, part * dm, dm).unwrap().reshape((n, t, h, d)).unwrap();
                let plain_v = z.transpose(1, 2).unwrap().contiguous().unwrap();
                let got = heads(&qkv, Some(&bias), part, h, d, None, DType::F32).unwrap();
                assert!(max_diff(&got, &plain_v) < 1e-6);
                let plain = apply_rope(&ln.forward_plain(&z).unwrap().transpose(1, 2).unwrap(), &cos, &sin).unwrap();
                let nr = NormRope { weight: &lw, bias: &lb, eps: 1e-6, cos: &cos, sin: &sin };
                let got = heads(&qkv, Some(&bias), part, h, d, Some(&nr), DType::F32).unwrap();
                assert!(max_diff(&got, &plain) < 4e-6, "{n} {t} {h} {d}: {}", max_diff(&got, &plain));
                // Tables shared by the batch (leading dim 1).
                let (c1, s1) = (cos.narrow(0, 0, 1).unwrap(), sin.narrow(0, 0, 1).unwrap());
                let nr1 = NormRope { weight: &lw, bias: &lb, eps: 1e-6, cos: &c1, sin: &s1 };
                let got = heads(&qkv, Some(&bias), part, h, d, Some(&nr1), DType::BF16).unwrap();
                let plain1 = apply_rope(&ln.forward_plain(&z).unwrap().transpose(1, 2).unwrap(), &c1, &s1).unwrap();
                assert_eq!(got.dtype(), DType::BF16);
                assert!(max_diff(&got, &plain1) < 0.05, "bf16");
            }
        }
    }

    #[test]
    fn bias_gelu_matches_candle_gelu() {
        on_every_path(bias_gelu_matches_candle_gelu_on);
    }

    fn bias_gelu_matches_candle_gelu_on() {
        let y = rand(3, &[5, 3, 96], 6.0);
        let b = rand(4, &[96], 1.0);
        let plain = y.broadcast_add(&b).unwrap().gelu().unwrap();
        let got = bias_gelu(&y, Some(&b)).unwrap();
        assert!(max_diff(&got, &plain) < 2e-6, "{}", max_diff(&got, &plain));
        // Far tails and zero.
        let v = Tensor::new(&[-30f32, -12.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 12.0, 30.0], &Device::Cpu).unwrap();
        let got = bias_gelu(&v, None).unwrap();
        assert!(max_diff(&got, &v.gelu().unwrap()) < 2e-6);
        let bf = bias_gelu(&y.to_dtype(DType::BF16).unwrap(), Some(&b)).unwrap();
        assert_eq!(bf.dtype(), DType::BF16);
    }

    #[test]
    fn add_bias_residual_equals_two_adds() {
        on_every_path(add_bias_residual_equals_two_adds_on);
    }

    fn add_bias_residual_equals_two_adds_on() {
        let x = rand(1, &[2, 33, 80], 2.0);
        let y = rand(2, &[2, 33, 80], 2.0);
        let b = rand(3, &[80], 1.0);
        let want = (&x + y.broadcast_add(&b).unwrap()).unwrap();
        let got = add_bias_residual(&x, &y, &b).unwrap();
        assert_eq!(max_diff(&got, &want), 0.0);
        let (xb, yb) = (x.to_dtype(DType::BF16).unwrap(), y.to_dtype(DType::BF16).unwrap());
        let bb = b.to_dtype(DType::BF16).unwrap();
        // In bf16 the expectation is the two adds, each rounded to nearest even, written out: candle's
        // own bf16 add rounds that way on x86-64, but not on aarch64 (it truncated 1.3579 to
        // 1.3515625 under qemu, where round to nearest even gives 1.359375, as PyTorch does).
        let flat = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (xs, ys, bs) = (flat(&xb), flat(&yb), flat(&bb));
        let want: Vec<f32> = (0..xs.len())
            .map(|i| {
                let yb1 = bf16::from_f32(ys[i] + bs[i % bs.len()]).to_f32();
                bf16::from_f32(xs[i] + yb1).to_f32()
            })
            .collect();
        assert_eq!(flat(&add_bias_residual(&xb, &yb, &bb).unwrap()), want);
        assert!(add_bias_residual(&x, &y.narrow(1, 0, 3).unwrap(), &b).is_err());
    }
}
