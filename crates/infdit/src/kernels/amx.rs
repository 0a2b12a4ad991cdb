//! f32 matrix products on Intel AMX tiles in bf16: `C = A B` (or `C += A B`) with the operands
//! rounded to bf16 (to nearest even) and the products summed in f32 by `tdpbf16ps`.
//!
//! Where the CPU has AMX-BF16 (Sapphire Rapids and later Xeons), one `tdpbf16ps` multiplies a
//! 16 x 32 bf16 tile by a 32 x 16 one into a 16 x 16 f32 tile: 8,192 multiply-adds an instruction,
//! measured at about 3.7 TFLOP/s a core here, against about 180 GFLOP/s for the `gemm` crate's f32
//! product on the same core. The training products (dense layers, attention) are small (K = 64 to
//! 512), so what bounds this kernel is the packing of the operands into tiles, which converts and,
//! for a transposed operand, transposes in AVX-512 registers.
//!
//! Layout. `A` (m x k) is packed into tiles of 16 rows x 32 values (`[panel][k block][row][32]`),
//! `B` (k x n) into tiles of 16 value pairs x 16 columns (`[panel][k block][pair][column][2]`, the
//! pairs along k, as `tdpbf16ps` reads its second operand), both zero-padded to whole tiles and to
//! an even number of panels. The kernel keeps a 32 x 32 block of `C` in four tiles (`tmm0-3`),
//! loads two tiles of `A` (`tmm4-5`) and two of `B` (`tmm6-7`) per 32 values of k, and sums the k
//! blocks in order: every value of `C` is the same sum in the same order whatever the thread count
//! or the block of rows a caller hands in.
//!
//! The operating system must grant a process the tile registers (Linux: `arch_prctl`
//! `ARCH_REQ_XCOMP_PERM`); [`available`] asks once. `INFDIT_AMX=0` in the environment turns the
//! kernel off. The instructions are written as inline assembly (Rust's AMX intrinsics are not
//! stable); each `unsafe` block states what it relies on.

use std::sync::OnceLock;

use super::Strided;

/// Values of k per tile.
#[cfg(target_arch = "x86_64")]
const KB: usize = 32;
/// Rows (of `A`, `C`) or columns (of `B`, `C`) per tile.
#[cfg(target_arch = "x86_64")]
const TR: usize = 16;
/// bf16 values per tile.
#[cfg(target_arch = "x86_64")]
const TILE: usize = TR * KB;

/// Whether the CPU has AMX-BF16 (and AVX-512 BF16 for the packing), the operating system lets this
/// process use the tiles, and `INFDIT_AMX=0` does not turn it off. Asks the OS once.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| std::env::var("INFDIT_AMX").map(|v| v != "0").unwrap_or(true) && cpu_and_os())
}

#[cfg(target_arch = "x86_64")]
fn cpu_and_os() -> bool {
    use std::arch::x86_64::__cpuid_count;
    let avx512 = std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512bf16");
    if !avx512 {
        return false;
    }
    // CPUID leaf 7 sub-leaf 0, EDX: bit 22 AMX-BF16, bit 24 AMX-TILE.
    let edx = __cpuid_count(7, 0).edx;
    if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
        return false;
    }
    request_tiles()
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_and_os() -> bool {
    false
}

/// Asks Linux for the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`),
/// for the whole process; true where granted.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tiles() -> bool {
    const SYS_ARCH_PRCTL: usize = 158;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let ret: isize;
    // SAFETY: the arch_prctl system call with this request only changes the process's permitted
    // extended-state set; it reads and writes no memory of ours. `syscall` clobbers rcx and r11.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL as isize => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tiles() -> bool {
    false
}

/// Whether [`matmul`](fn@matmul) can read `a` (m x k) and `b` (k x n) as laid out: each operand has
/// contiguous rows or contiguous columns.
pub(crate) fn supports(a: &Strided<'_>, b: &Strided<'_>) -> bool {
    (a.cs == 1 || a.rs == 1) && (b.cs == 1 || b.rs == 1)
}

