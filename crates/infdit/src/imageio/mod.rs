//! Image file input/output and the exact pixel conversions of the reference pipeline.
//!
//! * [`load_rgb`] decodes a file into the `(1, 3, H, W)` f32 tensor in `[-1, 1]` that
//!   torchvision's `ToTensor()(img.convert('RGB')) * 2 - 1` produces, bit for bit.
//! * [`tensor_to_rgb8`] is the reference output conversion (truncating, not rounding);
//!   [`tensor_to_rgb8_with`] also rounds to nearest ([`Rounding`]), infdit's default for output files.
//! * [`save_rgb8_atomic`] writes through a temporary file and a rename, so a crash never leaves
//!   a half-written output, and it refuses to overwrite the input image.
//!
//! The bicubic resampling used around these lives in [`resize`].
//!
//! Real-file handling (any format and bit depth, alpha, metadata, hostile input) is built on
//! top of the same conversions:
//!
//! * [`load_image`] returns a [`LoadedImage`]: the RGB tensor (same mapping as [`load_rgb`]),
//!   the alpha plane, bit depth, grayscale flag, ICC profile and EXIF blob, with the EXIF
//!   orientation applied to the pixels and the colour under fully transparent pixels filled
//!   from the nearest opaque ones ([`fill_transparent`]). [`LoadLimits`] bounds pixels and
//!   decoder memory before any pixel is decoded.
//! * [`save_image_atomic`] writes PNG, JPEG, WebP or TIFF in 8 or 16 bits, with alpha, ICC and
//!   EXIF where the format allows ([`SaveOptions`]), through the same atomic write as
//!   [`save_rgb8_atomic`].
//! * [`pad_reflect`] and [`crop`] prepare tensors of any size for the network (reflection pad
//!   to a multiple of the patch grid, crop back afterwards).

pub mod find;
pub mod resize;

mod fill;
mod load;
mod meta;
mod pad;
mod save;

pub use fill::fill_transparent;
pub use load::{ImageInfo, LoadLimits, LoadedImage, load_image, probe};
pub use pad::{crop, pad_reflect};
pub use save::{RgbBands, SaveOptions, save_image_atomic, writes_exif, writes_icc};

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits, RgbImage};

/// Errors of the image I/O helpers. Every variant names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum ImageIoError {
    /// The file could not be opened, read, written, synced or renamed.
    #[error("{}: {}", path.display(), one_line(&source.to_string()))]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The format is not one this build can read or write.
    #[error("{}: unsupported image format: {}", path.display(), one_line(reason))]
    UnsupportedFormat {
        /// The file concerned.
        path: PathBuf,
        /// What was not supported.
        reason: String,
    },
    /// The decoder or encoder failed (corrupt or truncated data, encoder limitation, ...).
    #[error("{}: cannot {action} image: {}", path.display(), one_line(&source.to_string()))]
    Codec {
        /// The file concerned.
        path: PathBuf,
        /// `"decode"` or `"encode"`.
        action: &'static str,
        /// The codec's error.
        #[source]
        source: ImageError,
    },
    /// The image has a zero width or height.
    #[error("{}: image has zero size ({width} x {height})", path.display())]
    ZeroSize {
        /// The file concerned.
        path: PathBuf,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// The image has more pixels than the caller allows.
    #[error(
        "{}: image is {width} x {height} = {pixels} pixels, above the limit of {limit}",
        path.display()
    )]
    TooLarge {
        /// The file concerned.
        path: PathBuf,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// `width * height`.
        pixels: u64,
        /// The caller's limit.
        limit: u64,
    },
    /// The tensor handed to the output conversion is not an RGB image tensor, or holds NaN.
    #[error("{}: {reason}", path.display())]
    BadTensor {
        /// The output the tensor was meant for (empty when not known).
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The file ends before the image data does, or its data is cut short by garbage.
    #[error("{}: file is truncated or corrupt: {}", path.display(), one_line(detail))]
    Truncated {
        /// The file concerned.
        path: PathBuf,
        /// What the decoder reported.
        detail: String,
    },
    /// Decoding would exceed the caller's memory limit ([`LoadLimits::max_alloc_bytes`]), as
    /// announced by the header or found by the decoder on the way.
    #[error("{}: {}", path.display(), one_line(reason))]
    LimitExceeded {
        /// The file concerned.
        path: PathBuf,
        /// Which limit and by how much.
        reason: String,
    },
    /// The save options do not fit the output (bit depth, quality, alpha in a format without
    /// alpha, ...).
    #[error("{}: {reason}", path.display())]
    BadOptions {
        /// The output the options were meant for.
        path: PathBuf,
        /// What is wrong with them.
        reason: String,
    },
    /// A decoder panicked on this file (a bug in the decoder, caught and reported instead of
    /// taking the process down).
    #[error(
        "{}: the decoder crashed on this file (corrupt data?): {}",
        path.display(),
        one_line(message)
    )]
    DecoderPanic {
        /// The file concerned.
        path: PathBuf,
        /// The panic message, when it was a string.
        message: String,
    },
    /// The output path is (canonically) the same file as an input.
    #[error("{}: refusing to overwrite the input image {}", path.display(), input.display())]
    WouldOverwriteInput {
        /// The requested output path.
        path: PathBuf,
        /// The input path it resolves to.
        input: PathBuf,
    },
}

