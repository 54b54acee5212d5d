//! `pipeline run train-dpo` and `train-orpo`: preference optimisation of the captioner on
//! image-grounded pairs (`image_key` set: the CLIP prefix is the prompt) and text-only pairs,
//! through the training engine. Both read `[preference]` (data and losses) and their own
//! section (`[train_dpo]`, `[train_orpo]`: the loop and the optimiser).
//!
//! DPO starts from the SFT checkpoint, which is also the frozen reference. The reference's
//! sequence log-probabilities are computed once per (reference checkpoint, pair shards) and
//! kept in the content-addressed cache (`cache/reflogps-v2/`), so training holds no second
//! model and re-runs reuse them. ORPO starts from the same checkpoint and needs no reference.
//! Pairs stream from a loader thread ([`crate::datasets::pairs`]) over a bounded channel; the
//! training thread only computes. `train-reward` ([`reward`]) reads the same pairs.

pub mod reward;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use crossbeam_channel::Receiver;
use serde::{Deserialize, Serialize};

use crate::data::cache::{digest_of, ContentCache, Lookup};
use crate::data::records::{MetricRow, ReferenceLogps};
use crate::data::shard::{read_parquet, write_parquet, write_parquet_to};
use crate::datasets::pairs::{
    PairBatch, PairSource, PairSplit, RefLogps, SideBatch, Tokenizing, Truncation,
};
use crate::error::{CandleContext, Error, IoContext, Result};
use crate::io::sha256_file;
use crate::losses::preference::{dpo_loss, orpo_loss};
use crate::models::captioner::{Captioner, CaptionerManifest};
use crate::stages::context::PreferenceConfig;
use crate::stages::{Stage, StageContext};
use crate::train::{
    fit, Batches, FitOutput, FitSummary, Objective, OptimizerConfig, ParamGroup, StepContext,
    StepOutput, TrainConfig,
};

/// `pipeline run train-dpo`.
pub struct TrainDpo;

impl Stage for TrainDpo {
    const NAME: &'static str = "train-dpo";
    const DESCRIPTION: &'static str =
        "direct preference optimisation (sigmoid/hinge/IPO/robust) from the SFT model";
    const USES_GPU: bool = true;
    const SECTION: &'static str = "train_dpo";
    type Config = TrainConfig;
    type Summary = PreferenceSummary;

    fn run(cfg: &TrainConfig, ctx: &StageContext) -> Result<PreferenceSummary> {
        train(Method::Dpo, cfg, ctx)
    }
}

/// `pipeline run train-orpo`.
pub struct TrainOrpo;

impl Stage for TrainOrpo {
    const NAME: &'static str = "train-orpo";
    const DESCRIPTION: &'static str = "odds-ratio preference optimisation (reference-free)";
    const USES_GPU: bool = true;
    const SECTION: &'static str = "train_orpo";
    type Config = TrainConfig;
    type Summary = PreferenceSummary;

    fn run(cfg: &TrainConfig, ctx: &StageContext) -> Result<PreferenceSummary> {
        train(Method::Orpo, cfg, ctx)
    }
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

/// What a preference stage did.
#[derive(Debug, Clone, Serialize)]
pub struct PreferenceSummary {
    /// Training pairs kept, and those dropped because their prompt fills `max_length`.
    pub pairs: usize,
    pub dropped: usize,
    pub max_length: usize,
    pub init_from: String,
    /// The validation scalar that chose the best checkpoint.
    pub selection: String,
    /// The best checkpoint's held-out accuracy per pair source.
    pub by_source: Vec<SourceAccuracy>,
    pub fit: FitSummary,
    pub dir: String,
}

impl std::fmt::Display for PreferenceSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let by_source = self
            .by_source
            .iter()
            .map(|s| format!("{} {:.2}", s.source, s.accuracy))
            .collect::<Vec<_>>()
            .join(", ");
        let dropped = if self.dropped > 0 {
            format!(
                " ({} dropped: prompt fills max_length {})",
                self.dropped, self.max_length
            )
        } else {
            String::new()
        };
        let s = &self.fit.state;
        write!(
            f,
            "{} optimizer steps over {} pairs{dropped} from {}; best val {} {:.4} at step {} (by source: {by_source}); {} non-finite batches skipped; checkpoints in {}",
            s.step,
            self.pairs,
            self.init_from,
            self.selection,
            s.best_value.unwrap_or(f64::NAN),
            s.best_step.unwrap_or(0),
            s.skipped_nonfinite,
            self.dir
        )
    }
}

