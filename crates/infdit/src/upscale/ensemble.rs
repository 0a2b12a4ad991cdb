//! The self-ensemble: each model pass also run on mirrored (and transposed) copies of its input,
//! each result mapped back, and the results averaged (`UpscaleOptions::ensemble`). The model's
//! blocks are generated in raster order from the top-left, so a mirrored input gives each block
//! other neighbours to condition on; averaging the runs evens out what depends on that direction.

use candle_core::Tensor;

/// A symmetry of the square applied to an image tensor `(N, C, H, W)`: an optional transpose
/// (rows become columns), then optional horizontal and vertical mirrors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Flip {
    transpose: bool,
    horizontal: bool,
    vertical: bool,
}

pub use crate::config::ENSEMBLE_SIZES;

const fn flip(transpose: bool, horizontal: bool, vertical: bool) -> Flip {
    Flip { transpose, horizontal, vertical }
}

/// The transforms in the order the ensembles take them, chosen by measurement (built-in model,
/// the 12 validation photos, 4x, mean PSNR-Y over bicubic; `docs/cli.md#ensemble`): the second
/// run transposed and mirrored both ways (the blocks then come in the opposite order, by
/// columns: +1.24 dB for the pair, against +1.12 with the horizontal mirror), the four runs
/// adding the vertical mirror and the transposed horizontal one (+1.33, against +1.25 for the
/// four mirrors), the eight all of them (+1.34).
const ALL: [Flip; 8] = [
    flip(false, false, false),
    flip(true, true, true),
    flip(false, false, true),
    flip(true, true, false),
    flip(false, true, false),
    flip(false, true, true),
    flip(true, false, false),
    flip(true, false, true),
];

impl Flip {
    /// The identity.
    pub(crate) const NONE: Flip = ALL[0];

    /// Every transform, the identity first.
    pub(crate) fn all() -> &'static [Flip] {
        &ALL
    }

    /// The transforms of an ensemble of `n` runs (`n` in [`ENSEMBLE_SIZES`]; the identity first).
    pub(crate) fn of_ensemble(n: usize) -> &'static [Flip] {
        &ALL[..n.clamp(1, ALL.len())]
    }

    /// Whether the image's sides are swapped.
    pub(crate) fn transposes(self) -> bool {
        self.transpose
    }

    /// A short name, for the folders of the runs' resume state.
    pub(crate) fn name(self) -> String {
        let mut s = String::from(if self.transpose { "transpose" } else { "flip" });
        s.push_str(match (self.horizontal, self.vertical) {
            (false, false) => "",
            (true, false) => "-h",
            (false, true) => "-v",
            (true, true) => "-hv",
        });
        s
    }

    /// `t` transformed.
    pub(crate) fn apply(self, t: &Tensor) -> candle_core::Result<Tensor> {
        let t = if self.transpose { t.transpose(2, 3)?.contiguous()? } else { t.clone() };
        self.mirror(&t)
    }

    /// The inverse: a result of the transformed input mapped back onto the input's geometry.
    pub(crate) fn invert(self, t: &Tensor) -> candle_core::Result<Tensor> {
        let t = self.mirror(t)?;
        if self.transpose { t.transpose(2, 3)?.contiguous() } else { Ok(t) }
    }

    fn mirror(self, t: &Tensor) -> candle_core::Result<Tensor> {
        let t = if self.horizontal { reverse(t, 3)? } else { t.clone() };
        if self.vertical { reverse(&t, 2) } else { Ok(t) }
    }
}

/// `t` with dimension `dim` reversed.
fn reverse(t: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
    let n = t.dim(dim)?;
    let idx: Vec<u32> = (0..n as u32).rev().collect();
    t.contiguous()?.index_select(&Tensor::new(idx.as_slice(), t.device())?, dim)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::Device;

    #[test]
    fn flips_transform_and_invert() {
        let t = Tensor::arange(0f32, 12., &Device::Cpu).unwrap().reshape((1, 1, 3, 4)).unwrap();
        let rows = |f: Flip| f.apply(&t).unwrap().squeeze(0).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        let f = |t, h, v| Flip { transpose: t, horizontal: h, vertical: v };
        assert_eq!(rows(f(false, true, false))[0], [3., 2., 1., 0.]);
        assert_eq!(rows(f(false, false, true))[0], [8., 9., 10., 11.]);
        assert_eq!(rows(f(false, true, true))[0], [11., 10., 9., 8.]);
        assert_eq!(rows(f(true, false, false)), [[0., 4., 8.], [1., 5., 9.], [2., 6., 10.], [3., 7., 11.]]);
        // Transpose, then mirror left-right.
        assert_eq!(rows(f(true, true, false))[0], [8., 4., 0.]);
        // The pair's second run: the anti-transpose (the last pixel first).
        assert_eq!(rows(Flip::of_ensemble(2)[1])[0], [11., 7., 3.]);
        let values = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for f in Flip::of_ensemble(8) {
            assert_eq!(values(&f.invert(&f.apply(&t).unwrap()).unwrap()), values(&t), "{}", f.name());
        }
        assert_eq!(Flip::of_ensemble(1), [Flip::NONE]);
        assert_eq!(Flip::of_ensemble(2)[1].name(), "transpose-hv");
        let names: Vec<String> = Flip::of_ensemble(8).iter().map(|f| f.name()).collect();
        assert_eq!(names.iter().collect::<std::collections::HashSet<_>>().len(), 8);
    }
}
