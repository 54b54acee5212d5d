//! `pipeline run train-story`: next-frame story captioning (StoryReasoning's recipe) on the
//! one engine. From the `K` frames before a target frame — their CLIP image and caption
//! embeddings through the fusion encoder, their captions as a text prompt — the model writes
//! the target's caption (`L_txt`, prompt and prefix masked) and predicts its CLIP image
//! embedding (`α L_img + λ L_align`, [`crate::losses::story`]).
//!
//! Adversarial variants (`adversarial`): a discriminator on `[CLIP image of the target ;
//! CLIP text of a caption]` with hinge losses, as a second parameter group with its own
//! optimiser, updated every `d_every` optimizer steps. The published variants fed the
//! discriminator frozen-CLIP embeddings of decoded strings, so no gradient reached the
//! generator; here the generator gets the adversarial signal SeqGAN-style: per target it
//! samples a caption, the discriminator's score of it (detached) is its reward, and the
//! generator descends `β_adv · −mean((r − b) · log p(caption) / |caption|)` (per token, as
//! `L_txt`) with the batch mean as the baseline `b`. `naive` samples inside the loop; `cached` samples every training example
//! once at the start of each epoch (with the epoch's starting weights) and reuses those
//! captions as the discriminator's fakes and the policy-gradient samples (their log p under
//! the current weights); `hard_negative` adds ground-truth captions of other stories as
//! negatives and subtracts the distance of a fake's penultimate discriminator features from
//! the real ones' mean (feature matching) from its reward.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::datasets::stories::{
    load_split, StoryBatch, StoryBatches, StoryCounts, StorySplit, Targets, Tokenising,
};
use crate::error::{Error, IoContext, Result};
use crate::losses::story::{
    align_loss, feature_matching, hinge_discriminator, image_loss, policy_gradient,
};
use crate::models::captioner::{DecodeMethod, MapperKind};
use crate::models::clip::ClipEmbedder;
use crate::models::story::{
    seed_story_model, story_captioner, Discriminator, PromptFormat, StoryManifest, StoryModel,
    StorySpec,
};
use crate::rng::SplitMix64;
use crate::stages::context::ClipConfig;
use crate::stages::{Stage, StageContext};
use crate::train::{
    fit, FitOutput, MethodDefaults, Objective, OptimizerConfig, ParamGroup, StepContext,
    StepOutput, TrainConfig, TrainingSummary, WithTraining,
};

/// The adversarial variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Adversarial {
    None,
    Naive,
    Cached,
    HardNegative,
}

/// The method keys of `[story]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoryConfig {
    /// Story dataset under `data/` and its splits.
    pub dataset: String,
    pub train_split: String,
    pub val_split: String,
    /// K.
    pub context_frames: usize,
    pub targets: Targets,
    pub fusion_dim: usize,
    pub layers: usize,
    pub heads: usize,
    pub ffn_dim: usize,
    pub dropout: f64,
    pub frame_positions: bool,
    pub image_head_dim: usize,
    pub prefix_length: usize,
    pub mapper: MapperKind,
    /// Train the prefix (and the fusion encoder and image head) only.
    pub freeze_decoder: bool,
    /// The text prompt (`{context}` = the context lines) and one line of it; an empty
    /// template = no prompt.
    pub prompt_template: String,
    pub prompt_line: String,
    pub context_caption_tokens: usize,
    pub max_prompt_tokens: usize,
    /// Target tokens, end-of-text included.
    pub max_caption_tokens: usize,
    /// Weights of `L_img` and `L_align`.
    pub alpha: f64,
    pub lambda: f64,
    pub adversarial: Adversarial,
    pub beta_adv: f64,
    /// Discriminator updates every this many optimizer steps.
    pub d_every: usize,
    pub d_lr: f64,
    /// Tokens of a sampled fake caption.
    pub sample_tokens: usize,
}

impl Default for StoryConfig {
    fn default() -> Self {
        Self {
            dataset: "synthetic_stories".into(),
            train_split: "train".into(),
            val_split: "val".into(),
            context_frames: 4,
            targets: Targets::All,
            fusion_dim: 256,
            layers: 2,
            heads: 4,
            ffn_dim: 1024,
            dropout: 0.1,
            frame_positions: true,
            image_head_dim: 256,
            prefix_length: 8,
            mapper: MapperKind::Mlp,
            freeze_decoder: false,
            prompt_template: "CTX\n{context}\nNEXT:".into(),
            prompt_line: "{n}: {caption}".into(),
            context_caption_tokens: 40,
            max_prompt_tokens: 200,
            max_caption_tokens: 40,
            alpha: 0.5,
            lambda: 0.5,
            adversarial: Adversarial::None,
            beta_adv: 0.1,
            d_every: 1,
            d_lr: 1e-4,
            sample_tokens: 40,
        }
    }
}

