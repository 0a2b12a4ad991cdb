//! The block denoiser: one network evaluation as a raster-order sweep over batches of blocks.

use candle_core::{DType, Device, Result, Tensor};

use super::cache::CachedKv;
use super::plan::batches;
use crate::diffusion::Denoise;
use crate::diffusion::gate::FlatGate;
use crate::model::blocks::{BlockGrid, BlockPos, blocks_to_image, take_blocks};
use crate::model::{ImageCond, InfDit};
use crate::prepare::ConcatLr;

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
    /// The model's flat-area gate, where its preconditioning asks for one; computed, like the
    /// upsampled LR, one batch row at a time.
    gate: Option<FlatGate>,
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
            gate: model.config().precond.flat_gate_of(lr, h, w)?,
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
        let mut band: Option<(usize, Option<ImageCond>, Tensor, Option<Tensor>)> = None;
        let offload = self.kv_offload;
        for batch in batches(&grid, self.block_batch) {
            let pos = batch.blocks();
            if band.as_ref().is_none_or(|(r, _, _, _)| *r != batch.row0) {
                drop(band.take()); // free the previous band before building the next
                let (y0, y1) = (batch.row0 * bp, batch.row1 * bp);
                let up = self.concat_lr.rows(y0, y1).map_err(to_candle)?;
                let gate = self.gate.as_ref().map(|g| g.rows(y0, y1)).transpose()?;
                band = Some(if offload {
                    (batch.row0, None, up, gate)
                } else {
                    let cond = self.model.image_cond_rows(&self.lr, grid, batch.row0, batch.row1)?;
                    let gate = gate.map(|g| crate::device::to_device_compact(&g, &dev)).transpose()?;
                    (batch.row0, Some(cond), crate::device::to_device_compact(&up, &dev)?, gate)
                });
            }
            let (_, cond, up, gate) = band.as_ref().expect("band computed above");
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
            let gb = match gate {
                Some(g) => Some(crate::device::to_device_compact(&take_blocks(g, bp, &in_band)?, &dev)?),
                None => None,
            };
            let x_in = pre.network_input(&xb, &ub, &s)?;
            cache.begin(batch);
            let f = self.model.forward_blocks(&x_in, &pos, &step, image, &mut cache, None)?;
            let d = pre.denoised(f, &xb, &ub, &s, gb.as_ref())?;
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
