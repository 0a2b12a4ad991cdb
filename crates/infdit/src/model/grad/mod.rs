//! The fast backward of training: fused CPU ops of the network with a hand-written backward pass
//! (a module of the model, whose forward picks them when it runs in an autograd graph).
//!
//! Each op is a candle custom op (`CustomOp1/2/3`) with a `cpu_fwd` and a `bwd`, so the network
//! code and the trainer's `loss.backward()` stay as they are while the hot path no longer
//! goes through dozens of primitive ops per layer.

use std::cell::Cell;

pub use crate::kernels::MatmulPrecision;

/// Which backward a training step uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradPath {
    /// The fused custom ops with hand-written backward (this module); the default.
    Fast,
    /// candle autograd over primitive ops (matmul + softmax from primitives, norms from
    /// primitives): the path before the fast backward, kept for comparison and tests.
    Autograd,
}

impl GradPath {
    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            GradPath::Fast => "fast",
            GradPath::Autograd => "autograd",
        }
    }
}

thread_local! {
    static PATH: Cell<GradPath> = const { Cell::new(GradPath::Fast) };
}

/// The backward the network code on this thread builds its graph for.
pub fn path() -> GradPath {
    PATH.with(Cell::get)
}

/// Runs `f` with the given backward on this thread (restored afterwards).
pub fn with_path<R>(p: GradPath, f: impl FnOnce() -> R) -> R {
    with_set(&PATH, p, f)
}

thread_local! {
    static MATMUL: Cell<MatmulPrecision> = const { Cell::new(MatmulPrecision::F32) };
}

/// Runs `f` with the fast ops' products on this thread in precision `p` (restored afterwards;
/// f32 unless set).
pub fn with_matmul<R>(p: MatmulPrecision, f: impl FnOnce() -> R) -> R {
    with_set(&MATMUL, p, f)
}

/// Runs `f` with the thread-local `key` set to `v`, restored afterwards (also when `f` panics).
fn with_set<T: Copy + 'static, R>(key: &'static std::thread::LocalKey<Cell<T>>, v: T, f: impl FnOnce() -> R) -> R {
    struct Restore<T: Copy + 'static>(&'static std::thread::LocalKey<Cell<T>>, T);
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _restore = Restore(key, key.with(|c| c.replace(v)));
    f()
}

/// The precision the fast ops' products run in on this thread: the one [`with_matmul`] set, as
/// this CPU and kernel path can run it ([`MatmulPrecision::effective`]).
pub fn products() -> MatmulPrecision {
    MATMUL.with(Cell::get).effective()
}

/// Whether the fast ops apply to tensors that are part of an autograd graph: the fast path is
/// selected on this thread and every tensor is f32 on the CPU.
pub fn applies(ts: &[&candle_core::Tensor]) -> bool {
    path() == GradPath::Fast && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
}

/// Whether the fast ops run for these operands: at least one is part of an autograd graph (a
/// training forward) and [`applies`] holds for all of them.
pub fn trains(ts: &[&candle_core::Tensor]) -> bool {
    ts.iter().any(|t| t.track_op()) && applies(ts)
}

pub mod attention;
pub mod gather;
pub mod gelu;
pub mod group_pos;
pub mod linear;
pub mod norm;
pub mod rope;

pub use attention::{attention, attention_reference, softmax_differentiable};
pub use gather::{gather, gather_reference};
pub use gelu::gelu;
pub use group_pos::{add_group_pos, add_group_pos_reference};
pub use linear::{gelu_linear, linear, linear_reference};
pub use norm::{ln_affine, ln_affine_reference};
pub use rope::{heads_rope, heads_rope_reference};

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

/// The f32 values of a contiguous CPU storage under `layout`.
pub(crate) fn slice<'a>(s: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let all = s.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("{what}: the operand must be contiguous"),
    }
}

/// Runs `f` on the f32 values of `t` (made contiguous first if it is not).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = if t.is_contiguous() { t.clone() } else { t.contiguous()? };
    let (st, layout) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(s) => Ok(f(slice(s, layout, "with_f32")?)),
        _ => candle_core::bail!("the fast backward runs on the CPU only"),
    }
}

/// A new CPU tensor from values.
pub(crate) fn tensor(v: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
}

#[cfg(test)]
pub(crate) mod testutil {
    use candle_core::{Device, Tensor, Var};

    /// Deterministic values in [-1, 1).
    pub fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    pub fn var(seed: u64, shape: &[usize]) -> Var {
        let n = shape.iter().product();
        Var::from_tensor(&Tensor::from_vec(values(seed, n), shape, &Device::Cpu).unwrap()).unwrap()
    }

    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    pub fn max_abs(a: &Tensor) -> f32 {
        a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    pub fn to_vec(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Central finite differences of the scalar `f` (evaluated in f64 from f32 inputs) at the
    /// given input values, for the listed coordinates.
    pub fn central_diff(x: &[f32], idx: &[usize], h: f32, f: impl Fn(&[f32]) -> f64) -> Vec<f64> {
        idx.iter()
            .map(|&i| {
                let mut p = x.to_vec();
                p[i] = x[i] + h;
                let fp = f(&p);
                p[i] = x[i] - h;
                let fm = f(&p);
                (fp - fm) / (2.0 * h as f64)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