impl MethodDefaults for StoryConfig {
    fn training() -> TrainConfig {
        TrainConfig {
            lr: 1e-4,
            ..TrainConfig::default()
        }
    }
}

impl StoryConfig {
    /// The settings that cannot work, each naming its key.
    pub fn check(&self) -> Result<()> {
        let mut bad = crate::stages::context::zero_keys(
            "story",
            &[
                ("context_frames", self.context_frames),
                ("fusion_dim", self.fusion_dim),
                ("heads", self.heads),
                ("ffn_dim", self.ffn_dim),
                ("image_head_dim", self.image_head_dim),
                ("prefix_length", self.prefix_length),
                ("max_caption_tokens", self.max_caption_tokens),
                ("d_every", self.d_every),
            ],
        );
        if self.heads > 0 && !self.fusion_dim.is_multiple_of(self.heads) {
            bad.push(format!(
                "story.fusion_dim ({}) must be a multiple of heads ({})",
                self.fusion_dim, self.heads
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bad.push(format!(
                "story.dropout must be in [0, 1), not {}",
                self.dropout
            ));
        }
        if !self.prompt_template.is_empty() && !self.prompt_template.contains("{context}") {
            bad.push("story.prompt_template must contain {context} (or be empty)".into());
        }
        crate::stages::context::refuse(bad)
    }

    /// The model shape for CLIP embeddings of width `clip_dim`.
    pub fn spec(&self, clip_dim: usize) -> StorySpec {
        StorySpec {
            clip_dim,
            context_frames: self.context_frames,
            fusion_dim: self.fusion_dim,
            layers: self.layers,
            heads: self.heads,
            ffn_dim: self.ffn_dim,
            dropout: self.dropout,
            frame_positions: self.frame_positions,
            image_head_dim: self.image_head_dim,
        }
    }

    fn prompt(&self) -> PromptFormat {
        PromptFormat {
            template: self.prompt_template.clone(),
            line: self.prompt_line.clone(),
            caption_tokens: self.context_caption_tokens,
            max_tokens: self.max_prompt_tokens,
        }
    }
}

/// `[story]`.
pub type TrainStoryConfig = WithTraining<StoryConfig>;

/// The examples of `dataset/split` under `clip`'s cached image and text features.
fn story_split(
    ctx: &StageContext,
    clip: &ClipConfig,
    dataset: &str,
    split: &str,
    k: usize,
    targets: Targets,
) -> Result<StorySplit> {
    load_split(
        &ctx.workdir,
        dataset,
        split,
        &ctx.split_features(clip, dataset, split, "image")?,
        &ctx.split_features(clip, dataset, split, "text")?,
        k,
        targets,
    )
}

/// Tensors of a batch on `device`: context image and text `(b, K, d)`, target image and
/// text `(b, d)`, ids, supervised and attention `(b, t)`.
struct BatchTensors {
    context_image: Tensor,
    context_text: Tensor,
    target_image: Tensor,
    target_text: Tensor,
    ids: Tensor,
    supervised: Tensor,
    attention: Tensor,
}

fn batch_tensors(b: &StoryBatch, device: &Device) -> candle_core::Result<BatchTensors> {
    let ctx = (b.rows, b.k, b.dim);
    Ok(BatchTensors {
        context_image: Tensor::from_slice(&b.context_image, ctx, device)?,
        context_text: Tensor::from_slice(&b.context_text, ctx, device)?,
        target_image: Tensor::from_slice(&b.target_image, (b.rows, b.dim), device)?,
        target_text: Tensor::from_slice(&b.target_text, (b.rows, b.dim), device)?,
        ids: Tensor::from_slice(&b.ids, (b.rows, b.len), device)?,
        supervised: Tensor::from_slice(&b.supervised, (b.rows, b.len), device)?,
        attention: Tensor::from_slice(&b.attention, (b.rows, b.len), device)?,
    })
}

/// The prompt of row `r` of `b`.
fn prompt_of(b: &StoryBatch, r: usize) -> &[u32] {
    &b.ids[r * b.len..r * b.len + b.prompt_lens[r]]
}

/// A sampled caption: its tokens (end-of-text included when produced) and its CLIP text
/// embedding.
#[derive(Clone)]
struct Fake {
    ids: Vec<u32>,
    text: Vec<f32>,
}

/// The generator's adversarial term: the policy-gradient surrogate, the batch's mean reward
/// and (`hard_negative`) its feature-matching distance.
type PolicyTerm = (Tensor, f64, Option<f64>);

/// The discriminator, the frozen CLIP text tower that embeds fakes, and the fakes of the
/// batch in flight (for the discriminator's turn) or of the epoch (`cached`).
struct Adversary {
    kind: Adversarial,
    disc: Discriminator,
    vars: VarMap,
    optimizer: OptimizerConfig,
    clip: ClipEmbedder,
    /// Fakes of the current batch, per row.
    batch: Vec<Fake>,
    /// `cached`: the epoch whose fakes `cache` holds, and the fakes by target key.
    cached_epoch: Option<usize>,
    cache: HashMap<String, Fake>,
    train: Option<Arc<StorySplit>>,
    tokenising: Option<Tokenising>,
}

/// The story loss: the generator (fusion encoder, image head, mapper, GPT-2) and, with an
/// adversarial variant, the discriminator.
pub struct StoryObjective {
    pub model: StoryModel,
    pub vars: VarMap,
    optimizer: OptimizerConfig,
    cfg: StoryConfig,
    seed: u64,
    micro: (usize, usize),
    val_batches: usize,
    adversary: Option<Adversary>,
}

impl StoryObjective {
    pub fn new(
        model: StoryModel,
        vars: VarMap,
        optimizer: OptimizerConfig,
        cfg: StoryConfig,
        seed: u64,
    ) -> Self {
        Self {
            model,
            vars,
            optimizer,
            cfg,
            seed,
            micro: (usize::MAX, 0),
            val_batches: 0,
            adversary: None,
        }
    }

    /// Adds the discriminator (seeded from the objective's seed) and the CLIP that embeds
    /// fakes; `train` and `tokenising` are what `cached` samples from each epoch.
    fn with_adversary(
        mut self,
        clip: ClipEmbedder,
        train: Arc<StorySplit>,
        tokenising: Tokenising,
    ) -> Result<Self> {
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, candle_core::DType::F32, self.model.device());
        let disc = Discriminator::new(self.model.spec.clip_dim, vb.pp("discriminator"))
            .map_err(|e| Error::Config(format!("building the discriminator: {e}")))?;
        crate::models::seed_vars(
            &vars,
            "discriminator.",
            "story-discriminator-init",
            self.seed,
        )?;
        let optimizer = OptimizerConfig {
            lr: self.cfg.d_lr,
            ..self.optimizer.clone()
        };
        self.adversary = Some(Adversary {
            kind: self.cfg.adversarial,
            disc,
            vars,
            optimizer,
            clip,
            batch: Vec::new(),
            cached_epoch: None,
            cache: HashMap::new(),
            train: Some(train),
            tokenising: Some(tokenising),
        });
        Ok(self)
    }

    /// Sampled captions (top-p 1, temperature 1, seeded by `label`) for rows of context
    /// features and prompts, embedded by CLIP.
    fn sample_fakes(
        &self,
        context_image: &Tensor,
        context_text: &Tensor,
        prompts: &[Vec<u32>],
        label: &str,
    ) -> candle_core::Result<Vec<Fake>> {
        let adv = self.adversary.as_ref().expect("adversarial");
        let method = DecodeMethod::Sample {
            top_p: 1.0,
            temperature: 1.0,
            seed: SplitMix64::derived(self.seed, label).next_u64(),
        };
        let gens = self.model.generate(
            context_image,
            context_text,
            prompts,
            &method,
            self.cfg.sample_tokens,
        )?;
        let texts: Vec<String> = gens.iter().map(|g| g.text.clone()).collect();
        let emb = adv
            .clip
            .embed_texts_normalized(&texts)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(gens
            .into_iter()
            .zip(emb)
            .map(|(g, text)| Fake { ids: g.ids, text })
            .collect())
    }

    /// `cached`: every training example's fake, sampled with the weights at the start of
    /// `epoch`.
    fn fill_cache(&mut self, epoch: usize) -> candle_core::Result<()> {
        let adv = self.adversary.as_ref().expect("adversarial");
        let (Some(train), Some(tok)) = (adv.train.clone(), adv.tokenising.clone()) else {
            return Ok(());
        };
        let device = self.model.device().clone();
        let mut cache = HashMap::new();
        for (i, chunk) in train.examples.chunks(64).enumerate() {
            let b = tok
                .batch(&train, chunk)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let t = batch_tensors(&b, &device)?;
            let prompts: Vec<Vec<u32>> = (0..b.rows).map(|r| prompt_of(&b, r).to_vec()).collect();
            let fakes = self.sample_fakes(
                &t.context_image,
                &t.context_text,
                &prompts,
                &format!("story-cache-{epoch}-{i}"),
            )?;
            for (key, fake) in b.keys.iter().zip(fakes) {
                cache.insert(key.clone(), fake);
            }
        }
        let adv = self.adversary.as_mut().expect("adversarial");
        adv.cache = cache;
        adv.cached_epoch = Some(epoch);
        Ok(())
    }

    fn generator_step(
        &mut self,
        b: &StoryBatch,
        ctx: &StepContext,
    ) -> candle_core::Result<StepOutput> {
        let label = if ctx.train {
            if self.micro.0 != ctx.step {
                self.micro = (ctx.step, 0);
            }
            self.micro.1 += 1;
            format!("story-train-{}-{}", ctx.step, self.micro.1)
        } else {
            self.val_batches += 1;
            format!("story-val-{}", self.val_batches)
        };
        let device = self.model.device().clone();
        let t = batch_tensors(b, &device)?;
        let mut rng = SplitMix64::derived(self.seed, &label);
        let m = &self.model;
        let z = m.fusion.forward(
            &t.context_image,
            &t.context_text,
            ctx.train.then_some(&mut rng),
        )?;
        let (lp, n) =
            m.captioner
                .completion_logprobs(Some(&z), &t.ids, &t.supervised, &t.attention)?;
        let counts: Vec<f32> = n.to_vec1()?;
        let rows = counts.iter().filter(|c| **c > 0.0).count();
        let total: f32 = counts.iter().sum();
        if rows == 0 {
            return StepOutput::nothing(&device, Vec::new());
        }
        let l_txt = (lp.sum_all()?.neg()? / f64::from(total))?;
        let pred = m.image_head.forward(&z)?;
        let l_img = image_loss(&pred, &t.target_image)?;
        let l_align = align_loss(&pred, &t.target_text)?;
        let mut loss = ((&l_txt + (&l_img * self.cfg.alpha)?)? + (&l_align * self.cfg.lambda)?)?;
        let scalar = |x: &Tensor| -> candle_core::Result<f64> { Ok(x.to_scalar::<f32>()? as f64) };
        let mut scalars = vec![
            ("nll".to_string(), scalar(&l_txt)?),
            ("image_mse".to_string(), scalar(&l_img)?),
            ("image_align".to_string(), scalar(&l_align)?),
            (
                "image_cosine".to_string(),
                scalar(
                    &(&pred * crate::kernels::l2_normalized(&t.target_image)?)?
                        .sum(1)?
                        .mean_all()?,
                )?,
            ),
        ];
        if self.adversary.is_some() {
            let (fakes, pg) = self.adversarial_term(b, &t, &z, ctx, &label)?;
            if let Some((pg, reward, matching)) = pg {
                loss = (loss + (pg * self.cfg.beta_adv)?)?;
                scalars.push(("adv/reward".to_string(), reward));
                if let Some(m) = matching {
                    scalars.push(("adv/feature_matching".to_string(), m));
                }
            }
            self.adversary.as_mut().expect("adversarial").batch = fakes;
        }
        Ok(StepOutput {
            loss,
            scalars,
            rows,
        })
    }

    /// This batch's fakes and, while training, the policy-gradient term with the mean reward
    /// (and, `hard_negative`, the batch's feature-matching distance).
    fn adversarial_term(
        &mut self,
        b: &StoryBatch,
        t: &BatchTensors,
        z: &Tensor,
        ctx: &StepContext,
        label: &str,
    ) -> candle_core::Result<(Vec<Fake>, Option<PolicyTerm>)> {
        let kind = self.cfg.adversarial;
        if kind == Adversarial::Cached
            && ctx.train
            && self.adversary.as_ref().and_then(|a| a.cached_epoch) != Some(ctx.epoch)
        {
            self.fill_cache(ctx.epoch)?;
        }
        let prompts: Vec<Vec<u32>> = (0..b.rows).map(|r| prompt_of(b, r).to_vec()).collect();
        let adv = self.adversary.as_ref().expect("adversarial");
        let fakes = match kind {
            Adversarial::Cached if ctx.train => {
                b.keys
                    .iter()
                    .map(|k| {
                        adv.cache.get(k).cloned().ok_or_else(|| {
                            candle_core::Error::Msg(format!("no cached fake for {k}"))
                        })
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?
            }
            _ => self.sample_fakes(
                &t.context_image,
                &t.context_text,
                &prompts,
                &format!("{label}-fakes"),
            )?,
        };
        if !ctx.train {
            return Ok((fakes, None));
        }
        let device = z.device().clone();
        let dim = b.dim;
        let fake_text: Vec<f32> = fakes.iter().flat_map(|f| f.text.iter().copied()).collect();
        let fake_text = Tensor::from_vec(fake_text, (b.rows, dim), &device)?;
        let image = t.target_image.detach();
        let (score, feats) = adv.disc.forward(&image, &fake_text)?;
        let mut reward = score.detach();
        let mut matching = None;
        if kind == Adversarial::HardNegative {
            // Feature matching as a reward: a fake's penultimate features close to the real
            // captions' mean earn more.
            let (_, real) = adv.disc.forward(&image, &t.target_text)?;
            let centre = real.mean_keepdim(0)?.detach();
            let distance = feats.detach().broadcast_sub(&centre)?.sqr()?.mean(1)?;
            reward = (reward - distance)?;
            matching = Some(feature_matching(&real, &feats)?.to_scalar::<f32>()? as f64);
        }
        // The sampled captions' log-probabilities under the current weights, with gradient.
        let eos = self.model.captioner.eos;
        let len = prompts
            .iter()
            .zip(&fakes)
            .map(|(p, f)| p.len() + f.ids.len().max(1))
            .max()
            .unwrap_or(1);
        let (mut ids, mut sup, mut att) = (Vec::new(), Vec::new(), Vec::new());
        for (p, f) in prompts.iter().zip(&fakes) {
            let sample: Vec<u32> = if f.ids.is_empty() {
                vec![eos]
            } else {
                f.ids.clone()
            };
            let used = p.len() + sample.len();
            ids.extend(p.iter().chain(&sample).copied());
            ids.extend(std::iter::repeat_n(eos, len - used));
            sup.extend((0..len).map(|i| f32::from(u8::from(i >= p.len() && i < used))));
            att.extend((0..len).map(|i| f32::from(u8::from(i < used))));
        }
        let ids = Tensor::from_vec(ids, (b.rows, len), &device)?;
        let sup = Tensor::from_vec(sup, (b.rows, len), &device)?;
        let att = Tensor::from_vec(att, (b.rows, len), &device)?;
        let (logp, n) = self
            .model
            .captioner
            .completion_logprobs(Some(z), &ids, &sup, &att)?;
        // Per token, as L_txt is: a caption's summed log p would weigh the adversarial term
        // by its length (~15x the NLL's gradient on the synthetic captions).
        let logp = (logp / n.clamp(1.0, f64::MAX)?)?;
        let mean_reward = reward.mean_all()?.to_scalar::<f32>()? as f64;
        let pg = policy_gradient(&logp, &reward, mean_reward)?;
        Ok((fakes, Some((pg, mean_reward, matching))))
    }

    fn discriminator_step(
        &mut self,
        b: &StoryBatch,
        ctx: &StepContext,
    ) -> candle_core::Result<StepOutput> {
        let adv = self.adversary.as_ref().expect("adversarial");
        let device = self.model.device().clone();
        if (ctx.train && !ctx.step.is_multiple_of(self.cfg.d_every)) || adv.batch.len() != b.rows {
            return StepOutput::nothing(&device, Vec::new());
        }
        let t = batch_tensors(b, &device)?;
        let fake: Vec<f32> = adv
            .batch
            .iter()
            .flat_map(|f| f.text.iter().copied())
            .collect();
        let fake = Tensor::from_vec(fake, (b.rows, b.dim), &device)?;
        let (real, _) = adv.disc.forward(&t.target_image, &t.target_text)?;
        let (fake, _) = adv.disc.forward(&t.target_image, &fake)?;
        let mut negatives = fake.clone();
        if adv.kind == Adversarial::HardNegative {
            // Each target against the ground-truth caption of the next row of another story.
            let story = |r: usize| b.keys[r].rsplit_once(':').map_or("", |s| s.0);
            let other: Vec<u32> = (0..b.rows)
                .filter_map(|r| {
                    (1..b.rows)
                        .map(|s| (r + s) % b.rows)
                        .find(|&o| story(o) != story(r))
                        .map(|o| o as u32)
                })
                .collect();
            if other.len() == b.rows {
                let idx = Tensor::from_vec(other, b.rows, &device)?;
                let shuffled = t.target_text.index_select(&idx, 0)?;
                let (hard, _) = adv.disc.forward(&t.target_image, &shuffled)?;
                negatives = Tensor::cat(&[&fake, &hard], 0)?;
            }
        }
        let loss = hinge_discriminator(&real, &negatives)?;
        let real_v: Vec<f32> = real.to_vec1()?;
        let fake_v: Vec<f32> = fake.to_vec1()?;
        let right = real_v.iter().filter(|s| **s > 0.0).count()
            + fake_v.iter().filter(|s| **s < 0.0).count();
        let scalars = vec![
            ("d/accuracy".to_string(), right as f64 / (2 * b.rows) as f64),
            (
                "d/real".to_string(),
                real_v.iter().map(|s| f64::from(*s)).sum::<f64>() / b.rows as f64,
            ),
            (
                "d/fake".to_string(),
                fake_v.iter().map(|s| f64::from(*s)).sum::<f64>() / b.rows as f64,
            ),
        ];
        Ok(StepOutput {
            loss,
            scalars,
            rows: b.rows,
        })
    }
}

impl Objective for StoryObjective {
    type Batch = StoryBatch;

    fn groups(&self) -> Vec<ParamGroup> {
        let mut groups = vec![ParamGroup::new(
            "generator",
            &self.vars,
            self.optimizer.clone(),
        )];
        if let Some(adv) = &self.adversary {
            groups.push(ParamGroup::new(
                "discriminator",
                &adv.vars,
                adv.optimizer.clone(),
            ));
        }
        groups
    }

    fn step(&mut self, b: &StoryBatch, ctx: &StepContext) -> candle_core::Result<StepOutput> {
        if ctx.group == 0 {
            self.generator_step(b, ctx)
        } else {
            self.discriminator_step(b, ctx)
        }
    }

    fn validation_end(&mut self) -> candle_core::Result<Vec<(String, f64)>> {
        self.val_batches = 0;
        Ok(Vec::new())
    }
}

/// What `train-story` did.
#[derive(Debug, Clone, Serialize)]
pub struct StorySummary {
    pub train: StoryCounts,
    pub val: StoryCounts,
    #[serde(flatten)]
    pub training: TrainingSummary,
}

impl std::fmt::Display for StorySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "train: {}; val: {}; {}",
            self.train, self.val, self.training
        )
    }
}

