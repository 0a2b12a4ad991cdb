//! [`load_image`]: real image files of any supported format and bit depth, with alpha,
//! metadata and orientation, and hostile input refused cleanly.

use std::fs::File;
use std::io::{BufReader, ErrorKind};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use candle_core::{Device, Tensor};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

use super::fill::fill_planes;
use super::{ImageIoError, meta, one_line};

/// Resource limits for [`load_image`], checked against the file header before any pixel is
/// decoded (decompression bombs: a few kilobytes of PNG or WebP can announce gigapixels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadLimits {
    /// Largest accepted `width * height`. Larger images are refused from the header.
    pub max_pixels: u64,
    /// Largest total allocation the decoder may make: the decoded buffer announced by the
    /// header (checked before decoding) and, for the decoders that honour `image`'s
    /// `Limits::max_alloc` (PNG chunks, TIFF strips, WebP), their intermediate buffers too.
    /// The f32 tensors [`load_image`] builds afterwards (16 bytes per pixel) are not counted.
    pub max_alloc_bytes: u64,
}

impl LoadLimits {
    /// Slack added to the decoded buffer in [`LoadLimits::for_pixels`], for the decoders'
    /// working memory (metadata chunks, ICC profiles, compressed strips, row buffers): 256 MiB,
    /// the same slack [`super::load_rgb`] has always given.
    pub const ALLOC_SLACK_BYTES: u64 = 256 << 20;
    /// Largest ICC profile accepted (real profiles are kilobytes to a few megabytes); a larger
    /// one, or a compressed one that inflates past it, is refused before it is inflated.
    pub const MAX_ICC_BYTES: u64 = 16 << 20;
    /// Largest EXIF block accepted.
    pub const MAX_EXIF_BYTES: u64 = 16 << 20;
    /// Most bytes of metadata chunks in a PNG (everything but the image data: text, ICC, EXIF,
    /// private chunks), counted from the chunk lengths before decoding.
    pub const MAX_METADATA_BYTES: u64 = 64 << 20;

    /// Limits for images of up to `max_pixels` pixels: the allocation cap is what the largest
    /// decoded pixel format needs for that many pixels (RGBA 32-bit float, 16 bytes per pixel)
    /// plus [`LoadLimits::ALLOC_SLACK_BYTES`].
    pub fn for_pixels(max_pixels: u64) -> Self {
        Self { max_pixels, max_alloc_bytes: max_pixels.saturating_mul(16).saturating_add(Self::ALLOC_SLACK_BYTES) }
    }
}

impl Default for LoadLimits {
    /// 64 Mi pixels (8192 x 8192, more than a 60-megapixel camera frame; its 4x upscale is
    /// already a gigapixel) and the matching [`LoadLimits::for_pixels`] allocation cap
    /// (1.25 GiB).
    fn default() -> Self {
        Self::for_pixels(1 << 26)
    }
}

/// A decoded image file, ready for the network, with what is needed to write the result back
/// the way the input was.
#[derive(Clone, Debug)]
pub struct LoadedImage {
    /// The colour, `(1, 3, H, W)` f32 in `[-1, 1]` on the CPU, upright (EXIF orientation
    /// applied). The mapping of the samples is [`super::load_rgb`]'s, bit for bit (`v / 255`,
    /// `v / 65535`, gray replicated to 3 channels), except that float samples are clamped to
    /// `[0, 1]` first and fully transparent pixels hold the fill of
    /// [`super::fill_transparent`] instead of the file's colour.
    pub rgb: Tensor,
    /// The alpha plane, `(1, 1, H, W)` f32 in `[0, 1]` (`a / 255` or `a / 65535`), present
    /// whenever the file has an alpha channel (including PNG `tRNS` transparency, palette or
    /// not), even when every pixel is opaque.
    pub alpha: Option<Tensor>,
    /// Bits per sample to write the result with: 16 for 16-bit and floating-point files (the
    /// closest integer depth that keeps their precision), 8 for everything else (8-bit, and
    /// 1/2/4-bit files, which are expanded to 8 bits).
    pub bit_depth: u8,
    /// The file is gray or gray + alpha (its colour planes are equal).
    pub grayscale: bool,
    /// The embedded ICC profile, as stored (PNG `iCCP`, JPEG `APP2`, WebP `ICCP`, TIFF tag
    /// 34675). The pixels are not converted: they stay in the profile's colour space, so the
    /// profile must be written with the result (see [`super::SaveOptions::icc`]).
    pub icc: Option<Vec<u8>>,
    /// The EXIF block (TIFF-structured, starting `II*\0` or `MM\0*`; a leading `Exif\0\0` is
    /// removed), from PNG `eXIf` (before or after the image data), JPEG `APP1` or WebP `EXIF`,
    /// with its orientation tag set to 1 (upright) since the orientation has been applied to
    /// the pixels. `None` for TIFF (whose EXIF lives in the main IFD and is not extracted) and
    /// BMP, and when the block is not TIFF-structured (unreadable by any program).
    pub exif: Option<Vec<u8>>,
    /// The format detected from the file's content.
    pub source_format: ImageFormat,
}

