//! Small numeric building blocks shared by the DiT and the CLIP tower.
//!
//! Normalisations are written with differentiable candle primitives, with statistics in f32
//! whatever the activation dtype. Attention uses the fused CPU kernel (inference only: it has no
//! backward pass), cuBLAS and candle's fused softmax on a GPU.

use candle_core::{D, DType, Module, Result, Tensor};

use crate::weights::WeightLoader;

/// A dense layer `y = x W^T + b` with the PyTorch weight layout (out, in).
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    /// Loads `{name}.weight` (out, in) and `{name}.bias` (out).
    pub fn load(w: &WeightLoader, name: &str, inp: usize, out: usize) -> Result<Self> {
        let w = w.pp(name);
        let weight = w.get((out, inp), "weight")?;
        let bias = w.get(out, "bias")?;
        Ok(Self { inner: candle_nn::Linear::new(weight, Some(bias)) })
    }
    /// From tensors.
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { inner: candle_nn::Linear::new(weight, bias) }
    }
    /// The weight (out, in).
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }
    /// The bias (out), if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }
    /// Output rows `start..start + len` of the layer (the same rows of `W` and the bias).
    pub fn rows(&self, start: usize, len: usize) -> Result<Self> {
        let b = self.bias().map(|b| b.narrow(0, start, len)).transpose()?;
        Ok(Self::from_parts(self.weight().narrow(0, start, len)?, b))
    }
    /// Whether a call on `x` is a training forward that runs as [`crate::model::grad::linear`]
    /// ([`crate::model::grad::trains`] for `x`, the weight and the bias).
    pub fn trains(&self, x: &Tensor) -> bool {
        match self.bias() {
            Some(b) => crate::model::grad::trains(&[x, self.weight(), b]),
            None => crate::model::grad::trains(&[x, self.weight()]),
        }
    }
    /// `x W^T` without the bias (for kernels that fuse the bias into what follows).
    pub fn forward_no_bias(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.inner.weight();
        if crate::kernels::bf16_gemm::applies(x, w, None) {
            return crate::kernels::bf16_gemm::linear(x, w, None);
        }
        let dims = x.dims();
        // Flatten leading dims: one GEMM with a transposed (strided) rhs, no copy of W.
        let inp = dims[dims.len() - 1];
        let rows = x.elem_count() / inp;
        let x2 = x.reshape((rows, inp))?;
        let y = if f16_sums_in_f16(x) {
            // f32 sums, as every other path makes them (see `f16_sums_in_f16`).
            x2.to_dtype(DType::F32)?.matmul(&w.to_dtype(DType::F32)?.t()?)?.to_dtype(DType::F16)?
        } else {
            x2.matmul(&w.t()?)?
        };
        let mut out = dims.to_vec();
        *out.last_mut().expect("a linear input has a last dimension") = w.dim(0)?;
        y.reshape(out)
    }
}

