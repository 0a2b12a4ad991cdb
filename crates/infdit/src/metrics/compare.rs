//! Several upscalers side by side on the same images: one markdown table with a mean row per method
//! (PSNR-Y, its difference to the baseline and on how many images it is ahead, SSIM-Y, seam score,
//! flat-area deviation, seconds per image) and then the per-image rows. `infdit eval` prints it for
//! bicubic, the model and any `--peer` outputs; `bench/quality.sh` uses that.

use std::fmt::Write as _;

use image::RgbImage;

use super::flat::{FlatDeviation, flat_deviation};
use super::{EvalRow, MetricsError, psnr_y, seam_score, ssim_y};

/// One method's scores on one image.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodScore {
    /// PSNR-Y in dB.
    pub psnr_y: f64,
    /// SSIM-Y.
    pub ssim_y: f64,
    /// Seam score, `None` without an interior block border.
    pub seam: Option<f64>,
    /// Flat-area deviation, `None` when the reference has no flat area.
    pub flat: Option<FlatDeviation>,
    /// Seconds the method took for this image, when known.
    pub seconds: Option<f64>,
}

impl MethodScore {
    /// The [`EvalRow`] of these scores (what [`super::evaluate`] computes), under `name`.
    pub fn eval_row(&self, name: impl Into<String>) -> EvalRow {
        EvalRow { name: name.into(), psnr_y: self.psnr_y, ssim_y: self.ssim_y, seam: self.seam }
    }
}

/// Scores `restored` against `reference`: PSNR-Y and SSIM-Y with `crop_border`, the seam score at
/// `block`-px borders and the flat-area deviation (default window and threshold); `seconds` is carried.
pub fn score(
    restored: &RgbImage,
    reference: &RgbImage,
    crop_border: usize,
    block: usize,
    seconds: Option<f64>,
) -> Result<MethodScore, MetricsError> {
    Ok(MethodScore {
        psnr_y: psnr_y(restored, reference, crop_border)?,
        ssim_y: ssim_y(restored, reference, crop_border)?,
        seam: seam_score(restored, block),
        flat: flat_deviation(restored, reference, crop_border)?,
        seconds,
    })
}

/// One image of a comparison: its name and one score per method (in the order of the method names).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageScores {
    /// Image name as shown in the table.
    pub name: String,
    /// One entry per method.
    pub scores: Vec<MethodScore>,
}

/// Median of the values present (the mean of the middle two for an even count); `None` when none is.
fn median_of(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let mut v: Vec<f64> = values.flatten().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// Mean of the values present; `None` when none is.
pub fn mean_of(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let (mut s, mut n) = (0f64, 0usize);
    for v in values.flatten() {
        s += v;
        n += 1;
    }
    (n > 0).then(|| s / n as f64)
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.decimals$}"))
}

fn signed(v: f64) -> String {
    if v.is_finite() { format!("{v:+.2}") } else { "n/a".into() }
}

