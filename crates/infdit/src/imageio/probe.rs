//! What an image file is, from its header alone: size (orientation applied) and alpha.

use std::path::Path;

use super::{ImageIoError, LoadLimits};

/// An image file's header facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    /// Width, EXIF orientation applied.
    pub width: usize,
    /// Height, EXIF orientation applied.
    pub height: usize,
    /// Whether the image has an alpha channel.
    pub has_alpha: bool,
}

/// Reads the header of `path` (no pixels are decoded) and checks its size against `limits`.
pub fn probe(path: &Path, limits: &LoadLimits) -> Result<ImageInfo, ImageIoError> {
    use image::ImageDecoder;
    use image::metadata::Orientation;
    let file = std::fs::File::open(path).map_err(|e| ImageIoError::io(path, e))?;
    let mut reader = image::ImageReader::new(std::io::BufReader::new(file));
    if let Ok(f) = image::ImageFormat::from_path(path) {
        reader.set_format(f);
    }
    let reader = reader.with_guessed_format().map_err(|e| ImageIoError::io(path, e))?;
    let mut dec = reader.into_decoder().map_err(|e| ImageIoError::codec(path, "decode", e))?;
    let (w, h) = dec.dimensions();
    let has_alpha = dec.color_type().has_alpha();
    let turned = matches!(
        dec.orientation().unwrap_or(Orientation::NoTransforms),
        Orientation::Rotate90 | Orientation::Rotate270 | Orientation::Rotate90FlipH | Orientation::Rotate270FlipH
    );
    let (width, height) = if turned { (h as usize, w as usize) } else { (w as usize, h as usize) };
    if width == 0 || height == 0 {
        return Err(ImageIoError::ZeroSize { path: path.to_path_buf(), width: width as u32, height: height as u32 });
    }
    let pixels = (width as u64) * (height as u64);
    if pixels > limits.max_pixels {
        return Err(ImageIoError::TooLarge {
            path: path.to_path_buf(),
            width: width as u32,
            height: height as u32,
            pixels,
            limit: limits.max_pixels,
        });
    }
    Ok(ImageInfo { width, height, has_alpha })
}
