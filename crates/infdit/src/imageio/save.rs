//! [`save_image_atomic`]: write the upscaled result in 8 or 16 bits, with alpha and the input's
//! metadata where the output format allows.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use candle_core::{DType, Tensor};
use image::metadata::Orientation;
use image::{ExtendedColorType, ImageEncoder, ImageFormat};

use super::load::LoadedImage;
use super::{ImageIoError, Rounding, output_format, tensor_to_rgb8_with, write_atomic};

/// How [`save_image_atomic`] writes an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveOptions {
    /// Bits per sample, 8 or 16. 16 is written by PNG and TIFF only; JPEG and WebP refuse it
    /// (they store 8-bit samples).
    pub bit_depth: u8,
    /// JPEG quality, 1 to 100 (ignored by the other formats, which are lossless). The default
    /// 95 is the quality [`super::save_rgb8_atomic`] has always used: visually lossless for
    /// photos at about a third of the size of quality 100.
    pub jpeg_quality: u8,
    /// ICC profile to embed (normally [`LoadedImage::icc`]: the pixels are still in the
    /// input's colour space). Written by all four formats (PNG `iCCP`, JPEG `APP2`, WebP `ICCP`,
    /// TIFF tag 34675), when it fits the pixels written: a profile whose data colour space is
    /// not the written one is left out rather than written wrong (a `GRAY` profile with RGB
    /// output, which happens for gray to WebP and gray + alpha to TIFF, both stored as RGB; an
    /// `RGB ` profile with gray output; a `CMYK` profile of a CMYK JPEG, whose pixels the
    /// decoder converted to RGB). Pass [`LoadedImage::grayscale`] with it.
    pub icc: Option<Vec<u8>>,
    /// EXIF block to embed (normally [`LoadedImage::exif`]), TIFF-structured (`II*\0`/`MM\0*`;
    /// a leading `Exif\0\0` is accepted and removed). Written by PNG (`eXIf`), JPEG (`APP1`, at
    /// most 65,527 bytes) and WebP (`EXIF`); **not by TIFF**: `image` 0.25's TIFF encoder cannot
    /// write an EXIF IFD, so it is dropped there ([`writes_exif`] tells). The orientation tag is
    /// set to 1 (upright) in what is written, since the pixels are always written upright. The
    /// other tags are copied as they are, so size tags such as `PixelXDimension` keep the
    /// input's values.
    pub exif: Option<Vec<u8>>,
    /// Write neither ICC nor EXIF, whatever `icc` and `exif` hold.
    pub strip_metadata: bool,
    /// How 8-bit samples are made (16-bit ones are always rounded). Default: to nearest.
    pub rounding: Rounding,
}

impl Default for SaveOptions {
    /// 8 bits rounded to nearest, JPEG quality 95, no metadata.
    fn default() -> Self {
        Self {
            bit_depth: 8,
            jpeg_quality: 95,
            icc: None,
            exif: None,
            strip_metadata: false,
            rounding: Rounding::Nearest,
        }
    }
}

impl SaveOptions {
    /// Options that write a result the way `input` was: its bit depth, ICC profile and EXIF
    /// block, JPEG quality 95.
    pub fn like_input(input: &LoadedImage) -> Self {
        Self { bit_depth: input.bit_depth, icc: input.icc.clone(), exif: input.exif.clone(), ..Self::default() }
    }
}

/// Whether [`save_image_atomic`] embeds an ICC profile in `format` (PNG, JPEG, WebP, TIFF: yes).
pub fn writes_icc(format: ImageFormat) -> bool {
    matches!(format, ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP | ImageFormat::Tiff)
}

/// Whether [`save_image_atomic`] embeds an EXIF block in `format` (PNG, JPEG, WebP: yes; TIFF:
/// no, see [`SaveOptions::exif`]).
pub fn writes_exif(format: ImageFormat) -> bool {
    matches!(format, ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)
}

/// Largest EXIF block a JPEG `APP1` segment holds: 65,535 (the 16-bit segment length) minus the
/// length field (2) and the `Exif\0\0` header (6).
const JPEG_MAX_EXIF: usize = 65_535 - 2 - 6;

