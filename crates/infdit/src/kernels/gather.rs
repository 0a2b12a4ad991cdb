//! The UniBA key/value gather of the block scheduler in one copy.
//!
//! A batch of n blocks attends, block by block, to its own keys and those of its top-left, left
//! and top neighbours; the attention wants them as one (n, H, 4 T, d) tensor. The plain way
//! ([`neighbourhood_cat_plain`]: stack each neighbour group, then concatenate the four groups along
//! the token axis) copies every key twice, serially, and came to ~6 % of a CPU upscale in a
//! profile of the built-in model; [`neighbourhood_cat`] copies each key once, in parallel over
//! (block, head). Both give the same bits (a copy); a test compares them.

use candle_core::{DType, Result, Storage, Tensor};
use half::{bf16, f16};

use super::{Elem, par_filled};

/// Block `i`'s `[own, top-left, left, top]` keys (or values), each (H, T, d), concatenated along
/// the token axis, for all blocks of `pieces`: (n, H, 4 T, d). On the CPU (outside autograd) one
/// parallel copy; elsewhere [`neighbourhood_cat_plain`].
pub fn neighbourhood_cat(pieces: &[[Tensor; 4]]) -> Result<Tensor> {
    let Some(first) = pieces.first() else { candle_core::bail!("neighbourhood_cat: no blocks") };
    let (h, t, d) = first[0].dims3()?;
    let dtype = first[0].dtype();
    for p in pieces.iter().flatten() {
        if p.dims3()? != (h, t, d) || p.dtype() != dtype {
            candle_core::bail!("neighbourhood_cat: piece {:?} {:?} vs ({h}, {t}, {d}) {dtype:?}", p.dims(), p.dtype())
        }
    }
    let all: Vec<&Tensor> = pieces.iter().flatten().collect();
    if !super::applies(&all) {
        return neighbourhood_cat_plain(pieces);
    }
    let contiguous: Vec<Tensor> = all.iter().map(|p| p.contiguous()).collect::<Result<_>>()?;
    let n = pieces.len();
    let (shape, dev) = ((n, h, 4 * t, d), first[0].device());
    match dtype {
        DType::F32 => Tensor::from_vec(gather::<f32>(&contiguous, h, t * d)?, shape, dev),
        DType::BF16 => Tensor::from_vec(gather::<bf16>(&contiguous, h, t * d)?, shape, dev),
        DType::F16 => Tensor::from_vec(gather::<f16>(&contiguous, h, t * d)?, shape, dev),
        _ => neighbourhood_cat_plain(pieces),
    }
}

/// The plain [`neighbourhood_cat`]: each neighbour group stacked, then the four concatenated
/// along the token axis (any device, autograd included).
pub fn neighbourhood_cat_plain(pieces: &[[Tensor; 4]]) -> Result<Tensor> {
    let group = |g: usize| Tensor::stack(&pieces.iter().map(|p| &p[g]).collect::<Vec<_>>(), 0);
    Tensor::cat(&[group(0)?, group(1)?, group(2)?, group(3)?], 2)
}

/// `out[(i H + h) 4 T d + g T d ..][.. T d] = pieces[4 i + g][h T d ..][.. T d]`, with `td` = T d.
fn gather<T: Elem>(pieces: &[Tensor], h: usize, td: usize) -> Result<Vec<T>> {
    let guards: Vec<_> = pieces.iter().map(|p| p.storage_and_layout()).collect();
    let mut slices: Vec<&[T]> = Vec::with_capacity(pieces.len());
    for (s, l) in &guards {
        let Storage::Cpu(cs) = &**s else { candle_core::bail!("neighbourhood_cat: expected a CPU tensor") };
        let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("neighbourhood_cat: not contiguous") };
        slices.push(&T::cpu_storage_as_slice(cs)?[a..b]);
    }
    let n = pieces.len() / 4;
    // SAFETY: chunk `ih` is the 4 T d values of one (block, head) pair, written as four runs of `td`
    // values, each zipped with a source run of exactly `td` values (every piece holds h * td).
    let out = unsafe {
        par_filled(n * h * 4 * td, 4 * td, |ih, o| {
            let (i, hh) = (ih / h, ih % h);
            for (g, run) in o.chunks_exact_mut(td).enumerate() {
                let src = &slices[4 * i + g][hh * td..(hh + 1) * td];
                for (o, s) in run.iter_mut().zip(src) {
                    o.write(*s);
                }
            }
        })
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_rand::rand;
    use candle_core::IndexOp;

    #[test]
    fn one_copy_equals_stack_and_cat_bit_for_bit() -> Result<()> {
        // Pieces as the scheduler makes them: views of a batch tensor (offset, contiguous), a
        // transposed (non-contiguous) one, and stand-alone cached blocks.
        let (h, t, d) = (3, 5, 4);
        let batch = rand(1, &[2, h, t, d], 1.0);
        let cached = rand(2, &[h, t, d], 1.0);
        let odd = rand(3, &[h, d, t], 1.0).transpose(1, 2)?;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let c = |x: &Tensor| x.to_dtype(dtype);
            let (b0, b1) = (c(&batch.i(0)?)?, c(&batch.i(1)?)?);
            let pieces =
                [[b0.clone(), c(&cached)?, c(&odd)?, b1.clone()], [b1.clone(), b0.clone(), c(&cached)?, c(&odd)?]];
            let fast = neighbourhood_cat(&pieces)?;
            let plain = neighbourhood_cat_plain(&pieces)?;
            assert_eq!(fast.dims(), &[2, h, 4 * t, d]);
            assert_eq!(fast.dtype(), dtype);
            let bits = |x: &Tensor| x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
            assert_eq!(bits(&fast)?, bits(&plain)?, "{dtype:?}");
            // Block 1, head 2, group 1 (its top-left) is block 0's head 2.
            assert_eq!(bits(&fast.i((1, 2))?.narrow(0, t, t)?)?, bits(&b0.i(2)?)?);
        }
        assert!(neighbourhood_cat(&[]).is_err());
        let wrong = [[
            rand(4, &[h, t, d], 1.0),
            rand(5, &[h, t + 1, d], 1.0),
            rand(6, &[h, t, d], 1.0),
            rand(7, &[h, t, d], 1.0),
        ]];
        assert!(neighbourhood_cat(&wrong).is_err());
        Ok(())
    }
}
