//! The resolved configuration: `configs/default.toml` (or `--config FILE`), then a pipeline's
//! `[config]` table, then `--set section.key=value` overrides, deserialised strictly so a
//! misspelt key is an error that names it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::models::captioner::CaptionerConfig;
use crate::stages::embed::EmbedConfig;
use crate::stages::generate::GenerateConfig;
use crate::stages::ingest::IngestConfig;
use crate::stages::preference::PreferenceConfig;
use crate::stages::sample_pairs::SamplePairsConfig;
use crate::stages::score::ScoreConfig;
use crate::train::TrainConfig;

/// The copy of `configs/default.toml` built into the binary, used when the file is absent
/// (running `pipeline` outside a checkout).
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../configs/default.toml");

/// Everything a run can be configured with. Field defaults equal `configs/default.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub run: RunConfig,
    #[serde(default)]
    pub hub: HubConfig,
    #[serde(default)]
    pub ingest: IngestConfig,
    #[serde(default)]
    pub embed: EmbedConfig,
    #[serde(default)]
    pub captioner: CaptionerConfig,
    #[serde(default)]
    pub train_sft: TrainConfig,
    #[serde(default)]
    pub sample_pairs: SamplePairsConfig,
    #[serde(default)]
    pub preference: PreferenceConfig,
    #[serde(default)]
    pub train_dpo: TrainConfig,
    #[serde(default)]
    pub train_orpo: TrainConfig,
    #[serde(default)]
    pub generate: GenerateConfig,
    #[serde(default)]
    pub score: ScoreConfig,
}

/// Settings shared by all stages.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Seed of every seeded choice (synthetic data, binarization, splits).
    pub seed: u64,
    /// Capacity of the bounded channels between pipeline threads.
    pub channel_capacity: usize,
    /// CPU worker threads for decode/resize work; 0 = all cores.
    pub workers: usize,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            channel_capacity: 256,
            workers: 0,
        }
    }
}

impl RunConfig {
    pub fn worker_threads(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(2, usize::from)
        }
    }
}

/// Where Hugging Face hub downloads come from and are cached.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Hub URL; empty = `HF_ENDPOINT`, else https://huggingface.co.
    pub endpoint: String,
    /// Download cache; empty = `HF_HUB_CACHE`/`HF_HOME`, else ~/.cache/huggingface/hub.
    pub cache_dir: String,
}

impl Config {
    /// Loads `path` (or the built-in default when `path` is the default and does not exist),
    /// merges `pipeline_overrides` and then `sets` (`a.b.c=value`), and validates every key.
    pub fn load(
        path: Option<&Path>,
        pipeline_overrides: Option<&toml::Table>,
        sets: &[String],
    ) -> Result<Self> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).at(p)?,
            None => DEFAULT_CONFIG_TOML.to_string(),
        };
        let origin = path.map_or("built-in configs/default.toml".to_string(), |p| {
            p.display().to_string()
        });
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        if let Some(over) = pipeline_overrides {
            merge(&mut table, over);
        }
        for set in sets {
            apply_set(&mut table, set)?;
        }
        Self::from_table(table, &origin)
    }

    fn from_table(table: toml::Table, origin: &str) -> Result<Self> {
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let path = e.path().to_string();
            Error::Config(format!("{origin}: at `{path}`: {}", e.into_inner()))
        })
    }

    /// The configuration as TOML, as saved into each run directory.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self)
            .map_err(|e| Error::Config(format!("cannot serialise config: {e}")))
    }
}

/// Recursively overlays `over` onto `base`: tables merge, other values replace.
pub fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Applies one `a.b.c=value` override. The value is parsed as a TOML value
/// (`3`, `true`, `["x"]`, `"s"`), falling back to a plain string.
pub fn apply_set(table: &mut toml::Table, set: &str) -> Result<()> {
    let (key, raw) = set
        .split_once('=')
        .ok_or_else(|| Error::Config(format!("--set `{set}`: expected section.key=value")))?;
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(Error::Config(format!("--set `{set}`: empty key segment")));
    }
    let value = parse_value(raw.trim());
    let mut cur = table;
    for part in &parts[..parts.len() - 1] {
        let entry = cur
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(Error::Config(format!(
                    "--set `{set}`: `{part}` is not a section"
                )))
            }
        };
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

fn parse_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_default_parses_and_equals_struct_defaults() {
        let cfg = Config::load(None, None, &[]).unwrap();
        let defaults: Config = Config::from_table(toml::Table::new(), "empty").unwrap();
        assert_eq!(cfg.to_toml().unwrap(), defaults.to_toml().unwrap());
    }

    #[test]
    fn set_overrides_nested_keys_with_typed_values() {
        let cfg = Config::load(
            None,
            None,
            &["run.seed=7".into(), "ingest.cc.shard_size=10".into()],
        )
        .unwrap();
        assert_eq!(cfg.run.seed, 7);
        assert_eq!(cfg.ingest.cc.shard_size, 10);
    }

    #[test]
    fn unknown_key_is_rejected_with_its_full_path() {
        let err = Config::load(None, None, &["ingest.cc.shard_sze=10".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ingest.cc") && err.contains("shard_sze"),
            "{err}"
        );
        let err = Config::load(None, None, &["nosuch.key=1".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("nosuch"), "{err}");
    }

    #[test]
    fn malformed_set_is_rejected() {
        assert!(Config::load(None, None, &["run.seed".into()]).is_err());
        assert!(Config::load(None, None, &["run..seed=1".into()]).is_err());
    }
}