/// Write an image atomically (see [`super::save_rgb8_atomic`]: temporary file, fsync, rename;
/// refuses to overwrite any of `inputs`), in the format of `out`'s extension (png, jpg/jpeg,
/// webp, tif/tiff).
///
/// * `rgb` is `(1, 3, H, W)` or `(3, H, W)` in `[-1, 1]`, any float dtype. 8-bit output is
///   [`super::tensor_to_rgb8_with`] with [`SaveOptions::rounding`]: to nearest by default, which
///   gives an 8-bit input back unchanged, or the reference's truncation for bit-exact parity with
///   the official code (not the inverse of the input mapping: an 8-bit value `v` in 1..=63
///   loaded and saved unchanged comes back as `v - 1`, its f32 value in `[-1, 1]` landing a hair
///   below `v / 127.5 - 1`, and every sample is half a level darker on average). 16-bit output is
///   `round((x + 1) / 2 * 65535)` clamped to `0..=65535` (computed in f64), which is exact
///   for 16-bit input.
/// * `alpha`, when given, is `(1, 1, H, W)` or `(1, H, W)` in `[0, 1]`, written as
///   `round(a * 255)` or `round(a * 65535)`, clamped (rounding, not truncation: it is the exact
///   inverse of the `a / 255` of [`super::load_image`], so alpha survives a round trip).
/// * `grayscale` writes one gray channel: the 8- or 16-bit RGB samples combined with ITU-R
///   BT.601 luma weights in 16-bit fixed point, `(19595 R + 38470 G + 7471 B + 32768) >> 16`
///   (PIL's `convert('L')`; the weights sum to 65536, so equal R, G, B give that value
///   exactly and a gray input comes back unchanged).
/// * Per format: PNG 8/16-bit, gray/gray+alpha/RGB/RGBA, ICC + EXIF. JPEG 8-bit only, gray or
///   RGB, ICC + EXIF; alpha is refused (composite it or drop it first: JPEG has no alpha
///   channel and silently losing it is what users complain about). WebP lossless 8-bit only,
///   alpha, ICC + EXIF (gray is stored as equal RGB: VP8L has no gray mode). TIFF 8/16-bit,
///   gray/RGB/RGBA (gray + alpha is written as RGBA: the encoder has no gray + alpha mode),
///   ICC, no EXIF.
///
/// Errors (each naming `out`): unknown extension, bad options (bit depth not 8 or 16, JPEG
/// quality not 1-100, 16 bits or alpha in a format that cannot hold them, EXIF that is not
/// TIFF-structured or too large for JPEG), a wrong tensor shape or a NaN, encoder and I/O
/// failures.
///
/// `rgb` may also be any other [`RgbBands`], such as a window of the sampler's final state kept in
/// a state folder ([`crate::sampling::FinalSample::window`]): it is then read and quantised one
/// band of rows at a time, so only the 8- or 16-bit samples are ever held for the whole image.
pub fn save_image_atomic(
    out: &Path,
    rgb: &dyn RgbBands,
    alpha: Option<&Tensor>,
    grayscale: bool,
    opts: &SaveOptions,
    inputs: &[&Path],
) -> Result<(), ImageIoError> {
    let format = output_format(out)?;
    let bad = |reason: String| ImageIoError::BadOptions { path: out.to_path_buf(), reason };
    let name = match format {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Tiff => "TIFF",
        _ => "PNG",
    };
    if opts.bit_depth != 8 && opts.bit_depth != 16 {
        return Err(bad(format!("bit depth {} is not supported (8 or 16)", opts.bit_depth)));
    }
    if opts.bit_depth == 16 && matches!(format, ImageFormat::Jpeg | ImageFormat::WebP) {
        return Err(bad(format!("{name} stores 8-bit samples only; write 16 bits as PNG or TIFF, or ask for 8 bits")));
    }
    if format == ImageFormat::Jpeg && alpha.is_some() {
        return Err(bad("JPEG has no alpha channel; write PNG, WebP or TIFF to keep the transparency, or \
             drop the alpha first"
            .into()));
    }
    if format == ImageFormat::Jpeg && !(1..=100).contains(&opts.jpeg_quality) {
        return Err(bad(format!("JPEG quality {} is not in 1..=100", opts.jpeg_quality)));
    }
    for (what, len, max) in [
        ("ICC profile", opts.icc.as_ref().map_or(0, Vec::len), super::LoadLimits::MAX_ICC_BYTES),
        ("EXIF block", opts.exif.as_ref().map_or(0, Vec::len), super::LoadLimits::MAX_EXIF_BYTES),
    ] {
        if len as u64 > max && !opts.strip_metadata {
            return Err(bad(format!("the {what} to write is {len} bytes, above the limit of {max}")));
        }
    }
    let exif = match &opts.exif {
        Some(e) if !opts.strip_metadata && writes_exif(format) && !e.is_empty() => Some(prepare_exif(e).map_err(&bad)?),
        _ => None,
    };
    if let Some(e) = &exif
        && format == ImageFormat::Jpeg
        && e.len() > JPEG_MAX_EXIF
    {
        return Err(bad(format!(
            "the EXIF block is {} bytes, more than the {JPEG_MAX_EXIF} a JPEG APP1 segment holds; \
             strip the metadata or write PNG/WebP",
            e.len()
        )));
    }

    let with_path = |e: ImageIoError| match e {
        ImageIoError::BadTensor { reason, .. } => ImageIoError::BadTensor { path: out.to_path_buf(), reason },
        e => e,
    };
    let (w, h, mut samples) = quantise_bands(rgb, opts.bit_depth, opts.rounding).map_err(with_path)?;
    let alpha = alpha.map(|a| alpha_samples(a, w, h, opts.bit_depth).map_err(with_path)).transpose()?;
    // TIFF has no gray + alpha: write RGBA.
    let grayscale = grayscale && !(format == ImageFormat::Tiff && alpha.is_some());
    if grayscale {
        samples = samples.into_luma();
    }
    // The colour model the file ends up holding (WebP stores gray as RGB), which the profile
    // must describe.
    let stored_gray = grayscale && format != ImageFormat::WebP;
    let icc = opts
        .icc
        .as_ref()
        .filter(|p| !opts.strip_metadata && !p.is_empty() && writes_icc(format) && icc_fits(p, stored_gray));
    let channels = if grayscale { 1 } else { 3 };
    if let Some(a) = &alpha {
        samples = samples.with_alpha(channels, a);
    }
    let color = match (opts.bit_depth, grayscale, alpha.is_some()) {
        (8, true, false) => ExtendedColorType::L8,
        (8, true, true) => ExtendedColorType::La8,
        (8, false, false) => ExtendedColorType::Rgb8,
        (8, false, true) => ExtendedColorType::Rgba8,
        (_, true, false) => ExtendedColorType::L16,
        (_, true, true) => ExtendedColorType::La16,
        (_, false, false) => ExtendedColorType::Rgb16,
        (_, false, true) => ExtendedColorType::Rgba16,
    };
    let bytes = samples.into_ne_bytes();

    write_atomic(out, inputs, |wr: &mut BufWriter<File>| {
        let encode_err = |e| ImageIoError::codec(out, "encode", e);
        let unsupported =
            |e: image::error::UnsupportedError| ImageIoError::codec(out, "encode", image::ImageError::Unsupported(e));
        macro_rules! encode {
            ($enc:expr) => {{
                let mut enc = $enc;
                if let Some(p) = icc {
                    enc.set_icc_profile(p.clone()).map_err(unsupported)?;
                }
                if let Some(e) = &exif {
                    enc.set_exif_metadata(e.clone()).map_err(unsupported)?;
                }
                enc.write_image(&bytes, w, h, color).map_err(encode_err)
            }};
        }
        match format {
            ImageFormat::Png => encode!(image::codecs::png::PngEncoder::new(wr)),
            ImageFormat::Jpeg => encode!(image::codecs::jpeg::JpegEncoder::new_with_quality(wr, opts.jpeg_quality)),
            ImageFormat::WebP => encode!(image::codecs::webp::WebPEncoder::new_lossless(wr)),
            _ => {
                // TIFF: ICC only (`exif` is None here, see `writes_exif`).
                let mut enc = image::codecs::tiff::TiffEncoder::new(wr);
                if let Some(p) = icc {
                    enc.set_icc_profile(p.clone()).map_err(unsupported)?;
                }
                enc.write_image(&bytes, w, h, color).map_err(encode_err)
            }
        }
    })
}

