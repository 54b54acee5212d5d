//! `pipeline run train-rlhf`: on-policy RL of the captioner against a hierarchical reward,
//! a dense token-level CLIP alignment reward mixed with the sparse sequence-level score of a
//! `train-reward` Bradley-Terry model, weighted per token by the policy's confidence.
//!
//! Per training image, `samples` captions are drawn from the current policy (multinomial at
//! `temperature`, seeded per batch). Without gradients, each sampled caption y of T tokens
//! (end-of-text included) gets
//! - the sparse reward R_sparse = `sparse_weight` × the reward model's score of (image, y);
//! - the dense increments r_t = `dense_weight` [cos(image, CLIP_text(y_1..t)) −
//!   cos(image, CLIP_text(y_1..t−1))] with the embed stage's CLIP (the empty prefix is the
//!   empty text; the increments telescope to `dense_weight` [cos(image, y) − cos(image, "")],
//!   the caption's CLIP-S up to a per-image constant that the baseline cancels);
//! - the per-token reward R_t = α_t r_t + (1 − α_t) R_sparse / T − β_KL (log π(y_t) −
//!   log π_ref(y_t)), α_t from the policy's probability of the token
//!   ([`crate::losses::reward::ShapingConfig`]; `shaping` switches the mix);
//!
//! and the loss is REINFORCE with a leave-one-out baseline over the image's samples (RLOO,
//! [`crate::losses::reward::rlhf_advantages`]): each token is credited with the rewards-to-go
//! of the causal parts (dense increment, KL) and, in full, with the caption's sparse share
//! Σ (1 − α_t) R_sparse / T, which every token helped decide
//! ([`crate::losses::reward::split_rewards`]); averaged over the batch's tokens; with `ppo_epochs` > 1 the rollout is reused for that many optimizer steps
//! under PPO's clipped ratio ([`crate::losses::reward::policy_loss`]). The reference is the
//! frozen `init_from` checkpoint. Validation is the online stages' (greedy held-out
//! CLIPScore, RefCLIPScore, CIDEr-D, attribute accuracy), and `select_by` picks the best
//! checkpoint by a held-out metric, never by the reward.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::datasets::captions::ImageBatch;
use crate::error::{Error, Result};
use crate::losses::reward::{
    dense_increments, policy_loss, rewards_to_go, rlhf_advantages, split_rewards, Shaping,
    ShapingConfig,
};
use crate::models::captioner::{Captioner, DecodeMethod, Generated};
use crate::models::reward::RewardModel;
use crate::stages::online::{
    batch_seed, candle_err, frozen_reference, online_training, prepare, run_fit, Online,
    OnlineMethod, OnlineSettings, OnlineSummary, RewardKind, RewardSettings,
};
use crate::stages::{Stage, StageContext};
use crate::train::{MethodDefaults, OptimizerConfig, StepOutput, TrainConfig, WithTraining};

/// `[train_rlhf]`'s own keys (beside the loop and optimiser keys of every trainer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RlhfConfig {
    /// The captioner step whose best checkpoint is the starting policy and the frozen
    /// reference.
    pub init_from: String,
    /// The `train-reward` step whose best checkpoint gives the sparse reward.
    pub reward_from: String,
    /// Sampled captions per image (at least 2: the leave-one-out baseline).
    pub samples: usize,
    pub temperature: f64,
    /// `hierarchical` (α from confidence), `sparse` (α = 0), `dense` (α = 1), `fixed`
    /// (α = `alpha`).
    pub shaping: Shaping,
    pub alpha_max: f64,
    pub alpha_min: f64,
    /// c_0 and s of α = α_max − (α_max − α_min) σ((c − c_0)/s).
    pub confidence_mid: f64,
    pub confidence_scale: f64,
    /// α of `fixed` shaping.
    pub alpha: f64,
    /// Weight of the per-token KL penalty against the reference.
    pub beta_kl: f64,
    /// w of the dense CLIP increments (2.5: CLIP-S's scale).
    pub dense_weight: f64,
    /// Scale of the reward model's score.
    pub sparse_weight: f64,
    /// Optimizer steps per rollout; > 1 clips the ratio to 1 ± `clip_range` (PPO).
    pub ppo_epochs: usize,
    pub clip_range: f64,
    /// Caption tokens generated; 0 = `captioner.max_caption_tokens`.
    pub max_tokens: usize,
    /// Training images: the first N of the split; 0 = all.
    pub max_train_images: u64,
    /// Validation images captioned at each validation; 0 = all.
    pub val_images: u64,
    /// The held-out metric that picks the best checkpoint.
    pub select_by: String,
}

