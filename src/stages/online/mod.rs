//! Captioners trained on their own captions against a reward, online: `train-dico` (Direct
//! CLIP-based Optimisation, [`dico`]) and `train-scst` (self-critical sequence training,
//! [`scst`]). Both start from a trained captioner (`init_from`, the best `train-sft`
//! checkpoint by default), caption the training images inside each step with the current
//! parameters, score those captions without gradients ([`Reward`]: CLIP-S with the embed
//! stage's CLIP or any CLIP checkpoint, or CIDEr-D against the image's references with
//! document frequencies of the training references), and learn from the scores through the
//! one training engine (warmup + cosine, clipping, NaN guard, resume).
//!
//! Every validation captions the held-out images greedily and logs `val/CLIPScore`,
//! `val/RefCLIPScore`, `val/CIDEr`, `val/mean_length` (and `val/attribute_accuracy` on the
//! synthetic world); the best checkpoint is the one with the highest `select_by`
//! (`val/RefCLIPScore` by default), and patience stops a run that no longer improves.
//!
//! Sampling inside a step is seeded by the run's seed, the epoch and the batch's first image,
//! so a resumed run draws the same captions and ends with the same weights. prefcap's GPT-2
//! has no dropout, so the search and the teacher-forced pass see the same model.

pub mod dico;
pub mod refine_diffusion;
pub mod rlhf;
pub mod scst;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::datasets::captions::{references, CaptionedSplit, ImageBatch, ImageBatches};
use crate::datasets::features::embeddings_by_key;
use crate::error::{Error, IoContext, Result};
use crate::metrics::embedding::{clip_score, cosine, ref_clip_score};
use crate::metrics::text::{cider_d, ptb_tokenize, CiderD};
use crate::models::captioner::{Captioner, CaptionerManifest, DecodeMethod, Generated};
use crate::models::clip::ClipEmbedder;
use crate::stages::context::ClipConfig;
use crate::stages::StageContext;
use crate::synthetic::{self, AttributeMatch};
use crate::train::{fit, FitOutput, FitSummary, StepContext, StepOutput, TrainConfig};

/// What a caption is rewarded by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    /// `reward_weight · cos(CLIP image, CLIP text)` (CLIP-S without its clamp at 0, so
    /// candidates below zero still rank).
    Clip,
    /// `reward_weight · CIDEr-D` against the image's references, document frequencies from
    /// the training split's references.
    Cider,
}

/// The reward keys both online stages share.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardSettings {
    pub kind: RewardKind,
    pub weight: f64,
    /// A CLIP checkpoint (hub repo or local directory) for the CLIP reward; empty = the
    /// captioner's own CLIP (the embed stage's). Its image features must be in the cache.
    pub model: String,
    pub revision: String,
}

/// The settings an online stage hands the shared machinery.
#[derive(Debug, Clone)]
pub struct OnlineSettings {
    pub init_from: String,
    pub reward: RewardSettings,
    /// Caption tokens generated (end-of-text included); 0 = `captioner.max_caption_tokens`.
    pub max_tokens: usize,
    /// Training images used: the first N in shard order; 0 = the whole split.
    pub max_train_images: u64,
    /// Validation images captioned per validation: the first N; 0 = all.
    pub val_images: u64,
    /// The validation metric that picks the best checkpoint (higher is better, unless its
    /// name ends in `loss`).
    pub select_by: String,
}

impl Reward {
    /// A reward of `settings`: its own CLIP (`None`: the metrics' CLIP), the image embeddings
    /// of that CLIP by key, and for CIDEr-D the scorer and the tokenized references by key.
    pub fn new(
        settings: RewardSettings,
        clip: Option<ClipEmbedder>,
        images: HashMap<String, Vec<f32>>,
        cider: Option<CiderD>,
        refs: HashMap<String, Vec<String>>,
    ) -> Self {
        Self {
            settings,
            clip,
            images,
            cider,
            refs,
        }
    }
}

/// Scores captions of images without gradients.
pub struct Reward {
    settings: RewardSettings,
    /// The reward's CLIP (`None`: the metrics' CLIP, [`Online::clip`]).
    clip: Option<ClipEmbedder>,
    /// The reward CLIP's image embeddings, train and validation images.
    images: HashMap<String, Vec<f32>>,
    cider: Option<CiderD>,
    /// Tokenized references of the training and validation images.
    refs: HashMap<String, Vec<String>>,
}

impl Reward {
    /// Rewards of `captions[i]` for image `keys[i]`; an empty caption (nothing to score) and
    /// an image without features or references get NaN, which the objectives skip and count.
    pub fn score(
        &self,
        metric_clip: &ClipEmbedder,
        keys: &[&str],
        captions: &[&str],
    ) -> Result<Vec<f64>> {
        let w = self.settings.weight;
        match self.settings.kind {
            RewardKind::Clip => Ok(self
                .cosines(metric_clip, keys, captions)?
                .into_iter()
                .zip(captions)
                .map(|(cos, c)| {
                    if c.trim().is_empty() {
                        f64::NAN
                    } else {
                        w * cos
                    }
                })
                .collect()),
            RewardKind::Cider => {
                let cider = self.cider.as_ref().expect("a CIDEr reward has its scorer");
                Ok(keys
                    .iter()
                    .zip(captions)
                    .map(|(k, c)| match self.refs.get(*k) {
                        Some(refs) if !c.trim().is_empty() => {
                            w * cider.score(&ptb_tokenize(c), refs)
                        }
                        _ => f64::NAN,
                    })
                    .collect())
            }
        }
    }
}