/// `s` on one line: runs of whitespace (line breaks included, as some decoders end their
/// messages with one) become one space, so every error prints as one line.
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl ImageIoError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }

    pub(crate) fn codec(path: &Path, action: &'static str, source: ImageError) -> Self {
        match source {
            ImageError::Unsupported(e) => Self::UnsupportedFormat { path: path.to_path_buf(), reason: e.to_string() },
            ImageError::IoError(e) => Self::io(path, e),
            ImageError::Limits(e) => Self::LimitExceeded {
                path: path.to_path_buf(),
                reason: format!("cannot {action} image within the memory limit: {e}"),
            },
            source => Self::Codec { path: path.to_path_buf(), action, source },
        }
    }

    fn bad_tensor(reason: impl Into<String>) -> Self {
        Self::BadTensor { path: PathBuf::new(), reason: reason.into() }
    }
}

/// Load an image file as RGB and return a `(1, 3, H, W)` f32 tensor on the CPU with values in
/// `[-1, 1]`.
///
/// * The format is detected from the content (falling back to the extension): PNG, JPEG, WebP,
///   TIFF, BMP.
/// * Colour handling follows PIL's `.convert('RGB')`: gray is replicated to three channels,
///   palettes are expanded, an alpha channel is dropped (no compositing). EXIF orientation is
///   ignored, as PIL's `Image.open` does.
/// * 8-bit samples map to `fl32(fl32(v as f32 / 255) * 2 - 1)`, which is bitwise what
///   `ToTensor()(img) * 2 - 1` gives (an f32 division by 255, an exact doubling, one f32
///   subtraction). 16-bit samples use `v / 65535` instead; float samples (TIFF) are used as
///   they are, `x * 2 - 1`.
/// * Images with more than `max_pixels` pixels are rejected from the header, before the pixel
///   data is decoded; so are images with a zero dimension.
pub fn load_rgb(path: &Path, max_pixels: u64) -> Result<Tensor, ImageIoError> {
    crate::files::check_regular(path).map_err(|e| ImageIoError::io(path, e))?;
    let file = File::open(path).map_err(|e| ImageIoError::io(path, e))?;
    let mut reader = ImageReader::new(BufReader::new(file));
    if let Ok(fmt) = ImageFormat::from_path(path) {
        reader.set_format(fmt);
    }
    let mut reader = reader.with_guessed_format().map_err(|e| ImageIoError::io(path, e))?;
    if reader.format().is_none() {
        return Err(ImageIoError::UnsupportedFormat {
            path: path.to_path_buf(),
            reason: "neither the content nor the extension names a known format".into(),
        });
    }
    // Our own pixel cap replaces the crate's default 512 MiB allocation cap; the allocation
    // cap is scaled to the largest image we accept (up to 4 x f32 per pixel, plus slack).
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(16).saturating_add(256 << 20));
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|e| ImageIoError::codec(path, "decode", e))?;

    let (width, height) = decoder.dimensions();
    load::check_size(path, width, height, &LoadLimits { max_pixels, max_alloc_bytes: u64::MAX })?;
    let img = DynamicImage::from_decoder(decoder).map_err(|e| ImageIoError::codec(path, "decode", e))?;
    dynamic_to_tensor(&img)
        .map_err(|e| ImageIoError::BadTensor { path: path.to_path_buf(), reason: format!("cannot build tensor: {e}") })
}

