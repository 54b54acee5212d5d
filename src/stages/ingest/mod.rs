//! `pipeline run ingest`: downloads and shards the configured sources into
//! `data/<dataset>/<split>/part-NNNNN.parquet` (+ `.stats.json`), resumably.

pub mod cc;
pub mod download;
pub mod hub_table;
pub mod story;
pub mod tsv;
pub mod ultrafeedback;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::hub::HubClient;
use crate::error::{Error, Result};
use crate::pipeline::config::Config;

pub use crate::synthetic::SyntheticConfig;
pub use cc::CcConfig;
pub use story::StoryConfig;
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
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceSummary {
    pub source: String,
    pub splits: Vec<SplitSummary>,
}

/// Rows written into one `data/<dataset>/<split>/`.
#[derive(Debug, Clone, Default, PartialEq)]
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
#[derive(Debug, Clone, Default)]
pub struct IngestOptions {
    /// Re-download only the failed samples of finished CC shards.
    pub retry_failed: bool,
}

/// Runs every configured source in order.
pub fn run(cfg: &Config, workdir: &Path, opts: &IngestOptions) -> Result<Vec<SourceSummary>> {
    let needs_hub = cfg
        .ingest
        .sources
        .iter()
        .any(|s| matches!(s, Source::Ultrafeedback | Source::Storyreasoning));
    let hub = if needs_hub {
        Some(HubClient::new(&cfg.hub)?)
    } else {
        None
    };
    let hub = || {
        hub.as_ref()
            .ok_or_else(|| Error::Config("no hub client".into()))
    };
    let mut out = Vec::new();
    for source in &cfg.ingest.sources {
        let summary = match source {
            Source::Synthetic => {
                crate::synthetic::run(&cfg.ingest.synthetic, cfg.run.seed, workdir)?
            }
            Source::Cc => cc::run(&cfg.ingest.cc, &cfg.run, workdir, opts)?,
            Source::Ultrafeedback => {
                ultrafeedback::run(&cfg.ingest.ultrafeedback, hub()?, workdir)?
            }
            Source::Storyreasoning => {
                story::run(&cfg.ingest.storyreasoning, cfg.run.seed, hub()?, workdir)?
            }
        };
        out.push(summary);
    }
    Ok(out)
}
