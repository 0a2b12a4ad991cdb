//! The EDM denoiser on the whole image at once (the reference's `full` inference): the same
//! network forward as the block scheduler, with every block in one batch.

use candle_core::Tensor;

use crate::diffusion::{Denoise, EdmScalings};
use crate::error::{InfditError, Result};
use crate::model::blocks::{BlockGrid, WholeImageKv, blocks_to_image, image_to_blocks};
use crate::model::{ImageCond, InfDit};
/// What a denoiser needs of one image, on the model's device.
#[derive(Debug, Clone)]
pub struct DenoiserInputs {
    /// (1, vector_dim)
    pub clip: Tensor,
    /// The LR the network sees, (1, 3, h, w).
    pub lr: Tensor,
    /// (1, 3, H, W)
    pub concat_lr: Tensor,
    /// The model's flat-area gate (1, 1, H, W), where its preconditioning asks for one.
    pub gate: Option<Tensor>,
    /// The output block grid.
    pub grid: BlockGrid,
}

impl DenoiserInputs {
    /// `clip` (1, vector_dim), `lr` (1, 3, h, w), `concat_lr` (1, 3, H, W).
    pub fn new(model: &InfDit, clip: &Tensor, lr: &Tensor, concat_lr: &Tensor) -> candle_core::Result<Self> {
        let (_, _, h, w) = concat_lr.dims4()?;
        let dev = model.device();
        let gate = match model.config().precond.flat_gate_of(lr, h, w)? {
            Some(g) => Some(g.full()?.to_device(dev)?),
            None => None,
        };
        Ok(Self {
            clip: clip.to_device(dev)?,
            lr: lr.to_device(dev)?,
            concat_lr: concat_lr.to_device(dev)?,
            gate,
            grid: BlockGrid::for_image(h, w, model.config().block_px)?,
        })
    }
}

/// The EDM denoiser on the whole image at once (the reference's `full` inference).
pub struct WholeImageDenoiser<'a> {
    model: &'a InfDit,
    inputs: DenoiserInputs,
    image: ImageCond,
    kv: WholeImageKv,
    /// Called after each evaluation with the number of evaluations so far.
    pub on_eval: Option<Box<dyn FnMut(usize) + 'a>>,
    evals: usize,
}

impl<'a> WholeImageDenoiser<'a> {
    /// A denoiser for one image: `clip` (1, vector_dim), `lr` (1, 3, h, w), `concat_lr` (1, 3, H, W).
    pub fn new(model: &'a InfDit, clip: &Tensor, lr: &Tensor, concat_lr: &Tensor) -> Result<Self> {
        let inputs = DenoiserInputs::new(model, clip, lr, concat_lr)?;
        Ok(Self {
            model,
            kv: WholeImageKv::new(&inputs.grid, model.device())?,
            image: model.image_cond(&inputs.lr, inputs.grid)?,
            inputs,
            on_eval: None,
            evals: 0,
        })
    }

    /// Starts the RoPE positions at token (row, column) instead of (0, 0) (training's random start).
    pub fn set_rope_offset(&mut self, offset: (usize, usize)) {
        self.image.rope_offset = offset;
    }

    /// `D(x; sigma)` with, when `trace` is given, the hidden state after each layer in row-major
    /// token order (1, N, D).
    pub fn denoise_traced(&mut self, x: &Tensor, sigma: f32, trace: Option<&mut Vec<Tensor>>) -> Result<Tensor> {
        let pre = self.model.config().precond;
        let s = pre.scalings(sigma);
        let step = self.model.step_cond(s.c_noise, &self.inputs.clip)?;
        let x_in = pre.network_input(x, &self.inputs.concat_lr, &s)?;
        let bp = self.model.config().block_px;
        let grid = self.inputs.grid;
        let pos = grid.raster();
        let mut local = Vec::new();
        let f = self.model.forward_blocks(
            &image_to_blocks(&x_in, bp)?,
            &pos,
            &step,
            &self.image,
            &mut self.kv,
            trace.is_some().then_some(&mut local),
        )?;
        if let Some(t) = trace {
            let bt = self.model.config().block_tokens();
            for h in local {
                t.push(blocks_tokens_to_row_major(&h, &grid, bt)?);
            }
        }
        let f = blocks_to_image(&f, &grid)?;
        let d = pre.denoised(f, x, &self.inputs.concat_lr, &s, self.inputs.gate.as_ref())?;
        self.evals += 1;
        if let Some(cb) = self.on_eval.as_mut() {
            cb(self.evals);
        }
        Ok(d)
    }

    /// The conditioning vector c for a sigma (after the SiLU), (1, D).
    pub fn cond_vector(&self, sigma: f32) -> Result<Tensor> {
        Ok(self.model.step_cond(EdmScalings::new(sigma).c_noise, &self.inputs.clip)?.c)
    }
}

/// Block-major hidden states (n, T, D) of a full grid to row-major tokens (1, N, D).
pub fn blocks_tokens_to_row_major(h: &Tensor, grid: &BlockGrid, bt: usize) -> candle_core::Result<Tensor> {
    let d = h.dim(2)?;
    h.reshape((grid.rows, grid.cols, bt, bt, d))?.permute((0, 2, 1, 3, 4))?.reshape((
        1,
        grid.rows * bt * grid.cols * bt,
        d,
    ))
}

impl Denoise for WholeImageDenoiser<'_> {
    fn denoise(&mut self, x: &Tensor, sigma: f32, _index: usize) -> candle_core::Result<Tensor> {
        self.denoise_traced(x, sigma, None).map_err(|e| match e {
            InfditError::Candle(e) => e,
            e => candle_core::Error::Msg(e.to_string()),
        })
    }
}