impl Reward {
    /// cos(CLIP image `keys[i]`, CLIP text `texts[i]`) under the reward's CLIP (`None`: the
    /// metrics' CLIP), each distinct text embedded once; NaN for an image without features.
    /// The empty text is embedded as CLIP embeds it (start and end tokens only).
    pub fn cosines(
        &self,
        metric_clip: &ClipEmbedder,
        keys: &[&str],
        texts: &[&str],
    ) -> Result<Vec<f64>> {
        let clip = self.clip.as_ref().unwrap_or(metric_clip);
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut distinct: Vec<String> = Vec::new();
        for t in texts {
            index.entry(t).or_insert_with(|| {
                distinct.push(t.to_string());
                distinct.len() - 1
            });
        }
        let emb = clip.embed_texts_normalized(&distinct)?;
        Ok(keys
            .iter()
            .zip(texts)
            .map(|(k, t)| match self.images.get(*k) {
                Some(img) => cosine(img, &emb[index[t]]),
                None => f64::NAN,
            })
            .collect())
    }
}

/// Held-out captions gathered over a validation pass, and their metrics at its end.
pub struct Validation {
    images: HashMap<String, Vec<f32>>,
    refs: HashMap<String, Vec<String>>,
    synthetic: bool,
    captions: Vec<(String, String, usize)>,
}

impl Validation {
    /// Validation over images with the metric CLIP's embeddings `images` and raw references
    /// `refs` by key; `synthetic`: also attribute accuracy.
    pub fn new(
        images: HashMap<String, Vec<f32>>,
        refs: HashMap<String, Vec<String>>,
        synthetic: bool,
    ) -> Self {
        Self {
            images,
            refs,
            synthetic,
            captions: Vec::new(),
        }
    }

    /// `val/CLIPScore`, `val/RefCLIPScore`, `val/CIDEr`, `val/mean_length` and (synthetic
    /// world) `val/attribute_accuracy` of the gathered captions; starts afresh.
    fn finish(&mut self, clip: &ClipEmbedder) -> Result<Vec<(String, f64)>> {
        let got = std::mem::take(&mut self.captions);
        let got: Vec<&(String, String, usize)> = got
            .iter()
            .filter(|(k, _, _)| self.refs.contains_key(k))
            .collect();
        if got.is_empty() {
            return Ok(Vec::new());
        }
        let cands: Vec<String> = got.iter().map(|g| g.1.clone()).collect();
        let refs: Vec<&Vec<String>> = got.iter().map(|g| &self.refs[&g.0]).collect();
        let cand_emb = clip.embed_texts_normalized(&cands)?;
        let flat: Vec<String> = refs.iter().flat_map(|r| r.iter().cloned()).collect();
        let ref_emb = clip.embed_texts_normalized(&flat)?;
        let (mut cs, mut rcs, mut at) = (Vec::new(), Vec::new(), 0);
        for (i, g) in got.iter().enumerate() {
            let n = refs[i].len();
            if let Some(img) = self.images.get(&g.0) {
                let s = clip_score(img, &cand_emb[i]);
                cs.push(s);
                rcs.push(ref_clip_score(s, &cand_emb[i], &ref_emb[at..at + n]));
            }
            at += n;
        }
        let tok_c: Vec<String> = cands.iter().map(|c| ptb_tokenize(c)).collect();
        let tok_r: Vec<Vec<String>> = refs
            .iter()
            .map(|rs| rs.iter().map(|r| ptb_tokenize(r)).collect())
            .collect();
        let (cider, _) = cider_d(
            &tok_c.iter().map(String::as_str).collect::<Vec<_>>(),
            &tok_r
                .iter()
                .map(|rs| rs.iter().map(String::as_str).collect())
                .collect::<Vec<_>>(),
        );
        let mean = |v: &[f64]| crate::metrics::mean(v.iter().copied());
        let mut out = vec![
            ("val/CLIPScore".to_string(), mean(&cs)),
            ("val/RefCLIPScore".to_string(), mean(&rcs)),
            ("val/CIDEr".to_string(), cider),
            (
                "val/mean_length".to_string(),
                mean(&got.iter().map(|g| g.2 as f64).collect::<Vec<_>>()),
            ),
        ];
        if self.synthetic {
            let acc: Vec<f64> = got
                .iter()
                .filter_map(|g| {
                    let truth = synthetic::parse_caption(&self.refs[&g.0][0])?;
                    Some(AttributeMatch::score(&g.1, &truth).accuracy())
                })
                .collect();
            out.push(("val/attribute_accuracy".to_string(), mean(&acc)));
        }
        Ok(out)
    }
}

/// What both online objectives hold: the policy being trained, the metrics' CLIP, the reward
/// and the validation captions.
pub struct Online {
    pub policy: Captioner,
    pub vars: VarMap,
    /// The captioner's CLIP: validation metrics, and the reward unless it names its own.
    pub clip: ClipEmbedder,
    pub reward: Reward,
    pub validation: Validation,
    pub max_tokens: usize,
    pub seed: u64,
    pub select_by: String,
    /// Rewards that were not finite (empty captions), over the whole run.
    pub skipped_rewards: u64,
    /// Seconds spent captioning inside the steps (search or sampling), over the whole run.
    pub search_seconds: f64,
}

