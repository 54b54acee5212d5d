//! `pipeline run pretrain-clip`: contrastive pretraining of the embedded tiny CLIP on the
//! synthetic world (CLIP's symmetric InfoNCE loss, with NegCLIP-style hard negatives), so that
//! it grounds colours, shapes and layout the way the real one grounds web images.
//!
//! A random CLIP's pooled image embedding carries little of an image's layout, and a
//! captioner conditioned on it cannot tell `a red circle above a blue square` from its
//! converse-false swap. Pretraining renders fresh scenes (never the dataset's own images) on a
//! loader thread and pulls each image towards its caption and away from the other captions of
//! the batch and, as a hard negative, from its own caption with subject and object exchanged,
//! which names the same shapes in the wrong places. It is an ordinary run of the training
//! engine: validation on held-out scenes logs the loss, `swap_accuracy` and `retrieval_at_1`.
//! The trained weights become a Hugging Face checkpoint in `runs/<id>/pretrain-clip/model/`
//! ([`crate::stages::context::PRETRAINED_TINY_CLIP`]), which `clip.model = "tiny"` resolves
//! to from then on.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use crossbeam_channel::{bounded, Receiver};
use serde::{Deserialize, Serialize};

use crate::data::records::MetricRow;
use crate::data::shard::read_parquet;
use crate::error::{CandleContext, Error, IoContext, Result};
use crate::imaging::preprocess::{preprocess_rgb, ClipPreprocessConfig};
use crate::losses::contrastive::{clip_loss, l2_normalized};
use crate::models::clip::train::TrainableClip;
use crate::models::clip::{ClipEmbedder, ClipModelFiles};
use crate::models::tiny::save_safetensors;
use crate::rng::SplitMix64;
use crate::stages::{Stage, StageContext};
use crate::synthetic::{self, Scene};
use crate::train::{
    fit, Batches, FitOutput, Objective, OptimizerConfig, ParamGroup, Schedule, StepContext,
    StepOutput, TrainConfig,
};

/// `[pretrain_clip]`: how the tiny CLIP is pretrained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainClipConfig {
    /// Optimizer steps, each on `batch_size` freshly rendered scenes; 0 keeps the seeded
    /// random initialisation (written as the stage's checkpoint all the same).
    pub steps: usize,
    pub batch_size: usize,
    /// Peak learning rate (AdamW without weight decay, linear warmup then cosine decay).
    pub lr: f64,
    pub warmup_steps: usize,
    /// Add each image's subject/object-swapped caption as an extra negative text.
    pub hard_negatives: bool,
    /// Held-out scenes of the validation.
    pub val_scenes: usize,
}

impl Default for PretrainClipConfig {
    fn default() -> Self {
        Self {
            steps: 100,
            batch_size: 128,
            lr: 2e-3,
            warmup_steps: 20,
            hard_negatives: true,
            val_scenes: 256,
        }
    }
}

/// What pretraining achieved, on the held-out scenes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PretrainSummary {
    pub steps: usize,
    /// Training loss of the first and the last step.
    pub first_loss: f64,
    pub last_loss: f64,
    /// Share of held-out images closer to their caption than to its subject/object swap.
    pub swap_accuracy: f64,
    /// Share of held-out images whose nearest caption, among those of all held-out images, is
    /// their own (or one with the same meaning).
    pub retrieval_at_1: f64,
    /// The trained checkpoint (Hugging Face layout).
    pub model_dir: String,
}

impl std::fmt::Display for PretrainSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} steps, loss {:.3} → {:.3}; held-out swap accuracy {:.3}, retrieval@1 {:.3}; checkpoint in {}",
            self.steps,
            self.first_loss,
            self.last_loss,
            self.swap_accuracy,
            self.retrieval_at_1,
            self.model_dir
        )
    }
}

/// `pipeline run pretrain-clip`.
pub struct PretrainClip;

impl Stage for PretrainClip {
    const NAME: &'static str = "pretrain-clip";
    const DESCRIPTION: &'static str =
        "contrastive pretraining of the embedded tiny CLIP on rendered synthetic scenes";
    const USES_GPU: bool = false;
    const SECTION: &'static str = "pretrain_clip";
    type Config = PretrainClipConfig;
    type Summary = PretrainSummary;

