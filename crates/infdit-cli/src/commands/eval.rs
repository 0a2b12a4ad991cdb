//! `infdit eval`: degrade HR images by an antialiased bicubic downscale (4x, or `--scale`), upscale
//! them back to the HR size with the model (the library's whole plan: passes, then a resize) and
//! with bicubic, and compare both with the HR image (PSNR-Y, SSIM-Y, seam score); with
//! `--peer NAME=DIR`, other upscalers' outputs of the same LR images too, in one comparison table
//! (with the flat-area deviation and the seconds per image).

use anyhow::{Context, Result, anyhow, bail};

use infdit::eval::{EvalSettings, Peer, collect_hr_inputs, evaluate_image};
use infdit::metrics::{EvalRow, format_comparison, format_table, mean_of};
use infdit::upscale::{Evaluation, UpscaleOptions, Upscaler};

use super::model_spec;
use super::upscale::options::message;
use crate::args::EvalArgs;

/// `--peer NAME=DIR`.
fn parse_peer(arg: &str) -> Result<Peer> {
    let Some((name, dir)) = arg.split_once('=').filter(|(n, d)| !n.is_empty() && !d.is_empty()) else {
        bail!("--peer {arg}: expected NAME=DIR");
    };
    Peer::open(name, dir.as_ref()).map_err(|e| anyhow!(message(&e)))
}

/// Mean of `f` over `rows` (NaN for none).
fn mean(rows: &[EvalRow], f: fn(&EvalRow) -> f64) -> f64 {
    mean_of(rows.iter().map(|r| Some(f(r)))).unwrap_or(f64::NAN)
}

pub(crate) fn eval(a: EvalArgs) -> Result<()> {
    if a.steps == Some(0) {
        bail!("--steps must be at least 1");
    }
    if a.block_batch == Some(0) {
        bail!("--block-batch must be at least 1");
    }
    let settings = EvalSettings { hr_size: a.hr_size, scale: a.scale, out_dir: a.out_dir.clone() };
    settings.validate().map_err(|e| anyhow!(message(&e)))?;
    let peers = a.peer.iter().map(|p| parse_peer(p)).collect::<Result<Vec<_>>>()?;
    let mut methods =
        vec!["bicubic".to_string(), if a.model.model.is_none() { "infdit (built-in)" } else { "model" }.to_string()];
    for p in &peers {
        if methods.iter().any(|m| m == p.name()) {
            bail!("--peer {}: the name is taken (bicubic, the model and each peer need their own)", p.name());
        }
        methods.push(p.name().to_string());
    }
    if let Some(dir) = &a.out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the folder", dir.display()))?;
    }
    let mut inputs = collect_hr_inputs(&a.hr);
    if let Some(k) = a.limit {
        inputs.truncate(k);
    }
    if inputs.is_empty() {
        bail!("no HR images found");
    }
    let dev = super::open_device(a.device)?;
    let spec = model_spec(&a.model)?;
    let act = super::run_dtype(a.dtype, &dev);
    let opts = UpscaleOptions {
        seed: a.seed,
        steps: a.steps,
        sigma_max: a.sigma_max,
        evaluation: Evaluation::Blocks { block_batch: a.block_batch },
        ensemble: a.ensemble,
        ..Default::default()
    };
    opts.validate().map_err(|e| anyhow!(message(&e)))?;
    // What the upscaler will resolve from the model's own settings, for the line below.
    let defaults = spec.sampler_defaults()?;
    let heun = opts.heun(defaults).map_err(|e| anyhow!(message(&e)))?;
    let ensemble = opts.ensemble_for(defaults).map_err(|e| anyhow!(message(&e)))?;
    let up = Upscaler::load(&spec, dev, act)?;
    eprintln!("sampler: {} Heun steps from sigma {}, ensemble of {ensemble}", heun.steps, heun.sigma_max);
    let (mut model_rows, mut bic_rows, mut all) = (Vec::new(), Vec::new(), Vec::new());
    let mut failed = 0usize;
    for input in &inputs {
        let res = input.as_ref().map_err(|e| anyhow::anyhow!("{e}")).and_then(|p| {
            eprintln!("evaluating {}", p.display());
            evaluate_image(&up, p, &settings, &opts, &peers).map_err(|e| {
                // Name the file, unless the error already starts with it.
                let name = p.display().to_string();
                let e = anyhow::Error::from(e);
                if format!("{e:#}").starts_with(&name) { e } else { e.context(name) }
            })
        });
        match res {
            Ok(r) => {
                model_rows.push(r.model);
                bic_rows.push(r.bicubic);
                all.push(r.all);
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                failed += 1;
            }
        }
    }
    println!("## model\n\n{}", format_table(&model_rows));
    println!("## bicubic\n\n{}", format_table(&bic_rows));
    println!(
        "mean_psnr_y model={:.4} bicubic={:.4} mean_ssim_y model={:.4} bicubic={:.4}",
        mean(&model_rows, |r| r.psnr_y),
        mean(&bic_rows, |r| r.psnr_y),
        mean(&model_rows, |r| r.ssim_y),
        mean(&bic_rows, |r| r.ssim_y),
    );
    // Last, so that `sed -n '/^## comparison/,$p'` takes it whole (bench/quality.sh).
    println!("\n## comparison\n\n{}", format_comparison(&methods, &all));
    if failed > 0 {
        bail!("{failed} of {} images failed", inputs.len());
    }
    Ok(())
}
