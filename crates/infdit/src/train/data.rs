//! Training samples: HR crops from image folders, and the LR inputs made from them.
//!
//! The recipe is the paper's (spec §10): with probability `resize_prob` (0.3) the image is first
//! resized so its shorter side equals the crop, otherwise it is cropped at its own resolution with a
//! horizontal flip of probability `flip_prob` (0.3); the LR is the Real-ESRGAN second-order
//! degradation of the crop ([`super::degrade()`]) with probability `degrade_prob` (1.0 in the
//! paper), else a clean antialiased-bicubic downscale rounded to 8 bits; the upsampled LR is made
//! exactly as at inference ([`crate::prepare::prepare_padded`]'s antialiased bicubic, clipped);
//! with probability `lr_dropout` (0.07) both LR inputs are replaced by clamped Gaussian noise.
//!
//! Not in the paper: with probability `soften_prob` (0 by default) the HR crop itself is first
//! softened ([`soften`]), target and LR alike, so that the model also sees soft photos (out of
//! focus, motion-blurred) whose 4x-downscaled LR differs only subtly from a sharp photo's.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::{DegradationConfig, Image, Profile, Sampler, SplitMix64, bivariate_kernel, degrade, filter2d};
use crate::error::{InfditError, Result};
use crate::imageio::find::ImageWalker;
use crate::imageio::resize::{Bicubic, resize_planar, resize_tensor};
use crate::imageio::{LoadLimits, load_image};

/// How samples are cut and degraded.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleConfig {
    /// HR crop side in pixels (a multiple of the block size; the paper: 512).
    pub crop: usize,
    /// Upscaling factor of the model (4).
    pub scale: usize,
    /// Probability of the resize-shorter-side-then-crop branch (0.3).
    pub resize_prob: f64,
    /// Probability of a horizontal flip in the plain-crop branch (0.3).
    pub flip_prob: f64,
    /// Probability that the LR comes from the Real-ESRGAN degradation (1.0); otherwise it is the
    /// clean antialiased-bicubic downscale.
    pub degrade_prob: f64,
    /// Degradation parameters.
    pub degradation: DegradationConfig,
    /// Probability that both LR inputs are replaced by clamped Gaussian noise (0.07).
    pub lr_dropout: f64,
    /// Probability that the HR crop is softened before anything is made from it ([`soften`]; 0:
    /// never, and then no random draw is spent on it).
    pub soften_prob: f64,
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self {
            crop: 512,
            scale: 4,
            resize_prob: 0.3,
            flip_prob: 0.3,
            degrade_prob: 1.0,
            degradation: DegradationConfig::default(),
            lr_dropout: 0.07,
            soften_prob: 0.0,
        }
    }
}

impl SampleConfig {
    /// Checks the settings for a model with `block_px`-px blocks before any example is drawn: the
    /// crop a positive multiple of the block, the scale at least 2, every probability in `[0, 1]`.
    /// An error names the field ([`InfditError::InvalidOption`]).
    pub fn validate(&self, block_px: usize) -> Result<()> {
        let bad = |option, reason| Err(InfditError::InvalidOption { option, reason });
        if self.crop == 0 || !self.crop.is_multiple_of(block_px) {
            return bad("crop", format!("{} is not a positive multiple of the {block_px}-px block", self.crop));
        }
        if self.scale < 2 {
            return bad("scale", format!("{} is not an upscaling factor", self.scale));
        }
        for (option, p) in [
            ("resize_prob", self.resize_prob),
            ("flip_prob", self.flip_prob),
            ("degrade_prob", self.degrade_prob),
            ("lr_dropout", self.lr_dropout),
            ("soften_prob", self.soften_prob),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(option, format!("{p} is not a probability (give 0 to 1)"));
            }
        }
        Ok(())
    }
}

/// One training example, tensors (1, 3, ., .) in `[-1, 1]` on the CPU.
#[derive(Debug, Clone)]
pub struct TrainSample {
    /// The HR crop (the diffusion target).
    pub hr: Tensor,
    /// The LR image the network sees (cross-attention, CLIP), `crop / scale` on a side.
    pub lr: Tensor,
    /// The upsampled LR concatenated to the noisy image, clipped to `[-1, 1]`.
    pub concat_lr: Tensor,
}