/// The (1, 3, H, W) `[-1, 1]` tensor of an 8-bit RGB image, mapped exactly as [`load_rgb`] maps
/// 8-bit files.
pub fn rgb8_to_tensor(img: &RgbImage) -> candle_core::Result<Tensor> {
    dynamic_to_tensor(&DynamicImage::ImageRgb8(img.clone()))
}

/// Planar `[-1, 1]` tensor of a decoded image (see [`load_rgb`] for the exact mapping).
fn dynamic_to_tensor(img: &DynamicImage) -> candle_core::Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let n = w * h;
    let mut planar = vec![0f32; 3 * n];
    let mut put = |i: usize, rgb: [f32; 3]| {
        for (c, v) in rgb.into_iter().enumerate() {
            planar[c * n + i] = v * 2.0 - 1.0;
        }
    };
    match img {
        DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_)
        | DynamicImage::ImageRgb16(_)
        | DynamicImage::ImageRgba16(_) => {
            for (i, p) in img.to_rgb16().pixels().enumerate() {
                put(i, p.0.map(|v| v as f32 / 65535.0));
            }
        }
        DynamicImage::ImageRgb32F(_) | DynamicImage::ImageRgba32F(_) => {
            for (i, p) in img.to_rgb32f().pixels().enumerate() {
                put(i, p.0);
            }
        }
        _ => {
            for (i, p) in img.to_rgb8().pixels().enumerate() {
                put(i, p.0.map(|v| v as f32 / 255.0));
            }
        }
    }
    Tensor::from_vec(planar, (1, 3, h, w), &Device::Cpu)
}

/// `(H, W)` of a `(1, 3, H, W)` or `(3, H, W)` image tensor; an error for any other shape.
pub(crate) fn rgb_tensor_hw(t: &Tensor) -> Result<(usize, usize), ImageIoError> {
    match *t.dims() {
        [1, 3, h, w] | [3, h, w] => Ok((h, w)),
        _ => Err(ImageIoError::bad_tensor(format!(
            "expected a (1,3,H,W) or (3,H,W) image tensor, got shape {:?}",
            t.dims()
        ))),
    }
}

/// How `[-1, 1]` values become 8-bit samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rounding {
    /// `round((x + 1) * 127.5)`: unbiased, the inverse of [`load_image`]'s `v / 127.5 - 1` up to
    /// f32 rounding. infdit's default.
    #[default]
    Nearest,
    /// `trunc((x + 1) * 127.5)`, the reference script's `astype(uint8)`: every sample half a
    /// level darker on average. For bit-exact comparisons with the official code.
    Truncate,
}

/// Convert a `(1, 3, H, W)` or `(3, H, W)` tensor in `[-1, 1]` to an 8-bit RGB image the way
/// the reference script does: `((x as f64 + 1) * 127.5).clamp(0, 255)`, then truncation
/// toward zero (not rounding). Other float dtypes are converted to f32 first.
///
/// Fails on a wrong shape or when any value is NaN (infinities saturate to 0 or 255).
pub fn tensor_to_rgb8(t: &Tensor) -> Result<RgbImage, ImageIoError> {
    tensor_to_rgb8_with(t, Rounding::Truncate)
}

