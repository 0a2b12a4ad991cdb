//! A job's options as JSON: the library's [`NamedOptions`] (the names of the CLI's flags and the Python
//! package's keywords, mapped the same way) and the output format.

use infdit::upscale::{NamedOptions, UpscaleOptions};
use infdit::{InfditError, Result};
use serde::{Deserialize, Serialize};

/// The `options` part of a job upload, as stored with the job. Unknown names are refused (the
/// server sets `max_pixels` itself and takes no noise file).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "serde_json::Map<String, serde_json::Value>")]
pub struct JobOptions {
    /// The upscale's options by name.
    #[serde(flatten)]
    pub named: NamedOptions,
    /// Output format: `png`, `jpeg`, `webp` or `tiff`; default the input's when it can be
    /// written, else PNG.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// `format`, then the library's names, whose unknown ones it refuses (serde's `flatten` would let
/// them through).
impl TryFrom<serde_json::Map<String, serde_json::Value>> for JobOptions {
    type Error = String;

    fn try_from(mut m: serde_json::Map<String, serde_json::Value>) -> std::result::Result<Self, String> {
        let format = match m.remove("format") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s),
            Some(v) => return Err(format!("invalid type for `format`: {v}, expected a string")),
        };
        let named = serde_json::from_value(serde_json::Value::Object(m)).map_err(|e| e.to_string())?;
        Ok(Self { named, format })
    }
}

fn bad(option: &'static str, reason: String) -> InfditError {
    InfditError::InvalidOption { option, reason }
}

impl JobOptions {
    /// The library's options for a job, with the server's pixel limit.
    pub fn to_upscale(&self, max_pixels: u64) -> Result<UpscaleOptions> {
        self.output_extension(None)?;
        self.named.apply(UpscaleOptions { max_pixels, ..UpscaleOptions::default() })
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
    use infdit::upscale::{AlphaMode, Target};

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
        let named = |n: NamedOptions| JobOptions { named: n, format: None };
        let o = named(NamedOptions { steps: Some(0), ..Default::default() });
        assert!(o.to_upscale(100).unwrap_err().to_string().starts_with("steps:"));
        let o = named(NamedOptions { scale: Some(2.0), width: Some(3), ..Default::default() });
        assert!(o.to_upscale(100).unwrap_err().to_string().starts_with("scale:"));
        let o = JobOptions { format: Some("gif".into()), ..Default::default() };
        assert!(o.to_upscale(100).unwrap_err().to_string().starts_with("format:"));
        assert_eq!(JobOptions::default().output_extension(Some("bmp")).unwrap(), "png");
    }
}