impl LoadedImage {
    /// An 8-bit RGB image without alpha or metadata from its colour, `(1, 3, H, W)` f32 in
    /// `[-1, 1]` (an image made in memory rather than read from a file).
    pub fn from_rgb(rgb: Tensor) -> Self {
        Self {
            rgb,
            alpha: None,
            bit_depth: 8,
            grayscale: false,
            icc: None,
            exif: None,
            source_format: ImageFormat::Png,
        }
    }
}

/// The formats [`load_image`] reads (those this crate's `image` build decodes).
const SUPPORTED: [ImageFormat; 5] =
    [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP, ImageFormat::Tiff, ImageFormat::Bmp];

/// Prefix some writers (WebP, JPEG-style) put before the TIFF header of an EXIF block.
const EXIF_PREFIX: &[u8] = b"Exif\0\0";

/// Load an image file for upscaling: colour, alpha, bit depth, and the metadata to carry over.
///
/// * Formats: PNG, JPEG, WebP, TIFF, BMP, detected from the content (so a PNG named `.jpg`
///   loads); the extension is only a fallback for content no signature matches. 1/2/4/8/16-bit
///   samples, gray, gray + alpha, RGB, RGBA, palettes (expanded; `tRNS` becomes alpha),
///   CMYK JPEG (converted to RGB by the decoder), float TIFF.
/// * Orientation: the EXIF orientation (or the TIFF orientation tag) is applied to the pixels,
///   all 8 values, and reset to 1 in the returned [`LoadedImage::exif`], so that a viewer does
///   not rotate the result a second time.
/// * Transparency: the colour of fully transparent pixels is replaced by a fill from the
///   nearest visible pixels ([`super::fill_transparent`]); the alpha plane is returned
///   untouched, to be upscaled separately.
/// * Limits: the header's `width * height` is checked against [`LoadLimits::max_pixels`] and the
///   decoded buffer size against [`LoadLimits::max_alloc_bytes`] before decoding; the latter is
///   also handed to the decoders as `image::Limits::max_alloc`, so a header that lies cannot
///   make them allocate without bound.
/// * Errors: every error names `path` and says what is wrong in one line: unreadable or empty
///   file, unknown or unsupported format, zero size, too large, truncated or corrupt data,
///   memory limit exceeded. A panic inside a decoder is caught and reported as
///   [`ImageIoError::DecoderPanic`] (the default panic hook still prints it to stderr).
pub fn load_image(path: &Path, limits: &LoadLimits) -> Result<LoadedImage, ImageIoError> {
    let (mut reader, format) = open_reader(path)?;
    let mut decoder_limits = Limits::default();
    decoder_limits.max_alloc = Some(limits.max_alloc_bytes);
    reader.limits(decoder_limits);

    let decoded = catch_unwind(AssertUnwindSafe(|| decode(path, format, reader, limits)))
        .map_err(|panic| decoder_panic(path, panic))??;
    let Decoded { mut img, icc, exif, orientation } = decoded;
    img.apply_orientation(orientation);
    let planes = to_planes(&img).map_err(|reason| ImageIoError::BadTensor { path: path.to_path_buf(), reason })?;
    let Planes { mut rgb, alpha, bit_depth, grayscale } = planes;
    let (w, h) = (img.width() as usize, img.height() as usize);
    drop(img);
    if let Some(a) = &alpha {
        fill_planes(&mut rgb, 3, a, w, h);
    }
    let tensor_err = |e: candle_core::Error| ImageIoError::BadTensor {
        path: path.to_path_buf(),
        reason: format!("cannot build tensor: {e}"),
    };
    let rgb = Tensor::from_vec(rgb, (1, 3, h, w), &Device::Cpu).map_err(tensor_err)?;
    let alpha = alpha.map(|a| Tensor::from_vec(a, (1, 1, h, w), &Device::Cpu)).transpose().map_err(tensor_err)?;
    Ok(LoadedImage { rgb, alpha, bit_depth, grayscale, icc, exif, source_format: format })
}

/// What [`probe`] reads from an image file's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// Width as [`load_image`] returns the image (EXIF orientation applied).
    pub width: u32,
    /// Height as [`load_image`] returns the image (EXIF orientation applied).
    pub height: u32,
    /// Whether the pixels carry an alpha channel.
    pub has_alpha: bool,
    /// Whether the pixels are gray.
    pub grayscale: bool,
    /// 8 or 16 (32-bit float samples count as 16, as [`LoadedImage::bit_depth`]).
    pub bit_depth: u8,
    /// The file's format.
    pub format: ImageFormat,
    /// The EXIF (or TIFF) orientation that [`load_image`] applies.
    pub orientation: Orientation,
}

