//! Hand-written CPU kernels for inference, and the choice of instruction set they run on.
//!
//! * [`attention`]: fused attention with an online softmax (no score matrix in memory);
//! * [`fused`]: the element-wise chains of the DiT layer (LayerNorm + adaLN modulation, QKV
//!   split + QK-norm + RoPE, bias + GELU, bias + residual) in one pass each;
//! * [`bf16_gemm`]: bf16 dense layers on AVX-512 BF16 dot products;
//! * [`gather`]: the block scheduler's key/value neighbourhood in one copy.
//!
//! Every kernel has a plain reference (candle ops) that its tests compare it with.
//!
//! **Paths.** Each kernel has versions for several instruction sets ([`Path`]): `avx512`
//! (AVX-512F), `avx2` (AVX2 + FMA), `neon` (aarch64 Advanced SIMD) and `portable` (plain Rust the
//! compiler vectorises for the baseline target, and the `gemm` crate inside the attention). The
//! best path the CPU supports is picked at run time; `INFDIT_KERNELS=avx512|avx2|neon|portable` in
//! the environment asks for another one (clamped to what the CPU supports, with a note on stderr
//! when it is not), and [`with_path`] forces one on the calling thread (the tests run each path the
//! machine can run). Each public kernel reads the path once, on the thread that calls it.

use candle_core::{DType, Result, Storage, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;
use std::cell::Cell;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Defines a row function `$name(path, ...)` whose `$body` is compiled three times on x86-64: for
/// AVX-512F, for AVX2 + FMA and for the baseline target (which is NEON on aarch64); `path`
/// picks one (the compiler vectorises the loops for each; no FMA contraction is allowed, so the
/// three give the same bits). Generic over an element type `<T>` ([`Elem`]) or not.
macro_rules! multiversion {
    ($vis:vis fn $name:ident <$T:ident> ($($p:ident : $ty:ty),*) $body:block) => {
        #[inline(always)]
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<$T: $crate::kernels::Elem>(path: $crate::kernels::Path, $($p: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                fn wide<$T: $crate::kernels::Elem>($($p: $ty),*) $body
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2<$T: $crate::kernels::Elem>($($p: $ty),*) $body
                match path {
                    // SAFETY: a path is only chosen where the CPU supports it
                    // (`Path::supported`, checked by `kernels::path`).
                    $crate::kernels::Path::Avx512 => return unsafe { wide::<$T>($($p),*) },
                    // SAFETY: as above.
                    $crate::kernels::Path::Avx2 => return unsafe { avx2::<$T>($($p),*) },
                    _ => {}
                }
            }
            let _ = path;
            #[allow(clippy::too_many_arguments)]
            fn narrow<$T: $crate::kernels::Elem>($($p: $ty),*) $body
            narrow::<$T>($($p),*)
        }
    };
    ($vis:vis fn $name:ident ($($p:ident : $ty:ty),*) $body:block) => {
        #[inline(always)]
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(path: $crate::kernels::Path, $($p: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                fn wide($($p: $ty),*) $body
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($p: $ty),*) $body
                match path {
                    // SAFETY: a path is only chosen where the CPU supports it
                    // (`Path::supported`, checked by `kernels::path`).
                    $crate::kernels::Path::Avx512 => return unsafe { wide($($p),*) },
                    // SAFETY: as above.
                    $crate::kernels::Path::Avx2 => return unsafe { avx2($($p),*) },
                    _ => {}
                }
            }
            let _ = path;
            #[allow(clippy::too_many_arguments)]
            fn narrow($($p: $ty),*) $body
            narrow($($p),*)
        }
    };
}
pub(crate) use multiversion;

pub(crate) mod amx;
pub mod attention;
pub mod bf16_gemm;
pub mod fused;
pub mod gather;
pub(crate) mod simd;

/// An instruction set the kernels are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// Plain Rust, vectorised by the compiler for the baseline target (SSE2 on x86-64, NEON on
    /// aarch64); the attention's products on the `gemm` crate.
    Portable,
    /// x86-64 AVX2 + FMA.
    Avx2,
    /// x86-64 AVX-512F (and AVX-512 BF16 where the CPU has it, for bf16 operands).
    Avx512,
    /// aarch64 Advanced SIMD.
    Neon,
}

