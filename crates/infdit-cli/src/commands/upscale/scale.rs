//! Output size and model passes: `--scale S` or `--width/--height` to a list of x4/x2 passes and
//! the final size, plus the block geometry of each pass (for the dry run and the progress bars).

use anyhow::{Result, bail};

use infdit::pipeline::PassScale;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// `--scale S`: round(W*S) x round(H*S).
    Factor(f64),
    /// `--width` and/or `--height`; one alone keeps the aspect ratio.
    Size {
        /// Output width.
        width: Option<u32>,
        /// Output height.
        height: Option<u32>,
    },
}

/// Largest output side accepted (the memory plan refuses far smaller images anyway).
const MAX_SIDE: f64 = (1u64 << 24) as f64;

impl Target {
    /// The `{scale}` of the name template: `x4`, `x1.5`, `w1024`, `h768` or `1024x768`.
    pub fn token(&self) -> String {
        match *self {
            Target::Factor(s) => format!("x{s}"),
            Target::Size { width: Some(w), height: Some(h) } => format!("{w}x{h}"),
            Target::Size { width: Some(w), height: None } => format!("w{w}"),
            Target::Size { width: None, height: Some(h) } => format!("h{h}"),
            Target::Size { width: None, height: None } => "x4".into(),
        }
    }

    /// The output size (width, height) of a `w x h` input, at least 1 x 1.
    pub fn output_size(&self, w: usize, h: usize) -> Result<(usize, usize)> {
        let (w, h) = (w as f64, h as f64);
        let (tw, th) = match *self {
            Target::Factor(s) => (w * s, h * s),
            Target::Size { width: Some(tw), height: Some(th) } => (tw as f64, th as f64),
            Target::Size { width: Some(tw), height: None } => (tw as f64, h * tw as f64 / w),
            Target::Size { width: None, height: Some(th) } => (w * th as f64 / h, th as f64),
            Target::Size { width: None, height: None } => (w * 4.0, h * 4.0),
        };
        let (tw, th) = (tw.round().max(1.0), th.round().max(1.0));
        if tw > MAX_SIDE || th > MAX_SIDE {
            bail!("the output would be {tw} x {th} pixels, above the largest supported side of {MAX_SIDE}");
        }
        Ok((tw as usize, th as usize))
    }
}

/// The passes that take a `w x h` image to at least `tw x th`: the fewest passes (at least one),
/// all x4 except one x2 (run first, where it is cheapest) when that still reaches the target. So
/// 4 gives [x4], 2 [x2], 8 [x2, x4], 16 [x4, x4], 3 [x4], 1.5 [x2], 6 [x2, x4].
pub fn plan_passes(w: usize, h: usize, tw: usize, th: usize) -> Vec<PassScale> {
    let reaches = |f: u128| f * w as u128 >= tw as u128 && f * h as u128 >= th as u128;
    let mut k = 1;
    while !reaches(4u128.pow(k)) {
        k += 1;
    }
    let mut passes = vec![PassScale::X4; k as usize];
    if reaches(2 * 4u128.pow(k - 1)) {
        passes[0] = PassScale::X2;
    }
    passes
}

/// One model pass on an image of any size, as [`infdit::pipeline::prepare_padded`] (or, with
/// `official`, [`infdit::pipeline::prepare_official`]) lays it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassGeometry {
    /// The pass.
    pub scale: PassScale,
    /// Input size (width, height).
    pub input: (usize, usize),
    /// Block rows and columns of the model output.
    pub grid: (usize, usize),
    /// Output size after the crop (width, height).
    pub output: (usize, usize),
}

/// The geometry of each pass for a `w x h` input.
pub fn geometry(w: usize, h: usize, passes: &[PassScale], block_px: usize, official: bool) -> Vec<PassGeometry> {
    let (mut w, mut h) = (w, h);
    let mut out = Vec::with_capacity(passes.len());
    for &scale in passes {
        let f = scale.factor();
        let (gw, gh, ow, oh) = if official {
            let (cw, ch) = (w / 32 * 32, h / 32 * 32);
            (cw * f, ch * f, cw * f, ch * f)
        } else {
            let unit = block_px / f;
            (w.div_ceil(unit) * unit * f, h.div_ceil(unit) * unit * f, w * f, h * f)
        };
        out.push(PassGeometry { scale, input: (w, h), grid: (gh / block_px, gw / block_px), output: (ow, oh) });
        (w, h) = (ow, oh);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use PassScale::{X2, X4};

    #[test]
    fn passes_for_common_factors() {
        let plan = |s: f64| {
            let (tw, th) = Target::Factor(s).output_size(100, 60).unwrap();
            (plan_passes(100, 60, tw, th), (tw, th))
        };
        assert_eq!(plan(4.0), (vec![X4], (400, 240)));
        assert_eq!(plan(2.0), (vec![X2], (200, 120)));
        assert_eq!(plan(8.0), (vec![X2, X4], (800, 480)));
        assert_eq!(plan(16.0), (vec![X4, X4], (1600, 960)));
        assert_eq!(plan(3.0), (vec![X4], (300, 180)));
        assert_eq!(plan(1.5), (vec![X2], (150, 90)));
        assert_eq!(plan(6.0), (vec![X2, X4], (600, 360)));
        assert_eq!(plan(0.5), (vec![X2], (50, 30)));
        assert_eq!(plan(32.0), (vec![X2, X4, X4], (3200, 1920)));
    }

    #[test]
    fn sizes_round_and_keep_the_aspect_ratio() {
        assert_eq!(Target::Factor(1.5).output_size(3, 5).unwrap(), (5, 8)); // 4.5 and 7.5 round up
        let w = Target::Size { width: Some(1000), height: None };
        assert_eq!(w.output_size(300, 200).unwrap(), (1000, 667));
        let h = Target::Size { width: None, height: Some(50) };
        assert_eq!(h.output_size(300, 200).unwrap(), (75, 50));
        let both = Target::Size { width: Some(64), height: Some(10) };
        assert_eq!(both.output_size(8, 8).unwrap(), (64, 10));
        // 64/8 = 8 wide: one x2 and one x4 reach it.
        assert_eq!(plan_passes(8, 8, 64, 10), vec![X2, X4]);
        assert!(Target::Factor(4096.0).output_size(1 << 20, 1).is_err());
        assert_eq!(w.token(), "w1000");
        assert_eq!(h.token(), "h50");
        assert_eq!(both.token(), "64x10");
        assert_eq!(Target::Factor(4.0).token(), "x4");
        assert_eq!(Target::Factor(1.5).token(), "x1.5");
    }

    #[test]
    fn pass_geometry_follows_the_padded_preparation() {
        // 37x45 input, x4: padded to 64x64 LR (2x2 blocks), cropped to 148x180.
        let g = geometry(37, 45, &[X4], 128, false);
        assert_eq!(g, vec![PassGeometry { scale: X4, input: (37, 45), grid: (2, 2), output: (148, 180) }]);
        // 8x8 then x2 (unit 64) then x4 (unit 32).
        let g = geometry(8, 8, &[X2, X4], 128, false);
        assert_eq!(g[0].grid, (1, 1));
        assert_eq!(g[0].output, (16, 16));
        assert_eq!(g[1], PassGeometry { scale: X4, input: (16, 16), grid: (1, 1), output: (64, 64) });
        // Official crop: 37x45 -> 32x32 -> 128x128.
        assert_eq!(geometry(37, 45, &[X4], 128, true)[0].output, (128, 128));
    }
}
