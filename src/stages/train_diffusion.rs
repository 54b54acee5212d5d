//! `pipeline run train-diffusion`: a caption diffusion model ([`crate::models::diffusion`])
//! trained on cached CLIP image features and their captions by the one engine, with the loss
//! of [`crate::losses::diffusion`]: per caption a timestep t uniform over the T, x_start =
//! x_0 + √(1 − ᾱ_0) ε₀ (DiffuSeq's noised start), x_t from q(x_t | x_start), and
//! ‖x̂_0 − x_0‖² + rounding NLL of x_start + prior. Captions are end-of-text padded to a fixed
//! length; the model also learns the padding, which decoding cuts at. All noise comes from a
//! seeded generator (per optimizer step and batch), so a resumed run is the uninterrupted one.

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::datasets::captions::{CaptionBatch, CaptionBatches, CaptionedSplit};
use crate::error::{IoContext, Result};
use crate::losses::diffusion::diffusion_terms;
use crate::models::diffusion::{
    build, DiffusionCaptioner, DiffusionManifest, DiffusionSpec, NoiseSchedule, PREFIX,
};
use crate::rng::SplitMix64;
use crate::stages::{Stage, StageContext};
use crate::train::{
    fit, FitOutput, MethodDefaults, Objective, OptimizerConfig, ParamGroup, StepContext,
    StepOutput, TrainConfig, TrainingSummary, WithTraining,
};

/// The model and process settings of `[train_diffusion]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiffusionConfig {
    /// Width of the token embeddings x_0.
    pub embedding_dim: usize,
    /// Fixed caption length, end-of-text padding included.
    pub max_caption_tokens: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Transformer positions the CLIP image is mapped to.
    pub prefix_length: usize,
    /// `sqrt` (Diffusion-LM) or `cosine`.
    pub schedule: NoiseSchedule,
    /// T.
    pub diffusion_steps: usize,
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        Self {
            embedding_dim: 128,
            max_caption_tokens: 24,
            n_layer: 12,
            n_head: 12,
            n_embd: 768,
            prefix_length: 8,
            schedule: NoiseSchedule::Sqrt,
            diffusion_steps: 2000,
        }
    }
}

impl MethodDefaults for DiffusionConfig {
    fn training() -> TrainConfig {
        TrainConfig {
            lr: 1e-4,
            warmup_steps: 100,
            ..TrainConfig::default()
        }
    }
}

impl DiffusionConfig {
    /// The settings that cannot work, each naming its key.
    pub fn check(&self) -> Result<()> {
        let mut bad = crate::stages::context::zero_keys(
            "train_diffusion",
            &[
                ("embedding_dim", self.embedding_dim),
                ("max_caption_tokens", self.max_caption_tokens),
                ("n_layer", self.n_layer),
                ("n_head", self.n_head),
                ("diffusion_steps", self.diffusion_steps),
            ],
        );
        if self.n_head > 0 && !self.n_embd.is_multiple_of(self.n_head) {
            bad.push(format!(
                "train_diffusion.n_embd ({}) must be a multiple of n_head ({})",
                self.n_embd, self.n_head
            ));
        }
        crate::stages::context::refuse(bad)
    }
}

/// `[train_diffusion]`.
pub type TrainDiffusionConfig = WithTraining<DiffusionConfig>;

/// Seeded initialisation: the transformer's and projections' weights N(0, 1/fan_in), the
/// token embeddings N(0, 1) (nn.Embedding's, as DiffuSeq: their scale is what the unit noise
/// is measured against).
pub fn seed_model(vars: &VarMap, seed: u64) -> Result<()> {
    crate::models::seed_vars(vars, PREFIX, "diffusion", seed)?;
    let name = format!("{PREFIX}word_embedding");
    crate::models::init_vars(
        vars,
        &[name],
        SplitMix64::derived(seed, "diffusion-embedding"),
        |_, dims, rng| rng.normal_samples(dims.iter().product(), 1.0),
    )
}

/// The diffusion loss: one parameter group, the whole model.
pub struct DiffusionObjective {
    pub model: DiffusionCaptioner,
    pub vars: VarMap,
    pub optimizer: OptimizerConfig,
    pub eos: u32,
    pub seed: u64,
    /// Batches seen at the current optimizer step (several under gradient accumulation) and
    /// in the current validation pass: each draws its own noise.
    micro: (usize, usize),
    val_batches: usize,
}

impl DiffusionObjective {
    pub fn new(
        model: DiffusionCaptioner,
        vars: VarMap,
        optimizer: OptimizerConfig,
        eos: u32,
        seed: u64,
    ) -> Self {
        Self {
            model,
            vars,
            optimizer,
            eos,
            seed,
            micro: (usize::MAX, 0),
            val_batches: 0,
        }
    }

