//! Metadata the `image` crate misses, read straight from the file, and the JPEG completeness
//! check. Each reader is bounded: it never reads past the end of the file, never allocates more
//! than its caller's limit, and gives up (`None`) on anything malformed rather than failing the
//! load over metadata.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// The TIFF tag SampleFormat (1 unsigned integer, the default; 3 IEEE float).
pub(crate) const TIFF_SAMPLE_FORMAT: u16 = 339;

/// An entry of the first IFD of a TIFF or BigTIFF file: the open file, its length, byte order,
/// BigTIFF flag and the raw entry (12 or 20 bytes in the first 20).
struct TiffEntry {
    f: File,
    file_len: u64,
    le: bool,
    big: bool,
    e: [u8; 20],
}

impl TiffEntry {
    fn u16_at(&self, b: &[u8]) -> u16 {
        let a = [b[0], b[1]];
        if self.le { u16::from_le_bytes(a) } else { u16::from_be_bytes(a) }
    }
    fn u32_at(&self, b: &[u8]) -> u32 {
        let a = [b[0], b[1], b[2], b[3]];
        if self.le { u32::from_le_bytes(a) } else { u32::from_be_bytes(a) }
    }
    fn u64_at(&self, b: &[u8]) -> u64 {
        let a: [u8; 8] = b[..8].try_into().unwrap_or([0; 8]);
        if self.le { u64::from_le_bytes(a) } else { u64::from_be_bytes(a) }
    }
}

/// The entry of `tag` in the first IFD of a TIFF or BigTIFF file; `None` when absent or malformed.
fn tiff_entry(path: &Path, tag: u16) -> Option<TiffEntry> {
    let mut f = File::open(path).ok()?;
    let file_len = f.metadata().ok()?.len();
    let mut head = [0u8; 16];
    f.read_exact(&mut head[..8]).ok()?;
    let le = match &head[..2] {
        b"II" => true,
        b"MM" => false,
        _ => return None,
    };
    let mut t = TiffEntry { f, file_len, le, big: false, e: [0; 20] };
    // Classic TIFF: 2-byte entry count, 12-byte entries with 4-byte count and offset.
    // BigTIFF (version 43): 8-byte entry count, 20-byte entries with 8-byte count and offset.
    t.big = match t.u16_at(&head[2..4]) {
        42 => false,
        43 => true,
        _ => return None,
    };
    let ifd = if t.big {
        t.f.read_exact(&mut head[8..16]).ok()?;
        t.u64_at(&head[8..16])
    } else {
        t.u32_at(&head[4..8]) as u64
    };
    t.f.seek(SeekFrom::Start(ifd)).ok()?;
    let (count_len, entry_len) = if t.big { (8, 20) } else { (2, 12) };
    let mut nbuf = [0u8; 8];
    t.f.read_exact(&mut nbuf[..count_len]).ok()?;
    let entries = if t.big { t.u64_at(&nbuf) } else { t.u16_at(&nbuf) as u64 };
    // Every entry must lie inside the file: bounds the loop on a lying count.
    if entries.checked_mul(entry_len as u64)? > file_len {
        return None;
    }
    for _ in 0..entries {
        let mut e = [0u8; 20];
        t.f.read_exact(&mut e[..entry_len]).ok()?;
        if t.u16_at(&e[0..2]) == tag {
            t.e = e;
            return Some(t);
        }
    }
    None
}

/// Whether the first IFD of a TIFF file has `tag` (false when the file is not a readable TIFF).
pub(crate) fn tiff_has_tag(path: &Path, tag: u16) -> bool {
    tiff_entry(path, tag).is_some()
}

/// The ICC profile (tag 34675, type BYTE or UNDEFINED) of the first image of a TIFF or
/// BigTIFF file, read directly; `None` when absent, malformed, or larger than `max_bytes`.
pub(crate) fn tiff_icc(path: &Path, max_bytes: u64) -> Option<Vec<u8>> {
    const ICC_TAG: u16 = 34675;
    let mut t = tiff_entry(path, ICC_TAG)?;
    let e = t.e;
    if !matches!(t.u16_at(&e[2..4]), 1 | 7) {
        return None;
    }
    let (count, value) = if t.big { (t.u64_at(&e[4..12]), &e[12..20]) } else { (t.u32_at(&e[4..8]) as u64, &e[8..12]) };
    if count == 0 || count > max_bytes || count > t.file_len {
        return None;
    }
    if count <= value.len() as u64 {
        return Some(value[..count as usize].to_vec());
    }
    let offset = if t.big { t.u64_at(value) } else { t.u32_at(value) as u64 };
    if offset.checked_add(count)? > t.file_len {
        return None;
    }
    t.f.seek(SeekFrom::Start(offset)).ok()?;
    let mut icc = vec![0u8; count as usize];
    t.f.read_exact(&mut icc).ok()?;
    Some(icc)
}

