//! The evaluation harness behind `infdit eval` and `bench/quality.sh`: degrade HR images by an
//! antialiased bicubic downscale (8-bit, as a user's LR file would be), upscale them back to the HR
//! size with an [`Upscaler`] (its whole plan: passes, then a resize) and with bicubic, and score both,
//! and any other upscaler's outputs of the same LR images ([`Peer`]), against the HR image with the
//! [`metrics`](crate::metrics) (PSNR-Y, SSIM-Y, seam score, flat-area deviation, seconds).
//!
//! [`evaluate_image`] does one image; the front end loops over the files ([`collect_hr_inputs`]),
//! reports failures per image and prints [`metrics::format_table`] / [`metrics::format_comparison`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use image::RgbImage;

use crate::error::{InfditError, Result};
use crate::imageio::resize::{Bicubic, center_crop_offsets, resize_shorter_side, resize_tensor};
use crate::imageio::{LoadedImage, Rounding, crop, load_rgb, rgb8_to_tensor, save_rgb8_atomic, tensor_to_rgb8_with};
use crate::metrics::{EvalRow, ImageScores, bicubic_resize, score};
use crate::train::collect_image_files;
use crate::upscale::{Target, UpscaleOptions, Upscaler};

/// Pixels removed on each side before PSNR-Y, SSIM-Y and the flat-area deviation (BasicSR's
/// convention: the scale, 4).
pub const CROP_BORDER: usize = 4;
/// Largest HR image read, in pixels.
pub const MAX_HR_PIXELS: u64 = 64 << 20;

/// How the HR images are turned into test cases.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSettings {
    /// Resize each HR image's shorter side to this (antialiased bicubic) and take the centre square
    /// first (e.g. 1024: a 256 -> 1024 test at 4x).
    pub hr_size: Option<usize>,
    /// The degradation factor (at least 1; need not be an integer).
    pub scale: f64,
    /// Also write each model output (`{stem}.png`) with the LR input, the bicubic baseline and the HR
    /// reference beside it (`{stem}_lr.png`, `_bicubic`, `_hr`) into this existing folder.
    pub out_dir: Option<PathBuf>,
}

impl Default for EvalSettings {
    fn default() -> Self {
        Self { hr_size: None, scale: 4.0, out_dir: None }
    }
}

impl EvalSettings {
    /// Checks the settings before any image is read.
    pub fn validate(&self) -> Result<()> {
        let bad = |option: &'static str, reason: String| Err(InfditError::InvalidOption { option, reason });
        if self.hr_size == Some(0) {
            return bad("hr_size", "must be at least 1".into());
        }
        if !(self.scale.is_finite() && self.scale >= 1.0) {
            return bad("scale", format!("{} must be a number of at least 1", self.scale));
        }
        Ok(())
    }
}

/// The files named, with folders expanded recursively to their image files (sorted); a folder that
/// cannot be read is an error in its place, so the other inputs still run.
pub fn collect_hr_inputs(paths: &[PathBuf]) -> Vec<Result<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            match collect_image_files(std::slice::from_ref(p)) {
                Ok(files) => out.extend(files.into_iter().map(Ok)),
                Err(e) => out.push(Err(e)),
            }
        } else {
            out.push(Ok(p.clone()));
        }
    }
    out
}

/// Another upscaler's outputs of the same LR inputs (the `_lr.png` files that
/// [`EvalSettings::out_dir`] receives): `DIR/{stem}.png` per HR image, at the HR size, and its
/// seconds per image from `DIR/times.tsv` (`stem<TAB>seconds` lines) when that file exists.
#[derive(Debug, Clone)]
pub struct Peer {
    name: String,
    dir: PathBuf,
    seconds: HashMap<String, f64>,
}

