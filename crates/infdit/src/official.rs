//! What the official Inf-DiT code fixes and infdit reproduces, in one place: its constants and the
//! names of its settings, so that no other module writes them as bare literals.

/// The official script's `--round 32`: the input is centre-cropped to a multiple of this many
/// pixels on each side before upscaling (infdit's own default pads instead; see
/// [`crate::prepare::prepare_padded`]).
pub const CROP_MULTIPLE: usize = 32;

/// The flag names of the official code's configuration (its command line, as the parity configs
/// record it under `official_cli_flags`), which [`crate::config::ModelConfig`] reads.
pub mod flags {
    /// Width of the transformer.
    pub const HIDDEN_SIZE: &str = "--hidden-size";
    /// Patch side in pixels.
    pub const PATCH_SIZE: &str = "--patch-size";
    /// Transformer layers.
    pub const NUM_LAYERS: &str = "--num-layers";
    /// Attention heads.
    pub const NUM_ATTENTION_HEADS: &str = "--num-attention-heads";
    /// Input channels (noisy image and upsampled LR).
    pub const IN_CHANNELS: &str = "--in-channels";
    /// Output channels.
    pub const OUT_CHANNELS: &str = "--out-channels";
    /// Block side in pixels (UniBA).
    pub const IMAGE_BLOCK_SIZE: &str = "--image-block-size";
    /// Width of the conditioning vector.
    pub const VECTOR_DIM: &str = "--vector-dim";
    /// Training image size (RoPE tables).
    pub const IMAGE_SIZE: &str = "--image-size";
    /// The super-resolution factor.
    pub const SR_SCALE: &str = "--sr-scale";
    /// LayerNorm epsilon.
    pub const LAYERNORM_EPSILON: &str = "--layernorm-epsilon";
    /// Switches of the released architecture, all on: infdit implements that architecture only.
    pub const RELEASED_SWITCHES: [&str; 4] = ["--nogate", "--qk-ln", "--re-position", "--cross-lr"];
}