/// Checks a PNG's metadata against the limits of [`super::LoadLimits`] before the decoder sees it:
/// at most `MAX_METADATA_BYTES` in chunks other than the image data, and an `iCCP` profile that
/// inflates to at most `MAX_ICC_BYTES` (inflated here with that bound, so a compressed bomb costs
/// no more). Malformed chunk structure is left to the decoder. The error says which limit.
pub(crate) fn png_check_metadata(path: &Path) -> Result<(), String> {
    use super::LoadLimits as L;
    let Ok(file) = File::open(path) else { return Ok(()) };
    let Ok(file_len) = file.metadata().map(|m| m.len()) else { return Ok(()) };
    let mut f = BufReader::new(file);
    let mut sig = [0u8; 8];
    if f.read_exact(&mut sig).is_err() || &sig != b"\x89PNG\r\n\x1a\n" {
        return Ok(());
    }
    let (mut pos, mut meta) = (8u64, 0u64);
    // Every chunk is at least 12 bytes, so this ends within file_len / 12 steps.
    loop {
        let mut head = [0u8; 8];
        if f.read_exact(&mut head).is_err() {
            return Ok(());
        }
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as u64;
        let end = pos + 12 + len;
        if end > file_len {
            return Ok(());
        }
        match &head[4..8] {
            b"IDAT" | b"IEND" | b"IHDR" => {}
            kind => {
                meta += len;
                if meta > L::MAX_METADATA_BYTES {
                    return Err(format!("more than {} bytes of metadata chunks (the limit)", L::MAX_METADATA_BYTES));
                }
                if kind == b"iCCP" {
                    let mut data = vec![0u8; len as usize];
                    if f.read_exact(&mut data).is_err() {
                        return Ok(());
                    }
                    // Name (1-79 bytes), NUL, compression method, zlib stream.
                    let Some(nul) = data.iter().position(|&b| b == 0) else { return Ok(()) };
                    let z = data.get(nul + 2..).unwrap_or(&[]);
                    if let Err(fdeflate::BoundedDecompressionError::OutputTooLarge { .. }) =
                        fdeflate::decompress_to_vec_bounded(z, L::MAX_ICC_BYTES as usize)
                    {
                        return Err(format!(
                            "the ICC profile inflates to more than {} bytes (the limit)",
                            L::MAX_ICC_BYTES
                        ));
                    }
                    if f.seek_relative(4).is_err() {
                        return Ok(());
                    }
                    pos = end;
                    continue;
                }
            }
        }
        if head[4..8] == *b"IEND" || f.seek_relative(len as i64 + 4).is_err() {
            return Ok(());
        }
        pos = end;
    }
}

/// Width and height from a PNG's `IHDR` (always the first chunk, bytes 16 to 24), read before
/// the decoder is created: the PNG decoder reads every chunk up to the image data before it
/// reports the size, and fails on a header-only bomb (a huge `IHDR` and no data) with a less
/// useful message than "too large". `None` when the file is not a PNG with an `IHDR` first.
pub(crate) fn png_ihdr_size(path: &Path) -> Option<(u32, u32)> {
    let mut head = [0u8; 24];
    File::open(path).ok()?.read_exact(&mut head).ok()?;
    if &head[..8] != b"\x89PNG\r\n\x1a\n" || &head[12..16] != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes(head[16..20].try_into().ok()?);
    let h = u32::from_be_bytes(head[20..24].try_into().ok()?);
    Some((w, h))
}

/// The `eXIf` chunk of a PNG file wherever it is, `None` when absent, malformed, or larger than
/// `max_bytes`. `image` 0.25 reports only the chunks before the image data, while the PNG
/// extensions of 2017 allowed `eXIf` after it too (where darktable, for one, writes it).
pub(crate) fn png_exif(path: &Path, max_bytes: u64) -> Option<Vec<u8>> {
    let mut f = BufReader::new(File::open(path).ok()?);
    let file_len = f.get_ref().metadata().ok()?.len();
    let mut sig = [0u8; 8];
    f.read_exact(&mut sig).ok()?;
    if &sig != b"\x89PNG\r\n\x1a\n" {
        return None;
    }
    let mut pos = 8u64;
    // Every chunk is at least 12 bytes, so this ends within file_len / 12 steps.
    loop {
        let mut head = [0u8; 8];
        f.read_exact(&mut head).ok()?;
        let len = u32::from_be_bytes(head[..4].try_into().ok()?) as u64;
        let data_end = pos.checked_add(8 + len)?;
        if data_end.checked_add(4)? > file_len {
            return None;
        }
        match &head[4..8] {
            b"eXIf" => {
                if len == 0 || len > max_bytes {
                    return None;
                }
                let mut exif = vec![0u8; len as usize];
                f.read_exact(&mut exif).ok()?;
                return Some(exif);
            }
            b"IEND" => return None,
            _ => {
                f.seek_relative(len as i64 + 4).ok()?;
                pos = data_end + 4;
            }
        }
    }
}

