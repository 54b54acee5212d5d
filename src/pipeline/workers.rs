//! Running one shard-parallel stage as a job array (Slurm job arrays, Kubernetes Indexed
//! Jobs) and merging it: `pipeline run <stage> --num-workers N [--worker-index I]`, then
//! `pipeline merge <stage> --num-workers N` (and `pipeline status`).
//!
//! The workers never talk to each other. Each does the shards it owns
//! ([`Workers::owns`]), records the whole plan and its outcome in the job's ledger
//! ([`Ledger`]), and merge checks every planned unit's finished marker: it names each
//! missing unit and the worker that owns it, or writes the stage's run record.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::data::partition::{
    DoneMarker, Ledger, MarkerKind, PlannedUnit, SetPlan, Sharding, WorkerRecord, Workers,
};
use crate::data::shard::ShardStats;
use crate::data::store::Root;
use crate::error::{Error, Result};
use crate::pipeline::plan::Plan;
use crate::pipeline::runner::{RunOptions, RunRecord, StepOutcome};
use crate::stages::context::new_run_id;
use crate::stages::{stage, Registered, StageContext};

/// The environment variables a job array gives each task its index in, in the order they
/// are tried: Slurm's, then Kubernetes Indexed Jobs'.
pub const INDEX_VARIABLES: [&str; 2] = ["SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"];

/// This process's place in a job array from `--num-workers` and `--worker-index`, the index
/// falling back to [`INDEX_VARIABLES`] (read through `env`). `None`: not a job array. The
/// count is never taken from the environment: `SLURM_ARRAY_TASK_COUNT` is 1 when a single
/// failed index is resubmitted.
pub fn resolve_workers(
    num_workers: Option<u32>,
    worker_index: Option<u32>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Workers>> {
    let Some(count) = num_workers else {
        return match worker_index {
            Some(_) => Err(Error::Config(
                "--worker-index needs --num-workers (the number of workers in the job array)"
                    .into(),
            )),
            None => Ok(None),
        };
    };
    if let Some(index) = worker_index {
        return Workers::new(count, index, "--worker-index").map(Some);
    }
    for var in INDEX_VARIABLES {
        if let Some(value) = env(var) {
            let index = value.trim().parse::<u32>().map_err(|_| {
                Error::Config(format!(
                    "{var} is `{value}`, not a worker index (a whole number from 0)"
                ))
            })?;
            return Workers::new(count, index, var).map(Some);
        }
    }
    Err(Error::Config(format!(
        "--num-workers {count} without --worker-index, and neither {} nor {} is set: give the \
         index, or run inside a Slurm job array or a Kubernetes Indexed Job",
        INDEX_VARIABLES[0], INDEX_VARIABLES[1]
    )))
}

/// The shard-parallel stage `plan` runs and the ledger of its job under `workdir`: the
/// ledger's name carries a digest of the resolved configuration, so workers and merge meet
/// only when they run the same one.
pub fn job(plan: &Plan, root: &Root, workdir: &Path) -> Result<(&'static Registered, Ledger)> {
    let sharded: Vec<&str> = crate::stages::STAGES
        .iter()
        .filter(|s| s.sharded)
        .map(|s| s.name)
        .collect();
    let registered = match plan.steps.as_slice() {
        [step] => stage(&step.stage).filter(|s| s.sharded),
        _ => None,
    }
    .ok_or_else(|| {
        Error::Config(format!(
            "--num-workers splits one shard-parallel stage ({}) across the workers of a job \
             array; `{}` is not one",
            sharded.join(", "),
            plan.name
        ))
    })?;
    let mut hasher = Sha256::new();
    hasher.update(registered.name.as_bytes());
    hasher.update([0]);
    hasher.update(plan.config.to_toml()?.as_bytes());
    let digest = hex::encode(hasher.finalize());
    Ok((
        registered,
        Ledger::new(root, workdir, registered.name, &digest),
    ))
}

/// Runs worker `workers.index` of `plan`'s stage: the shards it owns, its plan and outcome
/// recorded in the job's ledger (which also keeps the resolved config). The record is written
/// whether the stage succeeded or failed; a failure is still returned.
pub fn run_worker(
    plan: &Plan,
    opts: &RunOptions,
    workers: Workers,
) -> Result<(String, WorkerRecord)> {
    let (registered, ledger) = job(plan, &opts.root, &opts.workdir)?;
    ledger.record_config(&plan.config.to_toml()?)?;
    let run_id = format!("{}-worker-{:05}", registered.name, workers.index);
    let mut ctx = StageContext::new(&opts.workdir, &run_id, plan.config.shared.clone());
    ctx.run_dir = opts.workdir.join(ledger.rel()).join(&run_id);
    ctx.root = opts.root.clone();
    ctx.gpu = opts.gpu;
    ctx.retry_failed = opts.retry_failed;
    ctx.sharding = Sharding {
        workers,
        ledger: Some(ledger.clone()),
    };
    eprintln!(
        "worker {} of {}: {} (ledger {})",
        workers.index,
        workers.count,
        registered.name,
        ledger.location()
    );
    let step = &plan.steps[0];
    let started = Instant::now();
    let result = (registered.run)(step.section(plan.config.section(registered)).as_ref(), &ctx);
    let (outcome, summary) = match &result {
        Ok(done) => ("finished", done.text.clone()),
        Err(e) => ("failed", e.report()),
    };
    let record = WorkerRecord {
        index: workers.index,
        count: workers.count,
        outcome: outcome.into(),
        summary,
        seconds: started.elapsed().as_secs_f64(),
        host: host_name(),
        pid: std::process::id(),
    };
    let path = ledger.record_worker(&record)?;
    result.map_err(|e| Error::Stage {
        stage: registered.name.to_string(),
        source: Box::new(e),
    })?;
    Ok((path, record))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}

/// A planned unit that is not (or not properly) finished.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MissingUnit {
    pub shard: u32,
    /// The worker that owns it under the count merge was given.
    pub worker: u32,
    pub reason: String,
}

