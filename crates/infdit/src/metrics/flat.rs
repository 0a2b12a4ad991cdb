//! Flat-area deviation: how far an upscaler's output strays from the ground truth where the ground truth
//! is flat (sky, walls, smooth backgrounds), in luma levels.
//!
//! A faint periodic pattern (such as a +-1-level ripple with the period of the model's patch size) costs
//! little PSNR but shows on flat areas; this metric isolates it. Bicubic is nearly exact there, so a
//! method whose flat-area deviation is no larger than bicubic's adds no such pattern.
//!
//! Definition, on BasicSR's luma ([`rgb_to_y`](super::rgb_to_y), in `[16, 235]`) with `crop_border`
//! pixels removed on each side first, as PSNR-Y does:
//!
//! * the local gradient of the reference at a pixel is the largest absolute difference to its 4-neighbours
//!   (those inside the cropped image);
//! * a pixel is **flat** when the largest local gradient of the reference within `radius` pixels of it
//!   (the `(2 radius + 1)^2` square, clipped at the edges) is at most `threshold` levels;
//! * the **flat-area deviation** is the mean of `|Y_restored - Y_reference|` over the flat pixels.
//!
//! The defaults ([`FLAT_RADIUS`] 4, the patch size of infdit's models, and [`FLAT_THRESHOLD`] 2 levels)
//! keep a 9 x 9 neighbourhood around each counted pixel free of any edge or texture stronger than the
//! 8-bit noise of a smooth photo area.

use image::RgbImage;

use super::MetricsError;
use super::quality::{check, cropped_y};

/// Default radius of the flatness window, in pixels (a `9 x 9` square).
pub const FLAT_RADIUS: usize = 4;
/// Default largest local luma gradient, in 8-bit levels, for a flat pixel.
pub const FLAT_THRESHOLD: f64 = 2.0;

/// The flat-area deviation of one image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlatDeviation {
    /// Mean `|Y_restored - Y_reference|` over the flat pixels, in luma levels.
    pub mean_abs: f64,
    /// Number of flat pixels.
    pub pixels: usize,
    /// Flat pixels as a fraction of the cropped image.
    pub fraction: f64,
}

/// The flat mask of a luma plane (`w x h`, row-major): `true` where the largest 4-neighbour absolute
/// difference within `radius` pixels is at most `threshold`.
///
/// # Panics
/// If `y.len() != w * h`.
pub fn flat_mask(y: &[f64], w: usize, h: usize, radius: usize, threshold: f64) -> Vec<bool> {
    assert_eq!(y.len(), w * h, "plane of {} samples is not {w} x {h}", y.len());
    // Local gradient: the largest |difference| to a 4-neighbour.
    let mut g = vec![0f64; w * h];
    for r in 0..h {
        for c in 0..w {
            let v = y[r * w + c];
            let mut m = 0f64;
            if c + 1 < w {
                m = m.max((y[r * w + c + 1] - v).abs());
            }
            if c > 0 {
                m = m.max((y[r * w + c - 1] - v).abs());
            }
            if r + 1 < h {
                m = m.max((y[(r + 1) * w + c] - v).abs());
            }
            if r > 0 {
                m = m.max((y[(r - 1) * w + c] - v).abs());
            }
            g[r * w + c] = m;
        }
    }
    // Window maximum, separably: rows, then columns.
    let mut rows = vec![0f64; w * h];
    for r in 0..h {
        for c in 0..w {
            let (lo, hi) = (c.saturating_sub(radius), (c + radius).min(w - 1));
            rows[r * w + c] = g[r * w + lo..=r * w + hi].iter().copied().fold(0f64, f64::max);
        }
    }
    let mut mask = vec![false; w * h];
    for r in 0..h {
        let (lo, hi) = (r.saturating_sub(radius), (r + radius).min(h - 1));
        for c in 0..w {
            let m = (lo..=hi).map(|rr| rows[rr * w + c]).fold(0f64, f64::max);
            mask[r * w + c] = m <= threshold;
        }
    }
    mask
}

/// Mean `|a - b|` over the pixels where `mask` is set, with the count; `None` when none is.
///
/// # Panics
/// If the lengths differ.
pub fn masked_mean_abs(a: &[f64], b: &[f64], mask: &[bool]) -> Option<(f64, usize)> {
    assert!(a.len() == b.len() && a.len() == mask.len(), "planes and mask differ in length");
    let (mut sum, mut n) = (0f64, 0usize);
    for ((x, y), &m) in a.iter().zip(b).zip(mask) {
        if m {
            sum += (x - y).abs();
            n += 1;
        }
    }
    (n > 0).then(|| (sum / n as f64, n))
}

/// The flat-area deviation of `restored` from `reference` (see the module docs), with `crop_border`
/// pixels removed on each side, flatness judged on `reference` with `radius` and `threshold`.
/// `Ok(None)` when the reference has no flat pixel.
///
/// Errors when the sizes differ or nothing is left after the crop.
pub fn flat_deviation_with(
    restored: &RgbImage,
    reference: &RgbImage,
    crop_border: usize,
    radius: usize,
    threshold: f64,
) -> Result<Option<FlatDeviation>, MetricsError> {
    check(restored, reference, crop_border, "flat-area deviation", 1)?;
    let (yr, w, h) = cropped_y(reference, crop_border);
    let (ya, _, _) = cropped_y(restored, crop_border);
    let mask = flat_mask(&yr, w, h, radius, threshold);
    Ok(masked_mean_abs(&ya, &yr, &mask).map(|(mean_abs, pixels)| FlatDeviation {
        mean_abs,
        pixels,
        fraction: pixels as f64 / (w * h) as f64,
    }))
}

