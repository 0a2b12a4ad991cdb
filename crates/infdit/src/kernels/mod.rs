//! Hand-written CPU kernels for inference, and the choice of instruction set they run on.
//!
//! * [`attention`]: fused attention with an online softmax (no score matrix in memory);
//! * [`fused`]: the element-wise chains of the DiT layer (LayerNorm + adaLN modulation, QKV
//!   split + QK-norm + RoPE, bias + GELU, bias + residual) in one pass each;
//! * [`bf16_gemm`]: bf16 dense layers on AVX-512 BF16 dot products.
//!
//! Every kernel has a plain reference (candle ops) that its tests compare it with.

use candle_core::{DType, Result, Storage, Tensor, WithDType};
use half::{bf16, f16};
use std::sync::OnceLock;

pub mod attention;
pub mod bf16_gemm;
pub mod fused;

/// Whether the CPU has the AVX-512 BF16 dot product (`vdpbf16ps`) and `INFDIT_BF16_DOT=0` does
/// not turn it off.
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
    // Round to nearest through the 1.5 * 2^23 trick (|x| < 2^22).
    let n = (x + 12_582_912.0) - 12_582_912.0;
    let f = x - n;
    let c = EXP2_POLY;
    let p = ((((((c[6] * f + c[5]) * f + c[4]) * f + c[3]) * f + c[2]) * f + c[1]) * f) + c[0];
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
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
