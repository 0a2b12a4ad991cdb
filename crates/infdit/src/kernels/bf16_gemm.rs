//! bf16 dense layers: `y = x W^T (+ b)` for bf16 `x` (..., K) and `W` (N, K), products summed in
//! f32, the bias added in f32 and one rounding (to nearest even) to the bf16 result. Two ways,
//! chosen at run time:
//!
//! * **The bf16 dot product** (AVX-512 BF16 `vdpbf16ps`, where the CPU has it and the kernel path
//!   is `avx512`): products of bf16 pairs straight from the bf16 operands. candle's CPU matmul
//!   converts bf16 operands to f32 and runs an f32 GEMM, which leaves half of the hardware's bf16
//!   throughput unused (`vdpbf16ps` does 32 multiply-adds per instruction, an f32 FMA 16).
//!   Layout: `W` is packed per call into panels of 64 output columns, where pair `p` of a panel is
//!   four vectors of sixteen `(W[n, 2p], W[n, 2p+1])` bf16 pairs (zero-padded past N and K); the
//!   micro-kernel keeps a 6 x 64 f32 tile of `y` in 24 zmm registers, broadcasts the pair
//!   `(x[i, 2p], x[i, 2p+1])` of each row (read straight from `x`, no packing) and runs the whole
//!   K without spilling. Rayon splits the rows; within a task each weight panel (at most 64 x K x 2
//!   bytes, 256 KiB for K = 2048) stays in L2 while the task's rows stream past it.
//! * **AMX tiles** (where the CPU has AMX-BF16 and the kernel path is `avx512`; it takes precedence
//!   over the dot product): the widened way below with its f32 product replaced by
//!   [`super::amx`]'s, which rounds its operands to bf16 (exact here: they are bf16 values) and
//!   sums in f32. On this project's Intel Xeon the dot-product kernel ran at 195-225 GFLOP/s on two
//!   cores (its `vdpbf16ps` issues at half the FMA rate there), this way at 600-710
//!   (`cargo bench -p infdit --bench gemm`).
//! * **Widened on the fly** everywhere else (AVX2, NEON, portable): `W` is converted to f32 once
//!   per call (N x K, small), and each rayon task converts its own [`WIDE_ROWS`] rows of `x` to
//!   f32, runs the gemm crate's f32 product on them (single-threaded) and writes its rows of `y`
//!   as bf16. candle's own bf16 matmul instead converts the whole of `x` and `W` to f32 vectors
//!   and the whole f32 result back, each on one thread, before and after its GEMM: the same
//!   speed within noise on the forced AVX2 path, with full-size f32 copies (peak RSS of the small
//!   config's 512 x 512 call 1.17 GB there, 1.00-1.10 GB here; docs/benchmarks.md).
//!
//! Both run for bf16 CPU tensors outside an autograd graph ([`applies`]); everywhere else the
//! caller keeps candle's matmul. `INFDIT_BF16_DOT=0` in the environment turns the dot product off
//! (the widened way runs instead).

use candle_core::{DType, Result, Tensor};

use super::{MatmulPrecision, bf16_dot, vec_f32, with_slice};
use half::bf16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Output columns per packed weight panel (four zmm registers of f32).
const NR: usize = 64;
/// Rows per micro-kernel call.
const MR: usize = 6;
/// Rows per task of the widened way (1024 rows of K = 2048 f32 values are 8 MiB). Measured on the
/// small config's 16,384-row products (forced AVX2 path): 64 rows ran 12% slower than candle's
/// bf16 matmul (the gemm crate is less efficient on short panels), 512 and 1024 as fast or faster.
const WIDE_ROWS: usize = 1024;

/// Whether calls from this thread use the bf16 dot product: the CPU has the instructions, it is
/// not turned off by `INFDIT_BF16_DOT=0`, and the kernel path is `avx512` ([`super::path`]).
/// Without it, [`linear`] widens to f32 on the fly.
pub fn available() -> bool {
    bf16_dot()
}

