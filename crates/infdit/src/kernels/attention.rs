//! Fused CPU attention: `softmax(q k^T * scale) v` without materialising the score matrix.
//!
//! [`fused_attention`] is a flash-attention style kernel for candle CPU tensors. Work is split
//! over (batch * head, query tile of 48 rows) with rayon; per head, K and V are first converted to
//! f32 and packed once (any input strides; f32, bf16 or f16). Each task streams the keys in tiles
//! of 384: score tile `S = Q_tile K_tile^T`, online softmax (running row max, running row sum,
//! rescaled output accumulator), `O += P V_tile`; only a `rows x 384` score buffer ever exists.
//!
//! Two back ends share that structure:
//! * AVX-512 (chosen at run time when the CPU has `avx512f` and the head dim is at most 128):
//!   register-blocked micro-kernels for both products (K packed in 16-key panels, up to 24 zmm
//!   accumulators), a polynomial `exp2` (degree-6 minimax, within 1 ulp; a test measures 0.64),
//!   and a lazy running max: after the first key tile a row's exponentials are taken against its
//!   stored max unless a new score exceeds it by a factor over 2^32 (then that row's scores are
//!   recomputed and the accumulator rescaled), which takes the max out of the hot loop.
//!   With bf16 inputs on a CPU that has AVX-512 BF16 (see [`super::cpu_has_bf16_dot`]) both
//!   products run on `vdpbf16ps` instead (32 multiply-adds an instruction, sums in f32): q, k and
//!   v are packed as bf16 pairs, the scale is applied to the f32 scores, and P is rounded to bf16
//!   for the second product (as PyTorch's CPU flash attention does); the softmax stays in f32.
//! * Portable (other CPUs, head dims above 128): the `gemm` crate for both products (single
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

use candle_core::{DType, Layout, Result, Storage, Tensor};
use half::{bf16, f16};

use super::{EXP2_POLY, Elem, cpu_has_bf16_dot, exp2_portable, sum_f32};
use rayon::prelude::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;

/// Query rows per parallel task (rounded up to the micro-kernel's row block). Measured flat from
/// 24 to 96 rows on the hot shapes once the scratch buffers are pooled; 48 gives more tasks.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const QUERY_TILE: usize = 48;
/// Keys per tile of the online softmax (a multiple of 16). Measured flat from 256 to 1024.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const KEY_TILE: usize = 384;
/// Keys per tile on the portable path.
const KEY_TILE_PORTABLE: usize = 256;
/// Query rows per task on the portable path.
const QUERY_TILE_PORTABLE: usize = 64;

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
    /// AVX-512 when available, else portable.
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
    match q.dtype() {
        DType::F32 => run::<f32>(q, k, v, dims, scale, backend),
        DType::BF16 => run::<bf16>(q, k, v, dims, scale, backend),
        DType::F16 => run::<f16>(q, k, v, dims, scale, backend),
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

/// A strided 4-D view into CPU storage.
#[derive(Clone, Copy)]
struct View<'a, T> {
    data: &'a [T],
    offset: usize,
    stride: [usize; 4],
}

impl<'a, T: Elem> View<'a, T> {
    fn new(storage: &'a Storage, layout: &Layout) -> Result<Self> {
        let data = match storage {
            Storage::Cpu(c) => c.as_slice::<T>()?,
            _ => candle_core::bail!("fused_attention: expected CPU storage"),
        };
        let st = layout.stride();
        Ok(Self { data, offset: layout.start_offset(), stride: [st[0], st[1], st[2], st[3]] })
    }

    /// Offset of element (ni, hi, t, 0).
    #[inline(always)]
    fn row(&self, ni: usize, hi: usize, t: usize) -> usize {
        self.offset + ni * self.stride[0] + hi * self.stride[1] + t * self.stride[2]
    }
}

fn run<T: Elem>(q: &Tensor, k: &Tensor, v: &Tensor, dims: Dims, scale: f64, backend: Backend) -> Result<Tensor> {
    let out = {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let qv = View::<T>::new(&qs, ql)?;
        let kv = View::new(&ks, kl)?;
        let vv = View::new(&vs, vl)?;
        attention_cpu(qv, kv, vv, dims, scale as f32, backend)
    };
    Tensor::from_vec(out, (dims.n, dims.h, dims.tq, dims.d), q.device())
}

