//! The sampling run: the EDM Heun sampler over a prepared image, in whole-image mode or with the
//! UniBA block scheduler, with progress, cancellation, a saved state after every step and resume.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};

pub use crate::checkpoint::state::FinalSample;
use crate::checkpoint::state::{FileStore, RamStore, STATE_FILE, Slot, StateStore};
use crate::diffusion::noise::Noise;
use crate::diffusion::{Denoise, HeunConfig, HeunStep, WholeImageHeun, initial_state, run_heun};
use crate::error::{InfditError, Result};
use crate::loaded::Model;
use crate::model::blocks::{BlockGrid, BlockPos, image_to_blocks, take_blocks};
use crate::prepare::{ConcatLr, Prepared};
use crate::schedule::BlockDenoiser;
use crate::schedule::WholeImageDenoiser;
/// Progress of a sampling run (all counters at once, so a front end can show any of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Network evaluations finished (counting those done before a resume).
    pub evals_done: usize,
    /// Network evaluations in the run.
    pub evals_total: usize,
    /// Sampler steps finished.
    pub steps_done: usize,
    /// Sampler steps in the run.
    pub steps_total: usize,
    /// Blocks finished in the evaluation under way, or in the one just finished (then
    /// `blocks_total`, and `evals_done` counts it already); whole-image mode reports 0 or all.
    pub blocks_done: usize,
    /// Blocks in the image.
    pub blocks_total: usize,
}

impl Progress {
    /// Block evaluations finished in the run (of `evals_total * blocks_total`).
    pub fn blocks_evaluated(&self) -> u64 {
        let partial = if self.blocks_done < self.blocks_total { self.blocks_done } else { 0 };
        (self.evals_done * self.blocks_total + partial) as u64
    }
}

/// How one network evaluation is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The whole image in one forward (the reference's `full` inference); memory grows with the area.
    WholeImage,
    /// The UniBA block scheduler: `block_batch x block_batch` blocks per forward, raster order,
    /// keys/values cached in `kv_dtype`; memory grows with the width.
    Blocks {
        /// Blocks per batch side (n >= 1).
        block_batch: usize,
        /// Storage precision of the K/V cache.
        kv_dtype: DType,
    },
}

/// Settings of a sampling run.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// Sampler settings.
    pub heun: HeunConfig,
    /// Whole image or block scheduler.
    pub mode: Mode,
    /// Where to save the state after each step, and resume from.
    pub checkpoint_dir: Option<std::path::PathBuf>,
    /// Stop (returning no sample) once this many steps are done; for interruption and tests.
    pub stop_after_steps: Option<usize>,
    /// Block mode only: keep the sampler's image-size state (x, the Heun derivative and Euler
    /// point) in a file in this folder instead of memory, and compute the upsampled LR and the
    /// initial state one block row at a time, so memory stays bounded whatever the height. The
    /// file is read and written block by block; it needs 36 bytes per output pixel of disk, 48
    /// with `checkpoint_dir`, when it is also the resume state (kept there until the run
    /// finishes); without `checkpoint_dir` it is deleted as soon as it is opened and vanishes with
    /// the process. The result is bit-identical to the in-memory run, and comes back as
    /// [`SampleOutcome::final_sample`] read from that file ([`SampleOutcome::sample`] is `None`).
    pub state_dir: Option<std::path::PathBuf>,
    /// Set from another thread (a Ctrl-C handler) to stop the run: [`sample`] checks it before
    /// every network evaluation (whole image) or block batch (scheduler) and returns
    /// [`InfditError::Interrupted`]. The saved state of the last completed step, if any, is kept,
    /// so the run can be resumed.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Block mode: keep the scheduler's K/V cache in host memory and copy what each block batch
    /// needs to the model's device ([`BlockDenoiser::with_kv_offload`]); for a model on a GPU,
    /// whose memory then does not grow with the image. Bit-identical results.
    pub kv_offload: bool,
}

impl PartialEq for SampleOptions {
    /// Field by field; two cancellation flags are equal when they are the same flag.
    fn eq(&self, o: &Self) -> bool {
        let Self { heun, mode, checkpoint_dir, stop_after_steps, state_dir, cancel, kv_offload } = self;
        let same_flag = match (cancel, &o.cancel) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        *heun == o.heun
            && *mode == o.mode
            && *checkpoint_dir == o.checkpoint_dir
            && *stop_after_steps == o.stop_after_steps
            && *state_dir == o.state_dir
            && *kv_offload == o.kv_offload
            && same_flag
    }
}

