//! The UniBA block scheduler (spec §4): one network evaluation as a raster-order sweep over
//! `n x n` batches of blocks, with a per-layer key/value cache that holds only what later batches
//! still need. Memory grows with the image width, not its area, and the result equals whole-image
//! mode (the reference's `full` inference) up to fp32 rounding.
//!
//! Why this is exact: at every layer a block's keys are those of itself and of its top-left, left
//! and top neighbours (with edge replication), all of which come earlier in raster order. For a
//! batch with rows `R0..R1` and columns `C0..C1`, the neighbours outside the batch are
//! * the last block column of the batch to the left (blocks `(r, C0-1)`, `r` in `R0..R1`),
//! * the last block row of the batch row above (blocks `(R0-1, c)`, `c` in `C0..C1`),
//! * the corner `(R0-1, C0-1)`.
//!
//! The cache therefore keeps, per layer: one block per image column (the bottom row of the batch
//! row above, overwritten batch by batch), one block per row of the current batch row (the right
//! column of the previous batch), and the corner (saved just before the batch to its left
//! overwrote it). That is `cols + n + 1` blocks per layer.
//!
//! With a GPU the cache can be kept in host memory instead ([`BlockDenoiser::with_kv_offload`]):
//! at each layer of a batch the batch's outside neighbours (at most `2n + 1` blocks) are copied to
//! the GPU once, and the blocks later batches need are copied back, so GPU memory does not grow
//! with the image at all.

mod cache;
mod driver;
mod plan;
mod whole;

pub use cache::CachedKv;
pub use driver::{BatchOutput, BlockDenoiser, SweepProgress};
pub use plan::{Batch, CPU_BATCH_TOKENS, MemoryPlan, Placement, batches};
pub use whole::{DenoiserInputs, WholeImageDenoiser, blocks_tokens_to_row_major};