/// Tokens of a generated caption, its end-of-text aside.
fn caption_length(g: &Generated, eos: u32) -> usize {
    g.ids.iter().filter(|&&t| t != eos).count()
}

impl Online {
    /// The batch's captioner features on the device.
    fn features(&self, b: &ImageBatch) -> candle_core::Result<Tensor> {
        Tensor::from_slice(
            &b.features,
            (b.rows, self.policy.clip_dim),
            self.policy.device(),
        )
    }

    /// Captions of the policy with its fused (non-differentiable) kernels: nothing of the
    /// search is differentiated.
    fn search<T>(
        &mut self,
        f: impl FnOnce(&Captioner) -> candle_core::Result<T>,
    ) -> candle_core::Result<T> {
        let t = std::time::Instant::now();
        self.policy.decoder.set_differentiable(false);
        let out = f(&self.policy);
        self.policy.decoder.set_differentiable(true);
        self.search_seconds += t.elapsed().as_secs_f64();
        out
    }

    /// A validation batch: greedy captions gathered for [`Validation::finish`]; nothing to
    /// learn from (`rows` 0).
    fn validation_step(&mut self, b: &ImageBatch) -> candle_core::Result<StepOutput> {
        let feats = self.features(b)?;
        let max = self.max_tokens;
        let gens = self.search(|p| p.generate(&feats, &DecodeMethod::Greedy, max))?;
        let eos = self.policy.eos;
        for (k, g) in b.keys.iter().zip(&gens) {
            self.validation
                .captions
                .push((k.clone(), g.text.clone(), caption_length(g, eos)));
        }
        StepOutput::nothing(self.policy.device(), Vec::new())
    }

    /// Rewards of `gens[i]` for image `keys[i]`.
    fn rewards(&self, keys: &[&str], gens: &[&Generated]) -> candle_core::Result<Vec<f64>> {
        let texts: Vec<&str> = gens.iter().map(|g| g.text.as_str()).collect();
        self.reward
            .score(&self.clip, keys, &texts)
            .map_err(candle_err)
    }

    /// Teacher-forced log-probability sums and token counts of generated captions under
    /// `model`, each row's image `features[rows[i]]`: end-of-text included when generated,
    /// padding masked.
    fn teacher_forced(
        model: &Captioner,
        features: &Tensor,
        image_of: &[u32],
        gens: &[&Generated],
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let dev = model.device();
        let len = gens.iter().map(|g| g.ids.len()).max().unwrap_or(1).max(1);
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for g in gens {
            ids.extend(&g.ids);
            ids.extend(std::iter::repeat_n(model.eos, len - g.ids.len()));
            mask.extend((0..len).map(|i| if i < g.ids.len() { 1f32 } else { 0.0 }));
        }
        let shape = (gens.len(), len);
        let rows = Tensor::from_slice(image_of, image_of.len(), dev)?;
        model.sequence_logprobs(
            &features.index_select(&rows, 0)?,
            &Tensor::from_vec(ids, shape, dev)?,
            &Tensor::from_vec(mask, shape, dev)?,
        )
    }

    /// The share of distinct texts among each image's captions, averaged over images.
    fn distinct_share(per_image: &[Vec<&Generated>]) -> f64 {
        let shares: Vec<f64> = per_image
            .iter()
            .filter(|c| !c.is_empty())
            .map(|c| {
                let set: std::collections::HashSet<&str> =
                    c.iter().map(|g| g.text.as_str()).collect();
                set.len() as f64 / c.len() as f64
            })
            .collect();
        crate::metrics::mean(shares.iter().copied())
    }

    /// Validation scalars at the end of a pass.
    fn validation_end(&mut self) -> candle_core::Result<Vec<(String, f64)>> {
        self.validation.finish(&self.clip).map_err(candle_err)
    }

    fn selection(&self) -> Option<(&str, bool)> {
        Some((&self.select_by, !self.select_by.ends_with("loss")))
    }
}

/// An online method: its [`Online`] state and what one training batch costs. Every such
/// method is an [`Objective`](crate::train::Objective) with one parameter group (the
/// captioner), greedy validation captions gathered in its validation steps and scored at the
/// end of each pass, and the best checkpoint chosen by `select_by`.
pub trait OnlineMethod {
    fn online(&self) -> &Online;
    fn online_mut(&mut self) -> &mut Online;
    fn optimizer(&self) -> &crate::train::OptimizerConfig;
    /// Loss and scalars of a training batch of epoch `epoch`, captions drawn inside.
    fn train_step(&mut self, b: &ImageBatch, epoch: usize) -> candle_core::Result<StepOutput>;
}

impl<M: OnlineMethod> crate::train::Objective for M {
    type Batch = ImageBatch;

    fn groups(&self) -> Vec<crate::train::ParamGroup> {
        vec![crate::train::ParamGroup::new(
            "captioner",
            &self.online().vars,
            self.optimizer().clone(),
        )]
    }

    fn step(&mut self, b: &ImageBatch, ctx: &StepContext) -> candle_core::Result<StepOutput> {
        if ctx.train {
            self.train_step(b, ctx.epoch)
        } else {
            self.online_mut().validation_step(b)
        }
    }

    fn validation_end(&mut self) -> candle_core::Result<Vec<(String, f64)>> {
        self.online_mut().validation_end()
    }

    fn selection(&self) -> Option<(&str, bool)> {
        self.online().selection()
    }

    fn validate_at_start(&self) -> bool {
        true
    }
}

