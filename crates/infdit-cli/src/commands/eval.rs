//! `infdit eval`: degrade HR images by an antialiased bicubic downscale (4x, or `--scale`), upscale
//! them back to the HR size with the model (the library's whole plan: passes, then a resize) and
//! with bicubic, and compare both with the HR image (PSNR-Y, SSIM-Y, seam score); with
//! `--peer NAME=DIR`, other upscalers' outputs of the same LR images too, in one comparison table
//! (with the flat-area deviation and the seconds per image).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::Tensor;

use infdit::imageio::LoadedImage;
use infdit::imageio::resize::{Bicubic, center_crop_offsets, resize_shorter_side, resize_tensor};
use infdit::imageio::{Rounding, crop, load_rgb, rgb8_to_tensor, save_rgb8_atomic, tensor_to_rgb8_with};
use infdit::metrics::{EvalRow, ImageScores, bicubic_resize, format_comparison, format_table, score};
use infdit::train::collect_image_files;
use infdit::upscale::{Evaluation, Target, UpscaleOptions, Upscaler};

use super::model_spec;
use crate::args::EvalArgs;

const CROP_BORDER: usize = 4;
const MAX_PIXELS: u64 = 64 << 20;
/// The files named, with folders expanded recursively to their image files (sorted).
fn collect_inputs(paths: &[PathBuf]) -> Vec<Result<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            match collect_image_files(std::slice::from_ref(p)) {
                Ok(files) => out.extend(files.into_iter().map(Ok)),
                Err(e) => out.push(Err(anyhow::anyhow!("{e}"))),
            }
        } else {
            out.push(Ok(p.clone()));
        }
    }
    out
}

/// The model's upscale of `lr` (1, 3, h, w) in [-1, 1] to `opts.target`, as `infdit upscale`
/// makes it (padded preparation, seeded noise, the exact size).
pub(crate) fn upscale_to(up: &Upscaler, lr: &Tensor, opts: &UpscaleOptions) -> Result<Tensor> {
    let out = up.upscale(&LoadedImage::from_rgb(lr.clone()), opts, &mut |_| {}, None)?;
    Ok(out.rgb)
}

/// Another upscaler's outputs (`--peer NAME=DIR`): `DIR/{stem}.png`, and its seconds per image from
/// `DIR/times.tsv` when that exists.
struct Peer {
    name: String,
    dir: PathBuf,
    seconds: HashMap<String, f64>,
}

impl Peer {
    fn parse(arg: &str) -> Result<Self> {
        let Some((name, dir)) = arg.split_once('=').filter(|(n, d)| !n.is_empty() && !d.is_empty()) else {
            bail!("--peer {arg}: expected NAME=DIR");
        };
        let dir = PathBuf::from(dir);
        if !dir.is_dir() {
            bail!("--peer {arg}: {} is not a folder", dir.display());
        }
        let mut seconds = HashMap::new();
        let times = dir.join("times.tsv");
        if times.exists() {
            let text = std::fs::read_to_string(&times).with_context(|| format!("{}: cannot read", times.display()))?;
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let parsed = line.split_once('\t').and_then(|(stem, v)| Some((stem, v.trim().parse::<f64>().ok()?)));
                let Some((stem, v)) = parsed.filter(|(_, v)| v.is_finite() && *v >= 0.0) else {
                    bail!("{}:{}: expected `stem<TAB>seconds`, got {line:?}", times.display(), i + 1);
                };
                seconds.insert(stem.to_string(), v);
            }
        }
        Ok(Self { name: name.to_string(), dir, seconds })
    }

    /// This peer's output for the HR image with file stem `stem`, checked against the HR size.
    fn output(&self, stem: &str, hr: &image::RgbImage) -> Result<image::RgbImage> {
        let path = self.dir.join(format!("{stem}.png"));
        let img = image::open(&path)
            .with_context(|| format!("peer {}: cannot read {}", self.name, path.display()))?
            .to_rgb8();
        if img.dimensions() != hr.dimensions() {
            bail!(
                "peer {}: {} is {}x{}, the HR image {}x{}",
                self.name,
                path.display(),
                img.width(),
                img.height(),
                hr.width(),
                hr.height()
            );
        }
        Ok(img)
    }
}

/// The rows of one HR image: the model's and the bicubic baseline's (for their own tables), and all
/// methods' scores for the comparison table (bicubic, the model, the peers).
struct ImageResult {
    model: EvalRow,
    bicubic: EvalRow,
    all: ImageScores,
}

