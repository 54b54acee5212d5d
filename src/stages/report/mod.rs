//! `pipeline report` (and the `report` stage): the standard analysis of every run under
//! `runs/`, with polars — the one module that speaks polars.
//!
//! Reads all `runs/*/metrics.parquet` and `runs/*/scores_summary.parquet`, and writes to
//! `<out>/`: `training.parquet`/`.csv` (per run and training stage: steps, final and best
//! validation loss, final train loss, skipped non-finite batches), `preference.parquet`/`.csv`
//! (per run, preference stage and pair source: held-out pairs, accuracy and margin),
//! `retrieval.parquet`/`.csv` (per run, contrastive stage and encoder: held-out recall both
//! ways, the trained encoder beside its baselines and chance), `online.parquet`/`.csv` (per
//! run and online stage, DiCO, SCST or RLHF: held-out CLIPScore, RefCLIPScore, CIDEr-D and attribute
//! accuracy of the starting model and the selected checkpoint, the training reward, the
//! share of distinct candidates), `scores.parquet`/`.csv` (per run, model and decoding
//! method: the captioner's conditioning, one column per metric), one PNG of train/val loss
//! curves per run and stage, and one of reward curves per online stage. The tables are
//! printed too.

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
    /// Held-out metrics of online stages (DiCO, SCST, RLHF) before and after, with their rewards.
    pub online: Option<DataFrame>,
    pub scores: Option<DataFrame>,
    pub charts: Vec<PathBuf>,
}

