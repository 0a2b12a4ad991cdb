//! Fused CPU attention: `softmax(q k^T * scale) v` without materialising the score matrix.
//!
//! [`fused_attention`] is a flash-attention style kernel for candle CPU tensors. Work is split
//! over (batch * head, query tile of 48 rows) with rayon; per head, K and V are first converted to
//! f32 and packed once (any input strides; f32, bf16 or f16). Each task streams the keys in tiles
//! of 384: score tile `S = Q_tile K_tile^T`, online softmax (running row max, running row sum,
//! rescaled output accumulator), `O += P V_tile`; only a `rows x 384` score buffer ever exists.
//!
//! The kernel path ([`super::path`], read once per call on the calling thread) picks one of
//! four back ends sharing that structure:
//! * AVX-512 (`avx512` path, head dims up to 128; above, the AVX2 tile) in `avx512.rs`:
//!   register-blocked micro-kernels for both products (K packed in 16-key panels, up to 24 zmm
//!   accumulators), a polynomial `exp2` (degree-6 minimax, within 1 ulp; a test measures 0.64),
//!   and a lazy running max: after the first key tile a row's exponentials are taken against its
//!   stored max unless a new score exceeds it by a factor over 2^32 (then that row's scores are
//!   recomputed and the accumulator rescaled), which takes the max out of the hot loop.
//!   With bf16 inputs on a CPU that has AVX-512 BF16 (see [`super::cpu_has_bf16_dot`]) both
//!   products run on `vdpbf16ps` instead (32 multiply-adds an instruction, sums in f32): q, k and
//!   v are packed as bf16 pairs, the scale is applied to the f32 scores, and P is rounded to bf16
//!   for the second product (as PyTorch's CPU flash attention does); the softmax stays in f32.
//! * AVX2 + FMA (`avx2` path) and NEON (`neon` path) in `lanes.rs`: one tile written over the
//!   vector primitives of [`super::simd`] (8 or 4 lanes): K packed in panels of one vector of
//!   keys, register-blocked score and `P V` micro-kernels, the same polynomial `exp2`, and the
//!   same lazy running max.
//! * Portable (`portable` path) in `portable.rs`: the `gemm` crate for both products (single
//!   threaded inside; rayon is outside) and a vectorisable scalar `exp2` of the same polynomial.
//!
//! Accuracy: scores are in the log2 domain (q pre-multiplied by `scale * log2(e)`); every product
//! and sum is in f32. Against an f64 evaluation the max abs error is 2e-7 to 5e-7 for outputs of
//! magnitude up to ~1, the same as [`attention_reference`]'s; fused vs reference differ by at most
//! ~1.1e-6 for d <= 80 and ~1.9e-6 for d = 96..144 (the tests print both). The bf16 dot-product
//! path adds the rounding of P (relative 2^-9 a weight, at most 2^-9 max |v| on the output).
//!
//! Speed (one core of the AMD EPYC dev machine, AVX-512, peak ~117 GFLOP/s by an FMA loop):
//! ~93 GFLOP/s at d = 32 and ~100 at d = 48..80 for Tq = 1024, Tk = 2304..4096, against 11-25 for
//! the reference; both cores: ~189 GFLOP/s at d = 32, and with bf16 inputs on the dot product
//! ~290 at d = 32 and ~350 at d = 64..80. `cargo bench -p infdit --bench attention` measures them.

use candle_core::{DType, Result, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::{Elem, Path};
use pack::{AlignedBuf, QUERY_TILE, QUERY_TILE_PORTABLE, View, pack_k_panels, pack_q, pack_rows, round_up};

#[cfg(target_arch = "x86_64")]
mod avx512;
mod lanes;
mod pack;
mod portable;

/// `softmax(q k^T * scale) v` for q (N, H, Tq, d), k and v (N, H, Tk, d) with any strides.
///
/// f32, bf16 and f16 inputs are supported (all three tensors of one dtype); the computation is in
/// f32 and the result, contiguous (N, H, Tq, d), has the input dtype. On a non-CPU device this
/// falls back to [`attention_reference`].
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    fused_attention_impl(q, k, v, scale, Backend::Auto)
}