/// One set of the job: its units, how many are finished, and which are not.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SetStatus {
    pub set: String,
    pub units: usize,
    pub finished: usize,
    pub missing: Vec<MissingUnit>,
}

/// Where a job stands, from its ledger and the finished markers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobStatus {
    pub stage: String,
    pub ledger: String,
    pub num_workers: u32,
    pub sets: Vec<SetStatus>,
    pub workers: Vec<WorkerRecord>,
}

impl JobStatus {
    /// Workers whose record says they finished: each planned every set, so one of them is
    /// enough for the plan to be whole.
    pub fn finished_workers(&self) -> usize {
        self.workers
            .iter()
            .filter(|w| w.outcome == "finished")
            .count()
    }

    pub fn missing(&self) -> impl Iterator<Item = (&str, &MissingUnit)> {
        self.sets
            .iter()
            .flat_map(|s| s.missing.iter().map(move |m| (s.set.as_str(), m)))
    }

    /// The workers to resubmit: those owning a missing unit.
    pub fn workers_to_resubmit(&self) -> BTreeSet<u32> {
        self.missing().map(|(_, m)| m.worker).collect()
    }

    pub fn is_complete(&self) -> bool {
        !self.sets.is_empty() && self.missing().next().is_none() && self.finished_workers() > 0
    }

