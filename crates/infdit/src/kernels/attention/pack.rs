//! Operand packing and scratch buffers shared by the attention tiles of every path.

use candle_core::{Layout, Result, Storage};
use half::bf16;
use std::cell::RefCell;
use std::mem::MaybeUninit;

use crate::kernels::Elem;

/// Query rows per parallel task (rounded up to the micro-kernel's row block). Measured flat from
/// 24 to 96 rows on the hot shapes once the scratch buffers are pooled; 48 gives more tasks.
pub(super) const QUERY_TILE: usize = 48;
/// Keys per tile of the online softmax on the AVX-512 path (a multiple of 16). Measured flat from 256
/// to 1024.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) const KEY_TILE: usize = 384;
/// Keys per tile on the portable path.
pub(super) const KEY_TILE_PORTABLE: usize = 256;
/// Query rows per task on the portable path.
pub(super) const QUERY_TILE_PORTABLE: usize = 64;

/// A strided 4-D view into CPU storage.
#[derive(Clone, Copy)]
pub(super) struct View<'a, T> {
    pub(super) data: &'a [T],
    pub(super) offset: usize,
    pub(super) stride: [usize; 4],
}

impl<'a, T: Elem> View<'a, T> {
    pub(super) fn new(storage: &'a Storage, layout: &Layout) -> Result<Self> {
        let data = match storage {
            Storage::Cpu(c) => c.as_slice::<T>()?,
            _ => candle_core::bail!("fused_attention: expected CPU storage"),
        };
        let st = layout.stride();
        Ok(Self { data, offset: layout.start_offset(), stride: [st[0], st[1], st[2], st[3]] })
    }

    /// Offset of element (ni, hi, t, 0).
    #[inline(always)]
    pub(super) fn row(&self, ni: usize, hi: usize, t: usize) -> usize {
        self.offset + ni * self.stride[0] + hi * self.stride[1] + t * self.stride[2]
    }
}

thread_local! {
    /// Spare buffers of this thread, reused to spare the page faults and zeroing of fresh
    /// allocations (a buffer may be returned to another thread's pool than it came from).
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// Buffers kept per thread.
const POOL_SIZE: usize = 8;
/// Larger buffers (in f32, here 16 MiB) are freed, not kept.
const MAX_POOLED: usize = 1 << 22;

/// An f32 scratch buffer whose data starts on a 64-byte boundary. Its contents are stale (from an
/// earlier use) unless it was made by [`AlignedBuf::zeros`].
pub(super) struct AlignedBuf {
    buf: Vec<f32>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub(super) fn new(len: usize) -> Self {
        let need = len + 16;
        let pooled = POOL.with(|p| {
            let mut p = p.borrow_mut();
            // The smallest spare buffer that fits.
            let (i, _) = p.iter().enumerate().filter(|(_, b)| b.len() >= need).min_by_key(|(_, b)| b.len())?;
            Some(p.swap_remove(i))
        });
        let buf = pooled.unwrap_or_else(|| vec![0f32; need]);
        let start = buf.as_ptr().align_offset(64).min(15);
        Self { buf, start, len }
    }
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(super) fn zeros(len: usize) -> Self {
        let mut b = Self::new(len);
        b.as_mut_slice().fill(0.0);
        b
    }
    pub(super) fn as_slice(&self) -> &[f32] {
        &self.buf[self.start..self.start + self.len]
    }
    pub(super) fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.buf[self.start..self.start + self.len]
    }
    /// The buffer as 32-bit slots (for operands packed as bf16 pairs).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(super) fn as_mut_u32(&mut self) -> &mut [u32] {
        let s = self.as_mut_slice();
        // SAFETY: f32 and u32 have the same size and alignment, and every bit pattern is valid
        // for both.
        unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut u32, s.len()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.len() > MAX_POOLED {
            return;
        }
        let _ = POOL.try_with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_SIZE {
                p.push(buf);
            } else if let Some(small) = p.iter_mut().min_by_key(|b| b.len()) {
                // Keep the larger buffers.
                if small.len() < buf.len() {
                    *small = buf;
                }
            }
        });
    }
}

pub(super) fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// `dst[c] = x[row base + c * stride] * mul` for c < dst.len().
#[inline(always)]
pub(super) fn read_row<T: Elem>(x: &View<T>, base: usize, dst: &mut [f32], mul: f32) {
    let (sc, d) = (x.stride[3], dst.len());
    if sc == 1 {
        for (y, s) in dst.iter_mut().zip(&x.data[base..base + d]) {
            *y = s.to_f32() * mul;
        }
    } else {
        for (c, y) in dst.iter_mut().enumerate() {
            *y = x.data[base + c * sc].to_f32() * mul;
        }
    }
}

