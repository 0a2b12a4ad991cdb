//! `infdit serve`: the flags to an [`infdit_server::ServerConfig`], then the server.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use infdit::upscale::LoadOptions;
use infdit_server::ServerConfig;

use super::{dtype, model_spec};
use crate::args::ServeArgs;

/// The default data folder: `$XDG_DATA_HOME/infdit/serve`, else `~/.local/share/infdit/serve`,
/// else `infdit-serve` here.
fn default_data_dir() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("XDG_DATA_HOME")
        .or_else(|| env("HOME").map(|h| h.join(".local/share")))
        .map_or_else(|| PathBuf::from("infdit-serve"), |d| d.join("infdit/serve"))
}

/// Runs `infdit serve`.
pub fn serve(a: ServeArgs) -> Result<()> {
    if !(a.keep_hours.is_finite() && a.keep_hours > 0.0) {
        bail!("--keep-hours: give a number of hours above 0");
    }
    let mut cfg = ServerConfig::new(a.data_dir.clone().unwrap_or_else(default_data_dir));
    cfg.bind = a.bind;
    cfg.model = model_spec(&a.model)?;
    cfg.load = LoadOptions { device: a.device, dtype: a.dtype.map(dtype) };
    cfg.workers = a.workers.map(|w| w as usize);
    cfg.token = a.token.clone().or_else(|| std::env::var("INFDIT_TOKEN").ok().filter(|t| !t.is_empty()));
    cfg.max_upload = usize::try_from(a.max_upload).unwrap_or(usize::MAX);
    cfg.max_pixels = a.max_pixels;
    cfg.max_queue = a.max_queue;
    cfg.rate_limit = a.rate_limit;
    cfg.keep_for = Duration::from_secs_f64(a.keep_hours * 3600.0);
    cfg.keep_jobs = a.keep_jobs;
    eprintln!("data folder: {}", cfg.data_dir.display());
    infdit_server::serve(cfg)
}
