//! The scheduler's key/value cache: per layer, what later block batches still need (see the
//! module docs of [`crate::schedule`]).

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

use super::plan::Batch;
use crate::kernels::gather::neighbourhood_cat;
use crate::model::blocks::{BlockGrid, BlockPos, KvSource, neighbours};

/// K and V of one block at one layer, (H, T, d) each.
#[derive(Debug, Clone)]
struct BlockKv {
    k: Tensor,
    v: Tensor,
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
        // Each block's [own, top-left, left, top], the own one being neighbour 0.
        let mut pieces_k = Vec::with_capacity(pos.len());
        let mut pieces_v = Vec::with_capacity(pos.len());
        for p in &pos {
            let [e0, e1, e2, e3] = neighbours(*p).map(fetch);
            let (e0, e1, e2, e3) = (e0?, e1?, e2?, e3?);
            pieces_k.push([e0.k, e1.k, e2.k, e3.k]);
            pieces_v.push([e0.v, e1.v, e2.v, e3.v]);
        }
        drop(outside);
        let k4 = neighbourhood_cat(&pieces_k)?;
        let v4 = neighbourhood_cat(&pieces_v)?;

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
