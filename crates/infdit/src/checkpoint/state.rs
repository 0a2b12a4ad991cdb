//! Where the block scheduler keeps the sampler's image-size state between sweeps.
//!
//! The Heun sampler needs, per block, the state `x`, and between the two evaluations of a step the
//! derivative `d` and the Euler point. The scheduler updates them block by block inside its sweeps
//! (see [`crate::sampling::sample`]), so they can live anywhere a block can be read and written:
//!
//! * [`StateStore::Ram`]: per-block tensors in memory (the default; 36 bytes per output pixel);
//! * [`StateStore::File`]: one file in a state folder, read and written block by block with
//!   positioned I/O (`pread`/`pwrite`, not a memory map, so the pages never count towards the
//!   process's resident memory): RAM holds only the blocks of the batch being computed.
//!
//! The file keeps two copies of `x` when it also serves as the resume checkpoint: step `k` reads
//! copy `k % 2` and writes copy `(k + 1) % 2`, so the state a checkpoint record points at is
//! never overwritten by the step that follows it.
//!
//! Every block carries a CRC-32, kept in memory and checked on each read; the checkpoint record
//! stores those of the `x` it points at, so that a resume refuses a damaged state file. A state
//! file that serves as a checkpoint is locked (`flock`) while a run uses it, and is never
//! truncated when it holds another run's state.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{InfditError, Result};
use crate::model::blocks::{BlockGrid, BlockPos, blocks_to_image};

/// Channels of the sampler state.
const CHANNELS: usize = 3;

/// One of the per-block tensors of the sampler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// The state after this many steps.
    X(usize),
    /// The Heun derivative of the current step.
    D,
    /// The Euler point of the current step.
    Euler,
}

/// Per-block tensors in memory.
#[derive(Debug)]
pub struct RamStore {
    grid: BlockGrid,
    /// `x`, `d`, Euler point; one (3, bp, bp) tensor per block in raster order. A step
    /// overwrites `x` block by block: no later block of the sweep reads it.
    slots: [Vec<Option<Tensor>>; 3],
}

/// Per-block tensors in a file, f32 little-endian, block-major in raster order per slot.
#[derive(Debug)]
pub struct FileStore {
    file: File,
    path: PathBuf,
    grid: BlockGrid,
    /// 2 when the file is a resume checkpoint (see the module documentation), else 1.
    x_slots: usize,
    /// Whether the file is still linked under `path` (a checkpoint) or was unlinked at creation.
    linked: bool,
    /// The CRC-32 of each block written, per slot (`x` copies, then `d`, then the Euler point), in
    /// raster order: every read is checked against it, and the checkpoint record carries those of
    /// the `x` it points at, so a damaged file is refused on resume.
    sums: Vec<Vec<Option<u32>>>,
}

/// The sampler state of a block-mode run.
#[derive(Debug)]
pub enum StateStore {
    /// In memory.
    Ram(RamStore),
    /// In a file under the state folder.
    File(FileStore),
}

/// The file name of the state that serves as a checkpoint (in the state folder).
pub const STATE_FILE: &str = "infdit-state.blocks";

/// Header: magic, then little-endian u32 version, channels, block_px, rows, cols, x_slots, then the
/// run fingerprint (UTF-8, zero-padded to 64 bytes). Blocks start at [`HEADER_BYTES`].
const MAGIC: &[u8; 8] = b"INFDITBS";
const VERSION: u32 = 1;
const HEADER_BYTES: u64 = 4096;

impl RamStore {
    /// An empty store for `grid`.
    pub fn new(grid: BlockGrid) -> Self {
        Self { grid, slots: std::array::from_fn(|_| vec![None; grid.len()]) }
    }
}