/// Whether [`linear`] runs for `x` and `w` (and `bias`): bf16 CPU tensors outside an autograd
/// graph.
pub fn applies(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> bool {
    let plain_cpu = |t: &Tensor| t.device().is_cpu() && !t.track_op();
    x.dtype() == DType::BF16 && w.dtype() == DType::BF16 && plain_cpu(x) && plain_cpu(w) && bias.is_none_or(plain_cpu)
}

/// `x W^T (+ bias)` for bf16 `x` (..., K), `w` (N, K) and `bias` (N) of any float dtype; the
/// result is bf16 (..., N), contiguous. Errors where [`applies`] is false.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if !applies(x, w, bias) {
        candle_core::bail!("bf16_gemm::linear: needs bf16 CPU tensors outside an autograd graph")
    }
    let (n, k) = w.dims2()?;
    let dims = x.dims();
    if dims.last() != Some(&k) {
        candle_core::bail!("bf16_gemm::linear: input {:?} against weight ({n}, {k})", dims)
    }
    let m = x.elem_count() / k.max(1);
    let bias = match bias {
        Some(b) => {
            let b = vec_f32(b)?;
            if b.len() != n {
                candle_core::bail!("bf16_gemm::linear: bias of {} values for {n} outputs", b.len())
            }
            b
        }
        None => vec![0.0; n],
    };
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    // AMX tiles where they run, else the dot product where it runs, else widened to f32.
    let mm = MatmulPrecision::Bf16.effective();
    let out = with_slice(&x, |xs| {
        with_slice(&w, |ws| {
            if mm == MatmulPrecision::F32 && available() {
                gemm(xs, ws, &bias, m, n, k)
            } else {
                gemm_widened(mm, xs, ws, &bias, m, n, k)
            }
        })
    })??;
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("a linear input has a last dimension") = n;
    Tensor::from_vec(out, shape, x.device())
}

/// Packs `w` (N, K) into panels of [`NR`] columns: for panel `j`, pair `p`, column `c`, the two
/// values `w[64 j + c, 2p]` and `w[64 j + c, 2p + 1]` (zero where out of range).
fn pack_weight(w: &[bf16], n: usize, k: usize) -> Vec<u16> {
    let kp = k.div_ceil(2);
    let panels = n.div_ceil(NR);
    let mut packed = vec![0u16; panels * kp * NR * 2];
    packed.par_chunks_mut(kp * NR * 2).enumerate().for_each(|(j, panel)| {
        for c in 0..NR.min(n - j * NR) {
            let row = &w[(j * NR + c) * k..(j * NR + c + 1) * k];
            for (i, v) in row.iter().enumerate() {
                panel[((i / 2) * NR + c) * 2 + i % 2] = v.to_bits();
            }
        }
    });
    packed
}

/// Rows per parallel task: a multiple of [`MR`], enough tasks for the pool, at most 96.
fn rows_per_task(m: usize) -> usize {
    let per_thread = m.div_ceil(4 * rayon::current_num_threads().max(1));
    per_thread.next_multiple_of(MR).clamp(MR, 96)
}

fn gemm(x: &[bf16], w: &[bf16], bias: &[f32], m: usize, n: usize, k: usize) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    let packed = pack_weight(w, n, k);
    let kp = k.div_ceil(2);
    // Bias padded to whole panels.
    let mut bias_padded = bias.to_vec();
    bias_padded.resize(n.div_ceil(NR) * NR, 0.0);
    let mc = rows_per_task(m);
    out.par_chunks_mut(mc * n).enumerate().for_each(|(t, out_rows)| {
        let r0 = t * mc;
        let rows = out_rows.len() / n;
        for (j, panel) in packed.chunks_exact(kp * NR * 2).enumerate() {
            let cols = NR.min(n - j * NR);
            let mut r = 0;
            while r < rows {
                let mr = MR.min(rows - r);
                let a = &x[(r0 + r) * k..(r0 + r + mr) * k];
                let c = &mut out_rows[r * n + j * NR..];
                let tile = Tile { a, k, panel, bias: &bias_padded[j * NR..(j + 1) * NR], ldc: n, cols };
                // SAFETY: `applies` checked the CPU features; `tile` covers `mr` rows of `a` and
                // `c` (the last row of `c` has at least `cols` values past this column).
                unsafe { micro_dispatch(&tile, mr, c) };
                r += mr;
            }
        }
    });
    out
}

/// The widened way (module docs): `W` to f32 once, then per task of [`WIDE_ROWS`] rows: the rows
/// of `x` to f32, one single-threaded f32 gemm, the bias, the rounding to bf16.
fn gemm_widened(mm: MatmulPrecision, x: &[bf16], w: &[bf16], bias: &[f32], m: usize, n: usize, k: usize) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    let mut w32 = vec![0f32; n * k];
    w.convert_to_f32_slice(&mut w32);
    out.par_chunks_mut(WIDE_ROWS * n).enumerate().for_each(|(t, out_rows)| {
        let rows = out_rows.len() / n;
        let mut a = vec![0f32; rows * k];
        x[t * WIDE_ROWS * k..][..rows * k].convert_to_f32_slice(&mut a);
        let mut c = vec![0f32; rows * n];
        mm.matmul(rows, n, k, &a, false, &w32, true, &mut c, false);
        for (c_row, b_row) in c.chunks_exact_mut(n).zip(out_rows.chunks_exact_mut(n)) {
            for (v, b) in c_row.iter_mut().zip(bias) {
                *v += b;
            }
            b_row.convert_from_f32_slice(c_row);
        }
    });
    out
}

