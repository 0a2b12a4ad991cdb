//! Planning a run of the scheduler: the block batches of a grid, and the memory a run needs.

use candle_core::DType;

use crate::model::blocks::{BlockGrid, BlockPos};

/// A rectangle of blocks processed by one network call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    /// First block row.
    pub row0: usize,
    /// One past the last block row.
    pub row1: usize,
    /// First block column.
    pub col0: usize,
    /// One past the last block column.
    pub col1: usize,
}

impl Batch {
    /// Blocks of the batch in raster order.
    pub fn blocks(&self) -> Vec<BlockPos> {
        (self.row0..self.row1).flat_map(|row| (self.col0..self.col1).map(move |col| BlockPos { row, col })).collect()
    }
    /// Number of blocks.
    pub fn len(&self) -> usize {
        (self.row1 - self.row0) * (self.col1 - self.col0)
    }
    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub(crate) fn contains(&self, p: BlockPos) -> bool {
        (self.row0..self.row1).contains(&p.row) && (self.col0..self.col1).contains(&p.col)
    }
}

/// The batches of a grid for batch size `n`, in raster order; the last batch row/column may be
/// smaller when `n` does not divide the grid.
pub fn batches(grid: &BlockGrid, n: usize) -> Vec<Batch> {
    let n = n.max(1);
    let mut out = Vec::new();
    for row0 in (0..grid.rows).step_by(n) {
        for col0 in (0..grid.cols).step_by(n) {
            out.push(Batch { row0, row1: (row0 + n).min(grid.rows), col0, col1: (col0 + n).min(grid.cols) });
        }
    }
    out
}

/// Where a run keeps what a [`MemoryPlan`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Placement {
    /// The network runs on a GPU: the plan is of GPU memory.
    pub gpu: bool,
    /// The K/V cache is in host memory ([`BlockDenoiser::with_kv_offload`]); matters on a GPU.
    pub kv_offload: bool,
    /// The sampler state is in a state folder (`SampleOptions::state_dir`).
    pub state_dir: bool,
}

/// Tokens per network forward beyond which [`MemoryPlan::default_batch`] does not grow the block
/// batch on the CPU: there the kernels already use every core within a block, so a larger batch
/// buys little time for a lot of memory. Measured on the 2-core machine, 256 -> 1024 with the
/// small benchmark config (1024 tokens a block), 20 Heun steps in f32: n = 2 took 1787 s with a
/// peak RSS of 1287 MiB, n = 8 (the whole 8 x 8 grid) 1685 s with 6090 MiB: 6 % more time for
/// 4.7x less memory. With the built-in model (256 tokens a block, n = 4) one upscale ran within
/// timing noise (2.2-3.7 s) from n = 4 to 16, with 0.2 / 0.6 / 1.8 GB at n = 4 / 8 / 16.
pub const CPU_BATCH_TOKENS: usize = 4096;

/// A memory estimate for one upscale, by component, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Network weights.
    pub weights: usize,
    /// The block scheduler's K/V cache (0 in whole-image mode).
    pub kv_cache: usize,
    /// Activations of one batch (the largest forward).
    pub activations: usize,
    /// Image-size tensors (sampler state, Heun intermediates, upsampled LR, noise; with a state
    /// folder only a batch row of them and the 8-bit output), the LR image, and the LR features
    /// with their keys/values.
    pub image_state: usize,
}

impl MemoryPlan {
    /// The estimate for `grid`, with `batch` = Some(n) for the scheduler or None for whole-image
    /// mode; `act` is the activation dtype, `kv` the cache dtype, `params` the parameter count.
    /// The sampler state is in memory; see [`MemoryPlan::estimate_for`].
    pub fn estimate(
        cfg: &crate::config::DitConfig,
        params: usize,
        grid: &BlockGrid,
        batch: Option<usize>,
        act: DType,
        kv: DType,
    ) -> Self {
        Self::estimate_for(cfg, params, grid, batch, act, kv, false)
    }