/// Per-row sums of log-probabilities and token counts of one padded side: over its
/// completion tokens, and over every real token a position predicts, prompt included (TRL's
/// ORPO takes its NLL over those).
#[allow(clippy::type_complexity)]
pub fn side_logps(
    model: &Captioner,
    b: &SideBatch,
) -> candle_core::Result<((Tensor, Tensor), (Tensor, Tensor))> {
    let (clip, ids, attention) = side_tensors(model, b)?;
    let supervised = Tensor::from_slice(&b.supervised, (b.rows, b.len), model.device())?;
    let mut sums =
        model.masked_logprobs(clip.as_ref(), &ids, &attention, &[&supervised, &attention])?;
    let all = sums.pop().expect("two masks");
    Ok((sums.pop().expect("two masks"), all))
}

/// One padded side on `model`'s device: its CLIP features (image-grounded pairs), token ids
/// and attention mask.
pub fn side_tensors(
    model: &Captioner,
    b: &SideBatch,
) -> candle_core::Result<(Option<Tensor>, Tensor, Tensor)> {
    let dev = model.device();
    let clip = b
        .clip
        .as_ref()
        .map(|c| Tensor::from_slice(c, (b.rows, model.clip_dim), dev))
        .transpose()?;
    let shape = (b.rows, b.len);
    Ok((
        clip,
        Tensor::from_slice(&b.ids, shape, dev)?,
        Tensor::from_slice(&b.attention, shape, dev)?,
    ))
}

/// Per-row log-probability sums and token counts of a batch, rows in group order, and the
/// matching reference log-probabilities.
pub struct BatchLogps {
    /// Completion sums and counts, chosen and rejected.
    chosen: (Tensor, Tensor),
    rejected: (Tensor, Tensor),
    /// The chosen side over every predicted real token, prompt included.
    chosen_all: (Tensor, Tensor),
    ref_chosen: Vec<f32>,
    ref_rejected: Vec<f32>,
}

/// [`BatchLogps`] over all groups of a batch.
pub fn batch_logps(model: &Captioner, b: &PairBatch) -> candle_core::Result<BatchLogps> {
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

/// What a reference-log-prob cache entry was computed from (its manifest's key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceKey {
    /// sha256 of the reference's files: weights, base decoder, settings, tokenizer.
    pub files_sha256: Vec<String>,
    /// Digests of the feature-cache entries the image prefixes come from.
    pub feature_digests: Vec<String>,
    /// sha256 of each pair shard, and whether its pairs are image-grounded.
    pub shards: Vec<(String, bool)>,
    /// Token-averaged log-probabilities (IPO) or sums.
    pub average: bool,
    /// `max_length/max_prompt_length/truncation_mode`.
    pub truncation: String,
}

/// The cache bucket of reference log-probabilities: one Parquet table of
/// [`ReferenceLogps`] per (reference, pair split).
const REFERENCE_BUCKET: &str = "reflogps-v2";

/// The reference log-probabilities of every pair of `split` under `reference` (the policy
/// before any update: it is the SFT checkpoint), from the content-addressed cache or computed
/// and cached. The digest covers `files` (the reference's weights, settings and tokenizer),
/// the pair shards, the image features, the averaging and the truncation.
pub fn reference_logps(
    split: &PairSplit,
    reference: &Captioner,
    files: &[&std::path::Path],
    average: bool,
    workdir: &std::path::Path,
) -> Result<RefLogps> {
    let t = split.tokenizing.truncation;
    let key = ReferenceKey {
        files_sha256: files
            .iter()
            .map(|f| sha256_file(f))
            .collect::<Result<_>>()?,
        feature_digests: split.feature_digests.clone(),
        shards: split
            .shards
            .iter()
            .map(|s| Ok((sha256_file(&s.path)?, s.grounded)))
            .collect::<Result<_>>()?,
        average,
        truncation: format!("{}/{}/{:?}", t.max_length, t.max_prompt_length, t.mode),
    };
    let key_json = serde_json::to_vec(&key).map_err(|e| Error::Invalid(e.to_string()))?;
    let digest = digest_of([REFERENCE_BUCKET.as_bytes(), key_json.as_slice()]);
    let cache = ContentCache::new(workdir, REFERENCE_BUCKET, "parquet");
    cache.sweep_temp()?;
    let path = cache.paths(&digest).0;
    let rows = match cache.lookup::<ReferenceKey>(&digest, |m, _| {
        (m.key == key)
            .then_some(())
            .ok_or_else(|| "the manifest's key differs".to_string())
    })? {
        Lookup::Hit(entry) => read_parquet::<ReferenceLogps>(&entry.path)?,
        Lookup::Corrupt { reason } => {
            eprintln!("[train-dpo] cached reference log-probs are corrupt ({reason}); recomputing");
            compute_reference_logps(split, reference, average, &cache, &digest, key, &path)?
        }
        Lookup::Missing => {
            compute_reference_logps(split, reference, average, &cache, &digest, key, &path)?
        }
    };
    Ok(rows
        .into_iter()
        .map(|r| (r.pair_id, (r.ref_chosen as f32, r.ref_rejected as f32)))
        .collect())
}

