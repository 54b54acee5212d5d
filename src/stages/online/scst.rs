//! `pipeline run train-scst`: self-critical sequence training (Rennie et al., CVPR 2017), the
//! classic baseline DiCO is measured against.
//!
//! Per training image, `samples` captions are drawn from the current policy (multinomial at
//! `temperature`, seeded per batch) and the greedy caption is decoded as the baseline; each
//! sample's advantage is its reward minus the greedy caption's ([`super::Reward`]: CIDEr-D by
//! default, or the CLIP reward DiCO uses), and the loss is the advantage-weighted negative
//! log-likelihood of the sampled tokens, averaged over tokens ([`crate::losses::scst`]).

use serde::{Deserialize, Serialize};

use crate::datasets::captions::ImageBatch;
use crate::error::Result;
use crate::losses::scst::scst_loss;
use crate::models::captioner::{DecodeMethod, Generated};
use crate::stages::online::{
    batch_seed, check_reward, online_training, prepare, run_fit, Online, OnlineMethod,
    OnlineSettings, OnlineSummary, RewardKind, RewardSettings,
};
use crate::stages::{Stage, StageContext};
use crate::train::{MethodDefaults, OptimizerConfig, StepOutput, TrainConfig, WithTraining};

/// `[train_scst]`'s own keys (beside the loop and optimiser keys of every trainer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScstConfig {
    /// The captioner step whose best checkpoint is the starting policy.
    pub init_from: String,
    /// Sampled captions per image.
    pub samples: usize,
    /// Sampling temperature (1 = the policy's own distribution).
    pub temperature: f64,
    /// `cider` or `clip`.
    pub reward: RewardKind,
    pub reward_weight: f64,
    /// A CLIP checkpoint for the `clip` reward; empty = the captioner's CLIP.
    pub reward_model: String,
    pub reward_revision: String,
    /// Caption tokens generated; 0 = `captioner.max_caption_tokens`.
    pub max_tokens: usize,
    /// Training images: the first N of the split; 0 = all.
    pub max_train_images: u64,
    /// Validation images captioned at each validation; 0 = all.
    pub val_images: u64,
    /// The validation metric that picks the best checkpoint.
    pub select_by: String,
}

impl Default for ScstConfig {
    fn default() -> Self {
        Self {
            init_from: "train-sft".into(),
            samples: 5,
            temperature: 1.0,
            reward: RewardKind::Cider,
            reward_weight: 1.0,
            reward_model: String::new(),
            reward_revision: "main".into(),
            max_tokens: 0,
            max_train_images: 0,
            val_images: 0,
            select_by: "val/RefCLIPScore".into(),
        }
    }
}

impl MethodDefaults for ScstConfig {
    fn training() -> TrainConfig {
        online_training()
    }
}

impl ScstConfig {
    fn settings(&self) -> OnlineSettings {
        OnlineSettings {
            init_from: self.init_from.clone(),
            reward: RewardSettings {
                kind: self.reward,
                weight: self.reward_weight,
                model: self.reward_model.clone(),
                revision: self.reward_revision.clone(),
            },
            max_tokens: self.max_tokens,
            max_train_images: self.max_train_images,
            val_images: self.val_images,
            select_by: self.select_by.clone(),
        }
    }
}

/// `[train_scst]`.
pub type TrainScstConfig = WithTraining<ScstConfig>;

/// Advantages of samples over their image's greedy caption: `r(sample) − r(greedy)`, or
/// `None` where either reward is not finite (the sample is skipped and counted).
pub fn advantages(
    sample_rewards: &[f64],
    greedy_rewards: &[f64],
    samples: usize,
) -> Vec<Option<f64>> {
    sample_rewards
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let base = greedy_rewards[i / samples.max(1)];
            (r.is_finite() && base.is_finite()).then(|| r - base)
        })
        .collect()
}

/// The SCST objective.
pub struct ScstObjective {
    pub online: Online,
    pub cfg: ScstConfig,
    pub optimizer: OptimizerConfig,
}

impl OnlineMethod for ScstObjective {
    fn online(&self) -> &Online {
        &self.online
    }

    fn online_mut(&mut self) -> &mut Online {
        &mut self.online
    }

    fn optimizer(&self) -> &OptimizerConfig {
        &self.optimizer
    }

