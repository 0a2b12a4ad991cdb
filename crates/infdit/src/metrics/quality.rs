//! PSNR and SSIM on the BT.601 luma channel, exactly as BasicSR 1.4.2 computes them
//! (`basicsr/metrics/psnr_ssim.py`, `calculate_psnr` / `calculate_ssim` with
//! `input_order='HWC', test_y_channel=True`), for RGB images.
//!
//! * Luma ([`rgb_to_y`]): BasicSR's `to_y_channel` with the `rgb2ycbcr` coefficients, in its
//!   dtypes: `v_f32 = u8 / 255` (float32), `y = (65.481 R + 128.553 G + 24.966 B) + 16` (float64),
//!   `y / 255` rounded to float32, times 255 in float32, then widened to float64. The result is in
//!   `[16, 235]`.
//! * Crop: `crop_border` pixels are removed on every side before anything else.
//! * PSNR ([`psnr_plane`]): `10 log10(255^2 / mse)` in float64, `inf` when `mse == 0`.
//! * SSIM ([`ssim_plane`]): Wang et al.'s SSIM with the 11x11 Gaussian window
//!   `outer(k, k)`, `k = cv2.getGaussianKernel(11, 1.5)` ([`gaussian_kernel`]), over the valid
//!   region only (BasicSR's `cv2.filter2D(...)[5:-5, 5:-5]`), `C1 = (0.01 * 255)^2`,
//!   `C2 = (0.03 * 255)^2`, and the mean of the SSIM map. The window is applied separably here (rows,
//!   then columns) in float64; BasicSR's `cv2.filter2D` uses a DFT for an 11x11 float64 kernel, so
//!   neither is bit-exact to the other, the difference is around 1e-14 on the SSIM.

use image::RgbImage;
use rayon::prelude::*;

use super::MetricsError;

/// Side of the SSIM Gaussian window.
pub const SSIM_WINDOW: usize = 11;
/// Standard deviation of the SSIM Gaussian window.
const SSIM_SIGMA: f64 = 1.5;

/// BasicSR's luma channel of an RGB image, row-major `height x width`, in `[16, 235]`
/// (`to_y_channel(img)` for an RGB `uint8` image, see the module docs for the exact dtypes).
pub fn rgb_to_y(img: &RgbImage) -> Vec<f64> {
    img.pixels().map(|p| y_of(p.0)).collect()
}

/// Luma of one pixel with BasicSR's float32/float64 sequence.
#[inline]
fn y_of([r, g, b]: [u8; 3]) -> f64 {
    let c = |v: u8| (v as f32 / 255.0) as f64;
    // np.dot(img_f32, [65.481, 128.553, 24.966]) + 16.0, in float64
    let y = c(r) * 65.481 + c(g) * 128.553 + c(b) * 24.966 + 16.0;
    // _convert_output_type_range: / 255. (float64), .astype(float32); then * 255. in float32
    let y32 = (y / 255.0) as f32;
    (y32 * 255.0f32) as f64
}

/// The `crop_border`-cropped luma plane of `img`, with its width and height.
pub(super) fn cropped_y(img: &RgbImage, crop_border: usize) -> (Vec<f64>, usize, usize) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (cw, ch) = (w - 2 * crop_border, h - 2 * crop_border);
    let mut out = Vec::with_capacity(cw * ch);
    for y in crop_border..crop_border + ch {
        for x in crop_border..crop_border + cw {
            out.push(y_of(img.get_pixel(x as u32, y as u32).0));
        }
    }
    (out, cw, ch)
}

