//! The open_clip ViT image tower that makes Inf-DiT's global conditioning vector (spec §8).
//!
//! `conv1` (patch conv without bias) -> class token + learned positions -> `ln_pre` -> pre-LN blocks
//! (packed `in_proj` multi-head attention, exact-erf GELU MLP) -> `ln_post` on all tokens -> token 0
//! `@ proj` -> L2-normalised twice (`F.normalize(encode_image(x, normalize=True))`).

use candle_core::{DType, Module, Result, Tensor};

use crate::config::ClipConfig;
use crate::imageio::resize::{Bicubic, center_crop_offsets, resize_shorter_side, resize_tensor};
use crate::model::ops::{LayerNorm, Linear, PatchConv, attention, l2_normalize};
use crate::weights::WeightLoader;

#[derive(Debug, Clone)]
struct ResBlock {
    ln_1: LayerNorm,
    in_proj: Linear,
    out_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
}

/// The CLIP vision tower.
#[derive(Debug, Clone)]
pub struct ClipVision {
    cfg: ClipConfig,
    conv1: PatchConv,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    blocks: Vec<ResBlock>,
    ln_post: LayerNorm,
    proj: Tensor,
}

impl ClipVision {
    /// Loads the tower from `w` positioned at the open_clip model root (the `visual.` prefix is added
    /// here). Weights are kept in f32 whatever the DiT dtype: the tower runs once per image.
    pub fn load(cfg: &ClipConfig, w: &WeightLoader) -> Result<Self> {
        cfg.validate().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let v = w.with_dtype(DType::F32).pp("visual");
        let wd = cfg.width;
        let f32w = |shape: &[usize], name: &str| v.get(shape, name);
        let blocks = (0..cfg.layers)
            .map(|l| {
                let b = v.pp("transformer.resblocks").pp(l);
                Ok(ResBlock {
                    ln_1: LayerNorm::load(&b, "ln_1", wd, cfg.ln_eps)?,
                    in_proj: Linear::from_parts(
                        b.pp("attn").get((3 * wd, wd), "in_proj_weight")?,
                        Some(b.pp("attn").get(3 * wd, "in_proj_bias")?),
                    ),
                    out_proj: Linear::load(&b.pp("attn"), "out_proj", wd, wd)?,
                    ln_2: LayerNorm::load(&b, "ln_2", wd, cfg.ln_eps)?,
                    c_fc: Linear::load(&b.pp("mlp"), "c_fc", wd, cfg.mlp_hidden)?,
                    c_proj: Linear::load(&b.pp("mlp"), "c_proj", cfg.mlp_hidden, wd)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            conv1: PatchConv::load(&v, "conv1", 3, wd, cfg.patch, false)?,
            class_embedding: f32w(&[wd], "class_embedding")?,
            positional_embedding: f32w(&[cfg.tokens(), wd], "positional_embedding")?,
            ln_pre: LayerNorm::load(&v, "ln_pre", wd, cfg.ln_eps)?,
            blocks,
            ln_post: LayerNorm::load(&v, "ln_post", wd, cfg.ln_eps)?,
            proj: f32w(&[wd, cfg.output_dim], "proj")?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ClipConfig {
        &self.cfg
    }

    /// Inf-DiT's preprocessing of an image (1, 3, h, w) in [-1, 1]: `(x+1)/2`, resize of the
    /// shorter side to `image_size` (torchvision bicubic, antialiased by default), center crop,
    /// normalise. Returns (1, 3, S, S) f32.
    pub fn preprocess(&self, img: &Tensor, kind: Bicubic) -> Result<Tensor> {
        let s = self.cfg.image_size;
        let x = ((img.to_dtype(DType::F32)? + 1.0)? / 2.0)?;
        let (_, _, h, w) = x.dims4()?;
        let (rh, rw) = resize_shorter_side(h, w, s);
        let x = if (rh, rw) == (h, w) { x } else { resize_tensor(&x, rh, rw, kind)? };
        let (top, left) = center_crop_offsets(rh, rw, s, s);
        let x = x.narrow(2, top, s)?.narrow(3, left, s)?;
        let dev = x.device();
        let mean = Tensor::new(&self.cfg.mean, dev)?.reshape((1, 3, 1, 1))?;
        let std = Tensor::new(&self.cfg.std, dev)?.reshape((1, 3, 1, 1))?;
        x.broadcast_sub(&mean)?.broadcast_div(&std)
    }

    /// The embedding of preprocessed pixels (1, 3, S, S): (1, output_dim), L2-normalised twice, on
    /// the tower's device (the pixels are moved there).
    pub fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        let pixels = pixels.to_device(self.class_embedding.device())?;
        let x = self.conv1.forward(&pixels.to_dtype(DType::F32)?)?; // (1, G, W)
        let (b, _, wd) = x.dims3()?;
        let cls = self.class_embedding.reshape((1, 1, wd))?.broadcast_as((b, 1, wd))?;
        let x = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.positional_embedding)?;
        let mut x = self.ln_pre.forward(&x)?;
        let (h, hd) = (self.cfg.heads, wd / self.cfg.heads);
        for blk in &self.blocks {
            let t = x.dim(1)?;
            let a = blk.in_proj.forward(&blk.ln_1.forward(&x)?)?; // (b, t, 3W)
            let split = |i: usize| a.narrow(2, i * wd, wd)?.reshape((b, t, h, hd))?.transpose(1, 2);
            let ctx = attention(&split(0)?, &split(1)?, &split(2)?, 1 << 28)?;
            let ctx = ctx.transpose(1, 2)?.reshape((b, t, wd))?;
            x = (x + blk.out_proj.forward(&ctx)?)?;
            let m = blk.c_proj.forward(&blk.c_fc.forward(&blk.ln_2.forward(&x)?)?.gelu_erf()?)?;
            x = (x + m)?;
        }
        let x = self.ln_post.forward(&x)?;
        let pooled = x.narrow(1, 0, 1)?.squeeze(1)?.to_dtype(DType::F32)?; // (b, W)
        let e = pooled.matmul(&self.proj)?;
        l2_normalize(&l2_normalize(&e)?)
    }

    /// Preprocess and encode an image in [-1, 1].
    pub fn embed_image(&self, img: &Tensor, kind: Bicubic) -> Result<Tensor> {
        self.encode(&self.preprocess(img, kind)?)
    }
}
