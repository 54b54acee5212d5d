//! `pipeline report` (and the `report` stage): the standard analysis of runs under `runs/`,
//! with polars — the one module that speaks polars.
//!
//! Reads `runs/*/metrics.parquet`, `scores_summary.parquet`, `generations.parquet` and
//! `scores.parquet` of the runs it is given (the report stage: its own run; `pipeline report`:
//! every run, or those of `--runs`), and writes to `<out>/`: `training.parquet`/`.csv` (per
//! run and training stage: steps, final and best validation loss, final train loss, skipped
//! non-finite batches), `preference.parquet`/`.csv` (per run, preference stage and pair
//! source: held-out pairs, accuracy and margin), `retrieval.parquet`/`.csv` (per run,
//! contrastive stage and encoder: held-out recall both ways, the trained encoder beside its
//! baselines and chance), `online.parquet`/`.csv` (per run and online stage, DiCO, SCST or
//! RLHF: held-out CLIPScore, RefCLIPScore, CIDEr-D and attribute accuracy of the starting
//! model and the selected checkpoint, the training reward, the share of distinct candidates),
//! `story.parquet`/`.csv` (per run and story step: held-out caption NLL, the predicted next
//! image's cosine and MSE, the discriminator's accuracy and the adversarial reward of GAN
//! variants), `scores.parquet`/`.csv` (per run, model and decoding method: the captioner's conditioning,
//! one column per metric); charts as PNG and SVG (one per training step and metric family:
//! loss, preference, retrieval, rewards, story, adversarial; one bar chart of the models' headline scores); and
//! `index.html`, one self-contained page with all of it and a gallery of held-out images
//! with every model's caption. The tables are printed too, 100 columns wide.

pub mod chart;
pub mod gallery;
pub mod html;
pub mod table;

use std::fs::File;
use std::path::{Path, PathBuf};

use polars::prelude::*;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::io::AtomicFile;
use crate::stages::report::chart::{bar_chart, line_chart, shaded, Bar, Chart, Panel, Series};
use crate::stages::report::html::{ChartFile, RunSummary};
use crate::stages::report::table::{Table, TERMINAL_WIDTH};
use crate::stages::{Stage, StageContext};

fn perr(context: impl std::fmt::Display) -> impl FnOnce(PolarsError) -> Error {
    move |e| Error::Config(format!("report: {context}: {e}"))
}