/// The loop defaults of an online stage: fine-tuning from a trained captioner at a low
/// rate, few epochs, a small batch (each image is captioned several times inside the step).
pub fn online_training() -> TrainConfig {
    TrainConfig {
        epochs: 3,
        batch_size: 16,
        lr: 1e-5,
        warmup_steps: 10,
        ..TrainConfig::default()
    }
}

/// Where an online stage starts from and writes to, besides its [`Online`] state.
pub struct Prepared {
    pub manifest: CaptionerManifest,
    /// The checkpoint the policy starts from (and DiCO's reference).
    pub init: std::path::PathBuf,
    pub data: ImageBatches,
    pub dir: std::path::PathBuf,
    pub device: Device,
}

/// Loads the starting captioner, the CLIP, the reward and the images of `[captioner]`'s
/// dataset, and writes the stage's `captioner.json`.
pub fn prepare(
    stage: &str,
    settings: &OnlineSettings,
    train: &TrainConfig,
    ctx: &StageContext,
) -> Result<(Online, Prepared)> {
    let init = ctx.find_captioner(&settings.init_from).ok_or_else(|| {
        ctx.missing(
            &format!("`{}` checkpoint", settings.init_from),
            &settings.init_from,
        )
    })?;
    let manifest = CaptionerManifest::load(&init.join("captioner.json"))?;
    let cap = &manifest.captioner;
    let clip_cfg = ctx
        .clip
        .with_model(&manifest.clip_model, &manifest.clip_revision);
    let device = ctx.device()?;
    let best = init.join("best/model.safetensors");
    let (mut policy, vars) = manifest.captioner(Some(&best), &device)?;
    policy.decoder.set_differentiable(true);

    let features = |split: &str| -> Result<CaptionedSplit> {
        let (entries, _) = ctx.captioner_features(cap, &clip_cfg, &cap.dataset, split)?;
        Ok(CaptionedSplit::new(&ctx.workdir, entries))
    };
    let train_split = features(&cap.train_split)?.first(settings.max_train_images);
    let val_split = features(&cap.val_split)?.first(settings.val_images);
    if train_split.rows() == 0 || val_split.rows() == 0 {
        return Err(Error::Config(format!(
            "{stage}: {} has no cached images in `{}` or `{}`; run `pipeline run embed`",
            cap.dataset, cap.train_split, cap.val_split
        )));
    }
    let pooled = |clip: &ClipConfig, split: &str| -> Result<HashMap<String, Vec<f32>>> {
        embeddings_by_key(&ctx.split_features(clip, &cap.dataset, split, "image")?)
    };
    let clip = ctx.load_clip(&ctx.feature_identity(&clip_cfg)?)?;
    let mut val_images = pooled(&clip_cfg, &cap.val_split)?;
    let val_refs = references(&ctx.workdir, &cap.dataset, &cap.val_split)?;
    let train_refs = references(&ctx.workdir, &cap.dataset, &cap.train_split)?;

    let r = &settings.reward;
    let (reward_clip, reward_images) = match r.kind {
        RewardKind::Clip if r.model.is_empty() => {
            let mut all = pooled(&clip_cfg, &cap.train_split)?;
            all.extend(val_images.iter().map(|(k, v)| (k.clone(), v.clone())));
            (None, all)
        }
        RewardKind::Clip => {
            let reward_cfg = ctx.clip.with_model(&r.model, &r.revision);
            let identity = ctx.feature_identity(&reward_cfg)?;
            let mut all = pooled(&reward_cfg, &cap.train_split)?;
            all.extend(pooled(&reward_cfg, &cap.val_split)?);
            (Some(ctx.load_clip(&identity)?), all)
        }
        RewardKind::Cider => (None, HashMap::new()),
    };
    let tokenized = |refs: &HashMap<String, Vec<String>>| -> HashMap<String, Vec<String>> {
        refs.iter()
            .map(|(k, rs)| (k.clone(), rs.iter().map(|r| ptb_tokenize(r)).collect()))
            .collect()
    };
    let (cider, reward_refs) = match r.kind {
        RewardKind::Cider => {
            let train_tok = tokenized(&train_refs);
            let mut corpus: Vec<(&String, &Vec<String>)> = train_tok.iter().collect();
            corpus.sort();
            let scorer = CiderD::new(&corpus.iter().map(|c| c.1.clone()).collect::<Vec<_>>());
            let mut all = train_tok.clone();
            all.extend(tokenized(&val_refs));
            (Some(scorer), all)
        }
        RewardKind::Clip => (None, HashMap::new()),
    };
    val_images.retain(|k, _| val_refs.contains_key(k));
    let dir = ctx.stage_dir(ctx.output_name(stage));
    std::fs::create_dir_all(&dir).at(&dir)?;
    manifest.save(&dir.join("captioner.json"))?;
    let max_tokens = match settings.max_tokens {
        0 => cap.max_caption_tokens,
        n => n,
    };
    let online = Online {
        policy,
        vars,
        clip,
        reward: Reward::new(r.clone(), reward_clip, reward_images, cider, reward_refs),
        validation: Validation::new(
            val_images,
            val_refs,
            cap.dataset == synthetic::IMAGES_DATASET,
        ),
        max_tokens,
        seed: train.seed,
        select_by: settings.select_by.clone(),
        skipped_rewards: 0,
        search_seconds: 0.0,
    };
    let data = ImageBatches {
        train: train_split,
        val: val_split,
        batch_size: train.batch_size,
        seed: train.seed,
        capacity: 4,
        repeat: 1,
    };
    Ok((
        online,
        Prepared {
            manifest,
            init: best,
            data,
            dir,
            device,
        },
    ))
}