impl TrainSample {
    /// The example on `device` (a copy-free clone when it is already there).
    pub fn to_device(&self, device: &Device) -> candle_core::Result<Self> {
        Ok(Self {
            hr: self.hr.to_device(device)?,
            lr: self.lr.to_device(device)?,
            concat_lr: self.concat_lr.to_device(device)?,
        })
    }
}

/// Image files found under some paths, decoded once and kept in memory (as planar `[0, 1]` f32).
#[derive(Debug, Default)]
pub struct Dataset {
    images: Vec<(PathBuf, Image)>,
    /// Files not used, with the reason (too small, unreadable).
    pub skipped: Vec<(PathBuf, String)>,
}

/// Image files under `paths` (files as given, folders searched by [`ImageWalker`]: recursively,
/// by extension, hidden entries skipped), sorted; an unreadable folder is an error.
pub fn collect_image_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut walker = ImageWalker::new(None);
            let found = walker.images_below(p).map_err(|e| InfditError::io(p, e))?;
            if let Some((dir, e)) = walker.unreadable.first() {
                return Err(InfditError::Training {
                    path: dir.clone(),
                    reason: format!("cannot read the folder: {e}"),
                });
            }
            if let Some((f, kind)) = walker.not_regular.first() {
                return Err(InfditError::Training {
                    path: f.clone(),
                    reason: format!("is {kind}, not a regular file"),
                });
            }
            out.extend(found);
        } else if p.is_file() {
            out.push(p.clone());
        } else if let Ok(m) = std::fs::metadata(p) {
            let kind = crate::files::kind_of(&m.file_type());
            return Err(InfditError::Training { path: p.clone(), reason: format!("is {kind}, not a regular file") });
        } else {
            return Err(InfditError::Training { path: p.clone(), reason: "no such file or folder".into() });
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn tensor_to_image01(t: &Tensor) -> Result<Image> {
    let (_, c, h, w) = t.dims4()?;
    let data = ((t.flatten_all()? + 1.0)? * 0.5)?.to_vec1::<f32>()?;
    Ok(Image::new(c, h, w, data))
}

fn image01_to_tensor(img: &Image) -> Result<Tensor> {
    let t = Tensor::from_slice(&img.data, (1, img.c, img.h, img.w), &Device::Cpu)?;
    Ok(((t * 2.0)? - 1.0)?)
}

impl Dataset {
    /// Decodes every image file under `paths`. Images whose shorter side is below `min_side` are
    /// skipped (the paper skips images smaller than the crop); when `max_side > 0`, larger images
    /// are first downscaled (antialiased bicubic) so that their longer side is `max_side`.
    pub fn load(paths: &[PathBuf], min_side: usize, max_side: usize) -> Result<Self> {
        let mut ds = Dataset::default();
        for path in collect_image_files(paths)? {
            let loaded = match load_image(&path, &LoadLimits::default()) {
                Ok(l) => l,
                Err(e) => {
                    ds.skipped.push((path, e.to_string()));
                    continue;
                }
            };
            let mut rgb = loaded.rgb;
            let (_, _, h, w) = rgb.dims4()?;
            if max_side > 0 && h.max(w) > max_side {
                let f = max_side as f64 / h.max(w) as f64;
                let (nh, nw) = (((h as f64 * f).round() as usize).max(1), ((w as f64 * f).round() as usize).max(1));
                rgb = resize_tensor(&rgb, nh, nw, Bicubic::Antialias)?.clamp(-1f32, 1f32)?;
            }
            let img = tensor_to_image01(&rgb)?;
            if img.h.min(img.w) < min_side {
                ds.skipped.push((path, format!("{}x{} is smaller than {min_side} px on a side", img.w, img.h)));
                continue;
            }
            ds.images.push((path, img));
        }
        if ds.images.is_empty() {
            return Err(InfditError::Training {
                path: paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ").into(),
                reason: format!("no usable training image ({} skipped)", ds.skipped.len()),
            });
        }
        Ok(ds)
    }

    /// A dataset of images already in memory (planar `[0, 1]`), e.g. for tests.
    pub fn from_images(images: Vec<(PathBuf, Image)>) -> Self {
        Self { images, skipped: Vec::new() }
    }

    /// Number of usable images.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Whether there is no image.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// The files in use.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.images.iter().map(|(p, _)| p.as_path())
    }

    /// Draws one example: a random image, crop, flip and LR (deterministic in `rng`).
    pub fn sample(&self, cfg: &SampleConfig, rng: &mut SplitMix64) -> Result<TrainSample> {
        let (_, img) = &self.images[rng.below(self.images.len())];
        let mut hr = random_crop(img, cfg, rng);
        if cfg.soften_prob > 0.0 && rng.unit() < cfg.soften_prob {
            hr = soften(&hr, rng);
        }
        make_sample(&hr, cfg, rng)
    }
}

