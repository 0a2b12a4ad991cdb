//! The options of one upscale by name, as the front ends that receive them as data get them (the
//! HTTP API's JSON, the Python package's keyword arguments): [`NamedOptions`], with one mapping onto
//! [`UpscaleOptions`] for all of them. The names are the CLI's flags with `_` for `-`.

use serde::{Deserialize, Serialize};

use super::options::{Crop, Evaluation, UpscaleOptions};
use super::plan::{AlphaMode, Target};
use crate::error::{InfditError, Result};
use crate::imageio::Rounding;

/// Options by name; each `None` keeps what the base options have ([`NamedOptions::apply`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedOptions {
    /// Scale factor (not with `width`/`height`); default 4.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// Output width (the height follows the aspect ratio unless given too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    /// Output height.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// Noise seed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Sampler steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// Starting noise level of the sampler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sigma_max: Option<f32>,
    /// The alpha plane: `bicubic`, `model` or `drop`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<String>,
    /// With alpha `drop`: the background colour, red, green, blue (default white).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub background: Option<[u8; 3]>,
    /// Inputs off the block grid: `pad` or `official`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crop: Option<String>,
    /// A fixed block batch of the block scheduler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_batch: Option<usize>,
    /// The whole image in one forward instead of the block scheduler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub whole_image: Option<bool>,
    /// Memory budget in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<u64>,
    /// 8-bit output rounding: `nearest` or `truncate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rounding: Option<String>,
    /// Write no ICC profile, EXIF or text into the output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strip_metadata: Option<bool>,
    /// JPEG output quality, 1 to 100.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jpeg_quality: Option<u8>,
    /// Self-ensemble: runs on mirrored and transposed inputs averaged, 1, 2, 4 or 8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ensemble: Option<usize>,
}

fn bad(option: &'static str, reason: String) -> InfditError {
    InfditError::InvalidOption { option, reason }
}

impl NamedOptions {
    /// The names, in the order of the fields.
    pub const NAMES: [&'static str; 16] = [
        "scale",
        "width",
        "height",
        "seed",
        "steps",
        "sigma_max",
        "alpha",
        "background",
        "crop",
        "block_batch",
        "whole_image",
        "max_memory",
        "rounding",
        "strip_metadata",
        "jpeg_quality",
        "ensemble",
    ];

    /// `base` with these options applied, validated. The target is always set: `scale`, or
    /// `width`/`height`, else x4.
    pub fn apply(&self, base: UpscaleOptions) -> Result<UpscaleOptions> {
        let mut o = base;
        o.target = match (self.scale, self.width.is_some() || self.height.is_some()) {
            (Some(_), true) => return Err(bad("scale", "give a scale or a width and/or height, not both".into())),
            // Checked by `validate` (finite, above 0) and by the plan (the output size limits).
            (Some(s), false) => Target::Factor(s),
            (None, true) => Target::Size { width: self.width, height: self.height },
            (None, false) => Target::Factor(4.0),
        };
        if let Some(s) = self.seed {
            o.seed = s;
        }
        if self.steps.is_some() {
            o.steps = self.steps;
        }
        if self.sigma_max.is_some() {
            o.sigma_max = self.sigma_max;
        }
        match self.alpha.as_deref() {
            None => {}
            Some("bicubic") => o.alpha = AlphaMode::Bicubic,
            Some("model") => o.alpha = AlphaMode::Model,
            Some("drop") => o.alpha = AlphaMode::Drop { background: [255, 255, 255] },
            Some(s) => return Err(bad("alpha", format!("'{s}': give 'bicubic', 'model' or 'drop'"))),
        }
        if let Some(bg) = self.background {
            match &mut o.alpha {
                AlphaMode::Drop { background } => *background = bg,
                _ => return Err(bad("background", "a background colour goes with alpha 'drop'".into())),
            }
        }
        match self.crop.as_deref() {
            None => {}
            Some("pad") => o.crop = Crop::Pad,
            Some("official") => o.crop = Crop::Official,
            Some(s) => return Err(bad("crop", format!("'{s}': give 'pad' or 'official'"))),
        }
        match (self.whole_image, self.block_batch) {
            (Some(true), Some(_)) => {
                return Err(bad("block_batch", "a block batch goes with the block scheduler, not whole_image".into()));
            }
            (Some(true), None) => o.evaluation = Evaluation::WholeImage,
            (Some(false), b) => o.evaluation = Evaluation::Blocks { block_batch: b },
            (None, Some(b)) => o.evaluation = Evaluation::Blocks { block_batch: Some(b) },
            (None, None) => {}
        }
        if self.max_memory.is_some() {
            o.max_memory = self.max_memory;
        }
        match self.rounding.as_deref() {
            None => {}
            Some("nearest") => o.rounding = Rounding::Nearest,
            Some("truncate") => o.rounding = Rounding::Truncate,
            Some(s) => return Err(bad("rounding", format!("'{s}': give 'nearest' or 'truncate'"))),
        }
        if let Some(s) = self.strip_metadata {
            o.strip_metadata = s;
        }
        if let Some(q) = self.jpeg_quality {
            o.jpeg_quality = q;
        }
        if let Some(n) = self.ensemble {
            o.ensemble = Some(n);
        }
        o.validate()?;
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn nothing_named_is_the_default() {
        assert_eq!(NamedOptions::default().apply(UpscaleOptions::default()).unwrap(), UpscaleOptions::default());
    }

    #[test]
    fn names_map_onto_the_options() {
        let n: NamedOptions = serde_json::from_str(
            r#"{"scale": 2, "seed": 7, "steps": 3, "alpha": "drop", "background": [1, 2, 3], "crop": "official",
                "block_batch": 2, "rounding": "truncate", "jpeg_quality": 80}"#,
        )
        .unwrap();
        let o = n.apply(UpscaleOptions::default()).unwrap();
        assert_eq!(o.target, Target::Factor(2.0));
        assert_eq!((o.seed, o.steps, o.jpeg_quality), (7, Some(3), 80));
        assert_eq!(o.alpha, AlphaMode::Drop { background: [1, 2, 3] });
        assert_eq!((o.crop, o.rounding), (Crop::Official, Rounding::Truncate));
        assert_eq!(o.evaluation, Evaluation::Blocks { block_batch: Some(2) });
        let w = NamedOptions { width: Some(100), whole_image: Some(true), ensemble: Some(4), ..Default::default() };
        let o = w.apply(UpscaleOptions::default()).unwrap();
        assert_eq!(o.target, Target::Size { width: Some(100), height: None });
        assert_eq!((o.evaluation, o.ensemble), (Evaluation::WholeImage, Some(4)));
        assert_eq!(NamedOptions::NAMES.len(), serde_json::to_value(&n).unwrap().as_object().unwrap().len() + 7);
    }

