//! `infdit upscale`'s flags to the library's [`UpscaleOptions`], and the library's option names
//! back to flags in messages.

use infdit::imageio::resize::Bicubic;
use infdit::upscale::{AlphaMode, Crop, Evaluation, Target, UpscaleOptions};

use super::super::dtype;
use crate::args::{AlphaArg, CropArg, ModeArg, ResizeArg, UpscaleArgs};

impl From<&UpscaleArgs> for UpscaleOptions {
    fn from(a: &UpscaleArgs) -> Self {
        UpscaleOptions {
            target: match (a.scale, a.width, a.height) {
                (Some(f), _, _) => Target::Factor(f),
                (None, None, None) => Target::Factor(4.0),
                (None, width, height) => Target::Size { width, height },
            },
            seed: a.seed,
            noise: a.noise.clone(),
            steps: a.steps,
            sigma_max: a.sigma_max,
            crop: match a.crop {
                CropArg::Pad => Crop::Pad,
                CropArg::Official => Crop::Official,
            },
            resize: match a.resize {
                ResizeArg::Antialias => Bicubic::Antialias,
                ResizeArg::Classic => Bicubic::Classic,
            },
            alpha: match a.alpha {
                AlphaArg::Bicubic => AlphaMode::Bicubic,
                AlphaArg::Model => AlphaMode::Model,
                AlphaArg::Drop => AlphaMode::Drop { background: a.background },
            },
            evaluation: match a.mode {
                ModeArg::Blocks => Evaluation::Blocks { block_batch: a.block_batch },
                ModeArg::Whole => Evaluation::WholeImage,
            },
            kv_dtype: a.kv_dtype.map(dtype),
            kv_offload: a.kv_offload,
            max_memory: a.max_memory,
            max_pixels: a.max_pixels,
            checkpoint_dir: a.checkpoint_dir.clone(),
            state_dir: a.state_dir.clone(),
            strip_metadata: a.strip_metadata,
            jpeg_quality: a.jpeg_quality,
            rounding: a.rounding.into(),
            ensemble: a.ensemble,
        }
    }
}

/// The flag of an [`UpscaleOptions`] field, for messages.
pub fn flag(option: &str) -> String {
    match option {
        "target" => "--scale/--width/--height".into(),
        "evaluation" => "--mode".into(),
        "alpha" => "--alpha".into(),
        o => format!("--{}", o.replace('_', "-")),
    }
}

/// An error message with the library's option names turned into flags, and hints that name the
/// flag that helps.
pub fn message(e: &infdit::InfditError) -> String {
    use infdit::InfditError as E;
    match e {
        E::InvalidOption { option, reason } => format!("{}: {reason}", flag(option)),
        E::MissingClip { .. } => format!("{e}; give them with --clip PATH"),
        E::Output { reason, .. } if reason.starts_with("JPEG has no alpha") => {
            format!("{e} (--alpha drop --background RRGGBB)")
        }
        E::TooLarge(_) => format!("{e}; lower the output size, or raise --max-memory"),
        e => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_names_become_flags() {
        assert_eq!(flag("steps"), "--steps");
        assert_eq!(flag("sigma_max"), "--sigma-max");
        assert_eq!(flag("block_batch"), "--block-batch");
        assert_eq!(flag("target"), "--scale/--width/--height");
        let e = infdit::InfditError::InvalidOption { option: "kv_offload", reason: "x".into() };
        assert_eq!(message(&e), "--kv-offload: x");
    }
}
