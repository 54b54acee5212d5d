//! Executes a validated plan: creates `runs/<run-id>/`, saves the resolved config and the
//! pipeline there before any work starts, runs the steps in order, and records outcomes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::data::store::Root;
use crate::error::{Error, IoContext, Result};
use crate::io::write_atomic;
use crate::pipeline::plan::Plan;
use crate::stages::context::new_run_id;
use crate::stages::{stage, Registered, StageContext};

/// Flags of `pipeline run` that are not configuration.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub workdir: PathBuf,
    pub retry_failed: bool,
    /// CUDA device for model stages.
    pub gpu: Option<usize>,
    /// Where the shared files live: `workdir`, or an object store (`--workdir s3://…`).
    pub root: Root,
}

/// What happened to one step.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum StepOutcome {
    Done {
        summary: String,
        seconds: f64,
        /// The stage's typed summary.
        details: serde_json::Value,
    },
    /// The step failed and the run stopped there.
    Failed {
        /// The error and its causes.
        error: String,
        seconds: f64,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub run_id: String,
    pub pipeline: String,
    pub steps: Vec<(String, StepOutcome)>,
}

/// The root stage `registered` runs on: the object store itself for stages that read and
/// write through it; for the others a local copy, brought up to date first: every file of
/// `data/` and `cache/` that the local directory lacks (or has at another size) is copied
/// down, and the copy says so. Cache entries are verified by their sha256 when looked up.
fn root_for(registered: &Registered, opts: &RunOptions) -> Result<Root> {
    if !opts.root.is_remote() || registered.object_store {
        return Ok(opts.root.clone());
    }
    let (mut files, mut bytes) = (0, 0);
    for dir in ["data", "cache"] {
        let (f, b) = opts.root.copy_down(dir, &opts.workdir)?;
        files += f;
        bytes += b;
    }
    eprintln!(
        "[{}] works on a local copy of {}: copied {files} file(s) ({:.1} MB) of data/ and \
         cache/ to {}",
        registered.name,
        opts.root.display(""),
        bytes as f64 / 1e6,
        opts.workdir.display()
    );
    Ok(Root::Local(opts.workdir.clone()))
}

/// Creates `runs/<run-id>/` for `plan` under `workdir` with its resolved config and pipeline
/// file, and an empty record of it.
pub fn start_run(plan: &Plan, workdir: &Path) -> Result<(PathBuf, RunRecord)> {
    let run_id = new_run_id(&plan.name);
    let run_dir = workdir.join("runs").join(&run_id);
    std::fs::create_dir_all(&run_dir).at(&run_dir)?;
    write_atomic(
        &run_dir.join("config.toml"),
        plan.config.to_toml()?.as_bytes(),
    )?;
    write_atomic(&run_dir.join("pipeline.toml"), plan.text.as_bytes())?;
    let record = RunRecord {
        run_id,
        pipeline: plan.name.clone(),
        steps: Vec::new(),
    };
    Ok((run_dir, record))
}

/// Writes `record` as the run's `run.json` (atomically).
pub fn save_record(run_dir: &Path, record: &RunRecord) -> Result<()> {
    crate::io::write_json(&run_dir.join("run.json"), record)
}

/// Runs `plan` under `opts.workdir`, recording each step in `run.json` as it ends. A failing
/// step is recorded and stops the run with its error (the stage named, its cause kept as the
/// error's source); what earlier steps wrote stays, and the steps that report on it (stages
/// with `RUNS_AFTER_FAILURE`, the report) still run.
pub fn execute(plan: &Plan, opts: &RunOptions) -> Result<(PathBuf, RunRecord)> {
    let (run_dir, mut record) = start_run(plan, &opts.workdir)?;
    eprintln!(
        "run {}: {} step(s) from {}; config saved in {}",
        record.run_id,
        plan.steps.len(),
        plan.origin,
        run_dir.display()
    );
    let save = |record: &RunRecord| -> Result<()> { save_record(&run_dir, record) };
    // Plans run in dependency order and a failure stops the run: a step's inputs are done.
    // After a failure only the steps that report on what finished still run (the report).
    let mut failure: Option<Error> = None;
    for step in &plan.steps {
        let registered = stage(&step.stage).ok_or_else(|| {
            Error::Plan(vec![format!(
                "step `{}`: unknown stage `{}`",
                step.name(),
                step.stage
            )])
        })?;
        if failure.is_some() && !registered.runs_after_failure {
            continue;
        }
        let started = Instant::now();
        let mut ctx = StageContext::new(&opts.workdir, &record.run_id, plan.config.shared.clone());
        ctx.gpu = opts.gpu;
        ctx.retry_failed = opts.retry_failed;
        ctx.step = step.name().to_string();
        let section = step.section(plan.config.section(registered));
        let result = root_for(registered, opts).and_then(|root| {
            ctx.root = root;
            (registered.run)(section.as_ref(), &ctx)
        });
        match result {
            Ok(done) => {
                let seconds = started.elapsed().as_secs_f64();
                eprintln!(
                    "step {}: done in {seconds:.1}s\n    {}",
                    step.name(),
                    done.text.replace("; ", "\n    ")
                );
                record.steps.push((
                    step.name().to_string(),
                    StepOutcome::Done {
                        summary: done.text,
                        seconds,
                        details: done.details,
                    },
                ));
                save(&record)?;
            }
            Err(e) => {
                let error = Error::Stage {
                    stage: step.name().to_string(),
                    source: Box::new(e),
                };
                record.steps.push((
                    step.name().to_string(),
                    StepOutcome::Failed {
                        error: error.report(),
                        seconds: started.elapsed().as_secs_f64(),
                    },
                ));
                save(&record)?;
                match failure {
                    None => failure = Some(error),
                    // The first failure is the run's error; a later one is in run.json.
                    Some(_) => eprintln!("step {}: failed too: {}", step.name(), error.report()),
                }
            }
        }
    }
    if let Some(error) = failure {
        return Err(error);
    }
    Ok((run_dir, record))
}
