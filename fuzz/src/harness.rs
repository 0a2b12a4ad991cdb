//! The body of the `decode_prepare` fuzz target, shared with the plain test
//! `crates/infdit/tests/imageio_files.rs` (which includes this file with `#[path]`), so that the
//! corpus and mutation test on stable Rust runs exactly what the fuzzer runs.
//!
//! It exercises what an upscale does with an untrusted file before the network runs: decode
//! with limits ([`load_image`]), then reflection-pad the colour and alpha to the next multiple
//! of 32 ([`pad_reflect`]) and crop back ([`crop`]). It panics (a finding, for the fuzzer) when
//! anything panics, or when an invariant fails: errors must be one line naming the file; a
//! loaded image must have consistent shapes, finite values in range, and survive pad + crop.

use std::path::Path;

use infdit::imageio::{LoadLimits, crop, load_image, pad_reflect};

/// Limits small enough that no input can make one run allocate much: 1 Mi pixels (1024 x
/// 1024) and 64 MiB for the decoder (16 bytes per pixel for the largest decoded format, RGBA
/// f32, is 16 MiB; the rest is slack for the decoders' working buffers).
pub const FUZZ_LIMITS: LoadLimits = LoadLimits { max_pixels: 1 << 20, max_alloc_bytes: 64 << 20 };

/// The size grid the 4x network needs (`pipeline`: sides are multiples of 32).
pub const MULTIPLE: usize = 32;

/// Extensions the temporary file is given, picked from the input length, so that the
/// extension fallback of format detection is exercised too (`img` names no format).
const EXTENSIONS: [&str; 6] = ["png", "jpg", "webp", "tif", "bmp", "img"];

/// Write `bytes` to a file in `dir` and run the decode-and-prepare path on it.
///
/// Returns `Ok(true)` when the bytes loaded as an image, `Ok(false)` when they were refused
/// with a proper error. Panics on any broken invariant (see the module documentation).
pub fn decode_prepare(bytes: &[u8], dir: &Path) -> std::io::Result<bool> {
    let ext = EXTENSIONS[bytes.len() % EXTENSIONS.len()];
    let name = format!("fuzz-input-{}.{ext}", std::process::id());
    let path = dir.join(&name);
    std::fs::write(&path, bytes)?;
    let result = load_image(&path, &FUZZ_LIMITS);
    let _ = std::fs::remove_file(&path);
    let img = match result {
        Ok(img) => img,
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(&name), "error does not name the file: {msg}");
            assert!(!msg.contains('\n'), "error is not one line: {msg:?}");
            return Ok(false);
        }
    };
    let dims = img.rgb.dims().to_vec();
    let [1, 3, h, w] = dims[..] else {
        panic!("rgb has shape {dims:?}");
    };
    assert!(h > 0 && w > 0 && (h * w) as u64 <= FUZZ_LIMITS.max_pixels);
    assert!(img.bit_depth == 8 || img.bit_depth == 16, "{}", img.bit_depth);
    let values = img.rgb.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(values.iter().all(|v| (-1.0..=1.0).contains(v)), "rgb outside [-1, 1]");
    let pad_b = (MULTIPLE - h % MULTIPLE) % MULTIPLE;
    let pad_r = (MULTIPLE - w % MULTIPLE) % MULTIPLE;
    let padded = pad_reflect(&img.rgb, 0, pad_b, 0, pad_r).expect("pad_reflect");
    assert_eq!(padded.dims(), &[1, 3, h + pad_b, w + pad_r]);
    let back = crop(&padded, 0, 0, h, w).expect("crop");
    let back = back.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(back == values, "pad + crop changed the image");
    if let Some(a) = &img.alpha {
        assert_eq!(a.dims(), &[1, 1, h, w]);
        let av = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(av.iter().all(|v| (0.0..=1.0).contains(v)), "alpha outside [0, 1]");
        let pa = pad_reflect(a, 0, pad_b, 0, pad_r).expect("pad_reflect alpha");
        assert_eq!(pa.dims(), &[1, 1, h + pad_b, w + pad_r]);
    }
    Ok(true)
}
