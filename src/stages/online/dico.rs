//! `pipeline run train-dico`: Direct CLIP-based Optimisation (Moratelli et al., BMVC 2024).
//!
//! Per training image, `candidates` beam-search captions of the current policy are rewarded
//! ([`super::Reward`], CLIP-S × `reward_weight` by default); the best one is the winner and
//! the others losers weighted by γ ([`crate::losses::dico`]). Their sequence log-probabilities
//! under the policy (with gradients) and under the frozen reference (the `init_from`
//! checkpoint, resident in memory) come from one teacher-forced pass each over the generated
//! tokens, end-of-text included, padding masked. The loss keeps the policy near the
//! reference while it moves toward the captions CLIP prefers.

use serde::{Deserialize, Serialize};

use crate::datasets::captions::ImageBatch;
use crate::error::Result;
use crate::losses::dico::{dico_loss, rank_candidates, Ranking};
use crate::models::captioner::{Captioner, Generated};
use crate::stages::online::{
    check_reward, frozen_reference, online_training, prepare, run_fit, Online, OnlineMethod,
    OnlineSettings, OnlineSummary, RewardKind, RewardSettings,
};
use crate::stages::{Stage, StageContext};
use crate::train::{MethodDefaults, OptimizerConfig, StepOutput, TrainConfig, WithTraining};

/// `[train_dico]`'s own keys (beside the loop and optimiser keys of every trainer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DicoConfig {
    /// The captioner step whose best checkpoint is the starting policy and the frozen
    /// reference.
    pub init_from: String,
    /// Beam width and candidates per image.
    pub candidates: usize,
    pub length_penalty: f64,
    /// β of the DPO-like loss.
    pub beta: f64,
    /// τ of the losers' weights softmax(τ (r_max − r_i)).
    pub tau: f64,
    /// `clip` or `cider`.
    pub reward: RewardKind,
    pub reward_weight: f64,
    /// A CLIP checkpoint for the reward (a PAC-S-style fine-tuned CLIP loads the same way);
    /// empty = the captioner's CLIP. Embed its image features first.
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

impl Default for DicoConfig {
    fn default() -> Self {
        Self {
            init_from: "train-sft".into(),
            candidates: 5,
            length_penalty: 1.0,
            beta: 0.2,
            tau: 300.0,
            reward: RewardKind::Clip,
            reward_weight: 2.0,
            reward_model: String::new(),
            reward_revision: "main".into(),
            max_tokens: 0,
            max_train_images: 0,
            val_images: 0,
            select_by: "val/RefCLIPScore".into(),
        }
    }
}

impl MethodDefaults for DicoConfig {
    fn training() -> TrainConfig {
        online_training()
    }
}

impl DicoConfig {
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

/// `[train_dico]`.
pub type TrainDicoConfig = WithTraining<DicoConfig>;

/// The DiCO objective: the policy, its frozen reference and the method's settings.
pub struct DicoObjective {
    pub online: Online,
    pub reference: Captioner,
    pub cfg: DicoConfig,
    pub optimizer: OptimizerConfig,
    /// The candidates' mean length (tokens, end-of-text aside) in the last training step.
    pub last_mean_length: f64,
}

impl OnlineMethod for DicoObjective {
    fn online(&self) -> &Online {
        &self.online
    }

    fn online_mut(&mut self) -> &mut Online {
        &mut self.online
    }

    fn optimizer(&self) -> &OptimizerConfig {
        &self.optimizer
    }

