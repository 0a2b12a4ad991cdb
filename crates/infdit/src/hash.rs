//! The hashes that tell runs and saved data apart: FNV-1a fingerprints and CRC-32 checksums (not
//! cryptographic; they guard against mix-ups and damage, not against an attacker).

use candle_core::{DType, Tensor};

/// 64-bit FNV-1a, enough to tell runs apart (not a cryptographic hash).
#[derive(Debug, Clone)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// Mixes bytes in.
    pub fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= x as u64;
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
    /// Mixes a tensor's shape and f32 values in.
    pub fn tensor(&mut self, t: &Tensor) -> candle_core::Result<()> {
        self.bytes(format!("{:?}", t.dims()).as_bytes());
        for v in t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
            self.bytes(&v.to_bits().to_le_bytes());
        }
        Ok(())
    }
    /// The hash.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// CRC-32 of f32 values as little-endian bytes (the checksums of saved states).
pub fn crc_f32(values: &[f32]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let mut buf = Vec::with_capacity(4 * values.len().min(1 << 16));
    for chunk in values.chunks(1 << 16) {
        buf.clear();
        buf.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
        h.update(&buf);
    }
    h.finalize()
}
