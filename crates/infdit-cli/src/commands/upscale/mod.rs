//! `infdit upscale`: one image file in, one out, with any size, alpha, 16-bit and metadata kept.

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};

use infdit::diffusion::HeunConfig;
use infdit::diffusion::noise::image_noise;
use infdit::imageio::resize::{Bicubic, resize_tensor};
use infdit::imageio::{LoadLimits, SaveOptions, crop, fill_transparent, load_image, save_image_atomic};
use infdit::pipeline::{Mode, Model, OutputCrop, PassScale, SampleOptions, prepare_official, prepare_padded, sample};
use infdit::schedule::MemoryPlan;

use super::{dtype, load_model};
use crate::args::{CropArg, DTypeArg, ModeArg, ResizeArg, ScaleArg, UpscaleArgs};

fn load_noise(path: &Path, h: usize, w: usize) -> Result<Tensor> {
    let mut t = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("{}: cannot read the noise file", path.display()))?;
    let eps = t.remove("eps").with_context(|| format!("{}: no tensor named 'eps'", path.display()))?;
    if eps.dims() != [1, 3, h, w] {
        bail!("{}: eps has shape {:?}, the output needs (1, 3, {h}, {w})", path.display(), eps.dims());
    }
    Ok(eps.to_dtype(DType::F32)?)
}

/// Half of the memory available now (Linux /proc/meminfo), at most 8 GiB; 4 GiB when unknown.
fn default_memory_budget() -> u64 {
    let avail = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    avail.map_or(4 << 30, |b| (b / 2).min(8 << 30))
}

/// Whether the output format (by extension) stores 16-bit samples.
fn holds_16_bits(out: &Path) -> bool {
    let ext = out.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    matches!(ext.as_str(), "png" | "tif" | "tiff")
}

