//! `--kv-offload`: the block scheduler with its K/V cache kept in host memory (and the LR features
//! made per batch window) gives the same results bit for bit; the cache lives on the storage
//! device, the neighbourhoods are built on the model's device, and each outside neighbour is
//! copied once per layer and batch. On the CPU both devices are the host, so the mechanism is
//! checked through what the cache reports. Also the GPU memory plans.
#![allow(clippy::unwrap_used)] // tests, benchmarks and examples stop at the first failure

mod common;

use std::collections::HashSet;

use candle_core::{DType, Device, Tensor};
use common::{bits, random_inputs, tiny_random};
use infdit::config::DitConfig;
use infdit::diffusion::HeunConfig;
use infdit::model::blocks::{BlockGrid, BlockPos, KvSource, neighbours};
use infdit::sampling::{Mode, SampleOptions, sample};
use infdit::schedule::{BlockDenoiser, CPU_BATCH_TOKENS, CachedKv, MemoryPlan, Placement, batches};

/// One sweep with and without offload: identical bits, for ragged grids and strips, n = 1, 2, 3,
/// and a cache in f32 and bf16.
#[test]
fn offloaded_sweep_is_bit_identical() {
    let m = tiny_random(2, 32, 2, 5);
    let f = DType::F32;
    for (rows, cols, n, kv) in
        [(1, 5, 1, f), (3, 4, 2, f), (3, 4, 3, DType::BF16), (4, 1, 2, f), (2, 3, 2, DType::BF16), (2, 3, 3, f)]
    {
        let (p, eps, clip) = random_inputs(rows, cols, (rows * 7 + cols) as u64);
        let cl = p.concat_lr.full().unwrap();
        let x = (&cl + (eps * 1.5).unwrap()).unwrap();
        let plain = BlockDenoiser::new(&m.dit, &clip, &p.lr, &cl, n, kv).unwrap().sweep(&x, 1.5).unwrap();
        let mut off = BlockDenoiser::new(&m.dit, &clip, &p.lr, &cl, n, kv).unwrap().with_kv_offload(true);
        let d = off.sweep(&x, 1.5).unwrap();
        assert!(bits(&d) == bits(&plain), "{rows}x{cols} n={n} {kv:?}: offload changed the result");
        // Something was copied whenever there is more than one batch.
        assert_eq!(off.uploaded_kv_bytes > 0, batches(&p.grid, n).len() > 1);
    }
}

/// A whole sample (Heun steps in the sweeps, in-memory state) with --kv-offload equals the one
/// without, bit for bit.
#[test]
fn offloaded_sample_is_bit_identical() {
    let m = tiny_random(2, 32, 2, 9);
    let (p, eps, clip) = random_inputs(3, 2, 4);
    let heun = HeunConfig { steps: 3, ..HeunConfig::default() };
    let mode = Mode::Blocks { block_batch: 2, kv_dtype: DType::F32 };
    let run = |kv_offload: bool| {
        let opts = SampleOptions { heun, mode, kv_offload, ..Default::default() };
        sample(&m, &p, &clip, &eps, &opts, &mut |_| {}).unwrap().sample.unwrap()
    };
    assert!(bits(&run(true)) == bits(&run(false)));
}

/// Each outside neighbour of a batch is copied to the model's device once per layer: the bytes
/// uploaded over a sweep are depth x sum over batches of (distinct outside neighbours) x block K+V.
#[test]
fn each_outside_neighbour_is_uploaded_once_per_layer_and_batch() {
    let (depth, hidden) = (2, 32);
    let m = tiny_random(depth, hidden, 2, 3);
    for (rows, cols, n) in [(3, 4, 2), (2, 5, 1), (4, 4, 3)] {
        let grid = BlockGrid { rows, cols, block_px: 128 };
        let (p, eps, clip) = random_inputs(rows, cols, 1);
        let cl = p.concat_lr.full().unwrap();
        let x = (&cl + eps).unwrap();
        let mut den = BlockDenoiser::new(&m.dit, &clip, &p.lr, &cl, n, DType::F32).unwrap().with_kv_offload(true);
        den.sweep(&x, 1.0).unwrap();
        let outside: usize = batches(&grid, n)
            .iter()
            .map(|b| {
                let mine: HashSet<BlockPos> = b.blocks().into_iter().collect();
                let out: HashSet<BlockPos> = b
                    .blocks()
                    .iter()
                    .flat_map(|p| neighbours(*p)[1..].to_vec())
                    .filter(|q| !mine.contains(q))
                    .collect();
                out.len()
            })
            .sum();
        let block_kv = 2 * 1024 * hidden * 4; // K and V, 1024 tokens, f32
        assert_eq!(den.uploaded_kv_bytes, depth * outside * block_kv, "{rows}x{cols} n={n}");
        // Without offload nothing is copied.
        let mut plain = BlockDenoiser::new(&m.dit, &clip, &p.lr, &cl, n, DType::F32).unwrap();
        plain.sweep(&x, 1.0).unwrap();
        assert_eq!(plain.uploaded_kv_bytes, 0);
    }
}