/// Every run under `workdir/runs`, oldest first.
pub fn all_runs(workdir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(workdir.join("runs"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort_by_key(|r| (crate::stages::context::run_started(r), r.clone()));
    out
}

/// Files named `name` directly inside each of `runs`' directories.
fn run_files(workdir: &Path, runs: &[String], name: &str) -> Vec<PathBuf> {
    runs.iter()
        .map(|r| workdir.join("runs").join(r).join(name))
        .filter(|p| p.is_file())
        .collect()
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
    /// The runs reported on, oldest first.
    pub runs: Vec<String>,
    pub training: Option<DataFrame>,
    /// Held-out preference accuracy per pair source (when a preference stage ran).
    pub preference: Option<DataFrame>,
    /// Held-out retrieval recall of contrastive stages and their baselines.
    pub retrieval: Option<DataFrame>,
    /// Held-out metrics of online stages (DiCO, SCST, RLHF) before and after, with their rewards.
    pub online: Option<DataFrame>,
    /// Held-out figures of story steps (train-story and its GAN variants).
    pub story: Option<DataFrame>,
    pub scores: Option<DataFrame>,
    /// The PNG of every chart (an SVG beside each).
    pub charts: Vec<PathBuf>,
    /// Images in the page's gallery.
    pub gallery_images: usize,
    /// `index.html`.
    pub page: PathBuf,
}

impl ReportSummary {
    /// The tables, titled, in the order the page shows them, as the terminal and the page
    /// show them: one run's id is said once above them, so its column goes; several runs are
    /// numbered (`#`, [`Self::legend`]); columns no row has a value in go.
    pub fn tables(&self) -> Vec<Table> {
        let several = self.runs.len() > 1;
        [
            ("training", &self.training),
            ("preference pairs by source (val)", &self.preference),
            ("retrieval (val)", &self.retrieval),
            ("online stages (val, greedy)", &self.online),
            ("story steps (val)", &self.story),
            ("scores", &self.scores),
        ]
        .into_iter()
        .filter_map(|(title, t)| t.as_ref().map(|t| Table::from_frame(title, t)))
        .map(|mut t| {
            if several {
                t.map_texts("run_id", |r| {
                    self.runs
                        .iter()
                        .position(|x| x == r)
                        .map_or(r.to_string(), |i| format!("#{}", i + 1))
                });
                t.rename("run_id", "#");
            } else {
                t = t.without("run_id");
            }
            t.without_empty_columns()
        })
        .collect()
    }

    /// The run id (one run) or the numbered runs the tables' `#` column refers to.
    pub fn legend(&self) -> String {
        match self.runs.as_slice() {
            [one] => format!("run {one}\n"),
            many => many
                .iter()
                .enumerate()
                .map(|(i, r)| format!("#{} {r}\n", i + 1))
                .collect(),
        }
    }

    /// What the run log and `pipeline report` print, at most 100 columns wide: the run id
    /// once above the tables (several runs: a numbered legend), every table, and where the
    /// page and files went.
    pub fn text(&self, out: &Path) -> String {
        let mut text = self.legend();
        for t in self.tables() {
            text.push_str(&t.render(TERMINAL_WIDTH));
        }
        text.push_str(&format!(
            "{} chart(s) (PNG + SVG) and the tables (Parquet + CSV) in {}\nreport: {}",
            self.charts.len(),
            out.display(),
            self.page.display()
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
    let text = |name: &str| strings(&val, name, what);
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

/// A run and a training step.
type Key = (String, String);

/// Per (run, step) that validated `name`: the selected checkpoint's step, `best_step` of the
/// step's `last/state.json`, else its last validation of `name`.
fn selected_steps(
    workdir: &Path,
    rows: &[ValRow],
    name: &str,
) -> std::collections::BTreeMap<Key, i64> {
    let mut last: std::collections::BTreeMap<Key, i64> = Default::default();
    for r in rows.iter().filter(|r| r.name == name) {
        let e = last
            .entry((r.run_id.clone(), r.stage.clone()))
            .or_insert(r.step);
        *e = (*e).max(r.step);
    }
    last.into_iter()
        .map(|(k, l)| {
            let state = workdir
                .join("runs")
                .join(&k.0)
                .join(&k.1)
                .join("last/state.json");
            let step = crate::io::read_json::<serde_json::Value>(&state)
                .ok()
                .and_then(|s| s["best_step"].as_i64())
                .unwrap_or(l);
            (k, step)
        })
        .collect()
}

/// The value of validation scalar `name` of `k` at `step` (NaN when not logged).
fn value_at(rows: &[ValRow], k: &Key, step: i64, name: &str) -> f64 {
    rows.iter()
        .find(|r| r.run_id == k.0 && r.stage == k.1 && r.step == step && r.name == name)
        .map_or(f64::NAN, |r| r.value)
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
    let best = selected_steps(workdir, &rows, "val/RefCLIPScore");
    if best.is_empty() {
        return Ok(None);
    }
    let value = |k: &Key, step: i64, name: &str| value_at(&rows, k, step, name);
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

/// Per run and story step (those that logged `image_cosine`): at the selected checkpoint
/// (`best_step` from the step's `last/state.json`, else its last validation) the held-out
/// caption NLL, the predicted image's cosine and MSE to the target frame's, and with a GAN
/// the discriminator's held-out accuracy; the generator's adversarial reward at its first and
/// last logged steps (NaN without a GAN).
pub fn story_table(workdir: &Path, metrics: &DataFrame) -> Result<Option<DataFrame>> {
    const VAL: [(&str, &str); 4] = [
        ("nll", "nll"),
        ("image_cosine", "image_cosine"),
        ("image_mse", "image_mse"),
        ("d_accuracy", "d/accuracy"),
    ];
    let rows = val_rows(metrics, "story table")?;
    let keys: Vec<(Key, i64)> = selected_steps(workdir, &rows, "image_cosine")
        .into_iter()
        .collect();
    if keys.is_empty() {
        return Ok(None);
    }
    let value = |k: &Key, step: i64, name: &str| value_at(&rows, k, step, name);
    let train = split_rows(metrics, "train", "story table")?;
    let reward = |k: &Key, first: bool| -> f64 {
        let mut v: Vec<(i64, f64)> = train
            .iter()
            .filter(|r| r.run_id == k.0 && r.stage == k.1 && r.name == "adv/reward")
            .map(|r| (r.step, r.value))
            .collect();
        v.sort_by_key(|r| r.0);
        let got = if first { v.first() } else { v.last() };
        got.map_or(f64::NAN, |r| r.1)
    };
    let mut cols = vec![
        Column::new(
            "run_id".into(),
            keys.iter().map(|k| k.0 .0.clone()).collect::<Vec<_>>(),
        ),
        Column::new(
            "stage".into(),
            keys.iter().map(|k| k.0 .1.clone()).collect::<Vec<_>>(),
        ),
        Column::new(
            "best_step".into(),
            keys.iter().map(|k| k.1).collect::<Vec<_>>(),
        ),
    ];
    for (column, name) in VAL {
        cols.push(Column::new(
            column.into(),
            keys.iter()
                .map(|(k, step)| value(k, *step, name))
                .collect::<Vec<_>>(),
        ));
    }
    for (column, first) in [("adv_reward_first", true), ("adv_reward_last", false)] {
        cols.push(Column::new(
            column.into(),
            keys.iter()
                .map(|(k, _)| reward(k, first))
                .collect::<Vec<_>>(),
        ));
    }
    DataFrame::new(keys.len(), cols)
        .map(Some)
        .map_err(perr("story table"))
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
        "grammatical",
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
    let (runs, models) = (
        strings(&table, "run_id", "scores table")?,
        strings(&table, "model", "scores table")?,
    );
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

/// A metric family: one chart per training step that logged any of its metrics.
struct Family {
    /// File-name prefix and title suffix.
    id: &'static str,
    /// The metrics, by (split, name): a name that ends in `/` takes every metric under it
    /// without a further `/`.
    members: &'static [(&'static str, &'static str)],
}

const FAMILIES: [Family; 6] = [
    Family {
        id: "loss",
        members: &[("train", "loss"), ("val", "loss")],
    },
    Family {
        id: "preference",
        members: &[
            ("train", "rewards/accuracies"),
            ("val", "rewards/accuracies"),
            ("train", "rewards/margins"),
            ("val", "rewards/margins"),
            ("train", "accuracy"),
            ("val", "accuracy"),
            ("train", "margin"),
            ("val", "margin"),
        ],
    },
    Family {
        id: "retrieval",
        members: &[("val", "retrieval/")],
    },
    // The online stages' training reward (DiCO's and SCST's candidates, DiCO's winner,
    // SCST's greedy baseline, RLHF's shaped reward and KL) beside the held-out CLIPScore and
    // RefCLIPScore, so a reward that climbs while the held-out metrics do not shows.
    Family {
        id: "rewards",
        members: &[
            ("train", "reward/mean"),
            ("train", "reward"),
            ("train", "reward/winner"),
            ("train", "reward/greedy"),
            ("train", "kl"),
            ("val", "val/CLIPScore"),
            ("val", "val/RefCLIPScore"),
        ],
    },
    // train-story: the caption's NLL and the predicted next image's cosine to the real one.
    Family {
        id: "story",
        members: &[
            ("train", "nll"),
            ("val", "nll"),
            ("train", "image_cosine"),
            ("val", "image_cosine"),
        ],
    },
    // Two parameter groups (train-story's GAN variants): each group's loss, the generator's
    // adversarial reward and the discriminator's accuracy.
    Family {
        id: "adversarial",
        members: &[
            ("train", "generator/loss"),
            ("val", "generator/loss"),
            ("train", "discriminator/loss"),
            ("val", "discriminator/loss"),
            ("train", "adv/reward"),
            ("train", "d/accuracy"),
            ("val", "d/accuracy"),
        ],
    },
];

/// The text column `name` of `df`, row by row (null: empty); errors name `what`.
fn strings(df: &DataFrame, name: &str, what: &str) -> Result<Vec<String>> {
    let c = df.column(name).map_err(perr(what))?;
    let c = c.str().map_err(perr(what))?;
    Ok((0..c.len())
        .map(|i| c.get(i).unwrap_or_default().to_string())
        .collect())
}

/// Writes `chart` as `<out>/<name>.png` and `.svg`.
fn write_chart(out: &Path, name: &str, title: String, chart: Chart) -> Result<ChartFile> {
    let (png_name, svg_name) = (format!("{name}.png"), format!("{name}.svg"));
    crate::io::write_atomic(&out.join(&png_name), &chart.png)?;
    crate::io::write_atomic(&out.join(&svg_name), chart.svg.as_bytes())?;
    Ok(ChartFile {
        title,
        png_name,
        svg_name,
        png: chart.png,
    })
}

/// One chart per (run, training step, metric family) that logged any of the family's metrics
/// (a step with a single logged step too), as `<family>-<run>-<step>.png` and `.svg`.
fn charts(metrics: &DataFrame, out: &Path) -> Result<Vec<ChartFile>> {
    let keys = metrics
        .clone()
        .lazy()
        .select([col("run_id"), col("stage"), col("split"), col("name")])
        .unique_stable(None, UniqueKeepStrategy::First)
        .collect()
        .map_err(perr("charts"))?;
    let (runs, stages) = (
        strings(&keys, "run_id", "charts")?,
        strings(&keys, "stage", "charts")?,
    );
    let (splits, names) = (
        strings(&keys, "split", "charts")?,
        strings(&keys, "name", "charts")?,
    );
    let mut pairs: Vec<(String, String)> =
        runs.iter().cloned().zip(stages.iter().cloned()).collect();
    pairs.sort();
    pairs.dedup();
    let mut written = Vec::new();
    for (run, stage) in &pairs {
        let logged: Vec<(&str, &str)> = (0..names.len())
            .filter(|&i| &runs[i] == run && &stages[i] == stage)
            .map(|i| (splits[i].as_str(), names[i].as_str()))
            .collect();
        for family in &FAMILIES {
            let mut series = Vec::new();
            for (split, member) in family.members {
                let mut matching: Vec<&str> = logged
                    .iter()
                    .filter(|(sp, n)| {
                        sp == split
                            && match member.strip_suffix('/') {
                                Some(prefix) => n
                                    .strip_prefix(prefix)
                                    .and_then(|r| r.strip_prefix('/'))
                                    .is_some_and(|r| !r.contains('/')),
                                None => n == member,
                            }
                    })
                    .map(|(_, n)| *n)
                    .collect();
                matching.sort();
                for name in matching {
                    let points = curve(metrics, run, stage, split, name)?;
                    if !points.is_empty() {
                        let label = name.strip_prefix("val/").unwrap_or(name);
                        series.push(Series {
                            name: format!("{split} {label}"),
                            points,
                        });
                    }
                }
            }
            if series.is_empty() {
                continue;
            }
            let title = format!("{stage} {}", family.id);
            let chart = line_chart(&title, "step", &series)?;
            written.push(write_chart(
                out,
                &format!("{}-{run}-{stage}", family.id),
                title,
                chart,
            )?);
        }
    }
    Ok(written)
}

/// The headline metrics of the models' comparison chart.
const HEADLINE: [&str; 6] = [
    "CIDEr",
    "Bleu_4",
    "METEOR",
    "CLIPScore",
    "RefCLIPScore",
    "attribute_accuracy",
];

/// A bar chart of the headline metrics (those computed) of every model and method in
/// `scores` (the scores table), as `scores.png` and `.svg`.
fn scores_chart(scores: &DataFrame, several: bool, out: &Path) -> Result<Option<ChartFile>> {
    let (runs, models) = (
        strings(scores, "run_id", "charts")?,
        strings(scores, "model", "charts")?,
    );
    let methods = strings(scores, "method", "charts")?;
    // One colour per (run, model), lighter for each further decoding method of it.
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut shades: std::collections::HashMap<(String, String), usize> = Default::default();
    let bars: Vec<Bar> = (0..models.len())
        .map(|i| {
            let key = (runs[i].clone(), models[i].clone());
            let group = seen.iter().position(|k| *k == key).unwrap_or_else(|| {
                seen.push(key.clone());
                seen.len() - 1
            });
            let shade = shades.entry(key).or_insert(0);
            let colour = shaded(group, *shade);
            *shade += 1;
            let label = if several {
                format!("{} {} {}", runs[i], models[i], methods[i])
            } else {
                format!("{} {}", models[i], methods[i])
            };
            Bar { label, colour }
        })
        .collect();
    let mut panels = Vec::new();
    for m in HEADLINE {
        let Ok(c) = scores.column(m) else { continue };
        let Ok(c) = c.f64() else { continue };
        let values: Vec<f64> = (0..c.len()).map(|i| c.get(i).unwrap_or(f64::NAN)).collect();
        if values.iter().any(|v| v.is_finite()) {
            panels.push(Panel {
                metric: m.to_string(),
                values,
            });
        }
    }
    if panels.is_empty() || bars.is_empty() {
        return Ok(None);
    }
    let title = "held-out scores by model and decoding".to_string();
    let chart = bar_chart(&title, &bars, &panels)?;
    write_chart(out, "scores", title, chart).map(Some)
}

/// Builds the report of `runs` (every run under `workdir` when empty) into `out`: tables,
/// charts and `index.html` with a gallery of at most `gallery_images` held-out images (0 =
/// all). What a run finished is reported even when a later step of it failed.
pub fn report(
    workdir: &Path,
    out: &Path,
    runs: &[String],
    gallery_images: usize,
) -> Result<ReportSummary> {
    let runs: Vec<String> = if runs.is_empty() {
        all_runs(workdir)
    } else {
        for r in runs {
            if !workdir.join("runs").join(r).is_dir() {
                return Err(Error::Config(format!(
                    "report: no run `{r}` under {}",
                    workdir.join("runs").display()
                )));
            }
        }
        runs.to_vec()
    };
    std::fs::create_dir_all(out).at(out)?;
    let mut summary = ReportSummary {
        runs: runs.clone(),
        ..Default::default()
    };
    let mut charts_shown = Vec::new();
    if let Some(metrics) = read_all(&run_files(workdir, &runs, "metrics.parquet"))? {
        let mut t = training_table(metrics.clone())?;
        write_table(&mut t, out, "training")?;
        charts_shown = charts(&metrics, out)?;
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
        if let Some(mut t) = story_table(workdir, &metrics)? {
            write_table(&mut t, out, "story")?;
            summary.story = Some(t);
        }
    }
    if let Some(scores) = read_all(&run_files(workdir, &runs, "scores_summary.parquet"))? {
        let mut t = with_captioner(workdir, scores_table(scores)?)?;
        write_table(&mut t, out, "scores")?;
        if let Some(c) = scores_chart(&t, runs.len() > 1, out)? {
            charts_shown.insert(0, c);
        }
        summary.scores = Some(t);
    }
    if summary.training.is_none() && summary.scores.is_none() {
        return Err(Error::Config(format!(
            "report: no metrics.parquet or scores_summary.parquet in {} under {}; run a training or score stage first",
            if runs.len() == 1 { format!("run `{}`", runs[0]) } else { format!("{} run(s)", runs.len()) },
            workdir.join("runs").display()
        )));
    }
    let g = gallery::gallery(workdir, &runs, gallery_images)?;
    let summaries: Vec<RunSummary> = runs.iter().map(|r| RunSummary::read(workdir, r)).collect();
    let title = match runs.as_slice() {
        [one] => format!("prefcap report: {one}"),
        many => format!("prefcap report: {} runs", many.len()),
    };
    let page = html::page(
        &title,
        &summary.legend(),
        &summaries,
        &summary.tables(),
        &charts_shown,
        &g,
    );
    summary.page = out.join("index.html");
    crate::io::write_atomic(&summary.page, page.as_bytes())?;
    summary.charts = charts_shown.iter().map(|c| out.join(&c.png_name)).collect();
    summary.gallery_images = g.entries.len();
    Ok(summary)
}

/// `[report]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportConfig {
    /// Held-out images in the page's gallery, in key order (0 = all).
    pub gallery_images: usize,
}

impl Default for ReportConfig {
    fn default() -> Self {
        Self {
            gallery_images: 256,
        }
    }
}

/// What the report stage wrote: its tables as text, and where.
#[derive(Debug, Clone, Serialize)]
pub struct ReportText {
    pub text: String,
    /// `index.html`.
    pub page: PathBuf,
}

impl std::fmt::Display for ReportText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.text)
    }
}

/// `pipeline run report`: the run's own report, in `runs/<id>/report/`.
pub struct Report;

impl Stage for Report {
    const NAME: &'static str = "report";
    const DESCRIPTION: &'static str =
        "the run's tables, charts and index.html with captions beside their images";
    const USES_GPU: bool = false;
    const SECTION: &'static str = "report";
    /// A run whose step failed still gets the report of what finished.
    const RUNS_AFTER_FAILURE: bool = true;
    type Config = ReportConfig;
    type Summary = ReportText;

    fn run(cfg: &ReportConfig, ctx: &StageContext) -> Result<ReportText> {
        let out = ctx.run_dir.join("report");
        let s = report(
            &ctx.workdir,
            &out,
            std::slice::from_ref(&ctx.run_id),
            cfg.gallery_images,
        )?;
        Ok(ReportText {
            text: s.text(&out),
            page: s.page,
        })
    }
}
