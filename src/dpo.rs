//! `pipeline run train-dpo` and `train-orpo`: preference optimisation of the captioner on
//! image-grounded pairs (`image_key` set: the CLIP prefix is the prompt), through the generic
//! trainer loop.
//!
//! DPO starts from the SFT checkpoint, which is also the frozen reference. The reference's
//! sequence log-probabilities are computed once per (reference checkpoint, pair shard) and
//! cached on disk as Arrow IPC under `cache/reflogps-v1/`, so training holds no second model
//! and re-runs reuse them. ORPO starts from the same checkpoint and needs no reference.
//! Pairs stream from a loader thread (pair shards joined with cached image features,
//! tokenized and padded) over a bounded channel; the training thread only computes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use crossbeam_channel::Receiver;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::captioner::{caption_ids, Captioner, CaptionerManifest};
use crate::config::Config;
use crate::embed::{self, device_for, sha256_file};
use crate::error::{Error, IoContext, Result};
use crate::generate::find_stage_dir;
use crate::preference::{dpo_loss, orpo_loss, DpoLoss};
use crate::records::PreferencePair;
use crate::sft::{pad_batch, shard_batches, CaptionBatch, StageContext};
use crate::shard::{read_parquet, ShardSet};
use crate::train::{fit, FitOutput, Objective, StepOutput, TrainConfig};

/// `[preference]`: the data and losses of train-dpo and train-orpo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreferenceConfig {
    /// Pair dataset under `data/` (rows with `image_key`).
    pub pairs_dataset: String,
    /// Image dataset whose cached features the pairs' `image_key`s name.
    pub image_dataset: String,
    pub train_split: String,
    pub val_split: String,
    /// DPO loss: sigmoid, hinge, ipo, robust.
    pub loss: DpoLoss,
    pub beta: f64,
    pub label_smoothing: f64,
    /// ORPO's λ.
    pub orpo_lambda: f64,
    /// Training stage whose best checkpoint initialises the policy (and is DPO's reference).
    pub init_from: String,
}

impl Default for PreferenceConfig {
    fn default() -> Self {
        Self {
            pairs_dataset: "synthetic_prefs".into(),
            image_dataset: "synthetic".into(),
            train_split: "train".into(),
            val_split: "val".into(),
            loss: DpoLoss::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            orpo_lambda: 0.1,
            init_from: "train-sft".into(),
        }
    }
}

/// One image-grounded pair, ready to batch.
#[derive(Clone)]
struct PairRow {
    pair_id: String,
    clip: Vec<f32>,
    chosen: String,
    rejected: String,
}

/// A batch of pairs: chosen and rejected sides padded separately, and the cached reference
/// log-probabilities (DPO) of each row.
pub struct PairBatch {
    pub chosen: CaptionBatch,
    pub rejected: CaptionBatch,
    pub ref_chosen: Vec<f32>,
    pub ref_rejected: Vec<f32>,
}

/// The pairs of a split with their image embeddings, per shard.
#[derive(Clone)]
struct PairSplit {
    shards: Vec<PathBuf>,
    images: Arc<HashMap<String, Vec<f32>>>,
}

impl PairSplit {
    fn new(cfg: &Config, workdir: &Path, split: &str) -> Result<Self> {
        let p = &cfg.preference;
        let set = ShardSet::new(workdir, &p.pairs_dataset, split);
        let shards: Vec<PathBuf> = set
            .finished()?
            .into_iter()
            .map(|s| set.parquet_path(s))
            .collect();
        if shards.is_empty() {
            return Err(Error::Config(format!(
                "no finished pair shards in {}/data/{}/{split}; run `pipeline run ingest` first",
                workdir.display(),
                p.pairs_dataset
            )));
        }
        let mut images = HashMap::new();
        for e in embed::split_features(cfg, workdir, &p.image_dataset, split, "image")? {
            let t = e.open()?;
            let (dim, emb) = (t.dim, t.embeddings());
            for (i, k) in t.keys().into_iter().enumerate() {
                images.insert(k, emb[i * dim..(i + 1) * dim].to_vec());
            }
        }
        Ok(Self {
            shards,
            images: Arc::new(images),
        })
    }

