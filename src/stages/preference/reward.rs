//! `pipeline run train-reward`: a Bradley-Terry reward model on `[preference]`'s pairs
//! (image-grounded pairs with the CLIP prefix; text-only pairs conditioned on their prompt),
//! as TRL's `RewardTrainer` trains one: the captioner's architecture initialised from
//! `init_from`'s best checkpoint (`train-sft`) with a scalar head read at the last real token
//! ([`crate::models::reward`]), loss −log σ(r_c − r_r) (+ `center_rewards_coefficient` ×
//! mean (r_c + r_r)²), TRL's metrics (`accuracy`, `margin`, `min_reward`, `mean_reward`,
//! `max_reward`) and, at every validation, the held-out accuracy per pair source
//! (`by_source/<source>/accuracy`, `.../pairs`). The best checkpoint is the one with the
//! highest validation accuracy; `runs/<id>/<step>/captioner.json` and the checkpoint (the
//! head is `reward_head.weight`) rebuild it.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::datasets::pairs::{PairBatch, SideBatch};
use crate::error::{IoContext, Result};
use crate::losses::reward::bradley_terry;
use crate::metrics::embedding::cosine;
use crate::models::captioner::CaptionerManifest;
use crate::models::clip::ClipEmbedder;
use crate::models::reward::{RewardManifest, RewardModel};
use crate::stages::preference::{pair_counts, pair_splits, side_tensors, PreferenceBatches};
use crate::stages::{Stage, StageContext};
use crate::train::{
    fit, FitOutput, FitSummary, MethodDefaults, Objective, OptimizerConfig, ParamGroup,
    StepContext, StepOutput, TrainConfig, WithTraining,
};

/// `[train_reward]`'s own keys (beside the loop and optimiser keys of every trainer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    /// The captioner step whose best checkpoint the reward model starts from.
    pub init_from: String,
    /// TRL's `center_rewards_coefficient`: weight of mean (r_c + r_r)², which keeps rewards
    /// centred on zero; 0 = off.
    pub center_rewards_coefficient: f64,
    /// Adds CLIP's judgement of image-grounded captions to the reward: s · cos(CLIP image,
    /// CLIP text) with the embed stage's CLIP (frozen) and a learned scale s.
    pub clip_feature: bool,
    /// s's starting value.
    pub clip_feature_scale: f64,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            init_from: "train-sft".into(),
            center_rewards_coefficient: 0.0,
            clip_feature: false,
            clip_feature_scale: 10.0,
        }
    }
}

/// TRL's `RewardConfig` defaults where they fit a captioner-sized model: one epoch would be
/// TRL's; the synthetic pairs want a few.
impl MethodDefaults for RewardConfig {
    fn training() -> TrainConfig {
        TrainConfig {
            epochs: 3,
            batch_size: 16,
            lr: 1e-4,
            warmup_steps: 10,
            ..TrainConfig::default()
        }
    }
}

/// `[train_reward]`.
pub type TrainRewardConfig = WithTraining<RewardConfig>;

/// The Bradley-Terry objective: one parameter group, the captioner's variables and the head.
pub struct RewardObjective {
    pub model: RewardModel,
    pub vars: VarMap,
    pub center: Option<f64>,
    pub optimizer: OptimizerConfig,
    /// Held-out (correct, pairs) per source, gathered over a validation pass.
    by_source: BTreeMap<String, (usize, usize)>,
    /// The CLIP of the CLIP feature and its text embeddings by text (each text embedded once
    /// over the run).
    clip: Option<(ClipEmbedder, HashMap<String, Vec<f32>>)>,
}

impl RewardObjective {
    pub fn new(model: RewardModel, vars: VarMap, center: f64, optimizer: OptimizerConfig) -> Self {
        Self {
            model,
            vars,
            center: (center > 0.0).then_some(center),
            optimizer,
            by_source: BTreeMap::new(),
            clip: None,
        }
    }

    /// The CLIP whose image-text cosine the model's CLIP feature reads.
    pub fn with_clip(mut self, clip: ClipEmbedder) -> Self {
        self.clip = Some((clip, HashMap::new()));
        self
    }

