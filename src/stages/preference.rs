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

use crate::data::records::{MetricRow, PreferencePair};
use crate::data::shard::{read_parquet, write_parquet, ShardSet};
use crate::device::device_for;
use crate::error::{CandleContext, Error, IoContext, Result};
use crate::io::sha256_file;
use crate::losses::preference::{dpo_loss, orpo_loss, DpoLoss};
use crate::models::captioner::{Captioner, CaptionerManifest};
use crate::pipeline::config::Config;
use crate::stages::embed::{self};
use crate::stages::generate::find_stage_dir;
use crate::stages::train_sft::{shard_batches, StageContext};
use crate::train::{fit, FitOutput, Objective, StepOutput, TrainConfig};

/// `[preference]`: the data and losses of train-dpo and train-orpo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreferenceConfig {
    /// Image-grounded pair dataset under `data/` (rows with `image_key`); empty = none.
    pub pairs_dataset: String,
    /// Image dataset whose cached features the pairs' `image_key`s name.
    pub image_dataset: String,
    pub train_split: String,
    pub val_split: String,
    /// Text-only pair dataset (UltraFeedback: the decoder is conditioned on the prompt, no
    /// image prefix), trained on beside the image-grounded pairs; empty = none.
    pub text_pairs_dataset: String,
    pub text_train_split: String,
    pub text_val_split: String,
    /// TRL's `max_length`: prompt + completion tokens per sequence (the CLIP prefix not
    /// counted); 0 = no limit. Also capped by the decoder's positions.
    pub max_length: usize,
    /// TRL's (pre-1.0) `max_prompt_length`: a longer prompt keeps its last tokens; 0 = no limit.
    pub max_prompt_length: usize,
    /// TRL's `truncation_mode` for `max_length`.
    pub truncation_mode: TruncationMode,
    /// DPO loss: sigmoid, hinge, ipo, robust.
    pub loss: DpoLoss,
    pub beta: f64,
    pub label_smoothing: f64,
    /// Weight of an SFT term (mean NLL of the chosen completion tokens) added to the DPO loss:
    /// TRL's `loss_type=["sigmoid", "sft"]` with `loss_weights=[1, sft_weight]` (RPO); 0 = off.
    pub sft_weight: f64,
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
            text_pairs_dataset: String::new(),
            text_train_split: "train_prefs".into(),
            text_val_split: "test_prefs".into(),
            max_length: 1024,
            max_prompt_length: 0,
            truncation_mode: TruncationMode::KeepStart,
            loss: DpoLoss::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            sft_weight: 0.0,
            orpo_lambda: 0.1,
            init_from: "train-sft".into(),
        }
    }
}

/// Which end of a too-long prompt + completion survives `max_length` (TRL's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncationMode {
    /// Keep the first `max_length` tokens; a pair whose prompt alone fills them is dropped.
    KeepStart,
    /// Keep the last `max_length` tokens (the prompt loses its beginning first).
    KeepEnd,
}

/// TRL's truncation settings, applied per tokenized pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncation {
    pub max_length: usize,
    pub max_prompt_length: usize,
    pub mode: TruncationMode,
}

/// One side of a pair as the model sees it: context tokens, then the scored completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Side {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
}

impl Truncation {
    /// Both sides of a tokenized pair after truncation, or `None` when the pair is dropped
    /// (`keep_start` and the prompt alone fills `max_length`, as TRL filters it out).
    /// The prompt is first cut to its last `max_prompt_length` tokens; then each side's
    /// prompt + completion is cut to `max_length`.
    pub fn apply(&self, prompt: &[u32], chosen: &[u32], rejected: &[u32]) -> Option<(Side, Side)> {
        let prompt = match self.max_prompt_length {
            0 => prompt,
            m => &prompt[prompt.len().saturating_sub(m)..],
        };
        let l = self.max_length;
        if l > 0 && self.mode == TruncationMode::KeepStart && prompt.len() >= l {
            return None;
        }
        let side = |completion: &[u32]| {
            let total = prompt.len() + completion.len();
            if l == 0 || total <= l {
                return Side {
                    prompt: prompt.to_vec(),
                    completion: completion.to_vec(),
                };
            }
            match self.mode {
                TruncationMode::KeepStart => Side {
                    prompt: prompt.to_vec(),
                    completion: completion[..l - prompt.len()].to_vec(),
                },
                TruncationMode::KeepEnd => {
                    let cut = total - l;
                    if cut <= prompt.len() {
                        Side {
                            prompt: prompt[cut..].to_vec(),
                            completion: completion.to_vec(),
                        }
                    } else {
                        Side {
                            prompt: Vec::new(),
                            completion: completion[cut - prompt.len()..].to_vec(),
                        }
                    }
                }
            }
        };
        Some((side(chosen), side(rejected)))
    }
}

/// Length of the common start of two token sequences.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A pair's token ids: the prompt, and each completion ending with end-of-text.
pub type PairIds = (Vec<u32>, Vec<u32>, Vec<u32>);