    /// Rows of shard `i`; a pair without an image, or with an empty completion, is an error
    /// naming the file and the pair.
    fn load(&self, i: usize) -> Result<Vec<PairRow>> {
        let path = &self.shards[i];
        let pairs: Vec<PreferencePair> = read_parquet(path)?;
        pairs
            .into_iter()
            .enumerate()
            .map(|(row, p)| {
                let bad = |message: String| Error::BadRow {
                    path: path.clone(),
                    row: row as u64 + 1,
                    message,
                };
                if p.chosen.trim().is_empty() || p.rejected.trim().is_empty() {
                    return Err(bad(format!("pair `{}` has an empty completion", p.pair_id)));
                }
                let key = p.image_key.clone().ok_or_else(|| {
                    bad(format!(
                        "pair `{}` has no image_key (text-only pairs need a text prompt model)",
                        p.pair_id
                    ))
                })?;
                let clip = self.images.get(&key).cloned().ok_or_else(|| {
                    bad(format!(
                        "pair `{}`: no cached features for image `{key}`",
                        p.pair_id
                    ))
                })?;
                Ok(PairRow {
                    pair_id: p.pair_id,
                    clip,
                    chosen: p.chosen,
                    rejected: p.rejected,
                })
            })
            .collect()
    }

    fn rows(&self) -> Result<usize> {
        (0..self.shards.len())
            .map(|i| self.load(i).map(|r| r.len()))
            .sum()
    }
}

/// Per-row sums of log-probabilities and token counts of one padded side.
fn side_logps(model: &Captioner, b: &CaptionBatch) -> candle_core::Result<(Tensor, Tensor)> {
    let (clip, ids, mask) = crate::sft::batch_tensors(b, model.clip_dim, model.device())?;
    model.sequence_logprobs(&clip, &ids, &mask)
}

