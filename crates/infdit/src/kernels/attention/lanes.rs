//! The attention tile of the AVX2 + FMA and NEON paths, written once over the vector primitives
//! of [`crate::kernels::simd`] (`LANES` f32 a vector: 8 for AVX2, 4 for NEON) and stamped out per
//! instruction set by [`lanes_tile!`].
//!
//! Same structure as the AVX-512 tile: K packed in panels of `LANES` keys, a register-blocked
//! score micro-kernel (`MR` rows x `U` panels), an online softmax with the polynomial `exp2` on
//! each key tile (the AVX-512 tile's lazy running max: set by the first key tile, exceeded by
//! more than 2^32 only rarely, then that row is redone and its accumulator rescaled), and a
//! register-blocked `P V` micro-kernel over column blocks of `W` vectors; everything in f32 with
//! FMAs.

use super::pack::{AlignedBuf, write_out};

/// Keys a tile of the online softmax.
const LANES_KEY_TILE: usize = 128;
/// How far (log2 units) a score may exceed the stored running max before the row is redone.
const LANES_LAZY_MAX: f32 = 32.0;
use crate::kernels::{Elem, exp2_portable};
use std::mem::MaybeUninit;

/// Generates `pub(super) unsafe fn tile<T>` for one instruction set: `$v` the primitives module,
/// `$feat` its target features, `$mr` rows per block, `$u` key panels per score call, `$w`
/// vectors per column block of the `P V` product.
macro_rules! lanes_tile {
    ($v:path, $feat:literal, $mr:literal, $u:literal, $w:literal) => {
        use super::{
            AlignedBuf, Elem, LANES_KEY_TILE, LANES_LAZY_MAX as LAZY_MAX, MaybeUninit, exp2_portable, write_out,
        };
        use v::LANES as L;
        use $v as v;

        /// Query rows per block of the micro-kernels (q is packed padded to a multiple).
        pub(in crate::kernels::attention) const MR: usize = $mr;

        /// `S[r][L x + l] = sum_c q[r][c] kpanel[x][c][l]` for R rows and X panels.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn score_kernel<const R: usize, const X: usize>(
            q: *const f32,
            dp: usize,
            kp: *const f32,
            s: *mut f32,
            lds: usize,
        ) {
            let mut acc = [[v::zero(); X]; R];
            let pstride = dp * L;
            for c in 0..dp {
                let mut kv = [v::zero(); X];
                for (x, kx) in kv.iter_mut().enumerate() {
                    // SAFETY: panel x of the call holds dp * L values (caller).
                    *kx = unsafe { v::load(kp.add(x * pstride + c * L)) };
                }
                for (r, ar) in acc.iter_mut().enumerate() {
                    // SAFETY: q holds R rows of dp values (caller).
                    let b = v::splat(unsafe { *q.add(r * dp + c) });
                    for x in 0..X {
                        ar[x] = v::fma(b, kv[x], ar[x]);
                    }
                }
            }
            for (r, ar) in acc.iter().enumerate() {
                for (x, a) in ar.iter().enumerate() {
                    // SAFETY: s holds R rows of lds >= X * L values past this panel (caller).
                    unsafe { v::store(s.add(r * lds + x * L), *a) };
                }
            }
        }

        /// Scores of R rows against `npan` panels starting at `kp`.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn scores<const R: usize>(
            q: *const f32,
            dp: usize,
            kp: *const f32,
            npan: usize,
            s: *mut f32,
            lds: usize,
        ) {
            let panel = L * dp;
            let mut p = 0;
            while p + $u <= npan {
                // SAFETY: panels p..p + $u exist (p + $u <= npan), and the score rows have room
                // for npan * L values (the caller's contract).
                unsafe { score_kernel::<R, $u>(q, dp, kp.add(p * panel), s.add(p * L), lds) };
                p += $u;
            }
            while p < npan {
                // SAFETY: panel p < npan exists; as above.
                unsafe { score_kernel::<R, 1>(q, dp, kp.add(p * panel), s.add(p * L), lds) };
                p += 1;
            }
        }

        /// `acc = P (R, bk) V[.., cols of this block] (bk, W L); o = o * corr + acc`.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn pv_block<const R: usize, const W: usize>(
            p: *const f32,
            ldp: usize,
            vb: *const f32,
            dp: usize,
            bk: usize,
            o: *mut f32,
            corr: &[f32; R],
        ) {
            let mut acc = [[v::zero(); W]; R];
            for j in 0..bk {
                let mut vv = [v::zero(); W];
                for (x, vx) in vv.iter_mut().enumerate() {
                    // SAFETY: key j of v has dp values, this block W * L of them (caller).
                    *vx = unsafe { v::load(vb.add(j * dp + x * L)) };
                }
                for (r, ar) in acc.iter_mut().enumerate() {
                    // SAFETY: P has R rows of at least bk values (caller).
                    let b = v::splat(unsafe { *p.add(r * ldp + j) });
                    for x in 0..W {
                        ar[x] = v::fma(b, vv[x], ar[x]);
                    }
                }
            }
            for (r, (ar, &cr)) in acc.iter().zip(corr).enumerate() {
                let c = v::splat(cr);
                for (x, a) in ar.iter().enumerate() {
                    // SAFETY: o holds R rows of dp values, this block W * L of them (caller).
                    unsafe {
                        let po = o.add(r * dp + x * L);
                        v::store(po, v::fma(v::load(po), c, *a));
                    }
                }
            }
        }

        /// `o = o * corr + P (R, bk) V (bk, dp)` over column blocks of up to `$w` vectors.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn pv<const R: usize>(
            p: *const f32,
            ldp: usize,
            vp: *const f32,
            dp: usize,
            bk: usize,
            o: *mut f32,
            corr: &[f32; R],
        ) {
            let nv = dp / L;
            let mut x = 0;
            while x < nv {
                let (vb, ob) = (vp.wrapping_add(x * L), o.wrapping_add(x * L));
                let rem = nv - x;
                // SAFETY: each call covers w <= rem vectors, so columns x L .. (x + w) L lie
                // inside the dp columns of v and o; P, v and o as the caller's contract.
                unsafe {
                    if rem >= $w {
                        pv_block::<R, $w>(p, ldp, vb, dp, bk, ob, corr);
                        x += $w;
                    } else if rem >= 4 {
                        pv_block::<R, 4>(p, ldp, vb, dp, bk, ob, corr);
                        x += 4;
                    } else if rem >= 2 {
                        pv_block::<R, 2>(p, ldp, vb, dp, bk, ob, corr);
                        x += 2;
                    } else {
                        pv_block::<R, 1>(p, ldp, vb, dp, bk, ob, corr);
                        x += 1;
                    }
                }
            }
        }

        /// The max of `row[..bk]`.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn row_max(row: *const f32, bk: usize) -> f32 {
            let full = bk / L;
            let mut mx = v::splat(f32::NEG_INFINITY);
            for x in 0..full {
                // SAFETY: x * L + L <= bk values of the row (caller).
                mx = v::max(mx, unsafe { v::load(row.add(x * L)) });
            }
            let mut m = v::hmax(mx);
            for j in full * L..bk {
                // SAFETY: j < bk.
                m = m.max(unsafe { *row.add(j) });
            }
            m
        }

        /// In place `row[j] = 2^(row[j] - m)` for j < bk; returns their sum and, when `TRACK`,
        /// the max of the scores (else -inf).
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn exp_row<const TRACK: bool>(row: *mut f32, bk: usize, m: f32) -> (f32, f32) {
            let full = bk / L;
            let mv = v::splat(m);
            let mut sum = v::zero();
            let mut mx = v::splat(f32::NEG_INFINITY);
            for x in 0..full {
                // SAFETY: x * L + L <= bk values of the row (caller).
                unsafe {
                    let sv = v::load(row.add(x * L));
                    if TRACK {
                        mx = v::max(mx, sv);
                    }
                    let e = v::exp2(v::sub(sv, mv));
                    v::store(row.add(x * L), e);
                    sum = v::add(sum, e);
                }
            }
            let mut s = v::hsum(sum);
            let mut smax = if TRACK { v::hmax(mx) } else { f32::NEG_INFINITY };
            for j in full * L..bk {
                // SAFETY: j < bk.
                unsafe {
                    let sv = *row.add(j);
                    if TRACK {
                        smax = smax.max(sv);
                    }
                    let e = exp2_portable(sv - m);
                    *row.add(j) = e;
                    s += e;
                }
            }
            (s, smax)
        }

        /// One query tile: `nr` rows of `qb` (a multiple of MR rows of dp values, log2-domain
        /// scaled) against all `tk` keys (`kp` in panels of L keys, `vp` by key, dp values a
        /// key); writes (nr, d) to `out`.
        ///
        /// # Safety
        /// The CPU must support the features of `$feat`.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = $feat)]
        pub(in crate::kernels::attention) unsafe fn tile<T: Elem>(
            qb: &[f32],
            kp: &[f32],
            vp: &[f32],
            nr: usize,
            tk: usize,
            d: usize,
            dp: usize,
            out: &mut [MaybeUninit<T>],
        ) {
            let groups = nr.div_ceil(MR);
            assert!(dp % L == 0 && qb.len() >= groups * MR * dp);
            assert!(kp.len() >= tk.div_ceil(L) * L * dp && vp.len() >= tk * dp && out.len() >= nr * d);
            let lds = LANES_KEY_TILE + 16; // room for the last panel; avoids 4K aliasing between rows
            let mut sbuf = AlignedBuf::new(MR * lds);
            let s = sbuf.as_mut_slice().as_mut_ptr();
            let mut accb = AlignedBuf::zeros(groups * MR * dp);
            let acc = accb.as_mut_slice().as_mut_ptr();
            let mut m = vec![f32::NEG_INFINITY; groups * MR];
            let mut l = vec![0f32; groups * MR];
            let (qp, kpp, vpp) = (qb.as_ptr(), kp.as_ptr(), vp.as_ptr());
            let mut k0 = 0;
            while k0 < tk {
                let bk = LANES_KEY_TILE.min(tk - k0);
                let npan = bk.div_ceil(L);
                for g in 0..groups {
                    // SAFETY: the asserts above: q rows g * MR.. exist, the key tile's panels
                    // (k0 is a multiple of L) and values exist, and s has MR rows of lds >=
                    // npan * L values.
                    unsafe { scores::<MR>(qp.add(g * MR * dp), dp, kpp.add(k0 * dp), npan, s, lds) };
                    // Online softmax with a lazy running max (as on the AVX-512 path): after
                    // the first key tile the exponentials are taken against the stored max m
                    // unless a score exceeds it by more than LAZY_MAX (then that row's scores
                    // are recomputed, taken against its new max and the accumulator rescaled),
                    // so P may reach 2^LAZY_MAX (no overflow); no max pass and no rescale of
                    // the accumulator on most tiles.
                    let mut corr = [1f32; MR];
                    for (r, cr) in corr.iter_mut().enumerate() {
                        let i = g * MR + r;
                        let row = s.wrapping_add(r * lds);
                        let sum = if k0 == 0 {
                            // SAFETY: row r of s holds bk scores.
                            m[i] = unsafe { row_max(row, bk) };
                            // SAFETY: as above.
                            unsafe { exp_row::<false>(row, bk, m[i]).0 }
                        } else {
                            // SAFETY: as above.
                            let (sum, mx) = unsafe { exp_row::<true>(row, bk, m[i]) };
                            if mx <= m[i] + LAZY_MAX {
                                sum
                            } else {
                                // SAFETY: q row g * MR + r and the key tile's panels exist (the
                                // asserts above), row r of s has room for npan * L values.
                                unsafe { scores::<1>(qp.add((g * MR + r) * dp), dp, kpp.add(k0 * dp), npan, row, lds) };
                                // SAFETY: row r of s holds bk scores.
                                let mt = unsafe { row_max(row, bk) };
                                *cr = (m[i] - mt).exp2();
                                m[i] = mt;
                                // SAFETY: as above.
                                unsafe { exp_row::<false>(row, bk, mt).0 }
                            }
                        };
                        l[i] = l[i] * *cr + sum;
                    }
                    // SAFETY: P = s (MR rows, bk values each), V rows k0..k0 + bk, accumulator
                    // rows g * MR.. of dp values.
                    unsafe { pv::<MR>(s, lds, vpp.add(k0 * dp), dp, bk, acc.add(g * MR * dp), &corr) };
                }
                k0 += bk;
            }
            let accs = accb.as_slice();
            for r in 0..nr {
                write_out(&mut out[r * d..(r + 1) * d], &accs[r * dp..(r + 1) * dp], l[r], d);
            }
        }
    };
}

/// AVX2 + FMA: 6 rows x 2 panels of 8 keys (12 accumulators) for the scores, 6 rows x 2 vectors
/// for `P V` (15 of the 16 ymm registers).
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    lanes_tile!(crate::kernels::simd::avx2, "avx2,fma", 6, 2, 2);
}

/// NEON: 4 rows x 6 panels of 4 keys (24 accumulators) for the scores, 4 rows x 6 vectors for
/// `P V` (32 q registers).
#[cfg(target_arch = "aarch64")]
pub(super) mod neon {
    lanes_tile!(crate::kernels::simd::neon, "neon", 4, 6, 6);
}
