//! Configuration loading, plan validation and the runner: what turns `pipeline run TARGET`
//! into stages run in order. Only the CLI (and tools that drive prefcap as a library) use it.

pub mod config;
pub mod plan;
pub mod runner;
pub mod workers;

use std::path::Path;

use crate::error::Result;
use crate::stages::context::new_run_id;
use crate::stages::Stage;

pub use config::Config;

/// Runs stage `S` alone under `workdir` with `cfg`, outside any plan (for tests and tools
/// that drive prefcap as a library), as a run of its own (`runs/<name>-<start>-<pid>/`).
pub fn run_stage<S: Stage>(cfg: &Config, workdir: &Path) -> Result<S::Summary> {
    let ctx = cfg.context(workdir, &new_run_id(S::NAME));
    S::run(&cfg.stage::<S>()?, &ctx)
}
