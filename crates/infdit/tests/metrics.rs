//! The image-quality metrics against the Python reference (BasicSR 1.4.2's `calculate_psnr` /
//! `calculate_ssim` with `test_y_channel=True`, RGB order, and the seam score).
//!
//! The PNGs in `tests/data/metrics/` and the values below come from
//!
//! ```sh
//! python3 tools/metrics_reference.py               # numpy only; rewrites the PNGs (same bytes)
//! python3 tools/metrics_reference.py --check-cv2   # with opencv-python-headless: also cv2's SSIM
//! ```
//!
//! (numpy 2.4.6; the `--check-cv2` run with opencv-python-headless 5.0.0 agrees with the numpy
//! SSIM to 3e-14).
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure

use std::path::PathBuf;

use image::RgbImage;
use infdit::metrics::{DEFAULT_SEAM_BLOCK, bicubic_baseline, evaluate, format_table, psnr_y, seam_score, ssim_y};

const PSNR_TOL: f64 = 1e-6;
const SSIM_TOL: f64 = 1e-7;
const SEAM_TOL: f64 = 1e-9;

fn load(name: &str) -> RgbImage {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/metrics").join(name);
    image::open(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display())).into_rgb8()
}

/// (pair, crop_border, PSNR-Y of sr vs gt, SSIM-Y of sr vs gt), from tools/metrics_reference.py.
const PSNR_SSIM: [(&str, usize, f64, f64); 4] = [
    ("small", 0, 40.878693747817955, 0.9424810037713883),
    ("small", 4, 40.649513925615125, 0.9421731915406765),
    ("tile", 0, 39.37242479740085, 0.9755505372832235),
    ("tile", 4, 39.70804476602047, 0.9754593343345704),
];

/// (image, block, seam score), from tools/metrics_reference.py.
const SEAM: [(&str, usize, Option<f64>); 12] = [
    ("small_gt", 16, Some(1.0308001614703999)),
    ("small_sr", 16, Some(0.9422512805143872)),
    ("small_gt", 32, Some(1.1696582106722107)),
    ("small_sr", 32, Some(0.9966415640355082)),
    ("small_gt", 128, None),
    ("small_sr", 128, None),
    ("tile_gt", 16, Some(1.008354927241988)),
    ("tile_sr", 16, Some(1.1337221000214086)),
    ("tile_gt", 32, Some(1.0459326765800436)),
    ("tile_sr", 32, Some(1.293821524519176)),
    ("tile_gt", 128, Some(1.0917511107370046)),
    ("tile_sr", 128, Some(2.196621973595207)),
];

#[test]
fn test_images_have_the_expected_sizes() {
    assert_eq!(load("small_gt.png").dimensions(), (64, 48));
    assert_eq!(load("small_sr.png").dimensions(), (64, 48));
    assert_eq!(load("tile_gt.png").dimensions(), (160, 130));
    assert_eq!(load("tile_sr.png").dimensions(), (160, 130));
}

#[test]
fn psnr_ssim_match_basicsr_reference() {
    for (pair, crop, want_psnr, want_ssim) in PSNR_SSIM {
        let gt = load(&format!("{pair}_gt.png"));
        let sr = load(&format!("{pair}_sr.png"));
        let p = psnr_y(&sr, &gt, crop).unwrap();
        let s = ssim_y(&sr, &gt, crop).unwrap();
        println!(
            "{pair} crop={crop}: psnr_y {p:.12} (ref {want_psnr:.12}, diff {:.2e}), \
             ssim_y {s:.12} (ref {want_ssim:.12}, diff {:.2e})",
            (p - want_psnr).abs(),
            (s - want_ssim).abs()
        );
        assert!((p - want_psnr).abs() <= PSNR_TOL, "{pair} crop={crop}: PSNR {p} vs {want_psnr}");
        assert!((s - want_ssim).abs() <= SSIM_TOL, "{pair} crop={crop}: SSIM {s} vs {want_ssim}");
        // Symmetric in the two images.
        assert_eq!(psnr_y(&gt, &sr, crop).unwrap(), p);
        assert!((ssim_y(&gt, &sr, crop).unwrap() - s).abs() < 1e-15);
    }
}

#[test]
fn seam_scores_match_reference() {
    for (img, block, want) in SEAM {
        let got = seam_score(&load(&format!("{img}.png")), block);
        println!("{img} block={block}: seam {got:?} (ref {want:?})");
        match (got, want) {
            (None, None) => {}
            (Some(g), Some(w)) => assert!((g - w).abs() <= SEAM_TOL * w, "{img} block={block}: {g} vs {w}"),
            _ => panic!("{img} block={block}: {got:?} vs {want:?}"),
        }
    }
}

#[test]
fn identical_images_and_table() {
    let gt = load("tile_gt.png");
    let sr = load("tile_sr.png");
    assert_eq!(psnr_y(&gt, &gt, 4).unwrap(), f64::INFINITY);
    assert_eq!(ssim_y(&gt, &gt, 4).unwrap(), 1.0);

    let rows = vec![
        evaluate("tile_sr.png", &sr, &gt, 4, DEFAULT_SEAM_BLOCK).unwrap(),
        evaluate("tile_gt.png", &gt, &gt, 4, DEFAULT_SEAM_BLOCK).unwrap(),
    ];
    assert!((rows[0].psnr_y - PSNR_SSIM[3].2).abs() <= PSNR_TOL);
    assert!((rows[0].ssim_y - PSNR_SSIM[3].3).abs() <= SSIM_TOL);
    let t = format_table(&rows);
    println!("{t}");
    assert!(t.contains("| tile_sr.png | 39.7080 | 0.9755 | 2.197 |"), "{t}");
    assert!(t.contains("| tile_gt.png | inf | 1.0000 | 1.092 |"), "{t}");
    assert!(t.contains("| **mean (2 images)** | inf | 0.9877 | 1.644 |"), "{t}");

    let small = load("small_gt.png");
    let e = psnr_y(&small, &gt, 4).unwrap_err().to_string();
    assert_eq!(e, "image sizes differ: 64x48 vs 160x130");
}

#[test]
fn bicubic_baseline_of_downscaled_ground_truth() {
    // The 4x bicubic upscale of a 40x32 crop of a smooth image is a plausible restoration: sensible
    // PSNR, seam score about 1 (it has no block structure).
    let gt = load("tile_gt.png");
    let lr = RgbImage::from_fn(40, 32, |x, y| *gt.get_pixel(x * 4 + 1, y * 4 + 1));
    let up = bicubic_baseline(&lr, 4);
    assert_eq!(up.dimensions(), (160, 128));
    let gt_crop = RgbImage::from_fn(160, 128, |x, y| *gt.get_pixel(x, y));
    let p = psnr_y(&up, &gt_crop, 4).unwrap();
    println!("bicubic x4 of a 40x32 subsample: PSNR-Y {p}");
    assert!(p > 40.0, "{p}");
    let big = bicubic_baseline(&up, 2);
    let s = seam_score(&big, DEFAULT_SEAM_BLOCK).unwrap();
    println!("bicubic x8 (320x256): seam {s}");
    assert!((s - 1.0).abs() < 0.3, "{s}");
}