    /// cos(CLIP image, CLIP text) of each row of an image-grounded side (its completion's
    /// text), 0 for text-only rows; `None` when the model has no CLIP feature.
    fn cosines(&mut self, s: &SideBatch) -> candle_core::Result<Option<Tensor>> {
        if !self.model.has_clip_feature() {
            return Ok(None);
        }
        let dev = self.model.captioner.device().clone();
        let Some(images) = &s.clip else {
            return Ok(Some(Tensor::zeros(s.rows, DType::F32, &dev)?));
        };
        let (clip, cache) = self.clip.as_mut().ok_or_else(|| {
            candle_core::Error::Msg("the reward model's CLIP feature needs its CLIP".into())
        })?;
        let texts: Vec<String> = (0..s.rows)
            .map(|r| {
                let row = r * s.len..(r + 1) * s.len;
                let ids: Vec<u32> = s.ids[row.clone()]
                    .iter()
                    .zip(&s.supervised[row])
                    .filter(|(_, &m)| m > 0.5)
                    .map(|(&t, _)| t)
                    .collect();
                self.model.captioner.decode_text(&ids)
            })
            .collect();
        let mut new: Vec<String> = texts
            .iter()
            .filter(|t| !cache.contains_key(*t))
            .cloned()
            .collect();
        new.sort();
        new.dedup();
        let emb = clip
            .embed_texts_normalized(&new)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        cache.extend(new.into_iter().zip(emb));
        let width = images.len() / s.rows.max(1);
        let cos: Vec<f32> = texts
            .iter()
            .enumerate()
            .map(|(r, t)| cosine(&images[r * width..(r + 1) * width], &cache[t]) as f32)
            .collect();
        Ok(Some(Tensor::from_vec(cos, s.rows, &dev)?))
    }

    /// Rewards `(rows,)` of one padded side.
    fn side(&mut self, s: &SideBatch) -> candle_core::Result<Tensor> {
        let cos = self.cosines(s)?;
        let (clip, ids, attention) = side_tensors(&self.model.captioner, s)?;
        self.model
            .rewards(clip.as_ref(), &ids, &attention, &s.attention, cos.as_ref())
    }
}

impl Objective for RewardObjective {
    type Batch = PairBatch;

    fn groups(&self) -> Vec<ParamGroup> {
        vec![ParamGroup::new(
            "reward",
            &self.vars,
            self.optimizer.clone(),
        )]
    }

    fn step(&mut self, b: &PairBatch, ctx: &StepContext) -> candle_core::Result<StepOutput> {
        let (mut chosen, mut rejected, mut sources) = (Vec::new(), Vec::new(), Vec::new());
        for g in &b.groups {
            chosen.push(self.side(&g.chosen)?);
            rejected.push(self.side(&g.rejected)?);
            sources.extend(g.sources.iter().cloned());
        }
        let chosen = Tensor::cat(&chosen, 0)?;
        let rejected = Tensor::cat(&rejected, 0)?;
        let out = bradley_terry(&chosen, &rejected, None, self.center)?;
        if !ctx.train {
            let c = chosen.to_vec1::<f32>()?;
            let r = rejected.to_vec1::<f32>()?;
            for ((c, r), source) in c.iter().zip(&r).zip(sources) {
                let e = self.by_source.entry(source).or_insert((0, 0));
                e.0 += usize::from(c > r);
                e.1 += 1;
            }
        }
        Ok(StepOutput {
            loss: out.loss,
            scalars: out.scalars,
            rows: b.rows(),
        })
    }

    fn validation_end(&mut self) -> candle_core::Result<Vec<(String, f64)>> {
        let mut out = Vec::new();
        for (source, (correct, n)) in std::mem::take(&mut self.by_source) {
            out.push((
                format!("by_source/{source}/accuracy"),
                correct as f64 / n.max(1) as f64,
            ));
            out.push((format!("by_source/{source}/pairs"), n as f64));
        }
        Ok(out)
    }

    fn selection(&self) -> Option<(&str, bool)> {
        Some(("accuracy", true))
    }
}