/// [`tensor_to_rgb8`] with a choice of [`Rounding`].
pub fn tensor_to_rgb8_with(t: &Tensor, rounding: Rounding) -> Result<RgbImage, ImageIoError> {
    let (h, w) = rgb_tensor_hw(t)?;
    let (wu, hu) = match (u32::try_from(w), u32::try_from(h)) {
        (Ok(wu), Ok(hu)) if wu > 0 && hu > 0 => (wu, hu),
        _ => {
            return Err(ImageIoError::bad_tensor(format!("cannot make a {w} x {h} image")));
        }
    };
    let data = t
        .to_dtype(DType::F32)
        .and_then(|x| x.flatten_all())
        .and_then(|x| x.to_vec1::<f32>())
        .map_err(|e| ImageIoError::bad_tensor(format!("cannot read tensor: {e}")))?;
    let n = h * w;
    let mut out = Vec::with_capacity(3 * n);
    for i in 0..n {
        for c in 0..3 {
            let x = data[c * n + i];
            if x.is_nan() {
                return Err(ImageIoError::bad_tensor(format!(
                    "NaN in channel {c} at pixel (row {}, column {})",
                    i / w,
                    i % w
                )));
            }
            let v = (x as f64 + 1.0) * 127.5;
            // Truncation is numpy's astype(uint8) after clip.
            let v = if rounding == Rounding::Nearest { v.round() } else { v };
            out.push(v.clamp(0.0, 255.0) as u8);
        }
    }
    Ok(RgbImage::from_raw(wu, hu, out).expect("buffer size matches the dimensions"))
}

/// The output format implied by the extension of `out` (png, jpg/jpeg, webp, tif/tiff; case
/// insensitive).
pub fn output_format(out: &Path) -> Result<ImageFormat, ImageIoError> {
    let ext = out.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("png") => Ok(ImageFormat::Png),
        Some("jpg" | "jpeg") => Ok(ImageFormat::Jpeg),
        Some("webp") => Ok(ImageFormat::WebP),
        Some("tif" | "tiff") => Ok(ImageFormat::Tiff),
        other => Err(ImageIoError::UnsupportedFormat {
            path: out.to_path_buf(),
            reason: match other {
                Some(e) => format!("cannot write '.{e}' files (use png, jpg, webp or tiff)"),
                None => "no file extension to choose the format from".into(),
            },
        }),
    }
}

/// Best-effort canonical form of a path that may not exist yet: the canonical parent joined
/// with the file name (or the canonical path itself when it exists).
pub fn canonical_target(p: &Path) -> PathBuf {
    if let Ok(c) = fs::canonicalize(p) {
        return c;
    }
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match (fs::canonicalize(parent), p.file_name()) {
        (Ok(d), Some(name)) => d.join(name),
        _ => std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()),
    }
}

/// Write `img` to `out` atomically.
///
/// The image is encoded (format from the extension: png, jpg/jpeg, webp, tif/tiff) into a
/// short hidden temporary file ([`crate::atomic::temp_path`]) in the same directory, fsynced, then renamed
/// over `out` (and the directory is fsynced on Unix), so `out` is either the old file or the
/// complete new one. The temporary file is removed on failure.
///
/// Refuses to write when `out` resolves (symlinks and `..` followed) to the same file as one
/// of the `inputs`, so an upscale can never overwrite its source image.
///
/// JPEG is written at quality 95 (4:2:0); WebP is written lossless (the only WebP encoder
/// available).
pub fn save_rgb8_atomic(img: &RgbImage, out: &Path, inputs: &[&Path]) -> Result<(), ImageIoError> {
    let format = output_format(out)?;
    write_atomic(out, inputs, |w| match format {
        ImageFormat::Jpeg => {
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(w, 95);
            img.write_with_encoder(enc).map_err(|e| ImageIoError::codec(out, "encode", e))
        }
        f => img.write_to(w, f).map_err(|e| ImageIoError::codec(out, "encode", e)),
    })
}

