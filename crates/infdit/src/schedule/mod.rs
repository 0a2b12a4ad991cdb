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

pub mod state;

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

use crate::diffusion::Denoise;
use crate::model::blocks::{BlockGrid, BlockPos, KvSource, blocks_to_image, concat_groups, neighbours, take_blocks};
use crate::model::{ImageCond, InfDit};
use crate::pipeline::ConcatLr;

/// K and V of one block at one layer, (H, T, d) each.
#[derive(Debug, Clone)]
struct BlockKv {
    k: Tensor,
    v: Tensor,
}

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
    fn contains(&self, p: BlockPos) -> bool {
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

/// Per-layer cache of the keys/values later batches need.
struct LayerCache {
    /// Bottom block row of the batch row above, one entry per image column.
    row: Vec<Option<BlockKv>>,
    /// Right block column of the previous batch, one entry per image row.
    col: Vec<Option<BlockKv>>,
    /// Block (R0-1, C0-1) of the current batch.
    corner: Option<BlockKv>,
}

/// The [`KvSource`] of the scheduler: serves neighbourhoods from the current batch and the cache,
/// then stores what later batches need. `kv_dtype` is the storage precision of the cache.
///
/// The cache lives on the device of the keys it is given (the model's), or, offloaded, on a
/// storage device (the host): then each layer call copies the batch's outside neighbour blocks to
/// the model's device once, builds the neighbourhood there, and copies the blocks to keep back.
/// Either way each cached block is a tensor of its own: a view into the batch's keys would keep
/// the whole batch alive (and a device copy of a view copies all of it).
pub struct CachedKv {
    layers: Vec<LayerCache>,
    batch: Batch,
    kv_dtype: DType,
    /// Where the cache is stored when offloaded.
    storage: Option<Device>,
    uploaded: usize,
}

impl CachedKv {
    /// An empty cache for one sweep over `grid` with `depth` layers, on the model's device.
    pub fn new(grid: &BlockGrid, depth: usize, kv_dtype: DType) -> Self {
        Self::with_storage(grid, depth, kv_dtype, None)
    }

    /// The same stored on `storage` (e.g. `Device::Cpu` for a model on a GPU) when given.
    pub fn with_storage(grid: &BlockGrid, depth: usize, kv_dtype: DType, storage: Option<Device>) -> Self {
        let layers = (0..depth)
            .map(|_| LayerCache { row: vec![None; grid.cols], col: vec![None; grid.rows], corner: None })
            .collect();
        Self { layers, batch: Batch { row0: 0, row1: 0, col0: 0, col1: 0 }, kv_dtype, storage, uploaded: 0 }
    }

    /// The device the cache is offloaded to, if it is.
    pub fn storage(&self) -> Option<&Device> {
        self.storage.as_ref()
    }

    /// Bytes copied from the offload storage to the model's device so far (0 when not offloaded).
    pub fn uploaded_bytes(&self) -> usize {
        self.uploaded
    }

    /// Every cached K and V tensor (for checks of where they live).
    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut out = Vec::new();
        for l in &self.layers {
            for e in l.row.iter().chain(&l.col).chain(std::iter::once(&l.corner)).flatten() {
                out.push(&e.k);
                out.push(&e.v);
            }
        }
        out
    }

    /// Sets the batch the next layer calls belong to. At the start of a batch row the column
    /// entries and the corner of the row above are no longer needed and are dropped.
    pub fn begin(&mut self, batch: Batch) {
        if batch.col0 == 0 {
            for l in &mut self.layers {
                l.col.iter_mut().for_each(|e| *e = None);
                l.corner = None;
            }
        }
        self.batch = batch;
    }

    /// Bytes held by the cache now.
    pub fn bytes(&self) -> usize {
        let kv = |e: &Option<BlockKv>| {
            e.as_ref().map_or(0, |b| (b.k.elem_count() + b.v.elem_count()) * b.k.dtype().size_in_bytes())
        };
        self.layers
            .iter()
            .map(|l| l.row.iter().map(kv).sum::<usize>() + l.col.iter().map(kv).sum::<usize>() + kv(&l.corner))
            .sum()
    }
}