/// One micro-kernel call's operands.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Tile<'a> {
    /// `mr` rows of x, `k` values each.
    a: &'a [bf16],
    k: usize,
    /// A packed weight panel (`ceil(k/2) * 64` pairs).
    panel: &'a [u16],
    /// 64 bias values.
    bias: &'a [f32],
    /// Row stride of the output.
    ldc: usize,
    /// Valid columns of this panel (<= 64).
    cols: usize,
}

#[cfg(target_arch = "x86_64")]
unsafe fn micro_dispatch(t: &Tile, mr: usize, c: &mut [bf16]) {
    // SAFETY: every arm calls `micro` under the caller's own contract (the CPU has AVX-512 BF16,
    // and `t`'s pointers cover `mr` rows of the panel and `c` the matching output rows).
    unsafe {
        match mr {
            6 => micro::<6>(t, c),
            5 => micro::<5>(t, c),
            4 => micro::<4>(t, c),
            3 => micro::<3>(t, c),
            2 => micro::<2>(t, c),
            _ => micro::<1>(t, c),
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn micro_dispatch(_: &Tile, _: usize, _: &mut [bf16]) {
    unreachable!("bf16_gemm runs only where `available()` is true")
}

/// `C[0..R, 0..cols] = A B + bias` for one panel, in bf16 dot products with f32 accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn micro<const R: usize>(t: &Tile, c: &mut [bf16]) {
    use std::arch::x86_64::*;
    let k = t.k;
    let kp = k / 2;
    debug_assert!(t.a.len() >= R * k && t.panel.len() >= k.div_ceil(2) * NR * 2);
    debug_assert!(c.len() >= (R - 1) * t.ldc + t.cols);
    let a = t.a.as_ptr() as *const u16;
    let b = t.panel.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    // SAFETY: every read is within `a` (R rows of k values) and `panel` (ceil(k/2) pairs of 64
    // columns); the caller guarantees the CPU features.
    unsafe {
        for p in 0..kp {
            let bp = b.add(p * NR * 2) as *const __m512i;
            let bv: [__m512bh; 4] = [
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp)),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(1))),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(2))),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(3))),
            ];
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let pair = (a.add(r * k + 2 * p) as *const i32).read_unaligned();
                let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair));
                for (acc_rc, bv_c) in acc_r.iter_mut().zip(bv) {
                    *acc_rc = _mm512_dpbf16_ps(*acc_rc, av, bv_c);
                }
            }
        }
        if k % 2 == 1 {
            // The last value pairs with a zero (the panel holds zero there too).
            let bp = b.add(kp * NR * 2) as *const __m512i;
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_epi32(i32::from(*a.add(r * k + k - 1)));
                let av = std::mem::transmute::<__m512i, __m512bh>(av);
                for (ci, acc_rc) in acc_r.iter_mut().enumerate() {
                    let bv = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(ci)));
                    *acc_rc = _mm512_dpbf16_ps(*acc_rc, av, bv);
                }
            }
        }
        let bias = t.bias.as_ptr();
        let out = c.as_mut_ptr() as *mut u16;
        for (r, acc_r) in acc.iter().enumerate() {
            for (ci, acc_rc) in acc_r.iter().enumerate() {
                let v = _mm512_add_ps(*acc_rc, _mm512_loadu_ps(bias.add(ci * 16)));
                let h = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v));
                let dst = out.add(r * t.ldc + ci * 16);
                let valid = t.cols.saturating_sub(ci * 16).min(16);
                if valid == 16 {
                    _mm256_storeu_si256(dst as *mut __m256i, h);
                } else if valid > 0 {
                    _mm256_mask_storeu_epi16(dst as *mut i16, ((1u32 << valid) - 1) as u16, h);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_rand::rand;

    /// Checks `linear` against the f32 product of the same bf16 values: within one bf16 rounding
    /// of the result plus f32 summation error.
    fn check(x: &Tensor, w: &Tensor, b: Option<&Tensor>) {
        let xb = x.to_dtype(DType::BF16).unwrap();
        let wb = w.to_dtype(DType::BF16).unwrap();
        let got = linear(&xb, &wb, b).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let (n, k) = w.dims2().unwrap();
        let x32 = xb.to_dtype(DType::F32).unwrap();
        let w32 = wb.to_dtype(DType::F32).unwrap();
        let x2 = x32.reshape((x.elem_count() / k, k)).unwrap();
        let mut want = x2.matmul(&w32.t().unwrap()).unwrap();
        let mag = x2.abs().unwrap().matmul(&w32.abs().unwrap().t().unwrap()).unwrap();
        if let Some(b) = b {
            want = want.broadcast_add(&b.to_dtype(DType::F32).unwrap()).unwrap();
        }
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("a linear input has a last dimension") = n;
        assert_eq!(got.dims(), &shape[..]);
        let got = got.to_dtype(DType::F32).unwrap().reshape(want.shape()).unwrap();
        let err = (&got - &want).unwrap().abs().unwrap();
        // One bf16 rounding (2^-9 relative) plus f32 summation error over k terms.
        let tol = ((want.abs().unwrap() * (1.0 / 256.0)).unwrap() + (mag * (k as f64 * 1.2e-7)).unwrap()).unwrap();
        let over = (err - tol).unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(over <= 0.0, "({n}, {k}): error above tolerance by {over}");
    }

    #[test]
    fn linear_matches_the_f32_product() {
        for path in crate::kernels::supported_paths() {
            crate::kernels::with_path(path, || {
                linear_cases();
                let way = if MatmulPrecision::bf16_runs() {
                    "AMX tiles"
                } else if available() {
                    "bf16 dot product"
                } else {
                    "widened to f32"
                };
                println!("{path}: {way} checked");
            })
            .unwrap();
        }
    }

    #[test]
    fn both_ways_agree_within_one_rounding() {
        // The dot product where the CPU has it, else the widened way twice: either way the two
        // results differ by at most one bf16 rounding of the same f32 sums (summation order).
        let (m, k, n) = (70, 300, 130);
        let x = rand(11, &[m, k], 1.0).to_dtype(DType::BF16).unwrap();
        let w = rand(12, &[n, k], 0.5).to_dtype(DType::BF16).unwrap();
        let dot = linear(&x, &w, None).unwrap().to_dtype(DType::F32).unwrap();
        let wide = crate::kernels::with_path(crate::kernels::Path::Portable, || linear(&x, &w, None))
            .unwrap()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let rel = ((&dot - &wide).unwrap().abs().unwrap() / (dot.abs().unwrap() + 1e-3).unwrap()).unwrap();
        let worst = rel.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(worst <= 1.0 / 128.0, "default vs widened: {worst}");
        // Each way the CPU can run, called directly (on an AMX machine `linear` takes the tiles, so
        // the dot-product kernel is checked here).
        let (xs, ws) =
            (x.flatten_all().unwrap().to_vec1::<bf16>().unwrap(), w.flatten_all().unwrap().to_vec1::<bf16>().unwrap());
        let bias = vec![0.0; n];
        let want = gemm_widened(MatmulPrecision::F32, &xs, &ws, &bias, m, n, k);
        let mut ways: Vec<(&str, Vec<bf16>)> = Vec::new();
        if available() {
            ways.push(("dot product", gemm(&xs, &ws, &bias, m, n, k)));
        }
        if MatmulPrecision::bf16_runs() {
            ways.push(("AMX tiles", gemm_widened(MatmulPrecision::Bf16, &xs, &ws, &bias, m, n, k)));
        }
        for (way, got) in ways {
            for (g, w) in got.iter().zip(&want) {
                let (g, w) = (g.to_f32(), w.to_f32());
                assert!((g - w).abs() <= (w.abs() + 1e-3) / 128.0, "{way}: {g} vs widened {w}");
            }
            println!("{way} checked against the widened way");
        }
    }

    fn linear_cases() {
        // Rows and columns off the 6 x 64 tile, odd K, one row, the model's shapes.
        for (m, k, n) in [(1, 96, 48), (7, 33, 70), (13, 1, 5), (130, 512, 200), (64, 2048, 128), (37, 512, 1536)] {
            let x = rand(m as u64, &[m, k], 2.0);
            let w = rand(k as u64 + 7, &[n, k], 0.5);
            let b = rand(3, &[n], 1.0);
            check(&x, &w, Some(&b));
            check(&x, &w, None);
        }
        // Leading dims, a non-contiguous input and a transposed (strided) weight.
        let x = rand(5, &[2, 40, 3, 96], 1.0).transpose(1, 2).unwrap();
        let w = rand(6, &[96, 80], 1.0).t().unwrap();
        check(&x, &w, Some(&rand(7, &[80], 1.0).to_dtype(DType::BF16).unwrap()));
    }

    #[test]
    fn linear_rejects_what_it_cannot_run() {
        let x = rand(1, &[4, 8], 1.0);
        let w = rand(2, &[3, 8], 1.0);
        assert!(!applies(&x, &w, None), "f32 operands");
        assert!(linear(&x, &w, None).is_err());
        let (xb, wb) = (x.to_dtype(DType::BF16).unwrap(), w.to_dtype(DType::BF16).unwrap());
        assert!(linear(&xb, &wb.t().unwrap(), None).is_err(), "K mismatch");
        assert!(linear(&xb, &wb, Some(&rand(3, &[4], 1.0))).is_err(), "bias length");
    }
}