/// `C = A B` (`C += A B` with `acc`) for `A` m x k, `B` k x n, `C` m x n row-major, the operands
/// rounded to bf16 and the products summed in f32; single-threaded. Callers check [`available`]
/// and [`supports`] first (it panics otherwise).
pub(crate) fn matmul(m: usize, n: usize, k: usize, a: Strided<'_>, b: Strided<'_>, c: &mut [f32], acc: bool) {
    assert!(available() && supports(&a, &b), "amx::matmul: not available for these operands");
    assert!(super::operands_fit(m, n, k, &a, &b, c), "amx::matmul: operand too short");
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `available` checked the CPU features and the OS permission; the assert above bounds
    // every index the packing reads, and the kernel writes only the m x n values of `c`.
    unsafe {
        x86::matmul(m, n, k, a, b, c, acc)
    }
    // Elsewhere `available` is false and the assert above has already panicked.
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (k, c, acc);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use super::{KB, TILE, TR};
    use crate::kernels::Strided;

    thread_local! {
        /// This thread's packed operands, kept between calls (fresh zeroed buffers were 5 % of a
        /// training step).
        static PACKED: std::cell::RefCell<(Vec<u16>, Vec<u16>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    }

    /// Panels of 16 needed for `len` rows or columns, rounded up to an even count.
    fn panels(len: usize) -> usize {
        len.div_ceil(2 * TR) * 2
    }

    /// The tile configuration: palette 1, eight tiles of 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    impl Config {
        fn new() -> Config {
            let mut c = [0u8; 64];
            c[0] = 1;
            for t in 0..8 {
                c[16 + 2 * t] = 64; // bytes per row
                c[48 + t] = TR as u8; // rows
            }
            Config(c)
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn matmul(
        m: usize,
        n: usize,
        k: usize,
        a: Strided<'_>,
        b: Strided<'_>,
        c: &mut [f32],
        acc: bool,
    ) {
        let kbn = k.div_ceil(KB).max(1);
        let (mp, np) = (panels(m), panels(n));
        PACKED.with(|bufs| {
            let (pa, pb) = &mut *bufs.borrow_mut();
            // The packers write every value of these lengths (padding included): a buffer kept from
            // an earlier call needs no clearing.
            pa.resize(pa.len().max(mp * kbn * TILE), 0);
            pb.resize(pb.len().max(np * kbn * TILE), 0);
            let (pa, pb) = (&mut pa[..mp * kbn * TILE], &mut pb[..np * kbn * TILE]);
            // SAFETY: the caller bounds the views and the CPU has the features (and the tiles);
            // the packed buffers have the sizes the packers fill.
            unsafe {
                pack_a(a, m, k, kbn, pa);
                pack_b(b, k, n, kbn, pb);
                tiles(pa, pb, m, n, kbn, c, acc);
            }
        })
    }

    /// `C` (m x n) `=` (or `+=`) the packed `A` times the packed `B`, on the tiles.
    ///
    /// # Safety
    /// The CPU has AMX and the process the tile permission; `pa` and `pb` hold the packed panels.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn tiles(pa: &[u16], pb: &[u16], m: usize, n: usize, kbn: usize, c: &mut [f32], acc: bool) {
        let (mp, np) = (panels(m), panels(n));
        let cfg = Config::new();
        let mut edge = [0f32; 4 * TR * TR];
        // SAFETY: the CPU has AMX and the process the permission (the caller's contract);
        // `ldtilecfg` reads the 64-byte configuration; `tilerelease` ends the tile use.
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
        for jp in (0..np).step_by(2) {
            for ip in (0..mp).step_by(2) {
                let (r0, c0) = (ip * TR, jp * TR);
                let (rows, cols) = ((m - r0).min(2 * TR), (n - c0).min(2 * TR));
                let a0 = pa[ip * kbn * TILE..].as_ptr();
                let b0 = pb[jp * kbn * TILE..].as_ptr();
                if rows == 2 * TR && cols == 2 * TR {
                    // SAFETY: the 32 x 32 block of `c` at (r0, c0) lies inside its m x n values.
                    unsafe { block(a0, b0, kbn, c.as_mut_ptr().add(r0 * n + c0), n, acc) };
                } else {
                    // A block on the edge: through a 32 x 32 buffer.
                    edge.fill(0.0);
                    if acc {
                        for r in 0..rows {
                            edge[r * 2 * TR..][..cols].copy_from_slice(&c[(r0 + r) * n + c0..][..cols]);
                        }
                    }
                    // SAFETY: `edge` is a whole 32 x 32 block.
                    unsafe { block(a0, b0, kbn, edge.as_mut_ptr(), 2 * TR, acc) };
                    for r in 0..rows {
                        c[(r0 + r) * n + c0..][..cols].copy_from_slice(&edge[r * 2 * TR..][..cols]);
                    }
                }
            }
        }
        // SAFETY: as `ldtilecfg` above.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// One 32 x 32 block of `C` at `c` (row stride `ldc` values): the four tiles loaded from `c`
    /// (`acc`) or zeroed, `kbn` k blocks of the two `A` panels at `a` and the two `B` panels at
    /// `b` summed in, the tiles stored back.
    ///
    /// # Safety
    /// The tile configuration is loaded; `a` and `b` hold two panels of `kbn` tiles each; `c`
    /// reaches 32 rows of `ldc` values (32 used in each).
    #[inline(always)]
    unsafe fn block(a: *const u16, b: *const u16, kbn: usize, c: *mut f32, ldc: usize, acc: bool) {
        let stride = 64usize;
        let ldb = ldc * 4;
        // SAFETY: the caller's contract; every tile access stays within the panels and the block.
        unsafe {
            let c01 = c.add(TR);
            let c10 = c.add(TR * ldc);
            let c11 = c10.add(TR);
            if acc {
                asm!(
                    "tileloadd tmm0, [{c00} + {s}]",
                    "tileloadd tmm1, [{c01} + {s}]",
                    "tileloadd tmm2, [{c10} + {s}]",
                    "tileloadd tmm3, [{c11} + {s}]",
                    c00 = in(reg) c, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11, s = in(reg) ldb,
                    options(nostack, readonly),
                );
            } else {
                asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            }
            let (a1, b1) = (a.add(kbn * TILE), b.add(kbn * TILE));
            for kb in 0..kbn {
                asm!(
                    "tileloadd tmm4, [{a0} + {s}]",
                    "tileloadd tmm5, [{a1} + {s}]",
                    "tileloadd tmm6, [{b0} + {s}]",
                    "tileloadd tmm7, [{b1} + {s}]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a.add(kb * TILE), a1 = in(reg) a1.add(kb * TILE),
                    b0 = in(reg) b.add(kb * TILE), b1 = in(reg) b1.add(kb * TILE), s = in(reg) stride,
                    options(nostack, readonly),
                );
            }
            asm!(
                "tilestored [{c00} + {s}], tmm0",
                "tilestored [{c01} + {s}], tmm1",
                "tilestored [{c10} + {s}], tmm2",
                "tilestored [{c11} + {s}], tmm3",
                c00 = in(reg) c, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11, s = in(reg) ldb,
                options(nostack),
            );
        }
    }

    /// 16 f32 values from `p` with stride 1, the first `valid` of them (zeros after).
    #[inline(always)]
    unsafe fn load16(p: *const f32, valid: usize) -> __m512 {
        let mask = if valid >= 16 { 0xffff } else { ((1u32 << valid) - 1) as u16 };
        // SAFETY: the caller guarantees `valid` readable values at `p` (masked lanes are not read).
        unsafe { _mm512_maskz_loadu_ps(mask, p) }
    }

    /// 16 lanes of bf16 pairs: lane `i` = (bf16(`lo[i]`), bf16(`hi[i]`)).
    #[inline(always)]
    unsafe fn pairs(lo: __m512, hi: __m512) -> __m512i {
        // SAFETY: register-only AVX-512 BF16 / AVX-512F operations (the caller's features).
        unsafe {
            let l = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(lo)));
            let h = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(hi)));
            _mm512_or_si512(l, _mm512_slli_epi32::<16>(h))
        }
    }

    /// 32 consecutive values (`lo` then `hi`) as 32 bf16 in order.
    #[inline(always)]
    unsafe fn bf16x32(lo: __m512, hi: __m512) -> __m512i {
        // SAFETY: register-only AVX-512 BF16 (the caller's features). `cvtne2ps_pbh(a, b)` puts
        // `b` in the low half.
        unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)) }
    }

    /// Transposes a 16 x 16 matrix of 32-bit lanes in place: four stages that swap the
    /// off-diagonal blocks of 8, 4, 2 and 1 lanes.
    #[inline(always)]
    unsafe fn transpose16(r: &mut [__m512i; 16]) {
        // SAFETY: register-only AVX-512F permutes (the caller's features).
        unsafe {
            for b in [8usize, 4, 2, 1] {
                let mut lo = [0i32; 16];
                let mut hi = [0i32; 16];
                for j in 0..16 {
                    let clear = j & b == 0;
                    lo[j] = if clear { j } else { 16 + j - b } as i32;
                    hi[j] = if clear { j + b } else { 16 + j } as i32;
                }
                let (lo, hi) = (_mm512_loadu_si512(lo.as_ptr().cast()), _mm512_loadu_si512(hi.as_ptr().cast()));
                for i in 0..16 {
                    if i & b == 0 {
                        let (x, y) = (r[i], r[i + b]);
                        r[i] = _mm512_permutex2var_epi32(x, lo, y);
                        r[i + b] = _mm512_permutex2var_epi32(x, hi, y);
                    }
                }
            }
        }
    }

    /// Packs `A` (m x k) into `[panel][k block]` tiles of 16 rows x 32 bf16.
    ///
    /// # Safety
    /// AVX-512 BF16; `a` reaches m x k values; `out` holds `panels(m) * kbn` tiles, all of which
    /// are written (zeros in the padding).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn pack_a(a: Strided<'_>, m: usize, k: usize, kbn: usize, out: &mut [u16]) {
        let v = a.v.as_ptr();
        // SAFETY: every read is of a valid (row < m, column < k) element, masked past the edges;
        // every write is within `out` (tile (ip, kb) at (ip * kbn + kb) * TILE).
        unsafe {
            if a.cs == 1 {
                // Every row of the padded panels: past m, zeros.
                for i in 0..panels(m) * TR {
                    let (ip, r) = (i / TR, i % TR);
                    for kb in 0..kbn {
                        let k0 = kb * KB;
                        let valid = if i < m { k.saturating_sub(k0).min(KB) } else { 0 };
                        let p = v.add(i * a.rs + k0);
                        let x = bf16x32(load16(p, valid), load16(p.add(16), valid.saturating_sub(16)));
                        _mm512_storeu_si512(out.as_mut_ptr().add((ip * kbn + kb) * TILE + r * KB).cast(), x);
                    }
                }
                return;
            }
            // Contiguous columns: pairs of k from two columns of 16 rows, then a transpose.
            // k blocks outside, so that the rows of the stored transpose are read in order.
            for kb in 0..kbn {
                for ip in 0..panels(m) {
                    let rows = m.saturating_sub(ip * TR).min(TR);
                    let mut t = [_mm512_setzero_si512(); 16];
                    for (p, tp) in t.iter_mut().enumerate() {
                        let (k0, k1) = (kb * KB + 2 * p, kb * KB + 2 * p + 1);
                        let col = |kk: usize| {
                            if kk < k { load16(v.add(ip * TR + kk * a.cs), rows) } else { _mm512_setzero_ps() }
                        };
                        *tp = pairs(col(k0), col(k1));
                    }
                    transpose16(&mut t);
                    let dst = out.as_mut_ptr().add((ip * kbn + kb) * TILE);
                    for (r, tr) in t.iter().enumerate() {
                        _mm512_storeu_si512(dst.add(r * KB).cast(), *tr);
                    }
                }
            }
        }
    }

    /// Packs `B` (k x n) into `[panel][k block]` tiles of 16 pairs (along k) x 16 columns.
    ///
    /// # Safety
    /// AVX-512 BF16; `b` reaches k x n values; `out` holds `panels(n) * kbn` tiles, all of which
    /// are written (zeros in the padding).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn pack_b(b: Strided<'_>, k: usize, n: usize, kbn: usize, out: &mut [u16]) {
        let v = b.v.as_ptr();
        // SAFETY: as in `pack_a`.
        unsafe {
            for jp in 0..panels(n) {
                let cols = n.saturating_sub(jp * TR).min(TR);
                for kb in 0..kbn {
                    let dst = out.as_mut_ptr().add((jp * kbn + kb) * TILE);
                    if b.cs == 1 {
                        // Contiguous rows: the pair of rows 2p, 2p+1 is tile row p.
                        for p in 0..TR {
                            let (k0, k1) = (kb * KB + 2 * p, kb * KB + 2 * p + 1);
                            let row = |kk: usize| {
                                if kk < k { load16(v.add(kk * b.rs + jp * TR), cols) } else { _mm512_setzero_ps() }
                            };
                            _mm512_storeu_si512(dst.add(p * KB).cast(), pairs(row(k0), row(k1)));
                        }
                    } else {
                        // Contiguous columns: 32 values of k of one column are 16 pairs; transpose.
                        let valid = k.saturating_sub(kb * KB).min(KB);
                        let mut t = [_mm512_setzero_si512(); 16];
                        for (c, tc) in t.iter_mut().enumerate().take(cols) {
                            let p = v.add((jp * TR + c) * b.cs + kb * KB);
                            *tc = bf16x32(load16(p, valid), load16(p.add(16), valid.saturating_sub(16)));
                        }
                        transpose16(&mut t);
                        for (p, tp) in t.iter().enumerate() {
                            _mm512_storeu_si512(dst.add(p * KB).cast(), *tp);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::grad::testutil::values;

    fn bf16_round(x: f32) -> f32 {
        half::bf16::from_f32(x).to_f32()
    }

    /// The product of the bf16-rounded operands in f64: what the kernel computes, up to the f32
    /// summation.
    fn reference(m: usize, n: usize, k: usize, a: Strided<'_>, b: Strided<'_>) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| bf16_round(a.v[i * a.rs + p * a.cs]) as f64 * bf16_round(b.v[p * b.rs + j * b.cs]) as f64)
                    .sum();
            }
        }
        c
    }

    #[test]
    fn products_match_the_bf16_rounded_reference_in_every_layout() {
        if !available() {
            println!("no AMX on this machine (or INFDIT_AMX=0): nothing to check");
            return;
        }
        // Growing and then shrinking: the packing buffers kept from a larger call hold stale values
        // that a smaller call's padding must overwrite.
        let sizes = [(1, 1, 1), (16, 16, 32), (32, 32, 64), (33, 47, 65), (100, 70, 130), (64, 256, 17), (7, 300, 512)];
        for (m, n, k) in sizes.into_iter().chain(sizes.into_iter().rev()) {
            let av = values(m as u64 * 31 + k as u64, m * k);
            let bv = values(n as u64 * 17 + k as u64 + 1, k * n);
            let c0 = values(5, m * n);
            for (at, bt) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = if at { Strided { v: &av, rs: 1, cs: m } } else { Strided { v: &av, rs: k, cs: 1 } };
                let b = if bt { Strided { v: &bv, rs: 1, cs: k } } else { Strided { v: &bv, rs: n, cs: 1 } };
                let want = reference(m, n, k, a, b);
                for acc in [false, true] {
                    let mut c = c0.clone();
                    matmul(m, n, k, a, b, &mut c, acc);
                    for (i, (&got, &w)) in c.iter().zip(&want).enumerate() {
                        let w = if acc { w + c0[i] as f64 } else { w };
                        // f32 sums of k products of magnitude <= 1.
                        let tol = 1e-6 * (k as f64 + 2.0);
                        assert!(
                            (got as f64 - w).abs() <= tol,
                            "({m},{n},{k}) at={at} bt={bt} acc={acc} [{i}]: {got} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_rows_handed_in() {
        if !available() {
            return;
        }
        // The same rows as one call and as two: the same bits (the sums do not depend on the block).
        let (m, n, k) = (70, 90, 200);
        let av = values(1, m * k);
        let bv = values(2, k * n);
        let b = Strided { v: &bv, rs: n, cs: 1 };
        let mut whole = vec![0f32; m * n];
        matmul(m, n, k, Strided { v: &av, rs: k, cs: 1 }, b, &mut whole, false);
        let mut parts = vec![0f32; m * n];
        let split = 37;
        matmul(split, n, k, Strided { v: &av, rs: k, cs: 1 }, b, &mut parts[..split * n], false);
        matmul(m - split, n, k, Strided { v: &av[split * k..], rs: k, cs: 1 }, b, &mut parts[split * n..], false);
        assert_eq!(whole, parts);
    }
}