impl Path {
    /// Every path, fastest first.
    pub const ALL: [Path; 4] = [Path::Avx512, Path::Avx2, Path::Neon, Path::Portable];

    /// The name used by `INFDIT_KERNELS` and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Path::Portable => "portable",
            Path::Avx2 => "avx2",
            Path::Avx512 => "avx512",
            Path::Neon => "neon",
        }
    }

    /// The path of that name.
    pub fn from_name(s: &str) -> Option<Path> {
        Path::ALL.into_iter().find(|p| p.name() == s.trim().to_ascii_lowercase())
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            Path::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "aarch64")]
            Path::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The paths this CPU can run, fastest first (always ends with [`Path::Portable`]).
pub fn supported_paths() -> Vec<Path> {
    Path::ALL.into_iter().filter(|p| p.supported()).collect()
}

/// The path of `INFDIT_KERNELS` (when set) clamped to this CPU, else the fastest it supports.
pub fn default_path() -> Path {
    static DEFAULT: OnceLock<Path> = OnceLock::new();
    *DEFAULT.get_or_init(|| {
        let best = supported_paths()[0];
        let Ok(want) = std::env::var("INFDIT_KERNELS") else { return best };
        match Path::from_name(&want) {
            Some(p) if p.supported() => p,
            Some(p) => {
                let fallback = if p == Path::Avx512 && Path::Avx2.supported() { Path::Avx2 } else { Path::Portable };
                eprintln!("INFDIT_KERNELS={want}: this CPU cannot run the {p} kernels; using {fallback}");
                fallback
            }
            None => {
                eprintln!("INFDIT_KERNELS={want}: unknown kernel path (avx512, avx2, neon or portable); using {best}");
                best
            }
        }
    })
}

thread_local! {
    /// The path forced on this thread by [`with_path`].
    static FORCED: Cell<Option<Path>> = const { Cell::new(None) };
}

/// The path the kernels called from this thread run: the one [`with_path`] forces, else
/// [`default_path`].
pub fn path() -> Path {
    FORCED.with(Cell::get).unwrap_or_else(default_path)
}

/// Runs `f` with the kernels called from this thread on path `p` (for tests and benchmarks).
/// Errors where the CPU cannot run `p`.
pub fn with_path<R>(p: Path, f: impl FnOnce() -> R) -> Result<R> {
    if !p.supported() {
        candle_core::bail!("kernel path {p} is not supported by this CPU")
    }
    struct Restore(Option<Path>);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCED.with(|c| c.replace(Some(p))));
    Ok(f())
}

/// Whether the CPU has the AVX-512 BF16 dot product (`vdpbf16ps`) and `INFDIT_BF16_DOT=0` does
/// not turn it off; the bf16 kernels use it on the [`Path::Avx512`] path only.
pub fn cpu_has_bf16_dot() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let enabled = std::env::var("INFDIT_BF16_DOT").map(|v| v != "0").unwrap_or(true);
        #[cfg(target_arch = "x86_64")]
        let has = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bf16");
        #[cfg(not(target_arch = "x86_64"))]
        let has = false;
        enabled && has
    })
}

/// Whether the bf16 dot-product kernels run for calls from this thread: the path is
/// [`Path::Avx512`] and [`cpu_has_bf16_dot`].
pub fn bf16_dot() -> bool {
    path() == Path::Avx512 && cpu_has_bf16_dot()
}

/// The kernel path of calls from this thread and the instructions beyond it that its kernels use,
/// for messages and bug reports: `avx512 (bf16 dot product, AMX tiles)`, `avx2`, `neon`, `portable`.
pub fn describe() -> String {
    let p = path();
    let mut extra = Vec::new();
    if bf16_dot() {
        extra.push("bf16 dot product");
    }
    if MatmulPrecision::bf16_runs() {
        extra.push("AMX tiles");
    }
    if extra.is_empty() { p.name().to_owned() } else { format!("{p} ({})", extra.join(", ")) }
}

/// A read-only matrix view: element `(i, j)` at `v[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a> {
    /// The values the view reaches into.
    pub v: &'a [f32],
    /// Stride between rows.
    pub rs: usize,
    /// Stride between columns.
    pub cs: usize,
}