thread_local! {
    /// Spare buffers of this thread, reused to spare the page faults and zeroing of fresh
    /// allocations (a buffer may be returned to another thread's pool than it came from).
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// Buffers kept per thread.
const POOL_SIZE: usize = 8;
/// Larger buffers (in f32, here 16 MiB) are freed, not kept.
const MAX_POOLED: usize = 1 << 22;

/// An f32 scratch buffer whose data starts on a 64-byte boundary. Its contents are stale (from an
/// earlier use) unless it was made by [`AlignedBuf::zeros`].
struct AlignedBuf {
    buf: Vec<f32>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let need = len + 16;
        let pooled = POOL.with(|p| {
            let mut p = p.borrow_mut();
            // The smallest spare buffer that fits.
            let (i, _) = p.iter().enumerate().filter(|(_, b)| b.len() >= need).min_by_key(|(_, b)| b.len())?;
            Some(p.swap_remove(i))
        });
        let buf = pooled.unwrap_or_else(|| vec![0f32; need]);
        let start = buf.as_ptr().align_offset(64).min(15);
        Self { buf, start, len }
    }
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn zeros(len: usize) -> Self {
        let mut b = Self::new(len);
        b.as_mut_slice().fill(0.0);
        b
    }
    fn as_slice(&self) -> &[f32] {
        &self.buf[self.start..self.start + self.len]
    }
    fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.buf[self.start..self.start + self.len]
    }
    /// The buffer as 32-bit slots (for operands packed as bf16 pairs).
    fn as_mut_u32(&mut self) -> &mut [u32] {
        let s = self.as_mut_slice();
        // SAFETY: f32 and u32 have the same size and alignment, and every bit pattern is valid
        // for both.
        unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut u32, s.len()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.len() > MAX_POOLED {
            return;
        }
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_SIZE {
                p.push(buf);
            } else if let Some(small) = p.iter_mut().min_by_key(|b| b.len()) {
                // Keep the larger buffers.
                if small.len() < buf.len() {
                    *small = buf;
                }
            }
        });
    }
}

fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// Which AVX-512 configuration handles head dim padded to `16 * nv`: (row block, key panels per
/// score micro-kernel call).
#[cfg(target_arch = "x86_64")]
fn avx512_blocking(nv: usize) -> Option<(usize, usize)> {
    if !std::arch::is_x86_feature_detected!("avx512f") {
        return None;
    }
    match nv {
        1 => Some((16, 1)),
        2 => Some((12, 2)),
        3 => Some((8, 3)),
        4 => Some((6, 4)),
        5 | 6 => Some((4, 6)),
        7 | 8 => Some((3, 8)),
        _ => None,
    }
}

fn attention_cpu<T: Elem>(q: View<T>, k: View<T>, v: View<T>, dims: Dims, scale: f32, backend: Backend) -> Vec<T> {
    let Dims { n, h, tq, d, .. } = dims;
    let len = n * h * tq * d;
    let mut out: Vec<T> = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    fill_output(&mut out.spare_capacity_mut()[..len], q, k, v, dims, scale, backend);
    // SAFETY: `fill_output` wrote every one of the `len` elements (each output row is written by
    // exactly one tile; a panic would have propagated before this point).
    unsafe { out.set_len(len) };
    out
}

fn fill_output<T: Elem>(
    out: &mut [MaybeUninit<T>],
    q: View<T>,
    k: View<T>,
    v: View<T>,
    dims: Dims,
    scale: f32,
    backend: Backend,
) {
    let Dims { h, tq, tk, d, .. } = dims;
    // Scores are kept in the log2 domain: q is pre-multiplied by scale * log2(e).
    let qscale = scale * std::f32::consts::LOG2_E;
    let dp = round_up(d, 16);
    #[cfg(target_arch = "x86_64")]
    if backend == Backend::Auto
        && let Some((mr, _)) = avx512_blocking(dp / 16)
    {
        let rows = round_up(QUERY_TILE, mr);
        // bf16 inputs on a CPU with the bf16 dot product: the products on bf16 pairs.
        let bf16_dot = T::DTYPE == DType::BF16 && cpu_has_bf16_dot();
        out.par_chunks_mut(tq * d).enumerate().for_each(|(b, ob)| {
            let (ni, hi) = (b / h, b % h);
            let (mut kp, mut vp) = (pack_k_panels(&k, ni, hi, tk, d, dp), pack_rows(&v, ni, hi, tk, d, dp));
            if bf16_dot {
                (kp, vp) = (bf16_pairs(&kp, 16), bf16_pairs(&vp, dp));
            }
            ob.par_chunks_mut(rows * d).enumerate().for_each(|(t, o)| {
                let r0 = t * rows;
                let nr = o.len() / d;
                let (kp, vp) = (kp.as_slice(), vp.as_slice());
                if bf16_dot {
                    let qb = bf16_pairs(&pack_q(&q, ni, hi, r0, nr, d, dp, mr, 1.0), 1);
                    // SAFETY: avx512f was detected by `avx512_blocking`, the bf16 dot product by
                    // `bf16_gemm::available`.
                    unsafe { avx512::tile::<T, avx512::Bf16Dot>(qb.as_slice(), kp, vp, nr, tk, d, dp, qscale, o) };
                } else {
                    let qb = pack_q(&q, ni, hi, r0, nr, d, dp, mr, qscale);
                    // SAFETY: avx512f was detected by `avx512_blocking`.
                    unsafe { avx512::tile::<T, avx512::F32Fma>(qb.as_slice(), kp, vp, nr, tk, d, dp, 1.0, o) };
                }
            });
        });
        return;
    }
    let _ = backend;
    let rows = QUERY_TILE_PORTABLE;
    out.par_chunks_mut(tq * d).enumerate().for_each(|(b, ob)| {
        let (ni, hi) = (b / h, b % h);
        let kp = pack_rows(&k, ni, hi, tk, d, dp);
        let vp = pack_rows(&v, ni, hi, tk, d, dp);
        ob.par_chunks_mut(rows * d).enumerate().for_each(|(t, o)| {
            let nr = o.len() / d;
            let qb = pack_q(&q, ni, hi, t * rows, nr, d, dp, 1, qscale);
            portable_tile(qb.as_slice(), kp.as_slice(), vp.as_slice(), nr, tk, d, dp, o);
        });
    });
}

