//! Input preparation (spec §2, §7): from an image in [-1, 1] to what the network sees of it, the
//! LR, the upsampled LR (`concat_lr`) and the output block grid, with the official centre crop or
//! infdit's reflect padding for any input size.

use candle_core::{Device, Tensor};

use crate::error::{InfditError, Result};
use crate::imageio::resize::{Bicubic, center_crop_offsets, resize_tensor, resize_tensor_rows};
use crate::model::blocks::BlockGrid;
use crate::official::CROP_MULTIPLE;

/// The upscaling factor of one model pass, as the official script offers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassScale {
    /// The native 4x.
    X4,
    /// The official 2x mode: the LR is first halved so the model still sees HR/LR = 4.
    X2,
}

impl PassScale {
    /// The factor.
    pub fn factor(self) -> usize {
        match self {
            PassScale::X4 => 4,
            PassScale::X2 => 2,
        }
    }
}

/// The upsampled LR that the network gets as extra input channels (`concat_lr`), at output size:
/// either held whole, or described by its LR source and computed band by band, so that huge
/// outputs never hold it at once.
#[derive(Debug, Clone)]
pub enum ConcatLr {
    /// The image itself, (1, 3, H, W).
    Tensor(Tensor),
    /// `clamp(resize(src, height, width, kind), -1, 1)` of an LR-size `src` (1, 3, h, w). A band of
    /// rows ([`ConcatLr::rows`]) equals the same rows of the whole upsample bit for bit
    /// ([`crate::imageio::resize::resize_planar_rows`]).
    Upsample {
        /// The LR image (1, 3, h, w) in [-1, 1].
        src: Tensor,
        /// Output height.
        height: usize,
        /// Output width.
        width: usize,
        /// The bicubic kernel.
        kind: Bicubic,
    },
}

impl ConcatLr {
    /// (height, width) of the upsampled image.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            ConcatLr::Tensor(t) => {
                let (_, _, h, w) = t.dims4()?;
                Ok((h, w))
            }
            ConcatLr::Upsample { height, width, .. } => Ok((*height, *width)),
        }
    }

    /// Rows `y0..y1`, (1, 3, y1 - y0, W), on the device of the source.
    pub fn rows(&self, y0: usize, y1: usize) -> Result<Tensor> {
        match self {
            ConcatLr::Tensor(t) => Ok(t.narrow(2, y0, y1.saturating_sub(y0))?),
            ConcatLr::Upsample { src, height, width, kind } => {
                Ok(resize_tensor_rows(src, *height, *width, *kind, y0..y1)?.clamp(-1f32, 1f32)?)
            }
        }
    }

    /// The whole image (1, 3, H, W).
    pub fn full(&self) -> Result<Tensor> {
        match self {
            ConcatLr::Tensor(t) => Ok(t.clone()),
            ConcatLr::Upsample { src, height, width, kind } => {
                Ok(resize_tensor(src, *height, *width, *kind)?.clamp(-1f32, 1f32)?)
            }
        }
    }

    /// On `dev`: a held image is moved there, an upsample's source too (bands are then made there).
    pub fn to_device(&self, dev: &Device) -> Result<Self> {
        Ok(match self {
            ConcatLr::Tensor(t) => ConcatLr::Tensor(t.to_device(dev)?),
            ConcatLr::Upsample { src, height, width, kind } => {
                ConcatLr::Upsample { src: src.to_device(dev)?, height: *height, width: *width, kind: *kind }
            }
        })
    }

    /// Mixes what determines the image into a fingerprint: a held image by its values, an
    /// upsample by its source, size and kernel (cheap, and independent of the output size).
    pub(crate) fn fingerprint(&self, h: &mut crate::hash::Fnv) -> Result<()> {
        match self {
            ConcatLr::Tensor(t) => h.tensor(t)?,
            ConcatLr::Upsample { src, height, width, kind } => {
                h.bytes(format!("upsample {height}x{width} {kind:?}").as_bytes());
                h.tensor(src)?;
            }
        }
        Ok(())
    }
}

/// Network inputs prepared from an image.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The LR the network sees (CLIP and cross-attention), (1, 3, H/4, W/4), not clipped.
    pub lr: Tensor,
    /// The bicubic upsample at output size, clipped to [-1, 1], (1, 3, H, W); [`prepare_official`]
    /// and [`prepare_padded`] describe it ([`ConcatLr::Upsample`]) rather than compute it.
    pub concat_lr: ConcatLr,
    /// The output block grid.
    pub grid: BlockGrid,
}