    fn train_step(&mut self, b: &ImageBatch, _epoch: usize) -> candle_core::Result<StepOutput> {
        let o = &mut self.online;
        let feats = o.features(b)?;
        let (k, lp, max) = (
            self.cfg.candidates.max(2),
            self.cfg.length_penalty,
            o.max_tokens,
        );
        let cands = o.search(|p| p.beam_search_candidates(&feats, k, lp, max))?;
        let keys: Vec<&str> = cands
            .iter()
            .zip(&b.keys)
            .flat_map(|(c, key)| std::iter::repeat_n(key.as_str(), c.len()))
            .collect();
        let flat: Vec<&Generated> = cands.iter().flatten().collect();
        let rewards = o.rewards(&keys, &flat)?;
        let skipped = rewards.iter().filter(|r| !r.is_finite()).count();
        o.skipped_rewards += skipped as u64;

        // Images with at least two finite rewards, their candidates as rows.
        let (mut rankings, mut rows, mut image_of, mut gens): (
            Vec<Ranking>,
            Vec<Vec<usize>>,
            _,
            _,
        ) = (
            Vec::new(),
            Vec::new(),
            Vec::<u32>::new(),
            Vec::<&Generated>::new(),
        );
        let (mut winners, mut at) = (Vec::new(), 0);
        for (i, c) in cands.iter().enumerate() {
            let r = &rewards[at..at + c.len()];
            if let Some(rank) = rank_candidates(r, self.cfg.tau) {
                winners.push(r[rank.winner]);
                rows.push((gens.len()..gens.len() + c.len()).collect());
                rankings.push(rank);
                image_of.extend(std::iter::repeat_n(i as u32, c.len()));
                gens.extend(c.iter());
            }
            at += c.len();
        }
        let finite: Vec<f64> = rewards.iter().copied().filter(|r| r.is_finite()).collect();
        let mean = |v: &[f64]| crate::metrics::mean(v.iter().copied());
        let eos = o.policy.eos;
        let lengths: Vec<f64> = flat
            .iter()
            .map(|g| g.ids.iter().filter(|&&t| t != eos).count() as f64)
            .collect();
        self.last_mean_length = mean(&lengths);
        let mut scalars = vec![
            ("reward/mean".to_string(), mean(&finite)),
            (
                "reward/max".to_string(),
                finite.iter().copied().fold(f64::NAN, f64::max),
            ),
            (
                "reward/min".to_string(),
                finite.iter().copied().fold(f64::NAN, f64::min),
            ),
            ("reward/winner".to_string(), mean(&winners)),
            ("reward/skipped".to_string(), skipped as f64),
            ("candidates/mean_length".to_string(), mean(&lengths)),
            (
                "candidates/distinct".to_string(),
                Online::distinct_share(
                    &cands.iter().map(|c| c.iter().collect()).collect::<Vec<_>>(),
                ),
            ),
        ];
        if rankings.is_empty() {
            return StepOutput::nothing(o.policy.device(), scalars);
        }
        let (policy, _) = Online::teacher_forced(&o.policy, &feats, &image_of, &gens)?;
        let (reference, _) = Online::teacher_forced(&self.reference, &feats, &image_of, &gens)?;
        let out = dico_loss(
            &policy,
            &reference.detach(),
            &rankings,
            &rows,
            self.cfg.beta,
        )?;
        let chosen = out.chosen.to_vec1::<f32>()?;
        let rejected = out.rejected.to_vec1::<f32>()?;
        let m32 = |v: &[f32]| crate::metrics::mean(v.iter().map(|x| f64::from(*x)));
        scalars.extend([
            ("rewards/chosen".to_string(), m32(&chosen)),
            ("rewards/rejected".to_string(), m32(&rejected)),
            (
                "rewards/accuracies".to_string(),
                mean(
                    &chosen
                        .iter()
                        .zip(&rejected)
                        .map(|(c, r)| f64::from(u8::from(c > r)))
                        .collect::<Vec<_>>(),
                ),
            ),
            (
                "rewards/margins".to_string(),
                mean(
                    &chosen
                        .iter()
                        .zip(&rejected)
                        .map(|(c, r)| f64::from(c - r))
                        .collect::<Vec<_>>(),
                ),
            ),
        ]);
        Ok(StepOutput {
            loss: out.loss,
            scalars,
            rows: rankings.len(),
        })
    }
}

/// `pipeline run train-dico`.
pub struct TrainDico;

impl Stage for TrainDico {
    const NAME: &'static str = "train-dico";
    const DESCRIPTION: &'static str =
        "DiCO: the captioner's beam candidates ranked by a CLIP reward, winner vs weighted losers against a frozen reference";
    const USES_GPU: bool = true;
    const SECTION: &'static str = "train_dico";
    type Config = TrainDicoConfig;
    type Summary = OnlineSummary;

    fn run(cfg: &TrainDicoConfig, ctx: &StageContext) -> Result<OnlineSummary> {
        let settings = cfg.method.settings();
        check_reward(&settings.reward, Self::SECTION)?;
        if cfg.method.candidates < 2 {
            return Err(crate::error::Error::Config(format!(
                "train_dico.candidates must be at least 2 (a winner and a loser), not {}",
                cfg.method.candidates
            )));
        }
        let (online, prepared) = prepare(Self::NAME, &settings, &cfg.train, ctx)?;
        let reference = frozen_reference(&prepared, &online.policy)?;
        let mut objective = DicoObjective {
            online,
            reference: reference.model,
            cfg: cfg.method.clone(),
            optimizer: cfg.train.optimizer(),
            last_mean_length: f64::NAN,
        };
        let mut summary = run_fit(
            Self::NAME,
            &mut objective,
            &prepared,
            |o| &o.online,
            &cfg.train,
            &settings,
            ctx,
        )?;
        summary.reference_bytes = Some(reference.own_bytes);
        summary.reference_shared_bytes = reference.shared_bytes;
        Ok(summary)
    }
}