/// `dst[c] = x[row base + c * stride] * mul` for c < dst.len().
#[inline(always)]
fn read_row<T: Elem>(x: &View<T>, base: usize, dst: &mut [f32], mul: f32) {
    let (sc, d) = (x.stride[3], dst.len());
    if sc == 1 {
        for (y, s) in dst.iter_mut().zip(&x.data[base..base + d]) {
            *y = s.to_f32() * mul;
        }
    } else {
        for (c, y) in dst.iter_mut().enumerate() {
            *y = x.data[base + c * sc].to_f32() * mul;
        }
    }
}

/// Rows `r0..r0 + nr` of q for head (ni, hi) as a (round_up(nr, mr), dp) f32 matrix times `mul`,
/// zero padded.
#[allow(clippy::too_many_arguments)]
fn pack_q<T: Elem>(
    q: &View<T>,
    ni: usize,
    hi: usize,
    r0: usize,
    nr: usize,
    d: usize,
    dp: usize,
    mr: usize,
    mul: f32,
) -> AlignedBuf {
    let mut buf = AlignedBuf::new(round_up(nr, mr) * dp);
    for (r, dst) in buf.as_mut_slice().chunks_exact_mut(dp).enumerate() {
        if r < nr {
            read_row(q, q.row(ni, hi, r0 + r), &mut dst[..d], mul);
            dst[d..].fill(0.0);
        } else {
            dst.fill(0.0);
        }
    }
    buf
}

/// All `t` rows of k or v for head (ni, hi) as a (t, dp) f32 matrix, zero padded.
fn pack_rows<T: Elem>(x: &View<T>, ni: usize, hi: usize, t: usize, d: usize, dp: usize) -> AlignedBuf {
    let mut buf = AlignedBuf::new(t * dp);
    for (j, dst) in buf.as_mut_slice().chunks_exact_mut(dp).enumerate() {
        read_row(x, x.row(ni, hi, j), &mut dst[..d], 1.0);
        dst[d..].fill(0.0);
    }
    buf
}

/// k for head (ni, hi) in panels of 16 keys: `panel[p][c][l] = k[16 p + l][c]`, zero padded.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn pack_k_panels<T: Elem>(k: &View<T>, ni: usize, hi: usize, tk: usize, d: usize, dp: usize) -> AlignedBuf {
    let np = tk.div_ceil(16);
    let mut buf = AlignedBuf::new(np * dp * 16);
    let mut row = vec![0f32; d];
    for (p, panel) in buf.as_mut_slice().chunks_exact_mut(dp * 16).enumerate() {
        let valid = 16.min(tk - p * 16);
        if valid < 16 {
            panel.fill(0.0);
        } else {
            panel[d * 16..].fill(0.0);
        }
        for l in 0..valid {
            read_row(k, k.row(ni, hi, p * 16 + l), &mut row, 1.0);
            for (c, &x) in row.iter().enumerate() {
                panel[c * 16 + l] = x;
            }
        }
    }
    buf
}