/// Whether a JPEG file reaches its end-of-image marker (`FF D9`): the marker segments are
/// skipped by their lengths and the entropy-coded data is scanned for the next marker (`FF`
/// followed by anything but `00`, a restart marker or more `FF` fill), across all scans of a
/// progressive file. `false` only when the file ends first: the decoder used here quietly
/// fills the missing part of a truncated JPEG with gray, so [`super::load_image`] refuses such
/// a file itself. A file that does not start with `FF D8` is left to the decoder (`true`).
pub(crate) fn jpeg_reaches_eoi(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return true;
    };
    let mut r = BufReader::new(file);
    let mut next = move || {
        let mut b = [0u8; 1];
        r.read_exact(&mut b).ok().map(|_| b[0])
    };
    if (next(), next()) != (Some(0xff), Some(0xd8)) {
        return true;
    }
    // The marker to handle next, once found.
    let mut marker: Option<u8> = None;
    loop {
        let m = match marker.take() {
            Some(m) => m,
            None => {
                // Expect FF (possibly several: fill bytes) then the marker code.
                let Some(b) = next() else { return false };
                if b != 0xff {
                    // Not at a marker: garbage between segments; look for the next one.
                    match scan_entropy(&mut next) {
                        Some(m) => m,
                        None => return false,
                    }
                } else {
                    let mut m = 0xff;
                    while m == 0xff {
                        let Some(b) = next() else { return false };
                        m = b;
                    }
                    m
                }
            }
        };
        match m {
            0xd9 => return true,
            // Standalone markers: SOI, RSTn, TEM.
            0xd8 | 0xd0..=0xd7 | 0x01 => {}
            _ => {
                // A segment with a 2-byte length that counts itself.
                let (Some(hi), Some(lo)) = (next(), next()) else {
                    return false;
                };
                let len = u16::from_be_bytes([hi, lo]) as usize;
                for _ in 0..len.saturating_sub(2) {
                    if next().is_none() {
                        return false;
                    }
                }
                if m == 0xda {
                    // Start of scan: entropy-coded data follows, up to the next marker.
                    match scan_entropy(&mut next) {
                        Some(m) => marker = Some(m),
                        None => return false,
                    }
                }
            }
        }
    }
}

/// Skip entropy-coded bytes up to the next marker and return its code; `None` at the end of
/// the file.
fn scan_entropy(next: &mut impl FnMut() -> Option<u8>) -> Option<u8> {
    loop {
        if next()? != 0xff {
            continue;
        }
        let mut m = next()?;
        while m == 0xff {
            m = next()?;
        }
        if m != 0x00 && !(0xd0..=0xd7).contains(&m) {
            return Some(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("infdit-meta-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn jpeg_eoi_detection() {
        let d = scratch("eoi");
        let img = image::RgbImage::from_fn(40, 24, |x, y| image::Rgb([(x * 6) as u8, (y * 9) as u8, 77]));
        let full = d.join("full.jpg");
        img.save(&full).unwrap();
        assert!(jpeg_reaches_eoi(&full));
        let bytes = fs::read(&full).unwrap();
        // Trailing bytes after EOI are fine; any cut before it is not.
        let trailing = d.join("trailing.jpg");
        fs::write(&trailing, [&bytes[..], b"trailing data"].concat()).unwrap();
        assert!(jpeg_reaches_eoi(&trailing));
        for cut in [2, 20, bytes.len() / 2, bytes.len() - 1] {
            let p = d.join(format!("cut{cut}.jpg"));
            fs::write(&p, &bytes[..cut]).unwrap();
            assert!(!jpeg_reaches_eoi(&p), "cut at {cut}");
        }
        // Not a JPEG: left to the decoder.
        let other = d.join("other.jpg");
        fs::write(&other, b"hello").unwrap();
        assert!(jpeg_reaches_eoi(&other));
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn tiff_icc_bounds() {
        let d = scratch("tiff");
        let p = d.join("t.tiff");
        let img = image::RgbImage::from_pixel(2, 2, image::Rgb([1, 2, 3]));
        let mut buf = std::io::Cursor::new(Vec::new());
        let mut enc = image::codecs::tiff::TiffEncoder::new(&mut buf);
        use image::ImageEncoder;
        enc.set_icc_profile(vec![7u8; 1000]).unwrap();
        enc.write_image(img.as_raw(), 2, 2, image::ExtendedColorType::Rgb8).unwrap();
        fs::write(&p, buf.into_inner()).unwrap();
        assert_eq!(tiff_icc(&p, 1 << 20), Some(vec![7u8; 1000]));
        assert_eq!(tiff_icc(&p, 999), None);
        let bytes = fs::read(&p).unwrap();
        fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let _ = tiff_icc(&p, 1 << 20); // no panic on a cut file
        let _ = fs::remove_dir_all(&d);
    }
}
