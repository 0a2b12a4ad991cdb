//! The portable attention tile: both products on the `gemm` crate (single threaded inside; rayon
//! is outside), the softmax in plain Rust the compiler vectorises.

use super::pack::{KEY_TILE_PORTABLE, write_out};
use crate::kernels::{Elem, exp2_portable, sum_f32};
use std::mem::MaybeUninit;

/// Portable tile: `nr` query rows (qb is (nr, dp), log2-domain scaled) against all keys.
#[allow(clippy::too_many_arguments)]
pub(super) fn tile<T: Elem>(
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