/// An f32 operand repacked for the bf16 dot product: each run of `2 * width` values becomes
/// `width` 32-bit slots, slot i holding values i and `width + i` as bf16 (rounded to nearest even,
/// exact for bf16 inputs; the first in the low half, the operand layout of `vdpbf16ps`); a last
/// run of only `width` values is paired with zeros. With width 1 a q row becomes pairs along d;
/// with width 16 a k panel (`[c][l]`) becomes `[c / 2][l]` pairs; with width dp the (t, dp) v rows
/// become pairs of consecutive keys.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn bf16_pairs(src: &AlignedBuf, width: usize) -> AlignedBuf {
    let src = src.as_slice();
    let mut buf = AlignedBuf::new(src.len().div_ceil(2 * width) * width);
    let bits = |x: f32| u32::from(bf16::from_f32(x).to_bits());
    for (dst, run) in buf.as_mut_u32().chunks_exact_mut(width).zip(src.chunks(2 * width)) {
        let (lo, hi) = run.split_at(width);
        for (i, y) in dst.iter_mut().enumerate() {
            *y = bits(lo[i]) | (bits(hi.get(i).copied().unwrap_or(0.0)) << 16);
        }
    }
    buf
}

/// Stores row `r` of the accumulator divided by its softmax sum into the output.
#[inline(always)]
fn write_out<T: Elem>(o: &mut [MaybeUninit<T>], acc: &[f32], l: f32, d: usize) {
    let inv = 1.0 / l;
    for (y, x) in o[..d].iter_mut().zip(acc) {
        y.write(T::from_f32(x * inv));
    }
}

