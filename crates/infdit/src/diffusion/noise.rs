//! Seeded Gaussian noise that is a function of (seed, block row, block column) only.
//!
//! Each 128-px block draws its own stream, so the noise of a pixel does not depend on the image
//! size, the block batch, the thread count or where a run was resumed, and a huge image never needs
//! its whole noise tensor at once.

use candle_core::{Device, Result, Tensor};

use crate::model::blocks::{BlockGrid, BlockPos};

/// SplitMix64: a small, well-mixed 64-bit generator (Steele, Lea, Flood 2014).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator at `state`.
    pub fn new(state: u64) -> Self {
        Self(state)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1], 53 bits.
    fn next_open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

/// `channels x bp x bp` standard normal values (Box-Muller in f64) for one block, planar order.
pub fn block_noise(seed: u64, pos: BlockPos, channels: usize, bp: usize) -> Vec<f32> {
    let mut key = SplitMix64::new(seed ^ NOISE_DOMAIN);
    let k0 = key.next_u64();
    let mut rng = SplitMix64::new(
        k0 ^ (pos.row as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
            ^ (pos.col as u64).wrapping_mul(0x8CB9_2BA7_2F3D_8DD7),
    );
    let n = channels * bp * bp;
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1 = rng.next_open01();
        let u2 = rng.next_open01();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        out.push((r * t.cos()) as f32);
        out.push((r * t.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// Separates infdit's noise streams from other uses of the same seed.
const NOISE_DOMAIN: u64 = 0x1D17_5EED_0000_0001;

/// Noise for blocks `pos` of a grid: (n, channels, bp, bp).
pub fn blocks_noise(seed: u64, pos: &[BlockPos], channels: usize, bp: usize, dev: &Device) -> Result<Tensor> {
    let mut all = Vec::with_capacity(pos.len() * channels * bp * bp);
    for p in pos {
        all.extend(block_noise(seed, *p, channels, bp));
    }
    Tensor::from_vec(all, (pos.len(), channels, bp, bp), dev)
}

/// Noise for a whole image on `grid`: (1, channels, H, W).
pub fn image_noise(seed: u64, grid: &BlockGrid, channels: usize, dev: &Device) -> Result<Tensor> {
    let blocks = blocks_noise(seed, &grid.raster(), channels, grid.block_px, dev)?;
    crate::model::blocks::blocks_to_image(&blocks, grid)
}

/// The initial noise eps of a run: a whole-image tensor, or drawn block by block from a seed.
#[derive(Debug, Clone)]
pub enum Noise {
    /// A given (1, 3, H, W) tensor (`--noise FILE`, or the reference's own eps for parity).
    Image(Tensor),
    /// [`block_noise`] of each block for this seed: identical to [`image_noise`] for the seed, but
    /// never held for the whole image at once.
    Seeded(u64),
}

impl Noise {
    /// The noise of blocks `pos` of `grid`, (n, 3, bp, bp), on `dev`.
    pub fn blocks(&self, grid: &BlockGrid, pos: &[BlockPos], dev: &Device) -> Result<Tensor> {
        match self {
            Noise::Image(t) => crate::model::blocks::take_blocks(t, grid.block_px, pos)?.to_device(dev),
            Noise::Seeded(seed) => blocks_noise(*seed, pos, 3, grid.block_px, dev),
        }
    }

    /// The whole-image noise (1, 3, H, W) on `dev`.
    pub fn image(&self, grid: &BlockGrid, dev: &Device) -> Result<Tensor> {
        match self {
            Noise::Image(t) => t.to_device(dev),
            Noise::Seeded(seed) => image_noise(*seed, grid, 3, dev),
        }
    }

    /// Fails unless the noise fits `grid` (a given tensor must be (1, 3, H, W)).
    pub fn check(&self, grid: &BlockGrid) -> Result<()> {
        match self {
            Noise::Image(t) if t.dims() != [1, 3, grid.height(), grid.width()] => candle_core::bail!(
                "the noise has shape {:?}, the output needs (1, 3, {}, {})",
                t.dims(),
                grid.height(),
                grid.width()
            ),
            Noise::Image(t)
                if !t.abs()?.max_all()?.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?.is_finite() =>
            {
                candle_core::bail!("the noise holds NaN or infinite values")
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_standard_normal_and_position_dependent() {
        let a = block_noise(7, BlockPos { row: 0, col: 0 }, 3, 128);
        let b = block_noise(7, BlockPos { row: 0, col: 1 }, 3, 128);
        let c = block_noise(8, BlockPos { row: 0, col: 0 }, 3, 128);
        assert_eq!(a, block_noise(7, BlockPos { row: 0, col: 0 }, 3, 128));
        assert_ne!(a[..16], b[..16]);
        assert_ne!(a[..16], c[..16]);
        let n = a.len() as f64;
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        // 49152 samples: standard error of the mean 0.0045, of the variance ~0.0064.
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.03, "var {var}");
    }

    #[test]
    fn seeded_blocks_are_the_image_noise_blocks() {
        let grid = BlockGrid { rows: 2, cols: 3, block_px: 8 };
        let dev = Device::Cpu;
        let whole = image_noise(5, &grid, 3, &dev).unwrap();
        let pos = [BlockPos { row: 1, col: 2 }, BlockPos { row: 0, col: 1 }];
        let a = Noise::Seeded(5).blocks(&grid, &pos, &dev).unwrap();
        let b = Noise::Image(whole.clone()).blocks(&grid, &pos, &dev).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.dims(), &[2, 3, 8, 8]);
        assert_eq!(v(&a), v(&b));
        assert_eq!(v(&a)[..192], block_noise(5, pos[0], 3, 8)[..]);
        assert_eq!(v(&Noise::Seeded(5).image(&grid, &dev).unwrap()), v(&whole));
        assert!(Noise::Image(whole).check(&BlockGrid { rows: 3, ..grid }).is_err());
    }
}
