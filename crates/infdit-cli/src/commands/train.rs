//! `infdit train`: EDM training of a model on image folders, with checkpoints, exact resume, a loss
//! log and periodic sample images.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use candle_core::Tensor;
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};

use infdit::config::{PassChain, SamplerDefaults};
use infdit::diffusion::HeunConfig;
use infdit::imageio::resize::{Bicubic, resize_tensor};
use infdit::imageio::{LoadLimits, Rounding, load_image, rgb8_to_tensor, save_rgb8_atomic, tensor_to_rgb8_with};
use infdit::loaded::Model;
use infdit::loaded::random::training_init;
use infdit::model::grad::MatmulPrecision;
use infdit::train::trainer::write_atomic;
use infdit::train::{Dataset, SampleConfig, TrainConfig, Trainer};
use infdit::upscale::{Evaluation, UpscaleOptions, Upscaler};
use infdit::weights::Checkpoint;
use infdit::{ModelConfig, metrics};

use crate::args::{MatmulArg, TrainArgs};

/// The HR crop, `(1, 3, s, s)` in `[-1, 1]`, that the periodic samples upscale: the centre of
/// `path`, or of the first training image.
fn sample_target(path: &Path, crop: usize) -> Result<Tensor> {
    let img = load_image(path, &LoadLimits::default())?.rgb;
    let (_, _, h, w) = img.dims4()?;
    let s = crop.min(h).min(w) / 16 * 16;
    if s == 0 {
        bail!("{}: too small for a sample image", path.display());
    }
    Ok(img.narrow(2, (h - s) / 2, s)?.narrow(3, (w - s) / 2, s)?)
}

/// `[bicubic | model | reference]` of an HR crop downscaled 4x, with the metrics of the two
/// upscales (as a one-line summary).
pub(crate) fn side_by_side(model: &Model, hr: &Tensor, heun: HeunConfig, seed: u64) -> Result<(RgbImage, String)> {
    let (_, _, h, w) = hr.dims4()?;
    let lr8 = tensor_to_rgb8_with(&resize_tensor(hr, h / 4, w / 4, Bicubic::Antialias)?, Rounding::Nearest)?;
    let lr = rgb8_to_tensor(&lr8)?;
    let up = Upscaler::from_model(model.clone(), "training snapshot", None);
    let opts = UpscaleOptions {
        seed,
        steps: Some(heun.steps),
        sigma_max: Some(heun.sigma_max),
        evaluation: Evaluation::WholeImage,
        ..Default::default()
    };
    let out = up.upscale(&infdit::imageio::LoadedImage::from_rgb(lr.clone()), &opts, &mut |_| {}, None)?.rgb;
    let got = tensor_to_rgb8_with(&out, Rounding::Nearest)?;
    let bic = metrics::bicubic_baseline(&lr8, 4);
    let reference = tensor_to_rgb8_with(hr, Rounding::Nearest)?;
    let (ow, oh) = got.dimensions();
    let mut canvas = RgbImage::new(3 * ow, oh);
    for (i, im) in [&bic, &got, &reference].into_iter().enumerate() {
        image::imageops::replace(&mut canvas, im, (i as u32 * ow) as i64, 0);
    }
    let m = |im: &RgbImage| -> Result<(f64, f64)> {
        Ok((metrics::psnr_y(im, &reference, 4)?, metrics::ssim_y(im, &reference, 4)?))
    };
    let ((bp, bs), (mp, ms)) = (m(&bic)?, m(&got)?);
    Ok((canvas, format!("bicubic {bp:.2} dB / {bs:.4}, model {mp:.2} dB / {ms:.4} (PSNR-Y / SSIM-Y)")))
}

/// Drops the lines of steps after `step` from the loss log (an interrupted run logged them after
/// its last saved state; the resumed run logs them again).
fn truncate_log(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| l.split(',').next().and_then(|s| s.parse::<usize>().ok()).is_none_or(|s| s <= step))
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes())?;
    Ok(())
}

fn model_json(cfg: &ModelConfig, sampler: SamplerDefaults) -> Result<String> {
    let mut v: serde_json::Value = serde_json::from_str(&cfg.to_json())?;
    v["sampler"] = serde_json::to_value(sampler)?;
    Ok(serde_json::to_string_pretty(&v)? + "\n")
}