/// Rows `r0..r0 + nr` of q for head (ni, hi) as a (round_up(nr, mr), dp) f32 matrix times `mul`,
/// zero padded.
#[allow(clippy::too_many_arguments)]
pub(super) fn pack_q<T: Elem>(
    q: &View<T>,
    ni: usize,
    hi: usize,
    r0: usize,
    nr: usize,
    d: usize,
    dp: usize,
    mr: usize,
    mul: f32,
) -> AlignedBuf {
    let mut buf = AlignedBuf::new(round_up(nr, mr) * dp);
    for (r, dst) in buf.as_mut_slice().chunks_exact_mut(dp).enumerate() {
        if r < nr {
            read_row(q, q.row(ni, hi, r0 + r), &mut dst[..d], mul);
            dst[d..].fill(0.0);
        } else {
            dst.fill(0.0);
        }
    }
    buf
}

/// All `t` rows of k or v for head (ni, hi) as a (t, dp) f32 matrix, zero padded.
pub(super) fn pack_rows<T: Elem>(x: &View<T>, ni: usize, hi: usize, t: usize, d: usize, dp: usize) -> AlignedBuf {
    let mut buf = AlignedBuf::new(t * dp);
    for (j, dst) in buf.as_mut_slice().chunks_exact_mut(dp).enumerate() {
        read_row(x, x.row(ni, hi, j), &mut dst[..d], 1.0);
        dst[d..].fill(0.0);
    }
    buf
}

/// k for head (ni, hi) in panels of `w` keys: `panel[p][c][l] = k[w p + l][c]`, zero padded.
#[allow(clippy::too_many_arguments)]
pub(super) fn pack_k_panels<T: Elem>(
    k: &View<T>,
    ni: usize,
    hi: usize,
    tk: usize,
    d: usize,
    dp: usize,
    w: usize,
) -> AlignedBuf {
    let np = tk.div_ceil(w);
    let mut buf = AlignedBuf::new(np * dp * w);
    let mut row = vec![0f32; d];
    for (p, panel) in buf.as_mut_slice().chunks_exact_mut(dp * w).enumerate() {
        let valid = w.min(tk - p * w);
        if valid < w {
            panel.fill(0.0);
        } else {
            panel[d * w..].fill(0.0);
        }
        for l in 0..valid {
            read_row(k, k.row(ni, hi, p * w + l), &mut row, 1.0);
            for (c, &x) in row.iter().enumerate() {
                panel[c * w + l] = x;
            }
        }
    }
    buf
}

/// An f32 operand repacked for the bf16 dot product: each run of `2 * width` values becomes
/// `width` 32-bit slots, slot i holding values i and `width + i` as bf16 (rounded to nearest even,
/// exact for bf16 inputs; the first in the low half, the operand layout of `vdpbf16ps`); a last
/// run of only `width` values is paired with zeros. With width 1 a q row becomes pairs along d;
/// with width 16 a k panel (`[c][l]`) becomes `[c / 2][l]` pairs; with width dp the (t, dp) v rows
/// become pairs of consecutive keys.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) fn bf16_pairs(src: &AlignedBuf, width: usize) -> AlignedBuf {
    let src = src.as_slice();
    let mut buf = AlignedBuf::new(src.len().div_ceil(2 * width) * width);
    let bits = |x: f32| u32::from(bf16::from_f32(x).to_bits());
    for (dst, run) in buf.as_mut_u32().chunks_exact_mut(width).zip(src.chunks(2 * width)) {
        let (lo, hi) = run.split_at(width);
        for (i, y) in dst.iter_mut().enumerate() {
            *y = bits(lo[i]) | (bits(hi.get(i).copied().unwrap_or(0.0)) << 16);
        }
    }
    buf
}

/// Stores row `r` of the accumulator divided by its softmax sum into the output.
#[inline(always)]
pub(super) fn write_out<T: Elem>(o: &mut [MaybeUninit<T>], acc: &[f32], l: f32, d: usize) {
    let inv = 1.0 / l;
    for (y, x) in o[..d].iter_mut().zip(acc) {
        y.write(T::from_f32(x * inv));
    }
}
