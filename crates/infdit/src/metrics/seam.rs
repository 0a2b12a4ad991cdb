//! The seam score: how much stronger the luma steps are across the UniBA block borders than
//! next to them.
//!
//! Inf-DiT generates the output in `block x block` (128-px) blocks; a visible seam is a step in
//! the image exactly at a block border. The score compares the gradient across the borders with the
//! gradient a few pixels beside them, at offsets that are multiples of 4, i.e. at the same
//! sub-pixel phase of a x4 output relative to the LR pixel grid (a border at `x = 128` lies between
//! the LR columns 31 and 32, so does `x = 124` between 30 and 31). Bicubic upscales and ground-truth
//! images therefore score about 1.0, a seam raises the score.

use std::collections::BTreeSet;

use image::RgbImage;

use super::quality::rgb_to_y;

/// Offsets (in pixels, on both sides of each border) of the reference gradients.
pub const SEAM_OFFSETS: [usize; 3] = [4, 8, 12];

/// Border positions `k * block` (`k >= 1`, `< n`) along an axis of length `n`, and the reference
/// positions `b ± d` (`d` in [`SEAM_OFFSETS`]) that lie in `[1, n)` and are not borders, each once.
fn positions(n: usize, block: usize) -> (Vec<usize>, Vec<usize>) {
    let borders: Vec<usize> = (1..).map(|k| k * block).take_while(|&b| b < n).collect();
    let mut refs = BTreeSet::new();
    for &b in &borders {
        for d in SEAM_OFFSETS {
            for p in [b.checked_sub(d), Some(b + d)].into_iter().flatten() {
                if p >= 1 && p < n && !p.is_multiple_of(block) {
                    refs.insert(p);
                }
            }
        }
    }
    (borders, refs.into_iter().collect())
}

/// The seam score of an RGB image for `block`-px blocks (Inf-DiT: 128), on BasicSR's luma channel
/// ([`rgb_to_y`], float64, `[16, 235]` scale). See [`seam_score_plane`] for the definition.
pub fn seam_score(img: &RgbImage, block: usize) -> Option<f64> {
    let y = rgb_to_y(img);
    seam_score_plane(&y, img.width() as usize, img.height() as usize, block)
}