impl Default for RlhfConfig {
    fn default() -> Self {
        let s = ShapingConfig::default();
        Self {
            init_from: "train-sft".into(),
            reward_from: "train-reward".into(),
            samples: 4,
            temperature: 1.0,
            shaping: s.shaping,
            alpha_max: s.alpha_max,
            alpha_min: s.alpha_min,
            confidence_mid: s.confidence_mid,
            confidence_scale: s.confidence_scale,
            alpha: s.alpha,
            beta_kl: s.beta_kl,
            dense_weight: 2.5,
            sparse_weight: 1.0,
            ppo_epochs: 1,
            clip_range: 0.2,
            max_tokens: 0,
            max_train_images: 0,
            val_images: 0,
            select_by: "val/RefCLIPScore".into(),
        }
    }
}

impl MethodDefaults for RlhfConfig {
    fn training() -> TrainConfig {
        online_training()
    }
}

impl RlhfConfig {
    fn settings(&self) -> OnlineSettings {
        OnlineSettings {
            init_from: self.init_from.clone(),
            // The dense reward's CLIP: the captioner's own (the embed stage's).
            reward: RewardSettings {
                kind: RewardKind::Clip,
                weight: self.dense_weight,
                model: String::new(),
                revision: "main".into(),
            },
            max_tokens: self.max_tokens,
            max_train_images: self.max_train_images,
            val_images: self.val_images,
            select_by: self.select_by.clone(),
        }
    }

    pub fn shaping(&self) -> ShapingConfig {
        ShapingConfig {
            shaping: self.shaping,
            alpha_max: self.alpha_max,
            alpha_min: self.alpha_min,
            confidence_mid: self.confidence_mid,
            confidence_scale: self.confidence_scale,
            alpha: self.alpha,
            beta_kl: self.beta_kl,
        }
    }

    /// Every key in its range; `train`'s loop keys fit the rollout reuse.
    fn check(&self, train: &TrainConfig) -> Result<()> {
        let bad = |what: String| Err(Error::Config(format!("train_rlhf: {what}")));
        let unit = |x: f64| (0.0..=1.0).contains(&x);
        // False for NaN too.
        let positive = |x: f64| x > 0.0;
        if self.samples < 2 {
            return bad(format!(
                "samples must be at least 2 (the leave-one-out baseline), not {}",
                self.samples
            ));
        }
        if !positive(self.temperature) {
            return bad(format!(
                "temperature must be positive, not {}",
                self.temperature
            ));
        }
        if !(unit(self.alpha_max) && unit(self.alpha_min) && unit(self.alpha))
            || self.alpha_min > self.alpha_max
        {
            return bad(format!(
                "alpha_min ({}) <= alpha_max ({}) and alpha ({}) must lie in [0, 1]",
                self.alpha_min, self.alpha_max, self.alpha
            ));
        }
        if !positive(self.confidence_scale) || !self.confidence_mid.is_finite() {
            return bad(format!(
                "confidence_scale ({}) must be positive and confidence_mid ({}) finite",
                self.confidence_scale, self.confidence_mid
            ));
        }
        for (name, v) in [
            ("beta_kl", self.beta_kl),
            ("dense_weight", self.dense_weight),
            ("sparse_weight", self.sparse_weight),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(format!("{name} must be a finite number >= 0, not {v}"));
            }
        }
        if self.ppo_epochs == 0 || !positive(self.clip_range) {
            return bad(format!(
                "ppo_epochs ({}) and clip_range ({}) must be positive",
                self.ppo_epochs, self.clip_range
            ));
        }
        // Checkpoints (written at validations) fall between rollouts, so a resumed run
        // draws its next rollout exactly where the interrupted one did.
        if self.ppo_epochs > 1
            && (train.grad_accum > 1 || !train.eval_every.is_multiple_of(self.ppo_epochs))
        {
            return bad(format!(
                "with ppo_epochs = {} every optimizer step uses one rollout: grad_accum must be 1 (is {}) and eval_every a multiple of ppo_epochs (is {})",
                self.ppo_epochs, train.grad_accum, train.eval_every
            ));
        }
        Ok(())
    }
}

