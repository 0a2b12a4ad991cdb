//! Random weights for any configuration, in the official key layout: for tests, benchmarks and
//! memory measurements of configurations that have no trained checkpoint.

use candle_core::{DType, Device, Tensor};

use super::Model;
use crate::config::ModelConfig;
use crate::diffusion::noise::SplitMix64;
use crate::error::Result;
use crate::weights::Checkpoint;

/// A checkpoint with deterministic random values for every key `cfg` needs: LayerNorm weights
/// `1 + N(0, 0.1)`, biases `N(0, 0.05)`, other tensors `N(0, fan_in^-1/2)` (fan-in = product of all
/// but the first dimension; 0.5 for 1-D or per-head embeddings), the final linear scaled by 0.4 so
/// the network output stays in range.
pub fn random_checkpoint(cfg: &ModelConfig, seed: u64) -> Result<Checkpoint> {
    let keys = Model::expected_keys(cfg)?;
    let mut rng = SplitMix64::new(seed);
    let mut tensors = Vec::with_capacity(keys.len());
    for (k, shape) in keys {
        let n: usize = shape.iter().product();
        let is_norm = k.contains("layer_norm") || k.contains("layernorm") || k.contains("_ln") || k.contains(".ln_");
        let (mean, std) = if k.ends_with("bias") {
            (0.0, 0.05)
        } else if is_norm {
            (1.0, 0.1)
        } else if shape.len() >= 2 && !k.contains("position_embedding") && !k.contains("re_pos_embed") {
            let fan_in: usize = shape[1..].iter().product();
            let s = (fan_in as f64).powf(-0.5);
            (0.0, if k.contains("final_layer.linear") { 0.4 * s } else { s })
        } else {
            (0.0, 0.5)
        };
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            let r = (-2.0 * u1.ln()).sqrt();
            v.push((mean + std * r * (std::f64::consts::TAU * u2).cos()) as f32);
        }
        tensors.push((k, Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(DType::F32)?));
    }
    Ok(Checkpoint::from_tensors("random weights", tensors))
}

/// The starting point of a new training run: [`random_checkpoint`] with the final linear layer
/// (weight and bias) zeroed, DiT's initialisation: the network output starts at 0, so the denoiser
/// starts as `c_skip x` (or, in residual mode, as the upsampled LR image).
pub fn training_init(cfg: &ModelConfig, seed: u64) -> Result<Checkpoint> {
    let mut ck = random_checkpoint(cfg, seed)?;
    let finals: Vec<String> = ck.keys().filter(|k| k.starts_with(FINAL_LINEAR)).map(str::to_owned).collect();
    for k in finals {
        let zero = ck.load(&k, &Device::Cpu)?.zeros_like()?;
        ck.insert(k, zero);
    }
    Ok(ck)
}

const FINAL_LINEAR: &str = "mixins.final_layer.linear.";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DitConfig;

    #[test]
    fn training_init_zeroes_only_the_final_linear() -> Result<()> {
        let dit = DitConfig {
            hidden: 32,
            depth: 1,
            heads: 2,
            mlp_hidden: 64,
            vector_dim: 8,
            block_px: 32,
            ..DitConfig::released()
        };
        let cfg = ModelConfig { dit, clip: None };
        let (r, t) = (random_checkpoint(&cfg, 3)?, training_init(&cfg, 3)?);
        let mut zeroed = 0;
        for k in r.keys() {
            let (a, b) = (r.load(k, &Device::Cpu)?, t.load(k, &Device::Cpu)?);
            let diff = (a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            if k.starts_with(FINAL_LINEAR) {
                zeroed += 1;
                assert_eq!(b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?, 0.0, "{k}");
            } else {
                assert_eq!(diff, 0.0, "{k}");
            }
        }
        assert_eq!(zeroed, 2);
        Ok(())
    }
}