impl ReportSummary {
    /// Every table, titled, and where the files went (`out`): what the run log and
    /// `pipeline report` print.
    pub fn text(&self, out: &Path) -> String {
        let mut text = String::new();
        for (title, t) in [
            ("training", &self.training),
            ("preference pairs by source (val)", &self.preference),
            ("retrieval (val)", &self.retrieval),
            ("online stages (val, greedy)", &self.online),
            ("scores", &self.scores),
        ] {
            if let Some(t) = t {
                text.push_str(&format!("{title}:\n{t}\n"));
            }
        }
        text.push_str(&format!(
            "{} chart(s) and the tables (Parquet + CSV) in {}",
            self.charts.len(),
            out.display()
        ));
        text
    }
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
/// `rewards/margins` of the selected checkpoint (the `by_source/<source>/...` metrics; for a
/// reward model, its `accuracy` per source at its last validation).
pub fn preference_table(metrics: &DataFrame) -> Result<Option<DataFrame>> {
    let mut table: std::collections::BTreeMap<(String, String, String), [f64; 3]> =
        Default::default();
    for r in val_rows(metrics, "preference table")? {
        let Some(rest) = r.name.strip_prefix("by_source/") else {
            continue;
        };
        // Column of each suffix; a reward model logs its held-out accuracy per source as
        // `.../accuracy`.
        let found = [
            ("/pairs", 0),
            ("/rewards/accuracies", 1),
            ("/rewards/margins", 2),
            ("/accuracy", 1),
        ]
        .iter()
        .find_map(|(m, j)| rest.strip_suffix(m).map(|source| (*j, source)));
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
    split_rows(metrics, "val", what)
}

/// The rows of `split` in `metrics`, in table order.
fn split_rows(metrics: &DataFrame, split: &str, what: &str) -> Result<Vec<ValRow>> {
    let val = metrics
        .clone()
        .lazy()
        .filter(col("split").eq(lit(split)))
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

/// Per run and online stage (`train-dico`, `train-scst` and their named steps): the greedy
/// held-out metrics of the starting model (validated at step 0) and of the selected
/// checkpoint (`best_step` from the stage's `last/state.json`, else its last validation),
/// the training reward of the first and last logged steps, RLHF's KL to its reference at
/// the last logged step (`kl_last`; NaN for the others), and the share of distinct captions
/// among each image's candidates or samples over the run.
pub fn online_table(workdir: &Path, metrics: &DataFrame) -> Result<Option<DataFrame>> {
    const METRICS: [&str; 4] = ["CLIPScore", "RefCLIPScore", "CIDEr", "attribute_accuracy"];
    let rows = val_rows(metrics, "online table")?;
    type Key = (String, String);
    let mut last: std::collections::BTreeMap<Key, i64> = Default::default();
    for r in rows.iter().filter(|r| r.name == "val/RefCLIPScore") {
        let e = last
            .entry((r.run_id.clone(), r.stage.clone()))
            .or_insert(r.step);
        *e = (*e).max(r.step);
    }
    if last.is_empty() {
        return Ok(None);
    }
    let best: std::collections::BTreeMap<Key, i64> = last
        .iter()
        .map(|(k, &l)| {
            let state = workdir
                .join("runs")
                .join(&k.0)
                .join(&k.1)
                .join("last/state.json");
            let step = crate::io::read_json::<serde_json::Value>(&state)
                .ok()
                .and_then(|s| s["best_step"].as_i64())
                .unwrap_or(l);
            (k.clone(), step)
        })
        .collect();
    let value = |k: &Key, step: i64, name: &str| {
        rows.iter()
            .find(|r| r.run_id == k.0 && r.stage == k.1 && r.step == step && r.name == name)
            .map_or(f64::NAN, |r| r.value)
    };
    let train_rows = split_rows(metrics, "train", "online table")?;
    let train = |name: &str| -> Result<Vec<(String, String, i64, f64)>> {
        let mut v: Vec<(String, String, i64, f64)> = train_rows
            .iter()
            .filter(|r| r.name == name)
            .map(|r| (r.run_id.clone(), r.stage.clone(), r.step, r.value))
            .collect();
        v.sort_by_key(|r| r.2);
        Ok(v)
    };
    // The online stages' training reward: DiCO's and SCST's mean candidate reward, RLHF's
    // shaped reward (TRL's `reward`).
    let mut rewards = train("reward/mean")?;
    rewards.extend(train("reward")?);
    rewards.sort_by_key(|r| r.2);
    let kl = train("kl")?;
    let mut distinct = train("candidates/distinct")?;
    distinct.extend(train("samples/distinct")?);
    let keys: Vec<&Key> = best.keys().collect();
    let of = |k: &Key, v: &[(String, String, i64, f64)]| -> Vec<f64> {
        v.iter()
            .filter(|r| r.0 == k.0 && r.1 == k.1 && r.3.is_finite())
            .map(|r| r.3)
            .collect()
    };
    let mut cols = vec![
        Column::new(
            "run_id".into(),
            keys.iter().map(|k| k.0.clone()).collect::<Vec<_>>(),
        ),
        Column::new(
            "stage".into(),
            keys.iter().map(|k| k.1.clone()).collect::<Vec<_>>(),
        ),
        Column::new(
            "best_step".into(),
            keys.iter().map(|k| best[*k]).collect::<Vec<_>>(),
        ),
    ];
    for m in METRICS {
        let name = format!("val/{m}");
        cols.push(Column::new(
            format!("{m}_init").into(),
            keys.iter().map(|k| value(k, 0, &name)).collect::<Vec<_>>(),
        ));
        cols.push(Column::new(
            m.into(),
            keys.iter()
                .map(|k| value(k, best[*k], &name))
                .collect::<Vec<_>>(),
        ));
    }
    let ends = |first: bool| -> Vec<f64> {
        keys.iter()
            .map(|k| {
                let v = of(k, &rewards);
                let got = if first { v.first() } else { v.last() };
                got.copied().unwrap_or(f64::NAN)
            })
            .collect()
    };
    cols.push(Column::new("reward_first".into(), ends(true)));
    cols.push(Column::new("reward_last".into(), ends(false)));
    cols.push(Column::new(
        "kl_last".into(),
        keys.iter()
            .map(|k| of(k, &kl).last().copied().unwrap_or(f64::NAN))
            .collect::<Vec<_>>(),
    ));
    cols.push(Column::new(
        "distinct".into(),
        keys.iter()
            .map(|k| crate::metrics::mean(of(k, &distinct).into_iter()))
            .collect::<Vec<_>>(),
    ));
    DataFrame::new(keys.len(), cols)
        .map(Some)
        .map_err(perr("online table"))
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

/// The `(step, value)` points of metric `name` in `split` of one run's stage, by step.
fn curve(
    metrics: &DataFrame,
    run: &str,
    stage: &str,
    split: &str,
    name: &str,
) -> Result<Vec<(f64, f64)>> {
    let df = metrics
        .clone()
        .lazy()
        .filter(
            col("run_id")
                .eq(lit(run))
                .and(col("stage").eq(lit(stage)))
                .and(col("split").eq(lit(split)))
                .and(col("name").eq(lit(name))),
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
        .filter(|(_, v)| v.is_finite())
        .collect())
}

/// Train and validation loss curves of every (run, stage), and the reward curves of the
/// online stages (training reward of the candidates, samples or RLHF rollouts, of DiCO's
/// winner or SCST's greedy baseline, RLHF's KL, and held-out CLIPScore and RefCLIPScore on
/// the same axes, so a reward that climbs while the held-out metrics do not shows), as PNGs
/// in `out`.
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
        let series = |specs: &[(&str, &str, &str)]| -> Result<Vec<Series>> {
            specs
                .iter()
                .map(|(label, split, name)| {
                    Ok(Series {
                        name: (*label).into(),
                        points: curve(metrics, run, stage, split, name)?,
                    })
                })
                .collect()
        };
        let loss = series(&[("train loss", "train", "loss"), ("val loss", "val", "loss")])?;
        if loss.iter().any(|s| !s.points.is_empty()) {
            let path = out.join(format!("curves-{run}-{stage}.png"));
            line_chart(&path, &format!("{stage} loss"), "step", &loss)?;
            written.push(path);
        }
        let rewards = series(&[
            ("train reward", "train", "reward/mean"),
            ("train reward", "train", "reward"),
            ("train winner", "train", "reward/winner"),
            ("train greedy", "train", "reward/greedy"),
            ("train KL", "train", "kl"),
            ("val CLIPScore", "val", "val/CLIPScore"),
            ("val RefCLIPScore", "val", "val/RefCLIPScore"),
        ])?;
        if !(rewards[0].points.is_empty() && rewards[1].points.is_empty()) {
            let rewards: Vec<Series> = rewards
                .into_iter()
                .filter(|s| !s.points.is_empty())
                .collect();
            let path = out.join(format!("rewards-{run}-{stage}.png"));
            line_chart(&path, &format!("{stage} reward"), "step", &rewards)?;
            written.push(path);
        }
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
        if let Some(mut t) = online_table(workdir, &metrics)? {
            write_table(&mut t, out, "online")?;
            summary.online = Some(t);
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
        let text = s.text(&out);
        Ok(ReportText { text })
    }
}
