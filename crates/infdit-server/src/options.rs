//! A job's options as JSON, with the option names of the CLI and the Python package, mapped to the
//! library's [`UpscaleOptions`] the same way.

use infdit::imageio::Rounding;
use infdit::upscale::{AlphaMode, Crop, Evaluation, Target, UpscaleOptions};
use infdit::{InfditError, Result};
use serde::{Deserialize, Serialize};

/// The options of one job, as the API takes them (`options` part of the upload, JSON). Every
/// field is optional; absent is what `infdit upscale IN -o OUT` does. Paths (`noise`, the resume
/// folders) and `max_pixels` are the server's, not the client's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobOptions {
    /// Scale factor (4 native, 2, 8, 1.5, ...); not with `width`/`height`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// Output width in pixels (alone: the height keeps the aspect ratio).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    /// Output height in pixels (alone: the width keeps the aspect ratio).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// Noise seed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Sampler steps (1 to the library's maximum).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// Starting sigma.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sigma_max: Option<f32>,
    /// `bicubic`, `model` or `drop`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<String>,
    /// Background `[r, g, b]` for `alpha: "drop"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub background: Option<[u8; 3]>,
    /// `pad` or `official`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crop: Option<String>,
    /// Fixed block batch of the block scheduler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_batch: Option<usize>,
    /// The whole image in one forward.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub whole_image: Option<bool>,
    /// Memory budget in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<u64>,
    /// `nearest` or `truncate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rounding: Option<String>,
    /// Drop the input's ICC profile and EXIF.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strip_metadata: Option<bool>,
    /// JPEG quality, 1 to 100.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jpeg_quality: Option<u8>,
    /// Output format: `png`, `jpeg` (`jpg`), `webp` or `tiff` (`tif`); default: the input's when
    /// it can be written, else PNG.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

fn bad(option: &'static str, reason: String) -> InfditError {
    InfditError::InvalidOption { option, reason }
}

impl JobOptions {
    /// The library's options (validated), with the server's pixel limit.
    pub fn to_upscale(&self, max_pixels: u64) -> Result<UpscaleOptions> {
        let mut o = UpscaleOptions { max_pixels, ..UpscaleOptions::default() };
        o.target = match (self.scale, self.width.is_some() || self.height.is_some()) {
            (Some(_), true) => return Err(bad("scale", "give a scale or a width and/or height, not both".into())),
            (Some(s), false) => {
                if !(s.is_finite() && s > 0.0 && s <= 4096.0) {
                    return Err(bad("scale", format!("{s}: give a number above 0, at most 4096")));
                }
                Target::Factor(s)
            }
            (None, true) => Target::Size { width: self.width, height: self.height },
            (None, false) => Target::Factor(4.0),
        };
        if let Some(s) = self.seed {
            o.seed = s;
        }
        o.steps = self.steps;
        o.sigma_max = self.sigma_max;
        o.alpha = match self.alpha.as_deref() {
            None | Some("bicubic") => AlphaMode::Bicubic,
            Some("model") => AlphaMode::Model,
            Some("drop") => AlphaMode::Drop { background: self.background.unwrap_or([255, 255, 255]) },
            Some(s) => return Err(bad("alpha", format!("'{s}': give 'bicubic', 'model' or 'drop'"))),
        };
        if self.background.is_some() && !matches!(o.alpha, AlphaMode::Drop { .. }) {
            return Err(bad("background", "a background colour goes with alpha 'drop'".into()));
        }
        o.crop = match self.crop.as_deref() {
            None | Some("pad") => Crop::Pad,
            Some("official") => Crop::Official,
            Some(s) => return Err(bad("crop", format!("'{s}': give 'pad' or 'official'"))),
        };
        if self.whole_image.unwrap_or(false) {
            if self.block_batch.is_some() {
                return Err(bad("block_batch", "a block batch goes with the block scheduler, not whole_image".into()));
            }
            o.evaluation = Evaluation::WholeImage;
        } else {
            o.evaluation = Evaluation::Blocks { block_batch: self.block_batch };
        }
        o.max_memory = self.max_memory;
        o.rounding = match self.rounding.as_deref() {
            None | Some("nearest") => Rounding::Nearest,
            Some("truncate") => Rounding::Truncate,
            Some(s) => return Err(bad("rounding", format!("'{s}': give 'nearest' or 'truncate'"))),
        };
        if let Some(s) = self.strip_metadata {
            o.strip_metadata = s;
        }
        if let Some(q) = self.jpeg_quality {
            o.jpeg_quality = q;
        }
        self.output_extension(None)?;
        o.validate()?;
        Ok(o)
    }

    /// The output file's extension: the `format` option, else the input's format (`input`, an
    /// extension) when it can be written, else `png`.
    pub fn output_extension(&self, input: Option<&str>) -> Result<&'static str> {
        match self.format.as_deref().map(str::to_ascii_lowercase).as_deref() {
            Some("png") => Ok("png"),
            Some("jpeg" | "jpg") => Ok("jpg"),
            Some("webp") => Ok("webp"),
            Some("tiff" | "tif") => Ok("tif"),
            Some(f) => Err(bad("format", format!("'{f}': give 'png', 'jpeg', 'webp' or 'tiff'"))),
            None => Ok(match input {
                Some("jpg") => "jpg",
                Some("webp") => "webp",
                Some("tif") => "tif",
                _ => "png",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_same_names_map_as_in_the_cli() {
        let o: JobOptions = serde_json::from_str(r#"{"scale": 2, "seed": 7, "steps": 3, "alpha": "drop"}"#).unwrap();
        let u = o.to_upscale(1000).unwrap();
        assert_eq!(u.target, Target::Factor(2.0));
        assert_eq!((u.seed, u.steps, u.max_pixels), (7, Some(3), 1000));
        assert_eq!(u.alpha, AlphaMode::Drop { background: [255, 255, 255] });
        let d = JobOptions::default().to_upscale(64 << 20).unwrap();
        assert_eq!(d, UpscaleOptions::default());
    }

    #[test]
    fn bad_options_name_the_option() {
        let e = serde_json::from_str::<JobOptions>(r#"{"noise": "/etc/passwd"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `noise`"), "{e}");
        let o = JobOptions { steps: Some(0), ..Default::default() };
        assert!(o.to_upscale(100).unwrap_err().to_string().starts_with("steps:"));
        let o = JobOptions { scale: Some(2.0), width: Some(3), ..Default::default() };
        assert!(o.to_upscale(100).unwrap_err().to_string().starts_with("scale:"));
        let o = JobOptions { format: Some("gif".into()), ..Default::default() };
        assert!(o.to_upscale(100).unwrap_err().to_string().starts_with("format:"));
        assert_eq!(JobOptions::default().output_extension(Some("bmp")).unwrap(), "png");
    }
}
