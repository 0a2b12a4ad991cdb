//! Image-quality metrics for `infdit eval`: PSNR-Y and SSIM-Y as BasicSR computes them, the Inf-DiT
//! seam score, and the bicubic baseline they are compared with.
//!
//! Everything here works on 8-bit [`RgbImage`]s (or on plain `f64` luma planes) and needs no candle.
//!
//! * [`rgb_to_y`], [`psnr_y`], [`ssim_y`] ([`quality`]) follow BasicSR 1.4.2's
//!   `calculate_psnr` / `calculate_ssim` with `test_y_channel=True`, including its float32 luma
//!   conversion, for RGB inputs (BasicSR assumes cv2's BGR; here the `rgb2ycbcr` coefficient order
//!   R 65.481, G 128.553, B 24.966 is used). The border crop is conventionally the scale (4).
//! * [`seam_score`] ([`seam`]) measures visible tile seams at the 128-px UniBA block borders,
//!   relative to the gradients at the same sub-pixel phase next to them (about 1.0 for seamless
//!   images).
//! * [`bicubic_baseline`] ([`baseline`]) is the x`scale` antialiased-bicubic upscale of the LR
//!   image, with the crate's torch-exact resampler.
//! * [`EvalRow`], [`evaluate`] and [`format_table`] make the per-image markdown table with a mean row.
//! * [`flat_deviation`] ([`flat`]): mean |output - reference| in luma over the reference's flat areas
//!   (low local gradient), where a faint periodic pattern of a model shows.
//! * [`score`] and [`format_comparison`] ([`compare`]): several methods side by side in one table (the
//!   baseline first), with the seconds per image; `infdit eval --peer` and `bench/quality.sh`.
//!
//! `tools/metrics_reference.py` is the Python reference (BasicSR's code, numpy only); the
//! integration test `tests/metrics.rs` checks the Rust values against it (PSNR within 1e-6 dB,
//! SSIM within 1e-7).
//!
//! LPIPS/FID: need backbone weights by path; not implemented yet.

pub mod baseline;
pub mod compare;
pub mod flat;
pub mod quality;
pub mod seam;

use std::fmt::Write as _;

use image::RgbImage;

pub use baseline::{bicubic_baseline, bicubic_resize};
pub use compare::{ImageScores, MethodScore, format_comparison, mean_of, score};
pub use flat::{FLAT_RADIUS, FLAT_THRESHOLD, FlatDeviation, flat_deviation, flat_deviation_with, flat_mask};
pub use quality::{SSIM_WINDOW, gaussian_kernel, psnr_plane, psnr_y, rgb_to_y, ssim_plane, ssim_y};
pub use seam::{SEAM_OFFSETS, seam_score, seam_score_plane};

/// Default block size of the seam score: Inf-DiT's UniBA blocks are 128 output pixels wide.
pub const DEFAULT_SEAM_BLOCK: usize = 128;

/// Errors of the metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricsError {
    /// The two images do not have the same size.
    #[error("image sizes differ: {a_width}x{a_height} vs {b_width}x{b_height}")]
    SizeMismatch {
        /// Width of the first image.
        a_width: u32,
        /// Height of the first image.
        a_height: u32,
        /// Width of the second image.
        b_width: u32,
        /// Height of the second image.
        b_height: u32,
    },
    /// After cropping `crop_border` pixels from each side, less than `min_side` pixels remain in
    /// one direction (1 for PSNR, the 11-px window for SSIM).
    #[error(
        "image of {width}x{height} is too small for a crop border of {crop_border} px: \
         {metric} needs at least {min_side}x{min_side} px after the crop"
    )]
    TooSmall {
        /// The metric (`"PSNR"` or `"SSIM"`).
        metric: &'static str,
        /// Image width.
        width: u32,
        /// Image height.
        height: u32,
        /// Pixels cropped on each side.
        crop_border: usize,
        /// The smallest side length the metric needs after the crop.
        min_side: usize,
    },
}

/// One line of the evaluation table.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRow {
    /// Image name (file name) as shown in the table.
    pub name: String,
    /// [`psnr_y`] in dB (infinite for identical images).
    pub psnr_y: f64,
    /// [`ssim_y`].
    pub ssim_y: f64,
    /// [`seam_score`] of the restored image, `None` when it has no interior block border.
    pub seam: Option<f64>,
}

