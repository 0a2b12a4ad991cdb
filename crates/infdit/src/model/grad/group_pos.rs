//! The UniBA block offsets `P` added to the four key groups, as one op with a hand-written
//! backward: `out[i, h, g T + t, :] = k[i, h, g T + t, :] + p[h, g, :]`; `dk = grad`,
//! `dp[h, g, :]` = the sum of `grad[i, h, g T + t, :]` over blocks i and tokens t, in that order
//! (the same bits for any thread count). Through candle the add is a broadcast whose backward
//! reduces the key-sized gradient with a generic strided sum (7 % of a training step of the
//! built-in model in a profile).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, tensor, with_f32};

struct GroupPos;

/// (n, H, T, d) of keys (n, H, 4T, d) and offsets (1, H, 4, 1, d).
fn check(k: &[usize], p: &[usize]) -> Result<(usize, usize, usize, usize)> {
    let ([n, h, t4, d], [1, ph, 4, 1, pd]) = (k, p) else {
        candle_core::bail!("group offsets: keys {k:?} and offsets {p:?}, expected (n, H, 4T, d) and (1, H, 4, 1, d)")
    };
    if ph != h || pd != d || t4 % 4 != 0 {
        candle_core::bail!("group offsets: keys {k:?} and offsets {p:?} do not match")
    }
    Ok((*n, *h, t4 / 4, *d))
}

impl CustomOp2 for GroupPos {
    fn name(&self) -> &'static str {
        "train-group-offsets"
    }

    fn cpu_fwd(&self, sk: &CpuStorage, lk: &Layout, sp: &CpuStorage, lp: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, h, t, d) = check(lk.dims(), lp.dims())?;
        let (k, p) = (slice(sk, lk, "group offsets k")?, slice(sp, lp, "group offsets p")?);
        let mut out = vec![0f32; k.len()];
        // One task per (block, head, group): T rows of d values plus the group's offset.
        out.par_chunks_mut(t * d).zip(k.par_chunks(t * d)).enumerate().for_each(|(j, (o, k))| {
            let hg = j % (h * 4);
            let off = &p[hg * d..][..d];
            for (orow, krow) in o.chunks_exact_mut(d).zip(k.chunks_exact(d)) {
                for ((o, k), p) in orow.iter_mut().zip(krow).zip(off) {
                    *o = k + p;
                }
            }
        });
        Ok((CpuStorage::F32(out), lk.shape().clone()))
    }

    fn bwd(&self, k: &Tensor, p: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, h, t, d) = check(k.dims(), p.dims())?;
        let dp = with_f32(&grad.detach(), |g| {
            let sums: Vec<Vec<f32>> = (0..h * 4)
                .into_par_iter()
                .map(|hg| {
                    let mut acc = vec![0f32; d];
                    for i in 0..n {
                        for row in g[(i * h * 4 + hg) * t * d..][..t * d].chunks_exact(d) {
                            for (a, v) in acc.iter_mut().zip(row) {
                                *a += v;
                            }
                        }
                    }
                    acc
                })
                .collect();
            sums.concat()
        })?;
        Ok((Some(grad.clone()), Some(tensor(dp, p.dims())?)))
    }
}

/// `k` (n, H, 4T, d) plus `p` (1, H, 4, 1, d) broadcast over blocks and tokens, f32 on the CPU,
/// with the backward above.
pub fn add_group_pos(k: &Tensor, p: &Tensor) -> Result<Tensor> {
    k.contiguous()?.apply_op2(&p.contiguous()?, GroupPos)
}

/// The same from candle primitives (reshape, broadcast add, reshape).
pub fn add_group_pos_reference(k: &Tensor, p: &Tensor) -> Result<Tensor> {
    let (n, h, t4, d) = k.dims4()?;
    k.reshape((n, h, 4, t4 / 4, d))?.broadcast_add(p)?.reshape((n, h, t4, d))
}
