//! # infdit
//!
//! A Rust implementation of Inf-DiT ("Upsampling Any-Resolution Image with Memory-Efficient Diffusion
//! Transformer", ECCV 2024) on candle, numerically matching the official code.
//!
//! The pipeline, in the order the modules run:
//! 1. [`imageio`] reads the image; [`pipeline::prepare_official`] crops and resizes it
//!    ([`imageio::resize`] reproduces torchvision's bicubic bit for bit);
//! 2. [`clip`] embeds the LR image (global conditioning);
//! 3. [`model`] is the network: patch embedding, transformer layers with UniBA block attention
//!    ([`model::blocks`]), 2-D RoPE, the layer-0 LR cross-attention, the final layer;
//! 4. [`diffusion`] wraps it in EDM preconditioning and runs the deterministic Heun sampler;
//! 5. [`weights`] loads official `.pt` and safetensors checkpoints strictly, and converts them.
//!
//! Configuration lives in [`config`]; errors in [`error`]; the choice of CPU or GPU in [`device`].

pub mod atomic;
pub mod clip;
pub mod config;
pub mod device;
pub mod diffusion;
pub mod error;
pub mod files;
pub mod imageio;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod resume;
pub mod schedule;
pub mod train;
pub mod weights;

pub use config::{ClipConfig, DitConfig, ModelConfig};
pub use error::{InfditError, Result};