impl Peer {
    /// Opens the peer `name` whose outputs are in `dir`, reading `dir/times.tsv` if present.
    pub fn open(name: &str, dir: &Path) -> Result<Self> {
        let bad = |reason: String| InfditError::InvalidOption { option: "peer", reason: format!("{name}: {reason}") };
        if name.is_empty() {
            return Err(bad("the name is empty".into()));
        }
        if !dir.is_dir() {
            return Err(bad(format!("{} is not a folder", dir.display())));
        }
        let mut seconds = HashMap::new();
        let times = dir.join("times.tsv");
        if times.exists() {
            let text = std::fs::read_to_string(&times).map_err(|e| InfditError::io(&times, e))?;
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let parsed = line.split_once('\t').and_then(|(stem, v)| Some((stem, v.trim().parse::<f64>().ok()?)));
                let Some((stem, v)) = parsed.filter(|(_, v)| v.is_finite() && *v >= 0.0) else {
                    return Err(bad(format!(
                        "{}:{}: expected `stem<TAB>seconds`, got {line:?}",
                        times.display(),
                        i + 1
                    )));
                };
                seconds.insert(stem.to_string(), v);
            }
        }
        Ok(Self { name: name.to_string(), dir: dir.to_path_buf(), seconds })
    }

    /// The name shown in the comparison table.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This peer's output for the HR image with file stem `stem`, checked against the HR size.
    fn output(&self, stem: &str, hr: &RgbImage) -> Result<RgbImage> {
        let path = self.dir.join(format!("{stem}.png"));
        let bad =
            |reason: String| InfditError::InvalidOption { option: "peer", reason: format!("{}: {reason}", self.name) };
        let img = image::open(&path).map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?.to_rgb8();
        if img.dimensions() != hr.dimensions() {
            let (w, h) = img.dimensions();
            return Err(bad(format!("{} is {w}x{h}, the HR image {}x{}", path.display(), hr.width(), hr.height())));
        }
        Ok(img)
    }
}

/// The scores of one HR image: the model's and the bicubic baseline's rows (for their own tables),
/// and every method's scores (bicubic, the model, then the peers) for the comparison table.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageEvaluation {
    /// The model's row.
    pub model: EvalRow,
    /// The bicubic baseline's row.
    pub bicubic: EvalRow,
    /// Bicubic, the model and each peer, in that order.
    pub all: ImageScores,
}

/// The HR reference and its LR degradation, both 8-bit: the HR image (resized and centre-cropped
/// to `settings.hr_size`, then cropped to a multiple of an integer scale), and its antialiased
/// bicubic downscale by `settings.scale` (rounded down for other factors).
fn degrade(path: &Path, settings: &EvalSettings) -> Result<(RgbImage, RgbImage)> {
    let mut hr = load_rgb(path, MAX_HR_PIXELS)?;
    if let Some(n) = settings.hr_size {
        let (_, _, h, w) = hr.dims4()?;
        let (rh, rw) = resize_shorter_side(h, w, n);
        let r = resize_tensor(&hr, rh, rw, Bicubic::Antialias)?.clamp(-1f32, 1f32)?;
        let (top, left) = center_crop_offsets(rh, rw, n, n);
        hr = crop(&r, top, left, n, n)?;
    }
    let (_, _, h0, w0) = hr.dims4()?;
    let s = settings.scale;
    // An integer factor: the HR cropped to a multiple of it, so that the LR is exactly 1/s of it.
    // Any other factor: the LR is the HR's size over s, rounded down, and the model is asked for
    // the HR's exact size (as a width/height target asks).
    let (h, w) = if s.fract() == 0.0 {
        let k = s as usize;
        (h0 / k * k, w0 / k * k)
    } else {
        (h0, w0)
    };
    let (lh, lw) = ((h as f64 / s).floor() as usize, (w as f64 / s).floor() as usize);
    if lh == 0 || lw == 0 {
        return Err(InfditError::ImageSize {
            width: w0,
            height: h0,
            reason: format!("too small for a downscale by {s}"),
        });
    }
    let hr = crop(&hr, 0, 0, h, w)?;
    // Rounded to nearest throughout (an 8-bit HR file maps back to exactly its own samples), as the
    // bicubic baseline rounds.
    let hr8 = tensor_to_rgb8_with(&hr, Rounding::Nearest)?;
    let lr8 = tensor_to_rgb8_with(&resize_tensor(&hr, lh, lw, Bicubic::Antialias)?, Rounding::Nearest)?;
    Ok((hr8, lr8))
}

