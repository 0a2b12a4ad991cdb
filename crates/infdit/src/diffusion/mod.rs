//! EDM preconditioning (spec §3.7), the sigma schedule and the deterministic Heun sampler (§5), and
//! the seeded noise generator.

pub mod gate;
pub mod noise;

use candle_core::{Result, Tensor};

use gate::FlatGate;

pub use crate::config::Precond;

/// EDM's data standard deviation used by Inf-DiT.
pub const SIGMA_DATA: f32 = 0.5;

/// The four EDM scalings for one sigma, computed in f32 in the reference's operation order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EdmScalings {
    /// `sd^2 / (s^2 + sd^2)`
    pub c_skip: f32,
    /// `s sd / sqrt(s^2 + sd^2)`
    pub c_out: f32,
    /// `1 / sqrt(s^2 + sd^2)`
    pub c_in: f32,
    /// `ln(s) / 4`
    pub c_noise: f32,
}

impl EdmScalings {
    /// The released scalings (`sigma_data` 0.5) for `sigma` > 0.
    pub fn new(sigma: f32) -> Self {
        Self::with_sigma_data(sigma, SIGMA_DATA)
    }

    /// Scalings for `sigma` > 0 and a data standard deviation `sd`.
    pub fn with_sigma_data(sigma: f32, sd: f32) -> Self {
        let sd2 = sd * sd;
        let den = sigma * sigma + sd2;
        let root = den.sqrt();
        Self { c_skip: sd2 / den, c_out: sigma * sd / root, c_in: 1.0 / root, c_noise: sigma.ln() / 4.0 }
    }
}

impl Precond {
    /// The scalings for `sigma` > 0.
    pub fn scalings(&self, sigma: f32) -> EdmScalings {
        EdmScalings::with_sigma_data(sigma, self.sigma_data)
    }

    /// The network input for state `x` and upsampled LR `up` (both (n, 3, h, w), the same pixels):
    /// `[c_in x || c_in up]` (released; the LR scaled too, as the released weights expect) or
    /// `[c_in^2 sd (x - up) || up]` (residual): the noisy residual is scaled by `c_in` and once more
    /// by `sd c_in = sd / sqrt(s^2 + sd^2)`, which is 1 at low noise and falls as `sd / s` where
    /// the state is nearly all noise, so a one-step sample from high noise is a regression from
    /// the LR alone instead of a network learning to ignore a unit-variance noise input.
    pub fn network_input(&self, x: &Tensor, up: &Tensor, s: &EdmScalings) -> Result<Tensor> {
        if self.residual {
            let scale = s.c_in as f64 * s.c_in as f64 * self.sigma_data as f64;
            Tensor::cat(&[((x - up)? * scale)?, up.clone()], 1)
        } else {
            Tensor::cat(&[(x * s.c_in as f64)?, (up * s.c_in as f64)?], 1)
        }
    }

    /// The denoised image from the network output `f`: `c_out f + c_skip x` (released) or
    /// `c_out f + c_skip (x - up) + up` (residual), the residual `c_out f + c_skip (x - up)` cored
    /// when the model asks for it ([`Precond::core`]) and then scaled by `gate` (n or 1, 1, h, w;
    /// [`Precond::flat_gate_of`]) where one is given.
    pub fn denoised(
        &self,
        f: Tensor,
        x: &Tensor,
        up: &Tensor,
        s: &EdmScalings,
        gate: Option<&Tensor>,
    ) -> Result<Tensor> {
        if self.residual {
            let r = self.core(((f * s.c_out as f64)? + ((x - up)? * s.c_skip as f64)?)?)?;
            match gate {
                Some(g) => r.broadcast_mul(&g.to_dtype(r.dtype())?)? + up,
                None => r + up,
            }
        } else {
            (f * s.c_out as f64)? + (x * s.c_skip as f64)?
        }
    }

