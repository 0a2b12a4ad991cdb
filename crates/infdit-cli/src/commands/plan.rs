//! `infdit plan wavefront`: one huge image over several devices, simulated by the library's
//! [`infdit::batch::wavefront`] replay of the block dependency graph.

use anyhow::{Result, anyhow, bail};
use candle_core::DType;
use serde_json::json;

use infdit::ModelConfig;
use infdit::batch::wavefront::{Assign, WavefrontSetup, block_flops, device_plan, kv_bytes_per_block, simulate};

use crate::args::{AssignArg, PlanArgs, PlanCommand, WavefrontArgs};

/// Runs `infdit plan ...`.
pub(crate) fn plan(a: PlanArgs) -> Result<()> {
    match a.command {
        PlanCommand::Wavefront(w) => wavefront(&w),
    }
}

/// Parses `WxH` in pixels.
fn parse_size(s: &str) -> Result<(usize, usize)> {
    let bad = || anyhow!("--size '{s}': write the output size as WxH in pixels, e.g. 16384x16384");
    let (w, h) = s.trim().split_once(['x', 'X']).ok_or_else(bad)?;
    let (w, h): (usize, usize) = (w.trim().parse().map_err(|_| bad())?, h.trim().parse().map_err(|_| bad())?);
    if w == 0 || h == 0 {
        return Err(bad());
    }
    if w > infdit::upscale::MAX_SIDE || h > infdit::upscale::MAX_SIDE {
        bail!("--size '{s}': a side above {} pixels", infdit::upscale::MAX_SIDE);
    }
    Ok((w, h))
}

fn wavefront(a: &WavefrontArgs) -> Result<()> {
    let (w, h) = parse_size(&a.size)?;
    let cfg = match &a.config {
        Some(p) => ModelConfig::from_file(p)?,
        None => ModelConfig::released(),
    };
    let dit = &cfg.dit;
    let params = infdit::Model::parameter_count(&cfg)?;
    let (rows, cols) = (h.div_ceil(dit.block_px), w.div_ceil(dit.block_px));
    if a.devices.is_empty() || a.devices.contains(&0) {
        bail!("--devices: give device counts of at least 1, comma-separated (e.g. 1,2,4,8)");
    }
    if !(a.tflops > 0.0 && a.link_gbps > 0.0 && a.link_latency_us >= 0.0 && a.evaluations >= 1) {
        bail!("--tflops and --link-gbps must be positive, --link-latency-us not negative, --evaluations at least 1");
    }
    let flops = block_flops(dit);
    let (block_s, from) = match a.block_time_ms {
        Some(t) if t > 0.0 && t.is_finite() => (t / 1e3, "given".to_string()),
        Some(t) => bail!("--block-time-ms {t}: must be a positive number"),
        None => (flops / (a.tflops * 1e12), format!("{:.3} TFLOP a block at {} TFLOP/s", flops / 1e12, a.tflops)),
    };
    let kv = kv_bytes_per_block(dit, DType::BF16);
    let assign = match a.assign {
        AssignArg::Strips => Assign::Strips,
        AssignArg::Cyclic => Assign::Cyclic,
    };
    if !a.json {
        println!(
            "{w}x{h} output: {cols}x{rows} blocks of {} px, {} evaluation(s); block time {:.3} ms ({from}); \
             K/V of a block {:.1} MB (bf16, {} layers); link {} Gbit/s, {} us; {:?} columns",
            dit.block_px,
            a.evaluations,
            block_s * 1e3,
            kv as f64 / 1e6,
            dit.depth,
            a.link_gbps,
            a.link_latency_us,
            assign
        );
        println!(
            "{:>7} {:>12} {:>8} {:>6} {:>10} {:>9} {:>14} {:>9}",
            "devices", "makespan_s", "speedup", "eff_%", "moved_GB", "link_%", "mem/dev_GiB", "waiting"
        );
    }
    let mut base = None;
    for &d in &a.devices {
        let setup = WavefrontSetup {
            rows,
            cols,
            devices: d,
            evaluations: a.evaluations,
            block_time_s: block_s,
            kv_bytes_per_block: kv,
            link_bytes_per_s: a.link_gbps * 1e9 / 8.0,
            link_latency_s: a.link_latency_us * 1e-6,
            assign,
        };
        let run = simulate(&setup).map_err(|e| anyhow!("plan wavefront: {e}"))?;
        let one = *base.get_or_insert(if d == 1 { run.makespan_s } else { run.serial_s(block_s) });
        let speedup = one / run.makespan_s;
        let widest = run.devices.iter().map(|s| s.cols).max().unwrap_or(0);
        let waiting = run.devices.iter().map(|s| s.peak_waiting).max().unwrap_or(0);
        let plan = device_plan(dit, params, rows, widest, a.block_batch, DType::BF16, DType::BF16);
        let mem = plan.total() as u64 + waiting as u64 * kv;
        let link = run.devices.iter().map(|s| s.link_busy_s).fold(0.0, f64::max) / run.makespan_s;
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        if a.json {
            println!(
                "{}",
                json!({"size": [w, h], "rows": rows, "cols": cols, "devices": d, "evaluations": a.evaluations,
                       "block_time_ms": block_s * 1e3, "makespan_s": run.makespan_s, "speedup": speedup,
                       "efficiency": speedup / d as f64, "bytes_moved": run.bytes_moved, "link_busy": link,
                       "memory_per_device_bytes": mem, "kv_cache_bytes": plan.kv_cache, "weights_bytes": plan.weights,
                       "peak_waiting_blocks": waiting, "widest_strip_cols": widest})
            );
        } else {
            println!(
                "{d:>7} {:>12.3} {speedup:>8.2} {:>6.1} {:>10.2} {:>9.1} {:>14.2} {waiting:>9}",
                run.makespan_s,
                100.0 * speedup / d as f64,
                run.bytes_moved as f64 / 1e9,
                100.0 * link,
                gib(mem)
            );
        }
    }
    if !a.json {
        println!(
            "speed-up against one device; mem/dev: the scheduler's GPU memory plan for the widest strip (n = {}) \
             plus the received K/V blocks waiting at the peak; a simulation, not a measurement",
            a.block_batch
        );
    }
    Ok(())
}