    fn run(cfg: &PretrainClipConfig, ctx: &StageContext) -> Result<PretrainSummary> {
        if ctx.clip.model != "tiny" {
            return Err(Error::Config(format!(
                "pretrain-clip trains the embedded tiny CLIP (clip.model = \"tiny\"); clip.model is `{}`",
                ctx.clip.model
            )));
        }
        let start = ctx.random_tiny_clip()?;
        let dir = ctx.stage_dir(Self::NAME);
        let summary = pretrain(
            &start,
            &dir,
            cfg,
            ctx.run.seed,
            &ctx.run_id,
            &ctx.metrics_path(),
        )?;
        Ok(summary)
    }
}

/// Pretrains the checkpoint in `start` (left unchanged), with checkpoints and the trained
/// model under `dir` and metrics in `metrics`. Deterministic for a given checkpoint, config
/// and seed.
pub fn pretrain(
    start: &Path,
    dir: &Path,
    cfg: &PretrainClipConfig,
    seed: u64,
    run_id: &str,
    metrics: &Path,
) -> Result<PretrainSummary> {
    let model_dir = dir.join("model");
    std::fs::create_dir_all(&model_dir).at(&model_dir)?;
    for name in ["config.json", "tokenizer.json", "preprocessor_config.json"] {
        std::fs::copy(start.join(name), model_dir.join(name)).at(model_dir.join(name))?;
    }
    if cfg.steps == 0 {
        // Nothing to train: the seeded random initialisation is the model, as configured.
        let weights = start.join("model.safetensors");
        let bytes = std::fs::read(&weights).at(&weights)?;
        crate::io::write_atomic(&model_dir.join("model.safetensors"), &bytes)?;
        return finish(PretrainSummary {
            steps: 0,
            first_loss: f64::NAN,
            last_loss: f64::NAN,
            swap_accuracy: f64::NAN,
            retrieval_at_1: f64::NAN,
            model_dir: model_dir.display().to_string(),
        });
    }
    let files = ClipModelFiles::from_dir(start)?;
    let embedder = ClipEmbedder::load(&files, &Device::Cpu, DType::F32)?;
    let model = TrainableClip::load(&files)?;
    let data = SceneBatches {
        preprocess: embedder.preprocess.clone(),
        image_size: embedder.config.vision_config.image_size,
        cfg: cfg.clone(),
        seed,
    };
    let mut objective = ContrastiveClip {
        model,
        embedder,
        optimizer: OptimizerConfig {
            lr: cfg.lr,
            weight_decay: 0.0,
            warmup_steps: cfg.warmup_steps,
            max_grad_norm: 1.0,
            schedule: Schedule::WarmupCosine,
            ..OptimizerConfig::default()
        },
    };
    let loop_cfg = TrainConfig {
        epochs: 1,
        batch_size: cfg.batch_size,
        seed,
        ..TrainConfig::default()
    };
    let fitted = fit(
        &mut objective,
        &data,
        &loop_cfg,
        &FitOutput {
            checkpoint_dir: dir,
            metrics_path: metrics,
            run_id,
            stage: PretrainClip::NAME,
        },
    )?;
    // The trained weights in the checkpoint's own layout and names, beside its other files.
    let tensors = objective
        .model
        .tensors()
        .during("reading the trained weights")?;
    save_safetensors(&model_dir.join("model.safetensors"), &tensors)?;
    let rows: Vec<MetricRow> = read_parquet(metrics)?;
    let value = |split: &str, name: &str, last: bool| {
        let mut v = rows
            .iter()
            .filter(|r| r.run_id == run_id && r.stage == PretrainClip::NAME)
            .filter(|r| r.split == split && r.name == name);
        if last { v.next_back() } else { v.next() }.map_or(f64::NAN, |r| r.value)
    };
    let summary = PretrainSummary {
        steps: fitted.state.step,
        first_loss: value("train", "loss", false),
        last_loss: value("train", "loss", true),
        swap_accuracy: value("val", "swap_accuracy", true),
        retrieval_at_1: value("val", "retrieval_at_1", true),
        model_dir: model_dir.display().to_string(),
    };
    finish(summary)
}