    /// The flat-area gate of one image that the model asks for ([`crate::config::Precond::flat_gate`]),
    /// from the LR the network sees (1, 3, h, w), for an output of `height x width`; `None` without
    /// one (and for the released preconditioning, which has none).
    pub fn flat_gate_of(&self, lr: &Tensor, height: usize, width: usize) -> Result<Option<FlatGate>> {
        self.gate_range().map(|full| FlatGate::new(lr, full, height, width)).transpose()
    }

    /// The flat gate's full range where the model runs with one: set, and in residual mode.
    pub fn gate_range(&self) -> Option<f32> {
        self.flat_gate.filter(|_| self.residual)
    }

    /// Coring of a denoised residual `r` (see [`Precond`]): with thresholds `[low, high]`,
    /// `sign(r) max(0, min(|r|, high (|r| - low) / (high - low)))` elementwise (0 up to `low`, `r`
    /// from `high` on, linear in between); `r` itself without coring.
    pub fn core(&self, r: Tensor) -> Result<Tensor> {
        let Some([low, high]) = self.coring else { return Ok(r) };
        let (low, high) = (low as f64, high as f64);
        let a = r.abs()?;
        let ramp = ((&a - low)? * (high / (high - low)))?;
        r.sign()? * a.minimum(&ramp)?.relu()?
    }

    /// The EDM loss weight `(sigma^2 + sigma_data^2) / (sigma sigma_data)^2`.
    pub fn loss_weight(&self, sigma: f64) -> f64 {
        let sd = self.sigma_data as f64;
        (sigma * sigma + sd * sd) / (sigma * sd).powi(2)
    }
}

/// The sampler's settings. Defaults are the released ones.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeunConfig {
    /// Number of sigmas before the final 0 (the reference: 20, i.e. 39 network evaluations).
    pub steps: usize,
    /// Smallest nonzero sigma.
    pub sigma_min: f32,
    /// Largest sigma.
    pub sigma_max: f32,
    /// Karras rho.
    pub rho: f32,
}

impl Default for HeunConfig {
    fn default() -> Self {
        Self { steps: 20, sigma_min: 0.002, sigma_max: 40.0, rho: 7.0 }
    }
}

impl HeunConfig {
    /// Most sampler steps accepted (the reference uses 20; the schedule is allocated up front).
    pub const MAX_STEPS: usize = crate::config::SamplerDefaults::MAX_STEPS;
    /// Largest starting sigma accepted (the released model uses 40, EDM 80; far larger values
    /// only overflow f32 in the preconditioning).
    pub const MAX_SIGMA: f32 = crate::config::SamplerDefaults::MAX_SIGMA;

    /// Checks the settings: 1..=[`Self::MAX_STEPS`] steps, `0 < sigma_min < sigma_max <=`
    /// [`Self::MAX_SIGMA`], a finite positive rho.
    pub fn validate(&self) -> std::result::Result<(), crate::error::InfditError> {
        let bad = |m: String| Err(crate::error::InfditError::Config(m));
        if self.steps == 0 || self.steps > Self::MAX_STEPS {
            return bad(format!("sampler steps {} must be between 1 and {}", self.steps, Self::MAX_STEPS));
        }
        if !(self.sigma_min.is_finite() && self.sigma_min > 0.0) {
            return bad(format!("sigma_min {} must be a positive number", self.sigma_min));
        }
        if !(self.sigma_max > self.sigma_min && self.sigma_max <= Self::MAX_SIGMA) {
            return bad(format!(
                "sigma_max {} must be above sigma_min {} and at most {}",
                self.sigma_max,
                self.sigma_min,
                Self::MAX_SIGMA
            ));
        }
        if !(self.rho.is_finite() && self.rho > 0.0) {
            return bad(format!("rho {} must be a positive number", self.rho));
        }
        Ok(())
    }