impl Strided<'_> {
    /// The largest index a `rows x cols` view reaches, plus one.
    fn reach(&self, rows: usize, cols: usize) -> usize {
        if rows == 0 || cols == 0 { 0 } else { (rows - 1) * self.rs + (cols - 1) * self.cs + 1 }
    }
}

/// How the training products (dense layers, attention) are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatmulPrecision {
    /// f32 operands and sums (the `gemm` crate).
    #[default]
    F32,
    /// Operands rounded to bf16, sums in f32, on AMX tiles ([`amx`]) where the CPU has them and the
    /// kernel path is `avx512`; elsewhere as [`MatmulPrecision::F32`].
    Bf16,
}

impl MatmulPrecision {
    /// The name used in flags and reports.
    pub fn name(self) -> &'static str {
        match self {
            MatmulPrecision::F32 => "f32",
            MatmulPrecision::Bf16 => "bf16",
        }
    }

    /// What runs for calls from this thread: [`MatmulPrecision::Bf16`] only where the kernel path
    /// is [`Path::Avx512`] and [`amx::available`].
    pub fn effective(self) -> MatmulPrecision {
        if self == MatmulPrecision::Bf16 && path() == Path::Avx512 && amx::available() {
            MatmulPrecision::Bf16
        } else {
            MatmulPrecision::F32
        }
    }

    /// Whether [`MatmulPrecision::Bf16`] runs as bf16 for calls from this thread (its
    /// [`effective`](Self::effective) precision is itself: AMX, on the `avx512` path).
    pub fn bf16_runs() -> bool {
        MatmulPrecision::Bf16.effective() == MatmulPrecision::Bf16
    }

    /// `C = A B` (`+=` with `acc`), single-threaded, in this precision (callers pass an
    /// [`effective`](Self::effective) one, resolved on the thread that chose it): `A` is m x k, or
    /// stored k x m when `at`; `B` is k x n, or stored n x k when `bt`; `C` is m x n, row-major.
    /// Panics where an operand is too short.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        self,
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        at: bool,
        b: &[f32],
        bt: bool,
        c: &mut [f32],
        acc: bool,
    ) {
        let a = if at { Strided { v: a, rs: 1, cs: m } } else { Strided { v: a, rs: k, cs: 1 } };
        let b = if bt { Strided { v: b, rs: 1, cs: k } } else { Strided { v: b, rs: n, cs: 1 } };
        self.matmul_strided(m, n, k, a, b, c, acc)
    }

    /// [`matmul_strided`] in this precision.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matmul_strided(
        self,
        m: usize,
        n: usize,
        k: usize,
        a: Strided<'_>,
        b: Strided<'_>,
        c: &mut [f32],
        acc: bool,
    ) {
        if self == MatmulPrecision::Bf16 && amx::available() && amx::supports(&a, &b) {
            amx::matmul(m, n, k, a, b, c, acc)
        } else {
            matmul_strided(m, n, k, a, b, c, acc)
        }
    }
}

impl std::fmt::Display for MatmulPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether `a` holds an m x k view, `b` a k x n view and `c` m x n values: the bounds every product
/// on these operands relies on.
fn operands_fit(m: usize, n: usize, k: usize, a: &Strided<'_>, b: &Strided<'_>, c: &[f32]) -> bool {
    a.v.len() >= a.reach(m, k) && b.v.len() >= b.reach(k, n) && c.len() >= m * n
}

/// `C` (m x n, row-major) `= A B` (`+=` with `acc`) on strided views, `A` m x k and `B` k x n, in
/// f32, single-threaded (the callers parallelise over independent products, which keeps every
/// result independent of the thread count); each product summed in the gemm crate's fixed order.
pub(crate) fn matmul_strided(m: usize, n: usize, k: usize, a: Strided<'_>, b: Strided<'_>, c: &mut [f32], acc: bool) {
    assert!(operands_fit(m, n, k, &a, &b, c), "matmul: operand too short");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the assert bounds every index the strides reach: A's (i, p) is at i*a.rs + p*a.cs <
    // a.reach(m, k) <= a.v.len(), B's (p, j) likewise, C's (i, j) at i*n + j < m*n <= c.len(); C is
    // a unique borrow, disjoint from A and B.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            acc,
            a.v.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.v.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Whether the fused kernels apply to these tensors: all on the CPU, none in an autograd graph.
pub fn applies(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && !t.track_op())
}