/// The frozen reference of a policy-regularised stage (DiCO, RLHF): the `init_from`
/// checkpoint, resident, and what it costs.
pub struct Reference {
    pub model: Captioner,
    /// Its own parameter bytes.
    pub own_bytes: u64,
    /// Decoder weight bytes it shares with the policy (frozen decoder: one memory map).
    pub shared_bytes: Option<u64>,
}

/// Loads the frozen reference of `prepared`'s starting checkpoint. With the decoder frozen
/// only the mapper trains: the reference uses the policy's decoder tensors (one copy in
/// memory) and keeps its own mapper.
pub fn frozen_reference(prepared: &Prepared, policy: &Captioner) -> Result<Reference> {
    let (mut model, vars) = prepared
        .manifest
        .captioner(Some(&prepared.init), &prepared.device)?;
    let shared_bytes = if prepared.manifest.captioner.freeze_decoder {
        model.decoder = policy.decoder.clone();
        model.decoder.set_differentiable(false);
        let weights = &prepared.manifest.decoder_files.weights;
        Some(std::fs::metadata(weights).at(weights)?.len())
    } else {
        None
    };
    Ok(Reference {
        model,
        own_bytes: var_bytes(&vars),
        shared_bytes,
    })
}

/// What an online stage did.
#[derive(Debug, Clone, Serialize)]
pub struct OnlineSummary {
    /// Training images per epoch.
    pub images: u64,
    pub init_from: String,
    pub reward: String,
    /// The validation metric that chose the best checkpoint.
    pub selection: String,
    /// Candidates or samples whose reward was not finite (empty captions), skipped.
    pub skipped_rewards: u64,
    /// Memory of the resident frozen reference (DiCO): its own parameters, and the decoder
    /// weights it shares with the policy through one memory map when the decoder is frozen.
    pub reference_bytes: Option<u64>,
    pub reference_shared_bytes: Option<u64>,
    pub fit: FitSummary,
    pub dir: String,
}

impl std::fmt::Display for OnlineSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.fit.state;
        let reference = match (self.reference_bytes, self.reference_shared_bytes) {
            (Some(own), shared) => format!(
                "; frozen reference resident: {:.1} MiB{}",
                own as f64 / (1u64 << 20) as f64,
                shared.map_or(String::new(), |b| format!(
                    " (+ {:.1} MiB of decoder weights shared with the policy)",
                    b as f64 / (1u64 << 20) as f64
                ))
            ),
            _ => String::new(),
        };
        write!(
            f,
            "{} optimizer steps over {} images from {} with the {} reward; best val {} {:.4} at step {}{reference}; {} non-finite rewards skipped; {} non-finite batches skipped; checkpoints in {}",
            s.step,
            self.images,
            self.init_from,
            self.reward,
            self.selection,
            s.best_value.unwrap_or(f64::NAN),
            s.best_step.unwrap_or(0),
            self.skipped_rewards,
            s.skipped_nonfinite,
            self.dir
        )
    }
}

/// Trains `objective` (whose [`Online`] state `online` returns) through the engine into the prepared
/// directory; returns the summary less the reference's memory.
pub fn run_fit<O: crate::train::Objective<Batch = ImageBatch>>(
    stage: &str,
    objective: &mut O,
    prepared: &Prepared,
    online: impl Fn(&O) -> &Online,
    train: &TrainConfig,
    settings: &OnlineSettings,
    ctx: &StageContext,
) -> Result<OnlineSummary> {
    let fit: FitSummary = fit(
        objective,
        &prepared.data,
        train,
        &FitOutput {
            checkpoint_dir: &prepared.dir,
            metrics_path: &ctx.metrics_path(),
            run_id: &ctx.run_id,
            stage: ctx.output_name(stage),
        },
    )?;
    let o = online(objective);
    Ok(OnlineSummary {
        images: prepared.data.train.rows(),
        init_from: settings.init_from.clone(),
        reward: match settings.reward.kind {
            RewardKind::Clip => format!("CLIP (weight {})", settings.reward.weight),
            RewardKind::Cider => format!("CIDEr-D (weight {})", settings.reward.weight),
        },
        selection: o.select_by.clone(),
        skipped_rewards: o.skipped_rewards,
        reference_bytes: None,
        reference_shared_bytes: None,
        fit,
        dir: prepared.dir.display().to_string(),
    })
}

/// A seed for the sampling of one batch: the run's seed, the epoch and the batch's first
/// image, so a resumed run samples the same captions.
pub fn batch_seed(seed: u64, epoch: usize, b: &ImageBatch) -> u64 {
    let first = b.keys.first().map_or("", String::as_str);
    crate::rng::SplitMix64::derived(seed, &format!("online-{epoch}-{first}")).next_u64()
}

/// Checks the reward keys shared by both stages.
pub fn check_reward(r: &RewardSettings, stage: &str) -> Result<()> {
    if !r.weight.is_finite() || r.weight <= 0.0 {
        return Err(Error::Config(format!(
            "{stage}.reward_weight must be a positive number, not {}",
            r.weight
        )));
    }
    if r.kind == RewardKind::Cider && !r.model.is_empty() {
        return Err(Error::Config(format!(
            "{stage}.reward_model names a CLIP checkpoint; the `cider` reward uses none"
        )));
    }
    Ok(())
}