/// The seam score of a row-major `h x w` luma plane for `block`-px blocks.
///
/// Definition (`Y` the plane, all means pooled over every sample):
/// * column gradient at `x` (for all rows `y`): `|Y[y, x] - Y[y, x-1]|`; row gradient at `y` (for
///   all columns `x`): `|Y[y, x] - Y[y-1, x]|`;
/// * border columns: `x = k * block`, `k >= 1`, `x < w`; border rows likewise with `h`;
/// * reference columns: `x = b ± 4, ± 8, ± 12` for every border column `b`, kept when
///   `1 <= x < w` and `x` is not itself a border; duplicates are counted once (they occur only
///   for `block <= 24`); reference rows likewise;
/// * `seam = mean(column gradients at border columns ∪ row gradients at border rows)
///         / mean(column gradients at reference columns ∪ row gradients at reference rows)`.
///
/// `None` when there is no interior border (`w` and `h` both `<= block`), no reference position,
/// or `block == 0`. When the reference mean is 0 the score is 1.0 if the border mean is 0 too (a
/// flat image has no seam) and infinite otherwise.
///
/// # Panics
/// If `y.len() != w * h`.
pub fn seam_score_plane(y: &[f64], w: usize, h: usize, block: usize) -> Option<f64> {
    assert_eq!(y.len(), w * h, "seam_score_plane: {} values for {w}x{h}", y.len());
    if block == 0 {
        return None;
    }
    let (border_cols, ref_cols) = positions(w, block);
    let (border_rows, ref_rows) = positions(h, block);
    if border_cols.is_empty() && border_rows.is_empty() {
        return None;
    }
    if ref_cols.is_empty() && ref_rows.is_empty() {
        return None;
    }
    // Sum and count of the gradients across the given columns and rows.
    let grads = |cols: &[usize], rows: &[usize]| -> (f64, usize) {
        let mut sum = 0.0;
        for &x in cols {
            sum += (0..h).map(|r| (y[r * w + x] - y[r * w + x - 1]).abs()).sum::<f64>();
        }
        for &r in rows {
            let (cur, prev) = (&y[r * w..(r + 1) * w], &y[(r - 1) * w..r * w]);
            sum += cur.iter().zip(prev).map(|(a, b)| (a - b).abs()).sum::<f64>();
        }
        (sum, cols.len() * h + rows.len() * w)
    };
    let (num, n_num) = grads(&border_cols, &border_rows);
    let (den, n_den) = grads(&ref_cols, &ref_rows);
    let (num, den) = (num / n_num as f64, den / n_den as f64);
    if den == 0.0 {
        return Some(if num == 0.0 { 1.0 } else { f64::INFINITY });
    }
    Some(num / den)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn positions_sets() {
        let (b, r) = positions(160, 128);
        assert_eq!(b, vec![128]);
        assert_eq!(r, vec![116, 120, 124, 132, 136, 140]);
        let (b, r) = positions(130, 128);
        assert_eq!(b, vec![128]);
        assert_eq!(r, vec![116, 120, 124]);
        assert_eq!(positions(128, 128).0, Vec::<usize>::new());
        // block 16: 16 + 12 = 28 = 32 - 4 counted once, 16 + 16 is a border; 4 = 16 - 12 kept.
        let (b, r) = positions(40, 16);
        assert_eq!(b, vec![16, 32]);
        assert_eq!(r, vec![4, 8, 12, 20, 24, 28, 36]);
    }

    fn gray(w: u32, h: u32, f: impl Fn(u32, u32) -> u8) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let v = f(x, y);
            Rgb([v, v, v])
        })
    }

    #[test]
    fn smooth_gradient_scores_one() {
        // A diagonal ramp whose slope does not depend on the position: exactly 1 up to rounding.
        let img = gray(300, 260, |x, y| ((x + y) / 3 % 220) as u8 + 16);
        let s = seam_score(&img, 128).unwrap();
        println!("diagonal ramp: seam {s}");
        assert!((s - 1.0).abs() < 0.05, "{s}");
        // A smooth colour gradient, rounded to u8. The slopes are chosen so that the rounding
        // phase is spread evenly over the rows (columns), otherwise the quantisation steps alias
        // with the 4-px reference spacing.
        let img = RgbImage::from_fn(256, 200, |x, y| {
            let (x, y) = (x as f64, y as f64);
            let r = 30.0 + 0.53 * x + 0.29 * y;
            let g = 50.0 + 0.21 * x + 0.47 * y;
            let b = 20.0 + 0.33 * x + 0.13 * y;
            Rgb([r.round() as u8, g.round() as u8, b.round() as u8])
        });
        let s = seam_score(&img, 128).unwrap();
        println!("colour gradient: seam {s}");
        assert!((s - 1.0).abs() < 0.1, "{s}");
    }

    #[test]
    fn step_at_border_scores_high() {
        let base = |x: u32, y: u32| (40 + (x + 2 * y) / 4) as u8;
        let img = gray(256, 100, |x, y| base(x, y) + if x >= 128 { 20 } else { 0 });
        let s = seam_score(&img, 128).unwrap();
        assert!(s > 1.5, "{s}");
        let clean = gray(256, 100, base);
        let s0 = seam_score(&clean, 128).unwrap();
        println!("step of 20 at x = 128: seam {s}, without the step {s0}");
        assert!(s0 < 1.2 && s < 50.0 * s0, "{s0} {s}");
    }

    #[test]
    fn no_border_and_flat() {
        assert_eq!(seam_score(&gray(128, 128, |_, _| 7), 128), None);
        assert_eq!(seam_score(&gray(64, 48, |x, _| x as u8), 128), None);
        assert_eq!(seam_score(&gray(64, 48, |x, _| x as u8), 0), None);
        assert_eq!(seam_score(&gray(200, 150, |_, _| 77), 128), Some(1.0));
        // Flat except for the border step: infinite.
        let s = seam_score(&gray(200, 100, |x, _| if x >= 128 { 90 } else { 80 }), 128);
        assert_eq!(s, Some(f64::INFINITY));
        // Only a horizontal border (w <= block < h).
        let s = seam_score(&gray(100, 200, |_, y| if y >= 128 { 90 } else { 80 }), 128);
        assert_eq!(s, Some(f64::INFINITY));
    }
}