/// An RGB image in `[-1, 1]` that can be read as horizontal bands of rows: a whole `(1, 3, H, W)`
/// or `(3, H, W)` tensor is one band.
pub trait RgbBands {
    /// `(height, width)`; fails on a tensor that is not an RGB image.
    fn size(&self) -> Result<(usize, usize), ImageIoError>;
    /// Calls `f` with consecutive bands of rows, `(1, 3, rows, W)` or `(3, rows, W)` tensors, top to
    /// bottom, covering the image.
    fn for_each_band(&self, f: &mut dyn FnMut(&Tensor) -> Result<(), ImageIoError>) -> Result<(), ImageIoError>;
}

impl RgbBands for Tensor {
    fn size(&self) -> Result<(usize, usize), ImageIoError> {
        super::rgb_tensor_hw(self)
    }

    fn for_each_band(&self, f: &mut dyn FnMut(&Tensor) -> Result<(), ImageIoError>) -> Result<(), ImageIoError> {
        f(self)
    }
}

/// The interleaved samples of `rgb` at `bits` (8: [`tensor_to_rgb8_with`], 16: [`tensor_to_rgb16`]),
/// band by band. A NaN is reported with its row in the band.
fn quantise_bands(rgb: &dyn RgbBands, bits: u8, rounding: Rounding) -> Result<(u32, u32, Samples), ImageIoError> {
    let (h, w) = rgb.size()?;
    let (wu, hu) = dims_u32(w, h)?;
    let mut samples: Option<Samples> = None;
    let mut rows = 0;
    rgb.for_each_band(&mut |band| {
        let (bh, bw) = super::rgb_tensor_hw(band)?;
        if bw != w || rows + bh > h {
            return Err(ImageIoError::bad_tensor(format!("a {bw} x {bh} band does not fit the {w} x {h} image")));
        }
        rows += bh;
        // The first band's buffer is kept (a single band is not copied), later ones appended.
        match (&mut samples, bits) {
            (None, 8) => {
                let mut v = tensor_to_rgb8_with(band, rounding)?.into_raw();
                v.reserve_exact(3 * w * (h - bh));
                samples = Some(Samples::U8(v));
            }
            (None, _) => {
                let mut v = tensor_to_rgb16(band)?.2;
                v.reserve_exact(3 * w * (h - bh));
                samples = Some(Samples::U16(v));
            }
            (Some(Samples::U8(v)), _) => v.extend_from_slice(tensor_to_rgb8_with(band, rounding)?.as_raw()),
            (Some(Samples::U16(v)), _) => v.extend_from_slice(&tensor_to_rgb16(band)?.2),
        }
        Ok(())
    })?;
    match samples {
        Some(s) if rows == h => Ok((wu, hu, s)),
        _ => Err(ImageIoError::bad_tensor(format!("the bands cover {rows} of the {h} rows"))),
    }
}