/// The plain reference: matmul, `softmax_last_dim`, matmul, computed in f32 and returned in the
/// input dtype.
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let dtype = q.dtype();
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    let k = k.to_dtype(DType::F32)?.contiguous()?;
    let v = v.to_dtype(DType::F32)?.contiguous()?;
    let s = (q.matmul(&k.t()?)? * scale)?;
    let p = candle_nn::ops::softmax_last_dim(&s)?;
    p.matmul(&v)?.to_dtype(dtype)
}

/// Which implementation [`fused_attention_impl`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[doc(hidden)]
pub enum Backend {
    /// The kernel path of the calling thread ([`crate::kernels::path`]).
    Auto,
    /// The `gemm`-crate implementation.
    Portable,
}

/// [`fused_attention`] with a choice of back end (for tests and benchmarks).
#[doc(hidden)]
pub fn fused_attention_impl(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, backend: Backend) -> Result<Tensor> {
    let (n, h, tq, d) = q.dims4()?;
    let (kn, kh, tk, kd) = k.dims4()?;
    if (kn, kh, kd) != (n, h, d) || v.dims4()? != (kn, kh, tk, kd) {
        candle_core::bail!("fused_attention: shape mismatch q {:?} k {:?} v {:?}", q.dims(), k.dims(), v.dims())
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        candle_core::bail!("fused_attention: dtype mismatch {:?} {:?} {:?}", q.dtype(), k.dtype(), v.dtype())
    }
    if !q.device().is_cpu() || !k.device().is_cpu() || !v.device().is_cpu() {
        return attention_reference(q, k, v, scale);
    }
    if tk == 0 {
        candle_core::bail!("fused_attention: no keys")
    }
    let dims = Dims { n, h, tq, tk, d };
    let path = if backend == Backend::Portable { Path::Portable } else { super::path() };
    match q.dtype() {
        DType::F32 => run::<f32>(q, k, v, dims, scale, path),
        DType::BF16 => run::<bf16>(q, k, v, dims, scale, path),
        DType::F16 => run::<f16>(q, k, v, dims, scale, path),
        dt => candle_core::bail!("fused_attention: unsupported dtype {dt:?}"),
    }
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    n: usize,
    h: usize,
    tq: usize,
    tk: usize,
    d: usize,
}

fn run<T: Elem>(q: &Tensor, k: &Tensor, v: &Tensor, dims: Dims, scale: f64, path: Path) -> Result<Tensor> {
    let out = {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let qv = View::<T>::new(&qs, ql)?;
        let kv = View::new(&ks, kl)?;
        let vv = View::new(&vs, vl)?;
        attention_cpu(qv, kv, vv, dims, scale as f32, path)
    };
    Tensor::from_vec(out, (dims.n, dims.h, dims.tq, dims.d), q.device())
}

fn attention_cpu<T: Elem>(q: View<T>, k: View<T>, v: View<T>, dims: Dims, scale: f32, path: Path) -> Vec<T> {
    let Dims { n, h, tq, d, .. } = dims;
    let len = n * h * tq * d;
    let mut out: Vec<T> = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    fill_output(&mut out.spare_capacity_mut()[..len], &q, &k, &v, dims, scale, path);
    // SAFETY: `fill_output` wrote every one of the `len` elements (each output row is written by
    // exactly one tile; a panic would have propagated before this point).
    unsafe { out.set_len(len) };
    out
}