/// An element type read and written by the kernels.
pub(crate) trait Elem: WithDType + Copy + Send + Sync + 'static {
    /// To f32 (exact).
    fn to_f32(self) -> f32;
    /// From f32 (rounded to nearest even).
    fn from_f32(x: f32) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// The f32 values of a small parameter vector (weights, biases, modulation vectors).
pub(crate) fn vec_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()
}

/// Runs `f` on the contiguous slice of a CPU tensor of element type `T`.
pub(crate) fn with_slice<T: Elem, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(cs) = &*s else { candle_core::bail!("fused kernel: expected a CPU tensor") };
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("fused kernel: expected a contiguous tensor") };
    let data = T::cpu_storage_as_slice(cs)?;
    Ok(f(&data[a..b]))
}

/// `len` values written by `fill`, which runs in parallel on disjoint chunks of `chunk` values (the
/// last may be shorter), given each chunk's index: the output buffer of a fused kernel, without first
/// zeroing memory that is about to be overwritten (`vec![0; len]` memsets it: about 3 % of a CPU
/// upscale in a profile, before the writes).
///
/// # Safety
/// `fill` must write every value of the chunk it is given (or panic).
pub(crate) unsafe fn par_filled<T: Send>(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync + Send,
) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len].par_chunks_mut(chunk.max(1)).enumerate().for_each(|(i, c)| fill(i, c));
    // SAFETY: the caller's `fill` wrote each of the `len` values (a panic in it propagated out of
    // `for_each` before this point, leaving the vector empty).
    unsafe { out.set_len(len) };
    out
}

/// 2^f on [-0.5, 0.5]: degree-6 minimax fit of the relative error (1.9e-9 before rounding; 0.66
/// ulp worst case evaluated in f32 with FMA). The linear coefficient rounds to ln 2 in f32.
pub(crate) const EXP2_POLY: [f32; 7] =
    [1.0, std::f32::consts::LN_2, 0.240_226_46, 0.055_503_286, 0.009_618_489, 0.001_339_993_1, 0.000_153_458_12];

/// 2^x for x <= 0 without a libm call, so that loops over it vectorise: the degree-6 polynomial
/// of the SIMD paths (without FMA), x clamped to -126 (so the result stays normal; below that
/// it is ~1e-38 instead of 0); NaN stays NaN.
#[inline(always)]
pub(crate) fn exp2_portable(x: f32) -> f32 {
    let x = if x < -126.0 { -126.0 } else { x };
    let (f, two_n) = split_exp2(x);
    let c = EXP2_POLY;
    let p = ((((((c[6] * f + c[5]) * f + c[4]) * f + c[3]) * f + c[2]) * f + c[1]) * f) + c[0];
    p * two_n
}

/// `x = n + f` with `n` the integer nearest to `x` and `|f| <= 1/2`: returns `(f, 2^n)`, for
/// `-126 <= x < 128` (|x| < 2^22 for the rounding). The rounding is the 1.5 * 2^23 trick, `t = x +
/// 1.5 * 2^23 = 1.5 * 2^23 + n` exactly, and `2^n` comes from t's bits, which are those of 1.5 *
/// 2^23 plus n: the same bits as `f32::from_bits(((n as i32 + 127) << 23) as u32)`, but integer
/// arithmetic on the float's bits vectorises, where the saturating `as i32` became a scalar loop of
/// compares and inserts (a third of the GELU kernel's time, a quarter of the training softmax's).
#[inline(always)]
pub(crate) fn split_exp2(x: f32) -> (f32, f32) {
    let t = x + 12_582_912.0;
    let n = t - 12_582_912.0;
    (x - n, f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23))
}

/// A sum with 16 independent partial sums (vectorisable, and more accurate than a serial sum).
#[inline(always)]
pub(crate) fn sum_f32(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, y) in acc.iter_mut().zip(c) {
            *a += y;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// `sum_i f(x_i)` with the 16 partial sums of [`sum_f32`] (vectorisable when `f` is).
#[inline(always)]
pub(crate) fn sum_map_f32(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, &y) in acc.iter_mut().zip(c) {
            *a += f(y);
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().map(|&y| f(y)).sum::<f32>()
}

/// The dot product of `a` and `b` (equal lengths) with 16 partial sums, as [`sum_f32`].
#[inline(always)]
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (mut ca, mut cb) = (a.chunks_exact(16), b.chunks_exact(16));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    acc.iter().sum::<f32>() + ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum::<f32>()
}