/// The atomic-write protocol shared by [`save_rgb8_atomic`] and [`save_image_atomic`]:
/// refuse an `out` that is one of the `inputs`, then [`crate::atomic::write_atomic`]: `encode`
/// writes into a short hidden temporary file next to `out`, which is flushed, fsynced and
/// renamed over `out`, the directory fsynced (Unix). The temporary file is removed when anything
/// fails.
pub(crate) fn write_atomic(
    out: &Path,
    inputs: &[&Path],
    encode: impl FnOnce(&mut BufWriter<File>) -> Result<(), ImageIoError>,
) -> Result<(), ImageIoError> {
    let target = canonical_target(out);
    for input in inputs {
        if canonical_target(input) == target {
            return Err(ImageIoError::WouldOverwriteInput { path: out.to_path_buf(), input: input.to_path_buf() });
        }
    }
    crate::atomic::write_atomic(
        out,
        |tmp| {
            let file =
                OpenOptions::new().write(true).create_new(true).open(tmp).map_err(|e| ImageIoError::io(tmp, e))?;
            let mut w = BufWriter::new(file);
            encode(&mut w)?;
            w.flush().map_err(|e| ImageIoError::io(tmp, e))?;
            let file = w.into_inner().map_err(|e| ImageIoError::io(tmp, e.into_error()))?;
            file.sync_all().map_err(|e| ImageIoError::io(tmp, e))
        },
        ImageIoError::io,
    )
}

