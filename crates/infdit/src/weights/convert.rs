//! `infdit convert`: any readable checkpoint to safetensors, optionally changing the float dtype.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device};

use super::{Checkpoint, WeightError, parse_err};

/// What a conversion did.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertSummary {
    /// Tensors written.
    pub tensors: usize,
    /// Total parameters (elements) written.
    pub elements: usize,
    /// Bytes of the output file.
    pub bytes: u64,
}

/// Converts `input` (a `.pt`/`.pth`/`.bin` torch pickle or a safetensors file) to a safetensors file
/// at `output`, every key kept under its name. Floating tensors are cast to `dtype` when given
/// (f32, bf16 or f16); integer tensors keep their type. The output is written atomically (temporary
/// file in the same folder, then rename); `output` may not be the input.
pub fn convert(input: &Path, output: &Path, dtype: Option<DType>) -> Result<ConvertSummary, WeightError> {
    if let Some(d) = dtype
        && !matches!(d, DType::F32 | DType::BF16 | DType::F16)
    {
        return Err(WeightError::Write {
            path: output.to_path_buf(),
            msg: format!("unsupported output dtype {d:?} (use f32, bf16 or f16)"),
        });
    }
    if let (Ok(a), Ok(b)) = (input.canonicalize(), output.canonicalize())
        && a == b
    {
        return Err(WeightError::Write {
            path: output.to_path_buf(),
            msg: "the output path is the input file; refusing to overwrite it".into(),
        });
    }
    let ck = Checkpoint::open(input)?;
    let dev = Device::Cpu;
    let mut tensors = HashMap::new();
    let mut elements = 0;
    for k in ck.keys() {
        let t = ck.load(k, &dev).map_err(|e| parse_err(input, format!("{k}: {e}")))?;
        let t = match dtype {
            Some(d) if t.dtype().is_float() => t.to_dtype(d).map_err(|e| parse_err(input, e))?,
            _ => t,
        };
        elements += t.elem_count();
        tensors.insert(k.to_string(), t);
    }
    save_atomic(&tensors, output)?;
    let bytes = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    Ok(ConvertSummary { tensors: tensors.len(), elements, bytes })
}

/// Writes tensors to a safetensors file atomically ([`crate::atomic::write_atomic`]: a short
/// hidden temporary file in the same folder, fsync, rename), so `output` is never left
/// half-written. Failures are [`WeightError::Write`], naming `output`.
pub fn save_atomic(tensors: &HashMap<String, candle_core::Tensor>, output: &Path) -> Result<(), WeightError> {
    let write_err =
        |p: &Path, e: &dyn std::fmt::Display| WeightError::Write { path: p.to_path_buf(), msg: e.to_string() };
    crate::atomic::write_atomic(
        output,
        |tmp| {
            candle_core::safetensors::save(tensors, tmp).map_err(|e| write_err(output, &e))?;
            // The safetensors writer creates owner-only files; a checkpoint is ordinary data.
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o644));
            }
            Ok(())
        },
        |p, e| write_err(p, &e),
    )
}
