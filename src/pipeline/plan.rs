//! Pipelines as data: `pipelines/*.toml` name steps (a stage and its inputs) and optional
//! config overrides. A plan is validated as a whole — unknown stage, missing input, cycle,
//! unknown config key — and every problem is reported at once, before anything runs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, IoContext, Result};
use crate::pipeline::config::Config;
use crate::stages::{stage, STAGES};

/// Built-in pipelines, used when `pipelines/<name>.toml` is not found beside the workdir.
pub const BUILTIN_PIPELINES: &[(&str, &str)] = &[
    ("default", include_str!("../../pipelines/default.toml")),
    (
        "synthetic-grounded",
        include_str!("../../pipelines/synthetic-grounded.toml"),
    ),
    (
        "contrastive",
        include_str!("../../pipelines/contrastive.toml"),
    ),
    ("dico", include_str!("../../pipelines/dico.toml")),
    ("cc-dico", include_str!("../../pipelines/cc-dico.toml")),
    ("rlhf", include_str!("../../pipelines/rlhf.toml")),
    ("cc-rlhf", include_str!("../../pipelines/cc-rlhf.toml")),
    ("diffusion", include_str!("../../pipelines/diffusion.toml")),
    ("story", include_str!("../../pipelines/story.toml")),
    (
        "storyreasoning",
        include_str!("../../pipelines/storyreasoning.toml"),
    ),
    (
        "cc-diffusion",
        include_str!("../../pipelines/cc-diffusion.toml"),
    ),
    (
        "ingest-real",
        include_str!("../../pipelines/ingest-real.toml"),
    ),
    (
        "cc-ultrafeedback-dpo",
        include_str!("../../pipelines/cc-ultrafeedback-dpo.toml"),
    ),
    (
        "cc-contrastive-dpo",
        include_str!("../../pipelines/cc-contrastive-dpo.toml"),
    ),
    (
        "cc-ultrafeedback-orpo",
        include_str!("../../pipelines/cc-ultrafeedback-orpo.toml"),
    ),
];

/// A pipeline file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub steps: Vec<StepSpec>,
    /// Overrides applied on top of the config file (before `--set`).
    #[serde(default)]
    pub config: Option<toml::Table>,
}

/// One step: a stage, a unique name (defaults to the stage), the steps it reads from, and
/// overrides of the stage's own section for this step only (`config = { reward = "clip" }`),
/// so one stage can run twice in a pipeline under two names (a stage's outputs go to
/// `runs/<id>/<step name>/`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    pub stage: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub inputs: Vec<String>,
    #[serde(default)]
    pub config: Option<toml::Table>,
}

impl StepSpec {
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.stage)
    }

    /// The stage's section for this step: `section` (the run's) with the step's overrides.
    pub fn section(&self, section: Option<&toml::Value>) -> Option<toml::Value> {
        let Some(over) = &self.config else {
            return section.cloned();
        };
        let mut table = match section {
            Some(toml::Value::Table(t)) => t.clone(),
            _ => toml::Table::new(),
        };
        crate::pipeline::config::merge(&mut table, over);
        Some(toml::Value::Table(table))
    }
}

/// A validated plan: steps in dependency order and the resolved config.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub description: String,
    /// Where the pipeline came from (a path, or "built-in").
    pub origin: String,
    /// The pipeline file's text, saved into the run directory.
    pub text: String,
    pub steps: Vec<StepSpec>,
    pub config: Config,
}

/// Where a run's configuration comes from (CLI flags).
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// `--config FILE`; `None` = `configs/default.toml` if present, else the built-in copy.
    pub path: Option<PathBuf>,
    pub sets: Vec<String>,
    pub gpu: Option<usize>,
}

impl ConfigSource {
    fn config_path(&self) -> Option<PathBuf> {
        self.path.clone().or_else(|| {
            let p = PathBuf::from("configs/default.toml");
            p.is_file().then_some(p)
        })
    }
}

