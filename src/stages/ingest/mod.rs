//! `pipeline run ingest`: downloads and shards the configured sources into
//! `data/<dataset>/<split>/part-NNNNN.parquet` (+ `.stats.json`), resumably.

pub mod cc;
pub mod download;
pub mod hub_table;
pub mod story;
pub mod synthetic;
pub mod tsv;
pub mod ultrafeedback;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::partition::Sharding;
use crate::data::shard::ShardSet;
use crate::data::store::Root;
use crate::error::{Error, Result};
use crate::stages::{Stage, StageContext};

pub use cc::CcConfig;
pub use story::StoryConfig;
pub use synthetic::SyntheticConfig;
pub use ultrafeedback::UltraFeedbackConfig;

/// A source the ingest stage can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The embedded, deterministic synthetic world (offline default).
    Synthetic,
    /// Conceptual Captions TSV + image downloads.
    Cc,
    /// UltraFeedback preference pairs from the hub.
    Ultrafeedback,
    /// StoryReasoning frames from the hub.
    Storyreasoning,
}

/// `[ingest]`: which sources run, and each source's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub sources: Vec<Source>,
    pub synthetic: SyntheticConfig,
    pub cc: CcConfig,
    pub ultrafeedback: UltraFeedbackConfig,
    pub storyreasoning: StoryConfig,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            sources: vec![Source::Synthetic],
            synthetic: SyntheticConfig::default(),
            cc: CcConfig::default(),
            ultrafeedback: UltraFeedbackConfig::default(),
            storyreasoning: StoryConfig::default(),
        }
    }
}

/// What one source produced, for the run log and tests.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SourceSummary {
    pub source: String,
    pub splits: Vec<SplitSummary>,
}

/// Rows written into one `data/<dataset>/<split>/`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SplitSummary {
    pub dataset: String,
    pub split: String,
    /// Shards written by this run.
    pub shards_written: usize,
    /// Shards that were already finished and were skipped.
    pub shards_skipped: usize,
    /// Rows in the split's finished shards after the run.
    pub rows: u64,
    /// Rows whose status is not success (image sources only).
    pub failed: u64,
}

/// Options of one ingest invocation that are not configuration (CLI flags).
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Re-download only the failed samples of finished CC shards.
    pub retry_failed: bool,
    /// Which shards this worker of a job array owns, and where it records its plan.
    pub sharding: Sharding,
    /// Where the shards go (the workdir, or an object store).
    pub root: Root,
}

/// Where a hub source writes: the workdir, and which of the shards this process owns.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    pub workdir: &'a Path,
    /// Where the shards go: the workdir, or an object store.
    pub root: &'a Root,
    pub sharding: &'a Sharding,
}

impl Destination<'_> {
    /// The shard set `dataset/split` where this destination writes.
    pub fn set(&self, dataset: &str, split: &str) -> ShardSet {
        ShardSet::in_root(self.root, self.workdir, dataset, split)
    }
}

/// What `ingest` wrote: one summary per source, in the order they ran.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct IngestSummary {
    pub sources: Vec<SourceSummary>,
}

impl std::fmt::Display for IngestSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lines: Vec<String> = self
            .sources
            .iter()
            .flat_map(|s| &s.splits)
            .map(|s| {
                format!(
                    "{}/{}: {} rows ({} failed), {} shard(s) written, {} already done",
                    s.dataset, s.split, s.rows, s.failed, s.shards_written, s.shards_skipped
                )
            })
            .collect();
        write!(f, "{}", lines.join("; "))
    }
}

/// `pipeline run ingest`.
pub struct Ingest;

impl Stage for Ingest {
    const NAME: &'static str = "ingest";
    const DESCRIPTION: &'static str =
        "download and shard CC / UltraFeedback / StoryReasoning / synthetic data into Parquet";
    const USES_GPU: bool = false;
    const SECTION: &'static str = "ingest";
    const SHARDED: bool = true;
    const OBJECT_STORE: bool = true;
    type Config = IngestConfig;
    type Summary = IngestSummary;

    /// Runs every configured source in order.
    fn run(cfg: &IngestConfig, ctx: &StageContext) -> Result<IngestSummary> {
        let needs_hub = cfg
            .sources
            .iter()
            .any(|s| matches!(s, Source::Ultrafeedback | Source::Storyreasoning));
        let hub = if needs_hub {
            Some(ctx.hub_client()?)
        } else {
            None
        };
        let hub = || {
            hub.as_ref()
                .ok_or_else(|| Error::Config("no hub client".into()))
        };
        let opts = IngestOptions {
            retry_failed: ctx.retry_failed,
            sharding: ctx.sharding.clone(),
            root: ctx.root.clone(),
        };
        let (workdir, seed) = (ctx.workdir.as_path(), ctx.run.seed);
        let sharding = &ctx.sharding;
        let out = Destination {
            workdir,
            root: &ctx.root,
            sharding,
        };
        let mut summary = IngestSummary::default();
        for source in &cfg.sources {
            summary.sources.push(match source {
                Source::Synthetic => synthetic::run(&cfg.synthetic, seed, out)?,
                Source::Cc => cc::run(&cfg.cc, &ctx.run, workdir, &opts)?,
                Source::Ultrafeedback => ultrafeedback::run(&cfg.ultrafeedback, hub()?, out)?,
                Source::Storyreasoning => story::run(&cfg.storyreasoning, seed, hub()?, out)?,
            });
        }
        Ok(summary)
    }
}