    /// No ensemble in the options: the model's own setting, which gives way to one run where an
    /// ensemble cannot go; options given win; a model setting out of range is an error.
    #[test]
    fn the_ensemble_defaults_to_the_models_setting() {
        use crate::config::{PassChain, SamplerDefaults};
        let model = |ensemble| SamplerDefaults {
            steps: 1,
            sigma_max: 20.0,
            x2_mode: false,
            chain: PassChain::Within,
            ensemble,
        };
        let plain = UpscaleOptions::default();
        assert_eq!(plain.ensemble_for(None).unwrap(), 1);
        assert_eq!(plain.ensemble_for(Some(model(None))).unwrap(), 1);
        assert_eq!(plain.ensemble_for(Some(model(Some(4)))).unwrap(), 4);
        let given = UpscaleOptions { ensemble: Some(1), ..Default::default() };
        assert_eq!(given.ensemble_for(Some(model(Some(4)))).unwrap(), 1);
        for single in [
            UpscaleOptions { crop: Crop::Official, ..Default::default() },
            UpscaleOptions { noise: Some("eps.safetensors".into()), ..Default::default() },
            UpscaleOptions { state_dir: Some("state".into()), ..Default::default() },
        ] {
            single.validate().unwrap();
            assert_eq!(single.ensemble_for(Some(model(Some(4)))).unwrap(), 1);
        }
        let e = plain.ensemble_for(Some(model(Some(3)))).unwrap_err().to_string();
        assert!(e.contains("ensemble 3 (give 1, 2, 4 or 8)"), "{e}");
        let e = SamplerDefaults::from_json_str(r#"{"sampler": {"steps": 1, "sigma_max": 20, "ensemble": 5}}"#);
        assert!(e.unwrap_err().to_string().contains("ensemble 5"));
        let ok = SamplerDefaults::from_json_str(r#"{"sampler": {"steps": 1, "sigma_max": 20, "ensemble": 2}}"#);
        assert_eq!(ok.unwrap().unwrap().ensemble, Some(2));
    }

    #[test]
    fn bad_values_name_their_option() {
        let e = |n: NamedOptions| n.apply(UpscaleOptions::default()).unwrap_err().to_string();
        assert!(e(NamedOptions { scale: Some(2.0), height: Some(3), ..Default::default() }).starts_with("scale:"));
        assert!(e(NamedOptions { scale: Some(f64::NAN), ..Default::default() }).contains("scale factor"));
        assert!(e(NamedOptions { alpha: Some("keep".into()), ..Default::default() }).starts_with("alpha:"));
        assert!(e(NamedOptions { background: Some([0; 3]), ..Default::default() }).starts_with("background:"));
        assert!(e(NamedOptions { crop: Some("centre".into()), ..Default::default() }).starts_with("crop:"));
        let both = NamedOptions { whole_image: Some(true), block_batch: Some(2), ..Default::default() };
        assert!(e(both).starts_with("block_batch:"));
        assert!(e(NamedOptions { rounding: Some("up".into()), ..Default::default() }).starts_with("rounding:"));
        assert!(e(NamedOptions { steps: Some(0), ..Default::default() }).starts_with("steps:"));
        assert!(
            e(NamedOptions { ensemble: Some(3), ..Default::default() }).starts_with("ensemble: 3: give 1, 2, 4 or 8")
        );
        let official = NamedOptions { ensemble: Some(2), crop: Some("official".into()), ..Default::default() };
        assert!(e(official).starts_with("ensemble: the official crop"));
        let unknown = serde_json::from_str::<NamedOptions>(r#"{"noise": "x"}"#).unwrap_err();
        assert!(unknown.to_string().contains("unknown field `noise`"), "{unknown}");
    }
}
