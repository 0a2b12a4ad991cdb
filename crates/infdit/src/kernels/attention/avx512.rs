//! The AVX-512 attention tile (see the module above for the scheme), with f32 FMAs or, for bf16
//! inputs on a CPU with AVX-512 BF16, bf16 dot products.

use super::pack::{AlignedBuf, KEY_TILE, write_out};
use crate::kernels::Elem;
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// How far (log2 units) a score may exceed the stored running max before the row is redone.
const LAZY_MAX: f32 = 32.0;

const C: [f32; 7] = crate::kernels::EXP2_POLY;

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
            // SAFETY: q has MR rows of dp values, each of the U k panels dp x 16 values, s MR rows of lds >= 16 U values (the caller's contract); avx512f is enabled here.
            *kx = unsafe { _mm512_loadu_ps(kp.add(x * pstride + c * 16)) };
        }
        for (r, ar) in acc.iter_mut().enumerate() {
            // SAFETY: q has MR rows of dp values, each of the U k panels dp x 16 values, s MR rows of lds >= 16 U values (the caller's contract); avx512f is enabled here.
            let b = _mm512_set1_ps(unsafe { *q.add(r * dp + c) });
            for x in 0..U {
                ar[x] = _mm512_fmadd_ps(b, kv[x], ar[x]);
            }
        }
    }
    for (r, ar) in acc.iter().enumerate() {
        for (x, a) in ar.iter().enumerate() {
            // SAFETY: q has MR rows of dp values, each of the U k panels dp x 16 values, s MR rows of lds >= 16 U values (the caller's contract); avx512f is enabled here.
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
        // SAFETY: same pointer contract as this function; its CPU features are enabled here.
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
        // SAFETY: same pointer contract as this function; its CPU features are enabled here.
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
                // SAFETY: q has MR rows of dp / 2 pairs, each of the U k panels dp / 2 x 16 pairs, s MR rows of lds >= 16 U values (the caller's contract); avx512f and avx512bf16 are enabled here.
                *kx = as_bh(unsafe { _mm512_loadu_si512(kp.add(x * half + c)) });
            }
            for (r, ar) in acc.iter_mut().enumerate() {
                // SAFETY: q has MR rows of dp / 2 pairs, each of the U k panels dp / 2 x 16 pairs, s MR rows of lds >= 16 U values (the caller's contract); avx512f and avx512bf16 are enabled here.
                let b = as_bh(_mm512_set1_epi32(unsafe { *q.add(r * half + c) }));
                for x in 0..U {
                    ar[x] = _mm512_dpbf16_ps(ar[x], b, kv[x]);
                }
            }
        }
        let sc = _mm512_set1_ps(scale);
        for (r, ar) in acc.iter().enumerate() {
            for (x, a) in ar.iter().enumerate() {
                // SAFETY: q has MR rows of dp / 2 pairs, each of the U k panels dp / 2 x 16 pairs, s MR rows of lds >= 16 U values (the caller's contract); avx512f and avx512bf16 are enabled here.
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
                // SAFETY: p has MR rows of ldp >= round_up(bk, 16) values (zeros past bk), pb KEY_TILE / 2 slots a row and bk <= KEY_TILE.
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
                // SAFETY: v holds ceil(bk / 2) key pairs of NV vectors (the caller's contract).
                *vx = as_bh(unsafe { _mm512_loadu_si512(v.add(j * NV + x)) });
            }
            for (ar, pr) in acc.iter_mut().zip(&pb) {
                let b = as_bh(_mm512_set1_epi32(pr[j] as i32));
                for x in 0..NV {
                    ar[x] = _mm512_dpbf16_ps(ar[x], b, vv[x]);
                }
            }
        }
        // SAFETY: o has MR rows of dp values (the caller's contract).
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
        // SAFETY: panels p..p + U exist (p + U <= npan), and the score rows have room for npan * 16 values.
        unsafe { P::score_kernel::<MR, U>(q, dp, kp.add(p * panel), s.add(p * 16), lds, scale) };
        p += U;
    }
    while p < npan {
        // SAFETY: panel p < npan exists; as above.
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
        // SAFETY: x * 16 + 16 <= bk values of the row.
        mx = _mm512_max_ps(mx, unsafe { _mm512_loadu_ps(row.add(x * 16)) });
    }
    if full * 16 < bk {
        // SAFETY: the row has room for round_up(bk, 16) <= lds values (the score buffer's stride); masked lanes past bk are not used.
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
        // SAFETY: x * 16 + 16 <= bk values of the row.
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
        // SAFETY: the row has room for round_up(bk, 16) <= lds values (the score buffer's stride); masked lanes past bk are not used.
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
            // SAFETY: v holds bk keys of dp values, p MR rows of at least bk values (the caller's contract).
            *vx = unsafe { _mm512_loadu_ps(v.add(j * dp + x * 16)) };
        }
        for (r, ar) in acc.iter_mut().enumerate() {
            // SAFETY: v holds bk keys of dp values, p MR rows of at least bk values (the caller's contract).
            let b = _mm512_set1_ps(unsafe { *p.add(r * ldp + j) });
            for x in 0..NV {
                ar[x] = _mm512_fmadd_ps(b, vv[x], ar[x]);
            }
        }
    }
    // SAFETY: o has MR rows of dp values (the caller's contract).
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
            // SAFETY: o has MR rows of dp values (the caller's contract).
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
    let (mr, u) = blocking(dp / 16).expect("avx512 blocking");
    macro_rules! go {
        ($nv:literal, $mr:literal, $u:literal) => {{
            debug_assert_eq!((mr, u), ($mr, $u));
            // SAFETY: the caller guarantees the CPU features; the blocking matches the head dim (asserted above).
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
    assert!(qb.len() >= groups * MR * slots && out.len() >= nr * d);
    assert!(kp.len() >= tk.div_ceil(16) * 16 * slots && vp.len() >= tk * slots);
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
        // SAFETY: k0 < tk, so k0 * slots is inside kp (asserted above: kp holds ceil(tk / 16) * 16 keys).
        let kt0 = unsafe { kpp.add(k0 * slots) }; // panels of this key tile (k0 % 16 == 0)
        for g in 0..groups {
            // SAFETY: g < groups, and qb holds groups * MR rows (asserted above).
            let qg = unsafe { qp.add(g * MR * slots) };
            // SAFETY: q rows g * MR.. and the key tile's npan panels are in qb and kp, s has MR rows of lds >= npan * 16 values.
            unsafe { scores::<P, MR, U>(qg, dp, kt0, npan, s, lds, scale) };
            // Online softmax on the MR x bk scores, with a lazy running max: after the first
            // key tile the exponentials are taken against the stored max m unless a score
            // exceeds it by more than LAZY_MAX (then that row is recomputed against its new
            // max and the accumulator rescaled), so P may reach 2^LAZY_MAX (no overflow).
            let mut corr = [1f32; MR];
            for (r, cr) in corr.iter_mut().enumerate() {
                let i = g * MR + r;
                // SAFETY: r < MR rows of the score buffer.
                let row = unsafe { s.add(r * lds) };
                let sum = if k0 == 0 {
                    // SAFETY: row r holds bk scores.
                    m[i] = unsafe { row_max(row, bk) };
                    // SAFETY: as above.
                    unsafe { exp_row::<false>(row, bk, m[i]).0 }
                } else {
                    // SAFETY: as above.
                    let (sum, mx) = unsafe { exp_row::<true>(row, bk, m[i]) };
                    if _mm512_cmp_ps_mask::<_CMP_GT_OQ>(mx, _mm512_set1_ps(m[i] + LAZY_MAX)) == 0 {
                        sum
                    } else {
                        // SAFETY: row r of q and the key tile's panels, as for the MR-row call above.
                        unsafe { scores::<P, 1, 1>(qg.add(r * slots), dp, kt0, npan, row, lds, scale) };
                        // SAFETY: row r holds bk scores.
                        let mt = unsafe { row_max(row, bk) };
                        *cr = (m[i] - mt).exp2();
                        m[i] = mt;
                        // SAFETY: as above.
                        unsafe { exp_row::<false>(row, bk, mt).0 }
                    }
                };
                l[i] = l[i] * *cr + _mm512_reduce_add_ps(sum);
            }
            // SAFETY: P = MR score rows of bk values (zeros to the next multiple of 16 from exp_row), v rows k0..k0 + bk, accumulator rows g * MR.. of dp values; the CPU features are enabled here.
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

/// Which AVX-512 configuration handles head dim padded to `16 * nv`: (row block, key panels per
/// score micro-kernel call).
pub(super) fn blocking(nv: usize) -> Option<(usize, usize)> {
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
