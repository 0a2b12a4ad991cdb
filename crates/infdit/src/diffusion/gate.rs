//! The flat-area gate of a residual model ([`crate::config::Precond::flat_gate`]): how much of the
//! network's correction of the upsampled LR to keep at each output pixel, from how flat the LR is
//! around it.
//!
//! At an LR pixel the **range** is the largest minus the smallest luma (`0.299 R + 0.587 G + 0.114
//! B`, image units) in its 3 x 3 neighbourhood (the image's edge pixels repeated beyond it); the
//! gate there is `min(range / full, 1)`: 0 on a perfectly flat LR, 1 wherever the LR varies by
//! `full` or more. The output-size gate is that LR map upsampled like the LR itself (bicubic,
//! clamped to `[0, 1]`), so it is smooth and has no block structure; each band of rows is computed
//! on its own ([`FlatGate::rows`]) and equals the same rows of the whole map bit for bit, so the
//! block scheduler and the whole-image denoiser gate alike.
//!
//! Why: where the LR is flat the original is flat too, or holds detail finer than the LR can tell
//! (which no upscaler can recover); a small model's faint corrections there only flip the rounding
//! of some pixels. Coring ([`crate::config::Precond::coring`]) drops the faintest of them; the gate
//! fades the rest where the LR says there is nothing to restore, and leaves edges and texture alone.

use candle_core::{DType, Result, Tensor};

use crate::imageio::resize::{Bicubic, resize_tensor, resize_tensor_rows};

/// BT.601 luma weights of the range.
const LUMA: [f64; 3] = [0.299, 0.587, 0.114];

/// The gate of one image: its LR-size map and the output size it is upsampled to.
#[derive(Debug, Clone)]
pub struct FlatGate {
    /// (1, 1, h, w), in `[0, 1]`, on the LR's device.
    map: Tensor,
    height: usize,
    width: usize,
}

impl FlatGate {
    /// The gate of an LR image (1, 3, h, w) in `[-1, 1]` for an output of `height x width`, full
    /// (1) from an LR luma range of `full` (image units, > 0) on.
    pub fn new(lr: &Tensor, full: f32, height: usize, width: usize) -> Result<Self> {
        if !(full.is_finite() && full > 0.0) {
            candle_core::bail!("flat gate: the full-gate range {full} must be a positive number")
        }
        Ok(Self { map: lr_gate_map(lr, full)?, height, width })
    }

    /// The LR-size map (1, 1, h, w).
    pub fn lr_map(&self) -> &Tensor {
        &self.map
    }

    /// Output rows `y0..y1`: (1, 1, y1 - y0, width), on the LR's device.
    pub fn rows(&self, y0: usize, y1: usize) -> Result<Tensor> {
        resize_tensor_rows(&self.map, self.height, self.width, Bicubic::Antialias, y0..y1)?.clamp(0f32, 1f32)
    }

    /// The whole output-size gate (1, 1, height, width).
    pub fn full(&self) -> Result<Tensor> {
        resize_tensor(&self.map, self.height, self.width, Bicubic::Antialias)?.clamp(0f32, 1f32)
    }
}

/// `min(range / full, 1)` of an LR image (1, 3, h, w): (1, 1, h, w), f32.
fn lr_gate_map(lr: &Tensor, full: f32) -> Result<Tensor> {
    let lr = lr.to_dtype(DType::F32)?;
    let (n, c, _, _) = lr.dims4()?;
    if n != 1 || c != 3 {
        candle_core::bail!("flat gate: expected an RGB image (1, 3, h, w), got shape {:?}", lr.dims())
    }
    let mut y = (lr.narrow(1, 0, 1)? * LUMA[0])?;
    for (ch, w) in LUMA.iter().enumerate().skip(1) {
        y = (y + (lr.narrow(1, ch, 1)? * *w)?)?;
    }
    let padded = y.pad_with_same(2, 1, 1)?.pad_with_same(3, 1, 1)?;
    // The 3 x 3 maximum and minimum (max pooling with stride 1 over the padded plane).
    let hi = padded.max_pool2d_with_stride(3, 1)?;
    let lo = padded.neg()?.max_pool2d_with_stride(3, 1)?.neg()?;
    ((hi - lo)? / full as f64)?.clamp(0f32, 1f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn gray(h: usize, w: usize, f: impl Fn(usize, usize) -> f32) -> Tensor {
        let v: Vec<f32> =
            (0..3).flat_map(|_| (0..h).flat_map(|r| (0..w).map(|c| f(r, c)).collect::<Vec<_>>())).collect();
        Tensor::from_vec(v, (1, 3, h, w), &Device::Cpu).unwrap()
    }

    fn plane(t: &Tensor) -> Vec<Vec<f32>> {
        t.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap()
    }

    #[test]
    fn the_map_is_the_3x3_luma_range_over_the_full_range_capped_at_one() {
        // A vertical edge of 0.2 between columns 3 and 4, on a flat -0.5, and one pixel 0.01 up.
        let lr = gray(6, 8, |r, c| {
            if c >= 4 {
                -0.3
            } else if (r, c) == (1, 1) {
                -0.49
            } else {
                -0.5
            }
        });
        let g = FlatGate::new(&lr, 0.05, 24, 32).unwrap();
        let m = plane(g.lr_map());
        for (r, row) in m.iter().enumerate() {
            for (c, &v) in row.iter().enumerate() {
                let want = if c == 3 || c == 4 {
                    1.0 // the edge's 0.2 range, capped
                } else if r <= 2 && c <= 2 {
                    0.2 // the bump's 0.01 over 0.05
                } else {
                    0.0
                };
                assert!((v - want).abs() < 1e-5, "({r}, {c}): {v} vs {want}");
            }
        }
        // Colour counts by its luma: a pure-red step of 0.1 is a luma range of 0.0299.
        let red = Tensor::cat(
            &[
                gray(4, 4, |_, c| if c >= 2 { 0.1 } else { 0.0 }).narrow(1, 0, 1).unwrap(),
                Tensor::zeros((1, 2, 4, 4), DType::F32, &Device::Cpu).unwrap(),
            ],
            1,
        )
        .unwrap();
        let m = plane(FlatGate::new(&red, 0.05, 16, 16).unwrap().lr_map());
        assert!((m[0][1] - 0.0299 / 0.05).abs() < 1e-5 && m[0][0] == 0.0, "{m:?}");
    }

    #[test]
    fn the_output_gate_is_smooth_in_range_and_the_same_band_by_band() {
        let lr = gray(12, 10, |r, c| if r * 10 + c == 47 { 0.3 } else { ((r + c) % 2) as f32 * 0.01 });
        let g = FlatGate::new(&lr, 0.04, 48, 40).unwrap();
        let full = g.full().unwrap();
        assert_eq!(full.dims(), &[1, 1, 48, 40]);
        let v = full.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| (0.0..=1.0).contains(x)));
        assert!(v.contains(&1.0) && v.iter().any(|&x| x < 0.6), "{v:?}");
        for (y0, y1) in [(0, 16), (16, 32), (32, 48), (5, 29)] {
            let band = g.rows(y0, y1).unwrap();
            let want = full.narrow(2, y0, y1 - y0).unwrap();
            assert_eq!(
                band.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "rows {y0}..{y1}"
            );
        }
        assert!(FlatGate::new(&lr, 0.0, 48, 40).is_err());
        assert!(FlatGate::new(&lr.narrow(1, 0, 1).unwrap(), 0.04, 48, 40).is_err());
    }
}
