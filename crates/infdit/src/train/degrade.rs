//! The Real-ESRGAN second-order degradation: blur, random resize, noise, JPEG, twice, then the
//! final resize to `HR / scale` with a sinc filter and a last JPEG in random order.

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::{ExtendedColorType, ImageFormat};

use super::kernels::{Kernel, random_blur_kernel, sinc_kernel};
use super::stages::{DegradationConfig, StageConfig};
use super::{Image, Sampler, SplitMix64};
use crate::imageio::resize::{Bicubic, resize_planar};

/// Index into `0..n` of position `i` under reflect padding (mirror without repeating the edge,
/// torch's `'reflect'`), valid for any offset (reflections repeat with period `2n - 2`).
fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let p = 2 * (n as isize - 1);
    let m = i.rem_euclid(p);
    (if m < n as isize { m } else { p - m }) as usize
}

/// 2-D filtering with reflect padding of `size / 2` on each side, per channel, as BasicSR's
/// `filter2d` (`F.pad(mode='reflect')` then `F.conv2d`, i.e. cross-correlation:
/// `out(y, x) = Σ k(i, j) img(y + i - r, x + j - r)`). All Real-ESRGAN kernels are
/// point-symmetric, so this equals convolution for them.
pub fn filter2d(img: &Image, k: &Kernel) -> Image {
    let (size, r) = (k.size, (k.size / 2) as isize);
    let (h, w) = (img.h, img.w);
    // The plane padded by reflection, in f64, so that the taps run along contiguous rows; each
    // output value is still the sum of k(i, j) img(...) in (i, j) order, in f64: the same bits as
    // the per-pixel loop this replaced (about 10x slower).
    let (ph, pw) = (h + 2 * r as usize, w + 2 * r as usize);
    let rows: Vec<usize> = (0..ph as isize).map(|y| reflect(y - r, h)).collect();
    let cols: Vec<usize> = (0..pw as isize).map(|x| reflect(x - r, w)).collect();
    let kd: Vec<f64> = k.data.iter().map(|&v| v as f64).collect();
    let mut padded = vec![0f64; ph * pw];
    let mut acc = vec![0f64; w];
    let mut out = vec![0f32; img.data.len()];
    for ch in 0..img.c {
        let plane = &img.data[ch * h * w..(ch + 1) * h * w];
        for (prow, &sy) in padded.chunks_exact_mut(pw).zip(&rows) {
            let src = &plane[sy * w..(sy + 1) * w];
            for (p, &sx) in prow.iter_mut().zip(&cols) {
                *p = src[sx] as f64;
            }
        }
        let dst = &mut out[ch * h * w..(ch + 1) * h * w];
        for (y, drow) in dst.chunks_exact_mut(w).enumerate() {
            acc.fill(0.0);
            for i in 0..size {
                let prow = &padded[(y + i) * pw..(y + i + 1) * pw];
                for (j, &kv) in kd[i * size..(i + 1) * size].iter().enumerate() {
                    for (a, &p) in acc.iter_mut().zip(&prow[j..j + w]) {
                        *a += kv * p;
                    }
                }
            }
            for (d, &a) in drow.iter_mut().zip(&acc) {
                *d = a as f32;
            }
        }
    }
    Image { c: img.c, h, w, data: out }
}

/// Interpolation modes of the random resizes (drawn uniformly, as Real-ESRGAN does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeMode {
    /// Box average over the covered source pixels (torch `'area'` = adaptive average pooling).
    Area,
    /// Bilinear, `align_corners=False`, no antialiasing (torch `'bilinear'`).
    Bilinear,
    /// Antialiased bicubic ([`resize_planar`] with [`Bicubic::Antialias`]).
    Bicubic,
}

impl ResizeMode {
    const ALL: [ResizeMode; 3] = [ResizeMode::Area, ResizeMode::Bilinear, ResizeMode::Bicubic];
}

