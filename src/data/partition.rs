//! Work split across the processes of a job array (Slurm job arrays, Kubernetes Indexed
//! Jobs): which worker owns which shard, and the job's ledger, the files through which
//! workers that never talk to each other leave what `pipeline merge` needs.
//!
//! Shard `s` of every shard set belongs to worker `s mod N`, so what a worker writes does not
//! depend on how many other workers ran or how far they got, and a resubmitted worker redoes
//! only its own unfinished shards.
//!
//! The ledger of one job is `workers/<stage>-<digest>/` in the workdir (the digest is the
//! resolved configuration's, so workers and merge of one configuration meet there):
//! - `plan/<set>.json`: every unit of one shard set (a unit is a shard index and the marker
//!   that says it is finished). Every worker computes the whole plan, not only its share, and
//!   records it; the records must agree, or the workers run different configurations.
//! - `done/<set>/part-NNNNN.json`: for units whose finished marker is not a shard's stats
//!   file, the files the unit produced and their sizes, created only if absent.
//! - `worker-NNNNN.json`: each worker's outcome, written when it ends (a killed worker
//!   leaves none).

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::data::store::{relative, Root};
use crate::error::{Error, IoContext, Result};

/// This process's place in a job array: worker `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workers {
    pub count: u32,
    pub index: u32,
}

impl Default for Workers {
    fn default() -> Self {
        Self::SINGLE
    }
}

impl Workers {
    /// One process doing all the work.
    pub const SINGLE: Workers = Workers { count: 1, index: 0 };

    /// Worker `index` of `count`; `index_from` names where the index came from (a flag or
    /// an environment variable) in the error when it is out of range.
    pub fn new(count: u32, index: u32, index_from: &str) -> Result<Self> {
        if count == 0 {
            return Err(Error::Config(
                "--num-workers is 0: give the number of workers in the job array (at least 1)"
                    .into(),
            ));
        }
        if index >= count {
            return Err(Error::Config(format!(
                "{index_from} is {index}, but --num-workers is {count}: worker indices run from 0 \
                 to {} (for Slurm, submit with --array=0-{})",
                count - 1,
                count - 1
            )));
        }
        Ok(Self { count, index })
    }

    /// The worker that owns `shard` when `count` workers share the work.
    pub fn owner(count: u32, shard: u32) -> u32 {
        shard % count.max(1)
    }

    /// Whether this worker owns `shard`.
    pub fn owns(&self, shard: u32) -> bool {
        Self::owner(self.count, shard) == self.index
    }

    pub fn is_single(&self) -> bool {
        self.count == 1
    }
}

/// What says that a unit is finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarkerKind {
    /// A shard's `part-NNNNN.stats.json`, written after its Parquet file, whose size it records.
    ShardStats,
    /// A [`DoneMarker`] in the ledger listing the files the unit produced.
    Done,
}

/// One unit of work: a shard index of its set and its finished marker (relative to the workdir).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedUnit {
    pub shard: u32,
    pub marker: String,
    pub kind: MarkerKind,
}

/// Every unit of one shard set, as every worker computes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetPlan {
    /// The set (`data/cc/train`).
    pub set: String,
    /// What the finished shards must record as their source (input digest and settings), so a
    /// shard left by another configuration does not count; empty when the marker carries none.
    pub source: String,
    pub units: Vec<PlannedUnit>,
}

/// The files one unit produced, relative to the workdir, with their sizes in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoneMarker {
    pub worker: u32,
    pub files: Vec<(String, u64)>,
}

/// How one worker's run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub index: u32,
    pub count: u32,
    /// `finished` or `failed`.
    pub outcome: String,
    /// The stage's summary, or the error.
    pub summary: String,
    pub seconds: f64,
    pub host: String,
    pub pid: u32,
}

/// The ledger of one job, `workers/<stage>-<digest>/` in the workdir (local or an object
/// store).
#[derive(Debug, Clone)]
pub struct Ledger {
    root: Root,
    /// The local directory beside the root (the files that done markers list are there).
    workdir: PathBuf,
    /// `workers/<stage>-<digest>`.
    rel: String,
}

/// A set's name as a file name: `data/cc/train` → `data--cc--train`.
fn file_stem(set: &str) -> String {
    set.replace('/', "--")
}

impl Ledger {
    /// The ledger of the job that runs `stage` with the configuration whose digest is `digest`,
    /// in `root` (beside the local directory `workdir`).
    pub fn new(root: &Root, workdir: &Path, stage: &str, digest: &str) -> Self {
        let short = &digest[..digest.len().min(12)];
        Self {
            root: root.clone(),
            workdir: workdir.to_path_buf(),
            rel: format!("workers/{stage}-{short}"),
        }
    }

    /// Where the ledger is, as a user finds it (a path or a URL).
    pub fn location(&self) -> String {
        self.root.display(&self.rel)
    }

