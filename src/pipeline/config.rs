//! The resolved configuration: `configs/default.toml` (or `--config FILE`), then a pipeline's
//! `[config]` table, then `--set section.key=value` overrides. Every section is checked
//! strictly against its type (the shared sections' and, through the registry, each stage's),
//! so a misspelt key is an error that names it, whatever stage runs. Keys that moved keep
//! working (with a warning that names the new key).

use std::path::Path;

use crate::error::{Error, IoContext, Result};
use crate::stages::context::{ClipConfig, PreferenceConfig, RunConfig, SharedConfig};
use crate::stages::{parse_section, Registered, Stage, StageContext, STAGES};

/// The copy of `configs/default.toml` built into the binary, used when the file is absent
/// (running `pipeline` outside a checkout).
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../configs/default.toml");

/// Keys that moved, old → new. An old key still works: its value is moved to the new key
/// (a table's keys into the new section) and a warning names the new one.
pub const MOVED_KEYS: &[(&str, &str)] = &[
    ("embed.model", "clip.model"),
    ("embed.revision", "clip.revision"),
    ("embed.dtype", "clip.dtype"),
    ("embed.cache_dtype", "clip.cache_dtype"),
    ("embed.image_backend", "clip.image_backend"),
    ("embed.cpu_fallback", "run.cpu_fallback"),
    ("embed.tiny_pretrain", "pretrain_clip"),
];

/// A validated configuration: the merged table of every layer, and the shared sections typed.
#[derive(Debug, Clone)]
pub struct Config {
    table: toml::Table,
    pub shared: SharedConfig,
}

