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

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::datasets::pairs::{PairBatch, SideBatch};
use crate::error::{IoContext, Result};
use crate::losses::reward::bradley_terry;
use crate::models::captioner::CaptionerManifest;
use crate::models::reward::RewardModel;
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
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            init_from: "train-sft".into(),
            center_rewards_coefficient: 0.0,
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
}

impl RewardObjective {
    pub fn new(model: RewardModel, vars: VarMap, center: f64, optimizer: OptimizerConfig) -> Self {
        Self {
            model,
            vars,
            center: (center > 0.0).then_some(center),
            optimizer,
            by_source: BTreeMap::new(),
        }
    }

    /// Rewards `(rows,)` of one padded side.
    fn side(&self, s: &SideBatch) -> candle_core::Result<Tensor> {
        let (clip, ids, attention) = side_tensors(&self.model.captioner, s)?;
        self.model
            .rewards(clip.as_ref(), &ids, &attention, &s.attention)
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
        let model = RewardModel::new(captioner, &vars, cfg.train.seed)?;
        let dir = ctx.stage_dir(ctx.output_name(Self::NAME));
        std::fs::create_dir_all(&dir).at(&dir)?;
        manifest.save(&dir.join("captioner.json"))?;
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
