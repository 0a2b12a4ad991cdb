//! Colour under transparency: [`fill_transparent`] (see there for why and how) and the planar
//! routine [`load_image`](super::load_image) calls directly.

use candle_core::{Device, Result, Tensor, bail};

/// Weight of a diagonal neighbour relative to an edge neighbour: the inverse of its distance
/// (`1/√2`), so the fill does not favour the diagonal directions.
const DIAGONAL_WEIGHT: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// Fill, in place, the colour of every pixel with `alpha == 0` from the nearest pixels with
/// `alpha > 0` (see [`fill_transparent`]).
///
/// * `planes` holds `channels` planes of `w * h` values each (planar, row-major), `alpha` one
///   plane of `w * h` values in `[0, 1]`.
/// * A pixel with `alpha > 0` is never changed, partly transparent ones included (their colour
///   is real, straight-alpha colour). It contributes to its transparent neighbours with weight
///   `alpha`, so a nearly invisible pixel barely colours the fill; filled pixels contribute
///   with weight 1.
/// * When no pixel is visible the colours are left as they are: there is nothing to take a
///   colour from, and nothing of it will be seen.
pub(crate) fn fill_planes(planes: &mut [f32], channels: usize, alpha: &[f32], w: usize, h: usize) {
    let n = w * h;
    debug_assert_eq!(planes.len(), channels * n);
    debug_assert_eq!(alpha.len(), n);
    // weight[i] > 0: pixel i has a colour to give (visible, or filled in an earlier ring).
    let mut weight: Vec<f32> = alpha.iter().map(|&a| if a > 0.0 { a } else { 0.0 }).collect();
    if weight.iter().all(|&x| x > 0.0) || weight.iter().all(|&x| x == 0.0) {
        return;
    }
    let neighbours = |i: usize| {
        let (y, x) = ((i / w) as isize, (i % w) as isize);
        [
            (-1, -1, DIAGONAL_WEIGHT),
            (-1, 0, 1.0),
            (-1, 1, DIAGONAL_WEIGHT),
            (0, -1, 1.0),
            (0, 1, 1.0),
            (1, -1, DIAGONAL_WEIGHT),
            (1, 0, 1.0),
            (1, 1, DIAGONAL_WEIGHT),
        ]
        .into_iter()
        .filter_map(move |(dy, dx, k)| {
            let (ny, nx) = (y + dy, x + dx);
            (ny >= 0 && nx >= 0 && (ny as usize) < h && (nx as usize) < w).then(|| (ny as usize * w + nx as usize, k))
        })
    };
    // The first ring: transparent pixels with a visible neighbour.
    let mut queued = vec![false; n];
    let mut ring: Vec<usize> = Vec::new();
    for i in 0..n {
        if weight[i] == 0.0 && neighbours(i).any(|(j, _)| weight[j] > 0.0) {
            queued[i] = true;
            ring.push(i);
        }
    }
    let mut colours = Vec::new();
    while !ring.is_empty() {
        // All colours of a ring come from the earlier rings only, so the fill does not depend
        // on the order in which the ring is visited.
        colours.clear();
        for &i in &ring {
            let mut acc = [0f64; 8];
            let mut total = 0f64;
            for (j, k) in neighbours(i) {
                if weight[j] > 0.0 {
                    let wk = (k * weight[j]) as f64;
                    total += wk;
                    for (c, a) in acc.iter_mut().enumerate().take(channels) {
                        *a += wk * planes[c * n + j] as f64;
                    }
                }
            }
            for a in acc.iter().take(channels) {
                colours.push((a / total) as f32);
            }
        }
        for (r, &i) in ring.iter().enumerate() {
            for c in 0..channels {
                planes[c * n + i] = colours[r * channels + c];
            }
            weight[i] = 1.0;
        }
        let mut next = Vec::new();
        for &i in &ring {
            for (j, _) in neighbours(i) {
                if weight[j] == 0.0 && !queued[j] {
                    queued[j] = true;
                    next.push(j);
                }
            }
        }
        ring = next;
    }
}