/// Per output index: first source index and weights.
type Taps = Vec<(usize, Vec<f32>)>;

fn area_taps(n_in: usize, n_out: usize) -> Taps {
    (0..n_out)
        .map(|i| {
            let s = i * n_in / n_out;
            let e = ((i + 1) * n_in).div_ceil(n_out);
            (s, vec![1.0 / (e - s) as f32; e - s])
        })
        .collect()
}

fn bilinear_taps(n_in: usize, n_out: usize) -> Taps {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|i| {
            let src = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(n_in - 1);
            let l = (src - i0 as f64) as f32;
            if i0 + 1 < n_in { (i0, vec![1.0 - l, l]) } else { (i0, vec![1.0]) }
        })
        .collect()
}

fn apply_separable(img: &Image, oh: usize, ow: usize, ty: &Taps, tx: &Taps) -> Image {
    let (c, h, w) = (img.c, img.h, img.w);
    let mut tmp = vec![0f32; c * h * ow];
    for row in 0..c * h {
        let src = &img.data[row * w..(row + 1) * w];
        for (x, (s, wts)) in tx.iter().enumerate() {
            tmp[row * ow + x] = wts.iter().zip(&src[*s..]).map(|(a, b)| a * b).sum();
        }
    }
    let mut out = vec![0f32; c * oh * ow];
    for ch in 0..c {
        for (y, (s, wts)) in ty.iter().enumerate() {
            let dst = &mut out[(ch * oh + y) * ow..(ch * oh + y + 1) * ow];
            for (k, wt) in wts.iter().enumerate() {
                let src = &tmp[(ch * h + s + k) * ow..(ch * h + s + k + 1) * ow];
                for (d, v) in dst.iter_mut().zip(src) {
                    *d += wt * v;
                }
            }
        }
    }
    Image { c, h: oh, w: ow, data: out }
}

/// Resize to `oh x ow` (at least 1x1) with the given mode.
pub fn resize(img: &Image, oh: usize, ow: usize, mode: ResizeMode) -> Image {
    let (oh, ow) = (oh.max(1), ow.max(1));
    if (oh, ow) == (img.h, img.w) {
        return img.clone();
    }
    match mode {
        ResizeMode::Bicubic => Image {
            c: img.c,
            h: oh,
            w: ow,
            data: resize_planar(&img.data, img.c, img.h, img.w, oh, ow, Bicubic::Antialias),
        },
        ResizeMode::Area => apply_separable(img, oh, ow, &area_taps(img.h, oh), &area_taps(img.w, ow)),
        ResizeMode::Bilinear => apply_separable(img, oh, ow, &bilinear_taps(img.h, oh), &bilinear_taps(img.w, ow)),
    }
}

/// Add Gaussian noise of standard deviation `sigma` (in `[0, 1]` units); `gray` uses one noise
/// plane for all channels. The result is clamped to `[0, 1]`.
pub fn add_gaussian_noise(img: &Image, sigma: f64, gray: bool, rng: &mut impl Sampler) -> Image {
    let plane = img.h * img.w;
    let mut out = img.clone();
    if gray {
        let noise: Vec<f32> = (0..plane).map(|_| (rng.normal() * sigma) as f32).collect();
        for chunk in out.data.chunks_mut(plane) {
            for (v, n) in chunk.iter_mut().zip(&noise) {
                *v += n;
            }
        }
    } else {
        for v in &mut out.data {
            *v += (rng.normal() * sigma) as f32;
        }
    }
    out.clamp01();
    out
}

/// `2^ceil(log2(#distinct 8-bit levels))` of `vals` (BasicSR's Poisson "vals").
fn poisson_levels(vals: &[f32]) -> f64 {
    let mut seen = [false; 256];
    for &v in vals {
        seen[(v.clamp(0.0, 1.0) * 255.0).round() as usize] = true;
    }
    let n = seen.iter().filter(|&&s| s).count().max(1);
    (n as f64).log2().ceil().exp2()
}