impl KvSource for CachedKv {
    fn neighbourhood(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let b = self.batch;
        let pos = b.blocks();
        let width = b.col1 - b.col0;
        let index = |p: BlockPos| (p.row - b.row0) * width + (p.col - b.col0);
        let dt = k.dtype();
        let dev = k.device().clone();
        let cache = &mut self.layers[layer];
        // The batch's outside neighbours, each taken from the cache (and, offloaded, copied to the
        // model's device) once.
        let mut outside: HashMap<BlockPos, BlockKv> = HashMap::new();
        for p in &pos {
            for q in neighbours(*p).into_iter().skip(1).filter(|q| !b.contains(*q)) {
                if outside.contains_key(&q) {
                    continue;
                }
                let hit = if q.row >= b.row0 {
                    debug_assert_eq!(q.col + 1, b.col0);
                    cache.col[q.row].as_ref()
                } else if q.col >= b.col0 {
                    cache.row[q.col].as_ref()
                } else {
                    cache.corner.as_ref()
                };
                let hit = hit.ok_or_else(|| {
                    candle_core::Error::Msg(format!("block scheduler: K/V of block {q:?} not cached (bug)"))
                })?;
                if self.storage.is_some() {
                    self.uploaded += (hit.k.elem_count() + hit.v.elem_count()) * hit.k.dtype().size_in_bytes();
                }
                let bring = |t: &Tensor| crate::device::to_device_compact(t, &dev)?.to_dtype(dt);
                outside.insert(q, BlockKv { k: bring(&hit.k)?, v: bring(&hit.v)? });
            }
        }
        let fetch = |q: BlockPos| -> Result<BlockKv> {
            if b.contains(q) {
                let i = index(q);
                return Ok(BlockKv { k: k.get(i)?, v: v.get(i)? });
            }
            Ok(outside[&q].clone())
        };
        let mut groups_k: [Vec<Tensor>; 3] = Default::default();
        let mut groups_v: [Vec<Tensor>; 3] = Default::default();
        for p in &pos {
            let nb = neighbours(*p);
            for g in 0..3 {
                let e = fetch(nb[g + 1])?;
                groups_k[g].push(e.k);
                groups_v[g].push(e.v);
            }
        }
        drop(outside);
        let stack = |g: &[Tensor]| Tensor::stack(g, 0);
        let [k1, k2, k3] = &groups_k;
        let [v1, v2, v3] = &groups_v;
        let k4 = concat_groups(k, [stack(k1)?, stack(k2)?, stack(k3)?])?;
        let v4 = concat_groups(v, [stack(v1)?, stack(v2)?, stack(v3)?])?;

        // Store what later batches need: the corner for the batch to the right, the bottom row for
        // the batch row below, the right column for the batch to the right.
        let (kv_dtype, storage, views) = (self.kv_dtype, self.storage.as_ref(), k.dim(0)? > 1);
        let keep = |t: Tensor| -> Result<Tensor> {
            // A block of a batch is a view into the batch's tensor: copied, so that it holds only
            // itself (a one-block batch is its own tensor; a dtype change copies anyway).
            let t = if t.dtype() != kv_dtype {
                t.to_dtype(kv_dtype)?
            } else if views {
                t.force_contiguous()?
            } else {
                t
            };
            match storage {
                Some(d) => t.to_device(d),
                None => Ok(t),
            }
        };
        let store = |i: usize| -> Result<BlockKv> { Ok(BlockKv { k: keep(k.get(i)?)?, v: keep(v.get(i)?)? }) };
        cache.corner = if b.row0 > 0 { cache.row[b.col1 - 1].take() } else { None };
        for c in b.col0..b.col1 {
            cache.row[c] = Some(store(index(BlockPos { row: b.row1 - 1, col: c }))?);
        }
        for r in b.row0..b.row1 {
            cache.col[r] = Some(store(index(BlockPos { row: r, col: b.col1 - 1 }))?);
        }
        Ok((k4, v4))
    }
}

/// Progress inside one network evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepProgress {
    /// Blocks finished in this sweep.
    pub blocks_done: usize,
    /// Blocks in the image.
    pub blocks_total: usize,
}

/// Receives one batch's result in [`BlockDenoiser::sweep_blocks`]: the blocks, their input `x`
/// and `D(x; sigma)`, (n, 3, bp, bp) each.
pub type BatchOutput<'o, E> = dyn FnMut(&[BlockPos], &Tensor, Tensor) -> std::result::Result<(), E> + 'o;

/// The EDM denoiser evaluated batch by batch.
pub struct BlockDenoiser<'a> {
    model: &'a InfDit,
    /// (1, vector_dim) on the model's device.
    clip: Tensor,
    /// The LR the network sees, (1, 3, h, w), and the upsampled LR, where they were given (the
    /// host, usually): the parts a batch row or batch needs go to the model's device.
    lr: Tensor,
    concat_lr: ConcatLr,
    grid: BlockGrid,
    block_batch: usize,
    kv_dtype: DType,
    /// Keep the K/V cache in host memory (see [`BlockDenoiser::with_kv_offload`]).
    kv_offload: bool,
    /// Called after each batch.
    pub on_batch: Option<Box<dyn FnMut(SweepProgress) + 'a>>,
    /// Largest cache size seen, in bytes.
    pub peak_cache_bytes: usize,
    /// Bytes of cached K/V copied from the host to the model's device, over all sweeps (0 unless
    /// offloaded).
    pub uploaded_kv_bytes: usize,
}