/// Records `summary` beside the checkpoint (`pretrain.json`).
fn finish(summary: PretrainSummary) -> Result<PretrainSummary> {
    crate::io::write_json(
        &Path::new(&summary.model_dir).join("pretrain.json"),
        &summary,
    )?;
    Ok(summary)
}

/// Freshly rendered scenes: their layouts, captions (then, with hard negatives, each
/// caption's subject/object swap) and preprocessed pixels `(n, 3, s, s)`.
pub struct SceneBatch {
    scenes: Vec<Scene>,
    captions: Vec<String>,
    pixels: Tensor,
}

/// Where the scenes come from: a seeded stream rendered on a loader thread, `steps` batches
/// for training and one batch of `val_scenes` from a stream of its own for validation.
struct SceneBatches {
    preprocess: ClipPreprocessConfig,
    image_size: usize,
    cfg: PretrainClipConfig,
    seed: u64,
}

/// The caption naming the same shapes with subject and object exchanged: false for the image.
fn swapped(scene: &Scene) -> Scene {
    Scene {
        subject: scene.object,
        relation: scene.relation,
        object: scene.subject,
    }
}

/// One batch of `n` fresh scenes from `rng`.
fn render_batch(
    rng: &mut SplitMix64,
    n: usize,
    size: usize,
    preprocess: &ClipPreprocessConfig,
    hard_negatives: bool,
) -> Result<SceneBatch> {
    let mut scenes = Vec::with_capacity(n);
    let mut pixels = Vec::with_capacity(n * 3 * size * size);
    for _ in 0..n {
        let layout = synthetic::random_layout(rng);
        let img = synthetic::render(&layout, size as u32);
        let (w, h) = img.dimensions();
        pixels.extend(preprocess_rgb(
            img.as_raw(),
            w as usize,
            h as usize,
            preprocess,
        )?);
        scenes.push(layout.scene);
    }
    let mut captions: Vec<String> = scenes.iter().map(synthetic::caption).collect();
    if hard_negatives {
        captions.extend(scenes.iter().map(|s| synthetic::caption(&swapped(s))));
    }
    let pixels = Tensor::from_vec(pixels, (n, 3, size, size), &Device::Cpu)
        .during("batching rendered scenes")?;
    Ok(SceneBatch {
        scenes,
        captions,
        pixels,
    })
}

impl SceneBatches {
    fn stream(
        &self,
        label: &'static str,
        batches: usize,
        n: usize,
        hard: bool,
    ) -> Receiver<Result<SceneBatch>> {
        let (tx, rx) = bounded(2);
        let (preprocess, size, seed) = (self.preprocess.clone(), self.image_size, self.seed);
        std::thread::spawn(move || {
            let mut rng = SplitMix64::derived(seed, label);
            for _ in 0..batches {
                let batch = render_batch(&mut rng, n, size, &preprocess, hard);
                let failed = batch.is_err();
                if tx.send(batch).is_err() || failed {
                    return;
                }
            }
        });
        rx
    }
}

impl Batches<SceneBatch> for SceneBatches {
    fn train(&self, _epoch: usize) -> Result<Receiver<Result<SceneBatch>>> {
        let c = &self.cfg;
        Ok(self.stream(
            "tiny-clip-pretrain",
            c.steps,
            c.batch_size,
            c.hard_negatives,
        ))
    }

    fn val(&self) -> Result<Receiver<Result<SceneBatch>>> {
        // Always with the swaps: they are what swap accuracy compares against.
        Ok(self.stream("tiny-clip-pretrain-eval", 1, self.cfg.val_scenes, true))
    }

    fn per_epoch(&self) -> usize {
        self.cfg.steps
    }
}

/// CLIP's contrastive loss over a batch of scenes; one parameter group, every tensor.
struct ContrastiveClip {
    model: TrainableClip,
    /// The checkpoint's tokenizer (CLIP's: BOS … EOS, truncated to the positions).
    embedder: ClipEmbedder,
    optimizer: OptimizerConfig,
}

impl Objective for ContrastiveClip {
    type Batch = SceneBatch;

    fn groups(&self) -> Vec<ParamGroup> {
        vec![ParamGroup::new(
            "clip",
            &self.model.map,
            self.optimizer.clone(),
        )]
    }