/// `e` as a candle error (the objective's step returns candle results).
pub fn candle_err(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Parameter bytes of the variables in `vars`.
pub fn var_bytes(vars: &VarMap) -> u64 {
    vars.all_vars()
        .iter()
        .map(|v| (v.elem_count() * v.dtype().size_in_bytes()) as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::captioner::{seed_mapper, CaptionerConfig};
    use crate::models::clip::ClipModelFiles;
    use crate::models::gpt2::DecoderFiles;
    use crate::models::reward::RewardModel;
    use crate::stages::online::dico::{DicoConfig, DicoObjective};
    use crate::stages::online::rlhf::{RlhfConfig, RlhfObjective};
    use crate::stages::online::scst::{ScstConfig, ScstObjective};
    use crate::train::{Batches, Objective, TrainConfig};
    use candle_core::DType;
    use crossbeam_channel::Receiver;

    const CAPTIONS: [&str; 4] = [
        "a red circle above a blue square",
        "a green triangle left of a red circle",
        "a blue square below a green triangle",
        "a red square right of a blue circle",
    ];

    /// Eight images with random 16-d features (the tiny CLIP's width) and one caption each.
    fn images() -> Vec<(String, Vec<f32>, String)> {
        let mut rng = crate::rng::SplitMix64::new(7);
        (0..8)
            .map(|i| {
                (
                    format!("img{i}"),
                    rng.normal_samples(16, 1.0),
                    CAPTIONS[i % 4].to_string(),
                )
            })
            .collect()
    }

    fn captioner(vars: &VarMap) -> Captioner {
        let cfg = CaptionerConfig {
            prefix_length: 2,
            max_caption_tokens: 6,
            ..CaptionerConfig::default()
        };
        let files = DecoderFiles::from_dir(&crate::hf_tiny_fixture("gpt2-tiny")).unwrap();
        let mut model = Captioner::build(&cfg, 16, 0, &files, None, vars, &Device::Cpu).unwrap();
        seed_mapper(vars, 1).unwrap();
        model.decoder.set_differentiable(true);
        model
    }

    fn online(kind: RewardKind) -> Online {
        let vars = VarMap::new();
        let policy = captioner(&vars);
        let files = ClipModelFiles::from_dir(&crate::hf_tiny_fixture("clip-tiny")).unwrap();
        let clip = ClipEmbedder::load(&files, &Device::Cpu, DType::F32).unwrap();
        let all = images();
        let feats: HashMap<String, Vec<f32>> =
            all.iter().map(|(k, f, _)| (k.clone(), f.clone())).collect();
        let refs: HashMap<String, Vec<String>> = all
            .iter()
            .map(|(k, _, c)| (k.clone(), vec![c.clone()]))
            .collect();
        let tokenized: HashMap<String, Vec<String>> = refs
            .iter()
            .map(|(k, r)| (k.clone(), r.iter().map(|c| ptb_tokenize(c)).collect()))
            .collect();
        let corpus: Vec<Vec<String>> = (0..8)
            .map(|i| tokenized[&format!("img{i}")].clone())
            .collect();
        Online {
            policy,
            vars,
            clip,
            reward: Reward {
                settings: RewardSettings {
                    kind,
                    weight: 2.0,
                    model: String::new(),
                    revision: String::new(),
                },
                clip: None,
                images: feats.clone(),
                cider: Some(CiderD::new(&corpus)),
                refs: tokenized,
            },
            validation: Validation {
                images: feats,
                refs,
                synthetic: false,
                captions: Vec::new(),
            },
            max_tokens: 6,
            seed: 3,
            select_by: "val/RefCLIPScore".into(),
            skipped_rewards: 0,
            search_seconds: 0.0,
        }
    }

    /// Two batches of four images per epoch (their order turns with the epoch); the first
    /// four validate. `fail_at`: the training batch (epoch, index) where the "process dies".
    struct Memory {
        fail_at: Option<(usize, usize)>,
    }

    fn batch(rows: &[(String, Vec<f32>, String)]) -> ImageBatch {
        ImageBatch {
            rows: rows.len(),
            keys: rows.iter().map(|r| r.0.clone()).collect(),
            features: rows.iter().flat_map(|r| r.1.clone()).collect(),
        }
    }

    impl Batches<ImageBatch> for Memory {
        fn train(&self, epoch: usize) -> Result<Receiver<Result<ImageBatch>>> {
            let mut all = images();
            all.rotate_left(3 * epoch % 8);
            let (tx, rx) = crossbeam_channel::unbounded();
            for (i, chunk) in all.chunks(4).enumerate() {
                if self.fail_at == Some((epoch, i)) {
                    tx.send(Err(Error::Invalid("killed".into()))).unwrap();
                    break;
                }
                tx.send(Ok(batch(chunk))).unwrap();
            }
            Ok(rx)
        }
        fn val(&self) -> Result<Receiver<Result<ImageBatch>>> {
            let (tx, rx) = crossbeam_channel::unbounded();
            tx.send(Ok(batch(&images()[..4]))).unwrap();
            Ok(rx)
        }
        fn per_epoch(&self) -> usize {
            2
        }
    }

    fn train_cfg() -> TrainConfig {
        TrainConfig {
            epochs: 2,
            batch_size: 4,
            lr: 0.01,
            warmup_steps: 1,
            eval_every: 1,
            ..TrainConfig::default()
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

    /// Trains a fresh objective in `dir`, dying at `fail_at` when given; the final weights.
    fn run<O: Objective<Batch = ImageBatch>>(
        make: &dyn Fn() -> O,
        vars: impl Fn(&O) -> VarMap,
        dir: &std::path::Path,
        fail_at: Option<(usize, usize)>,
    ) -> Result<Vec<(String, Vec<f32>)>> {
        let mut obj = make();
        let metrics = dir.join("metrics.parquet");
        let out = FitOutput {
            checkpoint_dir: dir,
            metrics_path: &metrics,
            run_id: "t",
            stage: "online",
        };
        fit(&mut obj, &Memory { fail_at }, &train_cfg(), &out)?;
        Ok(weights(&vars(&obj)))
    }

    fn killed_and_resumed_equals_uninterrupted<O: Objective<Batch = ImageBatch>>(
        make: &dyn Fn() -> O,
        vars: impl Fn(&O) -> VarMap + Copy,
    ) {
        let whole = tempfile::tempdir().unwrap();
        let want = run(make, vars, whole.path(), None).unwrap();
        let start = weights(&vars(&make()));
        assert_ne!(want, start, "training moved the weights");
        let broken = tempfile::tempdir().unwrap();
        let err = run(make, vars, broken.path(), Some((1, 1))).unwrap_err();
        assert!(err.to_string().contains("killed"), "{err}");
        let got = run(make, vars, broken.path(), None).unwrap();
        assert_eq!(got, want, "resumed weights equal the uninterrupted run's");
    }

    #[test]
    fn dico_killed_and_resumed_ends_with_identical_weights() {
        let make = || {
            let ref_vars = VarMap::new();
            DicoObjective {
                online: online(RewardKind::Clip),
                reference: captioner(&ref_vars),
                cfg: DicoConfig {
                    candidates: 3,
                    ..DicoConfig::default()
                },
                optimizer: train_cfg().optimizer(),
                last_mean_length: 0.0,
            }
        };
        killed_and_resumed_equals_uninterrupted(&make, |o: &DicoObjective| o.online.vars.clone());
    }

    #[test]
    fn scst_killed_and_resumed_ends_with_identical_weights() {
        let make = || ScstObjective {
            online: online(RewardKind::Cider),
            cfg: ScstConfig {
                samples: 3,
                ..ScstConfig::default()
            },
            optimizer: train_cfg().optimizer(),
        };
        killed_and_resumed_equals_uninterrupted(&make, |o: &ScstObjective| o.online.vars.clone());
    }

    /// An RLHF objective whose reference is its policy's starting point, and the reward
    /// model's variables.
    fn rlhf_and_reward_vars(shaping: crate::losses::reward::Shaping) -> (RlhfObjective, VarMap) {
        let reward_vars = VarMap::new();
        let reward_model = RewardModel::new(captioner(&reward_vars), &reward_vars, 5).unwrap();
        let obj = RlhfObjective::new(
            online(RewardKind::Clip),
            captioner(&VarMap::new()),
            reward_model,
            RlhfConfig {
                samples: 3,
                shaping,
                ..RlhfConfig::default()
            },
            train_cfg().optimizer(),
        );
        (obj, reward_vars)
    }

    fn rlhf(shaping: crate::losses::reward::Shaping) -> RlhfObjective {
        rlhf_and_reward_vars(shaping).0
    }

    #[test]
    fn rlhf_killed_and_resumed_ends_with_identical_weights() {
        let make = || rlhf(crate::losses::reward::Shaping::Hierarchical);
        killed_and_resumed_equals_uninterrupted(&make, |o: &RlhfObjective| o.online.vars.clone());
    }

    #[test]
    fn rlhf_ppo_epochs_reuse_a_rollout_under_the_clipped_ratio() {
        let mut obj = rlhf(crate::losses::reward::Shaping::Hierarchical);
        obj.cfg.ppo_epochs = 2;
        let mut trainer = crate::train::Trainer::new(obj.groups()).unwrap();
        let b = batch(&images()[..4]);
        let mut seen = Vec::new();
        // From step 1: warmup gives step 0 a rate of 0.
        for step in 1..4 {
            let loss = trainer.step(&mut obj, &b, step, 10).unwrap().losses[0];
            seen.push((loss, obj.rollout_scalar("reward").unwrap()));
        }
        // The second step reuses the first one's captions and rewards, with the updated
        // policy's ratio; the third draws a new rollout.
        assert_eq!(seen[0].1, seen[1].1, "{seen:?}");
        assert_ne!(seen[0].0, seen[1].0, "{seen:?}");
        assert!(seen.iter().all(|(l, r)| l.is_finite() && r.is_finite()));
        let weights_moved = trainer.step(&mut obj, &b, 4, 10).unwrap().updated[0];
        assert!(weights_moved);
    }

    #[test]
    fn rlhf_rewards_telescope_carry_no_gradient_and_empty_captions_have_none() {
        use crate::losses::reward::Shaping;
        let obj = rlhf(Shaping::Hierarchical);
        let b = batch(&images()[..2]);
        let feats = obj.online.features(&b).unwrap();
        let tok = |t: &str| {
            crate::models::captioner::caption_ids(
                &obj.online.policy.tokenizer,
                obj.online.policy.eos,
                t,
                8,
            )
            .unwrap()
        };
        let gens: Vec<Generated> = ["a red circle above", ""]
            .iter()
            .map(|t| Generated {
                ids: if t.is_empty() {
                    vec![obj.online.policy.eos]
                } else {
                    tok(t)
                },
                text: t.to_string(),
                logprob: 0.0,
            })
            .collect();
        let r = obj
            .sample_rewards(
                &feats,
                &["img0", "img1"],
                &[0, 1],
                &gens.iter().collect::<Vec<_>>(),
            )
            .unwrap();
        // The increments telescope to w [cos(image, caption) − cos(image, "")]; end-of-text
        // adds nothing.
        let cos = obj
            .online
            .reward
            .cosines(
                &obj.online.clip,
                &["img0", "img0"],
                &["a red circle above", ""],
            )
            .unwrap();
        assert_eq!(r.dense[0].len(), gens[0].ids.len());
        let sum: f64 = r.dense[0].iter().sum();
        assert!(
            (sum - 2.5 * (cos[0] - cos[1])).abs() < 1e-5,
            "{sum} vs {cos:?}"
        );
        assert_eq!(*r.dense[0].last().unwrap(), 0.0);
        assert!(r.sparse[0].is_finite());
        assert!(r.sparse[1].is_nan(), "an empty caption has no reward");

        // A training step: KL 0 (policy = reference), the reward model gets no gradient,
        // the policy does; each shaping mixes as documented.
        let ctx = StepContext {
            group: 0,
            train: true,
            step: 0,
            epoch: 0,
        };
        let mut by_shaping = Vec::new();
        for shaping in [Shaping::Hierarchical, Shaping::Sparse, Shaping::Dense] {
            let (mut obj, reward_vars) = rlhf_and_reward_vars(shaping);
            let out = obj.step(&batch(&images()[..4]), &ctx).unwrap();
            let get = |n: &str| out.scalars.iter().find(|(m, _)| m == n).unwrap().1;
            assert!(out.rows > 0);
            assert!(get("kl").abs() < 1e-5, "kl {}", get("kl"));
            let grads = out.loss.backward().unwrap();
            assert!(
                reward_vars
                    .all_vars()
                    .iter()
                    .all(|v| grads.get(v.as_tensor()).is_none()),
                "rewards carry no gradient"
            );
            let policy_vars = obj.online.vars.all_vars();
            assert!(policy_vars
                .iter()
                .any(|v| grads.get(v.as_tensor()).is_some()));
            let alpha = get("alpha/mean");
            match shaping {
                Shaping::Sparse => assert_eq!(alpha, 0.0),
                Shaping::Dense => assert_eq!(alpha, 1.0),
                _ => assert!(alpha > 0.3 && alpha < 0.9, "{alpha}"),
            }
            // Same seed, same samples: the raw rewards agree, the mix does not.
            by_shaping.push((get("reward/dense"), get("reward/sparse"), get("reward")));
        }
        // An image without features has no reward: its samples are skipped and counted, and
        // the step still learns from the other image's.
        let mut obj = rlhf(Shaping::Hierarchical);
        let mut b = batch(&images()[..2]);
        b.keys[1] = "no-features".into();
        let out = obj.step(&b, &ctx).unwrap();
        let skipped = out
            .scalars
            .iter()
            .find(|(n, _)| n == "reward/skipped")
            .unwrap()
            .1;
        assert!(skipped >= 3.0, "{skipped}");
        assert_eq!(obj.online.skipped_rewards as f64, skipped);
        assert!(f64::from(out.loss.to_scalar::<f32>().unwrap()).is_finite());

        let (d, s, _) = by_shaping[0];
        assert!(
            by_shaping.iter().all(|x| x.0 == d && x.1 == s),
            "{by_shaping:?}"
        );
        assert!((by_shaping[1].2 - s).abs() < 1e-9, "sparse: R_sparse alone");
        assert!(
            (by_shaping[2].2 - d).abs() < 1e-9,
            "dense: the increments alone"
        );
    }

    #[test]
    fn a_step_logs_the_rewards_and_skips_empty_captions_without_nan() {
        let mut o = online(RewardKind::Clip);
        let keys = ["img0", "img1"];
        let texts = ["a red circle", ""];
        let r = o.reward.score(&o.clip, &keys, &texts).unwrap();
        assert!(r[0].is_finite() && r[0].abs() <= 2.0, "{r:?}");
        assert!(r[1].is_nan(), "an empty caption has no reward");
        // A DiCO step over real candidates: finite loss, the documented scalars.
        let mut obj = DicoObjective {
            online: {
                o.seed = 1;
                o
            },
            reference: captioner(&VarMap::new()),
            cfg: DicoConfig {
                candidates: 4,
                ..DicoConfig::default()
            },
            optimizer: train_cfg().optimizer(),
            last_mean_length: 0.0,
        };
        let ctx = StepContext {
            group: 0,
            train: true,
            step: 0,
            epoch: 0,
        };
        let out = obj.step(&batch(&images()[..4]), &ctx).unwrap();
        let loss = f64::from(out.loss.to_scalar::<f32>().unwrap());
        // Policy = reference at the start: every image's loss is ln 2.
        assert!(out.rows > 0);
        assert!((loss - std::f64::consts::LN_2).abs() < 1e-4, "{loss}");
        for name in [
            "reward/mean",
            "reward/max",
            "reward/min",
            "reward/winner",
            "candidates/mean_length",
            "candidates/distinct",
        ] {
            assert!(
                out.scalars.iter().any(|(n, v)| n == name && v.is_finite()),
                "{name}: {:?}",
                out.scalars
            );
        }
    }
}