/// The comparison table. `methods[0]` is the baseline the `vs` column is relative to (and names it).
///
/// Mean rows first (one per method): PSNR-Y and SSIM-Y averaged over all images; `vs` is the mean
/// PSNR-Y difference to the baseline in dB and, in brackets, on how many images the method's PSNR-Y is
/// higher than the baseline's; the seam score and the flat-area deviation are averaged over the images
/// that have them (`n/a` if none); the seconds are their **median** (one image slowed down by other work
/// on a shared machine does not move it). Then one row per image and method, with the difference
/// to the baseline on that image. A flat-area deviation is followed by the share of flat pixels in the
/// per-image rows. A `|` in a name is escaped.
///
/// # Panics
/// If an image has not one score per method.
pub fn format_comparison(methods: &[String], images: &[ImageScores]) -> String {
    for im in images {
        assert_eq!(
            im.scores.len(),
            methods.len(),
            "image {} has {} scores for {} methods",
            im.name,
            im.scores.len(),
            methods.len()
        );
    }
    let n = images.len();
    let mut out = String::new();
    let base_name = methods.first().map_or("baseline", String::as_str).replace('|', "\\|");
    let _ = writeln!(
        out,
        "| image | method | PSNR-Y (dB) | vs {base_name} (dB) | SSIM-Y | seam | flat-area dev. | s / image (median) |"
    );
    out.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    let label = format!("**mean ({n} image{})**", if n == 1 { "" } else { "s" });
    for (m, method) in methods.iter().enumerate() {
        if n == 0 {
            let _ = writeln!(out, "| {label} | {method} | n/a | n/a | n/a | n/a | n/a | n/a |");
            continue;
        }
        let psnr = images.iter().map(|im| im.scores[m].psnr_y).sum::<f64>() / n as f64;
        let ssim = images.iter().map(|im| im.scores[m].ssim_y).sum::<f64>() / n as f64;
        let vs = if m == 0 {
            String::new()
        } else {
            let base = images.iter().map(|im| im.scores[0].psnr_y).sum::<f64>() / n as f64;
            let ahead = images.iter().filter(|im| im.scores[m].psnr_y > im.scores[0].psnr_y).count();
            format!("{} ({ahead}/{n} ahead)", signed(psnr - base))
        };
        let seam = mean_of(images.iter().map(|im| im.scores[m].seam));
        // The mean flat-area deviation to four decimals: the goal compares it with bicubic's, which
        // it often matches to three.
        let flat = mean_of(images.iter().map(|im| im.scores[m].flat.map(|f| f.mean_abs)));
        let secs = median_of(images.iter().map(|im| im.scores[m].seconds));
        let _ = writeln!(
            out,
            "| {label} | {} | {psnr:.2} | {vs} | {ssim:.4} | {} | {} | {} |",
            method.replace('|', "\\|"),
            opt(seam, 3),
            opt(flat, 4),
            opt(secs, 1)
        );
    }
    for im in images {
        for (m, method) in methods.iter().enumerate() {
            let s = &im.scores[m];
            let vs = if m == 0 { String::new() } else { signed(s.psnr_y - im.scores[0].psnr_y) };
            let flat =
                s.flat.map_or_else(|| "n/a".into(), |f| format!("{:.3} ({:.0} %)", f.mean_abs, 100.0 * f.fraction));
            let _ = writeln!(
                out,
                "| {} | {} | {:.2} | {vs} | {:.4} | {} | {flat} | {} |",
                im.name.replace('|', "\\|"),
                method.replace('|', "\\|"),
                s.psnr_y,
                s.ssim_y,
                opt(s.seam, 3),
                opt(s.seconds, 1)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn ms(psnr_y: f64, ssim_y: f64, seam: Option<f64>, flat: Option<f64>, seconds: Option<f64>) -> MethodScore {
        MethodScore {
            psnr_y,
            ssim_y,
            seam,
            flat: flat.map(|mean_abs| FlatDeviation { mean_abs, pixels: 10, fraction: 0.25 }),
            seconds,
        }
    }

    #[test]
    fn table_with_means_and_rows() {
        let methods = vec!["bicubic".to_string(), "model".to_string()];
        let images = vec![
            ImageScores {
                name: "a.png".into(),
                scores: vec![
                    ms(30.0, 0.8, Some(1.0), Some(0.5), None),
                    ms(31.0, 0.85, Some(1.1), Some(0.7), Some(2.0)),
                ],
            },
            ImageScores {
                name: "b|c.png".into(),
                scores: vec![ms(20.0, 0.6, None, None, None), ms(19.5, 0.62, None, None, Some(4.0))],
            },
        ];
        let t = format_comparison(&methods, &images);
        let expect = "| image | method | PSNR-Y (dB) | vs bicubic (dB) | SSIM-Y | seam | flat-area dev. | s / image (median) |\n\
                      | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n\
                      | **mean (2 images)** | bicubic | 25.00 |  | 0.7000 | 1.000 | 0.5000 | n/a |\n\
                      | **mean (2 images)** | model | 25.25 | +0.25 (1/2 ahead) | 0.7350 | 1.100 | 0.7000 | 3.0 |\n\
                      | a.png | bicubic | 30.00 |  | 0.8000 | 1.000 | 0.500 (25 %) | n/a |\n\
                      | a.png | model | 31.00 | +1.00 | 0.8500 | 1.100 | 0.700 (25 %) | 2.0 |\n\
                      | b\\|c.png | bicubic | 20.00 |  | 0.6000 | n/a | n/a | n/a |\n\
                      | b\\|c.png | model | 19.50 | -0.50 | 0.6200 | n/a | n/a | 4.0 |\n";
        assert_eq!(t, expect);
        let empty = format_comparison(&methods, &[]);
        assert!(empty.ends_with("| **mean (0 images)** | model | n/a | n/a | n/a | n/a | n/a | n/a |\n"), "{empty}");
    }

    #[test]
    fn seconds_are_the_median() {
        let methods = vec!["bicubic".to_string(), "model".to_string()];
        let images: Vec<ImageScores> = [3.0, 400.0, 5.0]
            .iter()
            .enumerate()
            .map(|(i, &t)| ImageScores {
                name: format!("{i}.png"),
                scores: vec![ms(30.0, 0.8, None, None, None), ms(31.0, 0.8, None, None, Some(t))],
            })
            .collect();
        let t = format_comparison(&methods, &images);
        assert!(
            t.contains("| **mean (3 images)** | model | 31.00 | +1.00 (3/3 ahead) | 0.8000 | n/a | n/a | 5.0 |\n"),
            "{t}"
        );
        assert_eq!(median_of([Some(1.0), None, Some(2.0), Some(10.0), Some(4.0)].into_iter()), Some(3.0));
        assert_eq!(median_of([None].into_iter()), None);
    }

    #[test]
    fn score_of_real_images() {
        // A flat gray reference with a textured band; the restored image is one gray level brighter.
        let reference = RgbImage::from_fn(64, 64, |x, y| {
            let v = if (24..40).contains(&y) { ((x * 37 + y * 11) % 200) as u8 } else { 120 };
            Rgb([v, v, v])
        });
        let restored = RgbImage::from_fn(64, 64, |x, y| {
            let p = reference.get_pixel(x, y)[0];
            Rgb([p + 1, p + 1, p + 1])
        });
        let s = score(&restored, &reference, 4, 16, Some(1.5)).unwrap();
        // Every pixel is off by one gray level: luma differs by about 0.859, PSNR-Y = 20 log10(255 / 0.859).
        let d = (65.481 + 128.553 + 24.966) / 255.0;
        assert!((s.psnr_y - 20.0 * (255.0f64 / d).log10()).abs() < 1e-3, "{}", s.psnr_y);
        let flat = s.flat.unwrap();
        assert!((flat.mean_abs - d).abs() < 1e-4, "{}", flat.mean_abs);
        // The band's gradients reach rows 23..=40 (row 23 and 40 border it); with the 4-px window the flat
        // rows of the crop (original rows 4..=59) are 4..=18 and 45..=59: 30 rows of 56 columns.
        assert_eq!(flat.pixels, 30 * 56);
        assert_eq!(s.seconds, Some(1.5));
        assert!(s.seam.is_some());
        let e = score(&restored, &RgbImage::new(32, 64), 4, 16, None).unwrap_err();
        assert!(matches!(e, MetricsError::SizeMismatch { .. }), "{e}");
    }
}