impl<'a> BlockDenoiser<'a> {
    /// A denoiser for one image with `n x n` block batches and the cache stored as `kv_dtype`:
    /// `clip` (1, vector_dim), `lr` (1, 3, h, w), `concat_lr` (1, 3, H, W).
    pub fn new(
        model: &'a InfDit,
        clip: &Tensor,
        lr: &Tensor,
        concat_lr: &Tensor,
        block_batch: usize,
        kv_dtype: DType,
    ) -> Result<Self> {
        Self::with_concat_lr(model, clip, lr, ConcatLr::Tensor(concat_lr.clone()), block_batch, kv_dtype)
    }

    /// The same with the upsampled LR given as a [`ConcatLr`]: an [`ConcatLr::Upsample`] is
    /// computed one batch row at a time, never for the whole image.
    pub fn with_concat_lr(
        model: &'a InfDit,
        clip: &Tensor,
        lr: &Tensor,
        concat_lr: ConcatLr,
        block_batch: usize,
        kv_dtype: DType,
    ) -> Result<Self> {
        let dev = model.device();
        let (h, w) = concat_lr.dims().map_err(to_candle)?;
        Ok(Self {
            model,
            clip: clip.to_device(dev)?,
            lr: lr.clone(),
            concat_lr,
            grid: BlockGrid::for_image(h, w, model.config().block_px)?,
            block_batch: block_batch.max(1),
            kv_dtype,
            kv_offload: false,
            on_batch: None,
            peak_cache_bytes: 0,
            uploaded_kv_bytes: 0,
        })
    }

    /// Keeps the K/V cache in host memory when `on`: each layer of a batch copies the batch's
    /// outside neighbours (at most `2n + 1` blocks) to the model's device and the blocks later
    /// batches need back; the LR features are then made for each batch's window only, and only
    /// its blocks of the upsampled LR go to the device, so that nothing on the model's device
    /// grows with the image. Results are the same bit for bit (the copies are exact, and a
    /// token's LR features do not depend on the window). On the CPU everything is in host memory
    /// anyway; the mechanism runs all the same.
    pub fn with_kv_offload(mut self, on: bool) -> Self {
        self.kv_offload = on;
        self
    }

    /// The grid.
    pub fn grid(&self) -> BlockGrid {
        self.grid
    }

    /// One sweep: `D(x; sigma)` for the whole image, (1, 3, H, W).
    pub fn sweep(&mut self, x: &Tensor, sigma: f32) -> Result<Tensor> {
        let grid = self.grid;
        let mut out: Vec<Option<Tensor>> = vec![None; grid.len()];
        self.sweep_blocks::<candle_core::Error>(
            sigma,
            &mut |pos| take_blocks(x, grid.block_px, pos),
            &mut |pos, _, d| {
                for (i, p) in pos.iter().enumerate() {
                    out[p.row * grid.cols + p.col] = Some(d.get(i)?);
                }
                Ok(())
            },
        )?;
        let blocks: Vec<Tensor> = out.into_iter().map(|t| t.expect("every block is produced")).collect();
        blocks_to_image(&Tensor::stack(&blocks, 0)?, &grid)
    }

