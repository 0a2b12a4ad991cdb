//! Real and hostile image files through `infdit::imageio`:
//!
//! * `tests/data/bad/`: a corpus of broken files (truncated, zero-size and huge headers,
//!   random bytes, empty, wrong content, unsupported format), made by
//!   `regenerate_bad_corpus` below. Each must fail with a one-line error naming the file,
//!   never a panic.
//! * The fuzz target's body (`fuzz/src/harness.rs`) over that corpus and 200 deterministic
//!   mutations of a valid PNG.
//! * `tests/data/real/`: small real files from Debian's `libjxl-testdata` and the PngSuite
//!   (see the README there): bit depth, alpha, ICC and EXIF are read, and survive a round trip
//!   through `save_image_atomic`.
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure

use std::fs;
use std::path::{Path, PathBuf};

use infdit::imageio::{ImageIoError, LoadLimits, LoadedImage, SaveOptions, load_image, save_image_atomic};

#[path = "../../../fuzz/src/harness.rs"]
mod harness;

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(rel)
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("infdit-files-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn vals(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

// ---------------------------------------------------------------------------------------------
// The bad corpus.
// ---------------------------------------------------------------------------------------------

/// Every file of `tests/data/bad/` and the error it must give (checked by variant name, from
/// the error's `Debug` form).
const BAD: [(&str, &str); 15] = [
    ("empty.png", "Io"),
    ("random_bytes.png", "Codec"),
    ("text_named.jpg", "Codec"),
    ("truncated.png", "Truncated"),
    ("truncated.jpg", "Truncated"),
    ("truncated.webp", "Codec"),
    ("truncated.tiff", "Truncated"),
    ("truncated.bmp", "Truncated"),
    ("bad_crc.png", "Codec"),
    ("zero_width.png", "ZeroSize"),
    ("huge_100000x100000.png", "TooLarge"),
    ("huge_65535x65535.jpg", "TooLarge"),
    ("huge_16383x16383.webp", "TooLarge"),
    ("lying_4000x4000.png", "Codec"),
    ("tiny.gif", "UnsupportedFormat"),
];

#[test]
fn bad_corpus_is_complete() {
    let mut on_disk: Vec<String> = fs::read_dir(data("bad"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "README.md")
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = BAD.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(on_disk, listed);
    let total: u64 = fs::read_dir(data("bad")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert!(total < 64 * 1024, "the bad corpus should stay small: {total} bytes");
}

#[test]
fn bad_files_fail_with_one_line_naming_the_file() {
    for (name, kind) in BAD {
        let p = data(&format!("bad/{name}"));
        let e = match load_image(&p, &LoadLimits::default()) {
            Ok(img) => panic!("{name} loaded: {:?}", img.rgb.dims()),
            Err(e) => e,
        };
        let msg = e.to_string();
        println!("{msg}");
        assert!(msg.contains(name), "{name}: message does not name the file: {msg}");
        assert!(!msg.contains('\n'), "{name}: not one line: {msg:?}");
        let debug = format!("{e:?}");
        assert!(debug.starts_with(kind), "{name}: expected {kind}, got {debug}");
    }
    // The specific messages a user sees.
    let msg = |n: &str| load_image(&data(&format!("bad/{n}")), &LoadLimits::default()).unwrap_err().to_string();
    assert!(msg("empty.png").ends_with("empty.png: file is empty"), "{}", msg("empty.png"));
    assert!(
        msg("huge_100000x100000.png")
            .contains("image is 100000 x 100000 = 10000000000 pixels, above the limit of 67108864"),
        "{}",
        msg("huge_100000x100000.png")
    );
    assert!(msg("tiny.gif").contains("GIF files are not supported"), "{}", msg("tiny.gif"));
    assert!(msg("truncated.png").contains("truncated"), "{}", msg("truncated.png"));
    // The huge headers are refused before any allocation even with the largest limits.
    let generous = LoadLimits::for_pixels(u32::MAX as u64);
    let e = load_image(&data("bad/huge_100000x100000.png"), &generous).unwrap_err();
    assert!(matches!(e, ImageIoError::TooLarge { .. }), "{e}");
}

#[test]
fn a_png_named_jpg_loads() {
    let d = scratch("named");
    let p = d.join("photo.jpg");
    fs::copy(data("real/basn6a08.png"), &p).unwrap();
    let img = load_image(&p, &LoadLimits::default()).unwrap();
    assert_eq!(img.source_format, image::ImageFormat::Png);
    let _ = fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------------------------------------
// The fuzz target's body over the corpus and mutations.
// ---------------------------------------------------------------------------------------------

/// xorshift64*: a small deterministic generator, so the mutations are the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A valid 8-bit RGBA PNG of 24 x 17 (not multiples of 32, so the padding has work to do)
/// with transparent pixels.
fn seed_png() -> Vec<u8> {
    let img = image::RgbaImage::from_fn(24, 17, |x, y| {
        image::Rgba([(x * 10) as u8, (y * 15) as u8, 128, if x > 18 { 0 } else { 255 }])
    });
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    buf.into_inner()
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// Recompute the CRC of every complete chunk, so a mutation reaches the code behind the CRC
/// check instead of stopping there.
fn fix_crcs(png: &mut [u8]) {
    let mut i = 8;
    while i + 12 <= png.len() {
        let n = u32::from_be_bytes(png[i..i + 4].try_into().unwrap()) as usize;
        let Some(end) = (i + 8).checked_add(n) else {
            return;
        };
        if end + 4 > png.len() {
            return;
        }
        let crc = crc32(&png[i + 4..end]);
        png[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        i = end + 4;
    }
}

/// One deterministic mutation of `seed`: 1-8 byte flips, a byte run overwritten with an
/// interesting value, an insertion, a deletion or a truncation, with the CRCs fixed half of
/// the time.
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(3) {
        match rng.below(5) {
            0 => {
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(v.len());
                    v[i] ^= 1 << rng.below(8);
                }
            }
            1 => {
                // Sizes are where decoders go wrong: 0, 0xff.., 0x7f.., 0x80...
                let vals = [0x00u8, 0xff, 0x7f, 0x80, 0x01];
                let i = rng.below(v.len());
                let val = vals[rng.below(vals.len())];
                for b in v.iter_mut().skip(i).take(1 + rng.below(4)) {
                    *b = val;
                }
            }
            2 => {
                let i = rng.below(v.len());
                let n = 1 + rng.below(16);
                let ins: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(i..i, ins);
            }
            3 => {
                let i = rng.below(v.len());
                let n = (1 + rng.below(16)).min(v.len() - i);
                v.drain(i..i + n);
            }
            _ => {
                let n = rng.below(v.len());
                v.truncate(n.max(1));
            }
        }
    }
    if rng.below(2) == 0 {
        fix_crcs(&mut v);
    }
    v
}

#[test]
fn fuzz_harness_survives_corpus_and_mutations() {
    let d = scratch("fuzz");
    let mut loaded = 0;
    for (name, _) in BAD {
        let bytes = fs::read(data(&format!("bad/{name}"))).unwrap();
        harness::decode_prepare(&bytes, &d).unwrap();
    }
    let seed = seed_png();
    assert!(harness::decode_prepare(&seed, &d).unwrap(), "the seed must load");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..200 {
        let m = mutate(&seed, &mut rng);
        if harness::decode_prepare(&m, &d).unwrap() {
            loaded += 1;
        }
    }
    // Some mutations hit ancillary bytes or pixel data and still decode; most are refused.
    println!("{loaded} of 200 mutations loaded");
    assert!(loaded > 0 && loaded < 200, "{loaded}");
    let _ = fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------------------------------------
// Real files.
// ---------------------------------------------------------------------------------------------

fn load_real(name: &str) -> LoadedImage {
    load_image(&data(&format!("real/{name}")), &LoadLimits::default()).unwrap_or_else(|e| panic!("{e}"))
}

/// The ICC profile's header: size field equal to the length, `acsp` signature at 36.
fn assert_icc(icc: &[u8], what: &str) {
    assert!(icc.len() >= 128, "{what}: ICC of {} bytes", icc.len());
    assert_eq!(u32::from_be_bytes(icc[..4].try_into().unwrap()) as usize, icc.len(), "{what}: ICC size field");
    assert_eq!(&icc[36..40], b"acsp", "{what}: ICC signature");
}

#[test]
fn real_files_load_with_their_properties() {
    // (file, W, H, bit depth, alpha, grayscale, ICC, EXIF)
    #[rustfmt::skip]
    let cases = [
        ("HUAWEI-EVA-L09-16bit_709_g1_dt.png", 64, 64, 16, false, false, true, true),
        ("phu1or_alfann24_srgb8.png", 64, 64, 8, false, false, true, true),
        ("exif2c08.png", 32, 32, 8, false, false, false, true),
        ("ct1n0g04.png", 32, 32, 8, false, true, false, false),
        ("basn0g02.png", 32, 32, 8, false, true, false, false),
        ("basn6a08.png", 32, 32, 8, true, false, false, false),
        ("basn6a16.png", 32, 32, 16, true, false, false, false),
        ("basn4a16.png", 32, 32, 16, true, true, false, false),
        ("tbgn3p08.png", 32, 32, 8, true, false, false, false),
        ("tbbn1g04.png", 32, 32, 8, true, true, false, false),
        ("1x1_exif_xmp.jpg", 1, 1, 8, false, false, false, true),
        ("flower_small.q85_420_non_interleaved.jpg", 0, 0, 8, false, false, false, false),
    ];
    for (name, w, h, bits, alpha, gray, icc, exif) in cases {
        let img = load_real(name);
        let dims = img.rgb.dims();
        println!(
            "{name}: {dims:?}, {} bits, alpha {}, gray {}, ICC {:?} bytes, EXIF {:?} bytes",
            img.bit_depth,
            img.alpha.is_some(),
            img.grayscale,
            img.icc.as_ref().map(Vec::len),
            img.exif.as_ref().map(Vec::len)
        );
        if w > 0 {
            assert_eq!(dims, &[1, 3, h, w], "{name}");
        }
        assert_eq!(img.bit_depth, bits, "{name}");
        assert_eq!(img.alpha.is_some(), alpha, "{name}");
        assert_eq!(img.grayscale, gray, "{name}");
        assert_eq!(img.icc.is_some(), icc, "{name}");
        assert_eq!(img.exif.is_some(), exif, "{name}");
        if let Some(p) = &img.icc {
            assert_icc(p, name);
        }
        if let Some(e) = &img.exif {
            assert!(e.starts_with(b"II*\0") || e.starts_with(b"MM\0*"), "{name}");
            assert_eq!(
                image::metadata::Orientation::from_exif_chunk(e).unwrap_or(image::metadata::Orientation::NoTransforms),
                image::metadata::Orientation::NoTransforms,
                "{name}"
            );
        }
        let v = vals(&img.rgb);
        assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)), "{name}");
        if gray {
            let n = v.len() / 3;
            assert!(v[..n] == v[n..2 * n] && v[..n] == v[2 * n..], "{name}: gray planes equal");
        }
    }
    // The 16-bit file really has 16-bit content (not 8-bit values widened).
    let v = vals(&load_real("HUAWEI-EVA-L09-16bit_709_g1_dt.png").rgb);
    let fine = v
        .iter()
        .filter(|&&x| {
            let k = ((x + 1.0) / 2.0 * 65535.0).round() as u32;
            !k.is_multiple_of(257)
        })
        .count();
    assert!(fine > v.len() / 2, "{fine} of {} samples use the low byte", v.len());
}

#[test]
fn transparent_colour_is_filled_in_real_files() {
    for name in ["basn6a08.png", "basn6a16.png", "tbgn3p08.png", "tbbn1g04.png", "basn4a16.png"] {
        let img = load_real(name);
        let (h, w) = (img.rgb.dims()[2], img.rgb.dims()[3]);
        let n = h * w;
        let a = vals(img.alpha.as_ref().unwrap());
        let v = vals(&img.rgb);
        let raw = image::open(data(&format!("real/{name}"))).unwrap().to_rgba32f();
        let transparent = a.iter().filter(|&&x| x == 0.0).count();
        println!("{name}: {transparent} fully transparent pixels of {n}");
        assert!(transparent > 0, "{name}");
        for (i, p) in raw.pixels().enumerate() {
            if a[i] > 0.0 {
                // Visible pixels keep their exact value.
                for c in 0..3 {
                    assert!((v[c * n + i] - (p.0[c] * 2.0 - 1.0)).abs() < 1e-6, "{name} {i}");
                }
                continue;
            }
            // A transparent pixel next to visible ones takes a weighted mean of them: inside
            // their range, channel by channel.
            let (y, x) = (i / w, i % w);
            let mut lo = [f32::INFINITY; 3];
            let mut hi = [f32::NEG_INFINITY; 3];
            for ny in y.saturating_sub(1)..(y + 2).min(h) {
                for nx in x.saturating_sub(1)..(x + 2).min(w) {
                    let j = ny * w + nx;
                    if a[j] > 0.0 {
                        for c in 0..3 {
                            lo[c] = lo[c].min(v[c * n + j]);
                            hi[c] = hi[c].max(v[c * n + j]);
                        }
                    }
                }
            }
            if lo[0].is_finite() {
                for c in 0..3 {
                    let f = v[c * n + i];
                    assert!(f >= lo[c] - 1e-6 && f <= hi[c] + 1e-6, "{name} pixel {i} channel {c}");
                }
            }
        }
    }
}

#[test]
fn real_files_round_trip_through_save() {
    let d = scratch("real-rt");
    let lim = LoadLimits::default();
    for (name, ext) in [
        ("HUAWEI-EVA-L09-16bit_709_g1_dt.png", "png"),
        ("HUAWEI-EVA-L09-16bit_709_g1_dt.png", "tiff"),
        ("phu1or_alfann24_srgb8.png", "png"),
        ("phu1or_alfann24_srgb8.png", "webp"),
        ("phu1or_alfann24_srgb8.png", "jpg"),
        ("basn6a08.png", "png"),
        ("basn6a08.png", "webp"),
        ("basn6a08.png", "tiff"),
        ("basn6a16.png", "png"),
        ("basn6a16.png", "tiff"),
        ("basn4a16.png", "png"),
        ("tbbn1g04.png", "png"),
        ("ct1n0g04.png", "png"),
        ("ct1n0g04.png", "tiff"),
        ("exif2c08.png", "jpg"),
        ("exif2c08.png", "webp"),
        ("1x1_exif_xmp.jpg", "jpg"),
        ("flower_small.q85_420_non_interleaved.jpg", "png"),
    ] {
        let src = data(&format!("real/{name}"));
        let img = load_real(name);
        let out = d.join(format!("{name}.{ext}"));
        let opts = SaveOptions::like_input(&img);
        save_image_atomic(&out, &img.rgb, img.alpha.as_ref(), img.grayscale, &opts, &[&src])
            .unwrap_or_else(|e| panic!("{e}"));
        let back = load_image(&out, &lim).unwrap();
        let what = format!("{name} -> {ext}");
        assert_eq!(back.rgb.dims(), img.rgb.dims(), "{what}");
        assert_eq!(back.bit_depth, img.bit_depth, "{what}");
        assert_eq!(back.alpha.is_some(), img.alpha.is_some(), "{what}");
        assert_eq!(back.icc, img.icc, "{what}: ICC");
        if ext == "tiff" {
            assert!(back.exif.is_none(), "{what}: TIFF writes no EXIF");
        } else {
            assert_eq!(back.exif, img.exif, "{what}: EXIF");
        }
        // TIFF has no gray + alpha (written as RGBA); WebP has no gray at all.
        if ext == "png" || (ext == "tiff" && img.alpha.is_none()) {
            assert_eq!(back.grayscale, img.grayscale, "{what}");
        }
        // Lossless formats: 16 bits come back exactly; 8 bits within the 1 LSB of the
        // reference truncating conversion; alpha exactly.
        if ext != "jpg" {
            let (a, b) = (vals(&img.rgb), vals(&back.rgb));
            let alpha = img.alpha.as_ref().map(vals);
            let n = a.len() / 3;
            let lsb = if img.bit_depth == 16 { 0.0 } else { 2.0 / 255.0 + 1e-6 };
            for i in 0..a.len() {
                if alpha.as_ref().is_none_or(|al| al[i % n] > 0.0) {
                    assert!((a[i] - b[i]).abs() <= lsb, "{what}: sample {i}: {} vs {}", a[i], b[i]);
                }
            }
            if let Some(al) = alpha {
                assert_eq!(vals(back.alpha.as_ref().unwrap()), al, "{what}: alpha");
            }
        }
    }
    let _ = fs::remove_dir_all(&d);
}

// ---------------------------------------------------------------------------------------------
// How the bad corpus was made.
// ---------------------------------------------------------------------------------------------

/// Rebuild `tests/data/bad/` (run with `cargo test -p infdit --test imageio_files --
/// --ignored regenerate_bad_corpus`). Deterministic: the same files every time.
#[test]
#[ignore = "writes the committed corpus; run by hand"]
fn regenerate_bad_corpus() {
    let dir = data("bad");
    fs::create_dir_all(&dir).unwrap();
    let put = |name: &str, bytes: &[u8]| fs::write(dir.join(name), bytes).unwrap();
    let encode = |img: image::DynamicImage, f: image::ImageFormat| {
        let mut c = std::io::Cursor::new(Vec::new());
        img.write_to(&mut c, f).unwrap();
        c.into_inner()
    };
    let photo =
        image::RgbImage::from_fn(48, 40, |x, y| image::Rgb([(x * 5) as u8, (y * 6) as u8, ((x * y) % 251) as u8]));
    let photo = image::DynamicImage::ImageRgb8(photo);
    let half = |v: Vec<u8>| v[..v.len() / 2].to_vec();

    put("empty.png", b"");
    let mut rng = Rng(42);
    put("random_bytes.png", &(0..512).map(|_| rng.next() as u8).collect::<Vec<_>>());
    put("text_named.jpg", b"This is a text file, not a JPEG.\n");
    let png = encode(photo.clone(), image::ImageFormat::Png);
    put("truncated.png", &half(png.clone()));
    let jpg = encode(photo.clone(), image::ImageFormat::Jpeg);
    put("truncated.jpg", &half(jpg.clone()));
    put("truncated.webp", &half(encode(photo.clone(), image::ImageFormat::WebP)));
    put("truncated.tiff", &half(encode(photo.clone(), image::ImageFormat::Tiff)));
    put("truncated.bmp", &half(encode(photo.clone(), image::ImageFormat::Bmp)));

    // The IDAT's CRC flipped.
    let mut bad_crc = png.clone();
    let idat = bad_crc.windows(4).position(|w| w == b"IDAT").unwrap();
    let n = u32::from_be_bytes(bad_crc[idat - 4..idat].try_into().unwrap()) as usize;
    bad_crc[idat + 4 + n] ^= 0xff;
    put("bad_crc.png", &bad_crc);

    // Hand-made PNGs from chunks with valid CRCs.
    let chunk = |out: &mut Vec<u8>, kind: &[u8; 4], body: &[u8]| {
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(body);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    };
    let ihdr = |w: u32, h: u32| {
        let mut b = w.to_be_bytes().to_vec();
        b.extend_from_slice(&h.to_be_bytes());
        b.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
        b
    };
    let header_only = |w: u32, h: u32| {
        let mut p = b"\x89PNG\r\n\x1a\n".to_vec();
        chunk(&mut p, b"IHDR", &ihdr(w, h));
        chunk(&mut p, b"IEND", &[]);
        p
    };
    put("zero_width.png", &header_only(0, 16));
    put("huge_100000x100000.png", &header_only(100_000, 100_000));
    // A 4000 x 4000 header over the (valid, complete) data stream of the 48 x 40 photo.
    let mut lying = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut lying, b"IHDR", &ihdr(4000, 4000));
    let body = &png[idat + 4..idat + 4 + n];
    chunk(&mut lying, b"IDAT", body);
    chunk(&mut lying, b"IEND", &[]);
    put("lying_4000x4000.png", &lying);

    // The JPEG's SOF0 frame header patched to 65535 x 65535.
    let mut huge_jpg = jpg.clone();
    let sof = huge_jpg.windows(2).position(|w| w == [0xff, 0xc0]).unwrap();
    huge_jpg[sof + 5..sof + 9].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    put("huge_65535x65535.jpg", &huge_jpg);

    // A lossy WebP (VP8) key frame header announcing 16383 x 16383 (the largest its 14-bit
    // fields hold), with no image data.
    let mut vp8 = vec![0x10, 0x02, 0x00]; // frame tag: key frame, shown, partition size 16
    vp8.extend_from_slice(&[0x9d, 0x01, 0x2a]);
    vp8.extend_from_slice(&16_383u16.to_le_bytes());
    vp8.extend_from_slice(&16_383u16.to_le_bytes());
    vp8.extend_from_slice(&[0; 6]);
    let mut webp = b"RIFF".to_vec();
    webp.extend_from_slice(&((4 + 8 + vp8.len()) as u32).to_le_bytes());
    webp.extend_from_slice(b"WEBPVP8 ");
    webp.extend_from_slice(&(vp8.len() as u32).to_le_bytes());
    webp.extend_from_slice(&vp8);
    put("huge_16383x16383.webp", &webp);

    // A valid 1 x 1 GIF: a format this build does not decode.
    put(
        "tiny.gif",
        b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00,\
          \x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;",
    );
}