/// The model output and the bicubic baseline rows for one HR image, and the peers' scores.
fn eval_one(up: &Upscaler, path: &Path, a: &EvalArgs, opts: &UpscaleOptions, peers: &[Peer]) -> Result<ImageResult> {
    let mut hr = load_rgb(path, MAX_PIXELS)?;
    if let Some(n) = a.hr_size {
        // Shorter side to n (antialiased bicubic), then the centre n x n.
        let (_, _, h, w) = hr.dims4()?;
        let (rh, rw) = resize_shorter_side(h, w, n);
        let r = resize_tensor(&hr, rh, rw, Bicubic::Antialias)?.clamp(-1f32, 1f32)?;
        let (top, left) = center_crop_offsets(rh, rw, n, n);
        hr = crop(&r, top, left, n, n)?;
    }
    let (_, _, h0, w0) = hr.dims4()?;
    let s = a.scale;
    // An integer factor: the HR cropped to a multiple of it, so that the LR is exactly 1/s of it.
    // Any other factor: the LR is the HR's size over s, rounded down, and the model is asked for
    // the HR's exact size (as `--width`/`--height` ask).
    let (h, w) = if s.fract() == 0.0 {
        let k = s as usize;
        (h0 / k * k, w0 / k * k)
    } else {
        (h0, w0)
    };
    let (lh, lw) = ((h as f64 / s).floor() as usize, (w as f64 / s).floor() as usize);
    if lh == 0 || lw == 0 {
        bail!("image of {w0}x{h0} is too small for a downscale by {s}");
    }
    let hr = crop(&hr, 0, 0, h, w)?;
    // Rounded to nearest throughout (an 8-bit HR file maps back to exactly its own samples), as
    // the bicubic baseline rounds.
    let hr8 = tensor_to_rgb8_with(&hr, Rounding::Nearest)?;
    let lr8 = tensor_to_rgb8_with(&resize_tensor(&hr, lh, lw, Bicubic::Antialias)?, Rounding::Nearest)?;
    // Back to [-1, 1] exactly as `load_rgb` maps 8-bit samples. Images stay in host memory (the
    // sampler moves block batches to the model's device).
    let lr = rgb8_to_tensor(&lr8)?;

    let stem = path.file_stem().map_or_else(|| "out".into(), |s| s.to_string_lossy().into_owned());
    // Every peer's output is read before the model runs and anything is written: a missing one fails the image.
    let peer_outputs = peers.iter().map(|p| p.output(&stem, &hr8)).collect::<Result<Vec<_>>>()?;

    let opts =
        UpscaleOptions { target: Target::Size { width: Some(w as u32), height: Some(h as u32) }, ..opts.clone() };
    let start = Instant::now();
    let sr = upscale_to(up, &lr, &opts)?;
    let model_seconds = start.elapsed().as_secs_f64();
    let sr8 = tensor_to_rgb8_with(&sr, Rounding::Nearest)?;
    if sr8.dimensions() != hr8.dimensions() {
        bail!("model output is {:?}, the HR image {:?}", sr8.dimensions(), hr8.dimensions());
    }
    let bic8 = bicubic_resize(&lr8, w, h);

    let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
    if let Some(dir) = &a.out_dir {
        save_rgb8_atomic(&sr8, &dir.join(format!("{stem}.png")), &[path])?;
        // The inputs and the baseline beside it, for viewing side by side.
        save_rgb8_atomic(&lr8, &dir.join(format!("{stem}_lr.png")), &[path])?;
        save_rgb8_atomic(&bic8, &dir.join(format!("{stem}_bicubic.png")), &[path])?;
        save_rgb8_atomic(&hr8, &dir.join(format!("{stem}_hr.png")), &[path])?;
    }
    // Seams are measured at the model's own block borders (128 px for the released model).
    let block = up.model().cfg.dit.block_px;
    let bic_score = score(&bic8, &hr8, CROP_BORDER, block, None)?;
    let model_score = score(&sr8, &hr8, CROP_BORDER, block, Some(model_seconds))?;
    let (model_row, bic_row) = (model_score.eval_row(name.clone()), bic_score.eval_row(name.clone()));
    let mut scores = vec![bic_score, model_score];
    for (p, out) in peers.iter().zip(&peer_outputs) {
        scores.push(score(out, &hr8, CROP_BORDER, block, p.seconds.get(&stem).copied())?);
    }
    Ok(ImageResult { model: model_row, bicubic: bic_row, all: ImageScores { name, scores } })
}

fn mean(rows: &[EvalRow], f: impl Fn(&EvalRow) -> f64) -> f64 {
    if rows.is_empty() { f64::NAN } else { rows.iter().map(f).sum::<f64>() / rows.len() as f64 }
}

pub(crate) fn eval(a: EvalArgs) -> Result<()> {
    if a.steps == Some(0) || a.hr_size == Some(0) {
        bail!("--steps and --hr-size must be at least 1");
    }
    if !(a.scale.is_finite() && a.scale >= 1.0) {
        bail!("--scale {} must be a number of at least 1", a.scale);
    }
    if a.block_batch == 0 {
        bail!("--block-batch must be at least 1");
    }
    let peers = a.peer.iter().map(|p| Peer::parse(p)).collect::<Result<Vec<_>>>()?;
    let mut methods =
        vec!["bicubic".to_string(), if a.model.model.is_none() { "infdit (built-in)" } else { "model" }.to_string()];
    for p in &peers {
        if methods.contains(&p.name) {
            bail!("--peer {}: the name is taken (bicubic, the model and each peer need their own)", p.name);
        }
        methods.push(p.name.clone());
    }
    if let Some(dir) = &a.out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the folder", dir.display()))?;
    }
    let mut inputs = collect_inputs(&a.hr);
    if let Some(k) = a.limit {
        inputs.truncate(k);
    }
    if inputs.is_empty() {
        bail!("no HR images found");
    }
    let dev = super::open_device(a.device)?;
    let spec = model_spec(&a.model)?;
    let heun = super::heun_config(&spec, a.steps, a.sigma_max)?;
    let act = super::run_dtype(a.dtype, &dev);
    let up = Upscaler::load(&spec, dev, act)?;
    let opts = UpscaleOptions {
        seed: a.seed,
        steps: Some(heun.steps),
        sigma_max: Some(heun.sigma_max),
        evaluation: Evaluation::Blocks { block_batch: Some(a.block_batch) },
        ..Default::default()
    };
    eprintln!("sampler: {} Heun steps from sigma {}", heun.steps, heun.sigma_max);
    let (mut model_rows, mut bic_rows, mut all) = (Vec::new(), Vec::new(), Vec::new());
    let mut failed = 0usize;
    for input in &inputs {
        let res = input.as_ref().map_err(|e| anyhow::anyhow!("{e:#}")).and_then(|p| {
            eprintln!("evaluating {}", p.display());
            eval_one(&up, p, &a, &opts, &peers).map_err(|e| {
                // Name the file, unless the error already starts with it.
                let name = p.display().to_string();
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
