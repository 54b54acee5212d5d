//! `pipeline run train-sft`: teacher-forced training of the CLIP-prefix captioner on cached
//! image features and their captions, through the training engine.
//!
//! Data streams reader → batcher → trainer: a loader thread walks the split's feature entries
//! (memory-mapped) in a seeded per-epoch shard order, joins each with its shard's captions,
//! shuffles within the shard, tokenizes and pads, and sends ready batches over a bounded
//! channel ([`crate::datasets::captions`]), so the training thread only computes.

use candle_nn::VarMap;

use crate::datasets::captions::{batch_tensors, CaptionBatch, CaptionBatches, CaptionedSplit};
use crate::error::{IoContext, Result};
use crate::models::captioner::{seed_mapper, Captioner, CaptionerManifest};
use crate::stages::{Stage, StageContext};
use crate::train::{
    fit, FitOutput, Objective, OptimizerConfig, ParamGroup, StepContext, StepOutput, TrainConfig,
    TrainingSummary,
};

/// The captioner's teacher-forced NLL: one parameter group, the mapper (and the decoder
/// unless frozen).
pub struct SftObjective {
    pub model: Captioner,
    pub vars: VarMap,
    pub optimizer: OptimizerConfig,
}

impl Objective for SftObjective {
    type Batch = CaptionBatch;

    fn groups(&self) -> Vec<ParamGroup> {
        vec![ParamGroup::new(
            "captioner",
            &self.vars,
            self.optimizer.clone(),
        )]
    }

    fn step(&mut self, b: &CaptionBatch, _ctx: &StepContext) -> candle_core::Result<StepOutput> {
        let (clip, ids, mask) = batch_tensors(b, self.model.clip_dim, self.model.device())?;
        let loss = self.model.nll(&clip, &ids, &mask)?;
        Ok(StepOutput {
            loss,
            scalars: Vec::new(),
            rows: b.rows,
        })
    }
}

/// `pipeline run train-sft`: `[train_sft]` trains the `[captioner]`.
pub struct TrainSft;

impl Stage for TrainSft {
    const NAME: &'static str = "train-sft";
    const DESCRIPTION: &'static str =
        "CLIP-prefix GPT-2 captioner, teacher-forced on cached features";
    const USES_GPU: bool = true;
    const SECTION: &'static str = "train_sft";
    type Config = TrainConfig;
    type Summary = TrainingSummary;

    fn run(cfg: &TrainConfig, ctx: &StageContext) -> Result<TrainingSummary> {
        let cap = &ctx.captioner;
        let features = |split: &str| ctx.captioner_features(cap, &ctx.clip, &cap.dataset, split);
        let (train, image_tokens) = features(&cap.train_split)?;
        let train = CaptionedSplit::new(&ctx.workdir, train).first(cap.max_train_samples as u64);
        let val = CaptionedSplit::new(&ctx.workdir, features(&cap.val_split)?.0);
        let clip_dim = train.entries.first().map_or(0, |e| e.manifest.key.dim);
        let files = ctx.decoder_files()?;
        let vars = VarMap::new();
        let image_head = ctx.image_head_init()?;
        let model = Captioner::build(
            cap,
            clip_dim,
            image_tokens,
            &files,
            image_head.as_ref(),
            &vars,
            &ctx.device()?,
        )?;
        seed_mapper(&vars, cfg.seed)?;
        let dir = ctx.stage_dir(ctx.output_name(Self::NAME));
        std::fs::create_dir_all(&dir).at(&dir)?;
        let manifest = CaptionerManifest {
            captioner: cap.clone(),
            decoder_files: files,
            clip_dim,
            clip_model: ctx.clip.model.clone(),
            clip_revision: ctx.clip.revision.clone(),
            image_head,
            image_tokens,
        };
        manifest.save(&dir.join("captioner.json"))?;
        let data = CaptionBatches {
            train,
            val,
            batch_size: cfg.batch_size,
            tokenizer: model.tokenizer.clone(),
            eos: model.eos,
            max_tokens: cap.max_caption_tokens,
            seed: cfg.seed,
            capacity: 4,
        };
        let mut objective = SftObjective {
            model,
            vars,
            optimizer: cfg.optimizer(),
        };
        let fit = fit(
            &mut objective,
            &data,
            cfg,
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