    /// `b`'s captions as `(rows, L)` ids, end-of-text padded to the model's length.
    fn tokens(&self, b: &CaptionBatch) -> candle_core::Result<Tensor> {
        let l = self.model.spec.max_tokens;
        let mut ids = Vec::with_capacity(b.rows * l);
        for r in 0..b.rows {
            let row = &b.ids[r * b.len..(r + 1) * b.len];
            ids.extend(row.iter().take(l));
            ids.extend(std::iter::repeat_n(self.eos, l.saturating_sub(b.len)));
        }
        Tensor::from_vec(ids, (b.rows, l), self.model_device())
    }

    fn model_device(&self) -> &Device {
        self.model.device()
    }

    /// The loss terms of batch `b` with noise from `rng`.
    pub fn terms(
        &self,
        b: &CaptionBatch,
        rng: &mut SplitMix64,
    ) -> candle_core::Result<crate::losses::diffusion::DiffusionTerms> {
        let m = &self.model;
        let tokens = self.tokens(b)?;
        let clip = Tensor::from_slice(&b.clip, (b.rows, m.spec.clip_dim), self.model_device())?;
        let (x0_hat, x0, rounding) = m.training_pass(&tokens, &clip, rng)?;
        diffusion_terms(&x0_hat, &x0, &rounding, m.alpha_bar_last(), None)
    }
}

impl Objective for DiffusionObjective {
    type Batch = CaptionBatch;

    fn groups(&self) -> Vec<ParamGroup> {
        vec![ParamGroup::new(
            "diffusion",
            &self.vars,
            self.optimizer.clone(),
        )]
    }

    fn step(&mut self, b: &CaptionBatch, ctx: &StepContext) -> candle_core::Result<StepOutput> {
        let label = if ctx.train {
            if self.micro.0 != ctx.step {
                self.micro = (ctx.step, 0);
            }
            self.micro.1 += 1;
            format!("diffusion-train-{}-{}", ctx.step, self.micro.1)
        } else {
            self.val_batches += 1;
            format!("diffusion-val-{}", self.val_batches)
        };
        let mut rng = SplitMix64::derived(self.seed, &label);
        let terms = self.terms(b, &mut rng)?;
        let mean = |x: &Tensor| -> candle_core::Result<f64> {
            Ok(x.mean_all()?.to_scalar::<f32>()? as f64)
        };
        let scalars = vec![
            ("mse".to_string(), mean(&terms.mse)?),
            ("rounding_nll".to_string(), mean(&terms.rounding)?),
            ("prior".to_string(), mean(&terms.prior)?),
        ];
        Ok(StepOutput {
            loss: terms.total()?,
            scalars,
            rows: b.rows,
        })
    }

    fn validation_end(&mut self) -> candle_core::Result<Vec<(String, f64)>> {
        self.val_batches = 0;
        Ok(Vec::new())
    }
}

/// `pipeline run train-diffusion`: `[train_diffusion]` on `[captioner]`'s dataset.
pub struct TrainDiffusion;

impl Stage for TrainDiffusion {
    const NAME: &'static str = "train-diffusion";
    const DESCRIPTION: &'static str =
        "embedding-space caption diffusion model (Diffusion-LM / DiffuSeq) conditioned on CLIP";
    const USES_GPU: bool = true;
    const SECTION: &'static str = "train_diffusion";
    type Config = TrainDiffusionConfig;
    type Summary = TrainingSummary;