/// Resolves `target` — a stage name, a pipeline name in `pipelines/`, a built-in pipeline, or
/// a path to a `.toml` — into a validated plan.
pub fn resolve(target: &str, source: &ConfigSource) -> Result<Plan> {
    if let Some(info) = stage(target) {
        let text = format!(
            "description = \"the `{0}` stage alone\"\n\n[[steps]]\nstage = \"{0}\"\n",
            info.name
        );
        return build(target, "command line", &text, source);
    }
    let (origin, text) = load_pipeline_text(target)?;
    let name = Path::new(target)
        .file_stem()
        .map_or(target.to_string(), |s| s.to_string_lossy().into_owned());
    build(&name, &origin, &text, source)
}

fn load_pipeline_text(target: &str) -> Result<(String, String)> {
    let as_path = Path::new(target);
    let candidates: Vec<PathBuf> = if target.ends_with(".toml") || target.contains('/') {
        vec![as_path.to_path_buf()]
    } else {
        vec![PathBuf::from("pipelines").join(format!("{target}.toml"))]
    };
    for c in &candidates {
        if c.is_file() {
            return Ok((c.display().to_string(), std::fs::read_to_string(c).at(c)?));
        }
    }
    if let Some((_, text)) = BUILTIN_PIPELINES.iter().find(|(n, _)| *n == target) {
        return Ok((
            format!("built-in pipelines/{target}.toml"),
            text.to_string(),
        ));
    }
    let stages: Vec<_> = STAGES.iter().map(|s| s.name).collect();
    let builtins: Vec<_> = BUILTIN_PIPELINES.iter().map(|(n, _)| *n).collect();
    Err(Error::Plan(vec![format!(
        "`{target}` is neither a stage ({}) nor a pipeline (looked for {}; built-in: {})",
        stages.join(", "),
        candidates
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        builtins.join(", ")
    )]))
}

/// Parses and validates a pipeline's text, collecting every problem.
pub fn build(name: &str, origin: &str, text: &str, source: &ConfigSource) -> Result<Plan> {
    let file: PipelineFile =
        toml::from_str(text).map_err(|e| Error::Plan(vec![format!("{origin}: {e}")]))?;
    let mut errors = Vec::new();
    if file.steps.is_empty() {
        errors.push(format!("{origin}: the pipeline has no [[steps]]"));
    }
    let mut names = HashSet::new();
    for step in &file.steps {
        if !names.insert(step.name()) {
            errors.push(format!("step `{}` is defined twice", step.name()));
        }
        if stage(&step.stage).is_none() {
            errors.push(format!(
                "step `{}`: unknown stage `{}` (known: {})",
                step.name(),
                step.stage,
                STAGES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
            ));
        }
        for input in &step.inputs {
            if !file.steps.iter().any(|s| s.name() == input) {
                errors.push(format!(
                    "step `{}`: input `{input}` is not a step of this pipeline",
                    step.name()
                ));
            }
        }
    }
    let ordered = match topological_order(&file.steps) {
        Ok(order) => order,
        Err(cycle) => {
            errors.push(format!("the steps form a cycle: {}", cycle.join(" -> ")));
            file.steps.clone()
        }
    };
    let config = match Config::load(
        source.config_path().as_deref(),
        file.config.as_ref(),
        &source.sets,
    ) {
        Ok(c) => Some(c),
        Err(e) => {
            errors.push(e.to_string());
            None
        }
    };
    let fallback = config.as_ref().is_some_and(|c| c.shared.run.cpu_fallback);
    if source.gpu.is_some() && !cfg!(feature = "cuda") && !fallback {
        errors.push(
            "--gpu needs a binary built with the `cuda` feature (cargo build --release --features cuda); \
             this one is CPU-only (set run.cpu_fallback=true to run on the CPU anyway)"
                .into(),
        );
    }
    if let Some(config) = &config {
        for step in file.steps.iter().filter(|s| s.config.is_some()) {
            if let Some(registered) = stage(&step.stage) {
                let section = step.section(config.section(registered));
                if let Err(e) = (registered.resolve)(section.as_ref()) {
                    errors.push(format!(
                        "step `{}`: {}",
                        step.name(),
                        e.to_string().replace("configuration error: ", "")
                    ));
                }
            }
        }
    }
    match config {
        Some(config) if errors.is_empty() => Ok(Plan {
            name: name.to_string(),
            description: file.description,
            origin: origin.to_string(),
            text: text.to_string(),
            steps: ordered,
            config,
        }),
        _ => Err(Error::Plan(errors)),
    }
}