/// `[train_rlhf]`.
pub type TrainRlhfConfig = WithTraining<RlhfConfig>;

/// Sampled captions of a batch, scored, kept for the optimizer steps that reuse them.
struct Rollout {
    epoch: usize,
    first: String,
    /// Optimizer steps that used it so far.
    uses: usize,
    /// Per kept sample: its image's row in the batch features.
    image_of: Vec<u32>,
    ids: Tensor,
    mask: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    scalars: Vec<(String, f64)>,
}

/// One caption's token ids as the reward model reads them: ending with end-of-text (a
/// caption the token budget cut gets one, as the pairs it was trained on have).
fn scored_ids(g: &Generated, eos: u32) -> Vec<u32> {
    let mut ids = g.ids.clone();
    if ids.last() != Some(&eos) {
        ids.push(eos);
    }
    ids
}

/// Right-padded ids and attention `(rows, len)` of token sequences, padded with `pad`.
pub(super) fn padded(rows: &[&[u32]], pad: u32) -> (Vec<u32>, Vec<f32>, usize) {
    let len = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for r in rows {
        ids.extend_from_slice(r);
        ids.extend(std::iter::repeat_n(pad, len - r.len()));
        mask.extend((0..len).map(|j| if j < r.len() { 1f32 } else { 0.0 }));
    }
    (ids, mask, len)
}

/// The sparse and dense rewards of sampled captions, before shaping.
pub struct SampleRewards {
    /// `sparse_weight` × the reward model's score; NaN for an empty caption.
    pub sparse: Vec<f64>,
    /// Per sample, its tokens' dense increments (`dense_weight` × Δcos).
    pub dense: Vec<Vec<f64>>,
}

/// The RLHF objective: the policy, its frozen reference, the reward model and the settings.
pub struct RlhfObjective {
    pub online: Online,
    pub reference: Captioner,
    pub reward_model: RewardModel,
    pub cfg: RlhfConfig,
    pub optimizer: OptimizerConfig,
    rollout: Option<Rollout>,
}

impl RlhfObjective {
    pub fn new(
        online: Online,
        reference: Captioner,
        reward_model: RewardModel,
        cfg: RlhfConfig,
        optimizer: OptimizerConfig,
    ) -> Self {
        Self {
            online,
            reference,
            reward_model,
            cfg,
            optimizer,
            rollout: None,
        }
    }

    /// A scalar of the last rollout (`kl`, `completions/mean_length`, ...).
    pub fn rollout_scalar(&self, name: &str) -> Option<f64> {
        let r = self.rollout.as_ref()?;
        r.scalars.iter().find(|(n, _)| n == name).map(|s| s.1)
    }