/// Replace the colour of the fully transparent pixels of an image by a diffusion fill from the
/// nearest visible pixels, so that upscaling does not bleed their arbitrary colour into the
/// visible edges.
///
/// Why: a fully transparent pixel (alpha = 0) has a colour no viewer shows, and files carry
/// anything there: black (most editors), white, or left-over garbage. The upscaler does not
/// know about alpha; near the edge of an opaque region it mixes the colours of both sides, and
/// black under the transparent side comes out as a dark fringe along every edge of a logo or
/// cut-out once the (separately upscaled) alpha makes the edge pixels partly visible.
///
/// How ("onion peeling", as texture bakers pad UV islands): rings of transparent pixels are
/// filled one at a time outward from the visible region, each pixel taking the weighted mean of
/// its already-filled 8 neighbours (edge neighbours weight 1, diagonal ones `1/√2`, the inverse
/// of their distance; a visible neighbour's weight is further multiplied by its alpha, so a
/// nearly invisible pixel barely colours the fill). Near an edge the fill is the colour of the
/// edge itself, so the upscaler sees a smooth continuation instead of a step to black; far away
/// it blends the nearest edges. It costs O(W·H) whatever the distances.
///
/// `rgb` is `(1, C, H, W)` (any value range; [`super::load_image`] passes `[-1, 1]`), `alpha`
/// is `(1, 1, H, W)` in `[0, 1]`; both are read as f32 on any device and the result is a new
/// f32 `(1, C, H, W)` tensor on the CPU. Pixels with `alpha > 0` (partly transparent ones
/// included: their straight-alpha colour is real) keep their exact values. An image without
/// any visible pixel is returned unchanged: there is nothing to take a colour from, and nothing
/// of it will be seen. [`super::load_image`] applies this to every image with an alpha channel.
///
/// Errors on mismatched or wrong shapes (at most 8 channels).
pub fn fill_transparent(rgb: &Tensor, alpha: &Tensor) -> Result<Tensor> {
    let (c, h, w) = match (rgb.dims(), alpha.dims()) {
        (&[1, c, h, w], &[1, 1, ah, aw]) if (ah, aw) == (h, w) && (1..=8).contains(&c) => (c, h, w),
        _ => bail!(
            "fill_transparent: expected rgb (1, C<=8, H, W) and alpha (1, 1, H, W), got {:?} and {:?}",
            rgb.dims(),
            alpha.dims()
        ),
    };
    let mut planes = rgb.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let a = alpha.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    fill_planes(&mut planes, c, &a, w, h);
    Tensor::from_vec(planes, (1, c, h, w), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transparent_region_next_to_red_becomes_red() {
        // 4 x 6 image in [-1, 1]: columns 0-1 opaque red (1, -1, -1), columns 2-5 transparent
        // black (-1, -1, -1), except one opaque blue pixel at the far right of row 3.
        let (h, w) = (4, 6);
        let n = h * w;
        let mut rgb = vec![-1f32; 3 * n];
        let mut alpha = vec![0f32; n];
        for y in 0..h {
            for x in 0..2 {
                rgb[y * w + x] = 1.0;
                alpha[y * w + x] = 1.0;
            }
        }
        let blue = 3 * w + 5;
        rgb[2 * n + blue] = 1.0;
        alpha[blue] = 1.0;
        let t = Tensor::from_vec(rgb.clone(), (1, 3, h, w), &Device::Cpu).unwrap();
        let a = Tensor::from_vec(alpha.clone(), (1, 1, h, w), &Device::Cpu).unwrap();
        let f = fill_transparent(&t, &a).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Opaque pixels unchanged, bit for bit.
        for i in 0..n {
            if alpha[i] > 0.0 {
                for c in 0..3 {
                    assert_eq!(f[c * n + i].to_bits(), rgb[c * n + i].to_bits(), "pixel {i}");
                }
            }
        }
        // Column 2 touches only red: exactly red.
        for y in 0..h {
            let i = y * w + 2;
            assert_eq!([f[i], f[n + i], f[2 * n + i]], [1.0, -1.0, -1.0], "row {y}");
        }
        // Row 0 of column 3 is two rings from the red and three from the blue: still red.
        assert_eq!([f[3], f[n + 3], f[2 * n + 3]], [1.0, -1.0, -1.0]);
        // Next to the blue pixel it is blue-ish (blue channel up, red down), never black.
        let i = 3 * w + 4;
        assert!(f[2 * n + i] > 0.0 && f[i] < 0.0, "{} {}", f[i], f[2 * n + i]);
        for i in 0..n {
            let s = f[i] + f[2 * n + i];
            assert!(s > -0.5, "pixel {i} is dark: r {} b {}", f[i], f[2 * n + i]);
        }
    }

    #[test]
    fn partial_alpha_weights_and_edge_cases() {
        // 1 x 3: a half-visible white pixel (alpha 0.25), transparent, opaque black.
        // The middle one gets (0.25 * 1 + 1 * (-1)) / 1.25 = -0.6.
        let mut p = vec![1.0f32, 0.3, -1.0];
        fill_planes(&mut p, 1, &[0.25, 0.0, 1.0], 3, 1);
        assert_eq!(p[0], 1.0);
        assert!((p[1] + 0.6).abs() < 1e-6, "{}", p[1]);
        assert_eq!(p[2], -1.0);
        // Nothing visible: unchanged. Everything visible: unchanged.
        let mut p = vec![0.5f32, -0.5];
        fill_planes(&mut p, 1, &[0.0, 0.0], 2, 1);
        assert_eq!(p, vec![0.5, -0.5]);
        fill_planes(&mut p, 1, &[1.0, 0.5], 2, 1);
        assert_eq!(p, vec![0.5, -0.5]);
        // A far corner of a large transparent area is reached (and takes the only colour).
        let (w, h) = (40, 30);
        let mut p = vec![0f32; w * h];
        let mut a = vec![0f32; w * h];
        p[0] = 0.75;
        a[0] = 1.0;
        fill_planes(&mut p, 1, &a, w, h);
        assert!(p.iter().all(|&v| v == 0.75));
        // Shape errors.
        let t = Tensor::zeros((1, 3, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let a = Tensor::zeros((1, 1, 2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(fill_transparent(&t, &a).is_err());
    }
}