/// Whether candle's matmul would sum this f16 product in f16: on aarch64 CPUs with the FP16
/// arithmetic extension (Apple Silicon, Graviton 2 and later), the `gemm` crate's `neonfp16`
/// kernel multiplies and accumulates in f16, about 4x less accurate than the f32 sums of every
/// other path (docs/kernels.md). There the dense layers convert to f32 first.
fn f16_sums_in_f16(x: &Tensor) -> bool {
    #[cfg(target_arch = "aarch64")]
    {
        x.dtype() == DType::F16 && x.device().is_cpu() && std::arch::is_aarch64_feature_detected!("fp16")
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        let _ = x;
        false
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = (self.inner.weight(), self.inner.bias());
        if crate::kernels::bf16_gemm::applies(x, w, b) {
            return crate::kernels::bf16_gemm::linear(x, w, b);
        }
        // Training: the whole layer as one op with a hand-written backward.
        if self.trains(x) {
            return crate::model::grad::linear(x, w, b);
        }
        let y = self.forward_no_bias(x)?;
        match self.inner.bias() {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// LayerNorm over the last dimension without affine parameters, statistics in f32 (two passes):
/// the fused kernel ([`crate::kernels::fused::layer_norm_affine`]) for CPU inference, else
/// [`layer_norm_plain`].
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::kernels::applies(&[x]) {
        return crate::kernels::fused::layer_norm_affine(x, None, None, eps);
    }
    if crate::model::grad::applies(&[x]) {
        let c = x.dim(D::Minus1)?;
        let ones = Tensor::ones(c, DType::F32, x.device())?;
        return crate::model::grad::ln_affine(x, &ones, &ones.zeros_like()?, eps);
    }
    layer_norm_plain(x, eps)
}

/// [`layer_norm`] from differentiable candle primitives.
pub fn layer_norm_plain(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    xc.broadcast_mul(&rstd)?.to_dtype(dt)
}

/// An affine LayerNorm over the last dimension (`nn.LayerNorm` with weight and bias).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `{name}.weight` and `{name}.bias` of width `dim`.
    pub fn load(w: &WeightLoader, name: &str, dim: usize, eps: f64) -> Result<Self> {
        let w = w.pp(name);
        Ok(Self { weight: w.get(dim, "weight")?, bias: w.get(dim, "bias")?, eps })
    }
    /// From tensors.
    pub fn from_parts(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }
    /// The weight, bias and epsilon.
    pub fn parts(&self) -> (&Tensor, &Tensor, f64) {
        (&self.weight, &self.bias, self.eps)
    }
    /// [`Module::forward`] from differentiable candle primitives.
    pub fn forward_plain(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm_plain(x, self.eps)?.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if crate::kernels::applies(&[x, &self.weight, &self.bias]) {
            return crate::kernels::fused::layer_norm_affine(x, Some(&self.weight), Some(&self.bias), self.eps);
        }
        if crate::model::grad::applies(&[x, &self.weight, &self.bias]) {
            return crate::model::grad::ln_affine(x, &self.weight, &self.bias, self.eps);
        }
        self.forward_plain(x)
    }
}

/// adaLN modulation `z * (1 + scale) + shift`, with `shift`/`scale` broadcast over tokens.
pub fn modulate(z: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    z.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

/// `modulate(layer_norm(x), shift, scale)`, fused into one pass for CPU inference.
pub fn norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::kernels::applies(&[x, shift, scale]) {
        return crate::kernels::fused::layer_norm_affine(x, Some(&(scale + 1.0)?), Some(shift), eps);
    }
    if crate::model::grad::applies(&[x, shift, scale]) {
        return crate::model::grad::ln_affine(x, &(scale + 1.0)?, shift, eps);
    }
    modulate(&layer_norm_plain(x, eps)?, shift, scale)
}

/// Cuts (B, C, H, W) into non-overlapping p x p patches: (B, (H/p)(W/p), C p p), patches in row-major
/// order and features in (c, ky, kx) order, i.e. the layout of a stride-p convolution's weight
/// (out, C, p, p) flattened. A patch convolution is then one GEMM.
pub fn patchify(x: &Tensor, p: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if h % p != 0 || w % p != 0 {
        candle_core::bail!("patchify: image {h}x{w} is not a multiple of the patch {p}")
    }
    x.reshape((b, c, h / p, p, w / p, p))? // (b, c, gh, ky, gw, kx)
        .permute((0, 2, 4, 1, 3, 5))? // (b, gh, gw, c, ky, kx)
        .reshape((b, (h / p) * (w / p), c * p * p))
}

/// A convolution with kernel = stride = p (a patch embedding), as one GEMM.
#[derive(Debug, Clone)]
pub struct PatchConv {
    linear: Linear,
    patch: usize,
}

impl PatchConv {
    /// Loads `{name}.weight` (out, in, p, p) and, when `bias`, `{name}.bias`.
    pub fn load(w: &WeightLoader, name: &str, inp: usize, out: usize, p: usize, bias: bool) -> Result<Self> {
        let w = w.pp(name);
        let weight = w.get((out, inp, p, p), "weight")?.reshape((out, inp * p * p))?;
        let bias = if bias { Some(w.get(out, "bias")?) } else { None };
        Ok(Self { linear: Linear::from_parts(weight, bias), patch: p })
    }

    /// (B, C, H, W) -> (B, (H/p)(W/p), out), tokens in row-major order.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear.forward(&patchify(x, self.patch)?)
    }
}