    /// Sparse and dense rewards of `gens[i]` for image `keys[i]` (features row
    /// `image_of[i]` of `feats`), computed without gradients. An empty caption has none
    /// (NaN sparse reward).
    pub fn sample_rewards(
        &self,
        feats: &Tensor,
        keys: &[&str],
        image_of: &[u32],
        gens: &[&Generated],
    ) -> candle_core::Result<SampleRewards> {
        let o = &self.online;
        let eos = o.policy.eos;
        // Dense: the cosine of every prefix, the empty one first.
        let (mut texts, mut text_keys, mut spans) = (Vec::new(), Vec::new(), Vec::new());
        for (g, k) in gens.iter().zip(keys) {
            spans.push((texts.len(), g.ids.len()));
            for t in 0..=g.ids.len() {
                texts.push(o.policy.decode_text(&g.ids[..t]));
                text_keys.push(*k);
            }
        }
        let text_refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let cos = o
            .reward
            .cosines(&o.clip, &text_keys, &text_refs)
            .map_err(candle_err)?;
        let dense = spans
            .iter()
            .map(|&(at, n)| dense_increments(&cos[at..=at + n], self.cfg.dense_weight))
            .collect();
        // Sparse: the reward model at each caption's end-of-text.
        let ids: Vec<Vec<u32>> = gens.iter().map(|g| scored_ids(g, eos)).collect();
        let (flat, mask, len) = padded(&ids.iter().map(Vec::as_slice).collect::<Vec<_>>(), eos);
        let dev = feats.device();
        let n = gens.len();
        let rows = Tensor::from_slice(image_of, n, dev)?;
        // The whole caption's cosine (its last prefix), for a reward model with the CLIP
        // feature: the same CLIP (checked when the stage starts).
        let full: Vec<f32> = spans.iter().map(|&(at, n)| cos[at + n] as f32).collect();
        let full = Tensor::from_vec(full, n, dev)?;
        let scores = self
            .reward_model
            .rewards(
                Some(&feats.index_select(&rows, 0)?),
                &Tensor::from_vec(flat, (n, len), dev)?,
                &Tensor::from_vec(mask.clone(), (n, len), dev)?,
                &mask,
                Some(&full),
            )?
            .detach()
            .to_vec1::<f32>()?;
        let sparse = gens
            .iter()
            .zip(scores)
            .map(|(g, s)| {
                if g.text.trim().is_empty() {
                    f64::NAN
                } else {
                    self.cfg.sparse_weight * f64::from(s)
                }
            })
            .collect();
        Ok(SampleRewards { sparse, dense })
    }