/// Runs the tiles of `path` (AVX-512 for head dims up to 128, above that the AVX2 tile).
fn fill_output<T: Elem>(
    out: &mut [MaybeUninit<T>],
    q: &View<T>,
    k: &View<T>,
    v: &View<T>,
    dims: Dims,
    scale: f32,
    path: Path,
) {
    let Dims { h, tq, tk, d, .. } = dims;
    // Scores are kept in the log2 domain: q is pre-multiplied by scale * log2(e).
    let qscale = scale * std::f32::consts::LOG2_E;
    let dp = round_up(d, 16);
    #[cfg(target_arch = "x86_64")]
    if path == Path::Avx512
        && let Some((mr, _)) = avx512::blocking(dp / 16)
    {
        let rows = round_up(QUERY_TILE, mr);
        // bf16 inputs on a CPU with the bf16 dot product: the products on bf16 pairs.
        let bf16_dot = T::DTYPE == DType::BF16 && super::cpu_has_bf16_dot();
        out.par_chunks_mut(tq * d).enumerate().for_each(|(b, ob)| {
            let (ni, hi) = (b / h, b % h);
            let (mut kp, mut vp) = (pack_k_panels(k, ni, hi, tk, d, dp, 16), pack_rows(v, ni, hi, tk, d, dp));
            if bf16_dot {
                (kp, vp) = (pack::bf16_pairs(&kp, 16), pack::bf16_pairs(&vp, dp));
            }
            ob.par_chunks_mut(rows * d).enumerate().for_each(|(t, o)| {
                let r0 = t * rows;
                let nr = o.len() / d;
                let (kp, vp) = (kp.as_slice(), vp.as_slice());
                if bf16_dot {
                    let qb = pack::bf16_pairs(&pack_q(q, ni, hi, r0, nr, d, dp, mr, 1.0), 1);
                    // SAFETY: the Avx512 path is only chosen where the CPU has avx512f
                    // (`Path::supported`), the bf16 dot product checked by `cpu_has_bf16_dot`.
                    unsafe { avx512::tile::<T, avx512::Bf16Dot>(qb.as_slice(), kp, vp, nr, tk, d, dp, qscale, o) };
                } else {
                    let qb = pack_q(q, ni, hi, r0, nr, d, dp, mr, qscale);
                    // SAFETY: the Avx512 path is only chosen where the CPU has avx512f.
                    unsafe { avx512::tile::<T, avx512::F32Fma>(qb.as_slice(), kp, vp, nr, tk, d, dp, 1.0, o) };
                }
            });
        });
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if (path == Path::Avx2 || path == Path::Avx512) && Path::Avx2.supported() {
        use crate::kernels::simd::avx2::LANES;
        lanes_run(out, q, k, v, dims, qscale, LANES, lanes::avx2::MR, |qb, kp, vp, nr, o| {
            // SAFETY: AVX2 and FMA are supported (checked above).
            unsafe { lanes::avx2::tile(qb, kp, vp, nr, tk, d, dp, o) }
        });
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if path == Path::Neon {
        use crate::kernels::simd::neon::LANES;
        lanes_run(out, q, k, v, dims, qscale, LANES, lanes::neon::MR, |qb, kp, vp, nr, o| {
            // SAFETY: the Neon path is only chosen where the CPU has NEON (`Path::supported`).
            unsafe { lanes::neon::tile(qb, kp, vp, nr, tk, d, dp, o) }
        });
        return;
    }
    let _ = path;
    let rows = QUERY_TILE_PORTABLE;
    out.par_chunks_mut(tq * d).enumerate().for_each(|(b, ob)| {
        let (ni, hi) = (b / h, b % h);
        let kp = pack_rows(k, ni, hi, tk, d, dp);
        let vp = pack_rows(v, ni, hi, tk, d, dp);
        ob.par_chunks_mut(rows * d).enumerate().for_each(|(t, o)| {
            let nr = o.len() / d;
            let qb = pack_q(q, ni, hi, t * rows, nr, d, dp, 1, qscale);
            portable::tile(qb.as_slice(), kp.as_slice(), vp.as_slice(), nr, tk, d, dp, o);
        });
    });
}

/// The AVX2 / NEON scheme: per head, k packed in panels of `lanes` keys and v by key (f32, head
/// dim padded to `dp` = a multiple of 16); per query tile of [`QUERY_TILE`] rows, q packed in
/// blocks of `mr` rows and handed to `tile(qb, kp, vp, rows, out)`.
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
#[allow(clippy::too_many_arguments)]
fn lanes_run<T: Elem>(
    out: &mut [MaybeUninit<T>],
    q: &View<T>,
    k: &View<T>,
    v: &View<T>,
    dims: Dims,
    qscale: f32,
    lanes: usize,
    mr: usize,
    tile: impl Fn(&[f32], &[f32], &[f32], usize, &mut [MaybeUninit<T>]) + Sync,
) {
    let Dims { h, tq, tk, d, .. } = dims;
    let dp = round_up(d, 16);
    let rows = round_up(QUERY_TILE, mr);
    out.par_chunks_mut(tq * d).enumerate().for_each(|(b, ob)| {
        let (ni, hi) = (b / h, b % h);
        let kp: AlignedBuf = pack_k_panels(k, ni, hi, tk, d, dp, lanes);
        let vp = pack_rows(v, ni, hi, tk, d, dp);
        ob.par_chunks_mut(rows * d).enumerate().for_each(|(t, o)| {
            let nr = o.len() / d;
            let qb = pack_q(q, ni, hi, t * rows, nr, d, dp, mr, qscale);
            tile(qb.as_slice(), kp.as_slice(), vp.as_slice(), nr, o);
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{cpu_has_bf16_dot, supported_paths, with_path};
    use candle_core::{Device, IndexOp};

    /// Deterministic uniform values in [-amp, amp].
    fn lcg(seed: u64, len: usize, amp: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                (2.0 * u - 1.0) * amp
            })
            .collect()
    }

    fn rand(seed: u64, shape: (usize, usize, usize, usize), amp: f32) -> Tensor {
        let len = shape.0 * shape.1 * shape.2 * shape.3;
        Tensor::from_vec(lcg(seed, len, amp), shape, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
    }

    fn qkv(n: usize, h: usize, tq: usize, tk: usize, d: usize, seed: u64) -> (Tensor, Tensor, Tensor) {
        // q amplitude 3.5 (std ~2) makes the softmax far from uniform.
        (rand(seed, (n, h, tq, d), 3.5), rand(seed + 1, (n, h, tk, d), 1.7), rand(seed + 2, (n, h, tk, d), 1.0))
    }

    fn check(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, tol: f32, what: &str) {
        let r = attention_reference(q, k, v, scale).unwrap();
        for path in supported_paths() {
            let f = with_path(path, || fused_attention(q, k, v, scale)).unwrap().unwrap();
            let diff = max_abs_diff(&f, &r);
            println!("{what} {:?} {path}: max abs diff {diff:e}", q.dims());
            assert!(diff <= tol, "{what} {path}: max abs diff {diff:e} > {tol:e}");
        }
    }

    #[test]
    fn kernels_matches_reference_f32() {
        for (i, &(n, h, tq, tk, d)) in [
            (1, 2, 1024, 4096, 32),
            (2, 1, 1024, 2304, 48),
            (1, 2, 257, 257, 32),
            (3, 2, 5, 7, 80),
            (1, 1, 70, 500, 64),
            (1, 1, 33, 40, 20),
        ]
        .iter()
        .enumerate()
        {
            let (q, k, v) = qkv(n, h, tq, tk, d, 10 * i as u64);
            check(&q, &k, &v, 1.0 / (d as f64).sqrt(), 1e-5, "f32");
        }
    }

    /// softmax(q k^T scale) v in f64 from the f32 values, (N, H, Tq, d) flattened.
    fn exact(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Vec<f64> {
        let (n, h, tq, d) = q.dims4().unwrap();
        let tk = k.dim(2).unwrap();
        let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let (q, k, v) = (f(q), f(k), f(v));
        let mut out = vec![0f64; n * h * tq * d];
        for b in 0..n * h {
            for i in 0..tq {
                let qi = &q[(b * tq + i) * d..][..d];
                let s: Vec<f64> = (0..tk)
                    .map(|j| qi.iter().zip(&k[(b * tk + j) * d..][..d]).map(|(x, y)| x * y).sum::<f64>() * scale)
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let l: f64 = p.iter().sum();
                for c in 0..d {
                    out[(b * tq + i) * d + c] = (0..tk).map(|j| p[j] * v[(b * tk + j) * d + c]).sum::<f64>() / l;
                }
            }
        }
        out
    }

    #[test]
    fn kernels_error_vs_f64() {
        for (n, h, tq, tk, d) in [(1, 2, 64, 4096, 32), (1, 1, 48, 2304, 80), (1, 2, 60, 257, 64)] {
            let (q, k, v) = qkv(n, h, tq, tk, d, 77);
            let scale = 1.0 / (d as f64).sqrt();
            let want = exact(&q, &k, &v, scale);
            let err = |t: &Tensor| {
                let t = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                t.iter().zip(&want).map(|(&a, &b)| (a as f64 - b).abs()).fold(0f64, f64::max)
            };
            let e_ref = err(&attention_reference(&q, &k, &v, scale).unwrap());
            for path in supported_paths() {
                let e_fused = err(&with_path(path, || fused_attention(&q, &k, &v, scale)).unwrap().unwrap());
                println!("{:?} max abs error vs f64: {path} {e_fused:e}, reference {e_ref:e}", (n, h, tq, tk, d));
                assert!(e_fused <= 1e-6, "{path}: {e_fused:e}");
            }
            let e_port = err(&fused_attention_impl(&q, &k, &v, scale, Backend::Portable).unwrap());
            assert!(e_port <= 1e-6, "{e_port:e}");
        }
    }

    #[test]
    fn kernels_all_head_dims() {
        for d in [16, 32, 48, 64, 80, 96, 112, 128, 144] {
            let (q, k, v) = qkv(1, 2, 100, 300, d, d as u64);
            check(&q, &k, &v, 1.0 / (d as f64).sqrt(), 1e-5, "head dim");
        }
    }

    #[test]
    fn kernels_non_contiguous() {
        let (n, h, tq, tk, d) = (2, 3, 130, 520, 64);
        // (N, T, H, d) storage viewed as (N, H, T, d), as after a head split.
        let q = rand(1, (n, tq, h, d), 3.5).transpose(1, 2).unwrap();
        let k = rand(2, (n, tk, h, d), 1.7).transpose(1, 2).unwrap();
        // v: a narrowed view with a start offset and a strided last dim.
        let v = rand(3, (n, h, tk + 3, 2 * d), 1.0).narrow(2, 3, tk).unwrap();
        let v = v.reshape((n, h, tk, d, 2)).unwrap().i((.., .., .., .., 1)).unwrap();
        assert!(!q.is_contiguous() && !k.is_contiguous() && !v.is_contiguous());
        check(&q, &k, &v, 1.0 / (d as f64).sqrt(), 1e-5, "non-contiguous");
        let f = fused_attention(&q, &k, &v, 0.125).unwrap();
        let c = fused_attention(&q.contiguous().unwrap(), &k.contiguous().unwrap(), &v.contiguous().unwrap(), 0.125)
            .unwrap();
        assert_eq!(max_abs_diff(&f, &c), 0.0);
    }

    #[test]
    fn kernels_half_inputs() {
        half_inputs(1, 4, 257, 257, 64);
        // Head dims and key counts of the models (odd keys: a bf16 pair half padding).
        half_inputs(1, 2, 100, 1023, 32);
        half_inputs(2, 1, 64, 2304, 48);
        half_inputs(1, 1, 50, 515, 80);
    }

    fn half_inputs(n: usize, h: usize, tq: usize, tk: usize, d: usize) {
        let (q, k, v) = qkv(n, h, tq, tk, d, 7);
        for dt in [DType::BF16, DType::F16] {
            let (qh, kh, vh) = (q.to_dtype(dt).unwrap(), k.to_dtype(dt).unwrap(), v.to_dtype(dt).unwrap());
            // The reference on the same (rounded) values in f32, not rounded at the end.
            let r = attention_reference(
                &qh.to_dtype(DType::F32).unwrap(),
                &kh.to_dtype(DType::F32).unwrap(),
                &vh.to_dtype(DType::F32).unwrap(),
                0.125,
            )
            .unwrap();
            for path in supported_paths() {
                let f = with_path(path, || fused_attention(&qh, &kh, &vh, 0.125)).unwrap().unwrap();
                assert_eq!(f.dtype(), dt);
                let diff = max_abs_diff(&f, &r);
                let ulp = if dt == DType::BF16 { 1.0 / 256.0 } else { 1.0 / 2048.0 };
                println!("{dt:?} {path} d {d} keys {tk}: max abs diff to the f32 reference {diff:e}");
                // Values are below 1 in magnitude: half an ulp at 1 for the output rounding, plus
                // slack; the bf16 dot product also rounds P to bf16 (relative 2^-9 a weight, so at
                // most 2^-9 max |v| = another half ulp at 1).
                let p_rounding =
                    if dt == DType::BF16 && path == Path::Avx512 && cpu_has_bf16_dot() { ulp * 0.5 } else { 0.0 };
                assert!(diff <= ulp * 0.5 + p_rounding + 1e-5, "{dt:?} {path}: {diff:e}");
            }
        }
    }

    #[test]
    fn kernels_huge_logits() {
        // scale 80: logits in the hundreds; the max of most rows is in a later key tile than the
        // first, so the running max and the rescale are exercised.
        let (q, k, v) = qkv(1, 2, 40, 1500, 32, 99);
        let r = attention_reference(&q, &k, &v, 80.0).unwrap();
        for path in supported_paths() {
            let f = with_path(path, || fused_attention(&q, &k, &v, 80.0)).unwrap().unwrap();
            let fv = f.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(fv.iter().all(|x| x.is_finite()));
            let diff = max_abs_diff(&f, &r);
            println!("huge logits {path}: max abs diff {diff:e}");
            assert!(diff <= 1e-4, "{diff:e}");
        }
        // One key with an enormous logit at the very end: the output is that key's value.
        let d = 32;
        let tk = 1000;
        let q = Tensor::ones((1, 1, 3, d), DType::F32, &Device::Cpu).unwrap();
        let mut kv = lcg(5, tk * d, 0.1);
        kv[(tk - 1) * d..].iter_mut().for_each(|x| *x = 10.0);
        let k = Tensor::from_vec(kv, (1, 1, tk, d), &Device::Cpu).unwrap();
        let v = rand(6, (1, 1, tk, d), 1.0);
        for path in supported_paths() {
            let f = with_path(path, || fused_attention(&q, &k, &v, 80.0)).unwrap().unwrap();
            let want = v.i((.., .., tk - 1..tk, ..)).unwrap().broadcast_as((1, 1, 3, d)).unwrap();
            let diff = max_abs_diff(&f, &want);
            assert!(diff <= 1e-6, "{path}: {diff:e}");
        }
    }

    #[test]
    fn kernels_shape_errors_and_empty() {
        let (q, k, v) = qkv(1, 2, 4, 5, 16, 1);
        assert!(fused_attention(&q, &k, &v.narrow(3, 0, 8).unwrap(), 1.0).is_err());
        assert!(fused_attention(&q, &k.to_dtype(DType::BF16).unwrap(), &v, 1.0).is_err());
        let e = fused_attention(&q.narrow(2, 0, 0).unwrap(), &k, &v, 1.0).unwrap();
        assert_eq!(e.dims(), &[1, 2, 0, 16]);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn kernels_exp2_accuracy() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut worst_ulp = 0f64;
        let mut x = -126.0f32;
        let mut buf = [0f32; 16];
        while x <= 0.0 {
            let xs: [f32; 16] = std::array::from_fn(|i| (x + i as f32 * 1.37e-4).min(0.0));
            // SAFETY: avx512f detected above.
            unsafe {
                use std::arch::x86_64::*;
                _mm512_storeu_ps(buf.as_mut_ptr(), avx512::exp2(_mm512_loadu_ps(xs.as_ptr())));
            }
            for (xi, yi) in xs.iter().zip(buf) {
                let exact = (*xi as f64).exp2();
                let ulp = (exact as f32).abs() as f64 * f32::EPSILON as f64;
                worst_ulp = worst_ulp.max((yi as f64 - exact).abs() / ulp);
            }
            x += 16.0 * 1.37e-4 + 0.00731;
        }
        println!("exp2 worst error {worst_ulp:.3} ulp");
        assert!(worst_ulp <= 1.0, "{worst_ulp}");
        // Very negative inputs give zero.
        // SAFETY: avx512f detected above.
        unsafe {
            use std::arch::x86_64::*;
            _mm512_storeu_ps(buf.as_mut_ptr(), avx512::exp2(_mm512_set1_ps(-1e30)));
        }
        assert!(buf.iter().all(|&y| y == 0.0));
    }
}