    /// Why the job cannot be merged yet, naming every missing unit (the first 100) and its
    /// owner, and which workers to resubmit.
    pub fn problem(&self) -> String {
        if self.sets.is_empty() {
            return format!(
                "no worker of this {} job has recorded a plan in {} yet: run the workers first \
                 (with the same --config/--set as merge)",
                self.stage, self.ledger
            );
        }
        let missing: Vec<String> = self
            .missing()
            .map(|(set, m)| {
                format!(
                    "{set}/part-{:05} (worker {}): {}",
                    m.shard, m.worker, m.reason
                )
            })
            .collect();
        let mut lines = Vec::new();
        if !missing.is_empty() {
            let units: usize = self.sets.iter().map(|s| s.units).sum();
            lines.push(format!(
                "{} of {units} shard(s) of {} are not finished:",
                missing.len(),
                self.stage
            ));
            lines.extend(missing.iter().take(100).map(|m| format!("  {m}")));
            if missing.len() > 100 {
                lines.push(format!("  ... and {} more", missing.len() - 100));
            }
            let resubmit: Vec<String> = self
                .workers_to_resubmit()
                .iter()
                .map(u32::to_string)
                .collect();
            lines.push(format!(
                "resubmit worker(s) {} of {} (Slurm: sbatch --array={} ...; each redoes only \
                 its unfinished shards)",
                resubmit.join(", "),
                self.num_workers,
                resubmit.join(",")
            ));
        }
        if self.finished_workers() == 0 {
            lines.push(format!(
                "no worker has finished yet (records in {}), so the plan may not be whole",
                self.ledger
            ));
        }
        lines.join("\n")
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} with {} worker(s), ledger {}",
            self.stage, self.num_workers, self.ledger
        )?;
        for s in &self.sets {
            writeln!(
                f,
                "  {:<40} {:>6} / {:<6} shards finished",
                s.set, s.finished, s.units
            )?;
        }
        let recorded: BTreeSet<u32> = self.workers.iter().map(|w| w.index).collect();
        for w in &self.workers {
            // A finished worker's summary is in its record; a failed one's error is news.
            let why = if w.outcome == "finished" {
                String::new()
            } else {
                format!(": {}", w.summary)
            };
            writeln!(
                f,
                "  worker {:>4}: {} after {:.1}s on {} (pid {}){why}",
                w.index, w.outcome, w.seconds, w.host, w.pid
            )?;
        }
        let silent: Vec<String> = (0..self.num_workers)
            .filter(|i| !recorded.contains(i))
            .map(|i| i.to_string())
            .collect();
        if !silent.is_empty() {
            writeln!(
                f,
                "  no record yet (running, pending or killed): worker(s) {}",
                silent.join(", ")
            )?;
        }
        if self.is_complete() {
            write!(f, "  complete: `pipeline merge` will record it")
        } else {
            write!(f, "  {}", self.problem().replace('\n', "\n  "))
        }
    }
}

/// Checks every unit of the job in `ledger` against its finished marker; `num_workers` names
/// the owners of the missing ones.
pub fn job_status(stage: &str, ledger: &Ledger, num_workers: u32) -> Result<JobStatus> {
    let workers = Workers::new(num_workers, 0, "--num-workers")?;
    let mut sets = Vec::new();
    for plan in ledger.plans()? {
        let mut missing = Vec::new();
        for unit in &plan.units {
            if let Some(reason) = unfinished(ledger, &plan, unit)? {
                missing.push(MissingUnit {
                    shard: unit.shard,
                    worker: Workers::owner(workers.count, unit.shard),
                    reason,
                });
            }
        }
        sets.push(SetStatus {
            set: plan.set.clone(),
            units: plan.units.len(),
            finished: plan.units.len() - missing.len(),
            missing,
        });
    }
    Ok(JobStatus {
        stage: stage.to_string(),
        ledger: ledger.location(),
        num_workers,
        sets,
        workers: ledger.workers()?,
    })
}

/// `unit`'s marker, or why there is none to go by (missing, unreadable); an error only when
/// the root cannot be read at all.
fn marker<T: serde::de::DeserializeOwned>(
    ledger: &Ledger,
    unit: &PlannedUnit,
) -> Result<std::result::Result<T, String>> {
    match ledger.read(&unit.marker) {
        Ok(Some(m)) => Ok(Ok(m)),
        Ok(None) => Ok(Err("not finished (no marker)".into())),
        Err(e @ Error::BadFile { .. }) => Ok(Err(format!("unreadable marker: {}", e.report()))),
        Err(e) => Err(e),
    }
}