    /// Draws and scores the rollout of batch `b`; returns it and the kept samples' per-token
    /// log-probabilities under the policy, with gradients (its first optimizer step's).
    fn draw(
        &mut self,
        b: &ImageBatch,
        epoch: usize,
    ) -> candle_core::Result<(Rollout, Option<Tensor>)> {
        let n = self.cfg.samples;
        let feats = self.online.features(b)?;
        let rows: Vec<u32> = (0..b.rows as u32)
            .flat_map(|i| std::iter::repeat_n(i, n))
            .collect();
        let dev = feats.device().clone();
        let repeated = feats.index_select(&Tensor::from_slice(&rows, rows.len(), &dev)?, 0)?;
        let sampling = DecodeMethod::Sample {
            top_p: 1.0,
            temperature: self.cfg.temperature,
            seed: batch_seed(self.online.seed, epoch, b),
        };
        let max = self.online.max_tokens;
        let samples = self
            .online
            .search(|p| p.generate(&repeated, &sampling, max))?;
        let keys: Vec<&str> = rows.iter().map(|&i| b.keys[i as usize].as_str()).collect();
        let all: Vec<&Generated> = samples.iter().collect();
        let rewards = self.sample_rewards(&feats, &keys, &rows, &all)?;
        let finite = |i: usize| {
            rewards.sparse[i].is_finite() && rewards.dense[i].iter().all(|r| r.is_finite())
        };
        let skipped = (0..all.len()).filter(|&i| !finite(i)).count();
        self.online.skipped_rewards += skipped as u64;
        // Images with at least two scored samples (the baseline needs another).
        let kept: Vec<usize> = (0..b.rows)
            .flat_map(|img| {
                let mine: Vec<usize> = (img * n..(img + 1) * n).filter(|&i| finite(i)).collect();
                if mine.len() >= 2 {
                    mine
                } else {
                    Vec::new()
                }
            })
            .collect();
        let mean = |v: &[f64]| crate::metrics::mean(v.iter().copied());
        let per_image: Vec<Vec<&Generated>> =
            samples.chunks(n).map(|c| c.iter().collect()).collect();
        let mut scalars = vec![
            ("reward/skipped".to_string(), skipped as f64),
            (
                "samples/distinct".to_string(),
                Online::distinct_share(&per_image),
            ),
        ];
        let eos = self.online.policy.eos;
        let id_rows: Vec<&[u32]> = kept.iter().map(|&i| samples[i].ids.as_slice()).collect();
        let (ids, mask, len) = padded(&id_rows, eos);
        let k = kept.len();
        let image_of: Vec<u32> = kept.iter().map(|&i| rows[i]).collect();
        let ids = Tensor::from_vec(ids, (k, len), &dev)?;
        let mask_t = Tensor::from_vec(mask.clone(), (k, len), &dev)?;
        if k == 0 {
            let zeros = Tensor::zeros((0, len), candle_core::DType::F32, &dev)?;
            return Ok((
                Rollout {
                    epoch,
                    first: b.keys.first().cloned().unwrap_or_default(),
                    uses: 1,
                    image_of,
                    ids,
                    mask: mask_t,
                    old_logp: zeros.clone(),
                    advantages: zeros,
                    scalars,
                },
                None,
            ));
        }
        let kept_feats = feats.index_select(&Tensor::from_slice(&image_of, k, &dev)?, 0)?;
        let logp = self
            .online
            .policy
            .token_logprobs(&kept_feats, &ids, &mask_t)?;
        let ref_logp = self
            .reference
            .token_logprobs(&kept_feats, &ids, &mask_t)?
            .detach()
            .to_vec2::<f32>()?;
        let lp = logp.detach().to_vec2::<f32>()?;
        let shaping = self.cfg.shaping();
        let (mut returns, mut shares, mut score, mut kl, mut alphas, mut neg_lp) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        let (mut dense_sum, mut sparse) = (Vec::new(), Vec::new());
        for (j, &i) in kept.iter().enumerate() {
            let t = samples[i].ids.len();
            let logp_i: Vec<f64> = lp[j][..t].iter().map(|&x| f64::from(x)).collect();
            let ref_i: Vec<f64> = ref_logp[j][..t].iter().map(|&x| f64::from(x)).collect();
            let conf: Vec<f64> = logp_i.iter().map(|x| x.exp()).collect();
            let dense = &rewards.dense[i];
            let (causal, share) =
                split_rewards(&shaping, dense, rewards.sparse[i], &conf, &logp_i, &ref_i);
            let k_i: f64 = logp_i.iter().zip(&ref_i).map(|(a, b)| a - b).sum();
            kl.push(k_i);
            score.push(causal.iter().sum::<f64>() + share + shaping.beta_kl * k_i);
            alphas.extend(conf.iter().map(|&c| shaping.alpha(c)));
            neg_lp.extend(logp_i.iter().map(|x| -x));
            dense_sum.push(dense.iter().sum::<f64>());
            sparse.push(rewards.sparse[i]);
            returns.push(rewards_to_go(&causal));
            shares.push(share);
        }
        // Leave-one-out per image over its kept samples (consecutive in `kept`).
        let mut adv = vec![0f32; k * len];
        let mut stds = Vec::new();
        let mut at = 0;
        while at < k {
            let img = image_of[at];
            let end = (at..k).find(|&j| image_of[j] != img).unwrap_or(k);
            for (off, a) in rlhf_advantages(&returns[at..end], &shares[at..end])
                .into_iter()
                .enumerate()
            {
                for (t, v) in a.into_iter().enumerate() {
                    adv[(at + off) * len + t] = v as f32;
                }
            }
            stds.push(sample_std(&score[at..end]));
            at = end;
        }
        let lengths: Vec<f64> = kept.iter().map(|&i| samples[i].ids.len() as f64).collect();
        scalars.extend([
            ("reward".to_string(), mean(&score)),
            ("reward_std".to_string(), mean(&stds)),
            ("reward/dense".to_string(), mean(&dense_sum)),
            ("reward/sparse".to_string(), mean(&sparse)),
            ("kl".to_string(), mean(&kl)),
            ("entropy".to_string(), mean(&neg_lp)),
            ("alpha/mean".to_string(), mean(&alphas)),
            ("completions/mean_length".to_string(), mean(&lengths)),
        ]);
        Ok((
            Rollout {
                epoch,
                first: b.keys.first().cloned().unwrap_or_default(),
                uses: 1,
                image_of,
                ids,
                mask: mask_t,
                old_logp: logp.detach(),
                advantages: Tensor::from_vec(adv, (k, len), &dev)?,
                scalars,
            },
            Some(logp),
        ))
    }
}

