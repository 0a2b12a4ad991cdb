//! Vector primitives of the AVX2 + FMA and NEON paths, one module per instruction set with the
//! same names, for kernels written once as a macro over them (see `attention::lanes`).
//!
//! Every function is `unsafe` for one reason: it needs its module's CPU features (the callers
//! are compiled with them and entered only where [`super::Path::supported`] said yes); the
//! pointer functions also need `LANES` valid f32 values at the pointer.

/// AVX2 + FMA, 8 lanes of f32.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::super::EXP2_POLY as C;
    use std::arch::x86_64::*;

    /// One vector.
    pub(crate) type V = __m256;
    /// f32 lanes of a vector.
    pub(crate) const LANES: usize = 8;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn zero() -> V {
        _mm256_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn splat(x: f32) -> V {
        _mm256_set1_ps(x)
    }
    /// # Safety
    /// `p` valid for 8 reads.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn load(p: *const f32) -> V {
        // SAFETY: forwarded from the caller (unaligned load).
        unsafe { _mm256_loadu_ps(p) }
    }
    /// # Safety
    /// `p` valid for 8 writes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn store(p: *mut f32, v: V) {
        // SAFETY: forwarded from the caller (unaligned store).
        unsafe { _mm256_storeu_ps(p, v) }
    }
    /// `a * b + c`, one rounding.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn fma(a: V, b: V, c: V) -> V {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn add(a: V, b: V) -> V {
        _mm256_add_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn sub(a: V, b: V) -> V {
        _mm256_sub_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn max(a: V, b: V) -> V {
        _mm256_max_ps(a, b)
    }
    /// The sum of the lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn hsum(v: V) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
    /// The max of the lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn hmax(v: V) -> f32 {
        let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
    }
    /// 2^x for x < 127.5 (x below -127 gives 0; the attention takes it up to its lazy-max bound
    /// of 32): the degree-6 polynomial of the other paths on the fraction, the integer part put
    /// into the exponent.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn exp2(x: V) -> V {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-127.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
        let f = _mm256_sub_ps(x, n);
        let mut p = _mm256_set1_ps(C[6]);
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C[5]));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C[4]));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C[3]));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C[2]));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C[1]));
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(C[0]));
        // 2^n for n in -127..=127 (n = -127: bits 0, so the result is 0).
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(p, _mm256_castsi256_ps(e))
    }
}

/// aarch64 Advanced SIMD, 4 lanes of f32.
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon {
    use super::super::EXP2_POLY as C;
    use std::arch::aarch64::*;

    /// One vector.
    pub(crate) type V = float32x4_t;
    /// f32 lanes of a vector.
    pub(crate) const LANES: usize = 4;

    #[inline]
    #[target_feature(enable = "neon")]
    pub(crate) fn zero() -> V {
        vdupq_n_f32(0.0)
    }
    #[inline]
    #[target_feature(enable = "neon")]
    pub(crate) fn splat(x: f32) -> V {
        vdupq_n_f32(x)
    }
    /// # Safety
    /// `p` valid for 4 reads.
    #[inline]
    #[target_feature(enable = "neon")]
    pub(crate) unsafe fn load(p: *const f32) -> V {
        // SAFETY: forwarded from the caller (no alignment needed).
        unsafe { vld1q_f32(p) }
    }
    /// # Safety
    /// `p` valid for 4 writes.
    #[inline]
    #[target_feature(enable = "neon")]
    pub(crate) unsafe fn store(p: *mut f32, v: V) {
        // SAFETY: forwarded from the caller (no alignment needed).
        unsafe { vst1q_f32(p, v) }
    }
    /// `a * b + c`, one rounding.
    #[inline]
    #[target_feature(enable = "neon")]
    pub(crate) fn fma(a: V, b: V, c: V) -> V {
        vfmaq_f32(c, a, b)
    }
    #[inline]
    #[target_feature(enable = "neon")]
    pub(crate) fn add(a: V, b: V) -> V {
        vaddq_f32(a, b)
    }
    #[inline]
    #[target_feature(enable = "neon")]
    pub(crate) fn sub(a: V, b: V) -> V {
        vsubq_f32(a, b)
    }
    #[inline]
    #[target_feature(enable = "neon")]
    pub(crate) fn max(a: V, b: V) -> V {
        vmaxq_f32(a, b)
    }
    /// The sum of the lanes.
    #[inline]
    #[target_feature(enable = "neon")]
    pub(crate) fn hsum(v: V) -> f32 {
        vaddvq_f32(v)
    }
    /// The max of the lanes.
    #[inline]
    #[target_feature(enable = "neon")]
    pub(crate) fn hmax(v: V) -> f32 {
        vmaxvq_f32(v)
    }
    /// 2^x for x < 127.5 (x below -127 gives 0), as in the AVX2 module.
    #[inline]
    #[target_feature(enable = "neon")]
    pub(crate) fn exp2(x: V) -> V {
        let x = vmaxq_f32(x, vdupq_n_f32(-127.0));
        let n = vrndnq_f32(x);
        let f = vsubq_f32(x, n);
        let mut p = vdupq_n_f32(C[6]);
        p = vfmaq_f32(vdupq_n_f32(C[5]), p, f);
        p = vfmaq_f32(vdupq_n_f32(C[4]), p, f);
        p = vfmaq_f32(vdupq_n_f32(C[3]), p, f);
        p = vfmaq_f32(vdupq_n_f32(C[2]), p, f);
        p = vfmaq_f32(vdupq_n_f32(C[1]), p, f);
        p = vfmaq_f32(vdupq_n_f32(C[0]), p, f);
        let e = vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)));
        vmulq_f32(p, vreinterpretq_f32_s32(e))
    }
}