impl FileStore {
    /// Creates a store for `grid` in `dir`. With `checkpoint`, the file is [`STATE_FILE`], keeps two
    /// copies of `x` and stays until [`FileStore::unlink`]; without, it has a unique name and is
    /// unlinked at once, so the system reclaims it however the process ends.
    pub fn create(dir: &Path, grid: BlockGrid, fingerprint: &str, checkpoint: bool) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| InfditError::io(dir, e))?;
        let path = if checkpoint {
            dir.join(STATE_FILE)
        } else {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            dir.join(format!("infdit-scratch-{}-{n}.blocks", std::process::id()))
        };
        // Not truncated before it is locked and known to be no other run's state.
        #[allow(clippy::suspicious_open_options)]
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .open(&path)
            .map_err(|e| InfditError::io(&path, e))?;
        let x_slots = if checkpoint { 2 } else { 1 };
        let mut store = Self::new(file, path, grid, x_slots);
        if checkpoint {
            store.lock()?;
            let ours = store.header(fingerprint)?;
            let mut theirs = vec![0u8; ours.len()];
            if read_exact_at(&store.file, &mut theirs, 0).is_ok() && theirs.starts_with(MAGIC) && theirs != ours {
                return Err(InfditError::Resume {
                    path: store.path.clone(),
                    reason: "holds the resume state of another run (another input or other settings); give each \
                             input its own state folder, or remove the file if that run's checkpoint is gone"
                        .into(),
                });
            }
        } else {
            store.unlink()?;
        }
        store.file.set_len(0).map_err(|e| store.io_err(e))?;
        let len = HEADER_BYTES + ((x_slots + 2) * grid.len() * store.block_bytes()) as u64;
        store.file.set_len(len).map_err(|e| store.io_err(e))?;
        let header = store.header(fingerprint)?;
        write_all_at(&store.file, &header, 0).map_err(|e| store.io_err(e))?;
        Ok(store)
    }

    fn new(file: File, path: PathBuf, grid: BlockGrid, x_slots: usize) -> Self {
        let sums = vec![vec![None; grid.len()]; x_slots + 2];
        Self { file, path, grid, x_slots, linked: true, sums }
    }

    /// Locks the file against a second process ([`InfditError::Locked`] when another holds it).
    fn lock(&self) -> Result<()> {
        match self.file.try_lock() {
            Ok(()) => Ok(()),
            Err(std::fs::TryLockError::WouldBlock) => {
                Err(InfditError::Locked { path: self.path.clone(), what: "state file (--state-dir)" })
            }
            Err(std::fs::TryLockError::Error(e)) => Err(self.io_err(e)),
        }
    }

    /// Opens the checkpoint store of `dir` written by a run with the same `fingerprint` and grid,
    /// whose `x` after `steps_done` steps has the block checksums `block_checksums` (from the
    /// checkpoint record). Every block of that `x` is read and checked: a damaged file is refused
    /// with [`InfditError::DamagedState`].
    pub fn open(
        dir: &Path,
        grid: BlockGrid,
        fingerprint: &str,
        steps_done: usize,
        block_checksums: &[u32],
    ) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        crate::files::check_regular(&path).map_err(|e| InfditError::io(&path, e))?;
        let file =
            std::fs::OpenOptions::new().read(true).write(true).open(&path).map_err(|e| InfditError::io(&path, e))?;
        let mut store = Self::new(file, path, grid, 2);
        store.lock()?;
        let damaged = |reason: String| InfditError::DamagedState { path: store.path.clone(), reason };
        let len = store.file.metadata().map_err(|e| store.io_err(e))?.len();
        let want = HEADER_BYTES + (4 * grid.len() * store.block_bytes()) as u64;
        if len != want {
            return Err(damaged(format!("{len} bytes, the grid needs {want}")));
        }
        if block_checksums.len() != grid.len() {
            return Err(damaged(format!("{} block checksums for {} blocks", block_checksums.len(), grid.len())));
        }
        let mut header = vec![0u8; store.header(fingerprint)?.len()];
        read_exact_at(&store.file, &mut header, 0).map_err(|e| store.io_err(e))?;
        if header != store.header(fingerprint)? {
            return Err(InfditError::Resume {
                path: store.path.clone(),
                reason: "the state file belongs to a different run (or grid); give the state folder the run was \
                 started with, or remove the checkpoint"
                    .into(),
            });
        }
        let slot = Slot::X(steps_done);
        let i = store.slot_index(slot);
        store.sums[i] = block_checksums.iter().map(|&c| Some(c)).collect();
        for p in grid.raster() {
            store.read(slot, &[p])?;
        }
        Ok(store)
    }

    /// The CRC-32s of the blocks of `slot` in raster order (all must have been written).
    pub fn checksums(&self, slot: Slot) -> Result<Vec<u32>> {
        self.sums[self.slot_index(slot)]
            .iter()
            .map(|c| c.ok_or_else(|| InfditError::Internal(format!("state store: {slot:?} not completely written"))))
            .collect()
    }

    fn slot_index(&self, slot: Slot) -> usize {
        match slot {
            Slot::X(k) => k % self.x_slots,
            Slot::D => self.x_slots,
            Slot::Euler => self.x_slots + 1,
        }
    }

    fn header(&self, fingerprint: &str) -> Result<Vec<u8>> {
        let fp = fingerprint.as_bytes();
        if fp.len() > 64 {
            return Err(InfditError::Internal("state fingerprint longer than 64 bytes (bug)".into()));
        }
        let mut h = MAGIC.to_vec();
        for v in [VERSION as usize, CHANNELS, self.grid.block_px, self.grid.rows, self.grid.cols, self.x_slots] {
            h.extend_from_slice(&(v as u32).to_le_bytes());
        }
        h.extend_from_slice(fp);
        h.resize(8 + 6 * 4 + 64, 0);
        Ok(h)
    }

    fn block_bytes(&self) -> usize {
        CHANNELS * self.grid.block_px * self.grid.block_px * 4
    }

    fn offset(&self, slot: Slot, p: BlockPos) -> u64 {
        let s = self.slot_index(slot);
        HEADER_BYTES + ((s * self.grid.len() + p.row * self.grid.cols + p.col) * self.block_bytes()) as u64
    }

    fn io_err(&self, e: std::io::Error) -> InfditError {
        InfditError::io(&self.path, e)
    }

    /// Removes the file's name; the open file stays usable until the store is dropped.
    pub fn unlink(&mut self) -> Result<()> {
        if self.linked {
            std::fs::remove_file(&self.path).map_err(|e| self.io_err(e))?;
            self.linked = false;
        }
        Ok(())
    }

    /// The file (its name, while it is linked).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self, slot: Slot, pos: &[BlockPos]) -> Result<Tensor> {
        let bb = self.block_bytes();
        let mut bytes = vec![0u8; bb];
        let mut v = Vec::with_capacity(pos.len() * bb / 4);
        for p in pos {
            read_exact_at(&self.file, &mut bytes, self.offset(slot, *p)).map_err(|e| self.io_err(e))?;
            let want = self.sums[self.slot_index(slot)][p.row * self.grid.cols + p.col];
            if want != Some(crc32fast::hash(&bytes)) {
                return Err(InfditError::DamagedState {
                    path: self.path.clone(),
                    reason: match want {
                        Some(_) => format!("block {p:?} of {slot:?} fails its checksum"),
                        None => format!("block {p:?} of {slot:?} read before it was written (bug)"),
                    },
                });
            }
            v.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        }
        let bp = self.grid.block_px;
        Ok(Tensor::from_vec(v, (pos.len(), CHANNELS, bp, bp), &Device::Cpu)?)
    }

    fn write(&mut self, slot: Slot, pos: &[BlockPos], t: &Tensor) -> Result<()> {
        let v = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let per = self.block_bytes() / 4;
        if v.len() != pos.len() * per {
            return Err(InfditError::Internal(format!(
                "state store: {} values for {} blocks (bug)",
                v.len(),
                pos.len()
            )));
        }
        let mut bytes = Vec::with_capacity(self.block_bytes());
        for (p, block) in pos.iter().zip(v.chunks_exact(per)) {
            bytes.clear();
            bytes.extend(block.iter().flat_map(|x| x.to_le_bytes()));
            write_all_at(&self.file, &bytes, self.offset(slot, *p)).map_err(|e| self.io_err(e))?;
            let i = self.slot_index(slot);
            self.sums[i][p.row * self.grid.cols + p.col] = Some(crc32fast::hash(&bytes));
        }
        Ok(())
    }
}