/// Checks the sizes and that at least `min_side` pixels remain in each direction after the crop.
pub(super) fn check(
    a: &RgbImage,
    b: &RgbImage,
    crop_border: usize,
    metric: &'static str,
    min_side: usize,
) -> Result<(), MetricsError> {
    if a.dimensions() != b.dimensions() {
        return Err(MetricsError::SizeMismatch {
            a_width: a.width(),
            a_height: a.height(),
            b_width: b.width(),
            b_height: b.height(),
        });
    }
    let (w, h) = a.dimensions();
    let need = 2 * crop_border + min_side;
    if (w as usize) < need || (h as usize) < need {
        return Err(MetricsError::TooSmall { metric, width: w, height: h, crop_border, min_side });
    }
    Ok(())
}

/// PSNR of the luma channels in dB, BasicSR's `calculate_psnr(a, b, crop_border,
/// test_y_channel=True)`: `10 log10(255^2 / mse)` after removing `crop_border` pixels on every side;
/// `inf` for identical images. Symmetric in `a` and `b`.
///
/// Errors when the sizes differ or nothing is left after the crop.
pub fn psnr_y(a: &RgbImage, b: &RgbImage, crop_border: usize) -> Result<f64, MetricsError> {
    check(a, b, crop_border, "PSNR", 1)?;
    let (ya, _, _) = cropped_y(a, crop_border);
    let (yb, _, _) = cropped_y(b, crop_border);
    Ok(psnr_plane(&ya, &yb))
}

/// SSIM of the luma channels, BasicSR's `calculate_ssim(a, b, crop_border, test_y_channel=True)`
/// (see the module docs). Symmetric in `a` and `b`; 1 for identical images.
///
/// Errors when the sizes differ or less than 11x11 pixels are left after the crop.
pub fn ssim_y(a: &RgbImage, b: &RgbImage, crop_border: usize) -> Result<f64, MetricsError> {
    check(a, b, crop_border, "SSIM", SSIM_WINDOW)?;
    let (ya, w, h) = cropped_y(a, crop_border);
    let (yb, _, _) = cropped_y(b, crop_border);
    Ok(ssim_plane(&ya, &yb, w, h))
}

/// PSNR of two planes with peak 255: `10 log10(255^2 / mean((a - b)^2))`, `inf` when they are
/// equal.
///
/// # Panics
/// If the lengths differ or the planes are empty.
pub fn psnr_plane(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "psnr_plane: planes of different sizes");
    assert!(!a.is_empty(), "psnr_plane: empty planes");
    // Blockwise sums keep the rounding error at numpy's (pairwise) level for large images.
    let sse: f64 = a
        .chunks(4096)
        .zip(b.chunks(4096))
        .map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q) * (p - q)).sum::<f64>())
        .sum();
    let mse = sse / a.len() as f64;
    if mse == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (255.0 * 255.0 / mse).log10()
}

/// `cv2.getGaussianKernel(n, sigma)` for `sigma > 0`, as OpenCV's `getGaussianKernelBitExact`
/// evaluates it (in float64 here): `t_i = exp((2i + 1 - n)^2 * (-0.125 / sigma^2))` for the
/// `(n - 1) / 2` outer taps, centre 1, `sum = 2 sum(t) + 1`, weights `t_i * (1 / sum)`,
/// mirrored. For (11, 1.5) it equals cv2's kernel to 5e-16 relative (OpenCV evaluates it with
/// its software `softdouble` arithmetic).
///
/// # Panics
/// If `n` is zero or `sigma` is not positive.
pub fn gaussian_kernel(n: usize, sigma: f64) -> Vec<f64> {
    assert!(n > 0 && sigma > 0.0, "gaussian_kernel: n = {n}, sigma = {sigma}");
    let scale2x = -0.125 / (sigma * sigma);
    let n2 = (n - 1) / 2;
    let values: Vec<f64> = (0..n2)
        .map(|i| {
            let x = 2.0 * i as f64 + 1.0 - n as f64;
            (x * x * scale2x).exp()
        })
        .collect();
    let mut sum = values.iter().sum::<f64>() * 2.0 + 1.0;
    if n.is_multiple_of(2) {
        sum += 1.0;
    }
    let mul1 = 1.0 / sum;
    let mut out = vec![0.0; n];
    for (i, v) in values.iter().enumerate() {
        out[i] = v * mul1;
        out[n - 1 - i] = v * mul1;
    }
    out[n2] = mul1;
    if n.is_multiple_of(2) {
        out[n2 + 1] = mul1;
    }
    out
}

