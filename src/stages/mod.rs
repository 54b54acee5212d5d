//! The pipeline's stages and their registry.
//!
//! A stage is one file (or folder) here implementing [`Stage`]: its own typed section of the
//! configuration and the [`StageContext`] in, a typed summary out. A stage never imports
//! another stage and never sees the whole configuration; stages exchange files, which the
//! context finds. Adding a stage is one file, one line in [`STAGES`] and one section in
//! `configs/default.toml`; `pipeline list`, plan validation and the runner read the registry.

pub mod context;
pub mod embed;
pub mod generate;
pub mod ingest;
pub mod online;
pub mod preference;
pub mod pretrain_clip;
pub mod report;
pub mod sample_pairs;
pub mod score;
pub mod train_contrastive;
pub mod train_diffusion;
pub mod train_sft;
pub mod train_story;

use std::fmt::Display;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

pub use context::StageContext;

/// One stage of the pipeline.
pub trait Stage {
    /// The name plans and the CLI use (`train-sft`).
    const NAME: &'static str;
    const DESCRIPTION: &'static str;
    /// Whether it runs models that `--gpu` places on a GPU.
    const USES_GPU: bool;
    /// Its section of the configuration (`train_sft`).
    const SECTION: &'static str;
    /// Whether it still runs, on what the earlier steps finished, when a step before it in
    /// the plan failed (the report).
    const RUNS_AFTER_FAILURE: bool = false;
    /// Whether its work is split into shards that the workers of a job array share
    /// (`--num-workers`, [`StageContext::sharding`]): it does only the shards its worker owns
    /// and records its plan in the job's ledger.
    const SHARDED: bool = false;
    /// Whether it runs on an object-store workdir ([`StageContext::root`]).
    const OBJECT_STORE: bool = false;
    /// The section, strictly typed (`deny_unknown_fields`); its defaults equal
    /// `configs/default.toml`.
    type Config: Serialize + DeserializeOwned + Default;
    /// What the run log prints and `run.json` records.
    type Summary: Serialize + Display;
    fn run(cfg: &Self::Config, ctx: &StageContext) -> Result<Self::Summary>;
}

/// What a finished stage reports: its summary as text (the run log) and as JSON (`run.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub text: String,
    pub details: serde_json::Value,
}

/// A stage as the pipeline sees it, its types erased.
pub struct Registered {
    pub name: &'static str,
    pub description: &'static str,
    pub uses_gpu: bool,
    pub section: &'static str,
    pub runs_after_failure: bool,
    pub sharded: bool,
    pub object_store: bool,
    /// Parses the stage's section (absent: the defaults) strictly and returns it with every
    /// default filled in, as the run directory's `config.toml` records it.
    pub resolve: fn(Option<&toml::Value>) -> Result<toml::Value>,
    /// Parses the section and runs the stage.
    pub run: fn(Option<&toml::Value>, &StageContext) -> Result<Outcome>,
}

/// Every stage, in pipeline order: adding a stage is one line here.
pub const STAGES: &[Registered] = &[
    register::<ingest::Ingest>(),
    register::<pretrain_clip::PretrainClip>(),
    register::<embed::Embed>(),
    register::<train_contrastive::TrainContrastive>(),
    register::<train_sft::TrainSft>(),
    register::<train_diffusion::TrainDiffusion>(),
    register::<train_story::TrainStory>(),
    register::<sample_pairs::SamplePairs>(),
    register::<preference::TrainDpo>(),
    register::<preference::TrainOrpo>(),
    register::<preference::reward::TrainReward>(),
    register::<online::dico::TrainDico>(),
    register::<online::scst::TrainScst>(),
    register::<online::rlhf::TrainRlhf>(),
    register::<online::refine_diffusion::RefineDiffusion>(),
    register::<generate::Generate>(),
    register::<score::Score>(),
    register::<report::Report>(),
];

/// The registered stage `name`.
pub fn stage(name: &str) -> Option<&'static Registered> {
    STAGES.iter().find(|s| s.name == name)
}

const fn register<S: Stage>() -> Registered {
    Registered {
        name: S::NAME,
        description: S::DESCRIPTION,
        uses_gpu: S::USES_GPU,
        section: S::SECTION,
        runs_after_failure: S::RUNS_AFTER_FAILURE,
        sharded: S::SHARDED,
        object_store: S::OBJECT_STORE,
        resolve: resolve::<S>,
        run: run::<S>,
    }
}

/// `S`'s section parsed strictly; an error names the section and the key
/// (`at train_sft.lr: invalid type ...`).
pub fn parse<S: Stage>(section: Option<&toml::Value>) -> Result<S::Config> {
    parse_section(S::SECTION, section)
}

/// Section `name` parsed as `T` (absent: `T::default()`); an error names the full key.
pub fn parse_section<T: DeserializeOwned + Default>(
    name: &str,
    section: Option<&toml::Value>,
) -> Result<T> {
    let Some(value) = section else {
        return Ok(T::default());
    };
    serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            name.to_string()
        } else {
            format!("{name}.{path}")
        };
        Error::Config(format!("at `{at}`: {}", e.into_inner()))
    })
}

fn resolve<S: Stage>(section: Option<&toml::Value>) -> Result<toml::Value> {
    toml::Value::try_from(parse::<S>(section)?)
        .map_err(|e| Error::Config(format!("cannot serialise [{}]: {e}", S::SECTION)))
}

fn run<S: Stage>(section: Option<&toml::Value>, ctx: &StageContext) -> Result<Outcome> {
    let summary = S::run(&parse::<S>(section)?, ctx)?;
    Ok(Outcome {
        text: summary.to_string(),
        details: serde_json::to_value(&summary).unwrap_or(serde_json::Value::Null),
    })
}