/// The size, alpha and orientation of an image file from its header and metadata, without
/// decoding pixels: the same size [`load_image`] gives, including an EXIF orientation that a
/// PNG stores after its image data. Refuses what [`load_image`] refuses from the header (not a
/// regular file, unknown format, zero size, more than `limits.max_pixels` pixels).
pub fn probe(path: &Path, limits: &LoadLimits) -> Result<ImageInfo, ImageIoError> {
    let (mut reader, format) = open_reader(path)?;
    let mut decoder_limits = Limits::default();
    decoder_limits.max_alloc = Some(limits.max_alloc_bytes);
    reader.limits(decoder_limits);
    catch_unwind(AssertUnwindSafe(|| -> Result<ImageInfo, ImageIoError> {
        if format == ImageFormat::Png
            && let Some((width, height)) = meta::png_ihdr_size(path)
        {
            check_size(path, width, height, limits)?;
        }
        let mut decoder = reader.into_decoder().map_err(|e| decode_error(path, e))?;
        let (w, h) = decoder.dimensions();
        check_size(path, w, h, limits)?;
        let color = decoder.color_type();
        let mut exif = decoder.exif_metadata().map_err(|e| decode_error(path, e))?;
        if exif.is_none() && format == ImageFormat::Png {
            exif = meta::png_exif(path, LoadLimits::MAX_EXIF_BYTES.min(limits.max_alloc_bytes));
        }
        let orientation = match exif_block(exif) {
            Some(e) => Orientation::from_exif_chunk(&e).unwrap_or(Orientation::NoTransforms),
            None => decoder.orientation().map_err(|e| decode_error(path, e))?,
        };
        use image::metadata::Orientation as O;
        let swap = matches!(orientation, O::Rotate90 | O::Rotate270 | O::Rotate90FlipH | O::Rotate270FlipH);
        let (width, height) = if swap { (h, w) } else { (w, h) };
        use image::ColorType as C;
        Ok(ImageInfo {
            width,
            height,
            has_alpha: color.has_alpha(),
            grayscale: matches!(color, C::L8 | C::La8 | C::L16 | C::La16),
            bit_depth: if matches!(color, C::L8 | C::La8 | C::Rgb8 | C::Rgba8) { 8 } else { 16 },
            format,
            orientation,
        })
    }))
    .map_err(|panic| decoder_panic(path, panic))?
}

/// A decoder panic as [`ImageIoError::DecoderPanic`].
fn decoder_panic(path: &Path, panic: Box<dyn std::any::Any + Send>) -> ImageIoError {
    ImageIoError::DecoderPanic {
        path: path.to_path_buf(),
        message: panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into()),
    }
}

/// An EXIF block as found in a file, `Exif\0\0` prefix removed; `None` unless TIFF-structured
/// (anything else is not EXIF any program could read back).
fn exif_block(exif: Option<Vec<u8>>) -> Option<Vec<u8>> {
    exif.map(|mut e| {
        if e.starts_with(EXIF_PREFIX) {
            e.drain(..EXIF_PREFIX.len());
        }
        e
    })
    .filter(|e| e.starts_with(b"II*\0") || e.starts_with(b"MM\0*"))
}

/// Opens an image file for decoding: a regular, non-empty file of a supported format.
fn open_reader(path: &Path) -> Result<(ImageReader<BufReader<File>>, ImageFormat), ImageIoError> {
    // Before opening: opening a FIFO blocks until a writer comes, a device never ends.
    crate::files::check_regular(path).map_err(|e| ImageIoError::io(path, e))?;
    let file = File::open(path).map_err(|e| ImageIoError::io(path, e))?;
    let len = file.metadata().map_err(|e| ImageIoError::io(path, e))?.len();
    if len == 0 {
        return Err(ImageIoError::io(path, std::io::Error::new(ErrorKind::InvalidData, "file is empty")));
    }
    let mut reader = ImageReader::new(BufReader::new(file));
    if let Ok(fmt) = ImageFormat::from_path(path) {
        reader.set_format(fmt);
    }
    let reader = reader.with_guessed_format().map_err(|e| ImageIoError::io(path, e))?;
    let format = match reader.format() {
        Some(f) if SUPPORTED.contains(&f) => f,
        Some(f) => {
            return Err(ImageIoError::UnsupportedFormat {
                path: path.to_path_buf(),
                reason: format!(
                    "{} files are not supported (PNG, JPEG, WebP, TIFF and BMP are)",
                    f.extensions_str().first().unwrap_or(&"this").to_uppercase()
                ),
            });
        }
        None => {
            return Err(ImageIoError::UnsupportedFormat {
                path: path.to_path_buf(),
                reason: "not an image: neither the content nor the extension names a known \
                         format (PNG, JPEG, WebP, TIFF, BMP)"
                    .into(),
            });
        }
    };
    Ok((reader, format))
}

/// What [`decode`] gets out of a file.
struct Decoded {
    img: DynamicImage,
    icc: Option<Vec<u8>>,
    exif: Option<Vec<u8>>,
    orientation: Orientation,
}