/// [`flat_deviation_with`] with the default [`FLAT_RADIUS`] and [`FLAT_THRESHOLD`].
pub fn flat_deviation(
    restored: &RgbImage,
    reference: &RgbImage,
    crop_border: usize,
) -> Result<Option<FlatDeviation>, MetricsError> {
    flat_deviation_with(restored, reference, crop_border, FLAT_RADIUS, FLAT_THRESHOLD)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn gray(w: u32, h: u32, f: impl Fn(u32, u32) -> u8) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let v = f(x, y);
            Rgb([v, v, v])
        })
    }

    /// Luma levels per gray level: BasicSR's Y of a gray pixel is 16 + v * 219 / 255 (about 0.859 v).
    const Y_PER_GRAY: f64 = (65.481 + 128.553 + 24.966) / 255.0;

    #[test]
    fn mask_of_a_step_edge() {
        // 20 x 4 plane, a step of 10 levels between columns 9 and 10: the gradient is 10 at columns 9 and
        // 10; with radius 2 the columns 7..=12 are not flat, the others are.
        let (w, h) = (20, 4);
        let y: Vec<f64> = (0..w * h).map(|i| if i % w < 10 { 50.0 } else { 60.0 }).collect();
        let m = flat_mask(&y, w, h, 2, 2.0);
        for r in 0..h {
            let row: Vec<bool> = (0..w).map(|c| m[r * w + c]).collect();
            let expect: Vec<bool> = (0..w).map(|c| !(7..=12).contains(&c)).collect();
            assert_eq!(row, expect, "row {r}");
        }
        // A gentle ramp of 1 level a pixel is flat at threshold 1, not at 0.5.
        let ramp: Vec<f64> = (0..w * h).map(|i| (i % w) as f64).collect();
        assert!(flat_mask(&ramp, w, h, 4, 1.0).iter().all(|&f| f));
        assert!(flat_mask(&ramp, w, h, 4, 0.5).iter().all(|&f| !f));
    }

    #[test]
    fn masked_mean() {
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [1.5, 0.0, 3.0, 10.0];
        assert_eq!(masked_mean_abs(&a, &b, &[true, true, true, false]), Some((2.5 / 3.0, 3)));
        assert_eq!(masked_mean_abs(&a, &b, &[false; 4]), None);
    }

    #[test]
    fn deviation_counts_flat_areas_only() {
        // Reference: flat gray 100 on the left half, a checkerboard (0/255) on the right half.
        let (w, h) = (64, 32);
        let reference = gray(w, h, |x, y| {
            if x < 32 {
                100
            } else if (x + y) % 2 == 0 {
                0
            } else {
                255
            }
        });
        // Restored: +1 gray level everywhere on the left (a faint offset), garbage on the right.
        let restored = gray(w, h, |x, y| if x < 32 { 101 } else { ((x * 7 + y * 13) % 256) as u8 });
        let d = flat_deviation(&restored, &reference, 4).unwrap().unwrap();
        // Cropped 56 x 24; flat: columns 4..=26 of the original (x + 4 <= 30: the window must not reach
        // the gradient at x = 31, which is the neighbour of the checkerboard), i.e. cropped columns 0..=22.
        assert_eq!(d.pixels, 23 * 24);
        assert!((d.fraction - (23.0 * 24.0) / (56.0 * 24.0)).abs() < 1e-12);
        // Each flat pixel is off by one gray level, about 0.859 luma levels (f32 rounding aside).
        assert!((d.mean_abs - Y_PER_GRAY).abs() < 1e-4, "{}", d.mean_abs);
        // The reference against itself: 0.
        let same = flat_deviation(&reference, &reference, 4).unwrap().unwrap();
        assert_eq!(same.mean_abs, 0.0);
        // A +-1 pattern with a 4-px period (two columns up, two down) deviates by the same 0.859 on average.
        let pattern =
            gray(
                w,
                h,
                |x, y| if x < 32 { if (x / 2) % 2 == 0 { 101 } else { 99 } } else { reference.get_pixel(x, y)[0] },
            );
        let p = flat_deviation(&pattern, &reference, 4).unwrap().unwrap();
        assert!((p.mean_abs - Y_PER_GRAY).abs() < 1e-4, "{}", p.mean_abs);
    }

    #[test]
    fn no_flat_pixel_and_errors() {
        let busy = gray(32, 32, |x, y| if (x + y) % 2 == 0 { 0 } else { 255 });
        assert_eq!(flat_deviation(&busy, &busy, 4).unwrap(), None);
        let small = gray(8, 8, |_, _| 0);
        let e = flat_deviation(&small, &small, 4).unwrap_err();
        assert!(matches!(e, MetricsError::TooSmall { .. }), "{e}");
        let other = gray(16, 8, |_, _| 0);
        assert!(matches!(flat_deviation(&small, &other, 0).unwrap_err(), MetricsError::SizeMismatch { .. }));
    }
}