pub(crate) fn train(a: TrainArgs) -> Result<()> {
    let cfg = ModelConfig::from_file(&a.config)?;
    if a.checkpoint_every == 0 || a.sample_steps == 0 {
        bail!("--checkpoint-every and --sample-steps must be at least 1");
    }
    let tc = TrainConfig {
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        warmup: a.warmup,
        weight_decay: a.weight_decay,
        grad_clip: a.grad_clip,
        ema_decay: a.ema_decay,
        p_mean: a.p_mean,
        p_std: a.p_std,
        seed: a.seed,
        matmul: match a.matmul {
            MatmulArg::Bf16 => MatmulPrecision::Bf16,
            MatmulArg::F32 => MatmulPrecision::F32,
        },
        ..TrainConfig::default()
    };
    let sc = SampleConfig {
        crop: a.crop,
        scale: cfg.dit.sr_scale,
        degrade_prob: a.degrade_prob,
        lr_dropout: a.lr_dropout,
        soften_prob: a.soften_prob,
        ..SampleConfig::default()
    };
    // Every setting is checked before the weights and the images are read.
    let flagged = |e: infdit::InfditError| anyhow!(super::upscale::flag_message(&e));
    tc.validate().map_err(flagged)?;
    sc.validate(cfg.dit.block_px).map_err(flagged)?;
    let init = match &a.init {
        Some(p) => {
            let mut ck = Checkpoint::open(p)?;
            if let (Some(c), Some(clip)) = (&cfg.clip, &a.clip) {
                ck.add_clip_from(&Checkpoint::open(clip)?, c.layers)?;
            }
            ck
        }
        None if cfg.clip.is_some() => {
            bail!("{}: the config has a CLIP tower; give its weights with --init (and --clip)", a.config.display())
        }
        None => training_init(&cfg, a.seed)?,
    };
    let dev = super::open_device(a.device)?;
    let mut trainer = Trainer::new_on(&cfg, &init, tc, &dev.device)?;
    let say = |s: String| {
        if !a.quiet {
            eprintln!("{s}");
        }
    };
    if dev.is_gpu() {
        say(format!("training on {}", dev.describe()));
    }
    let t0 = Instant::now();
    let data = Dataset::load(&a.data, a.crop, a.max_side)?;
    say(format!(
        "{} training images ({} skipped) loaded in {:.1} s; {} trainable values",
        data.len(),
        data.skipped.len(),
        t0.elapsed().as_secs_f64(),
        trainer.trainable_values()
    ));
    for (p, why) in &data.skipped {
        say(format!("  skipped {}: {why}", p.display()));
    }
    std::fs::create_dir_all(a.out.join("samples")).with_context(|| format!("{}: cannot create", a.out.display()))?;
    if trainer.load_state(&a.out, &sc)? {
        say(format!("resuming from step {} in {}", trainer.step(), a.out.display()));
        truncate_log(&a.out.join("loss.csv"), trainer.step())?;
    }
    let sample_path = match &a.sample_image {
        Some(p) => p.clone(),
        None => data.paths().next().expect("the dataset is not empty").to_path_buf(),
    };
    let target = sample_target(&sample_path, 2 * a.crop)?;
    // Trained at 4x only: plans of this model leave its 2x mode out.
    let sampler = SamplerDefaults {
        steps: a.sample_steps,
        sigma_max: a.sample_sigma_max,
        x2_mode: false,
        chain: PassChain::Within,
        ensemble: None,
    };
    let heun = HeunConfig { steps: a.sample_steps, sigma_max: a.sample_sigma_max, ..HeunConfig::default() };
    write_atomic(&a.out.join("config.json"), model_json(&cfg, sampler)?.as_bytes())?;

    let log_path = a.out.join("loss.csv");
    let new_log = !log_path.exists();
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("{}: cannot open", log_path.display()))?;
    if new_log {
        writeln!(log, "step,loss,grad_norm,lr,sigma,seconds")?;
    }
    let bar = if a.quiet { ProgressBar::hidden() } else { ProgressBar::new(a.steps as u64) };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {elapsed_precise} ETA {eta_precise}  {msg}")
            .expect("valid template"),
    );
    bar.set_position(trainer.step() as u64);
    bar.reset_eta();
    let (mut ema_loss, started) = (None::<f64>, Instant::now());
    while trainer.step() < a.steps {
        let st = trainer.train_step(&data, &sc)?;
        let el = ema_loss.map_or(st.loss, |e| 0.98 * e + 0.02 * st.loss);
        ema_loss = Some(el);
        writeln!(
            log,
            "{},{:.6},{:.6},{:.3e},{:.4},{:.2}",
            st.step,
            st.loss,
            st.grad_norm,
            st.lr,
            st.sigma,
            started.elapsed().as_secs_f64()
        )?;
        bar.set_position(st.step as u64);
        bar.set_message(format!("loss {el:.4} |g| {:.3}", st.grad_norm));
        if st.step % a.checkpoint_every == 0 || st.step == a.steps {
            log.flush()?;
            trainer.save_state(&a.out, &sc)?;
            trainer.save_weights(&a.out.join("model.safetensors"), true)?;
            let (img, line) = side_by_side(&trainer.model(true)?, &target, heun, a.seed)?;
            let png = a.out.join("samples").join(format!("step_{:06}.png", st.step));
            save_rgb8_atomic(&img, &png, &[])?;
            if !a.quiet {
                // suspend, not println: println prints nothing when stderr is not a terminal.
                bar.suspend(|| eprintln!("step {}: {line}; wrote {}", st.step, png.display()));
            }
        }
    }
    bar.finish();
    say(format!(
        "done: {} steps; weights in {} (config {})",
        trainer.step(),
        a.out.join("model.safetensors").display(),
        a.out.join("config.json").display()
    ));
    Ok(())
}