/// The header checks, the metadata and the pixels (everything that runs decoder code, so
/// [`load_image`] can catch a decoder panic around it).
fn decode(
    path: &Path,
    format: ImageFormat,
    reader: ImageReader<BufReader<File>>,
    limits: &LoadLimits,
) -> Result<Decoded, ImageIoError> {
    if format == ImageFormat::Png
        && let Some((width, height)) = meta::png_ihdr_size(path)
    {
        check_size(path, width, height, limits)?;
        meta::png_check_metadata(path)
            .map_err(|reason| ImageIoError::LimitExceeded { path: path.to_path_buf(), reason })?;
    }
    let mut decoder = reader.into_decoder().map_err(|e| decode_error(path, e))?;
    if format == ImageFormat::Tiff
        && matches!(decoder.color_type(), image::ColorType::Rgb32F | image::ColorType::Rgba32F)
        && !meta::tiff_has_tag(path, meta::TIFF_SAMPLE_FORMAT)
    {
        // Without a SampleFormat tag the samples are unsigned integers, which `image` would
        // read as float bits.
        return Err(ImageIoError::UnsupportedFormat {
            path: path.to_path_buf(),
            reason: "32-bit unsigned-integer TIFF samples are not supported (8- or 16-bit integer and 32-bit \
                     float samples are)"
                .into(),
        });
    }
    let (width, height) = decoder.dimensions();
    check_size(path, width, height, limits)?;
    let bytes = decoder.total_bytes();
    if bytes > limits.max_alloc_bytes {
        return Err(ImageIoError::LimitExceeded {
            path: path.to_path_buf(),
            reason: format!(
                "decoding this {width} x {height} image needs {bytes} bytes, above the limit of {}",
                limits.max_alloc_bytes
            ),
        });
    }
    let mut icc = decoder.icc_profile().map_err(|e| decode_error(path, e))?.filter(|p| !p.is_empty());
    if icc.is_none() && format == ImageFormat::Tiff {
        // `image` 0.25 caps the size of any TIFF tag value at the size of the decoded image
        // (its `decoding_buffer_size`), so the profile of a small TIFF reads as absent.
        icc = meta::tiff_icc(path, LoadLimits::MAX_ICC_BYTES.min(limits.max_alloc_bytes));
    }
    let too_big = |what: &str, n: usize, max: u64| ImageIoError::LimitExceeded {
        path: path.to_path_buf(),
        reason: format!("the {what} is {n} bytes, above the limit of {max} bytes"),
    };
    if let Some(p) = &icc
        && p.len() as u64 > LoadLimits::MAX_ICC_BYTES
    {
        return Err(too_big("ICC profile", p.len(), LoadLimits::MAX_ICC_BYTES));
    }
    let mut exif = decoder.exif_metadata().map_err(|e| decode_error(path, e))?;
    if exif.is_none() && format == ImageFormat::Png {
        // `image` only sees an `eXIf` chunk placed before the image data.
        exif = meta::png_exif(path, LoadLimits::MAX_EXIF_BYTES.min(limits.max_alloc_bytes));
    }
    if let Some(e) = &exif
        && e.len() as u64 > LoadLimits::MAX_EXIF_BYTES
    {
        return Err(too_big("EXIF block", e.len(), LoadLimits::MAX_EXIF_BYTES));
    }
    let mut exif = exif_block(exif);
    let orientation = match &mut exif {
        // Parsed here rather than with `decoder.orientation()` so that a block that had the
        // `Exif\0\0` prefix is read too; the tag is reset to 1 in the same pass.
        Some(e) => Orientation::remove_from_exif_chunk(e).unwrap_or(Orientation::NoTransforms),
        // TIFF keeps the orientation in its own tag; the other formats have none without EXIF.
        None => decoder.orientation().map_err(|e| decode_error(path, e))?,
    };
    if format == ImageFormat::Jpeg && !meta::jpeg_reaches_eoi(path) {
        return Err(ImageIoError::Truncated {
            path: path.to_path_buf(),
            detail: "the JPEG data ends before its end-of-image marker".into(),
        });
    }
    let img = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(path, e))?;
    Ok(Decoded { img, icc, exif, orientation })
}

/// Refuse a zero dimension or more than `limits.max_pixels` pixels.
pub(super) fn check_size(path: &Path, width: u32, height: u32, limits: &LoadLimits) -> Result<(), ImageIoError> {
    if width == 0 || height == 0 {
        return Err(ImageIoError::ZeroSize { path: path.to_path_buf(), width, height });
    }
    let pixels = width as u64 * height as u64;
    if pixels > limits.max_pixels {
        return Err(ImageIoError::TooLarge {
            path: path.to_path_buf(),
            width,
            height,
            pixels,
            limit: limits.max_pixels,
        });
    }
    Ok(())
}

/// A decoder error as an [`ImageIoError`]; an unexpected end of the data becomes
/// [`ImageIoError::Truncated`].
fn decode_error(path: &Path, e: image::ImageError) -> ImageIoError {
    match e {
        image::ImageError::IoError(io) if io.kind() == ErrorKind::UnexpectedEof => {
            ImageIoError::Truncated { path: path.to_path_buf(), detail: io.to_string() }
        }
        e => {
            let text = e.to_string();
            let lower = text.to_ascii_lowercase();
            if lower.contains("eof") || lower.contains("end of file") || lower.contains("truncat") {
                ImageIoError::Truncated { path: path.to_path_buf(), detail: one_line(&text) }
            } else {
                ImageIoError::codec(path, "decode", e)
            }
        }
    }
}