    /// The Karras schedule `(max^(1/rho) + ramp (min^(1/rho) - max^(1/rho)))^rho` in f32, as the
    /// reference evaluates it (f32 `linspace` ramp, scalars rounded to f32, f32 power), with a final 0
    /// appended: `steps + 1` values.
    pub fn sigmas(&self) -> Vec<f32> {
        let n = self.steps;
        let inv_rho = 1.0 / self.rho as f64;
        let max_inv = (self.sigma_max as f64).powf(inv_rho);
        let min_inv = (self.sigma_min as f64).powf(inv_rho);
        let diff = (min_inv - max_inv) as f32;
        let step = if n > 1 { 1.0f32 / (n - 1) as f32 } else { 0.0 };
        let mut out: Vec<f32> = (0..n)
            .map(|i| {
                // torch.linspace fills the second half from the end to keep it symmetric.
                let ramp = if n == 1 {
                    0.0
                } else if i < n / 2 {
                    step * i as f32
                } else {
                    1.0 - step * (n - 1 - i) as f32
                };
                let base = max_inv as f32 + ramp * diff;
                (base as f64).powf(self.rho as f64) as f32
            })
            .collect();
        out.push(0.0);
        out
    }

    /// Number of network evaluations for a full run.
    pub fn evaluations(&self) -> usize {
        (2 * self.steps).saturating_sub(1)
    }
}

/// Something that computes the EDM denoiser `D(x; sigma)` on the whole image.
pub trait Denoise {
    /// `index` is the position of `sigma` in the schedule (for progress reporting).
    fn denoise(&mut self, x: &Tensor, sigma: f32, index: usize) -> Result<Tensor>;
}

/// One Heun step from `sigmas[i]` to `sigmas[i+1]` (Euler when the next sigma is 0).
pub fn heun_step(den: &mut dyn Denoise, x: &Tensor, sigmas: &[f32], i: usize) -> Result<Tensor> {
    let (s, s_next) = (sigmas[i], sigmas[i + 1]);
    let d1 = den.denoise(x, s, i)?;
    let (d, euler) = heun_euler(x, &d1, s, s_next)?;
    if s_next <= 0.0 {
        return Ok(euler);
    }
    let d2 = den.denoise(&euler, s_next, i + 1)?;
    heun_correct(x, &d, &euler, &d2, s, s_next)
}

/// The first half of a Heun step from `s` to `s_next`, given `d1 = D(x; s)`: the derivative
/// `d = (x - d1) / s` and the Euler point `x + d (s_next - s)` (the step's result when `s_next` is
/// 0). Elementwise, so it may be applied to any part of the image (block by block in the
/// scheduler) with the same values as on the whole.
pub fn heun_euler(x: &Tensor, d1: &Tensor, s: f32, s_next: f32) -> Result<(Tensor, Tensor)> {
    let dt = (s_next - s) as f64;
    let d = ((x - d1)? / s as f64)?;
    let euler = (x + (&d * dt)?)?;
    Ok((d, euler))
}

/// The second half, given `d2 = D(euler; s_next)`: `x + (d + (euler - d2) / s_next) / 2 (s_next -
/// s)`. Elementwise, like [`heun_euler`].
pub fn heun_correct(x: &Tensor, d: &Tensor, euler: &Tensor, d2: &Tensor, s: f32, s_next: f32) -> Result<Tensor> {
    let dt = (s_next - s) as f64;
    let d_new = ((euler - d2)? / s_next as f64)?;
    let d_prime = ((d + d_new)? / 2.0)?;
    x + (d_prime * dt)?
}

/// What [`run_heun`] calls after each step: the state and the steps done.
pub type AfterStep<'a, S> = dyn FnMut(&S, usize) -> std::result::Result<(), <S as HeunStep>::Error> + 'a;

/// A sampler state that the Heun sampler can advance by one step: the whole image
/// ([`WholeImageHeun`]), or the block scheduler's per-block state, which applies
/// [`heun_euler`] and [`heun_correct`] to each block batch inside its sweeps
/// ([`crate::sampling`]). Both compute the same values.
pub trait HeunStep {
    /// The error of a step.
    type Error;
    /// One step from `sigmas[i]` to `sigmas[i + 1]` (Euler when the next sigma is 0).
    fn step(&mut self, sigmas: &[f32], i: usize) -> std::result::Result<(), Self::Error>;
}

