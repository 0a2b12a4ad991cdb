//! One huge image over several devices, simulated (docs/scale-out.md, "One image, several GPUs").
//!
//! Within one network evaluation, a block needs the keys and values of its left, top and top-left
//! neighbours at every layer ([`crate::model::blocks::neighbours`]), and nothing else of the
//! image; so the blocks of one anti-diagonal are independent and the sweep can run as a wavefront.
//! The next evaluation of a block needs only that block's own result (the Heun update is per
//! pixel), so evaluations can overlap too.
//!
//! [`simulate`] replays that exact dependency graph: every block of every evaluation is a task of
//! `block_time` seconds on the device that owns its column, and each device runs its sweeps in
//! order (it starts a block of the next evaluation once its part of the current one is done, so it
//! holds one evaluation's K/V cache at a time, while devices to its right may still be on the
//! previous evaluation); a dependency on another device costs a
//! transfer of the block's K/V rows (every layer) over the sender's link, queued behind the link's
//! earlier transfers and overlapped with compute. It returns the makespan, each device's busy
//! time, transfers, and the peak number of received K/V blocks still waiting to be used (memory
//! beyond the device's own cache). The cost model is linear (a device runs `k` blocks in `k x
//! block_time`), which holds once a device's batches are large enough to keep it busy.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use candle_core::DType;

use crate::config::DitConfig;
use crate::model::blocks::{BlockGrid, BlockPos, neighbours};
use crate::schedule::{MemoryPlan, Placement};

/// How block columns are spread over the devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assign {
    /// Contiguous strips of columns (as even as possible): only the blocks on a strip's right edge
    /// travel, to the next device, and a device's K/V cache is that of its strip.
    Strips,
    /// Column `c` on device `c mod D`: every block's K/V travels to the next device.
    Cyclic,
}

/// What to simulate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WavefrontSetup {
    /// Block rows of the image.
    pub rows: usize,
    /// Block columns.
    pub cols: usize,
    /// Devices.
    pub devices: usize,
    /// Network evaluations chained (1: one evaluation, as asked; the sampler's count: the whole
    /// sampling, with evaluations overlapping where the graph allows).
    pub evaluations: usize,
    /// Seconds for one block's forward through every layer on one device.
    pub block_time_s: f64,
    /// Bytes of one block's keys and values at every layer.
    pub kv_bytes_per_block: u64,
    /// Link bandwidth out of each device, bytes per second.
    pub link_bytes_per_s: f64,
    /// Latency of one transfer, seconds.
    pub link_latency_s: f64,
    /// Column assignment.
    pub assign: Assign,
}

/// One device's share.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DeviceStats {
    /// Block columns it owns.
    pub cols: usize,
    /// Blocks it ran (all evaluations).
    pub blocks: usize,
    /// Seconds it computed.
    pub busy_s: f64,
    /// K/V blocks it sent.
    pub sent: usize,
    /// Seconds its link was sending.
    pub link_busy_s: f64,
    /// Most received K/V blocks held at once, waiting for their last user on this device.
    pub peak_waiting: usize,
}

/// The simulated run.
#[derive(Debug, Clone, PartialEq)]
pub struct WavefrontRun {
    /// Time from the first block to the last, seconds.
    pub makespan_s: f64,
    /// Per device.
    pub devices: Vec<DeviceStats>,
    /// Blocks in all (rows x cols x evaluations).
    pub blocks: usize,
    /// Bytes sent between devices in all.
    pub bytes_moved: u64,
}

impl WavefrontRun {
    /// The time of the same blocks on one device with nothing to wait for.
    pub fn serial_s(&self, block_time_s: f64) -> f64 {
        self.blocks as f64 * block_time_s
    }
}

/// The devices' columns for `assign`: device of each column.
pub fn column_owners(cols: usize, devices: usize, assign: Assign) -> Vec<usize> {
    let d = devices.max(1);
    match assign {
        Assign::Cyclic => (0..cols).map(|c| c % d).collect(),
        Assign::Strips => {
            // The first `cols % d` strips one column wider.
            let (base, extra) = (cols / d, cols % d);
            let mut owners = Vec::with_capacity(cols);
            for dev in 0..d {
                owners.extend(std::iter::repeat_n(dev, base + usize::from(dev < extra)));
            }
            owners
        }
    }
}