    fn run(cfg: &TrainDiffusionConfig, ctx: &StageContext) -> Result<TrainingSummary> {
        let m = &cfg.method;
        m.check()?;
        let cap = &ctx.captioner;
        let clip = ctx.clip.clone();
        let features = |split: &str| ctx.split_features(&clip, &cap.dataset, split, "image");
        let train = CaptionedSplit::new(&ctx.workdir, features(&cap.train_split)?)
            .first(cap.max_train_samples as u64);
        let val = CaptionedSplit::new(&ctx.workdir, features(&cap.val_split)?);
        let clip_dim = train.entries.first().map_or(0, |e| e.manifest.key.dim);
        let files = ctx.decoder_files()?;
        let (tokenizer, eos) = files.tokenizer()?;
        let spec = DiffusionSpec {
            vocab_size: tokenizer.get_vocab_size(true),
            embedding_dim: m.embedding_dim,
            max_tokens: m.max_caption_tokens,
            n_layer: m.n_layer,
            n_head: m.n_head,
            n_embd: m.n_embd,
            prefix_length: m.prefix_length,
            clip_dim,
            schedule: m.schedule,
            diffusion_steps: m.diffusion_steps,
        };
        let device = ctx.device()?;
        let vars = VarMap::new();
        let model = build(&spec, &vars, &device)?;
        seed_model(&vars, cfg.train.seed)?;
        let dir = ctx.stage_dir(ctx.output_name(Self::NAME));
        std::fs::create_dir_all(&dir).at(&dir)?;
        crate::io::write_json(
            &dir.join("diffusion.json"),
            &DiffusionManifest {
                spec,
                decoder_files: files,
                eos,
                clip_model: clip.model.clone(),
                clip_revision: clip.revision.clone(),
            },
        )?;
        let data = CaptionBatches {
            train,
            val,
            batch_size: cfg.train.batch_size,
            tokenizer,
            eos,
            max_tokens: m.max_caption_tokens,
            seed: cfg.train.seed,
            capacity: 4,
        };
        let mut objective =
            DiffusionObjective::new(model, vars, cfg.train.optimizer(), eos, cfg.train.seed);
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
        Ok(TrainingSummary {
            rows: data.train.rows(),
            fit,
            dir: dir.display().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::train::Batches;
    use crossbeam_channel::Receiver;
    use std::path::Path;

    /// Three training batches per epoch and one validation batch of two captions each; the
    /// loader dies at `fail_at` (epoch, batch).
    struct Memory {
        fail_at: Option<(usize, usize)>,
    }

    fn batch(i: usize) -> CaptionBatch {
        CaptionBatch {
            rows: 2,
            len: 3,
            clip: (0..6).map(|j| ((i * 6 + j) as f32 * 0.37).sin()).collect(),
            ids: vec![(1 + i as u32) % 8, 2, 0, 3, (4 + i as u32) % 8, 5],
            mask: vec![1.0; 6],
        }
    }

    impl Batches<CaptionBatch> for Memory {
        fn train(&self, epoch: usize) -> Result<Receiver<Result<CaptionBatch>>> {
            let (tx, rx) = crossbeam_channel::unbounded();
            for i in 0..3 {
                if self.fail_at == Some((epoch, i)) {
                    tx.send(Err(Error::Invalid("killed".into()))).unwrap();
                    break;
                }
                tx.send(Ok(batch((i + epoch) % 3))).unwrap();
            }
            Ok(rx)
        }
        fn val(&self) -> Result<Receiver<Result<CaptionBatch>>> {
            let (tx, rx) = crossbeam_channel::unbounded();
            tx.send(Ok(batch(7))).unwrap();
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

    fn spec() -> DiffusionSpec {
        DiffusionSpec {
            vocab_size: 8,
            embedding_dim: 4,
            max_tokens: 4,
            n_layer: 1,
            n_head: 2,
            n_embd: 8,
            prefix_length: 1,
            clip_dim: 3,
            schedule: NoiseSchedule::Sqrt,
            diffusion_steps: 50,
        }
    }

    /// A fresh tiny model trained in `dir` (dying at `fail_at`): its final weights.
    fn train(dir: &Path, fail_at: Option<(usize, usize)>) -> Result<Vec<(String, Vec<f32>)>> {
        let vars = VarMap::new();
        let model = build(&spec(), &vars, &Device::Cpu)?;
        seed_model(&vars, 5)?;
        let cfg = TrainConfig {
            epochs: 2,
            batch_size: 2,
            lr: 0.01,
            warmup_steps: 1,
            eval_every: 1,
            ..TrainConfig::default()
        };
        let mut obj = DiffusionObjective::new(model, vars, cfg.optimizer(), 0, 5);
        let metrics = dir.join("metrics.parquet");
        let out = FitOutput {
            checkpoint_dir: dir,
            metrics_path: &metrics,
            run_id: "t",
            stage: "train-diffusion",
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
        let vars = VarMap::new();
        build(&spec(), &vars, &Device::Cpu).unwrap();
        seed_model(&vars, 5).unwrap();
        assert_ne!(weights(&vars), want, "training moved the weights");
    }

    #[test]
    fn settings_that_cannot_work_are_refused_naming_the_key() {
        assert!(DiffusionConfig::default().check().is_ok());
        let bad = DiffusionConfig {
            max_caption_tokens: 0,
            diffusion_steps: 0,
            n_embd: 130,
            n_head: 4,
            ..DiffusionConfig::default()
        };
        let e = bad.check().unwrap_err().to_string();
        for key in [
            "train_diffusion.max_caption_tokens",
            "train_diffusion.diffusion_steps",
            "train_diffusion.n_embd",
        ] {
            assert!(e.contains(key), "{key}: {e}");
        }
    }
}