/// The Heun sampler, the one loop over the steps that every mode shares: advances `state` from
/// step `start` (0 for a fresh run) to the end of `sigmas`, or until `stop_after` steps are done,
/// calling `after_step(&state, steps_done)` after each step. Returns the steps done.
pub fn run_heun<S: HeunStep>(
    state: &mut S,
    sigmas: &[f32],
    start: usize,
    stop_after: Option<usize>,
    after_step: &mut AfterStep<'_, S>,
) -> std::result::Result<usize, S::Error> {
    let mut steps_done = start;
    for i in start..sigmas.len().saturating_sub(1) {
        if stop_after.is_some_and(|s| steps_done >= s) {
            break;
        }
        state.step(sigmas, i)?;
        steps_done = i + 1;
        after_step(state, steps_done)?;
    }
    Ok(steps_done)
}

/// The whole image as the sampler state, denoised by `den`.
pub struct WholeImageHeun<'a> {
    /// The denoiser.
    pub den: &'a mut dyn Denoise,
    /// The state.
    pub x: Tensor,
}

impl HeunStep for WholeImageHeun<'_> {
    type Error = candle_core::Error;

    fn step(&mut self, sigmas: &[f32], i: usize) -> Result<()> {
        self.x = heun_step(self.den, &self.x, sigmas, i)?;
        Ok(())
    }
}

/// Runs the sampler on the whole image from state `x` at step `start` (0 for a fresh run) to the
/// end, calling `after_step(k, &x)` after each step k.
pub fn heun_sample(
    den: &mut dyn Denoise,
    x: Tensor,
    sigmas: &[f32],
    start: usize,
    after_step: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
) -> Result<Tensor> {
    let mut state = WholeImageHeun { den, x };
    run_heun(&mut state, sigmas, start, None, &mut |s, done| after_step(done - 1, &s.x))?;
    Ok(state.x)
}