/// A denoiser that refuses to start an evaluation once the cancellation flag is set.
struct Cancellable<'a, 'b> {
    inner: &'a mut dyn Denoise,
    flag: &'b AtomicBool,
}

impl Denoise for Cancellable<'_, '_> {
    fn denoise(&mut self, x: &Tensor, sigma: f32, index: usize) -> candle_core::Result<Tensor> {
        if self.flag.load(Ordering::Relaxed) {
            candle_core::bail!("interrupted");
        }
        self.inner.denoise(x, sigma, index)
    }
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            heun: HeunConfig::default(),
            mode: Mode::Blocks { block_batch: 1, kv_dtype: DType::F32 },
            checkpoint_dir: None,
            stop_after_steps: None,
            state_dir: None,
            cancel: None,
            kv_offload: false,
        }
    }
}

/// The result of [`sample`].
#[derive(Debug, Clone)]
pub struct SampleOutcome {
    /// The final sample (1, 3, H, W), or `None` when the run stopped early or kept its state in a
    /// state folder (then see `final_sample`).
    pub sample: Option<Tensor>,
    /// The final sample, in memory or in the state folder's file, readable band by band (e.g.
    /// [`FinalSample::to_rgb8`]); `None` when the run stopped early.
    pub final_sample: Option<FinalSample>,
    /// Steps done, including those done before a resume.
    pub steps_done: usize,
    /// Step the run resumed from (0 for a fresh run).
    pub resumed_from: usize,
    /// Peak size of the block scheduler's K/V cache in bytes (0 in whole-image mode).
    pub peak_kv_cache_bytes: usize,
}