/// The planar form of a decoded image.
struct Planes {
    /// 3 planes in `[-1, 1]`.
    rgb: Vec<f32>,
    /// 1 plane in `[0, 1]`.
    alpha: Option<Vec<f32>>,
    bit_depth: u8,
    grayscale: bool,
}

/// Split a decoded image into planes with [`super::load_rgb`]'s sample mapping. Float samples
/// are clamped to `[0, 1]`; a NaN is an error (it would poison the whole diffusion).
fn to_planes(img: &DynamicImage) -> Result<Planes, String> {
    use image::ColorType as C;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let n = w * h;
    let mut rgb = vec![0f32; 3 * n];
    let color = img.color();
    let mut alpha = color.has_alpha().then(|| vec![0f32; n]);
    // `x * 2 - 1` on the `[0, 1]` value, the same two f32 operations as `load_rgb`.
    let mut put = |i: usize, c: [f32; 3], a: f32| {
        for (k, v) in c.into_iter().enumerate() {
            rgb[k * n + i] = v * 2.0 - 1.0;
        }
        if let Some(al) = alpha.as_mut() {
            al[i] = a;
        }
    };
    let u8f = |v: u8| v as f32 / 255.0;
    let u16f = |v: u16| v as f32 / 65535.0;
    let grayscale = matches!(color, C::L8 | C::La8 | C::L16 | C::La16);
    let bit_depth = match color {
        C::L8 | C::La8 | C::Rgb8 | C::Rgba8 => 8,
        _ => 16,
    };
    match img {
        DynamicImage::ImageLuma8(b) => {
            for (i, p) in b.pixels().enumerate() {
                put(i, [u8f(p.0[0]); 3], 1.0);
            }
        }
        DynamicImage::ImageLumaA8(b) => {
            for (i, p) in b.pixels().enumerate() {
                put(i, [u8f(p.0[0]); 3], u8f(p.0[1]));
            }
        }
        DynamicImage::ImageRgb8(b) => {
            for (i, p) in b.pixels().enumerate() {
                put(i, p.0.map(u8f), 1.0);
            }
        }
        DynamicImage::ImageRgba8(b) => {
            for (i, p) in b.pixels().enumerate() {
                let [r, g, bl, a] = p.0;
                put(i, [r, g, bl].map(u8f), u8f(a));
            }
        }
        DynamicImage::ImageLuma16(b) => {
            for (i, p) in b.pixels().enumerate() {
                put(i, [u16f(p.0[0]); 3], 1.0);
            }
        }
        DynamicImage::ImageLumaA16(b) => {
            for (i, p) in b.pixels().enumerate() {
                put(i, [u16f(p.0[0]); 3], u16f(p.0[1]));
            }
        }
        DynamicImage::ImageRgb16(b) => {
            for (i, p) in b.pixels().enumerate() {
                put(i, p.0.map(u16f), 1.0);
            }
        }
        DynamicImage::ImageRgba16(b) => {
            for (i, p) in b.pixels().enumerate() {
                let [r, g, bl, a] = p.0;
                put(i, [r, g, bl].map(u16f), u16f(a));
            }
        }
        other => {
            // Float (and any future) formats: through RGBA f32, NaN refused, clamped.
            for (i, p) in other.to_rgba32f().pixels().enumerate() {
                if let Some(c) = p.0.iter().position(|v| v.is_nan()) {
                    return Err(format!("NaN sample in channel {c} at pixel (row {}, column {})", i / w, i % w));
                }
                let [r, g, bl, a] = p.0.map(|v| v.clamp(0.0, 1.0));
                put(i, [r, g, bl], a);
            }
        }
    }
    Ok(Planes { rgb, alpha, bit_depth, grayscale })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::imageio::{load_rgb, parity_dir};
    use std::fs;
    use std::path::PathBuf;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("infdit-load-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// A minimal little-endian EXIF block with one IFD entry: Orientation = `o`.
    pub(crate) fn exif_with_orientation(o: u16) -> Vec<u8> {
        let mut e = b"II*\0".to_vec();
        e.extend_from_slice(&8u32.to_le_bytes()); // IFD0 at offset 8
        e.extend_from_slice(&1u16.to_le_bytes()); // 1 entry
        e.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
        e.extend_from_slice(&3u16.to_le_bytes()); // SHORT
        e.extend_from_slice(&1u32.to_le_bytes()); // count 1
        e.extend_from_slice(&o.to_le_bytes());
        e.extend_from_slice(&[0, 0]);
        e.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
        e
    }

    /// Write `img` as a PNG carrying `exif`.
    fn png_with_exif(path: &Path, img: &image::RgbImage, exif: Vec<u8>) {
        use image::ImageEncoder;
        let mut buf = Vec::new();
        let mut enc = image::codecs::png::PngEncoder::new(&mut buf);
        enc.set_exif_metadata(exif).unwrap();
        enc.write_image(img.as_raw(), img.width(), img.height(), image::ExtendedColorType::Rgb8).unwrap();
        fs::write(path, buf).unwrap();
    }

    /// Pixel `p` of an RGB tensor as 8-bit values (exact for 8-bit inputs).
    fn px(t: &Tensor, y: usize, x: usize) -> [u8; 3] {
        let (h, w) = (t.dims()[2], t.dims()[3]);
        let v = vals(t);
        [0, 1, 2].map(|c| ((v[c * h * w + y * w + x] + 1.0) * 127.5).round() as u8)
    }

    #[test]
    fn all_eight_orientations() {
        // Stored 3 wide, 2 high, with distinct pixels:
        //   a b c
        //   d e f
        // Each EXIF orientation says how the stored image must be transformed for display.
        let d = scratch("orient");
        let stored = image::RgbImage::from_fn(3, 2, |x, y| image::Rgb([(10 * (3 * y + x + 1)) as u8, 0, 0]));
        let (a, b, c, dd, e, f) = (10, 20, 30, 40, 50, 60);
        let expect: [(u16, Vec<Vec<u8>>); 8] = [
            (1, vec![vec![a, b, c], vec![dd, e, f]]),
            (2, vec![vec![c, b, a], vec![f, e, dd]]),       // mirror left-right
            (3, vec![vec![f, e, dd], vec![c, b, a]]),       // rotate 180
            (4, vec![vec![dd, e, f], vec![a, b, c]]),       // mirror top-bottom
            (5, vec![vec![a, dd], vec![b, e], vec![c, f]]), // transpose
            (6, vec![vec![dd, a], vec![e, b], vec![f, c]]), // rotate 90 clockwise
            (7, vec![vec![f, c], vec![e, b], vec![dd, a]]), // transverse
            (8, vec![vec![c, f], vec![b, e], vec![a, dd]]), // rotate 90 counter-clockwise
        ];
        for (o, rows) in expect {
            let p = d.join(format!("o{o}.png"));
            png_with_exif(&p, &stored, exif_with_orientation(o));
            let img = load_image(&p, &LoadLimits::default()).unwrap();
            let (h, w) = (rows.len(), rows[0].len());
            assert_eq!(img.rgb.dims(), &[1, 3, h, w], "orientation {o}");
            for (y, row) in rows.iter().enumerate() {
                for (x, &r) in row.iter().enumerate() {
                    assert_eq!(px(&img.rgb, y, x)[0], r, "orientation {o} at ({y}, {x})");
                }
            }
            // The kept EXIF says "upright" now, and is otherwise unchanged.
            let exif = img.exif.unwrap();
            assert_eq!(Orientation::from_exif_chunk(&exif), Some(Orientation::NoTransforms));
            let mut original = exif_with_orientation(o);
            let _ = Orientation::remove_from_exif_chunk(&mut original);
            assert_eq!(exif, original);
        }
        let _ = fs::remove_dir_all(&d);
    }

    /// A hand-made little-endian 3 x 2 RGB8 TIFF (uncompressed, one strip) with an Orientation
    /// tag: `image`'s TIFF encoder cannot write one.
    fn tiff_with_orientation(px: &[u8; 18], o: u16) -> Vec<u8> {
        // Header (8) + 18 pixel bytes + 6 bytes of BitsPerSample = 32, then the IFD.
        let mut t = b"II*\0".to_vec();
        t.extend_from_slice(&32u32.to_le_bytes());
        t.extend_from_slice(px); // offset 8
        for _ in 0..3 {
            t.extend_from_slice(&8u16.to_le_bytes()); // offset 26: BitsPerSample values
        }
        // (tag, type, count, value): SHORT = 3, LONG = 4; sorted by tag.
        let entries: [(u16, u16, u32, u32); 10] = [
            (256, 3, 1, 3),        // ImageWidth
            (257, 3, 1, 2),        // ImageLength
            (258, 3, 3, 26),       // BitsPerSample -> offset 26
            (259, 3, 1, 1),        // Compression: none
            (262, 3, 1, 2),        // PhotometricInterpretation: RGB
            (273, 4, 1, 8),        // StripOffsets
            (274, 3, 1, o as u32), // Orientation
            (277, 3, 1, 3),        // SamplesPerPixel
            (278, 3, 1, 2),        // RowsPerStrip
            (279, 4, 1, 18),       // StripByteCounts
        ];
        t.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        for (tag, ty, count, value) in entries {
            t.extend_from_slice(&tag.to_le_bytes());
            t.extend_from_slice(&ty.to_le_bytes());
            t.extend_from_slice(&count.to_le_bytes());
            t.extend_from_slice(&value.to_le_bytes());
        }
        t.extend_from_slice(&0u32.to_le_bytes());
        t
    }

    #[test]
    fn orientation_in_jpeg_webp_and_tiff() {
        use image::ImageEncoder;
        let d = scratch("orient-fmt");
        let lim = LoadLimits::default();
        let stored = image::RgbImage::from_fn(3, 2, |x, y| image::Rgb([(10 * (3 * y + x + 1)) as u8, 0, 0]));
        // Orientation 6 (rotate 90 clockwise): rows [d a], [e b], [f c].
        let expect = [[40u8, 10], [50, 20], [60, 30]];
        // WebP (lossless: exact) and TIFF (tag, no EXIF block).
        let mut webp = Vec::new();
        let mut enc = image::codecs::webp::WebPEncoder::new_lossless(&mut webp);
        enc.set_exif_metadata(exif_with_orientation(6)).unwrap();
        enc.write_image(stored.as_raw(), 3, 2, image::ExtendedColorType::Rgb8).unwrap();
        fs::write(d.join("o.webp"), webp).unwrap();
        let raw: [u8; 18] = stored.as_raw()[..].try_into().unwrap();
        fs::write(d.join("o.tiff"), tiff_with_orientation(&raw, 6)).unwrap();
        for f in ["o.webp", "o.tiff"] {
            let img = load_image(&d.join(f), &lim).unwrap();
            assert_eq!(img.rgb.dims(), &[1, 3, 3, 2], "{f}");
            for (y, row) in expect.iter().enumerate() {
                for (x, &r) in row.iter().enumerate() {
                    assert_eq!(px(&img.rgb, y, x)[0], r, "{f} ({y}, {x})");
                }
            }
        }
        assert!(load_image(&d.join("o.tiff"), &lim).unwrap().exif.is_none());
        // JPEG (lossy: the shape, and the kept EXIF reset to upright).
        let big = image::RgbImage::from_fn(16, 8, |x, _| image::Rgb([(x * 15) as u8, 0, 0]));
        let mut jpg = Vec::new();
        let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 95);
        enc.set_exif_metadata(exif_with_orientation(8)).unwrap();
        enc.write_image(big.as_raw(), 16, 8, image::ExtendedColorType::Rgb8).unwrap();
        fs::write(d.join("o.jpg"), jpg).unwrap();
        let img = load_image(&d.join("o.jpg"), &lim).unwrap();
        assert_eq!(img.rgb.dims(), &[1, 3, 16, 8]);
        // Rotated 90 counter-clockwise: the bright right edge is now the top row.
        assert!(px(&img.rgb, 0, 4)[0] > 200 && px(&img.rgb, 15, 4)[0] < 30);
        let e = img.exif.unwrap();
        assert_eq!(Orientation::from_exif_chunk(&e), Some(Orientation::NoTransforms));
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn exif_prefix_is_removed_and_read() {
        let d = scratch("prefix");
        let stored = image::RgbImage::from_fn(3, 2, |x, y| image::Rgb([(10 * (3 * y + x + 1)) as u8, 0, 0]));
        let mut exif = EXIF_PREFIX.to_vec();
        exif.extend(exif_with_orientation(6));
        let p = d.join("prefixed.png");
        png_with_exif(&p, &stored, exif);
        let img = load_image(&p, &LoadLimits::default()).unwrap();
        assert_eq!(img.rgb.dims(), &[1, 3, 3, 2]);
        assert_eq!(px(&img.rgb, 0, 0)[0], 40);
        assert!(img.exif.unwrap().starts_with(b"II*\0"));
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn same_values_as_load_rgb_for_opaque_files() {
        for (set, name) in [("parity", "case_a"), ("parity2", "case_d")] {
            let p = parity_dir(set).join(format!("{name}_lr.png"));
            let img = load_image(&p, &LoadLimits::default()).unwrap();
            let reference = load_rgb(&p, 1 << 30).unwrap();
            let (a, b) = (vals(&img.rgb), vals(&reference));
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name}");
            assert_eq!(img.bit_depth, 8);
            assert!(img.alpha.is_none() && !img.grayscale);
            assert_eq!(img.source_format, ImageFormat::Png);
        }
    }

    #[test]
    fn formats_depths_and_channels() {
        let d = scratch("formats");
        let lim = LoadLimits::default();
        // Gray 8-bit, as JPEG (lossy: only the flags), and as PNG (exact).
        let g = image::GrayImage::from_fn(8, 8, |x, y| image::Luma([(x * 30 + y) as u8]));
        g.save(d.join("g.png")).unwrap();
        g.save(d.join("g.jpg")).unwrap();
        for f in ["g.png", "g.jpg"] {
            let img = load_image(&d.join(f), &lim).unwrap();
            assert!(img.grayscale && img.alpha.is_none() && img.bit_depth == 8, "{f}");
            let v = vals(&img.rgb);
            assert_eq!(v[..64], v[64..128], "{f}: gray replicated");
        }
        // 16-bit gray + alpha PNG: 16 bits, alpha kept exactly.
        let la = image::ImageBuffer::<image::LumaA<u16>, _>::from_fn(3, 1, |x, _| {
            image::LumaA([x as u16 * 1000, 65535 - x as u16])
        });
        la.save(d.join("la16.png")).unwrap();
        let img = load_image(&d.join("la16.png"), &lim).unwrap();
        assert!(img.grayscale && img.bit_depth == 16);
        let a = vals(img.alpha.as_ref().unwrap());
        assert_eq!(a, vec![1.0, 65534.0 / 65535.0, 65533.0 / 65535.0]);
        assert_eq!(vals(&img.rgb)[1], 1000.0 / 65535.0 * 2.0 - 1.0);
        // BMP and WebP (lossless) RGB.
        let rgb = image::RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 50, y as u8 * 60, 7]));
        for f in ["c.bmp", "c.webp", "c.tiff"] {
            rgb.save(d.join(f)).unwrap();
            let img = load_image(&d.join(f), &lim).unwrap();
            assert_eq!(px(&img.rgb, 3, 4), [200, 180, 7], "{f}");
            assert!(!img.grayscale && img.alpha.is_none() && img.bit_depth == 8, "{f}");
        }
        // A PNG named .jpg loads as PNG, without complaint.
        fs::copy(d.join("la16.png"), d.join("really_png.jpg")).unwrap();
        let img = load_image(&d.join("really_png.jpg"), &lim).unwrap();
        assert_eq!(img.source_format, ImageFormat::Png);
        // Float TIFF: 16 bits, clamped.
        let f32img = image::Rgb32FImage::from_raw(2, 1, vec![-0.5, 0.25, 1.5, 0.0, 1.0, 0.5]).unwrap();
        DynamicImage::ImageRgb32F(f32img).save(d.join("f.tiff")).unwrap();
        let img = load_image(&d.join("f.tiff"), &lim).unwrap();
        assert_eq!(img.bit_depth, 16);
        assert_eq!(vals(&img.rgb), vec![-1.0, -1.0, -0.5, 1.0, 1.0, 0.0]);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn palette_with_trns_becomes_alpha_and_is_filled() {
        // A hand-made 4 x 1 palette PNG, 2 bits per index: palette [red, black], tRNS [255, 0]
        // (entry 1 fully transparent); indices 0 1 1 0.
        let d = scratch("palette");
        let p = d.join("pal.png");
        fs::write(&p, palette_png()).unwrap();
        let img = load_image(&p, &LoadLimits::default()).unwrap();
        assert_eq!(img.bit_depth, 8);
        assert!(!img.grayscale);
        assert_eq!(vals(img.alpha.as_ref().unwrap()), vec![1.0, 0.0, 0.0, 1.0]);
        // The transparent black pixels took the colour of their red neighbours.
        for x in 0..4 {
            assert_eq!(px(&img.rgb, 0, x), [255, 0, 0], "x {x}");
        }
        let _ = fs::remove_dir_all(&d);
    }

    /// A 4 x 1 palette PNG (see `palette_with_trns_becomes_alpha_and_is_filled`).
    pub(crate) fn palette_png() -> Vec<u8> {
        fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let start = out.len();
            out.extend_from_slice(kind);
            out.extend_from_slice(data);
            let crc = crc32(&out[start..]);
            out.extend_from_slice(&crc.to_be_bytes());
        }
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&4u32.to_be_bytes());
        ihdr.extend_from_slice(&1u32.to_be_bytes());
        ihdr.extend_from_slice(&[2, 3, 0, 0, 0]); // depth 2, palette
        chunk(&mut png, b"IHDR", &ihdr);
        chunk(&mut png, b"PLTE", &[255, 0, 0, 0, 0, 0]);
        chunk(&mut png, b"tRNS", &[255, 0]);
        // Row: filter 0, indices 0 1 1 0 at 2 bits = 0b00_01_01_00. Stored (uncompressed)
        // deflate block inside a zlib stream.
        let raw = [0u8, 0b0001_0100];
        let mut z = vec![0x78, 0x01, 0x01];
        z.extend_from_slice(&(raw.len() as u16).to_le_bytes());
        z.extend_from_slice(&(!(raw.len() as u16)).to_le_bytes());
        z.extend_from_slice(&raw);
        z.extend_from_slice(&adler32(&raw).to_be_bytes());
        chunk(&mut png, b"IDAT", &z);
        chunk(&mut png, b"IEND", &[]);
        png
    }

    pub(crate) fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }

    fn adler32(data: &[u8]) -> u32 {
        let (mut a, mut b) = (1u32, 0u32);
        for &x in data {
            a = (a + x as u32) % 65521;
            b = (b + a) % 65521;
        }
        (b << 16) | a
    }

    #[test]
    fn limits_and_errors_name_the_file() {
        let d = scratch("limits");
        let p = parity_dir("parity").join("case_a_lr.png"); // 32 x 32
        let e = load_image(&p, &LoadLimits::for_pixels(1000)).unwrap_err();
        assert!(matches!(e, ImageIoError::TooLarge { pixels: 1024, .. }), "{e}");
        let tight = LoadLimits { max_pixels: 1 << 20, max_alloc_bytes: 100 };
        let e = load_image(&p, &tight).unwrap_err();
        assert!(matches!(e, ImageIoError::LimitExceeded { .. }), "{e}");
        assert!(e.to_string().contains("case_a_lr.png"), "{e}");
        let empty = d.join("empty.png");
        fs::write(&empty, b"").unwrap();
        let e = load_image(&empty, &LoadLimits::default()).unwrap_err();
        assert!(e.to_string().contains("empty.png") && e.to_string().contains("empty"), "{e}");
        let gif = d.join("a.gif");
        fs::write(&gif, b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap();
        let e = load_image(&gif, &LoadLimits::default()).unwrap_err();
        assert!(matches!(e, ImageIoError::UnsupportedFormat { .. }), "{e}");
        assert!(e.to_string().contains("a.gif") && e.to_string().contains("GIF"), "{e}");
        let _ = fs::remove_dir_all(&d);
    }
}
