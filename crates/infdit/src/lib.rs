//! # infdit
//!
//! A Rust implementation of Inf-DiT ("Upsampling Any-Resolution Image with Memory-Efficient Diffusion
//! Transformer", ECCV 2024) on candle, numerically matching the official code.
//!
//! The pipeline, in the order the modules run (`docs/architecture.md` draws it):
//! 1. [`imageio`] reads the image (any size, bit depth, alpha, ICC and EXIF);
//! 2. [`upscale`] plans the model passes for the requested size and checks everything that can
//!    be checked before the model runs; [`Upscaler`] runs the whole pipeline, image in, image out;
//! 3. [`prepare`] pads (or, as the official code, crops) and resizes each pass's input
//!    ([`imageio::resize`] reproduces torchvision's bicubic bit for bit);
//! 4. [`clip`] embeds the LR image (global conditioning);
//! 5. [`model`] is the network: patch embedding, transformer layers with UniBA block attention
//!    ([`model::blocks`]), 2-D RoPE, the layer-0 LR cross-attention, the final layer; its hot
//!    CPU kernels live in [`kernels`];
//! 6. [`sampling`] runs the EDM Heun sampler ([`diffusion`]) over the whole image or through the
//!    UniBA block scheduler ([`schedule`]), saving a resumable state after every step
//!    ([`checkpoint`]);
//! 7. [`loaded`] and [`weights`] load official `.pt` and safetensors checkpoints strictly (or the
//!    model built into the library), and convert them.
//!
//! Configuration lives in [`config`]; the official constants in [`official`]; errors in [`error`];
//! the choice of CPU or GPU in [`device`]; batches sharded over machines, and one image over several
//! devices simulated, in [`batch`]. [`metrics`] scores upscales against references (PSNR-Y, SSIM-Y, seams);
//! [`eval`] runs an [`Upscaler`] over degraded HR images and scores it beside bicubic and other upscalers;
//! [`train`] trains or fine-tunes a model.
//!
//! ```no_run
//! # fn main() -> infdit::Result<()> {
//! use infdit::{ModelSpec, UpscaleOptions, Upscaler};
//!
//! // The small model built into the library, on the CPU, in f32.
//! let up = Upscaler::new(&ModelSpec::BuiltIn, &Default::default())?;
//! // 4x, as `infdit upscale photo.png -o photo-x4.png` does: metadata kept, written atomically.
//! let opts = UpscaleOptions::default();
//! let report = up.upscale_file("photo.png".as_ref(), "photo-x4.png".as_ref(), &opts, &mut |_| {}, None)?;
//! println!("wrote {}x{}", report.width, report.height);
//! # Ok(())
//! # }
//! ```

pub mod atomic;
pub mod batch;
pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod device;
pub mod diffusion;
pub mod error;
pub mod eval;
pub mod files;
pub mod hash;
pub mod imageio;
pub mod kernels;
pub mod loaded;
pub mod metrics;
pub mod model;
pub mod official;
pub mod prepare;
pub mod sampling;
pub mod schedule;
pub mod train;
pub mod upscale;
pub mod weights;

/// The README's example, compiled as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

pub use config::{ClipConfig, DitConfig, ModelConfig};
pub use error::{InfditError, Result};
pub use loaded::{Model, ModelSpec};
pub use upscale::{UpscaleOptions, Upscaler};