/// Output rows per parallel SSIM work item.
const SSIM_ROWS_PER_TASK: usize = 64;

/// SSIM of two `h x w` planes (values on a 0..255 scale), BasicSR's `_ssim`: mean over the valid
/// region of the SSIM map with the 11x11 Gaussian window (sigma 1.5), `C1 = (0.01*255)^2`,
/// `C2 = (0.03*255)^2`.
///
/// # Panics
/// If a plane does not hold `h * w` values or `h` or `w` is below 11.
pub fn ssim_plane(a: &[f64], b: &[f64], w: usize, h: usize) -> f64 {
    const K: usize = SSIM_WINDOW;
    assert!(
        a.len() == w * h && b.len() == w * h,
        "ssim_plane: planes of {} and {} values for {w}x{h}",
        a.len(),
        b.len()
    );
    assert!(w >= K && h >= K, "ssim_plane: {w}x{h} is smaller than the {K}x{K} window");
    let c1 = (0.01f64 * 255.0).powi(2);
    let c2 = (0.03f64 * 255.0).powi(2);
    let k = gaussian_kernel(K, SSIM_SIGMA);
    let (ow, oh) = (w - K + 1, h - K + 1);

    // Horizontal pass of one input row: the 5 filtered quantities (a, b, a^2, b^2, ab) for each
    // valid output column, interleaved.
    let hrow = |y: usize, dst: &mut [f64]| {
        let ra = &a[y * w..(y + 1) * w];
        let rb = &b[y * w..(y + 1) * w];
        for x in 0..ow {
            let mut s = [0f64; 5];
            for (j, &kj) in k.iter().enumerate() {
                let (p, q) = (ra[x + j], rb[x + j]);
                s[0] += kj * p;
                s[1] += kj * q;
                s[2] += kj * (p * p);
                s[3] += kj * (q * q);
                s[4] += kj * (p * q);
            }
            dst[x * 5..x * 5 + 5].copy_from_slice(&s);
        }
    };

    // Each task: output rows [y0, y1) need the horizontally filtered input rows [y0, y1 + K - 1).
    let tasks: Vec<usize> = (0..oh).step_by(SSIM_ROWS_PER_TASK).collect();
    let partial: Vec<f64> = tasks
        .par_iter()
        .map(|&y0| {
            let y1 = (y0 + SSIM_ROWS_PER_TASK).min(oh);
            let rows = y1 - y0 + K - 1;
            let mut hbuf = vec![0f64; rows * ow * 5];
            for (r, dst) in hbuf.chunks_mut(ow * 5).enumerate() {
                hrow(y0 + r, dst);
            }
            let mut sum = 0f64;
            let mut m = vec![0f64; ow * 5];
            for oy in 0..y1 - y0 {
                m.fill(0.0);
                for (i, &ki) in k.iter().enumerate() {
                    let src = &hbuf[(oy + i) * ow * 5..(oy + i + 1) * ow * 5];
                    for (d, &s) in m.iter_mut().zip(src) {
                        *d += ki * s;
                    }
                }
                let mut row_sum = 0f64;
                for v in m.chunks_exact(5) {
                    let (mu1, mu2) = (v[0], v[1]);
                    let mu1_sq = mu1 * mu1;
                    let mu2_sq = mu2 * mu2;
                    let mu1_mu2 = mu1 * mu2;
                    let sigma1_sq = v[2] - mu1_sq;
                    let sigma2_sq = v[3] - mu2_sq;
                    let sigma12 = v[4] - mu1_mu2;
                    row_sum += ((2.0 * mu1_mu2 + c1) * (2.0 * sigma12 + c2))
                        / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2));
                }
                sum += row_sum;
            }
            sum
        })
        .collect();
    partial.iter().sum::<f64>() / (ow * oh) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    /// A deterministic textured test image.
    fn pattern(w: u32, h: u32, seed: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let v = |c: u32| {
                let t = (x * (7 + c) + y * (13 + 2 * c) + seed * 31 + (x * y) % (5 + c)) % 200;
                (t + 20) as u8
            };
            Rgb([v(0), v(1), v(2)])
        })
    }

    #[test]
    fn luma_known_values() {
        // Values from tools/metrics_reference.py (BasicSR's to_y_channel, RGB order).
        let cases: [([u8; 3], f64); 6] = [
            ([0, 0, 0], 16.0),
            ([255, 255, 255], 235.0),
            ([12, 200, 77], 127.44609832763672),
            ([255, 0, 0], 81.48100280761719),
            ([1, 1, 1], 16.858823776245117),
            ([254, 254, 254], 234.14117431640625),
        ];
        let img = RgbImage::from_fn(6, 1, |x, _| Rgb(cases[x as usize].0));
        let y = rgb_to_y(&img);
        for ((px, want), got) in cases.iter().zip(&y) {
            assert_eq!(*got, *want, "{px:?}");
        }
    }

    #[test]
    fn identical_images() {
        let a = pattern(40, 33, 1);
        assert_eq!(psnr_y(&a, &a, 4).unwrap(), f64::INFINITY);
        assert_eq!(ssim_y(&a, &a, 4).unwrap(), 1.0);
        assert_eq!(ssim_y(&a, &a, 0).unwrap(), 1.0);
    }

    #[test]
    fn plane_offset_of_one_gray_level() {
        // mse = 1: 10 log10(255^2) = 48.1308 dB.
        let a: Vec<f64> = (0..300).map(|i| (i % 200) as f64 + 20.0).collect();
        let b: Vec<f64> = a.iter().map(|v| v + 1.0).collect();
        let p = psnr_plane(&a, &b);
        assert!((p - 48.130_803_608_679_1).abs() < 1e-9, "{p}");
        assert!((p - 20.0 * 255f64.log10()).abs() < 1e-12);
    }

    #[test]
    fn rgb_offset_of_one_gray_level() {
        // +1 on R, G and B moves Y by (65.481 + 128.553 + 24.966) / 255 = 219/255, so
        // PSNR-Y = 20 log10(255^2 / 219) = 49.4527 dB (up to BasicSR's float32 rounding of Y);
        // 48.13 dB is the value for a luma offset of exactly 1.
        let a = pattern(48, 40, 2);
        let b = RgbImage::from_fn(48, 40, |x, y| Rgb(a.get_pixel(x, y).0.map(|v| v + 1)));
        let p = psnr_y(&a, &b, 4).unwrap();
        let expect = 20.0 * (255.0f64 * 255.0 / 219.0).log10();
        assert!((p - expect).abs() < 1e-4, "{p} vs {expect}");
        assert!((p - 49.4527).abs() < 1e-4, "{p}");
        // The Python reference gives 8.737838810492393 for black+1 ... white+1 wrapped pixels;
        // here: a pure 6-pixel check of the same formula with the wrap (255 + 1 = 0 in uint8).
        let px: [[u8; 3]; 6] = [[0, 0, 0], [255, 255, 255], [12, 200, 77], [255, 0, 0], [1, 1, 1], [254, 254, 254]];
        let a = RgbImage::from_fn(6, 1, |x, _| Rgb(px[x as usize]));
        let b = RgbImage::from_fn(6, 1, |x, _| Rgb(px[x as usize].map(|v| v.wrapping_add(1))));
        let p = psnr_y(&a, &b, 0).unwrap();
        assert!((p - 8.737838810492393).abs() < 1e-9, "{p}");
    }

    #[test]
    fn symmetric_and_bounded() {
        let a = pattern(50, 45, 3);
        let b = pattern(50, 45, 4);
        let p1 = psnr_y(&a, &b, 4).unwrap();
        let p2 = psnr_y(&b, &a, 4).unwrap();
        assert_eq!(p1, p2);
        let s1 = ssim_y(&a, &b, 4).unwrap();
        let s2 = ssim_y(&b, &a, 4).unwrap();
        assert!((s1 - s2).abs() < 1e-15);
        assert!(s1 < 1.0 && s1 > -1.0);
    }

    #[test]
    fn ssim_tasks_agree_with_direct_2d_filter() {
        // A plane taller than one parallel task, against a direct 121-tap evaluation.
        let (w, h) = (23, 150);
        let a: Vec<f64> = (0..w * h).map(|i| ((i * 37) % 219) as f64 + 16.0).collect();
        let b: Vec<f64> = (0..w * h).map(|i| ((i * 53 + 7) % 219) as f64 + 16.0).collect();
        let k = gaussian_kernel(11, 1.5);
        let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
        let mut sum = 0.0;
        for y in 0..h - 10 {
            for x in 0..w - 10 {
                let mut s = [0f64; 5];
                for i in 0..11 {
                    for j in 0..11 {
                        let wt = k[i] * k[j];
                        let (p, q) = (a[(y + i) * w + x + j], b[(y + i) * w + x + j]);
                        s[0] += wt * p;
                        s[1] += wt * q;
                        s[2] += wt * p * p;
                        s[3] += wt * q * q;
                        s[4] += wt * p * q;
                    }
                }
                let (m1, m2) = (s[0], s[1]);
                sum += ((2.0 * m1 * m2 + c1) * (2.0 * (s[4] - m1 * m2) + c2))
                    / ((m1 * m1 + m2 * m2 + c1) * (s[2] - m1 * m1 + s[3] - m2 * m2 + c2));
            }
        }
        let direct = sum / ((w - 10) * (h - 10)) as f64;
        let fast = ssim_plane(&a, &b, w, h);
        assert!((direct - fast).abs() < 1e-12, "{direct} vs {fast}");
    }

    #[test]
    fn gaussian_kernel_matches_cv2() {
        // cv2.getGaussianKernel(11, 1.5) (opencv-python-headless 5.0.0), printed with repr();
        // OpenCV's softdouble exp/sum differ from f64 by up to 2 ulps (4.6e-16 relative).
        const CV2: [f64; 6] = [
            0.0010283800844791097,
            0.007598758135239182,
            0.03600077212843082,
            0.10936068950970002,
            0.21300553771125372,
            0.2660117248617943,
        ];
        let k = gaussian_kernel(11, 1.5);
        for i in 0..11 {
            let want = CV2[i.min(10 - i)];
            assert!((k[i] - want).abs() <= 1e-15 * want, "{i}: {} vs {want}", k[i]);
        }
        let s: f64 = k.iter().sum();
        assert!((s - 1.0).abs() < 1e-15);
    }

    #[test]
    fn size_errors() {
        let a = pattern(20, 20, 0);
        let b = pattern(20, 21, 0);
        assert_eq!(
            psnr_y(&a, &b, 0).unwrap_err(),
            MetricsError::SizeMismatch { a_width: 20, a_height: 20, b_width: 20, b_height: 21 }
        );
        assert!(ssim_y(&a, &b, 0).is_err());
        // 20 - 2*5 = 10 < 11: too small for SSIM, fine for PSNR.
        let e = ssim_y(&a, &a, 5).unwrap_err();
        assert!(matches!(e, MetricsError::TooSmall { min_side: 11, .. }), "{e}");
        assert!(e.to_string().contains("20x20"), "{e}");
        assert!(psnr_y(&a, &a, 5).is_ok());
        assert!(psnr_y(&a, &a, 10).is_err());
    }
}