    /// One sweep with the state supplied and consumed batch by batch, so that no image-size
    /// tensor is needed: `input(pos)` gives `x` at the blocks `pos` (n, 3, bp, bp) and
    /// `output(pos, x, d)` receives those blocks of `D(x; sigma)`, in raster order of the batches.
    /// `output` may overwrite the state of the blocks it is given: no later batch reads them.
    pub fn sweep_blocks<E: From<candle_core::Error>>(
        &mut self,
        sigma: f32,
        input: &mut dyn FnMut(&[BlockPos]) -> std::result::Result<Tensor, E>,
        output: &mut BatchOutput<'_, E>,
    ) -> std::result::Result<(), E> {
        let pre = self.model.config().precond;
        let s = pre.scalings(sigma);
        let step = self.model.step_cond(s.c_noise, &self.clip)?;
        let grid = self.grid;
        let bp = grid.block_px;
        let dev = self.model.device().clone();
        let storage = self.kv_offload.then_some(Device::Cpu);
        let mut cache = CachedKv::with_storage(&grid, self.model.config().depth, self.kv_dtype, storage);
        let mut done = 0;
        // Per batch row: its LR keys/values and its band of the upsampled LR, so memory grows
        // with the width.
        // (Offloaded: only the batch's own LR window and blocks of it go to the model's device, so
        // that nothing there grows with the width either.)
        let mut band: Option<(usize, Option<ImageCond>, Tensor)> = None;
        let offload = self.kv_offload;
        for batch in batches(&grid, self.block_batch) {
            let pos = batch.blocks();
            if band.as_ref().is_none_or(|(r, _, _)| *r != batch.row0) {
                drop(band.take()); // free the previous band before building the next
                let up = self.concat_lr.rows(batch.row0 * bp, batch.row1 * bp).map_err(to_candle)?;
                band = Some(if offload {
                    (batch.row0, None, up)
                } else {
                    let cond = self.model.image_cond_rows(&self.lr, grid, batch.row0, batch.row1)?;
                    (batch.row0, Some(cond), crate::device::to_device_compact(&up, &dev)?)
                });
            }
            let (_, cond, up) = band.as_ref().expect("band computed above");
            let window;
            let image = match cond {
                Some(c) => c,
                None => {
                    let cols = Some((batch.col0, batch.col1));
                    window = self.model.image_cond_window(&self.lr, grid, batch.row0, batch.row1, cols)?;
                    &window
                }
            };
            let in_band: Vec<BlockPos> = pos.iter().map(|p| BlockPos { row: p.row - batch.row0, col: p.col }).collect();
            let xb = crate::device::to_device_compact(&input(&pos)?, &dev)?;
            let ub = crate::device::to_device_compact(&take_blocks(up, bp, &in_band)?, &dev)?;
            let x_in = pre.network_input(&xb, &ub, &s)?;
            cache.begin(batch);
            let f = self.model.forward_blocks(&x_in, &pos, &step, image, &mut cache, None)?;
            let d = pre.denoised(f, &xb, &ub, &s)?;
            output(&pos, &xb, d)?;
            self.peak_cache_bytes = self.peak_cache_bytes.max(cache.bytes());
            done += pos.len();
            if let Some(cb) = self.on_batch.as_mut() {
                cb(SweepProgress { blocks_done: done, blocks_total: grid.len() });
            }
        }
        self.uploaded_kv_bytes += cache.uploaded_bytes();
        Ok(())
    }
}

/// A library error inside the tensor-level scheduler.
fn to_candle(e: crate::error::InfditError) -> candle_core::Error {
    match e {
        crate::error::InfditError::Candle(e) => e,
        e => candle_core::Error::Msg(e.to_string()),
    }
}

impl Denoise for BlockDenoiser<'_> {
    fn denoise(&mut self, x: &Tensor, sigma: f32, _index: usize) -> Result<Tensor> {
        self.sweep(x, sigma)
    }
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
        let images = match (batch, state_dir) {
            (None, _) => 7 * 3 * px * 4,
            (Some(_), false) => 6 * 3 * px * 4,
            (Some(n), true) => {
                let band = n.min(grid.rows).max(1) * grid.block_px * w;
                2 * 3 * band * 4 + 6 * 3 * blocks * grid.block_px * grid.block_px * 4 + 3 * px
            }
        };
        // The LR image itself, and its padded copy (1/16 of the output's pixels each).
        let lr_image = 2 * 3 * (px / (cfg.sr_scale * cfg.sr_scale)) * 4;
        let activations = blocks * per_block + scores;
        let weights = params * act.size_in_bytes();
        if let (true, Some(n)) = (placement.gpu, batch) {
            // x, the upsampled LR, D and the Heun intermediates of one batch.
            let batch_images = 6 * 3 * blocks * grid.block_px * grid.block_px * 4;
            let (kv_cache, lr_tokens, band) = if placement.kv_offload {
                // The outside neighbours of one layer, and the LR window of one batch.
                let outside = n.min(grid.rows) + n.min(grid.cols) + 1;
                let side = |k: usize| lb * n.min(k).max(1) + 2 * lb;
                let kv_bytes = kv.size_in_bytes().max(act.size_in_bytes());
                (outside * 2 * t * d * kv_bytes, side(grid.rows) * side(grid.cols), 0)
            } else {
                // The cache, the LR features of a batch row and its upsampled LR.
                (kv_cache, lr_tokens, 3 * n.min(grid.rows).max(1) * grid.block_px * w * 4)
            };
            let image_state = batch_images + band + lr_tokens * 3 * d * 4;
            return Self { weights, kv_cache, activations, image_state };
        }
        let image_state = images + lr_image + lr_tokens * 3 * d * 4;
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