/// The paper's crop: resize-shorter-side-then-crop with probability `resize_prob`, else a plain
/// crop with a horizontal flip of probability `flip_prob`. `img` must be at least `crop` on a side.
pub fn random_crop(img: &Image, cfg: &SampleConfig, rng: &mut SplitMix64) -> Image {
    let s = cfg.crop;
    let (src, flip) = if rng.unit() < cfg.resize_prob {
        let f = s as f64 / img.h.min(img.w) as f64;
        let (nh, nw) = (((img.h as f64 * f).round() as usize).max(s), ((img.w as f64 * f).round() as usize).max(s));
        let data = resize_planar(&img.data, img.c, img.h, img.w, nh, nw, Bicubic::Antialias);
        let mut r = Image::new(img.c, nh, nw, data);
        r.clamp01();
        (std::borrow::Cow::Owned(r), false)
    } else {
        (std::borrow::Cow::Borrowed(img), rng.unit() < cfg.flip_prob)
    };
    let y0 = rng.below(src.h - s + 1);
    let x0 = rng.below(src.w - s + 1);
    let mut data = Vec::with_capacity(src.c * s * s);
    for ch in 0..src.c {
        for y in 0..s {
            let row = &src.data[(ch * src.h + y0 + y) * src.w + x0..][..s];
            if flip {
                data.extend(row.iter().rev());
            } else {
                data.extend_from_slice(row);
            }
        }
    }
    Image::new(src.c, s, s, data)
}

/// Largest standard deviation, in HR pixels, of [`soften`]'s blur along either axis.
pub const SOFTEN_SIGMA_MAX: f64 = 3.0;

/// A soft version of `img`: an anisotropic Gaussian blur with standard deviations drawn uniformly
/// in `[0.3, SOFTEN_SIGMA_MAX]` HR pixels on each axis and a uniform orientation (from a slight
/// defocus to a short motion blur), reflect-padded at the borders. Deterministic in `rng`.
pub fn soften(img: &Image, rng: &mut SplitMix64) -> Image {
    let sx = rng.uniform(0.3, SOFTEN_SIGMA_MAX);
    let sy = rng.uniform(0.3, SOFTEN_SIGMA_MAX);
    let theta = rng.uniform(0.0, std::f64::consts::PI);
    // 3 sigma of the longer axis on each side of the centre.
    let size = 2 * (3.0 * sx.max(sy)).ceil() as usize + 1;
    filter2d(img, &bivariate_kernel(size, sx, sy, theta, Profile::Gaussian))
}