/// Why `unit` does not count as finished, or `None` when it does: its marker is there and
/// the files it vouches for are there with the sizes it records, all in the ledger's root
/// (maybe an object store, where embed workers copy their cache entries).
fn unfinished(ledger: &Ledger, plan: &SetPlan, unit: &PlannedUnit) -> Result<Option<String>> {
    let size_problem = |root: &Root, file: &str, expected: u64| -> Result<Option<String>> {
        Ok(match root.size(file)? {
            None => Some(format!(
                "its marker {} exists but {file} is missing",
                unit.marker
            )),
            Some(len) if expected > 0 && len != expected => Some(format!(
                "{file} has {len} bytes, its marker {} says {expected}",
                unit.marker
            )),
            Some(_) => None,
        })
    };
    match unit.kind {
        MarkerKind::ShardStats => {
            let stats: ShardStats = match marker(ledger, unit)? {
                Ok(s) => s,
                Err(why) => return Ok(Some(why)),
            };
            if !plan.source.is_empty() && stats.source != plan.source {
                return Ok(Some(format!(
                    "written from another source (`{}`, the plan says `{}`)",
                    stats.source, plan.source
                )));
            }
            let parquet = unit.marker.replace(".stats.json", ".parquet");
            size_problem(ledger.root(), &parquet, stats.bytes)
        }
        MarkerKind::Done => {
            let done: DoneMarker = match marker(ledger, unit)? {
                Ok(d) => d,
                Err(why) => return Ok(Some(why)),
            };
            for (file, bytes) in &done.files {
                if let Some(problem) = size_problem(ledger.root(), file, (*bytes).max(1))? {
                    return Ok(Some(problem));
                }
            }
            Ok(None)
        }
    }
}