/// Tokenizes a pair as TRL does: the prompt alone and prompt + completion (joint, so merges
/// across the boundary are the tokenizer's); the completion starts where both sides leave
/// the prompt's tokens, and ends with end-of-text.
pub fn tokenize_pair(
    tok: &Tokenizer,
    eos: u32,
    prompt: &str,
    chosen: &str,
    rejected: &str,
) -> std::result::Result<PairIds, String> {
    let ids = |text: &str| {
        tok.encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| format!("tokenizing: {e}"))
    };
    let p = ids(prompt)?;
    let (pc, pr) = (
        ids(&format!("{prompt}{chosen}"))?,
        ids(&format!("{prompt}{rejected}"))?,
    );
    let n = common_prefix(&p, &pc).min(common_prefix(&p, &pr));
    let finish = |full: &[u32]| {
        let mut v = full[n..].to_vec();
        v.push(eos);
        v
    };
    Ok((p[..n].to_vec(), finish(&pc), finish(&pr)))
}

/// One pair, tokenized and truncated, ready to batch.
#[derive(Clone)]
struct PairRow {
    pair_id: String,
    /// The pair's `source` (`synthetic:colour`, `ultrafeedback_binarized`, ...).
    source: String,
    /// The image's CLIP embedding (image-grounded pairs) or `None` (text-only).
    clip: Option<Vec<f32>>,
    chosen: Side,
    rejected: Side,
}

/// One padded side of a group: `[prompt | completion | padding]` per row.
pub struct SideBatch {
    pub rows: usize,
    pub len: usize,
    /// `rows × clip_dim` for image-grounded groups.
    pub clip: Option<Vec<f32>>,
    /// `rows × len`, padded with end-of-text.
    pub ids: Vec<u32>,
    /// 1 on completion tokens.
    pub supervised: Vec<f32>,
    /// 1 on prompt and completion tokens.
    pub attention: Vec<f32>,
}

