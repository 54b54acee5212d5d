//! `pipeline run refine-diffusion`: the RLHF refinement of a caption diffusion model
//! (`train-diffusion`) with `train-rlhf`'s shaped reward, as reward-weighted regression.
//!
//! Per training image the current model draws `samples` captions by its reverse process
//! (`sampling_steps`, clamped, seeded per batch). Each is scored without gradients: the dense
//! CLIP increments r_t = w[cos(img, CLIP(y_1..t)) − cos(img, CLIP(y_1..t−1))], the reward
//! model's score R_s of the whole caption, and per token R_t = α_t r_t + (1 − α_t) R_s / T
//! with α_t from the confidence c_t (the rounding softmax's probability of the token; the
//! `shaping` switch as in train-rlhf); the caption's reward is Σ_t R_t. The model then
//! learns from its own samples: each sample's diffusion loss is weighted by the softmax of
//! its image's rewards over `temperature` (reward-weighted regression; `keep_top` k: equal
//! weight on the k best, RAFT), and within a caption the rounding NLL of each token by
//! T · softmax_t(R_t / `temperature`), so the dense reward says which tokens to keep; plus
//! `anchor_weight` × the plain diffusion loss on the image's reference caption, so the model
//! cannot drift from the data. Validation decodes the held-out images (`val_sampling_steps`)
//! and logs the online stages' held-out metrics; the best checkpoint is `select_by`'s.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::datasets::captions::{references, CaptionedSplit, ImageBatch, ImageBatches};
use crate::datasets::features::embeddings_by_key;
use crate::error::{Error, IoContext, Result};
use crate::losses::diffusion::{diffusion_terms, rwr_weights, token_weights};
use crate::losses::reward::{dense_increments, shaped_rewards, Shaping, ShapingConfig};
use crate::metrics::embedding::cosine;
use crate::models::clip::ClipEmbedder;
use crate::models::diffusion::{cut_at_padding, DiffusionCaptioner, DiffusionManifest, Transition};
use crate::models::reward::RewardModel;
use crate::rng::SplitMix64;
use crate::stages::online::rlhf::padded;
use crate::stages::online::{batch_seed, candle_err, OnlineSummary, Validation};
use crate::stages::{Stage, StageContext};
use crate::synthetic;
use crate::train::{
    fit, FitOutput, MethodDefaults, Objective, OptimizerConfig, ParamGroup, StepContext,
    StepOutput, TrainConfig, WithTraining,
};

/// How refine-diffusion learns from its samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefineMethod {
    /// Reward-weighted regression: the diffusion loss of each sample weighted by the
    /// softmax of its image's rewards (or RAFT with `keep_top`).
    Rwr,
    /// DDPO (Black et al. 2023, the score-function estimator): each reverse step is a
    /// Gaussian policy; −A · log p_θ(x_{t−1} | x_t) over recorded transitions, A the
    /// sample's leave-one-out advantage normalised over the batch.
    Ddpo,
}

/// `[refine_diffusion]`'s own keys (beside the loop and optimiser keys of every trainer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefineConfig {
    /// The `train-diffusion` step whose best checkpoint is refined.
    pub init_from: String,
    /// The `train-reward` step whose best checkpoint gives the sparse reward.
    pub reward_from: String,
    /// How the model learns from its scored samples: `rwr` (the recipe's reward-weighted
    /// regression on the diffusion loss) or `ddpo` (policy gradient through the reverse
    /// chain's own Gaussian steps).
    pub method: RefineMethod,
    /// DDPO: transitions of each chain (drawn at random) whose log-probability is trained.
    pub ddpo_steps: usize,
    /// Captions drawn per image (at least 2).
    pub samples: usize,
    /// Reverse-process steps when drawing them, and when decoding held-out images.
    pub sampling_steps: usize,
    pub val_sampling_steps: usize,
    pub clamp: bool,
    /// Of the softmax over an image's samples (and over a caption's tokens).
    pub temperature: f64,
    /// > 0: equal weight on the k best samples of each image instead (RAFT).
    pub keep_top: usize,
    /// Weight of the plain diffusion loss on the reference captions.
    pub anchor_weight: f64,
    /// `hierarchical` (α from confidence), `sparse` (α = 0), `dense` (α = 1), `fixed`.
    pub shaping: Shaping,
    pub alpha_max: f64,
    pub alpha_min: f64,
    pub confidence_mid: f64,
    pub confidence_scale: f64,
    pub alpha: f64,
    /// w of the dense CLIP increments.
    pub dense_weight: f64,
    /// Scale of the reward model's score.
    pub sparse_weight: f64,
    /// Training images: the first N of the split; 0 = all.
    pub max_train_images: u64,
    /// Held-out images decoded at each validation; 0 = all.
    pub val_images: u64,
    /// The held-out metric that picks the best checkpoint.
    pub select_by: String,
}