/// Deterministic random tensors for the kernels' unit tests.
#[cfg(test)]
pub(crate) mod test_rand {
    use candle_core::{Device, Tensor};

    /// Uniform values in [-amp, amp] from a 64-bit LCG, f32 on the CPU.
    pub fn rand(seed: u64, shape: &[usize], amp: f32) -> Tensor {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_and_portable_is_always_there() {
        for p in Path::ALL {
            assert_eq!(Path::from_name(p.name()), Some(p));
        }
        assert_eq!(Path::from_name(" AVX2 "), Some(Path::Avx2));
        assert_eq!(Path::from_name("sse"), None);
        let s = supported_paths();
        assert_eq!(s.last(), Some(&Path::Portable));
        assert!(s.contains(&default_path()));
        println!("paths this CPU runs: {s:?}");
    }

    #[test]
    fn describe_names_the_path_and_its_extras() {
        for p in supported_paths() {
            let d = with_path(p, describe).unwrap();
            assert!(d == p.name() || d.starts_with(&format!("{p} (")), "{d}");
            // The extras are AVX-512 instructions: only that path lists any.
            assert_eq!(d.contains('('), p == Path::Avx512 && (cpu_has_bf16_dot() || amx::available()), "{d}");
        }
        assert_eq!(with_path(Path::Portable, describe).unwrap(), "portable");
    }

    #[test]
    fn with_path_forces_and_restores() {
        let before = path();
        for p in supported_paths() {
            assert_eq!(with_path(p, path).unwrap(), p);
            // Nested: the inner one wins, the outer one comes back.
            with_path(p, || {
                with_path(Path::Portable, || assert_eq!(path(), Path::Portable)).unwrap();
                assert_eq!(path(), p);
            })
            .unwrap();
        }
        assert_eq!(path(), before);
        for p in Path::ALL.into_iter().filter(|p| !p.supported()) {
            assert!(with_path(p, || ()).is_err(), "{p}");
        }
    }

    #[test]
    fn exp2_portable_takes_2_to_the_n_from_the_bits() {
        // The integer part through `as i32`, as before the bit trick: the same bits everywhere.
        let by_cast = |x: f32| {
            let x = if x < -126.0 { -126.0 } else { x };
            let n = (x + 12_582_912.0) - 12_582_912.0;
            let f = x - n;
            let c = EXP2_POLY;
            let p = ((((((c[6] * f + c[5]) * f + c[4]) * f + c[3]) * f + c[2]) * f + c[1]) * f) + c[0];
            p * f32::from_bits(((n as i32 + 127) << 23) as u32)
        };
        let mut worst = 0f64;
        for i in 0..=2_000_000 {
            let x = -130.0 + 130.0 * i as f32 / 2_000_000.0;
            let (got, cast) = (exp2_portable(x), by_cast(x));
            assert_eq!(got.to_bits(), cast.to_bits(), "x = {x}");
            if x >= -126.0 {
                worst = worst.max(((got as f64) / (x as f64).exp2() - 1.0).abs());
            }
        }
        assert!(worst < 3e-7, "relative error {worst}");
        // The split itself, as the training softmax's `exp_nonpos` uses it, on [-126, 128).
        for i in 0..=2_540_000 {
            let x = -126.0 + i as f32 / 10_000.0;
            let n = (x + 12_582_912.0) - 12_582_912.0;
            let (f, two_n) = split_exp2(x);
            assert_eq!((f.to_bits(), two_n.to_bits()), ((x - n).to_bits(), ((n as i32 + 127) << 23) as u32), "x = {x}");
        }
        assert_eq!(exp2_portable(0.0), 1.0);
        assert_eq!(exp2_portable(-1.0), 0.5);
        assert!(exp2_portable(f32::NAN).is_nan());
        assert_eq!(exp2_portable(-1000.0), exp2_portable(-126.0));
    }
}