/// Poisson (shot) noise as BasicSR `generate_poisson_noise`: the image is rounded to 8-bit
/// levels, `vals = 2^ceil(log2(#levels))`, `noise = Poisson(img * vals) / vals - img`, scaled by
/// `scale` and added; `gray` computes one noise plane on the luma (0.299 R + 0.587 G + 0.114 B).
/// The result is clamped to `[0, 1]`.
pub fn add_poisson_noise(img: &Image, scale: f64, gray: bool, rng: &mut impl Sampler) -> Image {
    let plane = img.h * img.w;
    let q = |v: f32| ((v.clamp(0.0, 1.0) * 255.0).round() / 255.0) as f64;
    let noise_of = |src: &[f32], rng: &mut dyn FnMut(f64) -> u64| -> Vec<f32> {
        let vals = poisson_levels(src);
        src.iter()
            .map(|&v| {
                let x = q(v);
                ((rng(x * vals) as f64 / vals - x) * scale) as f32
            })
            .collect()
    };
    let mut draw = |lam: f64| rng.poisson(lam);
    let mut out = img.clone();
    if gray && img.c == 3 {
        let luma: Vec<f32> = (0..plane)
            .map(|i| 0.299 * img.data[i] + 0.587 * img.data[plane + i] + 0.114 * img.data[2 * plane + i])
            .collect();
        let noise = noise_of(&luma, &mut draw);
        for chunk in out.data.chunks_mut(plane) {
            for (v, n) in chunk.iter_mut().zip(&noise) {
                *v += n;
            }
        }
    } else {
        let noise = noise_of(&img.data, &mut draw);
        for (v, n) in out.data.iter_mut().zip(&noise) {
            *v += n;
        }
    }
    out.clamp01();
    out
}

/// JPEG round trip at `quality` (1..=100) through the `image` crate: clamp, quantise to 8 bits,
/// encode (RGB or gray), decode, back to `[0, 1]`.
///
/// # Panics
/// If the image has neither 1 nor 3 channels, or the codec fails.
pub fn jpeg_roundtrip(img: &Image, quality: u8) -> Image {
    let plane = img.h * img.w;
    let q = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    let (bytes, color): (Vec<u8>, _) = match img.c {
        3 => ((0..plane * 3).map(|i| q(img.data[(i % 3) * plane + i / 3])).collect(), ExtendedColorType::Rgb8),
        1 => (img.data.iter().map(|&v| q(v)).collect(), ExtendedColorType::L8),
        c => panic!("jpeg_roundtrip: {c} channels"),
    };
    let mut buf = Vec::new();
    JpegEncoder::new_with_quality(&mut buf, quality.clamp(1, 100))
        .encode(&bytes, img.w as u32, img.h as u32, color)
        .expect("JPEG encode");
    let dec = image::load(Cursor::new(buf), ImageFormat::Jpeg).expect("JPEG decode");
    let mut out = Image::filled(img.c, img.h, img.w, 0.0);
    if img.c == 3 {
        let rgb = dec.to_rgb8();
        for (i, px) in rgb.pixels().enumerate() {
            for ch in 0..3 {
                out.data[ch * plane + i] = px.0[ch] as f32 / 255.0;
            }
        }
    } else {
        for (o, px) in out.data.iter_mut().zip(dec.to_luma8().pixels()) {
            *o = px.0[0] as f32 / 255.0;
        }
    }
    out
}

/// Random resize scale: up `[1, hi)`, down `[lo, 1)` or keep, with `resize_prob`.
fn draw_scale(st: &StageConfig, rng: &mut SplitMix64) -> f64 {
    match rng.choice(&st.resize_prob) {
        0 => rng.uniform(1.0, st.resize_range.1),
        1 => rng.uniform(st.resize_range.0, 1.0),
        _ => 1.0,
    }
}