/// The sample standard deviation (n − 1, as torch's `std`); 0 for fewer than two values.
fn sample_std(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

impl OnlineMethod for RlhfObjective {
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
        let first = b.keys.first().map_or("", String::as_str);
        let reuse = self
            .rollout
            .as_ref()
            .is_some_and(|r| r.epoch == epoch && r.first == first && r.uses < self.cfg.ppo_epochs);
        let fresh = if reuse {
            if let Some(r) = self.rollout.as_mut() {
                r.uses += 1;
            }
            None
        } else {
            let (r, logp) = self.draw(b, epoch)?;
            self.rollout = Some(r);
            logp
        };
        let r = self.rollout.as_ref().expect("a rollout was drawn");
        let dev = self.online.policy.device().clone();
        let rows = r.image_of.len();
        let mut scalars = r.scalars.clone();
        if rows == 0 {
            return StepOutput::nothing(&dev, scalars);
        }
        let logp = match fresh {
            Some(lp) => lp,
            None => {
                let feats = self.online.features(b)?;
                let kept = feats.index_select(&Tensor::from_slice(&r.image_of, rows, &dev)?, 0)?;
                self.online.policy.token_logprobs(&kept, &r.ids, &r.mask)?
            }
        };
        let (loss, clipped) = policy_loss(
            &logp,
            &r.old_logp,
            &r.advantages,
            &r.mask,
            self.cfg.clip_range,
        )?;
        scalars.push(("clip_ratio".to_string(), clipped));
        Ok(StepOutput {
            loss,
            scalars,
            rows,
        })
    }
}

/// `pipeline run train-rlhf`.
pub struct TrainRlhf;

impl Stage for TrainRlhf {
    const NAME: &'static str = "train-rlhf";
    const DESCRIPTION: &'static str =
        "RLHF with hierarchical reward shaping: sampled captions, dense CLIP + sparse reward-model reward weighted by confidence, KL to the reference, RLOO";
    const USES_GPU: bool = true;
    const SECTION: &'static str = "train_rlhf";
    type Config = TrainRlhfConfig;
    type Summary = OnlineSummary;