/// `pipeline run train-story`.
pub struct TrainStory;

impl Stage for TrainStory {
    const NAME: &'static str = "train-story";
    const DESCRIPTION: &'static str =
        "next-frame story captioner: CLIP fusion encoder, prefix GPT-2, image losses, optional GAN";
    const USES_GPU: bool = true;
    const SECTION: &'static str = "story";
    type Config = TrainStoryConfig;
    type Summary = StorySummary;

    fn run(cfg: &TrainStoryConfig, ctx: &StageContext) -> Result<StorySummary> {
        let m = &cfg.method;
        m.check()?;
        let clip = ctx.clip.clone();
        let split = |name: &str| {
            story_split(ctx, &clip, &m.dataset, name, m.context_frames, m.targets).map(Arc::new)
        };
        let (train, val) = (split(&m.train_split)?, split(&m.val_split)?);
        for (name, s) in [(&m.train_split, &train), (&m.val_split, &val)] {
            if s.counts.missing_features > 0 {
                eprintln!("train-story: {}/{name}: {}", m.dataset, s.counts);
            }
        }
        let clip_dim = train
            .examples
            .first()
            .map_or(0, |e| train.frame(e, e.target).image.len());
        let files = ctx.decoder_files()?;
        let (tokenizer, eos) = files.tokenizer()?;
        let captioner = story_captioner(
            &ctx.captioner.decoder,
            &ctx.captioner.decoder_revision,
            m.prefix_length,
            m.mapper,
            m.freeze_decoder,
        );
        let spec = m.spec(clip_dim);
        let device = ctx.device()?;
        let vars = VarMap::new();
        let model = StoryModel::build(&spec, &captioner, &files, &vars, &device)?;
        let positions = model.captioner.decoder.max_positions();
        let longest = m.prefix_length + m.max_prompt_tokens + m.max_caption_tokens;
        if longest > positions {
            return Err(Error::Config(format!(
                "story.prefix_length + story.max_prompt_tokens + story.max_caption_tokens = {longest} exceeds the decoder's {positions} positions"
            )));
        }
        seed_story_model(&vars, cfg.train.seed)?;
        let dir = ctx.stage_dir(ctx.output_name(Self::NAME));
        std::fs::create_dir_all(&dir).at(&dir)?;
        crate::io::write_json(
            &dir.join("story.json"),
            &StoryManifest {
                spec,
                captioner,
                decoder_files: files,
                prompt: m.prompt(),
                max_caption_tokens: m.max_caption_tokens,
                clip_model: clip.model.clone(),
                clip_revision: clip.revision.clone(),
                dataset: m.dataset.clone(),
                val_split: m.val_split.clone(),
                targets: m.targets,
            },
        )?;
        let tokenising = Tokenising {
            tokenizer,
            eos,
            prompt: m.prompt(),
            max_caption_tokens: m.max_caption_tokens,
        };
        let data = StoryBatches {
            train: Arc::clone(&train),
            val: Arc::clone(&val),
            tokenising: tokenising.clone(),
            batch_size: cfg.train.batch_size,
            seed: cfg.train.seed,
            capacity: 4,
        };
        let mut objective = StoryObjective::new(
            model,
            vars,
            cfg.train.optimizer(),
            m.clone(),
            cfg.train.seed,
        );
        if m.adversarial != Adversarial::None {
            let embedder = ctx.load_clip(&ctx.feature_identity(&clip)?)?;
            objective = objective.with_adversary(embedder, Arc::clone(&train), tokenising)?;
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
        Ok(StorySummary {
            train: train.counts.clone(),
            val: val.counts.clone(),
            training: TrainingSummary {
                rows: train.examples.len() as u64,
                fit,
                dir: dir.display().to_string(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::captioner::DecoderFiles;
    use crate::models::clip::ClipModelFiles;
    use crate::train::Batches;
    use crossbeam_channel::Receiver;
    use std::path::Path;

    const K: usize = 2;

    fn files() -> DecoderFiles {
        DecoderFiles::from_dir(&crate::hf_tiny_fixture("gpt2-tiny")).unwrap()
    }

    fn clip() -> ClipEmbedder {
        let files = ClipModelFiles::from_dir(&crate::hf_tiny_fixture("clip-tiny")).unwrap();
        ClipEmbedder::load(&files, &Device::Cpu, candle_core::DType::F32).unwrap()
    }

    fn config(adversarial: Adversarial) -> StoryConfig {
        StoryConfig {
            context_frames: K,
            fusion_dim: 16,
            layers: 1,
            heads: 2,
            ffn_dim: 32,
            image_head_dim: 8,
            prefix_length: 2,
            adversarial,
            sample_tokens: 4,
            ..StoryConfig::default()
        }
    }

    fn objective(adversarial: Adversarial, dim: usize, seed: u64) -> StoryObjective {
        let cfg = config(adversarial);
        let cap = story_captioner("tiny", "main", cfg.prefix_length, cfg.mapper, false);
        let vars = VarMap::new();
        let model = StoryModel::build(&cfg.spec(dim), &cap, &files(), &vars, &Device::Cpu).unwrap();
        seed_story_model(&vars, seed).unwrap();
        let train = TrainConfig {
            lr: 0.01,
            warmup_steps: 1,
            ..TrainConfig::default()
        };
        StoryObjective::new(model, vars, train.optimizer(), cfg, seed)
    }

    /// Two rows of stories `a` and `b`: features drawn from `i`, a 2-token prompt and a
    /// 3-token target (the second row's target is `supervised` only when asked).
    fn batch(i: usize, dim: usize, supervise: bool) -> StoryBatch {
        let v = |n: usize, salt: usize| -> Vec<f32> {
            (0..n)
                .map(|j| ((i * 31 + salt * 7 + j) as f32 * 0.37).sin())
                .collect()
        };
        let len = 5;
        let ids: Vec<u32> = vec![10, 11, 12, 13, 0, 20, 21, 22, 23, 0];
        let sup = |on: bool| -> Vec<f32> {
            let s = if on { 1.0 } else { 0.0 };
            vec![0.0, 0.0, s, s, s]
        };
        StoryBatch {
            rows: 2,
            k: K,
            dim,
            context_image: v(2 * K * dim, 1),
            context_text: v(2 * K * dim, 2),
            target_image: v(2 * dim, 3),
            target_text: v(2 * dim, 4),
            len,
            ids,
            supervised: [sup(supervise), sup(supervise)].concat(),
            attention: vec![1.0; 2 * len],
            prompt_lens: vec![2, 2],
            keys: vec!["a:2".into(), "b:2".into()],
            captions: vec!["x".into(), "y".into()],
        }
    }

    fn train_ctx(step: usize) -> StepContext {
        StepContext {
            group: 0,
            train: true,
            step,
            epoch: 0,
        }
    }

    #[test]
    fn the_adversarial_term_reaches_the_generator_and_not_the_discriminator() {
        let clip = clip();
        let dim = clip.embed_texts_normalized(&["x".into()]).unwrap()[0].len();
        let tok = files().tokenizer().unwrap();
        let tokenising = Tokenising {
            tokenizer: tok.0,
            eos: tok.1,
            prompt: config(Adversarial::Naive).prompt(),
            max_caption_tokens: 8,
        };
        let mut obj = objective(Adversarial::Naive, dim, 3)
            .with_adversary(clip, Arc::new(StorySplit::default()), tokenising)
            .unwrap();
        let b = batch(0, dim, true);
        let t = batch_tensors(&b, &Device::Cpu).unwrap();
        let z = obj
            .model
            .fusion
            .forward(&t.context_image, &t.context_text, None)
            .unwrap();
        let (fakes, pg) = obj
            .adversarial_term(&b, &t, &z, &train_ctx(0), "test")
            .unwrap();
        assert_eq!(fakes.len(), 2);
        let (pg, _, _) = pg.expect("a training step has the policy-gradient term");
        let grads = pg.backward().unwrap();
        // The adversarial term alone moves the fusion encoder, the mapper and GPT-2 ...
        let vars = obj.vars.data().lock().unwrap();
        for prefix in ["fusion.", "mapper.", "decoder."] {
            let moved = vars
                .iter()
                .filter(|(n, _)| n.starts_with(prefix))
                .any(|(_, v)| {
                    grads.get(v.as_tensor()).is_some_and(|g| {
                        g.abs()
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap()
                            > 0.0
                    })
                });
            assert!(moved, "no adversarial gradient reaches {prefix}");
        }
        // ... and none of it reaches the discriminator (its score is a detached reward).
        let adv = obj.adversary.as_ref().unwrap();
        let d = adv.vars.data().lock().unwrap();
        assert!(d.values().all(|v| grads.get(v.as_tensor()).is_none()));
        drop((vars, d));

        // The discriminator's turn takes the same fakes; its hinge loss is finite.
        obj.adversary.as_mut().unwrap().batch = fakes;
        let out = obj
            .discriminator_step(
                &b,
                &StepContext {
                    group: 1,
                    ..train_ctx(0)
                },
            )
            .unwrap();
        assert_eq!(out.rows, 2);
        assert!(out.loss.to_scalar::<f32>().unwrap().is_finite());
        assert!(out.scalars.iter().any(|(n, _)| n == "d/accuracy"));
    }

    #[test]
    fn a_batch_without_supervised_tokens_counts_nothing_instead_of_nan() {
        let mut obj = objective(Adversarial::None, 6, 1);
        let out = obj.step(&batch(0, 6, false), &train_ctx(0)).unwrap();
        assert_eq!(out.rows, 0);
        let out = obj.step(&batch(0, 6, true), &train_ctx(0)).unwrap();
        assert_eq!(out.rows, 2);
        let loss = out.loss.to_scalar::<f32>().unwrap();
        let parts: HashMap<String, f64> = out.scalars.into_iter().collect();
        let want = parts["nll"] + 0.5 * parts["image_mse"] + 0.5 * parts["image_align"];
        assert!(
            (f64::from(loss) - want).abs() < 1e-4,
            "L = L_txt + α L_img + λ L_align"
        );
    }

    struct Memory {
        fail_at: Option<(usize, usize)>,
    }

    impl Batches<StoryBatch> for Memory {
        fn train(&self, epoch: usize) -> Result<Receiver<Result<StoryBatch>>> {
            let (tx, rx) = crossbeam_channel::unbounded();
            for i in 0..3 {
                if self.fail_at == Some((epoch, i)) {
                    tx.send(Err(Error::Invalid("killed".into()))).unwrap();
                    break;
                }
                tx.send(Ok(batch((i + epoch) % 3, 6, true))).unwrap();
            }
            Ok(rx)
        }
        fn val(&self) -> Result<Receiver<Result<StoryBatch>>> {
            let (tx, rx) = crossbeam_channel::unbounded();
            tx.send(Ok(batch(7, 6, true))).unwrap();
            Ok(rx)
        }
        fn per_epoch(&self) -> usize {
            3
        }
    }

    fn weights(vars: &VarMap) -> Vec<(String, Vec<f32>)> {
        let data = vars.data().lock().unwrap();
        let mut out: Vec<(String, Vec<f32>)> = data
            .iter()
            .map(|(k, v)| (k.clone(), v.flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn train(dir: &Path, fail_at: Option<(usize, usize)>) -> Result<Vec<(String, Vec<f32>)>> {
        let mut obj = objective(Adversarial::None, 6, 5);
        let cfg = TrainConfig {
            epochs: 2,
            batch_size: 2,
            lr: 0.01,
            warmup_steps: 1,
            eval_every: 1,
            ..TrainConfig::default()
        };
        let metrics = dir.join("metrics.parquet");
        let out = FitOutput {
            checkpoint_dir: dir,
            metrics_path: &metrics,
            run_id: "t",
            stage: "train-story",
        };
        fit(&mut obj, &Memory { fail_at }, &cfg, &out)?;
        Ok(weights(&obj.vars))
    }

    #[test]
    fn killed_and_resumed_ends_with_the_uninterrupted_weights() {
        let whole = tempfile::tempdir().unwrap();
        let want = train(whole.path(), None).unwrap();
        let broken = tempfile::tempdir().unwrap();
        let err = train(broken.path(), Some((1, 1))).unwrap_err();
        assert!(err.to_string().contains("killed"), "{err}");
        assert_eq!(train(broken.path(), None).unwrap(), want);
        assert_ne!(weights(&objective(Adversarial::None, 6, 5).vars), want);
    }

    #[test]
    fn settings_that_cannot_work_are_refused_naming_the_key() {
        assert!(StoryConfig::default().check().is_ok());
        let bad = StoryConfig {
            fusion_dim: 30,
            heads: 4,
            context_frames: 0,
            dropout: 1.0,
            prompt_template: "no context here".into(),
            ..StoryConfig::default()
        };
        let e = bad.check().unwrap_err().to_string();
        for key in [
            "story.fusion_dim",
            "story.context_frames",
            "story.dropout",
            "story.prompt_template",
        ] {
            assert!(e.contains(key), "{key}: {e}");
        }
    }
}
