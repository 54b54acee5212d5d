//! `pipeline report` (and the `report` stage): the standard analysis of every run under
//! `runs/`, with polars — the one module that speaks polars.
//!
//! Reads all `runs/*/metrics.parquet` and `runs/*/scores_summary.parquet`, and writes to
//! `<out>/`: `training.parquet`/`.csv` (per run and training stage: steps, final and best
//! validation loss, final train loss, skipped non-finite batches), `preference.parquet`/`.csv`
//! (per run, preference stage and pair source: held-out pairs, accuracy and margin),
//! `scores.parquet`/`.csv`
//! (per run, model and decoding method: one column per metric), and one PNG of train/val loss
//! curves per run and stage. The tables are printed too.

pub mod chart;

use std::fs::File;
use std::path::{Path, PathBuf};

use polars::prelude::*;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::io::AtomicFile;
use crate::stages::report::chart::{line_chart, Series};
use crate::stages::{Stage, StageContext};

fn perr(context: impl std::fmt::Display) -> impl FnOnce(PolarsError) -> Error {
    move |e| Error::Config(format!("report: {context}: {e}"))
}

/// Files named `name` directly inside each run directory.
fn run_files(workdir: &Path, name: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(workdir.join("runs"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join(name))
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// All files stacked into one frame (they share a schema).
fn read_all(files: &[PathBuf]) -> Result<Option<DataFrame>> {
    let mut all: Option<DataFrame> = None;
    for f in files {
        let file = File::open(f).at(f)?;
        let df = ParquetReader::new(file)
            .finish()
            .map_err(perr(f.display()))?;
        all = Some(match all {
            None => df,
            Some(mut a) => {
                a.vstack_mut(&df).map_err(perr(f.display()))?;
                a
            }
        });
    }
    Ok(all)
}

/// What `report` produced.
#[derive(Debug, Clone, Default)]
pub struct ReportSummary {
    pub training: Option<DataFrame>,
    /// Held-out preference accuracy per pair source (when a preference stage ran).
    pub preference: Option<DataFrame>,
    pub scores: Option<DataFrame>,
    pub charts: Vec<PathBuf>,
}

/// `<out>/<name>.parquet` and `.csv`, each written atomically.
fn write_table(df: &mut DataFrame, out: &Path, name: &str) -> Result<()> {
    let pq = out.join(format!("{name}.parquet"));
    let mut file = AtomicFile::create(&pq)?;
    ParquetWriter::new(&mut file)
        .finish(df)
        .map_err(perr(pq.display()))?;
    file.commit()?;
    let csv = out.join(format!("{name}.csv"));
    let mut file = AtomicFile::create(&csv)?;
    CsvWriter::new(&mut file)
        .finish(df)
        .map_err(perr(csv.display()))?;
    file.commit()
}

fn only_val(metrics: &DataFrame) -> LazyFrame {
    metrics
        .clone()
        .lazy()
        .filter(col("split").eq(lit("val")).and(col("name").eq(lit("loss"))))
}

/// Per run and stage: optimizer steps, final/best validation loss, final train loss, skipped
/// batches.
pub fn training_table(metrics: DataFrame) -> Result<DataFrame> {
    let by = [col("run_id"), col("stage")];
    let last_by_step = |e: Expr| {
        e.sort_by([col("step")], SortMultipleOptions::default())
            .last()
    };
    let val = only_val(&metrics).group_by(by.clone()).agg([
        last_by_step(col("value")).alias("final_val_loss"),
        col("value").min().alias("best_val_loss"),
        col("step")
            .sort_by([col("value")], SortMultipleOptions::default())
            .first()
            .alias("best_step"),
    ]);
    let only = |split: &str, name: &str| {
        metrics
            .clone()
            .lazy()
            .filter(col("split").eq(lit(split)).and(col("name").eq(lit(name))))
    };
    let train = only("train", "loss").group_by(by.clone()).agg([
        col("step").max().alias("steps"),
        col("epoch").max().alias("epochs"),
        last_by_step(col("value")).alias("final_train_loss"),
    ]);
    let skipped = only("train", "skipped_nonfinite_batches")
        .group_by(by)
        .agg([col("value").max().alias("skipped_nonfinite_batches")]);
    let keys = || [col("run_id"), col("stage")];
    train
        .join(val, keys(), keys(), JoinArgs::new(JoinType::Left))
        .join(skipped, keys(), keys(), JoinArgs::new(JoinType::Left))
        .sort(["run_id", "stage"], SortMultipleOptions::default())
        .collect()
        .map_err(perr("training table"))
}

/// Per run, preference stage and pair source: held-out pairs, `rewards/accuracies` and
/// `rewards/margins` of the selected checkpoint (the `by_source/<source>/...` metrics).
pub fn preference_table(metrics: &DataFrame) -> Result<Option<DataFrame>> {
    let val = metrics
        .clone()
        .lazy()
        .filter(col("split").eq(lit("val")))
        .collect()
        .map_err(perr("preference table"))?;
    let text = |name: &str| -> Result<Vec<String>> {
        let c = val.column(name).map_err(perr("preference table"))?;
        let c = c.str().map_err(perr("preference table"))?;
        Ok((0..c.len())
            .map(|i| c.get(i).unwrap_or_default().to_string())
            .collect())
    };
    let (runs, stages, names) = (text("run_id")?, text("stage")?, text("name")?);
    let values = val.column("value").map_err(perr("preference table"))?;
    let values = values.f64().map_err(perr("preference table"))?;
    let values: Vec<f64> = (0..values.len())
        .map(|i| values.get(i).unwrap_or(f64::NAN))
        .collect();
    let mut table: std::collections::BTreeMap<(String, String, String), [f64; 3]> =
        Default::default();
    for i in 0..names.len() {
        let Some(rest) = names[i].strip_prefix("by_source/") else {
            continue;
        };
        let found = ["/pairs", "/rewards/accuracies", "/rewards/margins"]
            .iter()
            .enumerate()
            .find_map(|(j, m)| rest.strip_suffix(m).map(|source| (j, source)));
        if let Some((j, source)) = found {
            let key = (runs[i].clone(), stages[i].clone(), source.to_string());
            table.entry(key).or_insert([f64::NAN; 3])[j] = values[i];
        }
    }
    if table.is_empty() {
        return Ok(None);
    }
    let column = |j: usize| table.values().map(|v| v[j]).collect::<Vec<f64>>();
    let key = |f: fn(&(String, String, String)) -> &String| {
        table.keys().map(|k| f(k).clone()).collect::<Vec<String>>()
    };
    df!(
        "run_id" => key(|k| &k.0),
        "stage" => key(|k| &k.1),
        "source" => key(|k| &k.2),
        "pairs" => column(0),
        "rewards/accuracies" => column(1),
        "rewards/margins" => column(2),
    )
    .map(Some)
    .map_err(perr("preference table"))
}

/// Per run, model and method: one column per metric.
pub fn scores_table(summary: DataFrame) -> Result<DataFrame> {
    let metrics = [
        "Bleu_1",
        "Bleu_4",
        "METEOR",
        "ROUGE_L",
        "CIDEr",
        "CLIPScore",
        "RefCLIPScore",
        "attribute_accuracy",
    ];
    let aggs: Vec<Expr> = metrics
        .iter()
        .map(|m| {
            col("value")
                .filter(col("metric").eq(lit(*m)))
                .first()
                .alias(*m)
        })
        .collect();
    summary
        .lazy()
        .group_by([col("run_id"), col("model"), col("method")])
        .agg(aggs)
        .sort(
            ["run_id", "model", "method"],
            SortMultipleOptions::default(),
        )
        .collect()
        .map_err(perr("scores table"))
}

/// Train and validation loss curves of every (run, stage), as PNGs in `out`.
fn charts(metrics: &DataFrame, out: &Path) -> Result<Vec<PathBuf>> {
    let pairs = metrics
        .clone()
        .lazy()
        .select([col("run_id"), col("stage")])
        .unique(None, UniqueKeepStrategy::First)
        .sort(["run_id", "stage"], SortMultipleOptions::default())
        .collect()
        .map_err(perr("charts"))?;
    let runs = pairs
        .column("run_id")
        .map_err(perr("charts"))?
        .str()
        .map_err(perr("charts"))?
        .clone();
    let stages = pairs
        .column("stage")
        .map_err(perr("charts"))?
        .str()
        .map_err(perr("charts"))?
        .clone();
    let mut written = Vec::new();
    for (run, stage) in runs.iter().zip(stages.iter()) {
        let (Some(run), Some(stage)) = (run, stage) else {
            continue;
        };
        let curve = |split: &str| -> Result<Vec<(f64, f64)>> {
            let df = metrics
                .clone()
                .lazy()
                .filter(
                    col("run_id")
                        .eq(lit(run))
                        .and(col("stage").eq(lit(stage)))
                        .and(col("split").eq(lit(split)))
                        .and(col("name").eq(lit("loss"))),
                )
                .sort(["step"], SortMultipleOptions::default())
                .collect()
                .map_err(perr("charts"))?;
            let steps = df
                .column("step")
                .map_err(perr("charts"))?
                .i64()
                .map_err(perr("charts"))?
                .clone();
            let values = df
                .column("value")
                .map_err(perr("charts"))?
                .f64()
                .map_err(perr("charts"))?
                .clone();
            Ok(steps
                .iter()
                .zip(values.iter())
                .filter_map(|(s, v)| Some((s? as f64, v?)))
                .collect())
        };
        let series = vec![
            Series {
                name: "train loss".into(),
                points: curve("train")?,
            },
            Series {
                name: "val loss".into(),
                points: curve("val")?,
            },
        ];
        let path = out.join(format!("curves-{run}-{stage}.png"));
        line_chart(&path, &format!("{stage} loss"), "step", &series)?;
        written.push(path);
    }
    Ok(written)
}

/// Builds the report of every run under `workdir` into `out`.
pub fn report(workdir: &Path, out: &Path) -> Result<ReportSummary> {
    std::fs::create_dir_all(out).at(out)?;
    let mut summary = ReportSummary::default();
    if let Some(metrics) = read_all(&run_files(workdir, "metrics.parquet"))? {
        let mut t = training_table(metrics.clone())?;
        write_table(&mut t, out, "training")?;
        summary.charts = charts(&metrics, out)?;
        summary.training = Some(t);
        if let Some(mut t) = preference_table(&metrics)? {
            write_table(&mut t, out, "preference")?;
            summary.preference = Some(t);
        }
    }
    if let Some(scores) = read_all(&run_files(workdir, "scores_summary.parquet"))? {
        let mut t = scores_table(scores)?;
        write_table(&mut t, out, "scores")?;
        summary.scores = Some(t);
    }
    if summary.training.is_none() && summary.scores.is_none() {
        return Err(Error::Config(format!(
            "report: no runs/*/metrics.parquet or scores_summary.parquet under {}; run a training or score stage first",
            workdir.display()
        )));
    }
    Ok(summary)
}

/// `[report]`: the report stage has no settings yet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {}

/// What the report stage wrote: its tables as text, and where.
#[derive(Debug, Clone, Serialize)]
pub struct ReportText {
    pub text: String,
}

impl std::fmt::Display for ReportText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.text)
    }
}

/// `pipeline run report`: writes into `runs/<id>/report/`.
pub struct Report;

impl Stage for Report {
    const NAME: &'static str = "report";
    const DESCRIPTION: &'static str = "per-run summary tables and train/val curves";
    const USES_GPU: bool = false;
    const SECTION: &'static str = "report";
    type Config = ReportConfig;
    type Summary = ReportText;

    fn run(_cfg: &ReportConfig, ctx: &StageContext) -> Result<ReportText> {
        let out = ctx.run_dir.join("report");
        let s = report(&ctx.workdir, &out)?;
        let mut text = String::new();
        if let Some(t) = &s.training {
            text.push_str(&format!("training:\n{t}\n"));
        }
        if let Some(t) = &s.preference {
            text.push_str(&format!("preference pairs by source (val):\n{t}\n"));
        }
        if let Some(t) = &s.scores {
            text.push_str(&format!("scores:\n{t}\n"));
        }
        text.push_str(&format!(
            "{} chart(s) and the tables (Parquet + CSV) in {}",
            s.charts.len(),
            out.display()
        ));
        Ok(ReportText { text })
    }
}