    /// [`MemoryPlan::estimate`], with `state_dir` true when the scheduler keeps the sampler state
    /// in a state folder (`SampleOptions::state_dir`; ignored in whole-image mode).
    pub fn estimate_for(
        cfg: &crate::config::DitConfig,
        params: usize,
        grid: &BlockGrid,
        batch: Option<usize>,
        act: DType,
        kv: DType,
        state_dir: bool,
    ) -> Self {
        Self::estimate_placed(cfg, params, grid, batch, act, kv, Placement { state_dir, ..Placement::default() })
    }

    /// The plan of the memory that `placement` says the run needs: host memory for a run on the
    /// CPU (then as [`MemoryPlan::estimate_for`]), GPU memory for a run on a GPU. On a GPU the
    /// images, the sampler state and the noise stay in host memory, so `image_state` counts one
    /// batch's images, the upsampled LR of its batch row and the LR features of the band; with
    /// `kv_offload` the K/V cache is in host memory too and only the batch's outside neighbours
    /// (`2n + 1` blocks of one layer) are on the GPU, counted as `kv_cache`, and the LR features
    /// are those of the batch's window. Whole-image mode on a GPU holds everything there, as on
    /// the CPU.
    pub fn estimate_placed(
        cfg: &crate::config::DitConfig,
        params: usize,
        grid: &BlockGrid,
        batch: Option<usize>,
        act: DType,
        kv: DType,
        placement: Placement,
    ) -> Self {
        let state_dir = placement.state_dir;
        let t = cfg.tokens_per_block();
        let d = cfg.hidden;
        let blocks = match batch {
            Some(n) => n.min(grid.rows).max(1) * n.min(grid.cols).max(1),
            None => grid.len(),
        };
        let a = act.size_in_bytes().max(4); // norms and softmax statistics are f32
        // Per block: hidden state and its normalised copy, QKV, K/V of the four groups, attention
        // context, MLP intermediate (and its activation), plus the RoPE tables.
        let per_block = t * (2 * d + 3 * d + 8 * d + d + 2 * cfg.mlp_hidden + 2 * cfg.head_dim()) * a;
        let scores = (blocks * cfg.heads * t * 4 * t * 4).min(crate::model::layer::SCORE_BYTES);
        let kv_cache = match batch {
            Some(n) => cfg.depth * (grid.cols + n.min(grid.rows) + 1) * 2 * t * d * kv.size_in_bytes(),
            None => 0,
        };
        let (h, w) = (grid.height(), grid.width());
        // LR features and their keys/values: the whole padded map in whole-image mode, one band of
        // batch rows (plus an LR block above and below) in the scheduler.
        let lb = cfg.lr_block();
        let lr_rows = match batch {
            Some(n) => lb * n.min(grid.rows).max(1) + 2 * lb,
            None => h / cfg.sr_scale / cfg.lr_patch + 2 * lb,
        };
        let lr_tokens = lr_rows * (w / cfg.sr_scale / cfg.lr_patch + 2 * lb);
        // Image-size f32 tensors (3 channels): in whole-image mode x, the upsampled LR, the noise,
        // the denoiser output and the Heun intermediates; in the scheduler with the state in
        // memory the per-block x, derivative and Euler point, the upsampled LR, the noise and one
        // transient copy (the assembled sample or a checkpoint). With a state folder: the upsampled
        // LR of one batch row (and its blocks), x, derivative, Euler point, noise and input of one
        // batch, and the 8-bit output image (3 bytes per pixel) the caller writes.
        let px = h * w;
        // Pixels of one batch row of the output (the band), and of the batch's blocks.
        let band_px = batch.map_or(0, |n| n.min(grid.rows).max(1) * grid.block_px * w);
        let batch_px = blocks * grid.block_px * grid.block_px;
        let images = match (batch, state_dir) {
            (None, _) => 7 * 3 * px * 4,
            (Some(_), false) => 6 * 3 * px * 4,
            (Some(_), true) => 2 * 3 * band_px * 4 + 6 * 3 * batch_px * 4 + 3 * px,
        };
        // The LR image itself, and its padded copy (1/16 of the output's pixels each).
        let lr_px = px / (cfg.sr_scale * cfg.sr_scale);
        let lr_image = 2 * 3 * lr_px * 4;
        // A residual model's flat-area gate (one f32 channel): its LR-size map, and the whole
        // output-size gate in whole-image mode or one batch row of it and its blocks in the
        // scheduler; on a GPU, the batch row (or, offloaded, the batch's blocks) there.
        let gated = cfg.precond.gate_range().is_some();
        let gate = match (gated, batch) {
            (false, _) => 0,
            (true, None) => lr_px * 4 + px * 4,
            (true, Some(_)) => lr_px * 4 + band_px * 4 + batch_px * 4,
        };
        let activations = blocks * per_block + scores;
        let weights = params * act.size_in_bytes();
        if let (true, Some(n)) = (placement.gpu, batch) {
            // x, the upsampled LR, D and the Heun intermediates of one batch.
            let batch_images = 6 * 3 * batch_px * 4;
            let (kv_cache, lr_tokens, band) = if placement.kv_offload {
                // The outside neighbours of one layer, and the LR window of one batch.
                let outside = n.min(grid.rows) + n.min(grid.cols) + 1;
                let side = |k: usize| lb * n.min(k).max(1) + 2 * lb;
                let kv_bytes = kv.size_in_bytes().max(act.size_in_bytes());
                (outside * 2 * t * d * kv_bytes, side(grid.rows) * side(grid.cols), 0)
            } else {
                // The cache, the LR features of a batch row and its upsampled LR.
                (kv_cache, lr_tokens, 3 * band_px * 4)
            };
            // The flat gate on the GPU: the batch's blocks, and its band unless offloaded.
            let gpu_gate = match (gated, placement.kv_offload) {
                (false, _) => 0,
                (true, true) => batch_px * 4,
                (true, false) => band_px * 4 + batch_px * 4,
            };
            let image_state = batch_images + band + gpu_gate + lr_tokens * 3 * d * 4;
            return Self { weights, kv_cache, activations, image_state };
        }
        let image_state = images + lr_image + gate + lr_tokens * 3 * d * 4;
        Self { weights, kv_cache, activations, image_state }
    }