/// What train-reward did.
#[derive(Debug, Clone, Serialize)]
pub struct RewardSummary {
    pub pairs: usize,
    pub dropped: usize,
    pub init_from: String,
    pub fit: FitSummary,
    pub dir: String,
}

impl std::fmt::Display for RewardSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.fit.state;
        write!(
            f,
            "{} optimizer steps over {} pairs ({} dropped: prompt fills max_length) from {}; best val accuracy {:.4} at step {}; {} non-finite batches skipped; checkpoints in {}",
            s.step,
            self.pairs,
            self.dropped,
            self.init_from,
            s.best_value.unwrap_or(f64::NAN),
            s.best_step.unwrap_or(0),
            s.skipped_nonfinite,
            self.dir
        )
    }
}

/// `pipeline run train-reward`.
pub struct TrainReward;

impl Stage for TrainReward {
    const NAME: &'static str = "train-reward";
    const DESCRIPTION: &'static str =
        "Bradley-Terry reward model (the captioner + a scalar head) on the preference pairs";
    const USES_GPU: bool = true;
    const SECTION: &'static str = "train_reward";
    type Config = TrainRewardConfig;
    type Summary = RewardSummary;

    fn run(cfg: &TrainRewardConfig, ctx: &StageContext) -> Result<RewardSummary> {
        let init_from = &cfg.method.init_from;
        let init = ctx
            .find_captioner(init_from)
            .ok_or_else(|| ctx.missing(&format!("`{init_from}` checkpoint"), init_from))?;
        let manifest = CaptionerManifest::load(&init.join("captioner.json"))?;
        let clip = ctx
            .clip
            .with_model(&manifest.clip_model, &manifest.clip_revision);
        let device: Device = ctx.device()?;
        let (mut captioner, vars) =
            manifest.captioner(Some(&init.join("best/model.safetensors")), &device)?;
        let (train, val, max_length) = pair_splits(ctx, &manifest, &clip, &captioner)?;
        let (pairs, per_epoch, dropped) =
            pair_counts(Self::NAME, &train, &val, cfg.train.batch_size, max_length)?;
        captioner.decoder.set_differentiable(true);
        let m = &cfg.method;
        if !m.clip_feature_scale.is_finite() {
            return Err(crate::error::Error::Config(format!(
                "train_reward.clip_feature_scale must be a finite number, not {}",
                m.clip_feature_scale
            )));
        }
        if m.clip_feature && manifest.image_tokens > 0 {
            return Err(crate::error::Error::Config(format!(
                "train_reward.clip_feature reads pooled CLIP image embeddings, but `{init_from}` reads {} image tokens per image",
                manifest.image_tokens
            )));
        }
        let mut model = RewardModel::new(captioner, &vars, cfg.train.seed)?;
        if m.clip_feature {
            model = model.with_clip_feature(&vars, m.clip_feature_scale)?;
        }
        let dir = ctx.stage_dir(ctx.output_name(Self::NAME));
        std::fs::create_dir_all(&dir).at(&dir)?;
        manifest.save(&dir.join("captioner.json"))?;
        RewardManifest {
            clip_feature: m.clip_feature,
        }
        .save(&dir)?;
        let data = PreferenceBatches {
            train,
            val,
            refs: None,
            batch_size: cfg.train.batch_size,
            seed: cfg.train.seed,
            per_epoch,
        };
        let mut objective = RewardObjective::new(
            model,
            vars,
            cfg.method.center_rewards_coefficient,
            cfg.train.optimizer(),
        );
        if m.clip_feature {
            objective = objective.with_clip(ctx.load_clip(&ctx.feature_identity(&clip)?)?);
        }
        let fit = fit(
            &mut objective,
            &data,
            &cfg.train,
            &FitOutput {
                checkpoint_dir: &dir,
                metrics_path: &ctx.metrics_path(),
                run_id: &ctx.run_id,
                stage: ctx.output_name(Self::NAME),
            },
        )?;
        Ok(RewardSummary {
            pairs,
            dropped,
            init_from: init_from.clone(),
            fit,
            dir: dir.display().to_string(),
        })
    }
}