/// Evaluates the upscaler on one HR image (see the module docs). `opts` gives the sampler settings;
/// its target is replaced by the HR size. Every peer's output is read before the model runs, so a
/// missing one fails the image early.
pub fn evaluate_image(
    up: &Upscaler,
    path: &Path,
    settings: &EvalSettings,
    opts: &UpscaleOptions,
    peers: &[Peer],
) -> Result<ImageEvaluation> {
    settings.validate()?;
    let (hr8, lr8) = degrade(path, settings)?;
    let (w, h) = hr8.dimensions();
    let stem = path.file_stem().map_or_else(|| "out".into(), |s| s.to_string_lossy().into_owned());
    let peer_outputs = peers.iter().map(|p| p.output(&stem, &hr8)).collect::<Result<Vec<_>>>()?;

    // Back to [-1, 1] exactly as `load_rgb` maps 8-bit samples. Images stay in host memory (the
    // sampler moves block batches to the model's device).
    let lr = LoadedImage::from_rgb(rgb8_to_tensor(&lr8)?);
    let opts = UpscaleOptions { target: Target::Size { width: Some(w), height: Some(h) }, ..opts.clone() };
    let start = Instant::now();
    let sr = up.upscale(&lr, &opts, &mut |_| {}, None)?.rgb;
    let model_seconds = start.elapsed().as_secs_f64();
    let sr8 = tensor_to_rgb8_with(&sr, Rounding::Nearest)?;
    if sr8.dimensions() != hr8.dimensions() {
        return Err(InfditError::Internal(format!(
            "model output is {:?}, the HR image {:?}",
            sr8.dimensions(),
            hr8.dimensions()
        )));
    }
    let bic8 = bicubic_resize(&lr8, w as usize, h as usize);

    if let Some(dir) = &settings.out_dir {
        save_rgb8_atomic(&sr8, &dir.join(format!("{stem}.png")), &[path])?;
        save_rgb8_atomic(&lr8, &dir.join(format!("{stem}_lr.png")), &[path])?;
        save_rgb8_atomic(&bic8, &dir.join(format!("{stem}_bicubic.png")), &[path])?;
        save_rgb8_atomic(&hr8, &dir.join(format!("{stem}_hr.png")), &[path])?;
    }
    // Seams are measured at the model's own block borders (128 px for the released model). The
    // images were checked to be of one size, so a metrics error is a bug.
    let block = up.model().cfg.dit.block_px;
    let scored = |img: &RgbImage, seconds: Option<f64>| {
        score(img, &hr8, CROP_BORDER, block, seconds).map_err(|e| InfditError::Internal(format!("scoring: {e}")))
    };
    let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
    let bic_score = scored(&bic8, None)?;
    let model_score = scored(&sr8, Some(model_seconds))?;
    let (model, bicubic) = (model_score.eval_row(name.clone()), bic_score.eval_row(name.clone()));
    let mut scores = vec![bic_score, model_score];
    for (p, out) in peers.iter().zip(&peer_outputs) {
        scores.push(scored(out, p.seconds.get(&stem).copied())?);
    }
    Ok(ImageEvaluation { model, bicubic, all: ImageScores { name, scores } })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        assert!(EvalSettings::default().validate().is_ok());
        assert!(EvalSettings { scale: 2.5, ..Default::default() }.validate().is_ok());
        for s in [0.5, f64::NAN, f64::INFINITY] {
            let e = EvalSettings { scale: s, ..Default::default() }.validate().unwrap_err().to_string();
            assert!(e.starts_with("scale: "), "{e}");
        }
        let e = EvalSettings { hr_size: Some(0), ..Default::default() }.validate().unwrap_err().to_string();
        assert_eq!(e, "hr_size: must be at least 1");
    }

    #[test]
    fn peer_times_are_read_and_bad_lines_named() {
        let dir = std::env::temp_dir().join(format!("infdit-eval-peer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("times.tsv"), "a\t1.5\n\nb\t2\n").unwrap();
        let p = Peer::open("esrgan", &dir).unwrap();
        assert_eq!(p.name(), "esrgan");
        assert_eq!(p.seconds.get("a"), Some(&1.5));
        assert_eq!(p.seconds.get("b"), Some(&2.0));
        std::fs::write(dir.join("times.tsv"), "a\t1.5\nb\tslow\n").unwrap();
        let e = Peer::open("esrgan", &dir).unwrap_err().to_string();
        assert!(e.starts_with("peer: esrgan: ") && e.contains("times.tsv:2: expected"), "{e}");
        let e = Peer::open("x", &dir.join("missing")).unwrap_err().to_string();
        assert!(e.contains("is not a folder"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