impl SideBatch {
    fn new(rows: &[&PairRow], chosen: bool, pad: u32) -> Self {
        let sides: Vec<&Side> = rows
            .iter()
            .map(|r| if chosen { &r.chosen } else { &r.rejected })
            .collect();
        let len = sides
            .iter()
            .map(|s| s.prompt.len() + s.completion.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut b = Self {
            rows: rows.len(),
            len,
            clip: None,
            ids: Vec::with_capacity(rows.len() * len),
            supervised: Vec::with_capacity(rows.len() * len),
            attention: Vec::with_capacity(rows.len() * len),
        };
        for s in sides {
            let (p, c) = (s.prompt.len(), s.completion.len());
            b.ids.extend(&s.prompt);
            b.ids.extend(&s.completion);
            b.ids.extend(std::iter::repeat_n(pad, len - p - c));
            for i in 0..len {
                b.supervised
                    .push(if (p..p + c).contains(&i) { 1.0 } else { 0.0 });
                b.attention.push(if i < p + c { 1.0 } else { 0.0 });
            }
        }
        if rows.iter().all(|r| r.clip.is_some()) {
            b.clip = Some(
                rows.iter()
                    .flat_map(|r| r.clip.clone().unwrap_or_default())
                    .collect(),
            );
        }
        b
    }
}

/// Rows of a batch that share a kind (all image-grounded or all text-only), with the cached
/// reference log-probabilities (DPO) of each row.
pub struct PairGroup {
    pub pair_ids: Vec<String>,
    pub sources: Vec<String>,
    pub chosen: SideBatch,
    pub rejected: SideBatch,
    pub ref_chosen: Vec<f32>,
    pub ref_rejected: Vec<f32>,
}

/// A batch of pairs: one group per kind present.
pub struct PairBatch {
    pub groups: Vec<PairGroup>,
}

/// Reference log-probabilities (chosen, rejected) by pair id.
pub(crate) type RefLogps = HashMap<String, (f32, f32)>;

impl PairBatch {
    /// `refs`: the reference log-probabilities, which must cover every row; `None` where no
    /// reference is used (ORPO, the reference pass itself), which leaves them 0.
    fn new(rows: &[PairRow], pad: u32, refs: Option<&RefLogps>) -> Result<Self> {
        let (image, text): (Vec<&PairRow>, Vec<&PairRow>) =
            rows.iter().partition(|r| r.clip.is_some());
        let lookup = |r: &PairRow| -> Result<(f32, f32)> {
            match refs {
                None => Ok((0.0, 0.0)),
                Some(refs) => refs.get(&r.pair_id).copied().ok_or_else(|| {
                    Error::Config(format!(
                        "pair {} ({}) has no cached reference log-probabilities",
                        r.pair_id, r.source
                    ))
                }),
            }
        };
        let groups = [image, text]
            .into_iter()
            .filter(|g| !g.is_empty())
            .map(|g| -> Result<PairGroup> {
                let refs = g.iter().map(|r| lookup(r)).collect::<Result<Vec<_>>>()?;
                Ok(PairGroup {
                    pair_ids: g.iter().map(|r| r.pair_id.clone()).collect(),
                    sources: g.iter().map(|r| r.source.clone()).collect(),
                    chosen: SideBatch::new(&g, true, pad),
                    rejected: SideBatch::new(&g, false, pad),
                    ref_chosen: refs.iter().map(|r| r.0).collect(),
                    ref_rejected: refs.iter().map(|r| r.1).collect(),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { groups })
    }

    pub fn rows(&self) -> usize {
        self.groups.iter().map(|g| g.chosen.rows).sum()
    }
}

/// How pair rows are tokenized: the policy's tokenizer and TRL's truncation.
pub(crate) struct Tokenizing {
    pub tokenizer: Tokenizer,
    pub eos: u32,
    pub truncation: Truncation,
}

/// One pair shard and what its rows are.
#[derive(Clone)]
struct PairShard {
    path: PathBuf,
    /// Whether its rows must name an image (the image-grounded dataset) or are text-only.
    grounded: bool,
}

/// The pairs of a split (image-grounded and/or text-only shards) with the image embeddings
/// they name.
#[derive(Clone)]
pub(crate) struct PairSplit {
    shards: Vec<PairShard>,
    images: Arc<HashMap<String, Vec<f32>>>,
    /// Digests of the feature-cache entries `images` came from.
    feature_digests: Vec<String>,
    tokenizing: Arc<Tokenizing>,
}

/// What loading a shard gave.
struct LoadedShard {
    rows: Vec<PairRow>,
    /// Pairs dropped because their prompt alone fills `max_length`.
    dropped: usize,
}

impl PairSplit {
    pub(crate) fn new(
        cfg: &Config,
        workdir: &Path,
        (image_split, text_split): (&str, &str),
        tokenizing: Arc<Tokenizing>,
    ) -> Result<Self> {
        let p = &cfg.preference;
        let mut shards = Vec::new();
        for (dataset, split, grounded) in [
            (&p.pairs_dataset, image_split, true),
            (&p.text_pairs_dataset, text_split, false),
        ] {
            if dataset.is_empty() {
                continue;
            }
            let set = ShardSet::new(workdir, dataset, split);
            let found: Vec<PairShard> = set
                .finished()?
                .into_iter()
                .map(|s| PairShard {
                    path: set.parquet_path(s),
                    grounded,
                })
                .collect();
            if found.is_empty() {
                return Err(Error::Config(format!(
                    "no finished pair shards in {}/data/{dataset}/{split}; run `pipeline run ingest` first",
                    workdir.display(),
                )));
            }
            shards.extend(found);
        }
        if shards.is_empty() {
            return Err(Error::Config(
                "preference.pairs_dataset and preference.text_pairs_dataset are both empty".into(),
            ));
        }
        let mut images = HashMap::new();
        let mut feature_digests = Vec::new();
        if !p.pairs_dataset.is_empty() {
            for e in embed::split_features(cfg, workdir, &p.image_dataset, image_split, "image")? {
                feature_digests.push(e.manifest.digest.clone());
                let t = e.open()?;
                let (dim, emb) = (t.dim, t.embeddings());
                for (i, k) in t.keys().into_iter().enumerate() {
                    images.insert(k, emb[i * dim..(i + 1) * dim].to_vec());
                }
            }
        }
        Ok(Self {
            shards,
            images: Arc::new(images),
            feature_digests,
            tokenizing,
        })
    }

    /// Rows of shard `i`, tokenized and truncated. A grounded pair without an image (or
    /// without its cached features), a text-only pair with an image, or a pair with an
    /// empty completion is an error naming the file and the pair.
    fn load(&self, i: usize) -> Result<LoadedShard> {
        let PairShard { path, grounded } = &self.shards[i];
        let pairs: Vec<PreferencePair> = read_parquet(path)?;
        let t = &self.tokenizing;
        let mut out = LoadedShard {
            rows: Vec::with_capacity(pairs.len()),
            dropped: 0,
        };
        for (row, p) in pairs.into_iter().enumerate() {
            let bad = |message: String| Error::BadRow {
                path: path.clone(),
                row: row as u64 + 1,
                message,
            };
            if p.chosen.trim().is_empty() || p.rejected.trim().is_empty() {
                return Err(bad(format!("pair `{}` has an empty completion", p.pair_id)));
            }
            let clip = match (&p.image_key, grounded) {
                (Some(key), true) => Some(self.images.get(key).cloned().ok_or_else(|| {
                    bad(format!(
                        "pair `{}`: no cached features for image `{key}`",
                        p.pair_id
                    ))
                })?),
                (None, true) => {
                    return Err(bad(format!(
                        "pair `{}` has no image_key; text-only pairs belong in preference.text_pairs_dataset",
                        p.pair_id
                    )))
                }
                (Some(key), false) => {
                    return Err(bad(format!(
                        "pair `{}` names image `{key}`, but preference.text_pairs_dataset is text-only; \
                         image pairs belong in preference.pairs_dataset",
                        p.pair_id
                    )))
                }
                (None, false) => None,
            };
            let (prompt, chosen, rejected) =
                tokenize_pair(&t.tokenizer, t.eos, &p.prompt, &p.chosen, &p.rejected)
                    .map_err(|e| bad(format!("pair `{}`: {e}", p.pair_id)))?;
            match t.truncation.apply(&prompt, &chosen, &rejected) {
                Some((chosen, rejected)) => out.rows.push(PairRow {
                    pair_id: p.pair_id,
                    source: p.source,
                    clip,
                    chosen,
                    rejected,
                }),
                None => out.dropped += 1,
            }
        }
        Ok(out)
    }

    /// Kept pairs, optimizer steps per pass at `batch_size` and dropped pairs.
    pub(crate) fn counts(&self, batch_size: usize) -> Result<(usize, usize, usize)> {
        let (mut rows, mut steps, mut dropped) = (0, 0, 0);
        for i in 0..self.shards.len() {
            let l = self.load(i)?;
            rows += l.rows.len();
            steps += l.rows.len().div_ceil(batch_size.max(1));
            dropped += l.dropped;
        }
        Ok((rows, steps, dropped))
    }

    pub(crate) fn batches(
        &self,
        batch_size: usize,
        refs: Option<Arc<RefLogps>>,
        shuffle: Option<(u64, String)>,
    ) -> Receiver<Result<PairBatch>> {
        let loader = {
            let split = self.clone();
            move |i: usize| split.load(i).map(|l| l.rows)
        };
        let pad = self.tokenizing.eos;
        let make = move |chunk: &[PairRow]| -> Result<PairBatch> {
            PairBatch::new(chunk, pad, refs.as_deref())
        };
        shard_batches(self.shards.len(), loader, make, batch_size, shuffle, 4)
    }
}

/// Per-row sums of log-probabilities and token counts of one padded side: over its
/// completion tokens, and over every real token a position predicts, prompt included (TRL's
/// ORPO takes its NLL over those).
#[allow(clippy::type_complexity)]
fn side_logps(
    model: &Captioner,
    b: &SideBatch,
) -> candle_core::Result<((Tensor, Tensor), (Tensor, Tensor))> {
    let dev = model.device();
    let clip = b
        .clip
        .as_ref()
        .map(|c| Tensor::from_slice(c, (b.rows, model.clip_dim), dev))
        .transpose()?;
    let shape = (b.rows, b.len);
    let attention = Tensor::from_slice(&b.attention, shape, dev)?;
    let mut sums = model.masked_logprobs(
        clip.as_ref(),
        &Tensor::from_slice(&b.ids, shape, dev)?,
        &attention,
        &[&Tensor::from_slice(&b.supervised, shape, dev)?, &attention],
    )?;
    let all = sums.pop().expect("two masks");
    Ok((sums.pop().expect("two masks"), all))
}

/// Per-row log-probability sums and token counts of a batch, rows in group order, and the
/// matching reference log-probabilities.
struct BatchLogps {
    /// Completion sums and counts, chosen and rejected.
    chosen: (Tensor, Tensor),
    rejected: (Tensor, Tensor),
    /// The chosen side over every predicted real token, prompt included.
    chosen_all: (Tensor, Tensor),
    ref_chosen: Vec<f32>,
    ref_rejected: Vec<f32>,
}

/// [`BatchLogps`] over all groups of a batch.
fn batch_logps(model: &Captioner, b: &PairBatch) -> candle_core::Result<BatchLogps> {
    let (mut lc, mut nc, mut lr, mut nr) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut la, mut na) = (Vec::new(), Vec::new());
    let (mut rc, mut rr) = (Vec::new(), Vec::new());
    for g in &b.groups {
        let ((a, n), (all, all_n)) = side_logps(model, &g.chosen)?;
        lc.push(a);
        nc.push(n);
        la.push(all);
        na.push(all_n);
        let ((a, n), _) = side_logps(model, &g.rejected)?;
        lr.push(a);
        nr.push(n);
        rc.extend(&g.ref_chosen);
        rr.extend(&g.ref_rejected);
    }
    let cat = |v: Vec<Tensor>| {
        if v.len() == 1 {
            Ok(v.into_iter().next().expect("one group"))
        } else {
            Tensor::cat(&v, 0)
        }
    };
    Ok(BatchLogps {
        chosen: (cat(lc)?, cat(nc)?),
        rejected: (cat(lr)?, cat(nr)?),
        chosen_all: (cat(la)?, cat(na)?),
        ref_chosen: rc,
        ref_rejected: rr,
    })
}

/// The reference log-probabilities of every pair of `split` under `reference` (the policy
/// before any update: it is the SFT checkpoint), from the cache or computed and cached
/// (Arrow IPC `pair_id, ref_chosen, ref_rejected`). The cache key covers `files` (the
/// reference's weights, settings and tokenizer), the pair shards, the image features, the
/// averaging and the truncation.
pub(crate) fn reference_logps(
    split: &PairSplit,
    reference: &Captioner,
    files: &[&Path],
    average: bool,
    workdir: &Path,
) -> Result<RefLogps> {
    let mut h = Sha256::new();
    h.update(b"reflogps-v3\0");
    for f in files {
        h.update(sha256_file(f)?.as_bytes());
    }
    // The image prefixes come from these features.
    for d in &split.feature_digests {
        h.update(d.as_bytes());
    }
    for s in &split.shards {
        h.update(sha256_file(&s.path)?.as_bytes());
        h.update([u8::from(s.grounded)]);
    }
    h.update([u8::from(average)]);
    let t = split.tokenizing.truncation;
    h.update(format!("{}/{}/{:?}", t.max_length, t.max_prompt_length, t.mode).as_bytes());
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
    let during = "reference log-probs";
    for batch in split.batches(16, None, None) {
        let batch = batch?;
        let BatchLogps {
            chosen: (lc, nc),
            rejected: (lr, nr),
            ..
        } = batch_logps(reference, &batch).during(during)?;
        let (lc, lr) = if average {
            ((lc / nc).during(during)?, (lr / nr).during(during)?)
        } else {
            (lc, lr)
        };
        ids.extend(batch.groups.iter().flat_map(|g| g.pair_ids.iter().cloned()));
        cs.extend(
            lc.to_vec1::<f32>()
                .during(during)?
                .into_iter()
                .map(f64::from),
        );
        rs.extend(
            lr.to_vec1::<f32>()
                .during(during)?
                .into_iter()
                .map(f64::from),
        );
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
    /// DPO's reference log-probabilities; `None` for ORPO.
    refs: Option<Arc<RefLogps>>,
    cfg: PreferenceConfig,
    batch_size: usize,
    seed: u64,
}

/// The loss of a batch under `method` from the policy's per-row log-probabilities.
pub(crate) fn preference_loss(
    method: Method,
    cfg: &PreferenceConfig,
    model: &Captioner,
    b: &PairBatch,
) -> candle_core::Result<crate::losses::preference::PreferenceOutput> {
    let BatchLogps {
        chosen: (lc, nc),
        rejected: (lr, nr),
        chosen_all: (la, na),
        ref_chosen: rc,
        ref_rejected: rr,
    } = batch_logps(model, b)?;
    match method {
        Method::Dpo => {
            // The SFT term's token-mean NLL of the chosen completions, as TRL's `sft` loss.
            let lc_sum = lc.sum_all()?;
            let n_chosen = f64::from(nc.sum_all()?.to_scalar::<f32>()?.max(1.0));
            let (pc, pr) = if cfg.loss.averages_tokens() {
                ((&lc / &nc)?, (&lr / &nr)?)
            } else {
                (lc, lr)
            };
            let dev = model.device();
            let rc = Tensor::from_slice(&rc, rc.len(), dev)?;
            let rr = Tensor::from_slice(&rr, rr.len(), dev)?;
            let mut out = dpo_loss(cfg.loss, cfg.beta, cfg.label_smoothing, &pc, &pr, &rc, &rr)?;
            if cfg.sft_weight > 0.0 {
                let nll = (lc_sum.neg()? / n_chosen)?;
                out.scalars
                    .push(("nll_loss".into(), f64::from(nll.to_scalar::<f32>()?)));
                out.loss = (out.loss + (nll * cfg.sft_weight)?)?;
            }
            Ok(out)
        }
        Method::Orpo => {
            // TRL's NLL: the token mean over the whole chosen sequence, prompt included.
            let nll =
                (la.sum_all()?.neg()? / f64::from(na.sum_all()?.to_scalar::<f32>()?.max(1.0)))?;
            orpo_loss(cfg.orpo_lambda, &nll, &(&lc / &nc)?, &(&lr / &nr)?)
        }
    }
}

/// Held-out preference accuracy of one pair source: which kinds of preference the model
/// learned (`synthetic:relation` needs the image, `synthetic:vague` only the text).
#[derive(Debug, Clone, PartialEq)]
pub struct SourceAccuracy {
    pub source: String,
    pub pairs: usize,
    /// Share of pairs whose chosen reward beats the rejected one (TRL's `rewards/accuracies`).
    pub accuracy: f64,
    /// Mean chosen minus rejected reward (TRL's `rewards/margins`).
    pub margin: f64,
}

/// [`SourceAccuracy`] of every pair source of `split` under `model`, sorted by source.
pub(crate) fn accuracy_by_source(
    method: Method,
    cfg: &PreferenceConfig,
    model: &Captioner,
    split: &PairSplit,
    refs: Option<Arc<RefLogps>>,
    batch_size: usize,
) -> Result<Vec<SourceAccuracy>> {
    let mut tally: std::collections::BTreeMap<String, (usize, usize, f64)> = Default::default();
    for batch in split.batches(batch_size, refs, None) {
        let batch = batch?;
        let rewards = preference_loss(method, cfg, model, &batch)
            .and_then(|out| {
                Ok((
                    out.rewards.0.to_vec1::<f32>()?,
                    out.rewards.1.to_vec1::<f32>()?,
                ))
            })
            .during("validation by pair source")?;
        let rewards = rewards.0.into_iter().zip(rewards.1);
        let sources = batch.groups.iter().flat_map(|g| g.sources.iter());
        for (source, (chosen, rejected)) in sources.zip(rewards) {
            let t = tally.entry(source.clone()).or_default();
            t.0 += 1;
            t.1 += usize::from(chosen > rejected);
            t.2 += f64::from(chosen - rejected);
        }
    }
    Ok(tally
        .into_iter()
        .map(|(source, (pairs, right, margin))| SourceAccuracy {
            source,
            pairs,
            accuracy: right as f64 / pairs as f64,
            margin: margin / pairs as f64,
        })
        .collect())
}

impl Objective for PreferenceObjective {
    type Batch = PairBatch;

    fn vars(&self) -> &VarMap {
        &self.vars
    }

    fn step(&mut self, b: &PairBatch, _train: bool) -> candle_core::Result<StepOutput> {
        let out = preference_loss(self.method, &self.cfg, &self.model, b)?;
        Ok(StepOutput {
            loss: out.loss,
            scalars: out.scalars,
            rows: b.rows(),
        })
    }

    fn train_batches(&self, epoch: usize) -> Result<Receiver<Result<PairBatch>>> {
        let shuffle = Some((self.seed, format!("pairs-epoch-{epoch}")));
        Ok(self
            .train
            .batches(self.batch_size, self.refs.clone(), shuffle))
    }

    fn val_batches(&self) -> Result<Receiver<Result<PairBatch>>> {
        Ok(self.val.batches(self.batch_size, self.refs.clone(), None))
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
    let device: Device = device_for(ctx.gpu, cfg.embed.cpu_fallback)?;
    let best = init.join("best/model.safetensors");
    let (mut model, vars) = manifest.captioner(Some(&best), &device)?;
    // The CLIP prefix takes positions too.
    let room = model
        .decoder
        .max_positions()
        .saturating_sub(if p.pairs_dataset.is_empty() {
            0
        } else {
            model.prefix_length
        });
    let max_length = match p.max_length {
        0 => room,
        l => l.min(room),
    };
    let tokenizing = Arc::new(Tokenizing {
        tokenizer: model.tokenizer.clone(),
        eos: model.eos,
        truncation: Truncation {
            max_length,
            max_prompt_length: p.max_prompt_length,
            mode: p.truncation_mode,
        },
    });
    let train = PairSplit::new(
        &cfg,
        &ctx.workdir,
        (&p.train_split, &p.text_train_split),
        tokenizing.clone(),
    )?;
    let val = PairSplit::new(
        &cfg,
        &ctx.workdir,
        (&p.val_split, &p.text_val_split),
        tokenizing,
    )?;
    let refs = if method == Method::Dpo {
        // The policy has not been updated yet: it is the reference. No second model.
        // The SFT weights (the mapper, and the decoder unless it was frozen), the decoder it
        // started from, the captioner's settings and the tokenizer.
        let captioner_json = init.join("captioner.json");
        let files = [
            best.as_path(),
            manifest.decoder_files.weights.as_path(),
            captioner_json.as_path(),
            manifest.decoder_files.tokenizer.as_path(),
        ];
        let average = p.loss.averages_tokens();
        let mut all = reference_logps(&train, &model, &files, average, &ctx.workdir)?;
        all.extend(reference_logps(
            &val,
            &model,
            &files,
            average,
            &ctx.workdir,
        )?);
        Some(Arc::new(all))
    } else {
        None
    };
    model.decoder.set_differentiable(true);
    let dir = ctx.run_dir.join(method.stage());
    std::fs::create_dir_all(&dir).at(&dir)?;
    manifest.save(&dir.join("captioner.json"))?;
    let (rows, steps_per_epoch, dropped) = train.counts(train_cfg.batch_size)?;
    let (val_rows, _, val_dropped) = val.counts(train_cfg.batch_size)?;
    for (split, kept, gone) in [
        ("training", rows, dropped),
        ("validation", val_rows, val_dropped),
    ] {
        if kept == 0 {
            return Err(Error::Config(format!(
                "{}: no {split} pairs left: all {gone} have a prompt that fills max_length {max_length} \
                 (preference.max_length, truncation_mode keep_start); raise max_length or use keep_end",
                method.stage()
            )));
        }
    }
    let mut objective = PreferenceObjective {
        method,
        model,
        vars,
        train,
        val,
        refs,
        cfg: p.clone(),
        batch_size: train_cfg.batch_size,
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
    // The selected checkpoint's held-out accuracy per pair source, logged next to the
    // overall validation metrics as `by_source/<source>/rewards/accuracies` (and margins).
    let (selected, _) =
        manifest.captioner(Some(&summary.best_dir.join("model.safetensors")), &device)?;
    let by_source = accuracy_by_source(
        method,
        p,
        &selected,
        &objective.val,
        objective.refs.clone(),
        train_cfg.batch_size,
    )?;
    let mut logged: Vec<MetricRow> = read_parquet(&metrics)?;
    let step = summary.state.best_step.unwrap_or(summary.state.step);
    for s in &by_source {
        for (name, value) in [
            ("rewards/accuracies", s.accuracy),
            ("rewards/margins", s.margin),
            ("pairs", s.pairs as f64),
        ] {
            logged.push(MetricRow {
                run_id: ctx.run_id.clone(),
                stage: method.stage().into(),
                step: step as i64,
                epoch: summary.state.epoch as i64,
                split: "val".into(),
                name: format!("by_source/{}/{name}", s.source),
                value,
            });
        }
    }
    write_parquet(&metrics, &logged)?;
    let by_source = by_source
        .iter()
        .map(|s| format!("{} {:.2}", s.source, s.accuracy))
        .collect::<Vec<_>>()
        .join(", ");
    let dropped = if dropped > 0 {
        format!(" ({dropped} dropped: prompt fills max_length {max_length})")
    } else {
        String::new()
    };
    Ok(format!(
        "{} optimizer steps over {rows} pairs{dropped} from {}; best val {} {:.4} at step {} (by source: {by_source}); {} non-finite batches skipped; checkpoints in {}",
        summary.state.step,
        p.init_from,
        objective.selection().0,
        summary.state.best_value.unwrap_or(f64::NAN),
        summary.state.best_step.unwrap_or(0),
        summary.state.skipped_nonfinite,
        dir.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::captioner::{CaptionerConfig, DecoderFiles};

    fn trunc(max_length: usize, max_prompt_length: usize, mode: TruncationMode) -> Truncation {
        Truncation {
            max_length,
            max_prompt_length,
            mode,
        }
    }

    fn side(prompt: &[u32], completion: &[u32]) -> Side {
        Side {
            prompt: prompt.to_vec(),
            completion: completion.to_vec(),
        }
    }

    #[test]
    fn truncation_follows_trl() {
        use TruncationMode::{KeepEnd, KeepStart};
        // TRL's collator example: keep_start cuts each prompt+completion to its first tokens.
        let (c, r) = trunc(4, 0, KeepStart)
            .apply(&[1, 2, 3], &[4, 5], &[6])
            .unwrap();
        assert_eq!((c, r), (side(&[1, 2, 3], &[4]), side(&[1, 2, 3], &[6])));
        // A prompt that fills max_length leaves no completion: the pair is dropped.
        assert_eq!(trunc(3, 0, KeepStart).apply(&[1, 2, 3], &[4], &[5]), None);
        // keep_end drops the prompt's start first, then the completion's.
        let (c, r) = trunc(3, 0, KeepEnd)
            .apply(&[1, 2, 3], &[4, 5], &[6])
            .unwrap();
        assert_eq!((c, r), (side(&[3], &[4, 5]), side(&[2, 3], &[6])));
        let (c, _) = trunc(2, 0, KeepEnd).apply(&[1], &[2, 3, 4], &[5]).unwrap();
        assert_eq!(c, side(&[], &[3, 4]));
        // max_prompt_length keeps the prompt's end before max_length applies.
        let (c, r) = trunc(0, 2, KeepStart)
            .apply(&[1, 2, 3], &[4, 5], &[6])
            .unwrap();
        assert_eq!((c, r), (side(&[2, 3], &[4, 5]), side(&[2, 3], &[6])));
        // No limits: unchanged.
        let (c, _) = trunc(0, 0, KeepStart).apply(&[1], &[2, 3], &[4]).unwrap();
        assert_eq!(c, side(&[1], &[2, 3]));
    }

    fn tiny_captioner() -> Captioner {
        let files = DecoderFiles::from_dir(&crate::hf_tiny_fixture("gpt2-tiny")).unwrap();
        let cfg = CaptionerConfig {
            prefix_length: 2,
            freeze_decoder: true,
            ..CaptionerConfig::default()
        };
        let mut m = Captioner::build(&cfg, 8, &files, &VarMap::new(), &Device::Cpu).unwrap();
        m.decoder.set_differentiable(false);
        m
    }

    /// The fixture reference's prompt and completion (and a shorter rejected one), tokenized.
    fn fixture_pair(m: &Captioner) -> PairIds {
        tokenize_pair(
            &m.tokenizer,
            m.eos,
            "Caption:",
            " a red circle above a blue square.",
            " two shapes.",
        )
        .unwrap()
    }

    #[test]
    fn pairs_tokenize_as_trl_does() {
        let m = tiny_captioner();
        let (p, c, r) = fixture_pair(&m);
        // The ids HF's GPT-2 tokenizer gives (the fixture's reference), end-of-text appended.
        assert_eq!(p, [24334, 1159, 25]);
        assert_eq!(c, [257, 2266, 9197, 2029, 257, 4171, 6616, 13, m.eos]);
        assert_eq!(r.last(), Some(&m.eos));
        // A prompt ending mid-word: the completion starts where prompt+completion leave the
        // prompt's tokens, so prompt + completion is exactly the joint tokenization.
        let (p, c, _) = tokenize_pair(&m.tokenizer, m.eos, "Capt", "ion: yes", "ion: no").unwrap();
        let joint = m.tokenizer.encode("Caption: yes", false).unwrap();
        let mut both = p.clone();
        both.extend(&c[..c.len() - 1]);
        assert_eq!(both, joint.get_ids());
        let alone = m.tokenizer.encode("Capt", false).unwrap();
        assert!(alone.get_ids().starts_with(&p));
    }

    #[test]
    fn text_only_completion_logprob_matches_transformers() {
        let reference: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(crate::hf_tiny_fixture("reference/gpt2-logprobs.json"))
                .unwrap(),
        )
        .unwrap();
        let want = reference["completion_logprob_sum"].as_f64().unwrap();
        let m = tiny_captioner();
        let (p, c, _) = fixture_pair(&m);
        // The reference scores no end-of-text; a second, longer row pads the first.
        let row = |prompt: Vec<u32>, completion: Vec<u32>| PairRow {
            pair_id: String::new(),
            source: String::new(),
            clip: None,
            chosen: side(&prompt, &completion),
            rejected: side(&prompt, &completion),
        };
        let rows = [
            row(p.clone(), c[..c.len() - 1].to_vec()),
            row([p.clone(), p.clone()].concat(), c.clone()),
        ];
        let b = SideBatch::new(&rows.iter().collect::<Vec<_>>(), true, m.eos);
        assert_eq!(b.len, 2 * p.len() + c.len());
        assert_eq!(b.clip, None);
        let ((sum, n), (all, all_n)) = side_logps(&m, &b).unwrap();
        let (sum, n) = (sum.to_vec1::<f32>().unwrap(), n.to_vec1::<f32>().unwrap());
        // ORPO's NLL counts every real token after the first, prompt and completion: for the
        // first row, transformers' log-prob sum over the whole sequence.
        assert_eq!(
            all_n.to_vec1::<f32>().unwrap(),
            [
                (p.len() + c.len() - 2) as f32,
                (2 * p.len() + c.len() - 1) as f32
            ]
        );
        let whole = reference["sum_logprob"].as_f64().unwrap();
        let all = f64::from(all.to_vec1::<f32>().unwrap()[0]);
        assert!((all - whole).abs() < 1e-3, "{all} vs transformers {whole}");
        assert_eq!(n, [c.len() as f32 - 1.0, c.len() as f32]);
        assert!(
            (f64::from(sum[0]) - want).abs() < 1e-4,
            "{} vs transformers {want}",
            sum[0]
        );
    }

    #[test]
    fn the_sft_term_adds_the_chosen_token_mean_nll_times_its_weight() {
        let m = tiny_captioner();
        let (p, c, r) = fixture_pair(&m);
        let row = PairRow {
            pair_id: "a".into(),
            source: "test".into(),
            clip: None,
            chosen: side(&p, &c),
            rejected: side(&p, &r),
        };
        let refs: HashMap<String, (f32, f32)> = [("a".to_string(), (-90.0, -40.0))].into();
        let batch = PairBatch::new(&[row.clone(), row], m.eos, Some(&refs)).unwrap();
        let loss = |w: f64| {
            let cfg = PreferenceConfig {
                sft_weight: w,
                ..PreferenceConfig::default()
            };
            let out = preference_loss(Method::Dpo, &cfg, &m, &batch).unwrap();
            let nll = out
                .scalars
                .iter()
                .find(|(k, _)| k == "nll_loss")
                .map(|s| s.1);
            (f64::from(out.loss.to_scalar::<f32>().unwrap()), nll)
        };
        let (plain, none) = loss(0.0);
        let (with, nll) = loss(0.5);
        assert_eq!(none, None);
        let ((sum, n), _) = side_logps(&m, &batch.groups[0].chosen).unwrap();
        let want = -f64::from(sum.sum_all().unwrap().to_scalar::<f32>().unwrap())
            / f64::from(n.sum_all().unwrap().to_scalar::<f32>().unwrap());
        assert!((nll.unwrap() - want).abs() < 1e-4, "{nll:?} vs {want}");
        assert!(
            (with - plain - 0.5 * want).abs() < 1e-3,
            "{with} vs {plain} + 0.5·{want}"
        );
    }

    #[test]
    fn mixed_batches_group_by_kind_and_keep_reference_order() {
        let row = |id: &str, clip: bool| PairRow {
            pair_id: id.into(),
            source: if clip { "image" } else { "text" }.into(),
            clip: clip.then(|| vec![1.0; 8]),
            chosen: side(&[1, 2], &[3]),
            rejected: side(&[], &[4, 5]),
        };
        let rows = [row("a", false), row("b", true), row("c", false)];
        let refs: HashMap<String, (f32, f32)> = [("a", 1.0), ("b", 2.0), ("c", 3.0)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), (v, -v)))
            .collect();
        let b = PairBatch::new(&rows, 0, Some(&refs)).unwrap();
        assert_eq!(b.rows(), 3);
        assert_eq!(b.groups.len(), 2);
        let (image, text) = (&b.groups[0], &b.groups[1]);
        assert_eq!(image.pair_ids, ["b"]);
        assert_eq!(image.chosen.clip.as_deref(), Some(&[1.0; 8][..]));
        assert_eq!(text.pair_ids, ["a", "c"]);
        assert_eq!(text.ref_chosen, [1.0, 3.0]);
        // Without a reference (ORPO) the fields are 0; a pair the cache lacks is an error.
        let free = PairBatch::new(&rows, 0, None).unwrap();
        assert_eq!(free.groups[1].ref_chosen, [0.0, 0.0]);
        let mut partial = refs.clone();
        partial.remove("c");
        let err = PairBatch::new(&rows, 0, Some(&partial)).err().unwrap();
        assert!(err.to_string().contains("pair c"), "{err}");
        assert_eq!(text.ref_rejected, [-1.0, -3.0]);
        // [prompt | completion | pad]: only completions supervised, padding not attended.
        assert_eq!(text.rejected.ids, [4, 5, 4, 5]);
        assert_eq!(text.chosen.ids, [1, 2, 3, 1, 2, 3]);
        assert_eq!(text.chosen.supervised, [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]);
        assert_eq!(image.rejected.attention, [1.0, 1.0]);
        let mut long = row("d", false);
        long.chosen = side(&[7], &[8, 9, 10]);
        let padded = SideBatch::new(&[&rows[0], &long], true, 0);
        assert_eq!(padded.ids, [1, 2, 3, 0, 7, 8, 9, 10]);
        assert_eq!(padded.supervised, [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        assert_eq!(padded.attention, [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
    }
}