    fn step(&mut self, b: &SceneBatch, ctx: &StepContext) -> candle_core::Result<StepOutput> {
        let refs: Vec<&str> = b.captions.iter().map(String::as_str).collect();
        let (ids, pool_at) = self
            .embedder
            .tokenize(&refs)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let images = self.model.image_features(&b.pixels)?;
        let texts = self.model.text_features(&ids, &pool_at)?;
        let loss = clip_loss(&images, &texts, &self.model.logit_scale()?)?;
        let mut scalars = Vec::new();
        if !ctx.train {
            let n = b.scenes.len();
            let sims = l2_normalized(&images)?
                .matmul(&l2_normalized(&texts)?.t()?)?
                .to_vec2::<f32>()?;
            let (mut swap_right, mut retrieved) = (0usize, 0usize);
            for (i, row) in sims.iter().enumerate() {
                swap_right += usize::from(row[i] > row[n + i]);
                let best = (0..n)
                    .max_by(|&a, &c| row[a].total_cmp(&row[c]))
                    .unwrap_or(i);
                retrieved += usize::from(b.scenes[best].same_meaning(&b.scenes[i]));
            }
            scalars.push(("swap_accuracy".into(), swap_right as f64 / n as f64));
            scalars.push(("retrieval_at_1".into(), retrieved as f64 / n as f64));
        }
        Ok(StepOutput {
            loss,
            scalars,
            rows: b.scenes.len(),
        })
    }

    /// CLIP's training keeps `logit_scale` at or below ln 100.
    fn after_update(&mut self, _group: usize) -> candle_core::Result<()> {
        self.model.clamp_logit_scale()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::tiny::ensure_tiny_clip;
    use crate::models::tiny::tests::small as small_spec;

    fn small_cfg(steps: usize) -> PretrainClipConfig {
        PretrainClipConfig {
            steps,
            batch_size: 16,
            warmup_steps: 2,
            val_scenes: 64,
            ..PretrainClipConfig::default()
        }
    }

    /// Pretraining lowers the contrastive loss, is byte-for-byte deterministic, leaves its
    /// starting checkpoint alone, and writes a checkpoint that loads through the ordinary path
    /// and embeds as the trained parameters do.
    #[test]
    fn pretraining_is_deterministic_lowers_the_loss_and_saves_a_loadable_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let start = ensure_tiny_clip(
            &tmp.path().join("start"),
            &small_spec(),
            &synthetic::corpus(),
        )
        .unwrap();
        let before = std::fs::read(start.join("model.safetensors")).unwrap();
        let run = |name: &str| {
            let dir = tmp.path().join(name);
            pretrain(
                &start,
                &dir,
                &small_cfg(40),
                42,
                name,
                &dir.join("m.parquet"),
            )
            .unwrap()
        };
        let (a, b) = (run("a"), run("b"));
        let bytes = |s: &PretrainSummary| {
            std::fs::read(Path::new(&s.model_dir).join("model.safetensors")).unwrap()
        };
        assert_eq!(bytes(&a), bytes(&b));
        assert_ne!(bytes(&a), before);
        assert_eq!(
            std::fs::read(start.join("model.safetensors")).unwrap(),
            before
        );
        assert_eq!(a.steps, 40);
        assert!(
            a.last_loss < 0.9 * a.first_loss,
            "loss {} -> {}",
            a.first_loss,
            a.last_loss
        );
        assert!((0.0..=1.0).contains(&a.swap_accuracy));
        assert!((0.0..=1.0).contains(&a.retrieval_at_1));

        let files = ClipModelFiles::from_dir(Path::new(&a.model_dir)).unwrap();
        let model = ClipEmbedder::load(&files, &Device::Cpu, DType::F32).unwrap();
        let trained = TrainableClip::load(&files).unwrap();
        let batch = render_batch(&mut SplitMix64::new(9), 2, 32, &model.preprocess, false).unwrap();
        let flat: Vec<f32> = batch.pixels.flatten_all().unwrap().to_vec1().unwrap();
        let want = model.embed_pixels(&flat, 2).unwrap();
        let got = trained.image_features(&batch.pixels).unwrap();
        let diff = crate::testkit::max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "{diff}");
    }
}