/// Runs `reference` over every pair of `split` and stores the rows as cache entry `digest`.
fn compute_reference_logps(
    split: &PairSplit,
    reference: &Captioner,
    average: bool,
    cache: &ContentCache,
    digest: &str,
    key: ReferenceKey,
    path: &std::path::Path,
) -> Result<Vec<ReferenceLogps>> {
    let mut rows = Vec::new();
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
        let ids = batch.groups.iter().flat_map(|g| g.pair_ids.iter().cloned());
        let chosen = lc.to_vec1::<f32>().during(during)?;
        let rejected = lr.to_vec1::<f32>().during(during)?;
        for ((pair_id, c), r) in ids.zip(chosen).zip(rejected) {
            rows.push(ReferenceLogps {
                pair_id,
                ref_chosen: f64::from(c),
                ref_rejected: f64::from(r),
            });
        }
    }
    let mut entry = cache.writer(digest)?;
    write_parquet_to(&mut entry, &rows, path)?;
    entry.finish(key, rows.len() as u64)?;
    Ok(rows)
}

/// The policy's preference loss: one parameter group, the captioner's trainable variables.
pub struct PreferenceObjective {
    pub method: Method,
    pub model: Captioner,
    pub vars: VarMap,
    pub cfg: PreferenceConfig,
    pub optimizer: OptimizerConfig,
}

/// The pair batches of a preference stage, with DPO's reference log-probabilities.
pub struct PreferenceBatches {
    pub train: PairSplit,
    pub val: PairSplit,
    /// DPO's reference log-probabilities; `None` for ORPO.
    pub refs: Option<Arc<RefLogps>>,
    pub batch_size: usize,
    pub seed: u64,
    pub per_epoch: usize,
}

impl Batches<PairBatch> for PreferenceBatches {
    fn train(&self, epoch: usize) -> Result<Receiver<Result<PairBatch>>> {
        let shuffle = Some((self.seed, format!("pairs-epoch-{epoch}")));
        Ok(self
            .train
            .batches(self.batch_size, self.refs.clone(), shuffle))
    }

    fn val(&self) -> Result<Receiver<Result<PairBatch>>> {
        Ok(self.val.batches(self.batch_size, self.refs.clone(), None))
    }

    fn per_epoch(&self) -> usize {
        self.per_epoch
    }
}