impl Config {
    /// Loads `path` (or the built-in default when `path` is `None`), merges
    /// `pipeline_overrides` and then `sets` (`a.b.c=value`), moves old keys to their new
    /// places, and validates every section; all problems are reported together.
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
        move_old_keys(&mut table, &origin);
        if let Some(over) = pipeline_overrides {
            let mut over = over.clone();
            move_old_keys(&mut over, "the pipeline's [config]");
            merge(&mut table, &over);
        }
        for set in sets {
            let mut one = toml::Table::new();
            apply_set(&mut one, set)?;
            move_old_keys(&mut one, &format!("--set {set}"));
            merge(&mut table, &one);
        }
        Self::from_table(table).map_err(|problems| {
            Error::Config(if problems.len() == 1 {
                format!("{origin}: {}", problems[0])
            } else {
                format!(
                    "{origin}:\n{}",
                    problems
                        .iter()
                        .map(|p| format!("  - {p}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            })
        })
    }

    /// Checks every section of `table`; on failure, every problem found.
    fn from_table(table: toml::Table) -> std::result::Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let known = |name: &str| {
            SharedConfig::SECTIONS.contains(&name) || STAGES.iter().any(|s| s.section == name)
        };
        for key in table.keys() {
            if !known(key) {
                let mut sections: Vec<&str> = SharedConfig::SECTIONS.to_vec();
                sections.extend(STAGES.iter().map(|s| s.section));
                problems.push(format!(
                    "unknown section `[{key}]` (known: {})",
                    sections.join(", ")
                ));
            }
        }
        let mut shared = SharedConfig::default();
        let mut check = |r: Result<()>| {
            if let Err(e) = r {
                problems.push(e.to_string().replace("configuration error: ", ""));
            }
        };
        check(parse_section::<RunConfig>("run", table.get("run")).map(|v| shared.run = v));
        check(parse_section("hub", table.get("hub")).map(|v| shared.hub = v));
        check(parse_section::<ClipConfig>("clip", table.get("clip")).map(|v| shared.clip = v));
        check(parse_section("captioner", table.get("captioner")).map(|v| shared.captioner = v));
        check(
            parse_section::<PreferenceConfig>("preference", table.get("preference"))
                .map(|v| shared.preference = v),
        );
        for stage in STAGES {
            check((stage.resolve)(table.get(stage.section)).map(|_| ()));
        }
        if problems.is_empty() {
            Ok(Self { table, shared })
        } else {
            Err(problems)
        }
    }

    /// Applies one more `section.key=value` override, checked like the others.
    pub fn set(&mut self, set: &str) -> Result<()> {
        let mut one = toml::Table::new();
        apply_set(&mut one, set)?;
        move_old_keys(&mut one, &format!("set {set}"));
        let mut table = self.table.clone();
        merge(&mut table, &one);
        *self = Self::from_table(table)
            .map_err(|problems| Error::Config(format!("set {set}: {}", problems.join("; "))))?;
        Ok(())
    }

    /// The section of registered stage `stage`, as written (absent: the stage's defaults).
    pub fn section(&self, stage: &Registered) -> Option<&toml::Value> {
        self.table.get(stage.section)
    }

    /// Stage `S`'s section, typed.
    pub fn stage<S: Stage>(&self) -> Result<S::Config> {
        crate::stages::parse::<S>(self.table.get(S::SECTION))
    }

    /// A context for running stages ad hoc (tests, `pipeline embed`) under `workdir`; its run
    /// directory is `runs/<run_id>/`.
    pub fn context(&self, workdir: &Path, run_id: &str) -> StageContext {
        StageContext::new(workdir, run_id, self.shared.clone())
    }

    /// The configuration as TOML with every default filled in, as saved into each run
    /// directory: the shared sections, then each stage's.
    pub fn to_toml(&self) -> Result<String> {
        let err =
            |e: &dyn std::fmt::Display| Error::Config(format!("cannot serialise config: {e}"));
        let mut out = match toml::Value::try_from(&self.shared).map_err(|e| err(&e))? {
            toml::Value::Table(t) => t,
            _ => toml::Table::new(),
        };
        for stage in STAGES {
            out.insert(
                stage.section.to_string(),
                (stage.resolve)(self.table.get(stage.section))?,
            );
        }
        toml::to_string_pretty(&out).map_err(|e| err(&e))
    }
}

/// Moves the keys of [`MOVED_KEYS`] found in `table` to their new places, warning once per
/// key; `origin` names where the table came from.
fn move_old_keys(table: &mut toml::Table, origin: &str) {
    for (old, new) in MOVED_KEYS {
        let (old_section, old_key) = old.split_once('.').unwrap_or((old, ""));
        let Some(toml::Value::Table(section)) = table.get_mut(old_section) else {
            continue;
        };
        let Some(value) = section.remove(old_key) else {
            continue;
        };
        if section.is_empty() {
            table.remove(old_section);
        }
        eprintln!("configuration ({origin}): `{old}` is now `{new}`; using it as `{new}`");
        let mut moved = toml::Table::new();
        match new.split_once('.') {
            Some((section, key)) => {
                let mut inner = toml::Table::new();
                inner.insert(key.to_string(), value);
                moved.insert(section.to_string(), toml::Value::Table(inner));
            }
            None => {
                moved.insert(new.to_string(), value);
            }
        }
        merge(table, &moved);
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
    use crate::stages::ingest::Ingest;
    use crate::stages::pretrain_clip::PretrainClip;

    #[test]
    fn builtin_default_parses_and_equals_every_sections_defaults() {
        let cfg = Config::load(None, None, &[]).unwrap();
        let defaults = Config::from_table(toml::Table::new()).unwrap();
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
        assert_eq!(cfg.shared.run.seed, 7);
        assert_eq!(cfg.stage::<Ingest>().unwrap().cc.shard_size, 10);
    }

    #[test]
    fn unknown_keys_and_sections_are_rejected_with_their_full_path_all_at_once() {
        let err = Config::load(
            None,
            None,
            &[
                "ingest.cc.shard_sze=10".into(),
                "nosuch.key=1".into(),
                "clip.modle=x".into(),
            ],
        )
        .unwrap_err()
        .to_string();
        for needle in ["ingest.cc", "shard_sze", "`[nosuch]`", "clip", "modle"] {
            assert!(err.contains(needle), "missing `{needle}` in:\n{err}");
        }
    }

    #[test]
    fn malformed_set_is_rejected() {
        assert!(Config::load(None, None, &["run.seed".into()]).is_err());
        assert!(Config::load(None, None, &["run..seed=1".into()]).is_err());
    }

    #[test]
    fn moved_keys_keep_working_under_their_new_names() {
        let old: toml::Table = toml::from_str(
            "[embed]\nmodel = \"tiny\"\ncpu_fallback = true\ndatasets = [\"synthetic\"]\n\
             [embed.tiny_pretrain]\nsteps = 7\n",
        )
        .unwrap();
        let cfg = Config::load(None, Some(&old), &["embed.revision=\"abc\"".into()]).unwrap();
        assert_eq!(cfg.shared.clip.model, "tiny");
        assert_eq!(cfg.shared.clip.revision, "abc");
        assert!(cfg.shared.run.cpu_fallback);
        assert_eq!(cfg.stage::<PretrainClip>().unwrap().steps, 7);
        let saved = cfg.to_toml().unwrap();
        assert!(
            saved.contains("[pretrain_clip]") && !saved.contains("tiny_pretrain"),
            "{saved}"
        );
    }
}