/// Kahn's algorithm over step names, stable in file order. Unknown inputs are ignored here
/// (reported separately). On a cycle, returns the steps on it.
fn topological_order(steps: &[StepSpec]) -> std::result::Result<Vec<StepSpec>, Vec<String>> {
    let index: HashMap<&str, usize> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name(), i))
        .collect();
    let mut indegree = vec![0usize; steps.len()];
    let mut users: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, s) in steps.iter().enumerate() {
        for input in &s.inputs {
            if let Some(&j) = index.get(input.as_str()) {
                indegree[i] += 1;
                users.entry(j).or_default().push(i);
            }
        }
    }
    let mut ready: Vec<usize> = (0..steps.len())
        .filter(|i| indegree[*i] == 0)
        .rev()
        .collect();
    let mut order = Vec::new();
    while let Some(i) = ready.pop() {
        order.push(steps[i].clone());
        for &u in users.get(&i).map(Vec::as_slice).unwrap_or(&[]) {
            indegree[u] -= 1;
            if indegree[u] == 0 {
                ready.push(u);
                ready.sort_unstable_by(|a, b| b.cmp(a));
            }
        }
    }
    if order.len() == steps.len() {
        Ok(order)
    } else {
        let mut cycle: Vec<String> = (0..steps.len())
            .filter(|i| indegree[*i] > 0)
            .map(|i| steps[i].name().to_string())
            .collect();
        cycle.push(cycle[0].clone());
        Err(cycle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(text: &str) -> Result<Plan> {
        build("t", "t.toml", text, &ConfigSource::default())
    }

    #[test]
    fn builtin_pipelines_validate() {
        for (name, text) in BUILTIN_PIPELINES {
            plan(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn steps_are_ordered_by_their_inputs() {
        let p = plan(
            "[[steps]]\nstage = \"score\"\ninputs = [\"generate\"]\n\
             [[steps]]\nstage = \"generate\"\ninputs = [\"ingest\"]\n\
             [[steps]]\nstage = \"ingest\"\n",
        )
        .unwrap();
        let names: Vec<_> = p.steps.iter().map(|s| s.name().to_string()).collect();
        assert_eq!(names, ["ingest", "generate", "score"]);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = plan(
            "[[steps]]\nstage = \"ingest\"\n\
             [[steps]]\nstage = \"teleport\"\n\
             [[steps]]\nstage = \"score\"\ninputs = [\"nowhere\", \"generate\"]\n\
             [[steps]]\nstage = \"generate\"\ninputs = [\"score\"]\n\
             [config.ingest]\nshard_sze = 3\n",
        )
        .unwrap_err()
        .to_string();
        for needle in ["teleport", "nowhere", "cycle", "score -> ", "shard_sze"] {
            assert!(err.contains(needle), "missing `{needle}` in:\n{err}");
        }
    }

    #[test]
    fn a_step_overrides_its_stage_section_for_itself_only_and_is_checked() {
        let p = plan(
            "[[steps]]\nstage = \"generate\"\nname = \"gen-beam\"\nconfig = { beams = 7 }\n\
             [[steps]]\nstage = \"generate\"\n\
             [config.generate]\nbeams = 2\nmax_tokens = 9\n",
        )
        .unwrap();
        let registered = stage("generate").unwrap();
        let run = p.config.section(registered);
        let beams = |v: Option<toml::Value>| {
            let t = v.unwrap();
            (t["beams"].as_integer(), t["max_tokens"].as_integer())
        };
        assert_eq!(beams(p.steps[0].section(run)), (Some(7), Some(9)));
        assert_eq!(beams(p.steps[1].section(run)), (Some(2), Some(9)));
        let err = plan("[[steps]]\nstage = \"generate\"\nconfig = { beamz = 7 }\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("step `generate`") && err.contains("beamz"),
            "{err}"
        );
    }

    #[test]
    fn a_stage_name_is_a_one_step_plan() {
        let p = resolve("ingest", &ConfigSource::default()).unwrap();
        assert_eq!(p.steps.len(), 1);
        assert_eq!(p.steps[0].stage, "ingest");
    }

    #[test]
    fn unknown_target_lists_what_exists() {
        let err = resolve("nosuch", &ConfigSource::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nosuch") && err.contains("ingest") && err.contains("default"),
            "{err}"
        );
    }
}