/// Whether an ICC profile can describe the pixels written: its data colour space (header bytes
/// 16..20) must be `GRAY` for gray output and `RGB ` for colour output. A profile too short to
/// have a header is passed through.
fn icc_fits(icc: &[u8], gray: bool) -> bool {
    match icc.get(16..20) {
        Some(b"GRAY") => gray,
        Some(b"RGB ") => !gray,
        Some(_) => false,
        None => true,
    }
}

/// A TIFF-structured copy of `exif` with the orientation tag reset to 1.
fn prepare_exif(exif: &[u8]) -> Result<Vec<u8>, String> {
    let body = exif.strip_prefix(b"Exif\0\0".as_slice()).unwrap_or(exif);
    if !(body.starts_with(b"II*\0") || body.starts_with(b"MM\0*")) {
        return Err("the EXIF block does not start with a TIFF header (II*\\0 or MM\\0*); strip the \
             metadata or pass a valid block"
            .into());
    }
    let mut e = body.to_vec();
    let _ = Orientation::remove_from_exif_chunk(&mut e);
    Ok(e)
}

/// Interleaved samples of one bit depth.
enum Samples {
    U8(Vec<u8>),
    U16(Vec<u16>),
}

/// PIL's `convert('L')`: ITU-R BT.601 luma in 16-bit fixed point, rounded.
fn luma(r: u64, g: u64, b: u64) -> u64 {
    (19595 * r + 38470 * g + 7471 * b + 32768) >> 16
}

impl Samples {
    /// Interleaved RGB to gray (see [`luma`]).
    fn into_luma(self) -> Self {
        match self {
            Samples::U8(v) => {
                Samples::U8(v.chunks_exact(3).map(|p| luma(p[0] as u64, p[1] as u64, p[2] as u64) as u8).collect())
            }
            Samples::U16(v) => {
                Samples::U16(v.chunks_exact(3).map(|p| luma(p[0] as u64, p[1] as u64, p[2] as u64) as u16).collect())
            }
        }
    }

    /// Append an alpha sample after every `channels` samples.
    fn with_alpha(self, channels: usize, alpha: &Samples) -> Self {
        fn interleave<T: Copy>(v: &[T], a: &[T], c: usize) -> Vec<T> {
            let mut out = Vec::with_capacity(v.len() + a.len());
            for (p, &x) in v.chunks_exact(c).zip(a) {
                out.extend_from_slice(p);
                out.push(x);
            }
            out
        }
        match (self, alpha) {
            (Samples::U8(v), Samples::U8(a)) => Samples::U8(interleave(&v, a, channels)),
            (Samples::U16(v), Samples::U16(a)) => Samples::U16(interleave(&v, a, channels)),
            _ => unreachable!("colour and alpha are quantised to the same bit depth"),
        }
    }