/// The initial state `concat_lr + sigma_0 * eps`, elementwise in f32 (product rounded, then sum).
pub fn initial_state(concat_lr: &Tensor, eps: &Tensor, sigma0: f32) -> Result<Tensor> {
    concat_lr + (eps * sigma0 as f64)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn released_and_residual_inputs_and_outputs() {
        let dev = Device::Cpu;
        let up = Tensor::new(&[[[[0.5f32, -0.25]]]], &dev).unwrap();
        let x = Tensor::new(&[[[[1.5f32, 0.75]]]], &dev).unwrap(); // up + 1
        let f = Tensor::new(&[[[[2.0f32, -2.0]]]], &dev).unwrap();
        let released = Precond::default();
        let s = released.scalings(2.0);
        assert_eq!(s, EdmScalings::new(2.0));
        let inp = released.network_input(&x, &up, &s).unwrap();
        assert_eq!(inp.dims(), &[1, 2, 1, 2]);
        let want = [1.5 * s.c_in, 0.75 * s.c_in, 0.5 * s.c_in, -0.25 * s.c_in];
        assert_eq!(inp.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        let d =
            released.denoised(f.clone(), &x, &up, &s, None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(d, [2.0 * s.c_out + 1.5 * s.c_skip, -2.0 * s.c_out + 0.75 * s.c_skip]);

        let residual = Precond { sigma_data: 0.1, residual: true, ..Precond::default() };
        for sigma in [0.01f32, 20.0] {
            let s = residual.scalings(sigma);
            let inp = residual.network_input(&x, &up, &s).unwrap();
            let noisy = max_abs(&inp.narrow(1, 0, 1).unwrap());
            // c_in^2 sd: 1 / sd at low noise (about 9.9 here), sd / s^2 at high noise.
            let expect = 0.1 / (sigma * sigma + 0.01);
            assert!((noisy - expect).abs() <= 1e-6 * expect, "{sigma}: {noisy} vs {expect}");
            assert_eq!(max_abs(&(inp.narrow(1, 1, 1).unwrap() - &up).unwrap()), 0.0);
            let d = residual.denoised(f.clone(), &x, &up, &s, None).unwrap();
            let want = (((&f * s.c_out as f64).unwrap() + s.c_skip as f64).unwrap() + &up).unwrap();
            assert!(max_abs(&(d - want).unwrap()) < 1e-6);
        }
        assert!((residual.loss_weight(1.0) - 1.01 / 0.01).abs() < 1e-4);
    }

    #[test]
    fn coring_drops_faint_residuals_and_keeps_strong_ones() {
        let dev = Device::Cpu;
        // Thresholds 0.01 and 0.03: dropped up to 0.01, kept from 0.03, 1.5 (|r| - 0.01) between.
        let r = Tensor::new(&[-0.5f32, -0.02, -0.004, 0.0, 0.01, 0.015, 0.03, 0.25], &dev).unwrap();
        let cored = Precond { sigma_data: 0.05, residual: true, coring: Some([0.01, 0.03]), flat_gate: None };
        let got = cored.core(r.clone()).unwrap().to_vec1::<f32>().unwrap();
        let want = [-0.5f32, -0.015, 0.0, 0.0, 0.0, 0.0075, 0.03, 0.25];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-7, "{got:?}");
        }
        // Without coring, the residual is returned untouched.
        let plain = Precond { coring: None, ..cored };
        assert_eq!(plain.core(r.clone()).unwrap().to_vec1::<f32>().unwrap(), r.to_vec1::<f32>().unwrap());
        // In the denoised image: u + cored residual; here x = u, so D - u = c_out f.
        let up = Tensor::new(&[[[[0.5f32, -0.25]]]], &dev).unwrap();
        let s = cored.scalings(20.0);
        let f = Tensor::new(&[[[[0.005f32 / s.c_out, 0.5 / s.c_out]]]], &dev).unwrap();
        let d = cored.denoised(f, &up, &up, &s, None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(d[0], 0.5, "a residual under the threshold leaves the upsampling as it is");
        assert!((d[1] - 0.25).abs() < 1e-6, "{d:?}");
    }

    #[test]
    fn the_flat_gate_scales_the_cored_residual_and_only_where_asked() {
        let dev = Device::Cpu;
        let gated = Precond { sigma_data: 0.05, residual: true, coring: Some([0.01, 0.03]), flat_gate: Some(0.05) };
        let up = Tensor::new(&[[[[0.5f32, -0.25]]]], &dev).unwrap();
        let s = gated.scalings(20.0);
        let f = Tensor::new(&[[[[0.5f32 / s.c_out, -0.02 / s.c_out]]]], &dev).unwrap();
        let gate = Tensor::new(&[[[[0.25f32, 1.0]]]], &dev).unwrap();
        let d = gated.denoised(f.clone(), &up, &up, &s, Some(&gate)).unwrap();
        let d = d.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // 0.5 kept whole by the coring, then a quarter of it; -0.02 cored to -0.015, gate 1.
        assert!((d[0] - 0.625).abs() < 1e-6 && (d[1] + 0.265).abs() < 1e-6, "{d:?}");
        // The gate of an image exists only where the model asks for it, and only in residual mode.
        let lr = Tensor::zeros((1, 3, 4, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(gated.flat_gate_of(&lr, 16, 16).unwrap().is_some());
        let plain = Precond { flat_gate: None, ..gated };
        assert!(plain.flat_gate_of(&lr, 16, 16).unwrap().is_none());
        let released = Precond { flat_gate: Some(0.05), ..Precond::default() };
        assert!(released.flat_gate_of(&lr, 16, 16).unwrap().is_none());
    }
}