/// Scaled dot-product attention `softmax(q k^T / sqrt(d)) v` for (N, H, Tq, d) x (N, H, Tk, d).
///
/// On the CPU this is the fused kernel of [`crate::kernels::attention`] (online softmax, no score matrix in
/// memory). On a GPU it is cuBLAS products around candle's fused softmax (`attention_device`).
/// Whenever an operand is part of an autograd graph (training: the fused kernel and candle's fused
/// softmax have no backward pass), it is the training op with a hand-written backward
/// ([`crate::model::grad::attention`], f32 on the CPU), else (or with
/// [`crate::model::grad::GradPath::Autograd`]) the plain matmul/softmax/matmul from differentiable
/// primitives. The last two run in slices over N so that the score matrix stays within
/// `max_score_bytes`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, max_score_bytes: usize) -> Result<Tensor> {
    let d = q.dim(3)?;
    let scale = 1.0 / (d as f64).sqrt();
    let tracked = q.track_op() || k.track_op() || v.track_op();
    if q.device().is_cpu() && !tracked {
        return crate::kernels::attention::fused_attention(q, k, v, scale);
    }
    if !tracked {
        return attention_device(q, k, v, scale, max_score_bytes);
    }
    if crate::model::grad::applies(&[q, k, v]) {
        return crate::model::grad::attention(q, k, v);
    }
    by_batch_slices(q, k, v, max_score_bytes, |qi, ki, vi| {
        let s = (qi.matmul(&ki.t()?)? * scale)?.to_dtype(DType::F32)?;
        crate::model::grad::softmax_differentiable(&s)?.to_dtype(vi.dtype())?.matmul(vi)
    })
}

/// `f` on slices of the batch (dimension 0) of q, k, v (contiguous), each slice small enough that
/// its (H, Tq, Tk) scores take at most `max_score_bytes` at 4 bytes a score; results concatenated.
fn by_batch_slices(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    max_score_bytes: usize,
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (n, h, tq, _) = q.dims4()?;
    let tk = k.dim(2)?;
    let per = (h * tq * tk * 4).max(1);
    let chunk = (max_score_bytes / per).clamp(1, n.max(1));
    let mut outs = Vec::with_capacity(n.div_ceil(chunk));
    let mut i = 0;
    while i < n {
        let c = chunk.min(n - i);
        let qi = q.narrow(0, i, c)?.contiguous()?;
        let ki = k.narrow(0, i, c)?.contiguous()?;
        let vi = v.narrow(0, i, c)?.contiguous()?;
        outs.push(f(&qi, &ki, &vi)?);
        i += c;
    }
    if outs.len() == 1 { Ok(outs.remove(0)) } else { Tensor::cat(&outs, 0) }
}

/// Inference attention on a GPU (or any non-CPU device): per slice of the batch, `S = (q scale)
/// k^T` by cuBLAS, candle's fused softmax over the keys, `S v` by cuBLAS. The slices keep the
/// score matrix within `max_score_bytes` (counted at 4 bytes a score).
///
/// The scale is folded into `q` (a (N, H, Tq, d) product instead of one over the scores), and in
/// bf16/f16 the scores and probabilities stay in that dtype: the product's output is already
/// rounded to it, and candle's half-precision softmax sums in f32, so going through f32 would only
/// add two passes over the largest tensor. In f32 the scores are f32 throughout.
fn attention_device(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, max_score_bytes: usize) -> Result<Tensor> {
    by_batch_slices(&(q * scale)?, k, v, max_score_bytes, |qi, ki, vi| {
        candle_nn::ops::softmax_last_dim(&qi.matmul(&ki.t()?)?)?.to_dtype(vi.dtype())?.matmul(vi)
    })
}

/// L2 normalisation over the last dimension, as `F.normalize` (norm clamped at 1e-12).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rand(seed: u64, shape: (usize, usize, usize, usize)) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap();
        let b = b.to_dtype(DType::F32).unwrap();
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// The GPU path's arithmetic (scale folded into q, slices, half-precision scores), run on the
    /// CPU against the fused kernel's reference.
    #[test]
    fn device_attention_matches_the_reference() {
        let (q, k, v) = (rand(1, (3, 2, 16, 8)), rand(2, (3, 2, 64, 8)), rand(3, (3, 2, 64, 8)));
        let q = q.transpose(2, 3).unwrap().contiguous().unwrap().transpose(2, 3).unwrap(); // strided q
        let scale = 1.0 / 8f64.sqrt();
        let want = crate::kernels::attention::attention_reference(&q, &k, &v, scale).unwrap();
        // One slice, and slices of one batch entry (budget below one entry's scores).
        for budget in [1 << 30, 1] {
            let got = attention_device(&q, &k, &v, scale, budget).unwrap();
            assert_eq!(got.dims(), [3, 2, 16, 8]);
            assert!(max_diff(&got, &want) < 1e-5, "f32, budget {budget}: {}", max_diff(&got, &want));
        }
        let h = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let got = attention_device(&h(&q), &h(&k), &h(&v), scale, 1).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        assert!(max_diff(&got, &want) < 0.05, "bf16: {}", max_diff(&got, &want));
    }
}