impl Default for RefineConfig {
    fn default() -> Self {
        let s = ShapingConfig::default();
        Self {
            init_from: "train-diffusion".into(),
            reward_from: "train-reward".into(),
            method: RefineMethod::Rwr,
            ddpo_steps: 5,
            samples: 4,
            sampling_steps: 20,
            val_sampling_steps: 50,
            clamp: true,
            temperature: 0.5,
            keep_top: 0,
            anchor_weight: 1.0,
            shaping: s.shaping,
            alpha_max: s.alpha_max,
            alpha_min: s.alpha_min,
            confidence_mid: s.confidence_mid,
            confidence_scale: s.confidence_scale,
            alpha: s.alpha,
            dense_weight: 2.5,
            sparse_weight: 1.0,
            max_train_images: 0,
            val_images: 0,
            select_by: "val/RefCLIPScore".into(),
        }
    }
}

impl MethodDefaults for RefineConfig {
    fn training() -> TrainConfig {
        TrainConfig {
            epochs: 2,
            batch_size: 16,
            lr: 1e-4,
            warmup_steps: 10,
            ..TrainConfig::default()
        }
    }
}

impl RefineConfig {
    fn shaping(&self) -> ShapingConfig {
        ShapingConfig {
            shaping: self.shaping,
            alpha_max: self.alpha_max,
            alpha_min: self.alpha_min,
            confidence_mid: self.confidence_mid,
            confidence_scale: self.confidence_scale,
            alpha: self.alpha,
            beta_kl: 0.0,
        }
    }

    /// The settings that cannot work, each naming its key.
    fn check(&self, diffusion_steps: usize) -> Result<()> {
        let mut bad = Vec::new();
        if self.samples < 2 {
            bad.push(format!(
                "refine_diffusion.samples must be at least 2, not {}",
                self.samples
            ));
        }
        for (key, v) in [
            ("sampling_steps", self.sampling_steps),
            ("val_sampling_steps", self.val_sampling_steps),
        ] {
            if v == 0 || v > diffusion_steps {
                bad.push(format!(
                    "refine_diffusion.{key} must be between 1 and the model's diffusion_steps ({diffusion_steps}), not {v}"
                ));
            }
        }
        if self.method == RefineMethod::Ddpo && self.ddpo_steps == 0 {
            bad.push("refine_diffusion.ddpo_steps must be at least 1".to_string());
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bad.push(format!(
                "refine_diffusion.temperature must be a positive number, not {}",
                self.temperature
            ));
        }
        if !(self.anchor_weight.is_finite() && self.anchor_weight >= 0.0) {
            bad.push(format!(
                "refine_diffusion.anchor_weight must be 0 or more, not {}",
                self.anchor_weight
            ));
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(Error::Config(bad.join("; ")))
        }
    }
}

/// `[refine_diffusion]`.
pub type RefineDiffusionConfig = WithTraining<RefineConfig>;

