//! StoryReasoning: story parquet from the hub, split into one row per frame with the
//! frame's caption (grounding tags stripped), with a story-level train/val split
//! stratified by frame count.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::hub::HubClient;
use crate::ingest::SourceSummary;

/// `[ingest.storyreasoning]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoryConfig {
    pub repo: String,
    pub revision: String,
    /// Hub splits to read, each from `data/<split>-*.parquet`. `train` is re-split into
    /// `train`/`val` by story; other splits are written under their own name.
    pub splits: Vec<String>,
    /// Fraction of the hub's train stories held out as `val`.
    pub val_fraction: f64,
    /// Context frames of the next-frame task; stories need at least `context_frames + 1` frames.
    pub context_frames: usize,
    pub shard_size: usize,
}

impl Default for StoryConfig {
    fn default() -> Self {
        Self {
            repo: "daniel3303/StoryReasoning".into(),
            revision: "main".into(),
            splits: vec!["train".into(), "test".into()],
            val_fraction: 0.1,
            context_frames: 4,
            shard_size: 2000,
        }
    }
}

pub fn run(
    _cfg: &StoryConfig,
    _seed: u64,
    _hub: &HubClient,
    _workdir: &Path,
) -> Result<SourceSummary> {
    Err(Error::Stage {
        stage: "ingest".into(),
        message: "the storyreasoning source is not built yet".into(),
    })
}