/// The loss of a batch under `method` from the policy's per-row log-probabilities.
pub fn preference_loss(
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
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceAccuracy {
    pub source: String,
    pub pairs: usize,
    /// Share of pairs whose chosen reward beats the rejected one (TRL's `rewards/accuracies`).
    pub accuracy: f64,
    /// Mean chosen minus rejected reward (TRL's `rewards/margins`).
    pub margin: f64,
}

/// [`SourceAccuracy`] of every pair source of `split` under `model`, sorted by source.
pub fn accuracy_by_source(
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

    fn groups(&self) -> Vec<ParamGroup> {
        vec![ParamGroup::new(
            "captioner",
            &self.vars,
            self.optimizer.clone(),
        )]
    }

    fn step(&mut self, b: &PairBatch, _ctx: &StepContext) -> candle_core::Result<StepOutput> {
        let out = preference_loss(self.method, &self.cfg, &self.model, b)?;
        Ok(StepOutput {
            loss: out.loss,
            scalars: out.scalars,
            rows: b.rows(),
        })
    }

    fn selection(&self) -> Option<(&str, bool)> {
        Some(match self.method {
            Method::Dpo => ("rewards/accuracies", true),
            Method::Orpo => ("loss", false),
        })
    }
}

/// Trains the `[preference]` policy with `method` under `train_cfg` (its stage's section).
/// The training and validation pair splits of `[preference]` for `model` (the captioner of
/// `manifest`, whose CLIP `clip` names the image features), tokenized and truncated as TRL
/// does, and the `max_length` they were truncated to.
pub fn pair_splits(
    ctx: &StageContext,
    manifest: &CaptionerManifest,
    clip: &crate::stages::context::ClipConfig,
    model: &Captioner,
) -> Result<(PairSplit, PairSplit, usize)> {
    let p = &ctx.preference;
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
    let split = |image_split: &str, text_split: &str| -> Result<PairSplit> {
        let mut sources = Vec::new();
        let mut features = Vec::new();
        if !p.pairs_dataset.is_empty() {
            sources.push(PairSource {
                dataset: p.pairs_dataset.clone(),
                split: image_split.to_string(),
                grounded: true,
            });
            features = ctx
                .captioner_features(&manifest.captioner, clip, &p.image_dataset, image_split)?
                .0;
        }
        if !p.text_pairs_dataset.is_empty() {
            sources.push(PairSource {
                dataset: p.text_pairs_dataset.clone(),
                split: text_split.to_string(),
                grounded: false,
            });
        }
        PairSplit::new(&ctx.workdir, &sources, &features, tokenizing.clone())
    };
    let train = split(&p.train_split, &p.text_train_split)?;
    let val = split(&p.val_split, &p.text_val_split)?;
    Ok((train, val, max_length))
}

/// Pairs kept for training, batches per epoch, and pairs dropped (their prompt fills
/// `max_length`); an error naming `stage` when either split has no pair left.
pub fn pair_counts(
    stage: &str,
    train: &PairSplit,
    val: &PairSplit,
    batch_size: usize,
    max_length: usize,
) -> Result<(usize, usize, usize)> {
    let (rows, steps_per_epoch, dropped) = train.counts(batch_size)?;
    let (val_rows, _, val_dropped) = val.counts(batch_size)?;
    for (split, kept, gone) in [
        ("training", rows, dropped),
        ("validation", val_rows, val_dropped),
    ] {
        if kept == 0 {
            return Err(Error::Config(format!(
                "{}: no {split} pairs left: all {gone} have a prompt that fills max_length {max_length} \
                 (preference.max_length, truncation_mode keep_start); raise max_length or use keep_end",
                stage
            )));
        }
    }
    Ok((rows, steps_per_epoch, dropped))
}

fn train(method: Method, train_cfg: &TrainConfig, ctx: &StageContext) -> Result<PreferenceSummary> {
    let p = &ctx.preference;
    let init = ctx
        .find_captioner(&p.init_from)
        .ok_or_else(|| ctx.missing(&format!("`{}` checkpoint", p.init_from), &p.init_from))?;
    let manifest = CaptionerManifest::load(&init.join("captioner.json"))?;
    // The policy's own CLIP names the image features of the pairs.
    let clip = ctx
        .clip
        .with_model(&manifest.clip_model, &manifest.clip_revision);
    let device: Device = ctx.device()?;
    let best = init.join("best/model.safetensors");
    let (mut model, vars) = manifest.captioner(Some(&best), &device)?;
    let (train, val, max_length) = pair_splits(ctx, &manifest, &clip, &model)?;
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
    let dir = ctx.stage_dir(ctx.output_name(method.stage()));
    std::fs::create_dir_all(&dir).at(&dir)?;
    manifest.save(&dir.join("captioner.json"))?;
    let (rows, steps_per_epoch, dropped) = pair_counts(
        method.stage(),
        &train,
        &val,
        train_cfg.batch_size,
        max_length,
    )?;
    let data = PreferenceBatches {
        train,
        val,
        refs,
        batch_size: train_cfg.batch_size,
        seed: train_cfg.seed,
        per_epoch: steps_per_epoch,
    };
    let mut objective = PreferenceObjective {
        method,
        model,
        vars,
        cfg: p.clone(),
        optimizer: train_cfg.optimizer(),
    };
    let metrics = ctx.metrics_path();
    let summary = fit(
        &mut objective,
        &data,
        train_cfg,
        &FitOutput {
            checkpoint_dir: &dir,
            metrics_path: &metrics,
            run_id: &ctx.run_id,
            stage: ctx.output_name(method.stage()),
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
        &data.val,
        data.refs.clone(),
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
                stage: ctx.output_name(method.stage()).into(),
                step: step as i64,
                epoch: summary.state.epoch as i64,
                split: "val".into(),
                name: format!("by_source/{}/{name}", s.source),
                value,
            });
        }
    }
    write_parquet(&metrics, &logged)?;
    let (selection, _) = objective.selection().unwrap_or(("loss", false));
    Ok(PreferenceSummary {
        pairs: rows,
        dropped,
        max_length,
        init_from: p.init_from.clone(),
        selection: selection.to_string(),
        by_source,
        fit: summary,
        dir: dir.display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    use crate::datasets::pairs::tests::{fixture_pair, side, tiny_captioner};
    use crate::datasets::pairs::PairRow;

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
}