impl StateStore {
    /// The grid.
    pub fn grid(&self) -> BlockGrid {
        match self {
            StateStore::Ram(s) => s.grid,
            StateStore::File(s) => s.grid,
        }
    }

    /// The blocks `pos` of `slot`, (n, 3, bp, bp) f32, in host memory.
    pub fn read(&self, slot: Slot, pos: &[BlockPos]) -> Result<Tensor> {
        match self {
            StateStore::Ram(s) => {
                let i = ram_slot(slot);
                let blocks = pos
                    .iter()
                    .map(|p| {
                        s.slots[i][p.row * s.grid.cols + p.col].clone().ok_or_else(|| {
                            InfditError::Internal(format!("state store: block {p:?} of {slot:?} never written (bug)"))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::stack(&blocks, 0)?)
            }
            StateStore::File(s) => s.read(slot, pos),
        }
    }

    /// Stores `t` (n, 3, bp, bp) as the blocks `pos` of `slot`.
    pub fn write(&mut self, slot: Slot, pos: &[BlockPos], t: &Tensor) -> Result<()> {
        match self {
            StateStore::Ram(s) => {
                let i = ram_slot(slot);
                let cols = s.grid.cols;
                // Kept in host memory whatever the model's device.
                let t = crate::device::to_device_compact(t, &Device::Cpu)?;
                for (k, p) in pos.iter().enumerate() {
                    s.slots[i][p.row * cols + p.col] = Some(t.get(k)?);
                }
                Ok(())
            }
            StateStore::File(s) => s.write(slot, pos, t),
        }
    }

    /// Makes the writes so far durable (a file store's data reaches the disk).
    pub fn sync(&self) -> Result<()> {
        match self {
            StateStore::Ram(_) => Ok(()),
            StateStore::File(s) => s.file.sync_data().map_err(|e| s.io_err(e)),
        }
    }

    /// The whole of `slot` as an image (1, 3, H, W).
    pub fn image(&self, slot: Slot) -> Result<Tensor> {
        let grid = self.grid();
        Ok(blocks_to_image(&self.read(slot, &grid.raster())?, &grid)?)
    }

    /// The final sample in `slot`: a memory store becomes the image (its other slots are freed
    /// first, and each block once copied), a file store is read from where it is.
    pub fn into_final(self, slot: Slot) -> Result<FinalSample> {
        match self {
            StateStore::Ram(mut s) => {
                let blocks = std::mem::take(&mut s.slots[ram_slot(slot)]);
                let grid = s.grid;
                drop(s);
                let blocks = blocks
                    .into_iter()
                    .map(|b| b.ok_or_else(|| InfditError::Internal(format!("state store: {slot:?} incomplete (bug)"))))
                    .collect::<Result<Vec<_>>>()?;
                let stacked = Tensor::stack(&blocks, 0)?;
                drop(blocks);
                Ok(FinalSample::from_tensor(blocks_to_image(&stacked, &grid)?))
            }
            StateStore::File(_) => Ok(FinalSample::stored(self, slot)),
        }
    }
}

/// The memory store keeps one `x`: a block's new state replaces its old one.
fn ram_slot(slot: Slot) -> usize {
    match slot {
        Slot::X(_) => 0,
        Slot::D => 1,
        Slot::Euler => 2,
    }
}

/// The final sample of a run: an image tensor, or the state file of a run with a state folder,
/// read band by band so that the output can be written without ever holding the f32 image.
#[derive(Debug, Clone)]
pub struct FinalSample(FinalInner);

#[derive(Debug, Clone)]
enum FinalInner {
    Tensor(Tensor),
    Stored { store: Arc<StateStore>, slot: Slot },
}

impl FinalSample {
    /// A sample held as a (1, 3, H, W) tensor.
    pub fn from_tensor(t: Tensor) -> Self {
        Self(FinalInner::Tensor(t))
    }

    /// `slot` of `store`.
    pub fn stored(store: StateStore, slot: Slot) -> Self {
        Self(FinalInner::Stored { store: Arc::new(store), slot })
    }

    /// (height, width).
    pub fn dims(&self) -> Result<(usize, usize)> {
        match &self.0 {
            FinalInner::Tensor(t) => {
                let (_, _, h, w) = t.dims4()?;
                Ok((h, w))
            }
            FinalInner::Stored { store, .. } => Ok((store.grid().height(), store.grid().width())),
        }
    }

    /// Whether the sample is held in memory (false: read from the state file).
    pub fn in_memory(&self) -> bool {
        matches!(self.0, FinalInner::Tensor(_))
    }

    /// Rows `y0..y1`, (1, 3, y1 - y0, W), f32.
    pub fn rows(&self, y0: usize, y1: usize) -> Result<Tensor> {
        let (h, _) = self.dims()?;
        if y0 > y1 || y1 > h {
            return Err(InfditError::Internal(format!("rows {y0}..{y1} outside a {h}-row sample")));
        }
        match &self.0 {
            FinalInner::Tensor(t) => Ok(t.narrow(2, y0, y1 - y0)?),
            FinalInner::Stored { store, .. } if y0 == y1 => {
                Ok(Tensor::zeros((1, CHANNELS, 0, store.grid().width()), DType::F32, &Device::Cpu)?)
            }
            FinalInner::Stored { store, slot } => {
                let grid = store.grid();
                let bp = grid.block_px;
                let (r0, r1) = (y0 / bp, y1.div_ceil(bp).max(y0 / bp + 1).min(grid.rows));
                let mut bands = Vec::with_capacity(r1 - r0);
                for r in r0..r1 {
                    let pos: Vec<BlockPos> = (0..grid.cols).map(|col| BlockPos { row: r, col }).collect();
                    let row_grid = BlockGrid { rows: 1, ..grid };
                    bands.push(blocks_to_image(&store.read(*slot, &pos)?, &row_grid)?);
                }
                let band = Tensor::cat(&bands, 2)?;
                Ok(band.narrow(2, y0 - r0 * bp, y1 - y0)?)
            }
        }
    }

    /// The whole sample (1, 3, H, W) f32 (12 bytes per pixel: for checks and small images).
    pub fn to_tensor(&self) -> Result<Tensor> {
        match &self.0 {
            FinalInner::Tensor(t) => Ok(t.clone()),
            FinalInner::Stored { store, slot } => store.image(*slot),
        }
    }

    /// The window `top, left, height, width` (e.g. the output crop), to write with
    /// [`crate::imageio::save_image_atomic`] band by band.
    pub fn window(&self, top: usize, left: usize, height: usize, width: usize) -> Result<SampleWindow<'_>> {
        let (h, w) = self.dims()?;
        if top + height > h || left + width > w || height == 0 || width == 0 {
            return Err(InfditError::Internal(format!(
                "window {width}x{height} at ({left}, {top}) is empty or outside the {w}x{h} sample"
            )));
        }
        Ok(SampleWindow { sample: self, top, left, height, width })
    }

    /// The 8-bit RGB image of a window, converted as [`crate::imageio::tensor_to_rgb8`] does, one
    /// block row at a time: 3 bytes per output pixel are held, not the f32 image.
    pub fn to_rgb8(&self, top: usize, left: usize, height: usize, width: usize) -> Result<image::RgbImage> {
        let win = self.window(top, left, height, width)?;
        let mut out = Vec::with_capacity(3 * height * width);
        win.bands(&mut |band| {
            let img = crate::imageio::tensor_to_rgb8(band).map_err(InfditError::Image)?;
            out.extend_from_slice(img.as_raw());
            Ok(())
        })?;
        image::RgbImage::from_raw(width as u32, height as u32, out)
            .ok_or_else(|| InfditError::Internal(format!("cannot make a {width}x{height} image")))
    }
}

/// A window of a [`FinalSample`], read band by band (see [`FinalSample::window`]).
#[derive(Debug, Clone, Copy)]
pub struct SampleWindow<'a> {
    sample: &'a FinalSample,
    top: usize,
    left: usize,
    height: usize,
    width: usize,
}

impl SampleWindow<'_> {
    /// Calls `f` with the window's bands of rows, (1, 3, rows, width), top to bottom: the whole
    /// window for a sample in memory, at most one block row per band for a stored one.
    pub fn bands(&self, f: &mut dyn FnMut(&Tensor) -> Result<()>) -> Result<()> {
        let step = match &self.sample.0 {
            FinalInner::Tensor(_) => self.height,
            FinalInner::Stored { store, .. } => store.grid().block_px,
        };
        let end = self.top + self.height;
        let mut y = self.top;
        while y < end {
            // Bands aligned to the block rows, so each block is read once.
            let y1 = ((y / step + 1) * step).min(end);
            f(&self.sample.rows(y, y1)?.narrow(3, self.left, self.width)?)?;
            y = y1;
        }
        Ok(())
    }
}

