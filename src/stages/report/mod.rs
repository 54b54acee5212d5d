//! `pipeline report` (and the `report` stage): the standard analysis of every run under
//! `runs/`, with polars — the one module that speaks polars.
//!
//! Reads all `runs/*/metrics.parquet` and `runs/*/scores_summary.parquet`, and writes to
//! `<out>/`: `training.parquet`/`.csv` (per run and training stage: steps, final and best
//! validation loss, final train loss, skipped non-finite batches), `preference.parquet`/`.csv`
//! (per run, preference stage and pair source: held-out pairs, accuracy and margin),
//! `retrieval.parquet`/`.csv` (per run, contrastive stage and encoder: held-out recall both
//! ways, the trained encoder beside its baselines and chance), `scores.parquet`/`.csv` (per
//! run, model and decoding method: the captioner's conditioning, one column per metric), and
//! one PNG of train/val loss curves per run and stage. The tables are printed too.

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
    /// Held-out retrieval recall of contrastive stages and their baselines.
    pub retrieval: Option<DataFrame>,
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
    let mut table: std::collections::BTreeMap<(String, String, String), [f64; 3]> =
        Default::default();
    for r in val_rows(metrics, "preference table")? {
        let Some(rest) = r.name.strip_prefix("by_source/") else {
            continue;
        };
        let found = ["/pairs", "/rewards/accuracies", "/rewards/margins"]
            .iter()
            .enumerate()
            .find_map(|(j, m)| rest.strip_suffix(m).map(|source| (j, source)));
        if let Some((j, source)) = found {
            let key = (r.run_id.clone(), r.stage.clone(), source.to_string());
            table.entry(key).or_insert([f64::NAN; 3])[j] = r.value;
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

/// One validation row of a metrics table.
struct ValRow {
    run_id: String,
    stage: String,
    step: i64,
    name: String,
    value: f64,
}

/// The validation rows of `metrics`, in table order.
fn val_rows(metrics: &DataFrame, what: &str) -> Result<Vec<ValRow>> {
    let val = metrics
        .clone()
        .lazy()
        .filter(col("split").eq(lit("val")))
        .collect()
        .map_err(perr(what))?;
    let text = |name: &str| -> Result<Vec<String>> {
        let c = val.column(name).map_err(perr(what))?;
        let c = c.str().map_err(perr(what))?;
        Ok((0..c.len())
            .map(|i| c.get(i).unwrap_or_default().to_string())
            .collect())
    };
    let (runs, stages, names) = (text("run_id")?, text("stage")?, text("name")?);
    let steps = val.column("step").map_err(perr(what))?;
    let steps = steps.i64().map_err(perr(what))?;
    let values = val.column("value").map_err(perr(what))?;
    let values = values.f64().map_err(perr(what))?;
    Ok((0..names.len())
        .map(|i| ValRow {
            run_id: runs[i].clone(),
            stage: stages[i].clone(),
            step: steps.get(i).unwrap_or(0),
            name: names[i].clone(),
            value: values.get(i).unwrap_or(f64::NAN),
        })
        .collect())
}

/// Per run, contrastive stage and encoder: held-out retrieval recall both ways. The trained
/// encoder at its best checkpoint (lowest validation loss; `retrieval/<k>`), and beside it
/// every baseline the stage logged on the same pairs (`retrieval/<baseline>/<k>`, such as
/// the frozen CLIP text tower), with the chance level.
pub fn retrieval_table(metrics: &DataFrame) -> Result<Option<DataFrame>> {
    const COLUMNS: [&str; 6] = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"];
    let rows = val_rows(metrics, "retrieval table")?;
    let mut best: std::collections::BTreeMap<(String, String), (f64, i64)> = Default::default();
    for r in &rows {
        if r.name == "loss" && r.value.is_finite() {
            let e = best
                .entry((r.run_id.clone(), r.stage.clone()))
                .or_insert((r.value, r.step));
            if r.value < e.0 {
                *e = (r.value, r.step);
            }
        }
    }
    type Key = (String, String, String);
    let mut table: std::collections::BTreeMap<Key, [f64; 7]> = Default::default();
    for r in &rows {
        let Some(rest) = r.name.strip_prefix("retrieval/") else {
            continue;
        };
        let (encoder, metric) = match rest.split_once('/') {
            Some((baseline, metric)) => (baseline.to_string(), metric),
            None => {
                let Some((_, at)) = best.get(&(r.run_id.clone(), r.stage.clone())) else {
                    continue;
                };
                if r.step != *at {
                    continue;
                }
                (format!("{} (step {at})", r.stage), rest)
            }
        };
        let key = (r.run_id.clone(), r.stage.clone(), encoder);
        let entry = table.entry(key).or_insert([f64::NAN; 7]);
        if let Some(j) = COLUMNS.iter().position(|c| *c == metric) {
            entry[j] = r.value;
        } else if metric == "chance_r1" {
            entry[6] = r.value;
        }
    }
    // The chance level belongs to the pairs, not the encoder: every row of a stage shows it.
    let chance: std::collections::BTreeMap<(String, String), f64> = table
        .iter()
        .filter(|(_, v)| v[6].is_finite())
        .map(|((r, s, _), v)| ((r.clone(), s.clone()), v[6]))
        .collect();
    for ((r, s, _), v) in table.iter_mut() {
        v[6] = chance
            .get(&(r.clone(), s.clone()))
            .copied()
            .unwrap_or(f64::NAN);
    }
    if table.is_empty() {
        return Ok(None);
    }
    let column = |j: usize| table.values().map(|v| v[j]).collect::<Vec<f64>>();
    let key = |f: fn(&Key) -> &String| table.keys().map(|k| f(k).clone()).collect::<Vec<_>>();
    let mut cols = vec![
        Column::new("run_id".into(), key(|k| &k.0)),
        Column::new("stage".into(), key(|k| &k.1)),
        Column::new("encoder".into(), key(|k| &k.2)),
    ];
    for (j, name) in COLUMNS.iter().enumerate() {
        cols.push(Column::new((*name).into(), column(j)));
    }
    cols.push(Column::new("chance_r1".into(), column(6)));
    DataFrame::new(table.len(), cols)
        .map(Some)
        .map_err(perr("retrieval table"))
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
        "BERTScore_F1",
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

/// How the captioner behind `model` in run `run_id` conditions on the image, from the
/// `captioner.json` of that run's checkpoint (an `untrained` baseline: of the run's
/// `train-sft`): `prefix`, `cross_attention (clip tokens)`, `cross_attention (contrastive)`;
/// empty when the run does not hold it.
fn captioner_label(workdir: &Path, run_id: &str, model: &str) -> String {
    let stage = if model == "untrained" {
        "train-sft"
    } else {
        model
    };
    let path = workdir
        .join("runs")
        .join(run_id)
        .join(stage)
        .join("captioner.json");
    let Ok(m) = crate::io::read_json::<serde_json::Value>(&path) else {
        return String::new();
    };
    let c = &m["captioner"];
    match c["conditioning"].as_str().unwrap_or("prefix") {
        "cross_attention" => {
            let encoder = c["image_encoder"].as_str().unwrap_or("clip");
            let tokens = m["image_tokens"].as_u64().unwrap_or(0);
            if encoder == "clip" && tokens == 0 {
                "cross_attention (clip pooled)".into()
            } else if encoder == "clip" {
                format!("cross_attention (clip, {tokens} tokens)")
            } else {
                format!("cross_attention ({encoder})")
            }
        }
        other => other.to_string(),
    }
}

/// `table` with a `captioner` column after `model` ([`captioner_label`]), so prefix and
/// cross-attention captioners read side by side.
fn with_captioner(workdir: &Path, mut table: DataFrame) -> Result<DataFrame> {
    let text = |name: &str| -> Result<Vec<String>> {
        let c = table.column(name).map_err(perr("scores table"))?;
        let c = c.str().map_err(perr("scores table"))?;
        Ok((0..c.len())
            .map(|i| c.get(i).unwrap_or_default().to_string())
            .collect())
    };
    let (runs, models) = (text("run_id")?, text("model")?);
    let labels: Vec<String> = runs
        .iter()
        .zip(&models)
        .map(|(r, m)| captioner_label(workdir, r, m))
        .collect();
    table
        .insert_column(2, Column::new("captioner".into(), labels))
        .map_err(perr("scores table"))?;
    Ok(table)
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
        if let Some(mut t) = retrieval_table(&metrics)? {
            write_table(&mut t, out, "retrieval")?;
            summary.retrieval = Some(t);
        }
    }
    if let Some(scores) = read_all(&run_files(workdir, "scores_summary.parquet"))? {
        let mut t = with_captioner(workdir, scores_table(scores)?)?;
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
        if let Some(t) = &s.retrieval {
            text.push_str(&format!("retrieval (val):\n{t}\n"));
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
