//! Executes a validated plan: creates `runs/<run-id>/`, saves the resolved config and the
//! pipeline there before any work starts, runs the steps in order, and records outcomes.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::io::write_atomic;
use crate::pipeline::plan::Plan;
use crate::stages::context::new_run_id;
use crate::stages::{stage, StageContext};

/// Flags of `pipeline run` that are not configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub workdir: PathBuf,
    pub retry_failed: bool,
    /// CUDA device for model stages.
    pub gpu: Option<usize>,
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
    /// Not run because an input step did not complete.
    Skipped { because: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub run_id: String,
    pub pipeline: String,
    pub steps: Vec<(String, StepOutcome)>,
}

/// Runs `plan` under `opts.workdir`. A failing step stops the run with its error (the stage
/// named, its cause kept as the error's source).
pub fn execute(plan: &Plan, opts: &RunOptions) -> Result<(PathBuf, RunRecord)> {
    let run_id = new_run_id(&plan.name);
    let run_dir = opts.workdir.join("runs").join(&run_id);
    std::fs::create_dir_all(&run_dir).at(&run_dir)?;
    write_atomic(
        &run_dir.join("config.toml"),
        plan.config.to_toml()?.as_bytes(),
    )?;
    write_atomic(&run_dir.join("pipeline.toml"), plan.text.as_bytes())?;
    eprintln!(
        "run {run_id}: {} step(s) from {}; config saved in {}",
        plan.steps.len(),
        plan.origin,
        run_dir.display()
    );

    let mut record = RunRecord {
        run_id,
        pipeline: plan.name.clone(),
        steps: Vec::new(),
    };
    for step in &plan.steps {
        let blocked = step.inputs.iter().find(|input| {
            !matches!(
                record.steps.iter().find(|(n, _)| n == *input),
                Some((_, StepOutcome::Done { .. }))
            )
        });
        let registered = stage(&step.stage).ok_or_else(|| {
            Error::Plan(vec![format!(
                "step `{}`: unknown stage `{}`",
                step.name(),
                step.stage
            )])
        })?;
        let outcome = if let Some(input) = blocked {
            StepOutcome::Skipped {
                because: format!("input `{input}` did not run"),
            }
        } else {
            let started = Instant::now();
            let mut ctx =
                StageContext::new(&opts.workdir, &record.run_id, plan.config.shared.clone());
            ctx.gpu = opts.gpu;
            ctx.retry_failed = opts.retry_failed;
            let done = (registered.run)(plan.config.section(registered), &ctx).map_err(|e| {
                Error::Stage {
                    stage: step.name().to_string(),
                    source: Box::new(e),
                }
            })?;
            StepOutcome::Done {
                summary: done.text,
                seconds: started.elapsed().as_secs_f64(),
                details: done.details,
            }
        };
        match &outcome {
            StepOutcome::Done {
                summary, seconds, ..
            } => {
                eprintln!(
                    "step {}: done in {seconds:.1}s\n    {}",
                    step.name(),
                    summary.replace("; ", "\n    ")
                )
            }
            StepOutcome::Skipped { because } => {
                eprintln!("step {}: skipped ({because})", step.name())
            }
        }
        record.steps.push((step.name().to_string(), outcome));
    }
    let json = serde_json::to_vec_pretty(&record).map_err(|e| Error::Config(e.to_string()))?;
    write_atomic(&run_dir.join("run.json"), &json)?;
    Ok((run_dir, record))
}
