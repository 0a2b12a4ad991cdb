//! What the official Inf-DiT code fixes and infdit reproduces, in one place: its constants and the
//! names of its settings, so that no other module writes them as bare literals.

/// The official script's `--round 32`: the input is centre-cropped to a multiple of this many
/// pixels on each side before upscaling (infdit's own default pads instead; see
/// [`crate::prepare::prepare_padded`]).
pub const CROP_MULTIPLE: usize = 32;