    /// `workers/<stage>-<digest>`, relative to the workdir.
    pub fn rel(&self) -> &str {
        &self.rel
    }

    pub fn root(&self) -> &Root {
        &self.root
    }

    /// The local directory beside the root.
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    fn plan_key(&self, set: &str) -> String {
        format!("{}/plan/{}.json", self.rel, file_stem(set))
    }

    /// Where the done marker of `shard` of `set` goes, relative to the workdir.
    pub fn done_marker(&self, set: &str, shard: u32) -> String {
        format!("{}/done/{}/part-{shard:05}.json", self.rel, file_stem(set))
    }

    /// The JSON file `key`, parsed, or `None` when it is not there.
    pub fn read<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let Some(bytes) = self.root.read(key)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::BadFile {
                path: PathBuf::from(self.root.display(key)),
                message: e.to_string(),
            })
    }

    fn json<T: Serialize>(&self, key: &str, value: &T) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(value).map_err(|e| Error::BadFile {
            path: PathBuf::from(self.root.display(key)),
            message: e.to_string(),
        })
    }

    /// Records the plan of one set. The first worker creates the file; the others find it and
    /// check that theirs is the same (else their configurations or inputs differ).
    pub fn record_plan(&self, plan: &SetPlan) -> Result<()> {
        let key = self.plan_key(&plan.set);
        if self.root.put_new(&key, &self.json(&key, plan)?)? {
            return Ok(());
        }
        let theirs = self.read::<SetPlan>(&key)?;
        if theirs.as_ref() != Some(plan) {
            let (units, source) = theirs
                .map(|t| (t.units.len(), t.source))
                .unwrap_or_default();
            return Err(Error::Invalid(format!(
                "{}: another worker planned {units} unit(s) of {} from source `{source}`, this \
                 one {} from `{}`: the workers of one job must run the same configuration on the \
                 same inputs",
                self.root.display(&key),
                plan.set,
                plan.units.len(),
                plan.source
            )));
        }
        Ok(())
    }

    /// Every recorded set plan, by set name.
    pub fn plans(&self) -> Result<Vec<SetPlan>> {
        let dir = format!("{}/plan", self.rel);
        let mut out = Vec::new();
        for (name, _) in self.root.list(&dir)? {
            if name.ends_with(".json") {
                out.extend(self.read::<SetPlan>(&format!("{dir}/{name}"))?);
            }
        }
        out.sort_by(|a, b| a.set.cmp(&b.set));
        Ok(out)
    }

    /// Creates the done marker of `shard` of `set` listing `files` (local files beside the
    /// root) with their current sizes, if no marker is there yet.
    pub fn mark_done(&self, set: &str, shard: u32, worker: u32, files: &[PathBuf]) -> Result<()> {
        let key = self.done_marker(set, shard);
        let mut listed = Vec::with_capacity(files.len());
        for file in files {
            let len = std::fs::metadata(file).at(file)?.len();
            listed.push((relative(&self.workdir, file), len));
        }
        let marker = DoneMarker {
            worker,
            files: listed,
        };
        self.root.put_new(&key, &self.json(&key, &marker)?)?;
        Ok(())
    }

    /// Writes (replaces) the ledger's copy of the resolved configuration.
    pub fn record_config(&self, toml: &str) -> Result<()> {
        self.root
            .put(&format!("{}/config.toml", self.rel), toml.as_bytes())
    }

    /// Writes (replaces) the record of worker `record.index`; where it went.
    pub fn record_worker(&self, record: &WorkerRecord) -> Result<String> {
        let key = format!("{}/worker-{:05}.json", self.rel, record.index);
        self.root.put(&key, &self.json(&key, record)?)?;
        Ok(self.root.display(&key))
    }

    /// Every worker record there is, by index.
    pub fn workers(&self) -> Result<Vec<WorkerRecord>> {
        let mut out = Vec::new();
        for (name, _) in self.root.list(&self.rel)? {
            if name.starts_with("worker-") && name.ends_with(".json") {
                out.extend(self.read::<WorkerRecord>(&format!("{}/{name}", self.rel))?);
            }
        }
        out.sort_by_key(|r| r.index);
        Ok(out)
    }
}

/// What a stage needs to take part in a job array: which worker it is, and the ledger to
/// record its plan and finished units in (none for a single process on its own).
#[derive(Debug, Clone, Default)]
pub struct Sharding {
    pub workers: Workers,
    pub ledger: Option<Ledger>,
}

impl Sharding {
    /// Whether this process owns `shard` (a single process owns every shard).
    pub fn owns(&self, shard: u32) -> bool {
        self.workers.owns(shard)
    }