    fn train_step(&mut self, b: &ImageBatch, epoch: usize) -> candle_core::Result<StepOutput> {
        let o = &mut self.online;
        let feats = o.features(b)?;
        let n = self.cfg.samples.max(1);
        let rows: Vec<u32> = (0..b.rows as u32)
            .flat_map(|i| std::iter::repeat_n(i, n))
            .collect();
        let repeated = feats.index_select(
            &candle_core::Tensor::from_slice(&rows, rows.len(), feats.device())?,
            0,
        )?;
        let sampling = DecodeMethod::Sample {
            top_p: 1.0,
            temperature: self.cfg.temperature,
            seed: batch_seed(o.seed, epoch, b),
        };
        let max = o.max_tokens;
        let (samples, greedy) = o.search(|p| {
            Ok((
                p.generate(&repeated, &sampling, max)?,
                p.generate(&feats, &DecodeMethod::Greedy, max)?,
            ))
        })?;
        let keys: Vec<&str> = b.keys.iter().map(String::as_str).collect();
        let sample_keys: Vec<&str> = rows.iter().map(|&i| keys[i as usize]).collect();
        let sample_rewards = o.rewards(&sample_keys, &samples.iter().collect::<Vec<_>>())?;
        let greedy_rewards = o.rewards(&keys, &greedy.iter().collect::<Vec<_>>())?;
        let adv = advantages(&sample_rewards, &greedy_rewards, n);
        let skipped = adv.iter().filter(|a| a.is_none()).count();
        o.skipped_rewards += skipped as u64;

        let mean = |v: &[f64]| crate::metrics::mean(v.iter().copied());
        let finite =
            |v: &[f64]| -> Vec<f64> { v.iter().copied().filter(|r| r.is_finite()).collect() };
        let kept: Vec<usize> = (0..adv.len()).filter(|&i| adv[i].is_some()).collect();
        let a: Vec<f64> = kept.iter().map(|&i| adv[i].unwrap_or(0.0)).collect();
        let eos = o.policy.eos;
        let lengths: Vec<f64> = samples
            .iter()
            .map(|g| g.ids.iter().filter(|&&t| t != eos).count() as f64)
            .collect();
        let per_image: Vec<Vec<&Generated>> =
            samples.chunks(n).map(|c| c.iter().collect()).collect();
        let mut scalars = vec![
            ("reward/mean".to_string(), mean(&finite(&sample_rewards))),
            ("reward/greedy".to_string(), mean(&finite(&greedy_rewards))),
            (
                "reward/max".to_string(),
                finite(&sample_rewards).into_iter().fold(f64::NAN, f64::max),
            ),
            (
                "reward/min".to_string(),
                finite(&sample_rewards).into_iter().fold(f64::NAN, f64::min),
            ),
            ("reward/skipped".to_string(), skipped as f64),
            ("advantage/mean".to_string(), mean(&a)),
            (
                "advantage/positive".to_string(),
                mean(
                    &a.iter()
                        .map(|x| f64::from(u8::from(*x > 0.0)))
                        .collect::<Vec<_>>(),
                ),
            ),
            ("samples/mean_length".to_string(), mean(&lengths)),
            (
                "samples/distinct".to_string(),
                Online::distinct_share(&per_image),
            ),
        ];
        if kept.is_empty() {
            return StepOutput::nothing(o.policy.device(), scalars);
        }
        let image_of: Vec<u32> = kept.iter().map(|&i| rows[i]).collect();
        let gens: Vec<&Generated> = kept.iter().map(|&i| &samples[i]).collect();
        let (logps, tokens) = Online::teacher_forced(&o.policy, &feats, &image_of, &gens)?;
        let a32: Vec<f32> = a.iter().map(|&x| x as f32).collect();
        let loss = scst_loss(&logps, &tokens, &a32)?;
        scalars.push((
            "logps/samples".to_string(),
            f64::from(logps.detach().mean_all()?.to_scalar::<f32>()?),
        ));
        Ok(StepOutput {
            loss,
            scalars,
            rows: b.rows,
        })
    }
}

/// `pipeline run train-scst`.
pub struct TrainScst;

impl Stage for TrainScst {
    const NAME: &'static str = "train-scst";
    const DESCRIPTION: &'static str =
        "self-critical sequence training: sampled captions against the greedy baseline, CIDEr-D or CLIP reward";
    const USES_GPU: bool = true;
    const SECTION: &'static str = "train_scst";
    type Config = TrainScstConfig;
    type Summary = OnlineSummary;

    fn run(cfg: &TrainScstConfig, ctx: &StageContext) -> Result<OnlineSummary> {
        let settings = cfg.method.settings();
        check_reward(&settings.reward, Self::SECTION)?;
        if cfg.method.samples == 0
            || cfg.method.temperature.is_nan()
            || cfg.method.temperature <= 0.0
        {
            return Err(crate::error::Error::Config(format!(
                "train_scst: samples ({}) and temperature ({}) must be positive",
                cfg.method.samples, cfg.method.temperature
            )));
        }
        let (online, prepared) = prepare(Self::NAME, &settings, &cfg.train, ctx)?;
        let mut objective = ScstObjective {
            online,
            cfg: cfg.method.clone(),
            optimizer: cfg.train.optimizer(),
        };
        run_fit(
            Self::NAME,
            &mut objective,
            &prepared,
            |o| &o.online,
            &cfg.train,
            &settings,
            ctx,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantage_is_the_sample_reward_minus_its_images_greedy_reward() {
        let samples = [0.9, 0.2, f64::NAN, 0.5, 0.6, 0.7];
        let greedy = [0.5, f64::NAN];
        let a = advantages(&samples, &greedy, 3);
        assert!(
            (a[0].unwrap() - 0.4).abs() < 1e-12,
            "above the baseline: positive"
        );
        assert!((a[1].unwrap() + 0.3).abs() < 1e-12, "below: negative");
        assert_eq!(a[2], None, "a NaN sample reward is skipped");
        assert!(a[3..].iter().all(Option::is_none), "no baseline: skipped");
    }
}