/// The LR inputs of an HR crop (see the module docs).
pub fn make_sample(hr: &Image, cfg: &SampleConfig, rng: &mut SplitMix64) -> Result<TrainSample> {
    let (h, w, sc) = (hr.h, hr.w, cfg.scale);
    if h % sc != 0 || w % sc != 0 {
        return Err(InfditError::ImageSize {
            width: w,
            height: h,
            reason: format!("a training crop must be a multiple of the scale {sc}"),
        });
    }
    let lr_img = if rng.unit() < cfg.degrade_prob {
        degrade(hr, sc, &cfg.degradation, rng)
    } else {
        let data = resize_planar(&hr.data, hr.c, h, w, h / sc, w / sc, Bicubic::Antialias);
        let data = data.into_iter().map(|v| (v.clamp(0.0, 1.0) * 255.0).round() / 255.0).collect();
        Image::new(hr.c, h / sc, w / sc, data)
    };
    let (lr, concat_lr) = if rng.unit() < cfg.lr_dropout {
        let mut noise = |n: usize| (0..n).map(|_| (rng.normal() as f32).clamp(-1.0, 1.0)).collect::<Vec<f32>>();
        let lr = Tensor::from_vec(noise(3 * (h / sc) * (w / sc)), (1, 3, h / sc, w / sc), &Device::Cpu)?;
        let up = Tensor::from_vec(noise(3 * h * w), (1, 3, h, w), &Device::Cpu)?;
        (lr, up)
    } else {
        let lr = image01_to_tensor(&lr_img)?;
        let up = resize_tensor(&lr, h, w, Bicubic::Antialias)?.clamp(-1f32, 1f32)?;
        (lr, up)
    };
    Ok(TrainSample { hr: image01_to_tensor(hr)?, lr, concat_lr })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(c: usize, h: usize, w: usize) -> Image {
        let data = (0..c * h * w).map(|i| (i % 251) as f32 / 250.0).collect();
        Image::new(c, h, w, data)
    }

    #[test]
    fn plain_crop_copies_pixels_and_flips() {
        let img = ramp(3, 40, 50);
        let cfg = SampleConfig { crop: 16, resize_prob: 0.0, flip_prob: 1.0, ..Default::default() };
        let mut rng = SplitMix64::new(7);
        let c = random_crop(&img, &cfg, &mut rng);
        assert_eq!((c.c, c.h, c.w), (3, 16, 16));
        // Every row of the crop is a reversed run of a source row.
        let mut found = false;
        for y0 in 0..=24 {
            for x0 in 0..=34 {
                let ok = (0..3)
                    .all(|ch| (0..16).all(|y| (0..16).all(|x| c.at(ch, y, x) == img.at(ch, y0 + y, x0 + 15 - x))));
                found |= ok;
            }
        }
        assert!(found, "the crop is not a flipped window of the source");
    }

    #[test]
    fn resize_branch_fills_the_crop_from_the_whole_image() {
        let img = ramp(3, 64, 96);
        let cfg = SampleConfig { crop: 32, resize_prob: 1.0, ..Default::default() };
        let c = random_crop(&img, &cfg, &mut SplitMix64::new(1));
        assert_eq!((c.h, c.w), (32, 32));
        assert!(c.data.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn clean_lr_is_the_8_bit_bicubic_downscale() -> Result<()> {
        let hr = ramp(3, 32, 32);
        let cfg = SampleConfig { crop: 32, degrade_prob: 0.0, lr_dropout: 0.0, ..Default::default() };
        let s = make_sample(&hr, &cfg, &mut SplitMix64::new(3))?;
        assert_eq!(s.lr.dims(), &[1, 3, 8, 8]);
        assert_eq!(s.concat_lr.dims(), &[1, 3, 32, 32]);
        // LR values sit on 8-bit levels.
        for v in ((s.lr + 1.0)? * 127.5)?.flatten_all()?.to_vec1::<f32>()? {
            assert!((v - v.round()).abs() < 1e-3, "{v} is not an 8-bit level");
        }
        let hr_t = s.hr.flatten_all()?.to_vec1::<f32>()?;
        assert!((hr_t[0] - (hr.data[0] * 2.0 - 1.0)).abs() < 1e-6);
        Ok(())
    }

    /// Sum of absolute horizontal and vertical neighbour differences (total variation).
    fn total_variation(img: &Image) -> f64 {
        let mut tv = 0.0;
        for ch in 0..img.c {
            for y in 0..img.h {
                for x in 0..img.w {
                    let v = img.at(ch, y, x) as f64;
                    if x + 1 < img.w {
                        tv += (img.at(ch, y, x + 1) as f64 - v).abs();
                    }
                    if y + 1 < img.h {
                        tv += (img.at(ch, y + 1, x) as f64 - v).abs();
                    }
                }
            }
        }
        tv
    }

    #[test]
    fn soften_spreads_edges_and_keeps_flat_areas() {
        // Left half 0.2, right half 0.9: a sharp vertical edge.
        let (h, w) = (24, 32);
        let data = (0..3 * h * w).map(|i| if i % w < w / 2 { 0.2 } else { 0.9 }).collect();
        let img = Image::new(3, h, w, data);
        for seed in 0..8 {
            let s = soften(&img, &mut SplitMix64::new(seed));
            assert_eq!((s.c, s.h, s.w), (3, h, w));
            // The blur sums to one: far from the edge the levels stay, everything stays in range.
            for y in 0..h {
                assert!((s.at(0, y, 0) - 0.2).abs() < 1e-3 && (s.at(2, y, w - 1) - 0.9).abs() < 1e-3);
            }
            assert!(s.data.iter().all(|v| (0.2 - 1e-5..=0.9 + 1e-5).contains(v)));
            // The step is spread over several pixels, never reversed.
            let row: Vec<f32> = (0..w).map(|x| s.at(1, h / 2, x)).collect();
            let largest_step = row.windows(2).map(|p| p[1] - p[0]).fold(0f32, f32::max);
            assert!(row.windows(2).all(|p| p[1] >= p[0] - 1e-5), "seed {seed}: {row:?}");
            assert!(largest_step < 0.6, "seed {seed}: the edge stayed sharp ({largest_step})");
        }
    }

    #[test]
    fn bad_sample_settings_name_their_field() {
        let field = |c: SampleConfig| match c.validate(64) {
            Err(InfditError::InvalidOption { option, reason }) => format!("{option}: {reason}"),
            other => panic!("{other:?}"),
        };
        assert!(SampleConfig { crop: 256, ..Default::default() }.validate(64).is_ok());
        assert_eq!(
            field(SampleConfig { crop: 100, ..Default::default() }),
            "crop: 100 is not a positive multiple of the 64-px block"
        );
        assert_eq!(
            field(SampleConfig { crop: 0, ..Default::default() }),
            "crop: 0 is not a positive multiple of the 64-px block"
        );
        assert_eq!(field(SampleConfig { scale: 1, ..Default::default() }), "scale: 1 is not an upscaling factor");
        assert_eq!(
            field(SampleConfig { soften_prob: 1.5, ..Default::default() }),
            "soften_prob: 1.5 is not a probability (give 0 to 1)"
        );
        assert_eq!(
            field(SampleConfig { lr_dropout: -0.1, ..Default::default() }),
            "lr_dropout: -0.1 is not a probability (give 0 to 1)"
        );
        assert_eq!(
            field(SampleConfig { degrade_prob: f64::NAN, ..Default::default() }),
            "degrade_prob: NaN is not a probability (give 0 to 1)"
        );
    }

    #[test]
    fn softening_is_drawn_only_when_asked() -> Result<()> {
        let ds = Dataset::from_images(vec![(PathBuf::from("ramp"), ramp(3, 48, 48))]);
        let plain = SampleConfig { crop: 32, degrade_prob: 0.0, lr_dropout: 0.0, ..Default::default() };
        // soften_prob 0 spends no draw: the same example as a crop made by hand from the same seed.
        let mut rng = SplitMix64::new(5);
        let _ = rng.below(1);
        let hr = random_crop(&ds.images[0].1, &plain, &mut rng);
        let by_hand = make_sample(&hr, &plain, &mut rng)?;
        let drawn = ds.sample(&plain, &mut SplitMix64::new(5))?;
        let flat = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
        assert_eq!(flat(&drawn.hr)?, flat(&by_hand.hr)?);
        assert_eq!(flat(&drawn.lr)?, flat(&by_hand.lr)?);
        // soften_prob 1: the same crop, softer (lower total variation), and the LR made from it.
        let soft = ds.sample(&SampleConfig { soften_prob: 1.0, ..plain }, &mut SplitMix64::new(5))?;
        let to_image = |t: &Tensor| -> Result<Image> { Ok(Image::new(3, 32, 32, flat(&((t + 1.0)? / 2.0)?)?)) };
        let (sharp_tv, soft_tv) = (total_variation(&to_image(&drawn.hr)?), total_variation(&to_image(&soft.hr)?));
        assert!(soft_tv < 0.9 * sharp_tv, "softened {soft_tv} vs {sharp_tv}");
        assert_ne!(flat(&soft.lr)?, flat(&drawn.lr)?);
        Ok(())
    }

    #[test]
    fn lr_dropout_replaces_both_inputs_with_clamped_noise() -> Result<()> {
        let hr = ramp(3, 16, 16);
        let cfg = SampleConfig { crop: 16, degrade_prob: 0.0, lr_dropout: 1.0, ..Default::default() };
        let s = make_sample(&hr, &cfg, &mut SplitMix64::new(3))?;
        let up = s.concat_lr.flatten_all()?.to_vec1::<f32>()?;
        assert!(up.iter().all(|v| (-1.0..=1.0).contains(v)));
        let mean = up.iter().sum::<f32>() / up.len() as f32;
        assert!(mean.abs() < 0.15, "noise mean {mean}");
        assert!(up.iter().filter(|v| v.abs() == 1.0).count() > up.len() / 5, "no clamping seen");
        Ok(())
    }
}