    /// Records the plan of a set of Parquet shards (`set`: `data/<dataset>/<split>`) whose shards
    /// `0..shards` are finished when their stats files exist; nothing for a single process.
    pub fn plan_shards(&self, set: &str, source: &str, shards: u32) -> Result<()> {
        let Some(ledger) = &self.ledger else {
            return Ok(());
        };
        let set = set.to_string();
        let units = (0..shards)
            .map(|shard| PlannedUnit {
                shard,
                marker: format!("{set}/part-{shard:05}.stats.json"),
                kind: MarkerKind::ShardStats,
            })
            .collect();
        ledger.record_plan(&SetPlan {
            set,
            source: source.to_string(),
            units,
        })
    }

    /// Records the plan of `set` whose units (`shards`) are finished when their done markers
    /// exist; nothing for a single process.
    pub fn plan_units(&self, set: &str, shards: &[u32]) -> Result<()> {
        let Some(ledger) = &self.ledger else {
            return Ok(());
        };
        let units = shards
            .iter()
            .map(|&shard| PlannedUnit {
                shard,
                marker: ledger.done_marker(set, shard),
                kind: MarkerKind::Done,
            })
            .collect();
        ledger.record_plan(&SetPlan {
            set: set.to_string(),
            source: String::new(),
            units,
        })
    }

    /// Marks `shard` of `set` done with the files it produced; nothing for a single process.
    pub fn mark_done(&self, set: &str, shard: u32, files: &[PathBuf]) -> Result<()> {
        match &self.ledger {
            Some(ledger) => ledger.mark_done(set, shard, self.workers.index, files),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shard_has_exactly_one_owner_for_any_worker_count() {
        for count in 1..=8u32 {
            let workers: Vec<Workers> = (0..count)
                .map(|i| Workers::new(count, i, "--worker-index").unwrap())
                .collect();
            for shard in 0..100u32 {
                let owners: Vec<u32> = workers
                    .iter()
                    .filter(|w| w.owns(shard))
                    .map(|w| w.index)
                    .collect();
                assert_eq!(owners, vec![shard % count], "N={count} shard {shard}");
                assert_eq!(Workers::owner(count, shard), shard % count);
            }
        }
    }

    #[test]
    fn a_worker_owns_the_same_shards_whatever_the_others_did() {
        // Worker 1 of 3 owns 1, 4, 7, ...: its share is a function of (N, index) only.
        let w = Workers::new(3, 1, "--worker-index").unwrap();
        let mine: Vec<u32> = (0..10).filter(|&s| w.owns(s)).collect();
        assert_eq!(mine, vec![1, 4, 7]);
    }

    #[test]
    fn out_of_range_indices_and_zero_workers_are_refused_naming_the_source() {
        let e = Workers::new(4, 4, "SLURM_ARRAY_TASK_ID")
            .unwrap_err()
            .to_string();
        assert!(e.contains("SLURM_ARRAY_TASK_ID is 4"), "{e}");
        assert!(e.contains("--array=0-3"), "{e}");
        let e = Workers::new(0, 0, "--worker-index")
            .unwrap_err()
            .to_string();
        assert!(e.contains("--num-workers is 0"), "{e}");
    }

    #[test]
    fn plans_must_agree_and_done_markers_are_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::Local(dir.path().to_path_buf());
        let ledger = Ledger::new(&root, dir.path(), "ingest", "0123456789abcdef");
        let sharding = Sharding {
            workers: Workers::new(2, 1, "--worker-index").unwrap(),
            ledger: Some(ledger.clone()),
        };
        let set = "data/cc/train";
        sharding.plan_shards(set, "tsv@abc", 3).unwrap();
        // A second worker with the same plan: fine. Another source: refused, naming both.
        sharding.plan_shards(set, "tsv@abc", 3).unwrap();
        let e = sharding
            .plan_shards(set, "tsv@def", 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tsv@abc") && e.contains("tsv@def"), "{e}");
        let plans = ledger.plans().unwrap();
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].set, "data/cc/train");
        assert_eq!(
            plans[0].units[2].marker,
            "data/cc/train/part-00002.stats.json"
        );

        let out = dir.path().join("cache/x.arrow");
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        std::fs::write(&out, b"12345").unwrap();
        sharding
            .mark_done("data/syn/val", 3, std::slice::from_ref(&out))
            .unwrap();
        let marker_path = dir.path().join(ledger.done_marker("data/syn/val", 3));
        let marker: DoneMarker = crate::io::read_json(&marker_path).unwrap();
        assert_eq!(marker.files, vec![("cache/x.arrow".to_string(), 5)]);
        assert_eq!(marker.worker, 1);
        // Created only if absent: a second claim leaves the first marker as it was.
        std::fs::write(&out, b"1234567").unwrap();
        sharding.mark_done("data/syn/val", 3, &[out]).unwrap();
        let again: DoneMarker = crate::io::read_json(&marker_path).unwrap();
        assert_eq!(again, marker);
    }
}