fn draw_mode(rng: &mut SplitMix64) -> ResizeMode {
    ResizeMode::ALL[rng.below(3)]
}

fn random_noise(img: &Image, st: &StageConfig, rng: &mut SplitMix64) -> Image {
    if rng.unit() < st.gaussian_noise_prob {
        let sigma = rng.uniform(st.noise_range.0, st.noise_range.1) / 255.0;
        let gray = rng.unit() < st.gray_noise_prob;
        add_gaussian_noise(img, sigma, gray, rng)
    } else {
        let scale = rng.uniform(st.poisson_scale_range.0, st.poisson_scale_range.1);
        let gray = rng.unit() < st.gray_noise_prob;
        add_poisson_noise(img, scale, gray, rng)
    }
}

fn random_jpeg(img: &Image, st: &StageConfig, rng: &mut SplitMix64) -> Image {
    let q = rng.uniform(st.jpeg_range.0, st.jpeg_range.1).round() as u8;
    jpeg_roundtrip(img, q)
}

/// The Real-ESRGAN second-order degradation of `hr` (1 or 3 channels, values in `[0, 1]`) to an
/// LR image of `(h / scale) x (w / scale)` (at least 1x1), following `RealESRGANModel.feed_data`:
///
/// 1. blur (kernel 1), random resize (up/down/keep, area/bilinear/bicubic), Gaussian or Poisson
///    noise, JPEG;
/// 2. blur (kernel 2) with probability `second_blur_prob`, random resize to
///    `(h / scale * s, w / scale * s)`, noise, then with probability 1/2 each either
///    [resize to `h / scale` + final sinc, JPEG] or [JPEG, resize + final sinc];
///
/// and finally clamp to `[0, 1]` and round to 8-bit levels. Deterministic in `rng`.
pub fn degrade(hr: &Image, scale: usize, cfg: &DegradationConfig, rng: &mut SplitMix64) -> Image {
    assert!(scale >= 1, "degrade: scale must be >= 1");
    let (oh, ow) = (hr.h, hr.w);
    let (lh, lw) = ((oh / scale).max(1), (ow / scale).max(1));
    // Kernels are drawn up front, as the dataset does.
    let k1 = random_blur_kernel(cfg.kernel_range, &cfg.first, rng);
    let k2 = random_blur_kernel(cfg.kernel_range, &cfg.second, rng);
    let final_k = if rng.unit() < cfg.final_sinc_prob {
        let sizes: Vec<usize> = (cfg.kernel_range.0..=cfg.kernel_range.1).filter(|k| k % 2 == 1).collect();
        let size = sizes[rng.below(sizes.len())];
        Some(sinc_kernel(size, rng.uniform(std::f64::consts::PI / 3.0, std::f64::consts::PI)))
    } else {
        None
    };

    // First stage.
    let mut out = filter2d(hr, &k1);
    let s1 = draw_scale(&cfg.first, rng);
    let mode = draw_mode(rng);
    out = resize(&out, (out.h as f64 * s1) as usize, (out.w as f64 * s1) as usize, mode);
    out = random_noise(&out, &cfg.first, rng);
    out = random_jpeg(&out, &cfg.first, rng);

    // Second stage.
    if rng.unit() < cfg.second_blur_prob {
        out = filter2d(&out, &k2);
    }
    let s2 = draw_scale(&cfg.second, rng);
    let mode = draw_mode(rng);
    let (h2, w2) = ((oh as f64 / scale as f64 * s2) as usize, (ow as f64 / scale as f64 * s2) as usize);
    out = resize(&out, h2, w2, mode);
    out = random_noise(&out, &cfg.second, rng);

    let resize_sinc = |img: &Image, rng: &mut SplitMix64| {
        let r = resize(img, lh, lw, draw_mode(rng));
        match &final_k {
            Some(k) => filter2d(&r, k),
            None => r,
        }
    };
    if rng.unit() < 0.5 {
        out = resize_sinc(&out, rng);
        out = random_jpeg(&out, &cfg.second, rng);
    } else {
        out = random_jpeg(&out, &cfg.second, rng);
        out = resize_sinc(&out, rng);
    }
    for v in &mut out.data {
        *v = (v.clamp(0.0, 1.0) * 255.0).round() / 255.0;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::kernels::{Profile, bivariate_kernel};
    use super::*;

    fn gradient(c: usize, h: usize, w: usize) -> Image {
        let mut img = Image::filled(c, h, w, 0.0);
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    img.data[(ch * h + y) * w + x] = 0.1
                        + 0.8 * (x as f32 / (w - 1) as f32 * 0.6 + y as f32 / (h - 1) as f32 * 0.4)
                        - 0.05 * ch as f32;
                }
            }
        }
        img
    }

    fn psnr(a: &Image, b: &Image) -> f64 {
        let mse = a.data.iter().zip(&b.data).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / a.data.len() as f64;
        10.0 * (1.0 / mse).log10()
    }

    #[test]
    fn reflect_indices() {
        let got: Vec<usize> = (-4..9).map(|i| reflect(i, 4)).collect();
        assert_eq!(got, vec![2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2]);
        assert_eq!(reflect(-7, 1), 0);
    }

    /// The per-pixel definition of [`filter2d`].
    fn filter2d_per_pixel(img: &Image, k: &Kernel) -> Image {
        let r = (k.size / 2) as isize;
        let (h, w) = (img.h, img.w);
        let mut out = vec![0f32; img.data.len()];
        for ch in 0..img.c {
            for y in 0..h {
                for x in 0..w {
                    let mut acc = 0f64;
                    for i in 0..k.size {
                        for j in 0..k.size {
                            let (sy, sx) =
                                (reflect(y as isize + i as isize - r, h), reflect(x as isize + j as isize - r, w));
                            acc += k.data[i * k.size + j] as f64 * img.data[(ch * h + sy) * w + sx] as f64;
                        }
                    }
                    out[(ch * h + y) * w + x] = acc as f32;
                }
            }
        }
        Image { c: img.c, h, w, data: out }
    }

    #[test]
    fn filter2d_is_the_per_pixel_sum() {
        let img = gradient(3, 23, 17);
        for (size, sx, sy) in [(7, 1.2, 0.7), (21, 3.0, 2.0), (3, 0.5, 0.5)] {
            let k = bivariate_kernel(size, sx, sy, 0.4, Profile::Generalized(1.5));
            assert_eq!(filter2d(&img, &k).data, filter2d_per_pixel(&img, &k).data, "size {size}");
        }
        // Kernel wider than the image (reflected more than once).
        let k = bivariate_kernel(21, 3.0, 3.0, 0.0, Profile::Gaussian);
        let tiny = gradient(1, 3, 4);
        assert_eq!(filter2d(&tiny, &k).data, filter2d_per_pixel(&tiny, &k).data);
    }

    #[test]
    fn filter2d_constant_and_delta() {
        let k = bivariate_kernel(9, 2.0, 0.8, 0.6, Profile::Generalized(1.5));
        let img = Image::filled(3, 12, 10, 0.37);
        let out = filter2d(&img, &k);
        assert!(out.data.iter().all(|v| (v - 0.37).abs() < 1e-6));
        // Delta in the middle reproduces the (point-symmetric) kernel.
        let mut d = Image::filled(1, 31, 31, 0.0);
        d.data[15 * 31 + 15] = 1.0;
        let out = filter2d(&d, &k);
        for y in 0..31 {
            for x in 0..31 {
                let want = if (11..20).contains(&y) && (11..20).contains(&x) { k.at(y - 11, x - 11) } else { 0.0 };
                assert!((out.at(0, y, x) - want).abs() < 1e-7, "({y},{x})");
            }
        }
        // An arbitrary kernel comes out rotated by 180° (cross-correlation, as torch's conv2d).
        let arb = Kernel { size: 3, data: (1..=9).map(|v| v as f32).collect() };
        let mut d = Image::filled(1, 5, 5, 0.0);
        d.data[12] = 1.0;
        let out = filter2d(&d, &arb);
        for i in 0..3 {
            for j in 0..3 {
                assert_eq!(out.at(0, 1 + i, 1 + j), arb.at(2 - i, 2 - j));
            }
        }
        // Reflect padding (tiny image, kernel wider than it) keeps a constant constant.
        let out = filter2d(&Image::filled(1, 3, 4, 0.6), &bivariate_kernel(21, 3.0, 3.0, 0.0, Profile::Gaussian));
        assert!(out.data.iter().all(|v| (v - 0.6).abs() < 1e-6));
    }

    #[test]
    fn resize_modes() {
        let img = gradient(3, 40, 60);
        for mode in ResizeMode::ALL {
            let c = resize(&Image::filled(3, 40, 60, 0.42), 17, 33, mode);
            assert_eq!((c.h, c.w), (17, 33));
            assert!(c.data.iter().all(|v| (v - 0.42).abs() < 1e-5), "{mode:?}");
            let up = resize(&img, 70, 90, mode);
            assert_eq!((up.c, up.h, up.w), (3, 70, 90));
        }
        // Area 2x down is the 2x2 mean.
        let a = resize(&img, 20, 30, ResizeMode::Area);
        let want = (img.at(1, 6, 8) + img.at(1, 6, 9) + img.at(1, 7, 8) + img.at(1, 7, 9)) / 4.0;
        assert!((a.at(1, 3, 4) - want).abs() < 1e-6);
        // Bilinear 2x down of a linear ramp is exact (sample at 2i + 0.5).
        let b = resize(&img, 20, 30, ResizeMode::Bilinear);
        assert!((b.at(1, 3, 4) - want).abs() < 1e-5);
    }

    #[test]
    fn gaussian_noise_std() {
        let img = Image::filled(1, 256, 256, 0.5);
        let mut rng = SplitMix64::new(3);
        for sigma in [5.0 / 255.0, 0.05, 0.1] {
            let out = add_gaussian_noise(&img, sigma, false, &mut rng);
            let n = out.data.len() as f64;
            let m = out.data.iter().map(|&v| v as f64).sum::<f64>() / n;
            let sd = (out.data.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n).sqrt();
            assert!((sd - sigma).abs() < 0.05 * sigma, "sigma {sigma}: std {sd}");
            assert!((m - 0.5).abs() < 0.002);
        }
        // Gray noise: identical across channels; colour noise: not.
        let rgb = Image::filled(3, 16, 16, 0.5);
        let g = add_gaussian_noise(&rgb, 0.05, true, &mut rng);
        assert_eq!(g.data[..256], g.data[256..512]);
        let c = add_gaussian_noise(&rgb, 0.05, false, &mut rng);
        assert_ne!(c.data[..256], c.data[256..512]);
        // Clamped.
        let big = add_gaussian_noise(&rgb, 2.0, false, &mut rng);
        assert!(big.data.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn poisson_noise_preserves_mean() {
        // A ramp over [0.3, 0.7]: ~103 levels, so vals = 128, noise std at 0.5 ≈ 0.0625.
        let mut img = Image::filled(3, 256, 256, 0.0);
        for (i, v) in img.data.iter_mut().enumerate() {
            *v = 0.3 + 0.4 * ((i % 256) as f32 / 255.0);
        }
        let mut rng = SplitMix64::new(11);
        // Scales where clamping at 0/1 is > 4 sigma away (clamping biases larger scales).
        for (scale, gray) in [(1.0, false), (0.5, false), (1.5, true)] {
            let out = add_poisson_noise(&img, scale, gray, &mut rng);
            let n = img.data.len() as f64;
            let m_in = img.data.iter().map(|&v| v as f64).sum::<f64>() / n;
            let m_out = out.data.iter().map(|&v| v as f64).sum::<f64>() / n;
            assert!((m_in - m_out).abs() < 2e-3, "scale {scale}: {m_in} -> {m_out}");
            let sd = (out.data.iter().zip(&img.data).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / n).sqrt();
            // Expected RMS noise: scale * sqrt(mean(x) / 128).
            let want = scale * (0.5f64 / 128.0).sqrt();
            assert!((sd - want).abs() < 0.1 * want, "scale {scale}: rms {sd} vs {want}");
        }
    }

    #[test]
    fn jpeg_roundtrip_smooth_is_close() {
        let img = gradient(3, 64, 96);
        let out = jpeg_roundtrip(&img, 95);
        assert_eq!((out.c, out.h, out.w), (3, 64, 96));
        let p = psnr(&img, &out);
        eprintln!("JPEG q=95 PSNR on a smooth gradient: {p:.2} dB");
        assert!(p > 30.0, "PSNR {p}");
        assert!(out.data != img.data);
        let low = jpeg_roundtrip(&img, 30);
        assert!(psnr(&img, &low) < p + 1e-9);
        let gray = jpeg_roundtrip(&gradient(1, 32, 32), 95);
        assert!(psnr(&gradient(1, 32, 32), &gray) > 30.0);
    }

    #[test]
    fn degrade_size_range_determinism() {
        let cfg = DegradationConfig::default();
        let hr = gradient(3, 128, 96);
        let a = degrade(&hr, 4, &cfg, &mut SplitMix64::new(42));
        let b = degrade(&hr, 4, &cfg, &mut SplitMix64::new(42));
        let c = degrade(&hr, 4, &cfg, &mut SplitMix64::new(43));
        assert_eq!((a.c, a.h, a.w), (3, 32, 24));
        assert_eq!(a, b);
        assert_ne!(a, c);
        for seed in 0..6 {
            let lr = degrade(&hr, 4, &cfg, &mut SplitMix64::new(seed));
            assert_eq!((lr.h, lr.w), (32, 24));
            for &v in &lr.data {
                assert!((0.0..=1.0).contains(&v));
                assert!(((v * 255.0).round() - v * 255.0).abs() < 1e-3, "not on 8-bit levels: {v}");
            }
        }
    }

    #[test]
    fn degrade_smooth_close_to_bicubic() {
        let cfg = DegradationConfig::default();
        let hr = gradient(3, 128, 128);
        let reference = resize(&hr, 32, 32, ResizeMode::Bicubic);
        let mut total = 0.0;
        for seed in 0..8 {
            let lr = degrade(&hr, 4, &cfg, &mut SplitMix64::new(100 + seed));
            let mad = lr.data.iter().zip(&reference.data).map(|(a, b)| (a - b).abs() as f64).sum::<f64>()
                / lr.data.len() as f64;
            assert!(mad < 0.1, "seed {seed}: mean abs diff {mad}");
            total += mad;
        }
        eprintln!("average mean abs diff to bicubic: {}", total / 8.0);
        assert!(total / 8.0 < 0.06, "average mean abs diff {}", total / 8.0);
    }

    #[test]
    fn degrade_many_seeds_small_and_gray() {
        let cfg = DegradationConfig::default();
        let rgb = gradient(3, 24, 20);
        let gray = gradient(1, 32, 32);
        for seed in 0..150 {
            let lr = degrade(&rgb, 4, &cfg, &mut SplitMix64::new(seed));
            assert_eq!((lr.c, lr.h, lr.w), (3, 6, 5));
            assert!(lr.data.iter().all(|v| (0.0..=1.0).contains(v)));
            let lg = degrade(&gray, 2, &cfg, &mut SplitMix64::new(seed));
            assert_eq!((lg.c, lg.h, lg.w), (1, 16, 16));
        }
    }
}