/// Computes an [`EvalRow`]: PSNR-Y and SSIM-Y of `restored` against `reference` with `crop_border`
/// pixels cropped on each side, and the seam score of `restored` for `block`-px blocks.
pub fn evaluate(
    name: impl Into<String>,
    restored: &RgbImage,
    reference: &RgbImage,
    crop_border: usize,
    block: usize,
) -> Result<EvalRow, MetricsError> {
    Ok(EvalRow {
        name: name.into(),
        psnr_y: psnr_y(restored, reference, crop_border)?,
        ssim_y: ssim_y(restored, reference, crop_border)?,
        seam: seam_score(restored, block),
    })
}

fn fmt_value(v: f64, decimals: usize) -> String {
    if v.is_infinite() { if v > 0.0 { "inf".into() } else { "-inf".into() } } else { format!("{v:.decimals$}") }
}

/// The rows as a markdown table, then a mean row.
///
/// Columns: image, PSNR-Y (dB, 4 decimals, `inf` for identical images), SSIM-Y (4 decimals), seam
/// (3 decimals, `n/a` without an interior border). The mean row averages PSNR-Y and SSIM-Y over
/// all rows (one infinite PSNR makes the mean `inf`, as BasicSR's averaging does) and the seam
/// score over the rows that have one; its label says how many rows there are. With no rows the
/// mean row holds `n/a`. A `|` in a name is escaped.
pub fn format_table(rows: &[EvalRow]) -> String {
    let mut out = String::new();
    out.push_str("| image | PSNR-Y (dB) | SSIM-Y | seam |\n");
    out.push_str("| --- | ---: | ---: | ---: |\n");
    let seam_str = |s: Option<f64>| s.map_or_else(|| "n/a".to_string(), |v| fmt_value(v, 3));
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            r.name.replace('|', "\\|"),
            fmt_value(r.psnr_y, 4),
            fmt_value(r.ssim_y, 4),
            seam_str(r.seam)
        );
    }
    let n = rows.len();
    let label = format!("**mean ({n} image{})**", if n == 1 { "" } else { "s" });
    if n == 0 {
        let _ = writeln!(out, "| {label} | n/a | n/a | n/a |");
        return out;
    }
    let psnr = rows.iter().map(|r| r.psnr_y).sum::<f64>() / n as f64;
    let ssim = rows.iter().map(|r| r.ssim_y).sum::<f64>() / n as f64;
    let seams: Vec<f64> = rows.iter().filter_map(|r| r.seam).collect();
    let seam = (!seams.is_empty()).then(|| seams.iter().sum::<f64>() / seams.len() as f64);
    let _ = writeln!(out, "| {label} | {} | {} | {} |", fmt_value(psnr, 4), fmt_value(ssim, 4), seam_str(seam));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_with_mean_row() {
        let rows = vec![
            EvalRow { name: "a.png".into(), psnr_y: 30.0, ssim_y: 0.9, seam: Some(1.0) },
            EvalRow { name: "b|c.png".into(), psnr_y: 20.0, ssim_y: 0.7, seam: None },
        ];
        let t = format_table(&rows);
        let expect = "| image | PSNR-Y (dB) | SSIM-Y | seam |\n\
                      | --- | ---: | ---: | ---: |\n\
                      | a.png | 30.0000 | 0.9000 | 1.000 |\n\
                      | b\\|c.png | 20.0000 | 0.7000 | n/a |\n\
                      | **mean (2 images)** | 25.0000 | 0.8000 | 1.000 |\n";
        assert_eq!(t, expect);
    }

    #[test]
    fn table_edge_cases() {
        let t = format_table(&[]);
        assert!(t.ends_with("| **mean (0 images)** | n/a | n/a | n/a |\n"), "{t}");
        let rows = vec![EvalRow { name: "same".into(), psnr_y: f64::INFINITY, ssim_y: 1.0, seam: None }];
        let t = format_table(&rows);
        assert!(t.contains("| same | inf | 1.0000 | n/a |\n"), "{t}");
        assert!(t.ends_with("| **mean (1 image)** | inf | 1.0000 | n/a |\n"), "{t}");
    }

    #[test]
    fn evaluate_checks_sizes() {
        let a = RgbImage::from_pixel(40, 30, image::Rgb([10, 20, 30]));
        let b = RgbImage::from_pixel(30, 40, image::Rgb([10, 20, 30]));
        let e = evaluate("x", &a, &b, 4, 128).unwrap_err();
        assert_eq!(e.to_string(), "image sizes differ: 40x30 vs 30x40");
        let r = evaluate("x", &a, &a, 4, 16).unwrap();
        assert_eq!(r.psnr_y, f64::INFINITY);
        assert_eq!(r.ssim_y, 1.0);
        assert_eq!(r.seam, Some(1.0)); // flat image: 0 / 0 reads as "no seam"
    }
}