/// Directory of a golden-vector set (`"parity"` or `"parity2"`): `$INFDIT_SHARED_DIR/<set>`,
/// or `<workspace>/../shared/<set>` when the variable is not set.
#[cfg(test)]
pub(crate) fn parity_dir(set: &str) -> PathBuf {
    let base = std::env::var("INFDIT_SHARED_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared").to_string());
    PathBuf::from(base).join(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    fn assert_bit_equal(a: &Tensor, b: &Tensor, what: &str) {
        assert_eq!(a.dims(), b.dims(), "{what}: shape");
        let (a, b) = (bits(a), bits(b));
        let n = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        let m = a.iter().zip(&b).map(|(x, y)| (f32::from_bits(*x) - f32::from_bits(*y)).abs()).fold(0f32, f32::max);
        assert_eq!(n, 0, "{what}: {n} values differ, max abs diff {m:e}");
    }

    fn case(set: &str, name: &str) -> std::collections::HashMap<String, Tensor> {
        let p = parity_dir(set).join(format!("{name}.safetensors"));
        candle_core::safetensors::load(&p, &Device::Cpu).unwrap_or_else(|e| panic!("cannot load {}: {e}", p.display()))
    }

    /// A fresh scratch directory under the target directory's tmp area.
    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("infdit-imageio-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn load_rgb_matches_reference_lr() {
        for (set, name, key) in [
            ("parity", "case_a", "lr"),
            ("parity", "case_b", "lr"),
            ("parity", "case_c", "lr"),
            ("parity2", "case_d", "lr"),
            ("parity2", "case_e", "lr_input"),
        ] {
            let png = parity_dir(set).join(format!("{name}_lr.png"));
            let t = load_rgb(&png, 1 << 30).unwrap();
            assert_bit_equal(&t, &case(set, name)[key], &format!("{name} {key}"));
        }
    }

    #[test]
    fn load_rgb_pixel_formula() {
        // Every 8-bit value through the documented formula, via a gray PNG (gray -> RGB).
        let d = scratch("formula");
        let g = image::GrayImage::from_fn(256, 1, |x, _| image::Luma([x as u8]));
        let p = d.join("g.png");
        g.save(&p).unwrap();
        let t = load_rgb(&p, 1000).unwrap();
        assert_eq!(t.dims(), &[1, 3, 1, 256]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for c in 0..3 {
            for x in 0..256 {
                let expect = (x as f32 / 255.0) * 2.0 - 1.0;
                assert_eq!(v[c * 256 + x].to_bits(), expect.to_bits());
            }
        }
        assert_eq!(v[0], -1.0);
        assert_eq!(v[255], 1.0);
        // RGBA: alpha dropped, not composited.
        let rgba = image::RgbaImage::from_pixel(2, 2, image::Rgba([255, 0, 51, 0]));
        let p = d.join("a.png");
        rgba.save(&p).unwrap();
        let v = load_rgb(&p, 1000).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = (51f32 / 255.0) * 2.0 - 1.0;
        assert_eq!(&v[..], &[1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, b, b, b, b]);
        // 16-bit: v / 65535.
        let g16 = image::ImageBuffer::<image::Luma<u16>, _>::from_raw(2, 1, vec![0u16, 65535]).unwrap();
        let p = d.join("g16.png");
        g16.save(&p).unwrap();
        let v = load_rgb(&p, 1000).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&v[..], &[-1.0, 1.0, -1.0, 1.0, -1.0, 1.0]);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn load_rgb_errors_name_the_file() {
        let d = scratch("errors");
        let png = parity_dir("parity").join("case_a_lr.png");
        let e = load_rgb(&png, 1000).unwrap_err();
        assert!(matches!(e, ImageIoError::TooLarge { pixels: 1024, limit: 1000, .. }));
        let msg = e.to_string();
        assert!(msg.contains("case_a_lr.png"), "{msg}");
        assert!(msg.contains("image is 32 x 32 = 1024 pixels, above the limit of 1000"), "{msg}");
        assert!(load_rgb(&png, 1024).is_ok());

        let missing = d.join("missing.png");
        let e = load_rgb(&missing, 1000).unwrap_err();
        assert!(matches!(e, ImageIoError::Io { .. }) && e.to_string().contains("missing.png"));

        let junk = d.join("junk.xyz");
        fs::write(&junk, b"definitely not an image").unwrap();
        let e = load_rgb(&junk, 1000).unwrap_err();
        assert!(matches!(e, ImageIoError::UnsupportedFormat { .. }), "{e}");
        assert!(e.to_string().contains("junk.xyz"));

        let bad = d.join("bad.png");
        let mut bytes = fs::read(&png).unwrap();
        bytes.truncate(bytes.len() / 2);
        fs::write(&bad, &bytes).unwrap();
        let e = load_rgb(&bad, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("bad.png"), "{e}");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn tensor_to_rgb8_matches_reference_png() {
        let t = case("parity", "case_a");
        let img = tensor_to_rgb8(&t["sample"]).unwrap();
        let reference = image::open(parity_dir("parity").join("case_a_sr.png")).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), reference.dimensions());
        let n = img.pixels().zip(reference.pixels()).filter(|(a, b)| a != b).count();
        assert_eq!(n, 0, "{n} pixels differ from case_a_sr.png");
        // The (3,H,W) form gives the same image.
        let img3 = tensor_to_rgb8(&t["sample"].squeeze(0).unwrap()).unwrap();
        assert_eq!(img3, img);
    }

    #[test]
    fn tensor_to_rgb8_truncates_and_rejects_nan() {
        // 1 pixel row: -1 -> 0, 1 -> 255, -0.996 -> 0.51 -> 0, 0 -> 127.5 -> 127, big -> 255.
        let vals = [-1.0f32, 1.0, -0.996, 0.0, 7.0, -3.0, f32::INFINITY, f32::NEG_INFINITY, 0.5];
        let t = Tensor::from_vec(vals.to_vec(), (3, 1, 3), &Device::Cpu).unwrap();
        let img = tensor_to_rgb8(&t).unwrap();
        assert_eq!(img.as_raw(), &vec![0, 127, 255, 255, 255, 0, 0, 0, 191]);
        let nan = Tensor::from_vec(vec![0.0f32, f32::NAN, 0.0], (1, 3, 1, 1), &Device::Cpu).unwrap();
        let e = tensor_to_rgb8(&nan).unwrap_err();
        assert!(e.to_string().contains("NaN"), "{e}");
        let wrong = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(tensor_to_rgb8(&wrong).is_err());
    }

    #[test]
    fn nearest_rounding_inverts_the_input_mapping() {
        let vals = [-1.0f32, 1.0, -0.996, 0.0, 7.0, -3.0, f32::INFINITY, f32::NEG_INFINITY, 0.5];
        let t = Tensor::from_vec(vals.to_vec(), (3, 1, 3), &Device::Cpu).unwrap();
        let img = tensor_to_rgb8_with(&t, Rounding::Nearest).unwrap();
        // -0.996 -> 0.51 -> 1, 0 -> 127.5 -> 128 (half away from zero), 0.5 -> 191.25 -> 191.
        assert_eq!(img.as_raw(), &vec![0, 128, 255, 255, 255, 0, 1, 0, 191]);
        // Every 8-bit value mapped to [-1, 1] as the loader does comes back unchanged.
        let all: Vec<f32> = (0..=255u8).flat_map(|v| [v, v, v]).map(|v| v as f32 / 255.0 * 2.0 - 1.0).collect();
        let planar = Tensor::from_vec(all, (1, 256, 3), &Device::Cpu).unwrap().permute((2, 0, 1)).unwrap();
        let img = tensor_to_rgb8_with(&planar, Rounding::Nearest).unwrap();
        assert!(img.pixels().enumerate().all(|(i, p)| p.0 == [i as u8; 3]));
        assert_eq!(tensor_to_rgb8_with(&planar, Rounding::Truncate).unwrap(), tensor_to_rgb8(&planar).unwrap());
    }

    fn partial_files(d: &Path) -> Vec<String> {
        fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".partial"))
            .collect()
    }

    #[test]
    fn atomic_write_roundtrip_and_guard() {
        let d = scratch("atomic");
        let img = RgbImage::from_fn(13, 7, |x, y| image::Rgb([x as u8 * 19, y as u8 * 31, 200]));
        let out = d.join("out.png");
        save_rgb8_atomic(&img, &out, &[]).unwrap();
        assert_eq!(image::open(&out).unwrap().to_rgb8(), img);
        // Overwriting an existing output is fine and still atomic.
        let img2 = RgbImage::from_pixel(3, 2, image::Rgb([1, 2, 3]));
        save_rgb8_atomic(&img2, &out, &[]).unwrap();
        assert_eq!(image::open(&out).unwrap().to_rgb8(), img2);
        assert!(partial_files(&d).is_empty(), "{:?}", partial_files(&d));

        // Other formats decode back (lossless ones exactly).
        for ext in ["webp", "tiff", "TIF"] {
            let p = d.join(format!("out.{ext}"));
            save_rgb8_atomic(&img, &p, &[]).unwrap();
            assert_eq!(image::open(&p).unwrap().to_rgb8(), img, "{ext}");
        }
        let jpg = d.join("out.jpg");
        save_rgb8_atomic(&img, &jpg, &[]).unwrap();
        assert_eq!(image::open(&jpg).unwrap().to_rgb8().dimensions(), (13, 7));
        let e = save_rgb8_atomic(&img, &d.join("out.gif"), &[]).unwrap_err();
        assert!(matches!(e, ImageIoError::UnsupportedFormat { .. }), "{e}");

        // Refuses to overwrite the input, also through a different spelling of the path.
        let input = d.join("in.png");
        save_rgb8_atomic(&img2, &input, &[]).unwrap();
        let before = fs::read(&input).unwrap();
        let alias = d.join(".").join("sub").join("..").join("in.png");
        fs::create_dir_all(d.join("sub")).unwrap();
        for target in [&input, &alias] {
            let e = save_rgb8_atomic(&img, target, &[&input]).unwrap_err();
            assert!(matches!(e, ImageIoError::WouldOverwriteInput { .. }), "{e}");
        }
        assert_eq!(fs::read(&input).unwrap(), before);
        // A different output next to it is allowed.
        save_rgb8_atomic(&img, &d.join("in_x4.png"), &[&input]).unwrap();
        assert!(partial_files(&d).is_empty(), "{:?}", partial_files(&d));
        let _ = fs::remove_dir_all(&d);
    }
}