/// Portable tile: `nr` query rows (qb is (nr, dp), log2-domain scaled) against all keys.
#[allow(clippy::too_many_arguments)]
fn portable_tile<T: Elem>(
    qb: &[f32],
    kp: &[f32],
    vp: &[f32],
    nr: usize,
    tk: usize,
    d: usize,
    dp: usize,
    out: &mut [MaybeUninit<T>],
) {
    let bk_max = KEY_TILE_PORTABLE;
    let mut s = vec![0f32; nr * bk_max];
    let mut acc = vec![0f32; nr * dp];
    let mut m = vec![f32::NEG_INFINITY; nr];
    let mut l = vec![0f32; nr];
    let mut k0 = 0;
    while k0 < tk {
        let bk = bk_max.min(tk - k0);
        // S (nr, bk) = Q (nr, dp) K_tile^T (dp, bk).
        // SAFETY: every pointer/stride pair addresses elements inside its slice.
        unsafe {
            gemm::gemm(
                nr,
                bk,
                dp,
                s.as_mut_ptr(),
                1,
                bk_max as isize,
                false,
                qb.as_ptr(),
                1,
                dp as isize,
                kp.as_ptr().add(k0 * dp),
                dp as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for r in 0..nr {
            let row = &mut s[r * bk_max..r * bk_max + bk];
            let mt = row.iter().fold(m[r], |a, &x| a.max(x));
            let alpha = (m[r] - mt).exp2();
            for x in row.iter_mut() {
                *x = exp2_portable(*x - mt);
            }
            let sum = sum_f32(row);
            l[r] = l[r] * alpha + sum;
            m[r] = mt;
            for x in &mut acc[r * dp..(r + 1) * dp] {
                *x *= alpha;
            }
        }
        // O (nr, dp) += P (nr, bk) V_tile (bk, dp).
        // SAFETY: as above.
        unsafe {
            gemm::gemm(
                nr,
                dp,
                bk,
                acc.as_mut_ptr(),
                1,
                dp as isize,
                true,
                s.as_ptr(),
                1,
                bk_max as isize,
                vp.as_ptr().add(k0 * dp),
                1,
                dp as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        k0 += bk;
    }
    for r in 0..nr {
        write_out(&mut out[r * d..(r + 1) * d], &acc[r * dp..(r + 1) * dp], l[r], d);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{AlignedBuf, Elem, KEY_TILE, avx512_blocking, write_out};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// How far (log2 units) a score may exceed the stored running max before the row is redone.
    const LAZY_MAX: f32 = 32.0;

    const C: [f32; 7] = super::EXP2_POLY;

    /// 2^x for finite x (an x below -150 gives 0; -inf and NaN give NaN). At most 1 ulp from the
    /// exact value where the result is a normal number (x >= -126); checked by a test.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn exp2(x: __m512) -> __m512 {
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
        let f = _mm512_sub_ps(x, n);
        let mut p = _mm512_set1_ps(C[6]);
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(C[5]));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(C[4]));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(C[3]));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(C[2]));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(C[1]));
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(C[0]));
        _mm512_scalef_ps(p, n)
    }

    /// Lanes `0..valid` (all when valid >= 16).
    #[inline(always)]
    fn lane_mask(valid: usize) -> __mmask16 {
        if valid >= 16 { 0xffff } else { ((1u32 << valid) - 1) as __mmask16 }
    }

    /// S[r][16 x + l] = sum_c q[r][c] kpanel[x][c][l] for MR rows and U panels of 16 keys.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn score_kernel<const MR: usize, const U: usize>(
        q: *const f32,
        dp: usize,
        kp: *const f32,
        s: *mut f32,
        lds: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); U]; MR];
        let pstride = dp * 16;
        for c in 0..dp {
            let mut kv = [_mm512_setzero_ps(); U];
            for (x, kx) in kv.iter_mut().enumerate() {
                *kx = unsafe { _mm512_loadu_ps(kp.add(x * pstride + c * 16)) };
            }
            for (r, ar) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(unsafe { *q.add(r * dp + c) });
                for x in 0..U {
                    ar[x] = _mm512_fmadd_ps(b, kv[x], ar[x]);
                }
            }
        }
        for (r, ar) in acc.iter().enumerate() {
            for (x, a) in ar.iter().enumerate() {
                unsafe { _mm512_storeu_ps(s.add(r * lds + x * 16), *a) };
            }
        }
    }

    /// The two products of a query tile: f32 FMAs on f32 operands ([`F32Fma`]), or bf16 dot
    /// products on operands packed as bf16 pairs, two values to a 32-bit slot ([`Bf16Dot`]).
    pub(super) trait Products {
        /// Values per f32 slot of the packed q, k and v.
        const PER_SLOT: usize;
        /// `S[r][16 x + l] = scale * sum_c q[r][c] kpanel[x][c][l]` for MR rows and U panels of
        /// 16 keys (the f32 path has the scale folded into q and ignores `scale`).
        ///
        /// # Safety
        /// The CPU features of the implementation; pointers valid for the packed operands.
        unsafe fn score_kernel<const MR: usize, const U: usize>(
            q: *const f32,
            dp: usize,
            kp: *const f32,
            s: *mut f32,
            lds: usize,
            scale: f32,
        );
        /// `acc = P (MR, bk) V (bk, 16 NV); o = o * corr + acc`.
        ///
        /// # Safety
        /// As for `score_kernel`; the P rows hold zeros from `bk` up to the next multiple of 16.
        unsafe fn pv<const MR: usize, const NV: usize>(
            p: *const f32,
            ldp: usize,
            v: *const f32,
            bk: usize,
            o: *mut f32,
            corr: &[f32; MR],
        );
    }

    /// f32 operands, AVX-512F FMAs.
    pub(super) struct F32Fma;

    impl Products for F32Fma {
        const PER_SLOT: usize = 1;
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn score_kernel<const MR: usize, const U: usize>(
            q: *const f32,
            dp: usize,
            kp: *const f32,
            s: *mut f32,
            lds: usize,
            _scale: f32,
        ) {
            unsafe { score_kernel::<MR, U>(q, dp, kp, s, lds) }
        }
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn pv<const MR: usize, const NV: usize>(
            p: *const f32,
            ldp: usize,
            v: *const f32,
            bk: usize,
            o: *mut f32,
            corr: &[f32; MR],
        ) {
            unsafe { pv_kernel::<MR, NV>(p, ldp, v, bk, o, corr) }
        }
    }

    /// bf16 pairs, AVX-512 BF16 `vdpbf16ps` (32 multiply-adds an instruction, f32 sums); P is
    /// rounded to bf16 for the second product.
    pub(super) struct Bf16Dot;

    /// Reinterprets 32-bit lanes as bf16 pairs.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn as_bh(x: __m512i) -> __m512bh {
        // SAFETY: both are 512-bit vectors; every bit pattern is a valid value of either.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(x) }
    }

    impl Products for Bf16Dot {
        const PER_SLOT: usize = 2;
        #[inline]
        #[target_feature(enable = "avx512f,avx512bf16")]
        unsafe fn score_kernel<const MR: usize, const U: usize>(
            q: *const f32,
            dp: usize,
            kp: *const f32,
            s: *mut f32,
            lds: usize,
            scale: f32,
        ) {
            let (q, kp) = (q as *const i32, kp as *const __m512i);
            let half = dp / 2;
            let mut acc = [[_mm512_setzero_ps(); U]; MR];
            for c in 0..half {
                let mut kv = [as_bh(_mm512_setzero_si512()); U];
                for (x, kx) in kv.iter_mut().enumerate() {
                    *kx = as_bh(unsafe { _mm512_loadu_si512(kp.add(x * half + c)) });
                }
                for (r, ar) in acc.iter_mut().enumerate() {
                    let b = as_bh(_mm512_set1_epi32(unsafe { *q.add(r * half + c) }));
                    for x in 0..U {
                        ar[x] = _mm512_dpbf16_ps(ar[x], b, kv[x]);
                    }
                }
            }
            let sc = _mm512_set1_ps(scale);
            for (r, ar) in acc.iter().enumerate() {
                for (x, a) in ar.iter().enumerate() {
                    unsafe { _mm512_storeu_ps(s.add(r * lds + x * 16), _mm512_mul_ps(*a, sc)) };
                }
            }
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bf16")]
        unsafe fn pv<const MR: usize, const NV: usize>(
            p: *const f32,
            ldp: usize,
            v: *const f32,
            bk: usize,
            o: *mut f32,
            corr: &[f32; MR],
        ) {
            let dp = NV * 16;
            // P rows to bf16, 16 at a time (the zeros past bk included).
            let mut pb = [[0u32; KEY_TILE / 2]; MR];
            for (r, pr) in pb.iter_mut().enumerate() {
                let dst = pr.as_mut_ptr() as *mut __m256i;
                for x in 0..bk.div_ceil(16) {
                    unsafe {
                        let h = _mm512_cvtneps_pbh(_mm512_loadu_ps(p.add(r * ldp + x * 16)));
                        _mm256_storeu_si256(dst.add(x), std::mem::transmute::<__m256bh, __m256i>(h));
                    }
                }
            }
            let v = v as *const __m512i;
            let mut acc = [[_mm512_setzero_ps(); NV]; MR];
            for j in 0..bk.div_ceil(2) {
                let mut vv = [as_bh(_mm512_setzero_si512()); NV];
                for (x, vx) in vv.iter_mut().enumerate() {
                    *vx = as_bh(unsafe { _mm512_loadu_si512(v.add(j * NV + x)) });
                }
                for (ar, pr) in acc.iter_mut().zip(&pb) {
                    let b = as_bh(_mm512_set1_epi32(pr[j] as i32));
                    for x in 0..NV {
                        ar[x] = _mm512_dpbf16_ps(ar[x], b, vv[x]);
                    }
                }
            }
            unsafe { pv_store::<MR, NV>(&acc, o, dp, corr) }
        }
    }

    /// Scores of MR rows against `npan` panels starting at `kp`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn scores<P: Products, const MR: usize, const U: usize>(
        q: *const f32,
        dp: usize,
        kp: *const f32,
        npan: usize,
        s: *mut f32,
        lds: usize,
        scale: f32,
    ) {
        let panel = 16 * dp / P::PER_SLOT;
        let mut p = 0;
        while p + U <= npan {
            unsafe { P::score_kernel::<MR, U>(q, dp, kp.add(p * panel), s.add(p * 16), lds, scale) };
            p += U;
        }
        while p < npan {
            unsafe { P::score_kernel::<MR, 1>(q, dp, kp.add(p * panel), s.add(p * 16), lds, scale) };
            p += 1;
        }
    }

    /// The max of `row[..bk]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn row_max(row: *const f32, bk: usize) -> f32 {
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        let full = bk / 16;
        for x in 0..full {
            mx = _mm512_max_ps(mx, unsafe { _mm512_loadu_ps(row.add(x * 16)) });
        }
        if full * 16 < bk {
            let t = unsafe { _mm512_loadu_ps(row.add(full * 16)) };
            mx = _mm512_mask_max_ps(mx, lane_mask(bk - full * 16), mx, t);
        }
        _mm512_reduce_max_ps(mx)
    }

    /// In place `row[j] = 2^(row[j] - m)` for j < bk, zero for the padding lanes of the last
    /// vector; returns the lane sums and, when `TRACK`, the lane maxima of the scores.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp_row<const TRACK: bool>(row: *mut f32, bk: usize, m: f32) -> (__m512, __m512) {
        let mv = _mm512_set1_ps(m);
        let mut sum = _mm512_setzero_ps();
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        let full = bk / 16;
        for x in 0..full {
            unsafe {
                let sv = _mm512_loadu_ps(row.add(x * 16));
                if TRACK {
                    mx = _mm512_max_ps(mx, sv);
                }
                let e = exp2(_mm512_sub_ps(sv, mv));
                _mm512_storeu_ps(row.add(x * 16), e);
                sum = _mm512_add_ps(sum, e);
            }
        }
        if full * 16 < bk {
            let mask = lane_mask(bk - full * 16);
            unsafe {
                let sv = _mm512_loadu_ps(row.add(full * 16));
                if TRACK {
                    mx = _mm512_mask_max_ps(mx, mask, mx, sv);
                }
                let e = _mm512_maskz_mov_ps(mask, exp2(_mm512_sub_ps(sv, mv)));
                _mm512_storeu_ps(row.add(full * 16), e);
                sum = _mm512_add_ps(sum, e);
            }
        }
        (sum, mx)
    }

    /// acc = P (MR, bk) V (bk, 16 NV); o = o * corr + acc.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pv_kernel<const MR: usize, const NV: usize>(
        p: *const f32,
        ldp: usize,
        v: *const f32,
        bk: usize,
        o: *mut f32,
        corr: &[f32; MR],
    ) {
        let dp = NV * 16;
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        for j in 0..bk {
            let mut vv = [_mm512_setzero_ps(); NV];
            for (x, vx) in vv.iter_mut().enumerate() {
                *vx = unsafe { _mm512_loadu_ps(v.add(j * dp + x * 16)) };
            }
            for (r, ar) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(unsafe { *p.add(r * ldp + j) });
                for x in 0..NV {
                    ar[x] = _mm512_fmadd_ps(b, vv[x], ar[x]);
                }
            }
        }
        unsafe { pv_store::<MR, NV>(&acc, o, dp, corr) }
    }

    /// `o = o * corr + acc` for MR rows of 16 NV values (row stride dp).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pv_store<const MR: usize, const NV: usize>(
        acc: &[[__m512; NV]; MR],
        o: *mut f32,
        dp: usize,
        corr: &[f32; MR],
    ) {
        for (r, (ar, &cr)) in acc.iter().zip(corr).enumerate() {
            let c = _mm512_set1_ps(cr);
            for (x, a) in ar.iter().enumerate() {
                unsafe {
                    let po = o.add(r * dp + x * 16);
                    _mm512_storeu_ps(po, _mm512_fmadd_ps(_mm512_loadu_ps(po), c, *a));
                }
            }
        }
    }

    /// One query tile: `nr` rows of qb (round_up(nr, MR) rows of dp values) against all `tk`
    /// keys (kp in 16-key panels, vp by key), packed for `P`; scores are `scale` times the
    /// products (log2 domain); writes (nr, d) to `out`.
    ///
    /// # Safety
    /// The CPU must support avx512f, and avx512_bf16 for [`Bf16Dot`].
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile<T: Elem, P: Products>(
        qb: &[f32],
        kp: &[f32],
        vp: &[f32],
        nr: usize,
        tk: usize,
        d: usize,
        dp: usize,
        scale: f32,
        out: &mut [MaybeUninit<T>],
    ) {
        let (mr, u) = avx512_blocking(dp / 16).expect("avx512 blocking");
        macro_rules! go {
            ($nv:literal, $mr:literal, $u:literal) => {{
                debug_assert_eq!((mr, u), ($mr, $u));
                unsafe { tile_impl::<T, P, $nv, $mr, $u>(qb, kp, vp, nr, tk, d, scale, out) }
            }};
        }
        match dp / 16 {
            1 => go!(1, 16, 1),
            2 => go!(2, 12, 2),
            3 => go!(3, 8, 3),
            4 => go!(4, 6, 4),
            5 => go!(5, 4, 6),
            6 => go!(6, 4, 6),
            7 => go!(7, 3, 8),
            8 => go!(8, 3, 8),
            _ => unreachable!(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_impl<T: Elem, P: Products, const NV: usize, const MR: usize, const U: usize>(
        qb: &[f32],
        kp: &[f32],
        vp: &[f32],
        nr: usize,
        tk: usize,
        d: usize,
        scale: f32,
        out: &mut [MaybeUninit<T>],
    ) {
        let dp = NV * 16;
        // f32 slots per q row and per key of the packed operands.
        let slots = dp / P::PER_SLOT;
        let groups = nr.div_ceil(MR);
        debug_assert!(qb.len() >= groups * MR * slots);
        debug_assert!(kp.len() >= tk.div_ceil(16) * 16 * slots && vp.len() >= tk * slots);
        let lds = KEY_TILE + 16; // avoid 4K aliasing between score rows
        let mut sbuf = AlignedBuf::new(MR * lds);
        let s = sbuf.as_mut_slice().as_mut_ptr();
        let mut accb = AlignedBuf::zeros(groups * MR * dp);
        let acc = accb.as_mut_slice().as_mut_ptr();
        let mut m = vec![f32::NEG_INFINITY; groups * MR];
        let mut l = vec![0f32; groups * MR];
        let (qp, kpp, vpp) = (qb.as_ptr(), kp.as_ptr(), vp.as_ptr());
        let mut k0 = 0;
        while k0 < tk {
            let bk = KEY_TILE.min(tk - k0);
            let npan = bk.div_ceil(16);
            let kt0 = unsafe { kpp.add(k0 * slots) }; // panels of this key tile (k0 % 16 == 0)
            for g in 0..groups {
                let qg = unsafe { qp.add(g * MR * slots) };
                unsafe { scores::<P, MR, U>(qg, dp, kt0, npan, s, lds, scale) };
                // Online softmax on the MR x bk scores, with a lazy running max: after the first
                // key tile the exponentials are taken against the stored max m unless a score
                // exceeds it by more than LAZY_MAX (then that row is recomputed against its new
                // max and the accumulator rescaled), so P may reach 2^LAZY_MAX (no overflow).
                let mut corr = [1f32; MR];
                for (r, cr) in corr.iter_mut().enumerate() {
                    let i = g * MR + r;
                    let row = unsafe { s.add(r * lds) };
                    let sum = if k0 == 0 {
                        m[i] = unsafe { row_max(row, bk) };
                        unsafe { exp_row::<false>(row, bk, m[i]).0 }
                    } else {
                        let (sum, mx) = unsafe { exp_row::<true>(row, bk, m[i]) };
                        if _mm512_cmp_ps_mask::<_CMP_GT_OQ>(mx, _mm512_set1_ps(m[i] + LAZY_MAX)) == 0 {
                            sum
                        } else {
                            unsafe { scores::<P, 1, 1>(qg.add(r * slots), dp, kt0, npan, row, lds, scale) };
                            let mt = unsafe { row_max(row, bk) };
                            *cr = (m[i] - mt).exp2();
                            m[i] = mt;
                            unsafe { exp_row::<false>(row, bk, mt).0 }
                        }
                    };
                    l[i] = l[i] * *cr + _mm512_reduce_add_ps(sum);
                }
                unsafe {
                    P::pv::<MR, NV>(s, lds, vpp.add(k0 * slots), bk, acc.add(g * MR * dp), &corr);
                }
            }
            k0 += bk;
        }
        let accs = accb.as_slice();
        for r in 0..nr {
            write_out(&mut out[r * d..(r + 1) * d], &accs[r * dp..(r + 1) * dp], l[r], d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        for backend in [Backend::Auto, Backend::Portable] {
            let f = fused_attention_impl(q, k, v, scale, backend).unwrap();
            let diff = max_abs_diff(&f, &r);
            println!("{what} {:?} {backend:?}: max abs diff {diff:e}", q.dims());
            assert!(diff <= tol, "{what} {backend:?}: max abs diff {diff:e} > {tol:e}");
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
            let e_fused = err(&fused_attention(&q, &k, &v, scale).unwrap());
            let e_port = err(&fused_attention_impl(&q, &k, &v, scale, Backend::Portable).unwrap());
            println!(
                "{:?} max abs error vs f64: fused {e_fused:e}, portable {e_port:e}, reference {e_ref:e}",
                (n, h, tq, tk, d)
            );
            assert!(e_fused <= 1e-6 && e_port <= 1e-6, "{e_fused:e} {e_port:e}");
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
            for backend in [Backend::Auto, Backend::Portable] {
                let f = fused_attention_impl(&qh, &kh, &vh, 0.125, backend).unwrap();
                assert_eq!(f.dtype(), dt);
                let diff = max_abs_diff(&f, &r);
                let ulp = if dt == DType::BF16 { 1.0 / 256.0 } else { 1.0 / 2048.0 };
                println!("{dt:?} {backend:?} d {d} keys {tk}: max abs diff to the f32 reference {diff:e}");
                // Values are below 1 in magnitude: half an ulp at 1 for the output rounding, plus
                // slack; the bf16 dot product also rounds P to bf16 (relative 2^-9 a weight, so at
                // most 2^-9 max |v| = another half ulp at 1).
                let p_rounding =
                    if dt == DType::BF16 && backend == Backend::Auto && cpu_has_bf16_dot() { ulp * 0.5 } else { 0.0 };
                assert!(diff <= ulp * 0.5 + p_rounding + 1e-5, "{dt:?} {backend:?}: {diff:e}");
            }
        }
    }

    #[test]
    fn kernels_huge_logits() {
        // scale 80: logits in the hundreds; the max of most rows is in a later key tile than the
        // first, so the running max and the rescale are exercised.
        let (q, k, v) = qkv(1, 2, 40, 1500, 32, 99);
        let r = attention_reference(&q, &k, &v, 80.0).unwrap();
        for backend in [Backend::Auto, Backend::Portable] {
            let f = fused_attention_impl(&q, &k, &v, 80.0, backend).unwrap();
            let fv = f.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(fv.iter().all(|x| x.is_finite()));
            let diff = max_abs_diff(&f, &r);
            println!("huge logits {backend:?}: max abs diff {diff:e}");
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
        for backend in [Backend::Auto, Backend::Portable] {
            let f = fused_attention_impl(&q, &k, &v, 80.0, backend).unwrap();
            let want = v.i((.., .., tk - 1..tk, ..)).unwrap().broadcast_as((1, 1, 3, d)).unwrap();
            let diff = max_abs_diff(&f, &want);
            assert!(diff <= 1e-6, "{backend:?}: {diff:e}");
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
        unsafe {
            use std::arch::x86_64::*;
            _mm512_storeu_ps(buf.as_mut_ptr(), avx512::exp2(_mm512_set1_ps(-1e30)));
        }
        assert!(buf.iter().all(|&y| y == 0.0));
    }
}