/// `pipeline merge`: when every planned unit of `plan`'s job is finished, records the stage
/// as one run (`runs/<id>/run.json`, its config and pipeline); otherwise an error naming
/// every missing unit and the worker to resubmit for it. Nothing the workers wrote changes.
pub fn merge(
    plan: &Plan,
    root: &Root,
    workdir: &Path,
    num_workers: u32,
) -> Result<(String, RunRecord)> {
    let (registered, ledger) = job(plan, root, workdir)?;
    let status = job_status(registered.name, &ledger, num_workers)?;
    if !status.is_complete() {
        return Err(Error::Invalid(status.problem()));
    }
    let mut record = RunRecord {
        run_id: new_run_id(&plan.name),
        pipeline: plan.name.clone(),
        steps: Vec::new(),
    };
    let run_dir = format!("runs/{}", record.run_id);
    root.put(
        &format!("{run_dir}/config.toml"),
        plan.config.to_toml()?.as_bytes(),
    )?;
    root.put(&format!("{run_dir}/pipeline.toml"), plan.text.as_bytes())?;
    let units: usize = status.sets.iter().map(|s| s.units).sum();
    let seconds = status.workers.iter().map(|w| w.seconds).sum();
    let details = serde_json::to_value(&status).map_err(|e| Error::Invalid(e.to_string()))?;
    record.steps.push((
        plan.steps[0].name().to_string(),
        StepOutcome::Done {
            summary: format!(
                "{units} shard(s) of {} set(s), {} worker record(s), merged from {}",
                status.sets.len(),
                status.workers.len(),
                status.ledger
            ),
            seconds,
            details,
        },
    ));
    let json = serde_json::to_vec_pretty(&record).map_err(|e| Error::Invalid(e.to_string()))?;
    let path = format!("{run_dir}/run.json");
    root.put(&path, &json)?;
    Ok((root.display(&path), record))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_index_comes_from_the_flag_then_slurm_then_kubernetes() {
        let both = [("SLURM_ARRAY_TASK_ID", "2"), ("JOB_COMPLETION_INDEX", "3")];
        let w = |n, i, vars: &[(&str, &str)]| resolve_workers(n, i, env(vars));
        assert_eq!(
            w(None, None, &both).unwrap(),
            None,
            "no --num-workers: one process"
        );
        assert_eq!(w(Some(4), Some(1), &both).unwrap().unwrap().index, 1);
        assert_eq!(w(Some(4), None, &both).unwrap().unwrap().index, 2);
        let k8s = [("JOB_COMPLETION_INDEX", "3")];
        assert_eq!(w(Some(4), None, &k8s).unwrap().unwrap().index, 3);

        let e = w(Some(4), None, &[]).unwrap_err().to_string();
        assert!(
            e.contains("SLURM_ARRAY_TASK_ID") && e.contains("JOB_COMPLETION_INDEX"),
            "{e}"
        );
        let e = w(Some(4), None, &[("SLURM_ARRAY_TASK_ID", "4")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("SLURM_ARRAY_TASK_ID is 4"), "{e}");
        let e = w(Some(4), None, &[("JOB_COMPLETION_INDEX", "x")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("JOB_COMPLETION_INDEX is `x`"), "{e}");
        let e = w(None, Some(1), &[]).unwrap_err().to_string();
        assert!(e.contains("--worker-index needs --num-workers"), "{e}");
        let e = w(Some(0), Some(0), &[]).unwrap_err().to_string();
        assert!(e.contains("--num-workers is 0"), "{e}");
    }

    #[test]
    fn status_names_each_missing_or_damaged_shard_and_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path();
        let ledger = Ledger::new(
            &Root::Local(work.to_path_buf()),
            work,
            "ingest",
            "feedc0ffee00",
        );
        let sharding = Sharding {
            workers: Workers::new(3, 0, "--worker-index").unwrap(),
            ledger: Some(ledger.clone()),
        };
        let set = work.join("data/syn/train");
        sharding.plan_shards("data/syn/train", "src", 5).unwrap();
        std::fs::create_dir_all(&set).unwrap();
        let write = |shard: u32, bytes: &[u8], recorded: u64, source: &str| {
            std::fs::write(set.join(format!("part-{shard:05}.parquet")), bytes).unwrap();
            let stats = ShardStats {
                shard,
                bytes: recorded,
                source: source.into(),
                ..ShardStats::default()
            };
            crate::io::write_json(&set.join(format!("part-{shard:05}.stats.json")), &stats)
                .unwrap();
        };
        write(0, b"abcd", 4, "src");
        write(1, b"abcd", 7, "src"); // cut short
        write(2, b"abcd", 4, "other"); // another configuration's
        write(3, b"abcd", 4, "src");
        std::fs::remove_file(set.join("part-00003.parquet")).unwrap();
        // Shard 4 never started.
        let status = job_status("ingest", &ledger, 3).unwrap();
        let missing: Vec<(u32, u32)> = status.missing().map(|(_, m)| (m.shard, m.worker)).collect();
        assert_eq!(missing, vec![(1, 1), (2, 2), (3, 0), (4, 1)]);
        let reasons: Vec<&str> = status.missing().map(|(_, m)| m.reason.as_str()).collect();
        assert!(
            reasons[0].contains("has 4 bytes, its marker"),
            "{}",
            reasons[0]
        );
        assert!(reasons[1].contains("another source"), "{}", reasons[1]);
        assert!(
            reasons[2].contains("part-00003.parquet is missing"),
            "{}",
            reasons[2]
        );
        assert!(reasons[3].contains("no marker"), "{}", reasons[3]);
        assert_eq!(status.workers_to_resubmit(), BTreeSet::from([0, 1, 2]));
        assert!(!status.is_complete());
        let problem = status.problem();
        assert!(
            problem.contains("data/syn/train/part-00004 (worker 1)"),
            "{problem}"
        );
        assert!(problem.contains("no worker has finished yet"), "{problem}");
    }
}