    /// The byte buffer `image`'s encoders take (16-bit samples in native endianness).
    fn into_ne_bytes(self) -> Vec<u8> {
        match self {
            Samples::U8(v) => v,
            Samples::U16(v) => v.iter().flat_map(|x| x.to_ne_bytes()).collect(),
        }
    }
}

/// Quantise `x` in `[lo, lo + span]` to `0..=max` by rounding; NaN is an error.
fn quantise(x: f32, lo: f64, span: f64, max: f64) -> Option<f64> {
    (!x.is_nan()).then(|| ((x as f64 - lo) / span * max).round().clamp(0.0, max))
}

/// A `(1, 3, H, W)` or `(3, H, W)` tensor in `[-1, 1]` as interleaved 16-bit RGB:
/// `round((x + 1) / 2 * 65535)`, clamped.
fn tensor_to_rgb16(t: &Tensor) -> Result<(u32, u32, Vec<u16>), ImageIoError> {
    let (h, w) = super::rgb_tensor_hw(t)?;
    let (wu, hu) = dims_u32(w, h)?;
    let data = read_f32(t)?;
    let n = h * w;
    let mut out = Vec::with_capacity(3 * n);
    for i in 0..n {
        for c in 0..3 {
            let v = quantise(data[c * n + i], -1.0, 2.0, 65535.0).ok_or_else(|| {
                ImageIoError::bad_tensor(format!("NaN in channel {c} at pixel (row {}, column {})", i / w, i % w))
            })?;
            out.push(v as u16);
        }
    }
    Ok((wu, hu, out))
}

/// The alpha tensor quantised to `bits` (see [`save_image_atomic`]), checked against the
/// colour's `w x h`.
fn alpha_samples(a: &Tensor, w: u32, h: u32, bits: u8) -> Result<Samples, ImageIoError> {
    match *a.dims() {
        [1, 1, ah, aw] | [1, ah, aw] if (ah, aw) == (h as usize, w as usize) => {}
        _ => {
            return Err(ImageIoError::bad_tensor(format!(
                "expected a (1,1,{h},{w}) alpha tensor to go with the {w} x {h} image, got shape {:?}",
                a.dims()
            )));
        }
    }
    let data = read_f32(a)?;
    let max = if bits == 8 { 255.0 } else { 65535.0 };
    let mut q = Vec::with_capacity(data.len());
    for (i, &x) in data.iter().enumerate() {
        q.push(quantise(x, 0.0, 1.0, max).ok_or_else(|| {
            ImageIoError::bad_tensor(format!(
                "NaN in alpha at pixel (row {}, column {})",
                i / w as usize,
                i % w as usize
            ))
        })?);
    }
    Ok(if bits == 8 {
        Samples::U8(q.into_iter().map(|v| v as u8).collect())
    } else {
        Samples::U16(q.into_iter().map(|v| v as u16).collect())
    })
}

fn dims_u32(w: usize, h: usize) -> Result<(u32, u32), ImageIoError> {
    match (u32::try_from(w), u32::try_from(h)) {
        (Ok(wu), Ok(hu)) if wu > 0 && hu > 0 => Ok((wu, hu)),
        _ => Err(ImageIoError::bad_tensor(format!("cannot make a {w} x {h} image"))),
    }
}