/// Samples from `eps` (1, 3, H, W): the Heun run of the reference, in whole-image or block mode,
/// optionally saving its state after every step and resuming from it.
pub fn sample(
    model: &Model,
    prep: &Prepared,
    clip_vec: &Tensor,
    eps: &Tensor,
    opts: &SampleOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<SampleOutcome> {
    sample_with_noise(model, prep, clip_vec, &Noise::Image(eps.clone()), opts, progress)
}

/// [`sample`] with the noise given as a [`Noise`]: [`Noise::Seeded`] draws it block by block, so
/// that with [`SampleOptions::state_dir`] no image-size tensor is ever held.
///
/// In block mode each sweep of the scheduler also applies the Heun update to the blocks it has
/// just denoised (the update is elementwise), reading and writing the per-block state in memory
/// or in the state folder's file; the values are those of [`crate::diffusion::heun_step`] on the
/// whole image, bit for bit.
pub fn sample_with_noise(
    model: &Model,
    prep: &Prepared,
    clip_vec: &Tensor,
    noise: &Noise,
    opts: &SampleOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<SampleOutcome> {
    let heun = &opts.heun;
    heun.validate()?;
    let sigmas = heun.sigmas();
    let dev = model.dit.device();
    let grid = prep.grid;
    noise.check(&grid)?;
    if prep.concat_lr.dims()? != (grid.height(), grid.width()) {
        return Err(InfditError::Internal(format!(
            "the upsampled LR is {:?}, the output grid {}x{}",
            prep.concat_lr.dims()?,
            grid.height(),
            grid.width()
        )));
    }
    if opts.state_dir.is_some() && opts.mode == Mode::WholeImage {
        return Err(InfditError::Config(
            "a state folder needs block mode: whole-image mode holds the whole image anyway".into(),
        ));
    }
    let record = opts.checkpoint_dir.as_ref().map(|d| d.join("infdit-state.safetensors"));
    let _checkpoint_lock = lock_checkpoint_dir(opts)?;
    let fingerprint = run_fingerprint(&prep.concat_lr, noise, &grid, clip_vec, heun, model)?;
    let saved = load_checked(record.as_deref(), &fingerprint, sigmas.len() - 1, &grid)?;
    let start = saved.as_ref().map_or(0, |s| s.steps_done);
    let evals_before = |k: usize| if k == 0 { 0 } else { (2 * k).min(heun.evaluations()) };
    let blocks_total = grid.len();
    let base = Progress {
        evals_done: evals_before(start),
        evals_total: heun.evaluations(),
        steps_done: start,
        steps_total: heun.steps,
        blocks_done: 0,
        blocks_total,
    };
    let state = std::cell::Cell::new(base);
    let progress = std::cell::RefCell::new(progress);
    let report = |p: Progress| {
        state.set(p);
        (progress.borrow_mut())(p)
    };
    report(base);
    let last = sigmas.len() - 1;
    let never = AtomicBool::new(false);
    let flag: &AtomicBool = opts.cancel.as_deref().unwrap_or(&never);
    let step_done = |steps_done: usize| {
        let p = state.get();
        report(Progress { steps_done, ..p });
    };

    let (steps_done, final_sample, peak_kv_cache_bytes) = match opts.mode {
        Mode::WholeImage => {
            let concat_lr = prep.concat_lr.full()?.to_device(dev)?;
            let x = match saved {
                Some(crate::checkpoint::SavedState { x: Some(x), .. }) => x.to_device(dev)?,
                Some(_) => return Err(state_dir_needed(record.as_deref())),
                None => initial_state(&concat_lr, &noise.image(&grid, dev)?, sigmas[0])?,
            };
            let mut den = WholeImageDenoiser::new(&model.dit, clip_vec, &prep.lr, &concat_lr)?;
            den.on_eval = Some(Box::new(|_| {
                let p = state.get();
                report(Progress { evals_done: p.evals_done + 1, blocks_done: blocks_total, ..p })
            }));
            let mut den = Cancellable { inner: &mut den, flag };
            let mut st = WholeImageStep { inner: WholeImageHeun { den: &mut den, x }, flag };
            let steps_done = run_heun(&mut st, &sigmas, start, opts.stop_after_steps, &mut |s, done| {
                if let Some(f) = &record {
                    crate::checkpoint::save_state(f, Some(&s.inner.x), done, &fingerprint)?;
                }
                step_done(done);
                Ok(())
            })?;
            let x = st.inner.x;
            (steps_done, (steps_done == last).then(|| FinalSample::from_tensor(x)), 0)
        }
        Mode::Blocks { block_batch, kv_dtype } => {
            // In memory the upsampled LR is computed once; with a state folder, per batch row. It
            // stays in host memory, as does the sampler state: each block batch goes to the
            // model's device when it is denoised.
            let concat_lr = match &opts.state_dir {
                None => ConcatLr::Tensor(prep.concat_lr.full()?),
                Some(_) => prep.concat_lr.clone(),
            };
            let mut store = match (&opts.state_dir, &saved) {
                (None, _) => StateStore::Ram(RamStore::new(grid)),
                (Some(dir), Some(s @ crate::checkpoint::SavedState { x: None, .. })) => {
                    if !dir.join(STATE_FILE).exists() {
                        return Err(state_dir_needed(record.as_deref()));
                    }
                    let sums = s.block_checksums.as_deref().unwrap_or(&[]);
                    StateStore::File(FileStore::open(dir, grid, &fingerprint, s.steps_done, sums)?)
                }
                (Some(dir), _) => StateStore::File(FileStore::create(dir, grid, &fingerprint, record.is_some())?),
            };
            match saved {
                None => {
                    // x0 = concat_lr + sigma_0 eps, one block row at a time.
                    let bp = grid.block_px;
                    for row in 0..grid.rows {
                        let pos: Vec<BlockPos> = (0..grid.cols).map(|col| BlockPos { row, col }).collect();
                        let local: Vec<BlockPos> = (0..grid.cols).map(|col| BlockPos { row: 0, col }).collect();
                        let band = crate::device::to_device_compact(&concat_lr.rows(row * bp, (row + 1) * bp)?, dev)?;
                        let up = take_blocks(&band, bp, &local)?;
                        let x0 = initial_state(&up, &noise.blocks(&grid, &pos, dev)?, sigmas[0])?;
                        store.write(Slot::X(0), &pos, &x0)?;
                    }
                }
                Some(crate::checkpoint::SavedState { x: Some(x), steps_done, .. }) => {
                    store.write(Slot::X(steps_done), &grid.raster(), &image_to_blocks(&x, grid.block_px)?)?;
                }
                Some(crate::checkpoint::SavedState { x: None, .. }) if opts.state_dir.is_none() => {
                    return Err(state_dir_needed(record.as_deref()));
                }
                Some(_) => {}
            }
            let mut den =
                BlockDenoiser::with_concat_lr(&model.dit, clip_vec, &prep.lr, concat_lr, block_batch, kv_dtype)?
                    .with_kv_offload(opts.kv_offload);
            den.on_batch = Some(Box::new(|s| {
                let p = state.get();
                let evals_done = p.evals_done + (s.blocks_done == s.blocks_total) as usize;
                report(Progress { evals_done, blocks_done: s.blocks_done, ..p })
            }));
            let mut st = BlockStep { den: &mut den, store: &mut store, dev, flag };
            let steps_done = run_heun(&mut st, &sigmas, start, opts.stop_after_steps, &mut |s, done| {
                if let Some(f) = &record {
                    match &*s.store {
                        StateStore::Ram(_) => {
                            let x = s.store.image(Slot::X(done))?;
                            crate::checkpoint::save_state(f, Some(&x), done, &fingerprint)?;
                        }
                        StateStore::File(fs) => {
                            s.store.sync()?;
                            let sums = fs.checksums(Slot::X(done))?;
                            crate::checkpoint::save_block_record(f, &sums, done, &fingerprint)?;
                        }
                    }
                }
                step_done(done);
                Ok(())
            })?;
            let peak = den.peak_cache_bytes;
            drop(den);
            let fin = if steps_done == last {
                if let StateStore::File(f) = &mut store {
                    // The run is complete: the file is no checkpoint any more, only the result.
                    f.unlink()?;
                }
                Some(store.into_final(Slot::X(last))?)
            } else {
                None
            };
            (steps_done, fin, peak)
        }
    };
    if final_sample.is_some()
        && let Some(f) = &record
    {
        let _ = std::fs::remove_file(f);
    }
    let sample = match &final_sample {
        Some(f) if f.in_memory() => Some(f.to_tensor()?),
        _ => None,
    };
    Ok(SampleOutcome { sample, final_sample, steps_done, resumed_from: start, peak_kv_cache_bytes })
}

/// The whole image as the sampler state: a Ctrl-C during a step ends the run with the steps done
/// before it, and a non-finite state is an error.
struct WholeImageStep<'a, 'b> {
    inner: WholeImageHeun<'a>,
    flag: &'b AtomicBool,
}

impl HeunStep for WholeImageStep<'_, '_> {
    type Error = InfditError;

    fn step(&mut self, sigmas: &[f32], i: usize) -> Result<()> {
        let stepped = self.inner.step(sigmas, i);
        if self.flag.load(Ordering::Relaxed) {
            return Err(InfditError::Interrupted { steps_done: i });
        }
        stepped?;
        Ok(check_finite(&self.inner.x, i)?)
    }
}

/// The block scheduler's per-block state as the sampler state: each step is the Heun update
/// applied to every block batch inside the scheduler's sweeps ([`heun_step_blocks`]).
struct BlockStep<'a, 'd> {
    den: &'a mut BlockDenoiser<'d>,
    store: &'a mut StateStore,
    dev: &'a Device,
    flag: &'a AtomicBool,
}

impl HeunStep for BlockStep<'_, '_> {
    type Error = InfditError;

    fn step(&mut self, sigmas: &[f32], i: usize) -> Result<()> {
        heun_step_blocks(self.den, self.store, sigmas, i, self.dev, self.flag)
    }
}

/// One Heun step of the block scheduler, done inside its sweeps: the first sweep denoises `x` and
/// stores the derivative and Euler point of each batch (or, for the last step, the new `x`); the
/// second denoises the Euler point and stores the corrected `x`. Bit-identical to
/// [`crate::diffusion::heun_step`] on the whole image (the update is elementwise).
fn heun_step_blocks(
    den: &mut BlockDenoiser<'_>,
    store: &mut StateStore,
    sigmas: &[f32],
    i: usize,
    dev: &Device,
    flag: &AtomicBool,
) -> Result<()> {
    let (s, s_next) = (sigmas[i], sigmas[i + 1]);
    let store = std::cell::RefCell::new(store);
    // Checked before each block batch is read: a Ctrl-C stops the sweep at the next batch.
    let go = || if flag.load(Ordering::Relaxed) { Err(InfditError::Interrupted { steps_done: i }) } else { Ok(()) };
    den.sweep_blocks::<InfditError>(
        s,
        &mut |pos| {
            go()?;
            store.borrow().read(Slot::X(i), pos)
        },
        &mut |pos, x, d1| {
            let (d, euler) = crate::diffusion::heun_euler(x, &d1, s, s_next)?;
            let mut st = store.borrow_mut();
            if s_next <= 0.0 {
                check_finite(&euler, i)?;
                st.write(Slot::X(i + 1), pos, &euler)
            } else {
                st.write(Slot::D, pos, &d)?;
                st.write(Slot::Euler, pos, &euler)
            }
        },
    )?;
    if s_next <= 0.0 {
        return Ok(());
    }
    den.sweep_blocks::<InfditError>(
        s_next,
        &mut |pos| {
            go()?;
            store.borrow().read(Slot::Euler, pos)
        },
        &mut |pos, euler, d2| {
            let mut st = store.borrow_mut();
            let x = st.read(Slot::X(i), pos)?.to_device(dev)?;
            let d = st.read(Slot::D, pos)?.to_device(dev)?;
            let x_new = crate::diffusion::heun_correct(&x, &d, euler, &d2, s, s_next)?;
            check_finite(&x_new, i)?;
            st.write(Slot::X(i + 1), pos, &x_new)
        },
    )
}

/// Locks the checkpoint folder, if any, against a second process for as long as the lock lives.
fn lock_checkpoint_dir(opts: &SampleOptions) -> Result<Option<crate::checkpoint::FolderLock>> {
    let Some(d) = &opts.checkpoint_dir else { return Ok(None) };
    Ok(Some(crate::checkpoint::lock_folder(d, "checkpoint folder")?))
}

/// The saved state in `record`, if any, checked against this run (at most `last` steps, the grid's size).
fn load_checked(
    record: Option<&Path>,
    fingerprint: &str,
    last: usize,
    grid: &BlockGrid,
) -> Result<Option<crate::checkpoint::SavedState>> {
    let Some(f) = record else { return Ok(None) };
    let saved = crate::checkpoint::load_state(f, fingerprint)?;
    if let Some(s) = &saved {
        s.check(f, last, grid.height(), grid.width())?;
    }
    Ok(saved)
}

/// The error for a checkpoint whose state is in a state folder this run does not have.
fn state_dir_needed(record: Option<&Path>) -> InfditError {
    InfditError::Resume {
        path: record.map(Path::to_path_buf).unwrap_or_default(),
        reason: format!(
            "this checkpoint's state is in a state folder ({}); resume with the same state folder, in block mode",
            crate::checkpoint::state::STATE_FILE
        ),
    }
}

/// A hash of everything that determines a run's trajectory, so a saved state is only resumed by
/// the same run.
fn run_fingerprint(
    concat_lr: &ConcatLr,
    noise: &Noise,
    grid: &BlockGrid,
    clip: &Tensor,
    heun: &HeunConfig,
    model: &Model,
) -> Result<String> {
    let mut h = crate::hash::Fnv::default();
    concat_lr.fingerprint(&mut h)?;
    match noise {
        Noise::Image(t) => h.tensor(t)?,
        Noise::Seeded(seed) => h.bytes(format!("seeded noise {seed} on {grid:?}").as_bytes()),
    }
    h.tensor(clip)?;
    h.bytes(format!("{heun:?}/{:?}/{:?}/{:016x}", model.dit.dtype(), model.cfg, model.weights_digest).as_bytes());
    Ok(format!("{:016x}", h.finish()))
}

/// Fails when the sampler state holds a NaN or infinity (a broken model or input).
pub fn check_finite(x: &Tensor, step: usize) -> candle_core::Result<()> {
    let s = x.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    if s.is_finite() {
        Ok(())
    } else {
        candle_core::bail!(
            "the sampler state is not finite after step {step}: check the model weights, the input image and noise, \
             and the sampler settings (the starting sigma)"
        )
    }
}