/// The cache itself: an offloaded cache holds its tensors on the storage device, the
/// neighbourhoods come back on the keys' device and equal those of a cache on that device, and
/// every cached block is a tensor of its own (not a view into the batch's keys, which would keep
/// the whole batch alive).
#[test]
fn offloaded_cache_stores_on_the_host_and_serves_on_the_model_device() {
    let grid = BlockGrid { rows: 2, cols: 3, block_px: 128 };
    let (h, t, d, depth) = (2, 16, 4, 2);
    let dev = Device::Cpu;
    let mut on_device = CachedKv::new(&grid, depth, DType::F32);
    let mut offloaded = CachedKv::with_storage(&grid, depth, DType::F32, Some(Device::Cpu));
    assert!(on_device.storage().is_none());
    assert!(offloaded.storage().is_some_and(|s| s.is_cpu()));
    let mut seed = 0u64;
    for batch in batches(&grid, 2) {
        let nb = batch.len();
        on_device.begin(batch);
        offloaded.begin(batch);
        for layer in 0..depth {
            seed += 1;
            let k = Tensor::rand(-1f32, 1f32, (nb, h, t, d), &dev).unwrap();
            let v = (Tensor::rand(-1f32, 1f32, (nb, h, t, d), &dev).unwrap() + seed as f64).unwrap();
            let (k1, v1) = on_device.neighbourhood(layer, &k, &v).unwrap();
            let (k2, v2) = offloaded.neighbourhood(layer, &k, &v).unwrap();
            assert!(k2.device().same_device(k.device()) && v2.device().same_device(k.device()));
            assert_eq!(k2.dims(), [nb, h, 4 * t, d]);
            assert!(bits(&k1) == bits(&k2) && bits(&v1) == bits(&v2), "batch {batch:?} layer {layer}");
        }
        for c in [&on_device, &offloaded] {
            for x in c.tensors() {
                assert!(x.device().is_cpu());
                assert_eq!(x.layout().start_offset(), 0, "a cached block is a view into its batch");
                assert_eq!(x.dims(), [h, t, d]);
            }
        }
    }
}

/// GPU memory plans: the sampler state and images are in host memory; with --kv-offload nothing
/// grows with the image (same plan for any grid at least n blocks high and wide), without it only
/// the cache and the LR band grow, with the width. On the CPU the plan is unchanged.
#[test]
fn gpu_memory_plans() {
    let cfg = DitConfig::released();
    let params = 700_000_000;
    let g = |rows, cols| BlockGrid { rows, cols, block_px: 128 };
    let bf = DType::BF16;
    let gpu = Placement { gpu: true, ..Placement::default() };
    let off = Placement { gpu: true, kv_offload: true, state_dir: false };
    let plan = |grid: &BlockGrid, n, p| MemoryPlan::estimate_placed(&cfg, params, grid, Some(n), bf, bf, p);
    // CPU: the same as before.
    for grid in [g(4, 4), g(32, 32)] {
        assert_eq!(
            MemoryPlan::estimate_placed(&cfg, params, &grid, Some(2), bf, bf, Placement::default()),
            MemoryPlan::estimate_for(&cfg, params, &grid, Some(2), bf, bf, false)
        );
    }
    // Offloaded: independent of the grid.
    let small = plan(&g(8, 8), 4, off);
    for grid in [g(8, 32), g(32, 8), g(64, 64), g(128, 16)] {
        assert_eq!(plan(&grid, 4, off), small, "{grid:?}");
    }
    // On the GPU without offload: independent of the height; the cache grows with the width.
    assert_eq!(plan(&g(8, 32), 2, gpu), plan(&g(64, 32), 2, gpu));
    assert!(plan(&g(8, 64), 2, gpu).kv_cache > plan(&g(8, 32), 2, gpu).kv_cache);
    // 4096^2 (32 x 32 blocks) in bf16: the cache is the big part on the GPU; offloaded it is gone.
    let (k, o) = (plan(&g(32, 32), 1, gpu), plan(&g(32, 32), 1, off));
    assert!(k.kv_cache > 4 << 30 && o.kv_cache < 100 << 20, "{k} / {o}");
    assert!(o.image_state < k.image_state);
    // The CPU plan of the same run counts the image-size state the GPU plan leaves in host memory.
    let cpu = MemoryPlan::estimate_for(&cfg, params, &g(32, 32), Some(1), bf, bf, false);
    assert!(cpu.image_state > k.image_state);
    // The largest batch that fits grows with the budget, and offloading lets a larger one fit.
    let fit = |p, limit: usize| MemoryPlan::largest_batch_placed(&cfg, params, &g(32, 32), bf, bf, limit, p);
    assert_eq!(fit(gpu, 4 << 30), None);
    assert!(fit(off, 4 << 30).is_some());
    assert!(fit(off, 8 << 30) >= fit(gpu, 8 << 30));
}

/// The default block batch: the largest that fits on a GPU; on the CPU capped at 4096 tokens per
/// forward (n = 2 for 128-px blocks of patch 4, 4 for 64-px blocks), and never above what fits.
#[test]
fn default_block_batch() {
    let cfg = DitConfig::released();
    let params = 700_000_000;
    let g = |rows, cols| BlockGrid { rows, cols, block_px: cfg.block_px };
    let bf = DType::BF16;
    let gpu = Placement { gpu: true, ..Placement::default() };
    let cpu = Placement::default();
    let big = 1 << 40;
    let pick = |p, limit| MemoryPlan::default_batch(&cfg, params, &g(16, 16), bf, bf, limit, p);
    assert_eq!(pick(gpu, big), Some(16));
    assert_eq!(pick(cpu, big), Some(2));
    assert_eq!(CPU_BATCH_TOKENS, 4096);
    // A budget below the cap's plan wins; no fit is None on either device.
    let one = MemoryPlan::estimate_placed(&cfg, params, &g(16, 16), Some(1), bf, bf, cpu).total();
    assert_eq!(pick(cpu, one), Some(1));
    assert_eq!(pick(cpu, one - 1), None);
    // 64-px blocks of patch 4 (256 tokens): n = 4.
    let small = DitConfig { block_px: 64, ..cfg.clone() };
    let gs = BlockGrid { rows: 16, cols: 16, block_px: 64 };
    assert_eq!(MemoryPlan::default_batch(&small, params, &gs, bf, bf, big, cpu), Some(4));
}