fn side_batch(
    rows: &[PairRow],
    chosen: bool,
    tok: &Tokenizer,
    eos: u32,
    max: usize,
) -> Result<CaptionBatch> {
    let built = rows
        .iter()
        .map(|r| {
            Ok((
                r.clip.clone(),
                caption_ids(tok, eos, if chosen { &r.chosen } else { &r.rejected }, max)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(pad_batch(built, eos))
}

/// The reference log-probabilities of every pair of `split`, from the cache or computed with
/// the reference model and cached (Arrow IPC `pair_id, ref_chosen, ref_rejected`).
fn reference_logps(
    split: &PairSplit,
    reference: &Captioner,
    reference_weights: &Path,
    average: bool,
    max_tokens: usize,
    workdir: &Path,
) -> Result<HashMap<String, (f32, f32)>> {
    let mut h = Sha256::new();
    h.update(b"reflogps-v1\0");
    h.update(sha256_file(reference_weights)?.as_bytes());
    for s in &split.shards {
        h.update(sha256_file(s)?.as_bytes());
    }
    h.update([u8::from(average)]);
    h.update((max_tokens as u64).to_le_bytes());
    let digest = hex::encode(h.finalize());
    let dir = workdir.join("cache").join("reflogps-v1");
    let path = dir.join(format!("{digest}.arrow"));
    if let Ok(file) = std::fs::File::open(&path) {
        if let Ok(reader) = arrow::ipc::reader::FileReader::try_new(file, None) {
            let mut out = HashMap::new();
            for batch in reader.flatten() {
                let (ids, c, r) = (
                    batch.column(0).as_any().downcast_ref::<StringArray>(),
                    batch.column(1).as_any().downcast_ref::<Float64Array>(),
                    batch.column(2).as_any().downcast_ref::<Float64Array>(),
                );
                if let (Some(ids), Some(c), Some(r)) = (ids, c, r) {
                    for i in 0..batch.num_rows() {
                        out.insert(
                            ids.value(i).to_string(),
                            (c.value(i) as f32, r.value(i) as f32),
                        );
                    }
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
    let mut ids = Vec::new();
    let (mut cs, mut rs) = (Vec::new(), Vec::new());
    for i in 0..split.shards.len() {
        let rows = split.load(i)?;
        for chunk in rows.chunks(64) {
            let err = |e: candle_core::Error| Error::Stage {
                stage: "train-dpo".into(),
                message: e.to_string(),
            };
            let mut sides = Vec::new();
            for chosen in [true, false] {
                let b = side_batch(
                    chunk,
                    chosen,
                    &reference.tokenizer,
                    reference.eos,
                    max_tokens,
                )?;
                let (lp, n) = side_logps(reference, &b).map_err(err)?;
                let lp = if average { (lp / n).map_err(err)? } else { lp };
                sides.push(lp.to_vec1::<f32>().map_err(err)?);
            }
            ids.extend(chunk.iter().map(|r| r.pair_id.clone()));
            cs.extend(sides[0].iter().map(|&x| f64::from(x)));
            rs.extend(sides[1].iter().map(|&x| f64::from(x)));
        }
    }
    std::fs::create_dir_all(&dir).at(&dir)?;
    let schema = Arc::new(Schema::new(vec![
        Field::new("pair_id", DataType::Utf8, false),
        Field::new("ref_chosen", DataType::Float64, false),
        Field::new("ref_rejected", DataType::Float64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(ids.clone())),
            Arc::new(Float64Array::from(cs.clone())),
            Arc::new(Float64Array::from(rs.clone())),
        ],
    )
    .map_err(|source| Error::Arrow {
        context: "reference log-probs".into(),
        source,
    })?;
    let tmp = dir.join(format!(".{digest}.arrow.tmp-{}", std::process::id()));
    let aerr = |source| Error::Arrow {
        context: format!("writing {}", tmp.display()),
        source,
    };
    let mut w =
        arrow::ipc::writer::FileWriter::try_new(std::fs::File::create(&tmp).at(&tmp)?, &schema)
            .map_err(aerr)?;
    w.write(&batch).map_err(aerr)?;
    w.finish().map_err(aerr)?;
    std::fs::rename(&tmp, &path).at(&path)?;
    Ok(ids
        .into_iter()
        .zip(cs.into_iter().zip(rs))
        .map(|(id, (c, r))| (id, (c as f32, r as f32)))
        .collect())
}

/// DPO or ORPO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Dpo,
    Orpo,
}

impl Method {
    pub fn stage(self) -> &'static str {
        match self {
            Method::Dpo => "train-dpo",
            Method::Orpo => "train-orpo",
        }
    }
}

struct PreferenceObjective {
    method: Method,
    model: Captioner,
    vars: VarMap,
    train: PairSplit,
    val: PairSplit,
    refs: Arc<HashMap<String, (f32, f32)>>,
    cfg: PreferenceConfig,
    batch_size: usize,
    max_tokens: usize,
    seed: u64,
}

impl PreferenceObjective {
    fn batches(&self, split: &PairSplit, shuffle: Option<usize>) -> Receiver<Result<PairBatch>> {
        let (refs, tok, eos, max) = (
            self.refs.clone(),
            self.model.tokenizer.clone(),
            self.model.eos,
            self.max_tokens,
        );
        let loader = {
            let split = split.clone();
            move |i: usize| split.load(i)
        };
        let make = move |chunk: &[PairRow]| -> Result<PairBatch> {
            let lookup = |r: &PairRow| refs.get(&r.pair_id).copied().unwrap_or((0.0, 0.0));
            Ok(PairBatch {
                chosen: side_batch(chunk, true, &tok, eos, max)?,
                rejected: side_batch(chunk, false, &tok, eos, max)?,
                ref_chosen: chunk.iter().map(|r| lookup(r).0).collect(),
                ref_rejected: chunk.iter().map(|r| lookup(r).1).collect(),
            })
        };
        let shuffle = shuffle.map(|epoch| (self.seed, format!("pairs-epoch-{epoch}")));
        shard_batches(
            split.shards.len(),
            loader,
            make,
            self.batch_size,
            shuffle,
            4,
        )
    }
}

impl Objective for PreferenceObjective {
    type Batch = PairBatch;

    fn vars(&self) -> &VarMap {
        &self.vars
    }

    fn step(&mut self, b: &PairBatch, _train: bool) -> candle_core::Result<StepOutput> {
        let (lc, nc) = side_logps(&self.model, &b.chosen)?;
        let (lr, nr) = side_logps(&self.model, &b.rejected)?;
        let rows = b.chosen.rows;
        let out = match self.method {
            Method::Dpo => {
                let average = self.cfg.loss.averages_tokens();
                let (pc, pr) = if average {
                    ((&lc / &nc)?, (&lr / &nr)?)
                } else {
                    (lc, lr)
                };
                let dev = self.model.device();
                let rc = Tensor::from_slice(&b.ref_chosen, rows, dev)?;
                let rr = Tensor::from_slice(&b.ref_rejected, rows, dev)?;
                dpo_loss(
                    self.cfg.loss,
                    self.cfg.beta,
                    self.cfg.label_smoothing,
                    &pc,
                    &pr,
                    &rc,
                    &rr,
                )?
            }
            Method::Orpo => {
                let nll =
                    (lc.sum_all()?.neg()? / f64::from(nc.sum_all()?.to_scalar::<f32>()?.max(1.0)))?;
                orpo_loss(self.cfg.orpo_lambda, &nll, &(&lc / &nc)?, &(&lr / &nr)?)?
            }
        };
        Ok(StepOutput {
            loss: out.loss,
            scalars: out.scalars,
            rows,
        })
    }

    fn train_batches(&self, epoch: usize) -> Result<Receiver<Result<PairBatch>>> {
        Ok(self.batches(&self.train, Some(epoch)))
    }

    fn val_batches(&self) -> Result<Receiver<Result<PairBatch>>> {
        Ok(self.batches(&self.val, None))
    }

    fn selection(&self) -> (&str, bool) {
        match self.method {
            Method::Dpo => ("rewards/accuracies", true),
            Method::Orpo => ("loss", false),
        }
    }
}

/// Runs train-dpo or train-orpo; returns the summary line.
pub fn run(
    cfg: &Config,
    ctx: &StageContext,
    method: Method,
    train_cfg: &TrainConfig,
) -> Result<String> {
    let p = &cfg.preference;
    let init = find_stage_dir(ctx, &p.init_from).ok_or_else(|| {
        Error::Config(format!(
            "{}: no `{}` checkpoint in this run or an earlier one; run `pipeline run {}` first",
            method.stage(),
            p.init_from,
            p.init_from
        ))
    })?;
    let manifest = CaptionerManifest::load(&init.join("captioner.json"))?;
    let mut cfg = cfg.clone();
    cfg.embed.model = manifest.clip_model.clone();
    cfg.embed.revision = manifest.clip_revision.clone();
    let train = PairSplit::new(&cfg, &ctx.workdir, &p.train_split)?;
    let val = PairSplit::new(&cfg, &ctx.workdir, &p.val_split)?;
    let device: Device = device_for(ctx.gpu, cfg.embed.cpu_fallback)?;
    let best = init.join("best/model.safetensors");
    let (mut model, vars) = manifest.captioner(Some(&best), &device)?;
    let max_tokens = manifest.captioner.max_caption_tokens;
    let refs = if method == Method::Dpo {
        let (reference, _) = manifest.captioner(Some(&best), &device)?;
        let mut all = reference_logps(
            &train,
            &reference,
            &best,
            p.loss.averages_tokens(),
            max_tokens,
            &ctx.workdir,
        )?;
        all.extend(reference_logps(
            &val,
            &reference,
            &best,
            p.loss.averages_tokens(),
            max_tokens,
            &ctx.workdir,
        )?);
        all
    } else {
        HashMap::new()
    };
    model.decoder.set_differentiable(true);
    let dir = ctx.run_dir.join(method.stage());
    std::fs::create_dir_all(&dir).at(&dir)?;
    manifest.save(&dir.join("captioner.json"))?;
    let steps_per_epoch: usize = (0..train.shards.len())
        .map(|i| {
            train
                .load(i)
                .map(|r| r.len().div_ceil(train_cfg.batch_size.max(1)))
        })
        .sum::<Result<usize>>()?;
    let rows = train.rows()?;
    let mut objective = PreferenceObjective {
        method,
        model,
        vars,
        train,
        val,
        refs: Arc::new(refs),
        cfg: p.clone(),
        batch_size: train_cfg.batch_size,
        max_tokens,
        seed: train_cfg.seed,
    };
    let metrics = ctx.metrics_path();
    let summary = fit(
        &mut objective,
        train_cfg,
        steps_per_epoch,
        &FitOutput {
            checkpoint_dir: &dir,
            metrics_path: &metrics,
            run_id: &ctx.run_id,
            stage: method.stage(),
        },
    )?;
    Ok(format!(
        "{} optimizer steps over {rows} pairs from {}; best val {} {:.4} at step {}; {} non-finite batches skipped; checkpoints in {}",
        summary.state.step,
        p.init_from,
        objective.selection().0,
        summary.state.best_value.unwrap_or(f64::NAN),
        summary.state.best_step.unwrap_or(0),
        summary.state.skipped_nonfinite,
        dir.display()
    ))
}
