//! Training: data, degradation and the optimisation loop.
//!
//! [`Trainer`] ([`trainer`]) runs the EDM training of the network (AdamW, clipping, EMA, exact
//! resume) on examples that [`Dataset`] ([`data`]) cuts from image folders.
//!
//! [`degrade()`] is the Real-ESRGAN second-order degradation (Wang et al., "Real-ESRGAN: Training
//! Real-World Blind Super-Resolution with Pure Synthetic Data", ICCVW 2021; BasicSR
//! `degradations.py` / `realesrgan_model.py`), which makes the LR training input from an HR crop.
//! [`kernels`] holds its blur kernels. Everything works on planar f32 RGB [`Image`]s in `[0, 1]`,
//! driven by the deterministic [`SplitMix64`] generator through the [`Sampler`] helpers.

pub mod bench;
pub mod data;
pub mod degrade;
pub mod kernels;
pub mod stages;
pub mod trainer;

pub use data::{Dataset, SampleConfig, TrainSample, collect_image_files};
pub use degrade::{ResizeMode, add_gaussian_noise, add_poisson_noise, degrade, filter2d, jpeg_roundtrip, resize};
pub use kernels::{Kernel, KernelKind, Profile, bessel_j1, bivariate_kernel, random_blur_kernel, sinc_kernel};
pub use stages::{DegradationConfig, StageConfig};

pub use crate::diffusion::noise::SplitMix64;
pub use trainer::{StepStats, TrainConfig, Trainer, edm_loss, edm_weight};

/// A planar (channel-major, then row-major) f32 image, values nominally in `[0, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// Channels (1 or 3).
    pub c: usize,
    /// Height in pixels.
    pub h: usize,
    /// Width in pixels.
    pub w: usize,
    /// `c * h * w` values, index `(ch * h + y) * w + x`.
    pub data: Vec<f32>,
}

impl Image {
    /// An image from its planar data.
    ///
    /// # Panics
    /// If `data.len() != c * h * w`.
    pub fn new(c: usize, h: usize, w: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), c * h * w, "Image::new: {} values do not hold {c}x{h}x{w}", data.len());
        Self { c, h, w, data }
    }
    /// A `c x h x w` image filled with `v`.
    pub fn filled(c: usize, h: usize, w: usize, v: f32) -> Self {
        Self { c, h, w, data: vec![v; c * h * w] }
    }
    /// The value at channel `ch`, row `y`, column `x`.
    pub fn at(&self, ch: usize, y: usize, x: usize) -> f32 {
        self.data[(ch * self.h + y) * self.w + x]
    }
    /// Clamp every value to `[0, 1]` in place.
    pub fn clamp01(&mut self) {
        for v in &mut self.data {
            *v = v.clamp(0.0, 1.0);
        }
    }
}

/// Sampling helpers on top of a 64-bit generator.
pub trait Sampler {
    /// 64 random bits.
    fn bits(&mut self) -> u64;
    /// Uniform in `[0, 1)`, 53 bits.
    fn unit(&mut self) -> f64 {
        (self.bits() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in `[a, b)` (`a` when `a == b`).
    fn uniform(&mut self, a: f64, b: f64) -> f64 {
        a + (b - a) * self.unit()
    }
    /// Standard normal (Box-Muller, one of the pair).
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit(); // (0, 1]
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    /// An index drawn with the given (not necessarily normalised, non-negative) weights.
    ///
    /// # Panics
    /// If `probs` is empty or sums to zero.
    fn choice(&mut self, probs: &[f64]) -> usize {
        let total: f64 = probs.iter().sum();
        assert!(!probs.is_empty() && total > 0.0, "choice: weights must be non-empty with a positive sum");
        let mut u = self.unit() * total;
        for (i, &p) in probs.iter().enumerate() {
            if u < p {
                return i;
            }
            u -= p;
        }
        probs.iter().rposition(|&p| p > 0.0).unwrap_or(0)
    }
    /// Uniform integer in `[0, n)`.
    fn below(&mut self, n: usize) -> usize {
        ((self.unit() * n as f64) as usize).min(n.saturating_sub(1))
    }
    /// A Poisson variate with mean `lam >= 0` (Knuth's product method below 10, Hörmann's PTRS
    /// transformed rejection above).
    fn poisson(&mut self, lam: f64) -> u64 {
        if lam <= 0.0 {
            return 0;
        }
        if lam < 10.0 {
            let l = (-lam).exp();
            let mut k = 0u64;
            let mut p = self.unit();
            while p > l {
                k += 1;
                p *= self.unit();
            }
            return k;
        }
        let slam = lam.sqrt();
        let loglam = lam.ln();
        let b = 0.931 + 2.53 * slam;
        let a = -0.059 + 0.02483 * b;
        let inv_alpha = 1.1239 + 1.1328 / (b - 3.4);
        let vr = 0.9277 - 3.6224 / (b - 2.0);
        loop {
            let u = self.unit() - 0.5;
            let v = self.unit();
            let us = 0.5 - u.abs();
            let k = ((2.0 * a / us + b) * u + lam + 0.43).floor();
            if us >= 0.07 && v <= vr {
                return k as u64;
            }
            if k < 0.0 || (us < 0.013 && v > us) {
                continue;
            }
            if v.ln() + inv_alpha.ln() - (a / (us * us) + b).ln() <= -lam + k * loglam - ln_factorial(k) {
                return k as u64;
            }
        }
    }
}

impl Sampler for SplitMix64 {
    fn bits(&mut self) -> u64 {
        self.next_u64()
    }
}

/// `ln(k!)`: exact sum below 20, Stirling's series (error < 1e-12) above.
fn ln_factorial(k: f64) -> f64 {
    if k < 20.0 {
        (2..=k as u64).map(|i| (i as f64).ln()).sum()
    } else {
        let n = k + 1.0; // ln Gamma(n)
        (n - 0.5) * n.ln() - n + 0.5 * (2.0 * std::f64::consts::PI).ln() + 1.0 / (12.0 * n) - 1.0 / (360.0 * n.powi(3))
            + 1.0 / (1260.0 * n.powi(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_moments() {
        let mut r = SplitMix64::new(1);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let m = xs.iter().sum::<f64>() / n as f64;
        let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n as f64;
        assert!(m.abs() < 0.01 && (v - 1.0).abs() < 0.01, "mean {m} var {v}");
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[r.choice(&[0.2, 0.7, 0.1])] += 1;
        }
        for (c, p) in counts.iter().zip([0.2, 0.7, 0.1]) {
            assert!((*c as f64 / n as f64 - p).abs() < 0.005, "{counts:?}");
        }
        for lam in [0.5, 4.0, 12.0, 100.0, 256.0] {
            let ks: Vec<f64> = (0..50_000).map(|_| r.poisson(lam) as f64).collect();
            let m = ks.iter().sum::<f64>() / ks.len() as f64;
            let v = ks.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / ks.len() as f64;
            assert!((m - lam).abs() < 0.03 * lam.max(1.0), "lam {lam}: mean {m}");
            assert!((v - lam).abs() < 0.05 * lam.max(1.0), "lam {lam}: var {v}");
        }
    }

    #[test]
    fn ln_factorial_matches_sum() {
        for k in [0u64, 1, 5, 19, 20, 30, 200] {
            let exact: f64 = (2..=k).map(|i| (i as f64).ln()).sum();
            assert!((ln_factorial(k as f64) - exact).abs() < 1e-9 * exact.max(1.0), "k={k}");
        }
    }
}