impl crate::imageio::RgbBands for SampleWindow<'_> {
    fn size(&self) -> std::result::Result<(usize, usize), crate::imageio::ImageIoError> {
        Ok((self.height, self.width))
    }

    fn for_each_band(
        &self,
        f: &mut dyn FnMut(&Tensor) -> std::result::Result<(), crate::imageio::ImageIoError>,
    ) -> std::result::Result<(), crate::imageio::ImageIoError> {
        // Keep the callback's own error; report a failure to read the state as a bad image.
        let mut inner = None;
        let r = self.bands(&mut |band| {
            f(band).map_err(|e| {
                let msg = e.to_string();
                inner = Some(e);
                InfditError::Internal(msg)
            })
        });
        match (r, inner) {
            (Ok(()), _) => Ok(()),
            (Err(_), Some(e)) => Err(e),
            (Err(e), None) => Err(crate::imageio::ImageIoError::BadTensor {
                path: PathBuf::new(),
                reason: format!("cannot read the sample: {e}"),
            }),
        }
    }
}

#[cfg(unix)]
fn read_exact_at(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, offset)
}

#[cfg(unix)]
fn write_all_at(f: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(f, buf, offset)
}

#[cfg(not(unix))]
fn read_exact_at(_: &File, _: &mut [u8], _: u64) -> std::io::Result<()> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "a state folder needs a Unix system"))
}

#[cfg(not(unix))]
fn write_all_at(_: &File, _: &[u8], _: u64) -> std::io::Result<()> {
    Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "a state folder needs a Unix system"))
}