/// An event time, totally ordered.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Time(f64);
impl Eq for Time {}
impl PartialOrd for Time {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Time {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

/// A device's ready blocks, by (evaluation, priority within it) then block id, smallest first.
type ReadyQueue = BinaryHeap<Reverse<((usize, usize, usize), usize)>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// A block finished on its device.
    Done(usize),
    /// A block's K/V arrived on a device.
    Arrive(usize, usize),
    /// A block's last dependency is available on its device.
    Ready(usize),
}

/// Replays the dependency graph (see the module docs). Errors name a setup that makes no sense.
pub fn simulate(s: &WavefrontSetup) -> Result<WavefrontRun, String> {
    if s.rows == 0 || s.cols == 0 || s.devices == 0 || s.evaluations == 0 {
        return Err("the grid, the devices and the evaluations must all be at least 1".into());
    }
    if !(s.block_time_s > 0.0 && s.block_time_s.is_finite()) {
        return Err("the block time must be a positive number".into());
    }
    let positive = s.link_bytes_per_s > 0.0 && s.link_bytes_per_s.is_finite();
    if !positive || s.link_latency_s.is_nan() || s.link_latency_s < 0.0 {
        return Err("the link bandwidth must be positive and its latency not negative".into());
    }
    let (rows, cols, evals) = (s.rows, s.cols, s.evaluations);
    let n = rows
        .checked_mul(cols)
        .and_then(|x| x.checked_mul(evals))
        .filter(|&n| n <= 1 << 28)
        .ok_or("too many blocks to simulate (rows x cols x evaluations above 2^28)")?;
    let owners = column_owners(cols, s.devices, s.assign);
    let id = |e: usize, p: BlockPos| (e * rows + p.row) * cols + p.col;
    let pos = |i: usize| (i / (rows * cols), BlockPos { row: (i / cols) % rows, col: i % cols });
    // The same-evaluation dependencies: the distinct neighbours other than the block itself.
    let deps_of = |p: BlockPos| {
        let mut d: Vec<BlockPos> = neighbours(p).into_iter().filter(|q| *q != p).collect();
        d.sort();
        d.dedup();
        d
    };
    // The blocks that need a block (its dependents), same evaluation, and the next evaluation.
    let users_of = |p: BlockPos| -> Vec<BlockPos> {
        [(0, 1), (1, 0), (1, 1)]
            .into_iter()
            .map(|(dr, dc)| BlockPos { row: p.row + dr, col: p.col + dc })
            .filter(|q| q.row < rows && q.col < cols)
            .collect()
    };
    let transfer = s.kv_bytes_per_block as f64 / s.link_bytes_per_s;
    let mut pending = vec![0u32; n];
    let mut avail = vec![0f64; n];
    for e in 0..evals {
        for r in 0..rows {
            for c in 0..cols {
                let p = BlockPos { row: r, col: c };
                pending[id(e, p)] = deps_of(p).len() as u32 + u32::from(e > 0);
            }
        }
    }
    let mut events: BinaryHeap<Reverse<(Time, Ev)>> = BinaryHeap::new();
    for r in 0..rows {
        for c in 0..cols {
            let p = BlockPos { row: r, col: c };
            if pending[id(0, p)] == 0 {
                events.push(Reverse((Time(0.0), Ev::Ready(id(0, p)))));
            }
        }
    }
    let prio = |i: usize| {
        let (e, p) = pos(i);
        match s.assign {
            Assign::Strips => (e, p.row, p.col),
            Assign::Cyclic => (e, p.row + p.col, p.row),
        }
    };
    let d = s.devices;
    let mut ready: Vec<ReadyQueue> = vec![BinaryHeap::new(); d];
    let mut busy = vec![false; d];
    // The evaluation each device is on, and its blocks of it still to run.
    let mut cur_eval = vec![0usize; d];
    let per_eval: Vec<usize> = (0..d).map(|dev| rows * owners.iter().filter(|&&o| o == dev).count()).collect();
    let mut left_in_eval = per_eval.clone();
    let mut link_free = vec![0f64; d];
    let mut stats = vec![DeviceStats::default(); d];
    for &o in &owners {
        stats[o].cols += 1;
    }
    // Received K/V blocks waiting on a device: users left on that device.
    let mut waiting_users: HashMap<(usize, usize), usize> = HashMap::new();
    let mut waiting = vec![0usize; d];
    let mut makespan = 0f64;
    let mut bytes_moved = 0u64;
    let mut done = 0usize;
    while let Some(Reverse((Time(t), _))) = events.peek().copied() {
        // Every event at this time, then the idle devices pick their next block.
        while let Some(Reverse((Time(t2), ev))) = events.peek().copied() {
            if t2 > t {
                break;
            }
            events.pop();
            match ev {
                Ev::Ready(i) => {
                    let o = owners[pos(i).1.col];
                    ready[o].push(Reverse((prio(i), i)));
                }
                Ev::Arrive(i, dev) => {
                    let (_, p) = pos(i);
                    let users = users_of(p).into_iter().filter(|q| owners[q.col] == dev).count();
                    waiting_users.insert((i, dev), users);
                    waiting[dev] += 1;
                    stats[dev].peak_waiting = stats[dev].peak_waiting.max(waiting[dev]);
                }
                Ev::Done(i) => {
                    done += 1;
                    makespan = makespan.max(t);
                    let (e, p) = pos(i);
                    let o = owners[p.col];
                    busy[o] = false;
                    left_in_eval[o] -= 1;
                    if left_in_eval[o] == 0 {
                        cur_eval[o] += 1;
                        left_in_eval[o] = per_eval[o];
                    }
                    // Received blocks this one used are freed after their last user.
                    for q in deps_of(p) {
                        if owners[q.col] != o {
                            let key = (id(e, q), o);
                            if let Some(u) = waiting_users.get_mut(&key) {
                                *u = u.saturating_sub(1);
                                if *u == 0 {
                                    waiting_users.remove(&key);
                                    waiting[o] = waiting[o].saturating_sub(1);
                                }
                            }
                        }
                    }
                    // One transfer per other device that uses this block.
                    let mut sent_to: Vec<(usize, f64)> = Vec::new();
                    for q in users_of(p) {
                        let od = owners[q.col];
                        let at = if od == o {
                            t
                        } else if let Some(&(_, a)) = sent_to.iter().find(|(dv, _)| *dv == od) {
                            a
                        } else {
                            let start = link_free[o].max(t);
                            link_free[o] = start + transfer;
                            stats[o].sent += 1;
                            stats[o].link_busy_s += transfer;
                            bytes_moved += s.kv_bytes_per_block;
                            let a = start + transfer + s.link_latency_s;
                            events.push(Reverse((Time(a), Ev::Arrive(i, od))));
                            sent_to.push((od, a));
                            a
                        };
                        let j = id(e, q);
                        avail[j] = avail[j].max(at);
                        pending[j] -= 1;
                        if pending[j] == 0 {
                            events.push(Reverse((Time(avail[j]), Ev::Ready(j))));
                        }
                    }
                    if e + 1 < evals {
                        let j = id(e + 1, p);
                        avail[j] = avail[j].max(t);
                        pending[j] -= 1;
                        if pending[j] == 0 {
                            events.push(Reverse((Time(avail[j]), Ev::Ready(j))));
                        }
                    }
                }
            }
        }
        for dev in 0..d {
            let eligible = ready[dev].peek().is_some_and(|Reverse(((e, _, _), _))| *e <= cur_eval[dev]);
            if !busy[dev]
                && eligible
                && let Some(Reverse((_, i))) = ready[dev].pop()
            {
                busy[dev] = true;
                stats[dev].blocks += 1;
                stats[dev].busy_s += s.block_time_s;
                events.push(Reverse((Time(t + s.block_time_s), Ev::Done(i))));
            }
        }
    }
    if done != n {
        return Err(format!("internal: {done} of {n} blocks ran (the graph has a cycle)"));
    }
    Ok(WavefrontRun { makespan_s: makespan, devices: stats, blocks: n, bytes_moved })
}

/// FLOPs of one block's forward through the network, per evaluation (spec §12): the linear layers
/// (`2 x tokens x 12 x hidden^2` a layer: QKV, output projection, the 4x MLP), the block attention
/// (scores and weighted sum over the four key groups: `2 x 2 x T x 4T x hidden` a layer) and the
/// layer-0 cross-attention to the LR window. The released model: about 1.76 TFLOP.
pub fn block_flops(cfg: &DitConfig) -> f64 {
    let t = cfg.tokens_per_block() as f64;
    let d = cfg.hidden as f64;
    let mlp = cfg.mlp_hidden as f64;
    let layers = cfg.depth as f64;
    let linear = 2.0 * t * (4.0 * d * d + 2.0 * d * mlp) * layers;
    let attention = 2.0 * 2.0 * t * (4.0 * t) * d * layers;
    let win = (cfg.lr_window() * cfg.lr_window()) as f64;
    let cross = if cfg.depth > 0 {
        2.0 * t * d * d + 2.0 * win * 2.0 * d * d + 2.0 * 2.0 * t * win * d + 2.0 * t * d * d
    } else {
        0.0
    };
    linear + attention + cross
}

/// Bytes of one block's keys and values at every layer, stored as `kv`.
pub fn kv_bytes_per_block(cfg: &DitConfig, kv: DType) -> u64 {
    (cfg.depth * 2 * cfg.tokens_per_block() * cfg.hidden * kv.size_in_bytes()) as u64
}

/// The memory plan of one device that owns `cols` block columns of a `rows`-row grid on a GPU,
/// with `n x n` block batches: the scheduler's own plan for its strip ([`MemoryPlan::estimate_placed`]),
/// whose K/V cache (`cols + n + 1` blocks a layer) holds the strip's frontier and the incoming
/// left column.
pub fn device_plan(
    cfg: &DitConfig,
    params: usize,
    rows: usize,
    cols: usize,
    n: usize,
    act: DType,
    kv: DType,
) -> MemoryPlan {
    let grid = BlockGrid { rows: rows.max(1), cols: cols.max(1), block_px: cfg.block_px };
    MemoryPlan::estimate_placed(
        cfg,
        params,
        &grid,
        Some(n.max(1)),
        act,
        kv,
        Placement { gpu: true, ..Placement::default() },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(rows: usize, cols: usize, devices: usize) -> WavefrontSetup {
        WavefrontSetup {
            rows,
            cols,
            devices,
            evaluations: 1,
            block_time_s: 1.0,
            kv_bytes_per_block: 0,
            link_bytes_per_s: 1.0,
            link_latency_s: 0.0,
            assign: Assign::Strips,
        }
    }

    #[test]
    fn one_device_runs_every_block_back_to_back() {
        let r = simulate(&setup(5, 7, 1)).unwrap();
        assert_eq!(r.makespan_s, 35.0);
        assert_eq!(r.devices[0].blocks, 35);
        assert_eq!(r.bytes_moved, 0);
    }

    #[test]
    fn unlimited_devices_take_one_step_per_anti_diagonal() {
        // One column per device, free links: the critical path is the anti-diagonals, rows + cols - 1.
        for assign in [Assign::Strips, Assign::Cyclic] {
            let r = simulate(&WavefrontSetup { assign, ..setup(6, 9, 9) }).unwrap();
            assert_eq!(r.makespan_s, 14.0, "{assign:?}");
        }
    }

    #[test]
    fn strips_pipeline_row_by_row() {
        // D strips of w columns: device i finishes row r at (r + i + 1) w; makespan (R + D - 1) w.
        let r = simulate(&setup(16, 16, 4)).unwrap();
        assert_eq!(r.makespan_s, (16.0 + 4.0 - 1.0) * 4.0);
        // Only the strip edges travel: 3 boundaries x 16 rows.
        assert_eq!(r.devices.iter().map(|d| d.sent).sum::<usize>(), 3 * 16);
        assert_eq!(r.devices.iter().map(|d| d.cols).collect::<Vec<_>>(), [4, 4, 4, 4]);
    }

    #[test]
    fn evaluations_overlap_in_the_pipeline() {
        let one = simulate(&setup(16, 16, 4)).unwrap().makespan_s;
        let ten = simulate(&WavefrontSetup { evaluations: 10, ..setup(16, 16, 4) }).unwrap().makespan_s;
        // Ten evaluations cost less than ten separate ones (no drain between them), and no less
        // than the work of one device.
        assert!(ten < 10.0 * one, "{ten} vs {one}");
        assert!(ten >= 10.0 * 64.0);
    }

    #[test]
    fn slow_links_delay_the_cyclic_assignment_more_than_strips() {
        let slow = |assign| WavefrontSetup { assign, kv_bytes_per_block: 1, link_bytes_per_s: 2.0, ..setup(8, 16, 4) };
        let strips = simulate(&slow(Assign::Strips)).unwrap();
        let cyclic = simulate(&slow(Assign::Cyclic)).unwrap();
        assert!(cyclic.bytes_moved > 4 * strips.bytes_moved);
        assert!(strips.makespan_s >= 32.0);
    }

    #[test]
    fn released_model_block_cost_and_kv_size() {
        let cfg = crate::config::ModelConfig::released().dit;
        let f = block_flops(&cfg);
        assert!((1.70e12..1.80e12).contains(&f), "{f}");
        // 28 layers x K and V x 1024 tokens x 1280 x bf16 = 146.8 MB (spec §12).
        assert_eq!(kv_bytes_per_block(&cfg, DType::BF16), 146_800_640);
    }

    #[test]
    fn bad_setups_are_errors() {
        assert!(simulate(&setup(0, 4, 1)).is_err());
        assert!(simulate(&WavefrontSetup { block_time_s: 0.0, ..setup(2, 2, 1) }).is_err());
        assert!(simulate(&WavefrontSetup { link_bytes_per_s: 0.0, ..setup(2, 2, 2) }).is_err());
    }
}