    /// Sum of the components.
    pub fn total(&self) -> usize {
        self.weights + self.kv_cache + self.activations + self.image_state
    }

    /// The batch side a run uses when none is given: the largest n whose plan fits `limit` bytes
    /// (None if even n = 1 does not); on the CPU at most the n whose n x n blocks hold
    /// [`CPU_BATCH_TOKENS`] tokens (at least 1), where a larger batch costs much memory for little
    /// time.
    pub fn default_batch(
        cfg: &crate::config::DitConfig,
        params: usize,
        grid: &BlockGrid,
        act: DType,
        kv: DType,
        limit: usize,
        placement: Placement,
    ) -> Option<usize> {
        let n = Self::largest_batch_placed(cfg, params, grid, act, kv, limit, placement)?;
        if placement.gpu {
            return Some(n);
        }
        let tokens = (cfg.block_px / cfg.patch).pow(2).max(1);
        Some(n.min((CPU_BATCH_TOKENS / tokens).isqrt().max(1)))
    }

    /// The largest batch side n whose plan for `placement` fits in `limit` bytes (GPU memory for a
    /// GPU run; see [`MemoryPlan::estimate_placed`]), or None if even n = 1 does not.
    pub fn largest_batch_placed(
        cfg: &crate::config::DitConfig,
        params: usize,
        grid: &BlockGrid,
        act: DType,
        kv: DType,
        limit: usize,
        placement: Placement,
    ) -> Option<usize> {
        (1..=grid.rows.max(grid.cols))
            .take_while(|&n| Self::estimate_placed(cfg, params, grid, Some(n), act, kv, placement).total() <= limit)
            .last()
    }
}

impl std::fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
        write!(
            f,
            "weights {:.1} MiB + K/V cache {:.1} MiB + activations {:.1} MiB + image state {:.1} MiB = {:.1} MiB",
            mib(self.weights),
            mib(self.kv_cache),
            mib(self.activations),
            mib(self.image_state),
            mib(self.total())
        )
    }
}
