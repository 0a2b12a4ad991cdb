//! The UniBA block grid: cutting images into blocks, putting them back, and the key/value
//! neighbourhood [self, top-left, left, top] with edge replication (spec §3.5).

use candle_core::{Result, Tensor};

/// A grid of `rows x cols` square blocks of `block_px` pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockGrid {
    /// Block rows.
    pub rows: usize,
    /// Block columns.
    pub cols: usize,
    /// Block side in pixels.
    pub block_px: usize,
}

/// Position of one block in the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockPos {
    /// Block row.
    pub row: usize,
    /// Block column.
    pub col: usize,
}

/// The four key groups of a block, in the reference's order: self, top-left, left, top. Missing
/// neighbours at the border are replaced by edge replication (row/column clamped at 0).
pub fn neighbours(p: BlockPos) -> [BlockPos; 4] {
    let (a, b) = (p.row, p.col);
    let (am, bm) = (a.saturating_sub(1), b.saturating_sub(1));
    [p, BlockPos { row: am, col: bm }, BlockPos { row: a, col: bm }, BlockPos { row: am, col: b }]
}

impl BlockGrid {
    /// The grid of an image of `h x w` pixels; both must be multiples of `block_px`.
    pub fn for_image(h: usize, w: usize, block_px: usize) -> Result<Self> {
        if h == 0 || w == 0 || !h.is_multiple_of(block_px) || !w.is_multiple_of(block_px) {
            candle_core::bail!("image {h}x{w} is not a non-empty multiple of the {block_px}-px block grid")
        }
        Ok(Self { rows: h / block_px, cols: w / block_px, block_px })
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// Whether the grid has no block.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All blocks in raster order.
    pub fn raster(&self) -> Vec<BlockPos> {
        (0..self.rows).flat_map(|row| (0..self.cols).map(move |col| BlockPos { row, col })).collect()
    }

    /// Image height in pixels.
    pub fn height(&self) -> usize {
        self.rows * self.block_px
    }

    /// Image width in pixels.
    pub fn width(&self) -> usize {
        self.cols * self.block_px
    }
}

/// Cuts the blocks at `pos` out of an image (1, C, H, W): (n, C, bp, bp).
pub fn take_blocks(img: &Tensor, bp: usize, pos: &[BlockPos]) -> Result<Tensor> {
    let parts =
        pos.iter().map(|p| img.narrow(2, p.row * bp, bp)?.narrow(3, p.col * bp, bp)).collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

/// Cuts a whole image (1, C, R bp, Cc bp) into its blocks in raster order: (R Cc, C, bp, bp).
pub fn image_to_blocks(img: &Tensor, bp: usize) -> Result<Tensor> {
    let (b, c, h, w) = img.dims4()?;
    if b != 1 {
        candle_core::bail!("image_to_blocks expects batch 1, got {b}")
    }
    let (r, cc) = (h / bp, w / bp);
    img.reshape((c, r, bp, cc, bp))?.permute((1, 3, 0, 2, 4))?.reshape((r * cc, c, bp, bp))
}

/// Inverse of [`image_to_blocks`]: (R Cc, C, bp, bp) -> (1, C, R bp, Cc bp).
pub fn blocks_to_image(blocks: &Tensor, grid: &BlockGrid) -> Result<Tensor> {
    let (n, c, bp, _) = blocks.dims4()?;
    if n != grid.len() {
        candle_core::bail!("blocks_to_image: {n} blocks for a grid of {}", grid.len())
    }
    blocks.reshape((grid.rows, grid.cols, c, bp, bp))?.permute((2, 0, 3, 1, 4))?.reshape((
        1,
        c,
        grid.rows * bp,
        grid.cols * bp,
    ))
}

/// Supplies, per layer, the keys and values of each query block's neighbourhood.
pub trait KvSource {
    /// `k` and `v` are (n, H, T, d) for the n blocks of the current batch (K after QK-norm and RoPE,
    /// before the block offsets P). Returns keys and values (n, H, 4T, d), groups in the order
    /// [self, top-left, left, top].
    fn neighbourhood(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)>;
}

/// Whole-image mode: the batch is every block of the grid in raster order, so every neighbour is in
/// the batch itself (the reference's `full` inference).
#[derive(Debug, Clone)]
pub struct WholeImageKv {
    index: [Tensor; 3],
    /// The four source blocks of each block, [self, top-left, left, top] (the training op's table).
    groups: Vec<[usize; 4]>,
}

impl WholeImageKv {
    /// For a grid, on a device.
    pub fn new(grid: &BlockGrid, dev: &candle_core::Device) -> Result<Self> {
        let pos = grid.raster();
        let idx = |g: usize| -> Result<Tensor> {
            let v: Vec<u32> = pos
                .iter()
                .map(|p| {
                    let q = neighbours(*p)[g];
                    (q.row * grid.cols + q.col) as u32
                })
                .collect();
            Tensor::new(v.as_slice(), dev)
        };
        let groups = pos.iter().map(|p| neighbours(*p).map(|q| q.row * grid.cols + q.col)).collect();
        Ok(Self { index: [idx(1)?, idx(2)?, idx(3)?], groups })
    }
}

/// Concatenates a block's own K/V with its three gathered neighbour groups along the token axis.
pub fn concat_groups(own: &Tensor, others: [Tensor; 3]) -> Result<Tensor> {
    let [tl, l, t] = others;
    Tensor::cat(&[own, &tl, &l, &t], 2)
}

impl KvSource for WholeImageKv {
    fn neighbourhood(&mut self, _layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        // Training (an operand in an autograd graph, f32 CPU): one op with a hand-written backward.
        if crate::model::grad::trains(&[k, v]) {
            let g = &self.groups;
            return Ok((crate::model::grad::gather(k, g)?, crate::model::grad::gather(v, g)?));
        }
        let gather = |t: &Tensor| -> Result<Tensor> {
            let g = |i: usize| t.index_select(&self.index[i], 0);
            concat_groups(t, [g(0)?, g(1)?, g(2)?])
        };
        Ok((gather(k)?, gather(v)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn border_replication_matches_the_reference_rule() {
        let p = |row, col| BlockPos { row, col };
        assert_eq!(neighbours(p(0, 0)), [p(0, 0); 4]);
        assert_eq!(neighbours(p(0, 2)), [p(0, 2), p(0, 1), p(0, 1), p(0, 2)]);
        assert_eq!(neighbours(p(3, 0)), [p(3, 0), p(2, 0), p(3, 0), p(2, 0)]);
        assert_eq!(neighbours(p(1, 1)), [p(1, 1), p(0, 0), p(1, 0), p(0, 1)]);
    }

    #[test]
    fn blocks_round_trip() -> Result<()> {
        let dev = Device::Cpu;
        let img = Tensor::arange(0f32, (2 * 8 * 12) as f32, &dev)?.reshape((1, 2, 8, 12))?;
        let grid = BlockGrid::for_image(8, 12, 4)?;
        let b = image_to_blocks(&img, 4)?;
        assert_eq!(b.dims(), &[6, 2, 4, 4]);
        // Block (1, 2) is rows 4..8, cols 8..12.
        let direct = take_blocks(&img, 4, &[BlockPos { row: 1, col: 2 }])?;
        let diff = (b.narrow(0, 5, 1)? - direct)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        let back = blocks_to_image(&b, &grid)?;
        assert_eq!((back - img)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }
}