    fn run(cfg: &TrainRlhfConfig, ctx: &StageContext) -> Result<OnlineSummary> {
        let m = &cfg.method;
        m.check(&cfg.train)?;
        let settings = m.settings();
        let reward_dir = ctx.find_captioner(&m.reward_from).ok_or_else(|| {
            ctx.missing(
                &format!("`{}` reward model checkpoint", m.reward_from),
                &m.reward_from,
            )
        })?;
        let (online, mut prepared) = prepare(Self::NAME, &settings, &cfg.train, ctx)?;
        prepared.data.repeat = m.ppo_epochs;
        let (mut reward_model, rm) = RewardModel::load(&reward_dir, &prepared.device)?;
        let pm = &prepared.manifest;
        if (
            &rm.clip_model,
            &rm.clip_revision,
            rm.clip_dim,
            rm.image_tokens,
        ) != (
            &pm.clip_model,
            &pm.clip_revision,
            pm.clip_dim,
            pm.image_tokens,
        ) {
            return Err(Error::Config(format!(
                "train_rlhf: the reward model of `{}` reads features of {}@{} ({} wide, {} image tokens) but the captioner of `{}` reads {}@{} ({} wide, {} image tokens); train the reward model from the same captioner",
                m.reward_from, rm.clip_model, rm.clip_revision, rm.clip_dim, rm.image_tokens,
                m.init_from, pm.clip_model, pm.clip_revision, pm.clip_dim, pm.image_tokens
            )));
        }
        reward_model.captioner.decoder.set_differentiable(false);
        let reference = frozen_reference(&prepared, &online.policy)?;
        let mut objective = RlhfObjective::new(
            online,
            reference.model,
            reward_model,
            m.clone(),
            cfg.train.optimizer(),
        );
        let mut summary = run_fit(
            Self::NAME,
            &mut objective,
            &prepared,
            |o| &o.online,
            &cfg.train,
            &settings,
            ctx,
        )?;
        summary.reward = format!(
            "{}-shaped (dense CLIP increments x {}, {}'s reward model x {}, beta_kl {})",
            format!("{:?}", m.shaping).to_lowercase(),
            m.dense_weight,
            m.reward_from,
            m.sparse_weight,
            m.beta_kl
        );
        summary.reference_bytes = Some(reference.own_bytes);
        summary.reference_shared_bytes = reference.shared_bytes;
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_cannot_work_are_refused_naming_the_key() {
        let train = TrainConfig::default();
        assert!(RlhfConfig::default().check(&train).is_ok());
        let refused = |cfg: RlhfConfig, train: &TrainConfig, key: &str| {
            let err = cfg.check(train).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        };
        let d = RlhfConfig::default;
        refused(RlhfConfig { samples: 1, ..d() }, &train, "samples");
        refused(
            RlhfConfig {
                alpha_min: 0.95,
                ..d()
            },
            &train,
            "alpha_min",
        );
        refused(
            RlhfConfig {
                beta_kl: f64::NAN,
                ..d()
            },
            &train,
            "beta_kl",
        );
        refused(
            RlhfConfig {
                confidence_scale: 0.0,
                ..d()
            },
            &train,
            "confidence_scale",
        );
        // PPO epochs: checkpoints must fall between rollouts.
        let ppo = RlhfConfig {
            ppo_epochs: 2,
            ..d()
        };
        let every_3 = TrainConfig {
            eval_every: 3,
            ..TrainConfig::default()
        };
        refused(ppo.clone(), &every_3, "eval_every");
        let every_4 = TrainConfig {
            eval_every: 4,
            ..TrainConfig::default()
        };
        assert!(ppo.check(&every_4).is_ok());
    }

    #[test]
    fn the_reward_model_reads_captions_ending_in_end_of_text() {
        let g = |ids: Vec<u32>| Generated {
            ids,
            text: "x".into(),
            logprob: 0.0,
        };
        assert_eq!(scored_ids(&g(vec![5, 6, 0]), 0), vec![5, 6, 0]);
        assert_eq!(
            scored_ids(&g(vec![5, 6]), 0),
            vec![5, 6, 0],
            "cut by the budget"
        );
        let (ids, mask, len) = padded(&[&[1, 2, 3], &[4]], 0);
        assert_eq!(
            (ids, mask, len),
            (vec![1, 2, 3, 4, 0, 0], vec![1., 1., 1., 1., 0., 0.], 3)
        );
    }
}