pub(crate) fn upscale(a: UpscaleArgs) -> Result<()> {
    let dev = Device::Cpu;
    let kind = match a.resize {
        ResizeArg::Antialias => Bicubic::Antialias,
        ResizeArg::Classic => Bicubic::Classic,
    };
    let scale = match a.scale {
        ScaleArg::X4 => PassScale::X4,
        ScaleArg::X2 => PassScale::X2,
    };
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if let (Ok(i), Ok(o)) = (a.input.canonicalize(), a.output.canonicalize())
        && i == o
    {
        bail!("{}: the output path is the input image; refusing to overwrite it", a.output.display());
    }
    if a.dtype != DTypeArg::F32 && dev.is_cpu() && !a.quiet {
        eprintln!(
            "note: on the CPU, --dtype {:?} is several times slower than f32 in this version (candle converts \
             half-precision operands); use it to save memory, not time",
            a.dtype
        );
    }
    let loaded = load_image(&a.input, &LoadLimits::for_pixels(a.max_pixels))?;
    // Colour under fully transparent pixels is arbitrary; fill it from the visible neighbours so
    // it does not bleed into the upscaled edges.
    let rgb = match &loaded.alpha {
        Some(al) => fill_transparent(&loaded.rgb, al)?,
        None => loaded.rgb.clone(),
    };
    let model = load_model(&a.model, dtype(a.dtype), &dev)?;
    let bp = model.cfg.dit.block_px;
    let (prep, out_crop, clip_input) = match a.crop {
        CropArg::Pad => prepare_padded(&rgb, scale, bp, kind).with_context(|| a.input.display().to_string())?,
        CropArg::Official => {
            let p = prepare_official(&rgb, scale, bp, kind).with_context(|| a.input.display().to_string())?;
            let c = OutputCrop { top: 0, left: 0, height: p.grid.height(), width: p.grid.width() };
            let clip_input = p.lr.clone();
            (p, c, clip_input)
        }
    };
    let (h, w) = (prep.grid.height(), prep.grid.width());
    let eps = match &a.noise {
        Some(p) => load_noise(p, h, w)?,
        None => image_noise(a.seed, &prep.grid, 3, &dev)?,
    };
    let clip = model.clip_vector(&clip_input, kind)?;
    let heun = HeunConfig { steps: a.steps, ..HeunConfig::default() };
    let act = dtype(a.dtype);
    let kv_dtype = a.kv_dtype.map(dtype).unwrap_or(act);
    let params = Model::parameter_count(&model.cfg)?;
    let budget = a.max_memory.unwrap_or_else(default_memory_budget) as usize;
    let mode = match a.mode {
        ModeArg::Whole => Mode::WholeImage,
        ModeArg::Blocks => {
            let n = match a.block_batch {
                Some(0) => bail!("--block-batch must be at least 1"),
                Some(n) => n,
                None => MemoryPlan::largest_batch(&model.cfg.dit, params, &prep.grid, act, kv_dtype, budget)
                    .with_context(|| {
                        let one = MemoryPlan::estimate(&model.cfg.dit, params, &prep.grid, Some(1), act, kv_dtype);
                        format!("even --block-batch 1 needs about {one}, above the memory budget of {budget} bytes")
                    })?,
            };
            Mode::Blocks { block_batch: n, kv_dtype }
        }
    };
    if a.verbose {
        let batch = match mode {
            Mode::Blocks { block_batch, .. } => Some(block_batch),
            Mode::WholeImage => None,
        };
        let plan = MemoryPlan::estimate(&model.cfg.dit, params, &prep.grid, batch, act, kv_dtype);
        eprintln!(
            "{} -> {}x{} (model output {w}x{h}: {} x {} blocks), mode {mode:?}, budget {:.1} MiB",
            a.input.display(),
            out_crop.width,
            out_crop.height,
            prep.grid.rows,
            prep.grid.cols,
            budget as f64 / (1u64 << 20) as f64
        );
        eprintln!("memory plan: {plan}");
    }
    let started = std::time::Instant::now();
    let emit = |v: serde_json::Value| {
        if a.json {
            println!("{v}");
        }
    };
    emit(serde_json::json!({
        "event": "start",
        "input": a.input.display().to_string(),
        "output": a.output.display().to_string(),
        "width": out_crop.width,
        "height": out_crop.height,
        "blocks": prep.grid.len(),
        "steps": heun.steps,
        "evaluations": heun.evaluations(),
    }));
    let bar = if a.quiet || a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new((heun.evaluations() * prep.grid.len()) as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {msg} {elapsed} elapsed, ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{} -> {}x{}", a.input.display(), out_crop.width, out_crop.height));
    let opts = SampleOptions { heun, mode, checkpoint_dir: a.checkpoint_dir.clone(), stop_after_steps: None };
    let blocks_total = prep.grid.len();
    let out = sample(&model, &prep, &clip, &eps, &opts, &mut |p| {
        let done_blocks = p.evals_done * blocks_total + p.blocks_done;
        emit(serde_json::json!({
            "event": "progress",
            "steps_done": p.steps_done,
            "steps_total": p.steps_total,
            "evals_done": p.evals_done,
            "evals_total": p.evals_total,
            "blocks_done": p.blocks_done,
            "blocks_total": p.blocks_total,
            "elapsed_s": started.elapsed().as_secs_f64(),
        }));
        bar.set_position(done_blocks as u64);
        bar.set_message(format!(
            "step {}/{}, evaluation {}/{}, block {}/{}",
            (p.steps_done + 1).min(p.steps_total),
            p.steps_total,
            (p.evals_done + 1).min(p.evals_total),
            p.evals_total,
            p.blocks_done,
            p.blocks_total
        ));
    })?;
    bar.finish();
    if a.verbose && out.resumed_from > 0 {
        eprintln!("resumed from step {}", out.resumed_from);
    }
    let sample = out.sample.context("sampling stopped before the last step")?;
    let sample = crop(&sample, out_crop.top, out_crop.left, out_crop.height, out_crop.width)?;
    // The alpha plane is upscaled on its own (antialiased bicubic), clamped to [0, 1].
    let alpha = match &loaded.alpha {
        Some(al) => Some(resize_tensor(al, out_crop.height, out_crop.width, kind)?.clamp(0f32, 1f32)?),
        None => None,
    };
    let mut save = if a.strip_metadata { SaveOptions::default() } else { SaveOptions::like_input(&loaded) };
    save.strip_metadata = a.strip_metadata;
    save.jpeg_quality = a.jpeg_quality;
    if !holds_16_bits(&a.output) {
        save.bit_depth = 8;
    }
    save_image_atomic(&a.output, &sample, alpha.as_ref(), loaded.grayscale, &save, &[a.input.as_path()])?;
    emit(serde_json::json!({
        "event": "done",
        "output": a.output.display().to_string(),
        "elapsed_s": started.elapsed().as_secs_f64(),
    }));
    if !a.quiet && !a.json {
        eprintln!("wrote {} ({}x{})", a.output.display(), out_crop.width, out_crop.height);
    }
    Ok(())
}