fn read_f32(t: &Tensor) -> Result<Vec<f32>, ImageIoError> {
    t.to_dtype(DType::F32)
        .and_then(|x| x.flatten_all())
        .and_then(|x| x.to_vec1::<f32>())
        .map_err(|e| ImageIoError::bad_tensor(format!("cannot read tensor: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imageio::load::{LoadLimits, load_image};
    use candle_core::Device;
    use std::fs;
    use std::path::PathBuf;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("infdit-save-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// A (1,3,H,W) tensor whose values are exactly k / 65535 * 2 - 1 for distinct 16-bit k.
    fn rgb16_tensor(h: usize, w: usize) -> (Tensor, Vec<u16>) {
        let n = h * w;
        let ks: Vec<u16> = (0..3 * n).map(|i| ((i * 7919 + 13) % 65536) as u16).collect();
        let v: Vec<f32> = ks.iter().map(|&k| k as f32 / 65535.0 * 2.0 - 1.0).collect();
        (Tensor::from_vec(v, (1, 3, h, w), &Device::Cpu).unwrap(), ks)
    }

    #[test]
    fn sixteen_bit_round_trip_png_and_tiff_exact() {
        let d = scratch("16");
        let (t, ks) = rgb16_tensor(5, 7);
        let alpha_k: Vec<u16> = (0..35).map(|i| (i * 1871) as u16).collect();
        let a = Tensor::from_vec(
            alpha_k.iter().map(|&k| k as f32 / 65535.0).collect::<Vec<_>>(),
            (1, 1, 5, 7),
            &Device::Cpu,
        )
        .unwrap();
        let opts = SaveOptions { bit_depth: 16, ..SaveOptions::default() };
        for ext in ["png", "tiff"] {
            for with_alpha in [false, true] {
                let p = d.join(format!("o{with_alpha}.{ext}"));
                save_image_atomic(&p, &t, with_alpha.then_some(&a), false, &opts, &[]).unwrap();
                // The raw 16-bit samples, straight from the decoder.
                let raw = image::open(&p).unwrap().to_rgba16();
                let n = 35;
                for i in 0..n {
                    let px = raw.as_raw()[4 * i..4 * i + 4].to_vec();
                    assert_eq!(px[..3], [ks[i], ks[n + i], ks[2 * n + i]], "{ext} pixel {i}");
                    let ea = if with_alpha { alpha_k[i] } else { 65535 };
                    assert_eq!(px[3], ea, "{ext} alpha {i}");
                }
                let img = load_image(&p, &LoadLimits::default()).unwrap();
                assert_eq!(img.bit_depth, 16, "{ext}");
                assert_eq!(img.alpha.is_some(), with_alpha, "{ext}");
                if with_alpha {
                    // Alpha comes back exactly; so does colour wherever alpha > 0.
                    assert_eq!(vals(img.alpha.as_ref().unwrap()), vals(&a), "{ext}");
                }
                let (got, want) = (vals(&img.rgb), vals(&t));
                for i in 0..3 * n {
                    if !with_alpha || alpha_k[i % n] > 0 {
                        assert_eq!(got[i].to_bits(), want[i].to_bits(), "{ext} sample {i}");
                    }
                }
            }
        }
        // The 16-bit quantiser itself: round, clamp.
        let t = Tensor::from_vec(vec![-1.0f32, 1.0, 0.0, -2.0, 3.0, -0.99999], (1, 3, 1, 2), &Device::Cpu).unwrap();
        let (_, _, v) = tensor_to_rgb16(&t).unwrap();
        // Interleaved: pixel 0 = (-1, 0, 3), pixel 1 = (1, -2, -0.99999).
        assert_eq!(v, vec![0, 32768, 65535, 65535, 0, 0]);
        let _ = fs::remove_dir_all(&d);
    }

    /// What an 8-bit sample `v` becomes after `load_image` and the official truncating output
    /// conversion: `trunc((fl32(fl32(v / 255) * 2 - 1) + 1) * 127.5)`, which is `v - 1` for
    /// `v` in 1..=63 (the f32 value lands just below `v / 127.5 - 1`) and `v` otherwise.
    fn official_8bit(v: u8) -> u8 {
        let x = (v as f32 / 255.0) * 2.0 - 1.0;
        ((x as f64 + 1.0) * 127.5).clamp(0.0, 255.0) as u8
    }

    #[test]
    fn eight_bit_uses_the_reference_truncation() {
        // The documented identity round-trip loss of the reference conversion.
        for v in 0..=255u8 {
            let expect = if (1..=63).contains(&v) { v - 1 } else { v };
            assert_eq!(official_8bit(v), expect, "{v}");
        }
        let d = scratch("8");
        // Truncated: 0.0 -> 127.5 -> 127, -0.996 -> 0.51 -> 0. Rounded (the default): 128, 1.
        let t = Tensor::from_vec(vec![0.0f32, -0.996, 1.0], (1, 3, 1, 1), &Device::Cpu).unwrap();
        let p = d.join("t.png");
        let truncate = SaveOptions { rounding: Rounding::Truncate, ..SaveOptions::default() };
        save_image_atomic(&p, &t, None, false, &truncate, &[]).unwrap();
        assert_eq!(image::open(&p).unwrap().to_rgb8().as_raw(), &vec![127, 0, 255]);
        save_image_atomic(&p, &t, None, false, &SaveOptions::default(), &[]).unwrap();
        assert_eq!(image::open(&p).unwrap().to_rgb8().as_raw(), &vec![128, 1, 255]);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn gray_stays_gray_and_rgba_round_trips() {
        let d = scratch("gray");
        let lim = LoadLimits::default();
        let g = image::GrayImage::from_fn(6, 4, |x, y| image::Luma([(x * 40 + y * 3) as u8]));
        let src = d.join("g.png");
        g.save(&src).unwrap();
        let img = load_image(&src, &lim).unwrap();
        for ext in ["png", "tiff", "jpg"] {
            let p = d.join(format!("g_out.{ext}"));
            save_image_atomic(&p, &img.rgb, None, img.grayscale, &SaveOptions::like_input(&img), &[&src]).unwrap();
            let back = image::open(&p).unwrap();
            assert!(matches!(back.color(), image::ColorType::L8), "{ext}: {:?}", back.color());
            if ext != "jpg" {
                let got = back.to_luma8();
                for (a, b) in got.pixels().zip(g.pixels()) {
                    assert_eq!(a.0[0], b.0[0], "{ext}");
                }
            }
            assert!(load_image(&p, &lim).unwrap().grayscale, "{ext}");
        }
        // 16-bit gray through PNG.
        let g16 =
            image::ImageBuffer::<image::Luma<u16>, _>::from_fn(3, 2, |x, y| image::Luma([(x * 20000 + y * 7) as u16]));
        let src16 = d.join("g16.png");
        g16.save(&src16).unwrap();
        let img = load_image(&src16, &lim).unwrap();
        let p = d.join("g16_out.png");
        save_image_atomic(&p, &img.rgb, None, true, &SaveOptions::like_input(&img), &[]).unwrap();
        assert_eq!(image::open(&p).unwrap().as_luma16().unwrap(), &g16);

        // RGBA 8-bit through PNG, WebP and TIFF: exact where alpha > 0 (rounded to nearest), alpha exact.
        let rgba = image::RgbaImage::from_fn(5, 3, |x, y| {
            image::Rgba([x as u8 * 50, y as u8 * 80, 9, if x == 4 { 0 } else { (x * 60 + y) as u8 + 1 }])
        });
        let src = d.join("rgba.png");
        rgba.save(&src).unwrap();
        let img = load_image(&src, &lim).unwrap();
        assert_eq!(img.bit_depth, 8);
        for ext in ["png", "webp", "tiff"] {
            let p = d.join(format!("rgba_out.{ext}"));
            save_image_atomic(&p, &img.rgb, img.alpha.as_ref(), false, &SaveOptions::like_input(&img), &[]).unwrap();
            let back = image::open(&p).unwrap().to_rgba8();
            for (a, b) in back.pixels().zip(rgba.pixels()) {
                assert_eq!(a.0[3], b.0[3], "{ext} alpha");
                if b.0[3] > 0 {
                    assert_eq!(a.0[..3], b.0[..3], "{ext}");
                }
            }
            // The transparent column was filled from its neighbours (x = 3: red 150, blue 9,
            // green between rows), not left black.
            let f = back.get_pixel(4, 0).0;
            assert_eq!([f[0], f[2]], [150, 9], "{ext}");
            assert!(f[1] <= 80, "{ext}");
        }
        // JPEG refuses alpha and 16 bits, with the file named.
        let p = d.join("x.jpg");
        let e = save_image_atomic(&p, &img.rgb, img.alpha.as_ref(), false, &SaveOptions::default(), &[]).unwrap_err();
        assert!(matches!(e, ImageIoError::BadOptions { .. }) && e.to_string().contains("x.jpg"), "{e}");
        let sixteen = SaveOptions { bit_depth: 16, ..SaveOptions::default() };
        for f in ["x.jpg", "x.webp"] {
            let e = save_image_atomic(&d.join(f), &img.rgb, None, false, &sixteen, &[]).unwrap_err();
            assert!(e.to_string().contains(f) && e.to_string().contains("8-bit"), "{e}");
        }
        let e = save_image_atomic(
            &p,
            &img.rgb,
            None,
            false,
            &SaveOptions { jpeg_quality: 0, ..SaveOptions::default() },
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("quality"), "{e}");
        let e = save_image_atomic(
            &d.join("b.png"),
            &img.rgb,
            None,
            false,
            &SaveOptions { bit_depth: 12, ..SaveOptions::default() },
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("bit depth 12"), "{e}");
        // Alpha of the wrong size.
        let small = Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let e = save_image_atomic(&d.join("c.png"), &img.rgb, Some(&small), false, &SaveOptions::default(), &[])
            .unwrap_err();
        assert!(matches!(e, ImageIoError::BadTensor { .. }) && e.to_string().contains("c.png"), "{e}");
        assert!(fs::read_dir(&d).unwrap().all(|e| { !e.unwrap().file_name().to_string_lossy().ends_with(".partial") }));
        let _ = fs::remove_dir_all(&d);
    }

    /// A 300-byte stand-in for an ICC profile: the containers only care about the bytes, and
    /// `save_image_atomic` reads the data colour space at 16..20. The rest is a recognisable
    /// pattern.
    fn fake_profile(space: &[u8; 4]) -> Vec<u8> {
        let mut p: Vec<u8> = (0..300u32).map(|i| (i * 31 % 251) as u8).collect();
        p[..4].copy_from_slice(&300u32.to_be_bytes());
        p[16..20].copy_from_slice(space);
        p[36..40].copy_from_slice(b"acsp");
        p
    }

    #[test]
    fn icc_must_fit_the_written_colour_model() {
        let d = scratch("iccfit");
        let lim = LoadLimits::default();
        let (t, _) = rgb16_tensor(4, 4);
        let alpha = Tensor::ones((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
        // (profile colour space, gray, alpha, extension, kept)
        for (space, gray, with_alpha, ext, kept) in [
            (b"GRAY", true, false, "png", true),
            (b"GRAY", true, true, "png", true),
            (b"GRAY", false, false, "png", false),
            (b"GRAY", true, false, "webp", false), // WebP stores gray as RGB
            (b"GRAY", true, true, "tiff", false),  // TIFF writes gray + alpha as RGBA
            (b"GRAY", true, false, "tiff", true),
            (b"RGB ", true, false, "png", false),
            (b"RGB ", false, true, "webp", true),
            (b"CMYK", false, false, "jpg", false),
        ] {
            let p = d.join(format!("f.{ext}"));
            let opts = SaveOptions { icc: Some(fake_profile(space)), ..SaveOptions::default() };
            let a = with_alpha.then_some(&alpha);
            save_image_atomic(&p, &t, a, gray, &opts, &[]).unwrap();
            let img = load_image(&p, &lim).unwrap();
            let what = format!("{} gray {gray} alpha {with_alpha} {ext}", String::from_utf8_lossy(space));
            assert_eq!(img.icc.is_some(), kept, "{what}");
        }
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn icc_and_exif_round_trip() {
        let d = scratch("meta");
        let lim = LoadLimits::default();
        let icc = fake_profile(b"RGB ");
        let exif = crate::imageio::load::tests::exif_with_orientation(6);
        let (t, _) = rgb16_tensor(4, 4);
        let opts = SaveOptions { icc: Some(icc.clone()), exif: Some(exif.clone()), ..SaveOptions::default() };
        for ext in ["png", "jpg", "webp", "tiff"] {
            let p = d.join(format!("m.{ext}"));
            save_image_atomic(&p, &t, None, false, &opts, &[]).unwrap();
            let img = load_image(&p, &lim).unwrap();
            assert_eq!(img.icc.as_deref(), Some(&icc[..]), "{ext} ICC");
            let format = ImageFormat::from_path(&p).unwrap();
            if writes_exif(format) {
                // Written upright: orientation 1, and the pixels were not rotated on load.
                let e = img.exif.expect(ext);
                assert_eq!(Orientation::from_exif_chunk(&e), Some(Orientation::NoTransforms), "{ext}");
                assert_eq!(img.rgb.dims(), &[1, 3, 4, 4]);
            } else {
                assert!(img.exif.is_none(), "{ext}");
            }
        }
        // strip_metadata writes neither.
        let p = d.join("s.png");
        save_image_atomic(&p, &t, None, false, &SaveOptions { strip_metadata: true, ..opts.clone() }, &[]).unwrap();
        let img = load_image(&p, &lim).unwrap();
        assert!(img.icc.is_none() && img.exif.is_none());
        // EXIF that is not TIFF-structured is refused, naming the file.
        let e = save_image_atomic(
            &d.join("bad.png"),
            &t,
            None,
            false,
            &SaveOptions { exif: Some(b"garbage".to_vec()), ..SaveOptions::default() },
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("bad.png") && e.to_string().contains("EXIF"), "{e}");
        let _ = fs::remove_dir_all(&d);
    }
}