/// The official preparation (`--round 32` center crop, antialiased bicubic): `input` is (1, 3, h, w)
/// in [-1, 1]. The output side must come out as whole blocks, which the official code requires too.
pub fn prepare_official(input: &Tensor, scale: PassScale, block_px: usize, kind: Bicubic) -> Result<Prepared> {
    let (_, _, h0, w0) = input.dims4()?;
    let (h, w) = (h0 / CROP_MULTIPLE * CROP_MULTIPLE, w0 / CROP_MULTIPLE * CROP_MULTIPLE);
    if h == 0 || w == 0 {
        return Err(InfditError::ImageSize {
            width: w0,
            height: h0,
            reason: format!("smaller than {CROP_MULTIPLE} px on a side, which the official crop needs"),
        });
    }
    let (top, left) = center_crop_offsets(h0, w0, h, w);
    let lr = input.narrow(2, top, h)?.narrow(3, left, w)?;
    let f = scale.factor();
    let (oh, ow) = (h * f, w * f);
    if oh % block_px != 0 || ow % block_px != 0 {
        return Err(InfditError::ImageSize {
            width: w,
            height: h,
            reason: format!(
                "with the official crop, the {ow}x{oh} output is not a multiple of the {block_px}-px block (the \
                 official 2x mode needs sides that are multiples of 64)"
            ),
        });
    }
    let concat_lr = ConcatLr::Upsample { src: lr.clone(), height: oh, width: ow, kind };
    let lr = match scale {
        PassScale::X4 => lr,
        PassScale::X2 => resize_tensor(&lr, h / 2, w / 2, kind)?,
    };
    let grid = BlockGrid::for_image(oh, ow, block_px)?;
    Ok(Prepared { lr, concat_lr, grid })
}

/// Where the requested output lies inside the model's output, after [`prepare_padded`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputCrop {
    /// First output row.
    pub top: usize,
    /// First output column.
    pub left: usize,
    /// Output height (the input height times the pass factor).
    pub height: usize,
    /// Output width.
    pub width: usize,
}

/// Preparation for any input size: the input (1, 3, h, w) in [-1, 1] is reflect-padded (split
/// evenly between the two sides) to the next multiple of the LR block (32 px for 4x, 64 px for the
/// 2x mode), prepared as the official pipeline does, and the returned crop cuts the exact
/// `factor * h x factor * w` result out of the model's output. No pixel of the input is lost,
/// unlike the official center crop ([`prepare_official`]).
///
/// Also returns the image CLIP should see: the unpadded input (4x) or its half-size version (2x),
/// so the global embedding is not skewed by the mirrored margins.
pub fn prepare_padded(
    input: &Tensor,
    scale: PassScale,
    block_px: usize,
    kind: Bicubic,
) -> Result<(Prepared, OutputCrop, Tensor)> {
    let (_, _, h0, w0) = input.dims4()?;
    if h0 == 0 || w0 == 0 {
        return Err(InfditError::ImageSize { width: w0, height: h0, reason: "the image is empty".into() });
    }
    let f = scale.factor();
    // LR multiple that makes the output whole blocks (32 for 4x, 64 for 2x with 128-px blocks).
    let unit = block_px / f;
    let (h, w) = (h0.div_ceil(unit) * unit, w0.div_ceil(unit) * unit);
    let (top, left) = ((h - h0) / 2, (w - w0) / 2);
    let padded = crate::imageio::pad_reflect(input, top, h - h0 - top, left, w - w0 - left)?;
    let concat_lr = ConcatLr::Upsample { src: padded.clone(), height: h * f, width: w * f, kind };
    let lr = match scale {
        PassScale::X4 => padded,
        PassScale::X2 => resize_tensor(&padded, h / 2, w / 2, kind)?,
    };
    let grid = BlockGrid::for_image(h * f, w * f, block_px)?;
    let clip_input = match scale {
        PassScale::X4 => input.clone(),
        PassScale::X2 => resize_tensor(input, (h0 / 2).max(1), (w0 / 2).max(1), kind)?,
    };
    Ok((
        Prepared { lr, concat_lr, grid },
        OutputCrop { top: top * f, left: left * f, height: h0 * f, width: w0 * f },
        clip_input,
    ))
}
