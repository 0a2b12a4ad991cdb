//! The bicubic comparison baseline of `infdit eval`.

use image::RgbImage;

use crate::imageio::resize::{Bicubic, resize_planar};

/// Upscales `lr` by `scale` (each side times `scale`) with the crate's antialiased bicubic
/// ([`Bicubic::Antialias`], torchvision's default, bit-exact to torch): `u8 / 255` to f32 planes,
/// resize, then `round(v * 255)` clamped to `0..=255`.
///
/// `scale == 1` returns a copy.
///
/// # Panics
/// If `scale` is zero or the output side length does not fit in `u32`.
pub fn bicubic_baseline(lr: &RgbImage, scale: usize) -> RgbImage {
    assert!(scale > 0, "bicubic_baseline: scale must be positive");
    bicubic_resize(lr, lr.width() as usize * scale, lr.height() as usize * scale)
}

/// [`bicubic_baseline`] to any output size `ow x oh` (a non-integer factor, or a downscale).
///
/// # Panics
/// If a side is zero or does not fit in `u32`.
pub fn bicubic_resize(lr: &RgbImage, ow: usize, oh: usize) -> RgbImage {
    assert!(ow > 0 && oh > 0, "bicubic_resize: the output must not be empty");
    let (w, h) = (lr.width() as usize, lr.height() as usize);
    let out_w = u32::try_from(ow).expect("bicubic_resize: output width overflows u32");
    let out_h = u32::try_from(oh).expect("bicubic_resize: output height overflows u32");
    let raw = lr.as_raw();
    let mut planar = vec![0f32; 3 * w * h];
    for (i, px) in raw.chunks_exact(3).enumerate() {
        for c in 0..3 {
            planar[c * w * h + i] = px[c] as f32 / 255.0;
        }
    }
    let up = resize_planar(&planar, 3, h, w, oh, ow, Bicubic::Antialias);
    let n = ow * oh;
    let mut out = vec![0u8; 3 * n];
    for (i, px) in out.chunks_exact_mut(3).enumerate() {
        for c in 0..3 {
            px[c] = (up[c * n + i] * 255.0).round().clamp(0.0, 255.0) as u8;
        }
    }
    RgbImage::from_raw(out_w, out_h, out).expect("bicubic_resize: buffer size")
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn constant_stays_constant() {
        for v in [0u8, 1, 77, 128, 254, 255] {
            let lr = RgbImage::from_pixel(13, 7, Rgb([v, 255 - v, v / 2]));
            let up = bicubic_baseline(&lr, 4);
            assert_eq!(up.dimensions(), (52, 28));
            assert!(up.pixels().all(|p| p.0 == [v, 255 - v, v / 2]), "{v}");
        }
    }

    #[test]
    fn matches_resize_planar_and_scale_one() {
        let lr = RgbImage::from_fn(9, 6, |x, y| Rgb([(x * 25) as u8, (y * 40) as u8, ((x + y) * 13) as u8]));
        assert_eq!(bicubic_baseline(&lr, 1), lr);
        let up = bicubic_baseline(&lr, 4);
        assert_eq!(up.dimensions(), (36, 24));
        // Channel planes go through resize_planar independently: check the green plane.
        let g: Vec<f32> = lr.pixels().map(|p| p.0[1] as f32 / 255.0).collect();
        let gu = resize_planar(&g, 1, 6, 9, 24, 36, Bicubic::Antialias);
        for (p, v) in up.pixels().zip(&gu) {
            assert_eq!(p.0[1], (v * 255.0).round().clamp(0.0, 255.0) as u8);
        }
        // Overshoot at the sharp edges is clamped, not wrapped.
        let edge = RgbImage::from_fn(8, 8, |x, _| if x < 4 { Rgb([0; 3]) } else { Rgb([255; 3]) });
        let up = bicubic_baseline(&edge, 4);
        assert_eq!(up.get_pixel(0, 0).0, [0; 3]);
        assert_eq!(up.get_pixel(31, 0).0, [255; 3]);
    }

    #[test]
    fn resize_to_any_size() {
        let lr = RgbImage::from_fn(9, 6, |x, y| Rgb([(x * 25) as u8, (y * 40) as u8, ((x + y) * 13) as u8]));
        // An integer factor is the baseline itself; other sizes keep constants constant.
        assert_eq!(bicubic_resize(&lr, 27, 18), bicubic_baseline(&lr, 3));
        let c = RgbImage::from_pixel(10, 7, Rgb([9, 200, 77]));
        let up = bicubic_resize(&c, 33, 19);
        assert_eq!(up.dimensions(), (33, 19));
        assert!(up.pixels().all(|p| p.0 == [9, 200, 77]));
    }
}