/// The refinement: the diffusion model (one parameter group), the frozen reward model, the
/// CLIP of the dense reward and the metrics, and the reference captions.
pub struct RefineObjective {
    pub model: DiffusionCaptioner,
    pub vars: VarMap,
    pub tokenizer: tokenizers::Tokenizer,
    pub eos: u32,
    pub reward_model: RewardModel,
    pub clip: ClipEmbedder,
    pub cfg: RefineConfig,
    pub optimizer: OptimizerConfig,
    /// Tokenized reference captions by image key (the anchor).
    pub anchors: HashMap<String, Vec<u32>>,
    pub validation: Validation,
    pub seed: u64,
    /// Scalars of the last training batch; and the batches seen at the current step.
    micro: (usize, usize),
    val_batches: usize,
    pub skipped_rewards: u64,
}

/// What one drawn caption scored.
struct Scored {
    ids: Vec<u32>,
    text: String,
    /// R_t per token.
    token_rewards: Vec<f64>,
    dense: f64,
    sparse: f64,
}

impl RefineObjective {
    fn features(&self, b: &ImageBatch) -> candle_core::Result<Tensor> {
        Tensor::from_slice(
            &b.features,
            (b.rows, self.model.spec.clip_dim),
            self.model.device(),
        )
    }

    fn text(&self, ids: &[u32]) -> String {
        self.tokenizer
            .decode(ids, true)
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Draws `samples` captions of each image of `feats` and scores them.
    /// Draws `samples` captions of each image of `feats` and scores them; with `record`, the
    /// chains' transitions too (unclamped: DDPO's actions).
    fn draw(
        &mut self,
        feats: &Tensor,
        seed: u64,
        record: bool,
    ) -> candle_core::Result<(Vec<Scored>, Vec<Transition>, Tensor)> {
        let n = self.cfg.samples;
        let b = feats.dim(0)?;
        let rows: Vec<u32> = (0..b as u32)
            .flat_map(|i| std::iter::repeat_n(i, n))
            .collect();
        let dev = feats.device().clone();
        let repeated = feats.index_select(&Tensor::from_slice(&rows, rows.len(), &dev)?, 0)?;
        self.model.set_differentiable(false);
        let clamp = self.cfg.clamp && !record;
        let drawn =
            self.model
                .sample_chain(&repeated, self.cfg.sampling_steps, clamp, seed, record);
        self.model.set_differentiable(true);
        let ((ids, confidence), chain) = drawn?;
        let kept: Vec<Vec<u32>> = ids
            .iter()
            .map(|r| cut_at_padding(r, self.eos).to_vec())
            .collect();
        // Dense: the cosine of every prefix with the image (the empty one first).
        let images: Vec<Vec<f32>> = feats.to_vec2()?;
        let (mut texts, mut spans) = (Vec::new(), Vec::new());
        for k in &kept {
            spans.push(texts.len());
            for t in 0..=k.len() {
                texts.push(self.text(&k[..t]));
            }
        }
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut distinct: Vec<String> = Vec::new();
        for t in &texts {
            index.entry(t.as_str()).or_insert_with(|| {
                distinct.push(t.clone());
                distinct.len() - 1
            });
        }
        let emb = self
            .clip
            .embed_texts_normalized(&distinct)
            .map_err(candle_err)?;
        let cos_of = |sample: usize, t: usize| -> f64 {
            let text = &texts[spans[sample] + t];
            cosine(&images[rows[sample] as usize], &emb[index[text.as_str()]])
        };
        // Sparse: the reward model at each caption's end-of-text.
        let scored_ids: Vec<Vec<u32>> = kept
            .iter()
            .map(|k| k.iter().copied().chain([self.eos]).collect())
            .collect();
        let (flat, mask, len) = padded(
            &scored_ids.iter().map(Vec::as_slice).collect::<Vec<_>>(),
            self.eos,
        );
        let m = rows.len();
        let full: Vec<f32> = (0..m).map(|i| cos_of(i, kept[i].len()) as f32).collect();
        let scores = self
            .reward_model
            .rewards(
                Some(&repeated),
                &Tensor::from_vec(flat, (m, len), &dev)?,
                &Tensor::from_vec(mask.clone(), (m, len), &dev)?,
                &mask,
                Some(&Tensor::from_vec(full, m, &dev)?),
            )?
            .detach()
            .to_vec1::<f32>()?;
        let shaping = self.cfg.shaping();
        let scored = (0..m)
            .map(|i| {
                let k = &kept[i];
                let text = self.text(k);
                let cos: Vec<f64> = (0..=k.len()).map(|t| cos_of(i, t)).collect();
                let dense = dense_increments(&cos, self.cfg.dense_weight);
                let sparse = if text.is_empty() {
                    f64::NAN
                } else {
                    self.cfg.sparse_weight * f64::from(scores[i])
                };
                let conf: Vec<f64> = confidence[i][..k.len()].iter().map(|c| *c as f64).collect();
                let zeros = vec![0.0; k.len()];
                let token_rewards = shaped_rewards(&shaping, &dense, sparse, &conf, &zeros, &zeros);
                Scored {
                    ids: ids[i].clone(),
                    text,
                    dense: dense.iter().sum(),
                    sparse,
                    token_rewards,
                }
            })
            .collect();
        Ok((scored, chain, repeated))
    }

    /// DDPO's loss: −mean over samples of A · log p_θ(x_prev | x_t), summed over
    /// `ddpo_steps` recorded transitions drawn from `rng` and averaged; A the leave-one-out
    /// advantage of each sample's reward within its image, normalised by the batch's spread
    /// (non-finite rewards: A = 0).
    fn ddpo_loss(
        &self,
        total: &[f64],
        chain: &[Transition],
        repeated: &Tensor,
        rng: &mut SplitMix64,
    ) -> candle_core::Result<Tensor> {
        let dev = repeated.device();
        let n = self.cfg.samples;
        let mut adv: Vec<f64> = Vec::with_capacity(total.len());
        for group in total.chunks(n) {
            let finite: Vec<f64> = group.iter().copied().filter(|r| r.is_finite()).collect();
            let (sum, count) = (finite.iter().sum::<f64>(), finite.len() as f64);
            adv.extend(group.iter().map(|r| {
                if r.is_finite() && count > 1.0 {
                    r - (sum - r) / (count - 1.0)
                } else {
                    0.0
                }
            }));
        }
        let spread = (adv.iter().map(|a| a * a).sum::<f64>() / adv.len().max(1) as f64).sqrt();
        let adv: Vec<f32> = adv.iter().map(|a| (a / (spread + 1e-8)) as f32).collect();
        let adv = Tensor::from_vec(adv, total.len(), dev)?;
        let mut order: Vec<usize> = (0..chain.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let picked = &order[..self.cfg.ddpo_steps.min(order.len())];
        let mut loss = Tensor::zeros((), candle_core::DType::F32, dev)?;
        for &j in picked {
            let logp = self.model.transition_logprob(&chain[j], repeated)?;
            loss = (loss - (logp * &adv)?.mean_all()?)?;
        }
        loss / picked.len().max(1) as f64
    }

    /// `(rows, L)` ids of token sequences, each cut or end-of-text padded to the model's L.
    fn fixed(&self, rows: &[&[u32]]) -> candle_core::Result<Tensor> {
        let l = self.model.spec.max_tokens;
        let mut ids = Vec::with_capacity(rows.len() * l);
        for r in rows {
            let n = r.len().min(l);
            ids.extend_from_slice(&r[..n]);
            ids.extend(std::iter::repeat_n(self.eos, l - n));
        }
        Tensor::from_vec(ids, (rows.len(), l), self.model.device())
    }

    /// The plain diffusion loss on the reference captions of the batch's images.
    fn anchor(
        &self,
        b: &ImageBatch,
        feats: &Tensor,
        rng: &mut SplitMix64,
    ) -> candle_core::Result<Tensor> {
        let refs: Vec<&[u32]> = b
            .keys
            .iter()
            .map(|k| self.anchors.get(k).map_or(&[][..], Vec::as_slice))
            .collect();
        let tokens = self.fixed(&refs)?;
        let (x0_hat, x0, rounding) = self.model.training_pass(&tokens, feats, rng)?;
        diffusion_terms(&x0_hat, &x0, &rounding, self.model.alpha_bar_last(), None)?.total()
    }

    fn train_step(&mut self, b: &ImageBatch, ctx: &StepContext) -> candle_core::Result<StepOutput> {
        if self.micro.0 != ctx.step {
            self.micro = (ctx.step, 0);
        }
        self.micro.1 += 1;
        let feats = self.features(b)?;
        let seed = batch_seed(self.seed, ctx.epoch, b);
        let ddpo = self.cfg.method == RefineMethod::Ddpo;
        let (drawn, chain, repeated) = self.draw(&feats, seed, ddpo)?;
        let n = self.cfg.samples;
        let total: Vec<f64> = drawn
            .iter()
            .map(|s| {
                if s.sparse.is_finite() {
                    s.token_rewards.iter().sum()
                } else {
                    f64::NAN
                }
            })
            .collect();
        let skipped = total.iter().filter(|r| !r.is_finite()).count();
        self.skipped_rewards += skipped as u64;
        // Reward-weighted regression's weights (DDPO uses the advantages instead).
        let weights: Vec<f64> = if ddpo {
            Vec::new()
        } else {
            total
                .chunks(n)
                .flat_map(|r| rwr_weights(r, self.cfg.temperature, self.cfg.keep_top))
                .collect()
        };
        let mut rng = SplitMix64::derived(seed, &format!("refine-{}-{}", ctx.step, self.micro.1));
        // The samples' diffusion loss, weighted per sample and, for the rounding NLL, per
        // token; samples of no weight are left out.
        let used: Vec<usize> = if ddpo {
            Vec::new()
        } else {
            (0..drawn.len()).filter(|&i| weights[i] > 0.0).collect()
        };
        let dev = feats.device().clone();
        let mut loss = if ddpo {
            self.ddpo_loss(&total, &chain, &repeated, &mut rng)?
        } else {
            Tensor::zeros((), candle_core::DType::F32, &dev)?
        };
        if !used.is_empty() {
            let l = self.model.spec.max_tokens;
            let ids: Vec<&[u32]> = used.iter().map(|&i| drawn[i].ids.as_slice()).collect();
            let tokens = self.fixed(&ids)?;
            let tw: Vec<f32> = used
                .iter()
                .flat_map(|&i| token_weights(&drawn[i].token_rewards, self.cfg.temperature, l))
                .collect();
            let tw = Tensor::from_vec(tw, (used.len(), l), &dev)?;
            let image_rows: Vec<u32> = used.iter().map(|&i| (i / n) as u32).collect();
            let clip =
                feats.index_select(&Tensor::from_slice(&image_rows, used.len(), &dev)?, 0)?;
            let (x0_hat, x0, rounding) = self.model.training_pass(&tokens, &clip, &mut rng)?;
            let terms = diffusion_terms(
                &x0_hat,
                &x0,
                &rounding,
                self.model.alpha_bar_last(),
                Some(&tw),
            )?;
            let per = ((&terms.mse + &terms.rounding)? + &terms.prior)?;
            let w: Vec<f32> = used.iter().map(|&i| weights[i] as f32).collect();
            let w = Tensor::from_vec(w, used.len(), &dev)?;
            // Σ over an image's samples of w · L, averaged over images.
            loss = ((per * w)?.sum_all()? / b.rows as f64)?;
        }
        let anchor = self.anchor(b, &feats, &mut rng)?;
        let loss = (loss + (&anchor * self.cfg.anchor_weight)?)?;
        let finite = |v: Vec<f64>| crate::metrics::mean(v.into_iter().filter(|x| x.is_finite()));
        let distinct: Vec<f64> = drawn
            .chunks(n)
            .map(|c| {
                let set: std::collections::HashSet<&str> =
                    c.iter().map(|s| s.text.as_str()).collect();
                set.len() as f64 / c.len() as f64
            })
            .collect();
        let max_weight: Vec<f64> = weights
            .chunks(n)
            .map(|w| w.iter().copied().fold(0.0, f64::max))
            .collect();
        let mut scalars = vec![
            ("reward".to_string(), finite(total)),
            (
                "reward/dense".to_string(),
                finite(drawn.iter().map(|s| s.dense).collect()),
            ),
            (
                "reward/sparse".to_string(),
                finite(drawn.iter().map(|s| s.sparse).collect()),
            ),
            ("reward/skipped".to_string(), skipped as f64),
            (
                "samples/distinct".to_string(),
                crate::metrics::mean(distinct.into_iter()),
            ),
            ("loss/anchor".to_string(), anchor.to_scalar::<f32>()? as f64),
        ];
        if !ddpo {
            scalars.push((
                "rwr/max_weight".to_string(),
                crate::metrics::mean(max_weight.into_iter()),
            ));
        }
        Ok(StepOutput {
            loss,
            scalars,
            rows: b.rows,
        })
    }
}

impl Objective for RefineObjective {
    type Batch = ImageBatch;

    fn groups(&self) -> Vec<ParamGroup> {
        vec![ParamGroup::new(
            "diffusion",
            &self.vars,
            self.optimizer.clone(),
        )]
    }

    fn step(&mut self, b: &ImageBatch, ctx: &StepContext) -> candle_core::Result<StepOutput> {
        if ctx.train {
            return self.train_step(b, ctx);
        }
        // Validation: decode the held-out images; the loss is the anchor's.
        self.val_batches += 1;
        let feats = self.features(b)?;
        let seed =
            SplitMix64::derived(self.seed, &format!("refine-val-{}", self.val_batches)).next_u64();
        self.model.set_differentiable(false);
        let decoded = self
            .model
            .sample(&feats, self.cfg.val_sampling_steps, self.cfg.clamp, seed);
        self.model.set_differentiable(true);
        let (ids, _) = decoded?;
        for (key, ids) in b.keys.iter().zip(&ids) {
            let kept = cut_at_padding(ids, self.eos);
            self.validation
                .captions
                .push((key.clone(), self.text(kept), kept.len()));
        }
        let mut rng = SplitMix64::derived(seed, "refine-val-anchor");
        let loss = self.anchor(b, &feats, &mut rng)?;
        Ok(StepOutput {
            loss,
            scalars: Vec::new(),
            rows: b.rows,
        })
    }

    fn validation_end(&mut self) -> candle_core::Result<Vec<(String, f64)>> {
        self.val_batches = 0;
        self.validation.finish(&self.clip).map_err(candle_err)
    }

    fn validate_at_start(&self) -> bool {
        true
    }

    fn selection(&self) -> Option<(&str, bool)> {
        Some((
            self.cfg.select_by.as_str(),
            !self.cfg.select_by.ends_with("loss"),
        ))
    }
}

/// `pipeline run refine-diffusion`: `[refine_diffusion]`.
pub struct RefineDiffusion;

impl Stage for RefineDiffusion {
    const NAME: &'static str = "refine-diffusion";
    const DESCRIPTION: &'static str =
        "RLHF refinement of the diffusion captioner: shaped reward, reward-weighted regression";
    const USES_GPU: bool = true;
    const SECTION: &'static str = "refine_diffusion";
    type Config = RefineDiffusionConfig;
    type Summary = OnlineSummary;

    fn run(cfg: &RefineDiffusionConfig, ctx: &StageContext) -> Result<OnlineSummary> {
        let m = &cfg.method;
        let init = ctx
            .find_model(&m.init_from, "diffusion.json")
            .ok_or_else(|| {
                ctx.missing(
                    &format!("`{}` diffusion checkpoint", m.init_from),
                    &m.init_from,
                )
            })?;
        let manifest = DiffusionManifest::load(&init.join("diffusion.json"))?;
        m.check(manifest.spec.diffusion_steps)?;
        let reward_dir = ctx.find_captioner(&m.reward_from).ok_or_else(|| {
            ctx.missing(
                &format!("`{}` reward model checkpoint", m.reward_from),
                &m.reward_from,
            )
        })?;
        let device: Device = ctx.device()?;
        let (mut reward_model, rm) = RewardModel::load(&reward_dir, &device)?;
        if (
            &rm.clip_model,
            &rm.clip_revision,
            rm.clip_dim,
            rm.image_tokens,
        ) != (
            &manifest.clip_model,
            &manifest.clip_revision,
            manifest.spec.clip_dim,
            0,
        ) {
            return Err(Error::Config(format!(
                "refine_diffusion.reward_from: `{}` reads {}@{} features ({}-d, {} image tokens); `{}` was trained on {}@{} ({}-d pooled)",
                m.reward_from, rm.clip_model, rm.clip_revision, rm.clip_dim, rm.image_tokens,
                m.init_from, manifest.clip_model, manifest.clip_revision, manifest.spec.clip_dim
            )));
        }
        let tokenizer = manifest.tokenizer()?;
        if reward_model.captioner.tokenizer.get_vocab_size(true) != tokenizer.get_vocab_size(true) {
            return Err(Error::Config(format!(
                "refine_diffusion.reward_from: `{}` tokenizes with another vocabulary than `{}`",
                m.reward_from, m.init_from
            )));
        }
        reward_model.captioner.decoder.set_differentiable(false);
        let best = init.join("best/model.safetensors");
        let (mut model, vars) = manifest.model_and_vars(&best, &device)?;
        model.set_differentiable(true);

        let cap = &ctx.captioner;
        let clip_cfg = ctx
            .clip
            .with_model(&manifest.clip_model, &manifest.clip_revision);
        let split = |name: &str| -> Result<CaptionedSplit> {
            Ok(CaptionedSplit::new(
                &ctx.workdir,
                ctx.split_features(&clip_cfg, &cap.dataset, name, "image")?,
            ))
        };
        let train = split(&cap.train_split)?.first(m.max_train_images);
        let val = split(&cap.val_split)?.first(m.val_images);
        if train.rows() == 0 || val.rows() == 0 {
            return Err(Error::Config(format!(
                "refine-diffusion: {} has no cached images in `{}` or `{}`; run `pipeline run embed`",
                cap.dataset, cap.train_split, cap.val_split
            )));
        }
        let clip = ctx.load_clip(&ctx.feature_identity(&clip_cfg)?)?;
        let mut val_images = embeddings_by_key(&ctx.split_features(
            &clip_cfg,
            &cap.dataset,
            &cap.val_split,
            "image",
        )?)?;
        let val_refs = references(&ctx.workdir, &cap.dataset, &cap.val_split)?;
        val_images.retain(|k, _| val_refs.contains_key(k));
        let train_refs = references(&ctx.workdir, &cap.dataset, &cap.train_split)?;
        let anchors: HashMap<String, Vec<u32>> = train_refs
            .iter()
            .chain(val_refs.iter())
            .filter_map(|(k, r)| {
                let enc = tokenizer.encode(r.first()?.as_str(), false).ok()?;
                Some((k.clone(), enc.get_ids().to_vec()))
            })
            .collect();
        let dir = ctx.stage_dir(ctx.output_name(Self::NAME));
        std::fs::create_dir_all(&dir).at(&dir)?;
        crate::io::write_json(&dir.join("diffusion.json"), &manifest)?;
        let data = ImageBatches {
            train,
            val,
            batch_size: cfg.train.batch_size,
            seed: cfg.train.seed,
            capacity: 4,
            repeat: 1,
        };
        let mut objective = RefineObjective {
            model,
            vars,
            tokenizer,
            eos: manifest.eos,
            reward_model,
            clip,
            cfg: m.clone(),
            optimizer: cfg.train.optimizer(),
            anchors,
            validation: Validation::new(
                val_images,
                val_refs,
                cap.dataset == synthetic::IMAGES_DATASET,
            ),
            seed: cfg.train.seed,
            micro: (usize::MAX, 0),
            val_batches: 0,
            skipped_rewards: 0,
        };
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
        Ok(OnlineSummary {
            images: data.train.rows(),
            init_from: m.init_from.clone(),
            reward: format!(
                "{}'s {:?}-shaped (reward-weighted regression)",
                m.reward_from, m.shaping
            )
            .to_lowercase(),
            selection: m.select_by.clone(),
            skipped_rewards: objective.skipped_rewards,
            reference_bytes: None,
            reference_shared_bytes: None,
            fit,
            dir: dir.display().to_string(),
        })
    }
}
