//! `pipeline run train-contrastive`: contrastive stage 1 of the two-stage recipe. A GPT-2
//! text encoder (pooled by the attention-masked mean of its last hidden state) and two
//! projection heads learn a space shared with frozen CLIP image features
//! ([`crate::models::contrastive`]), under the symmetric InfoNCE ("NT-Xent") loss over the
//! batch ([`crate::losses::contrastive::info_nce`]), through the training engine (warmup +
//! cosine, NaN guard, best checkpoint by validation loss).
//!
//! Image features come from the feature cache (`embed` first), captions from the shards of
//! `[captioner]`'s dataset. Validation logs the loss and retrieval recall both ways over the
//! whole validation split (`retrieval/i2t_r1`, `i2t_r5`, `i2t_r10`, `t2i_r1`, ...; a retrieved
//! caption counts when it is the image's own or the same text) with the chance level
//! (`retrieval/chance_r1`); the frozen CLIP text tower's own recall on the same split, from
//! the cached text features, is logged beside it as `retrieval/clip/...`, the baseline the
//! trained encoder must beat.

use std::collections::HashMap;

use candle_core::Tensor;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::data::records::MetricRow;
use crate::data::shard::{read_parquet, write_parquet};
use crate::datasets::captions::CaptionedSplit;
use crate::datasets::features::embeddings_by_key;
use crate::error::{CandleContext, Error, IoContext, Result};
use crate::losses::contrastive::info_nce;
use crate::metrics::retrieval::{best_relevant_rank, chance_recall_at_1, recall_at};
use crate::models::contrastive::{
    text_tokens, ContrastiveManifest, ContrastiveModel, ContrastiveSpec,
};
use crate::rng::SplitMix64;
use crate::stages::{Stage, StageContext};
use crate::train::{
    fit, Batches, FitOutput, FitSummary, MethodDefaults, Objective, OptimizerConfig, ParamGroup,
    StepContext, StepOutput, WithTraining,
};

/// `[train_contrastive]`'s own keys (beside the loop and optimiser keys of every trainer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContrastiveConfig {
    /// GPT-2 checkpoint of the text encoder: hub repo, local HF directory, or `tiny`.
    pub text_encoder: String,
    pub text_encoder_revision: String,
    /// Fine-tune the text encoder; false = frozen, only the projections learn.
    pub train_text_encoder: bool,
    pub projection_dim: usize,
    pub dropout: f64,
    pub temperature: f64,
    pub learnable_temperature: bool,
    /// Caption tokens the text encoder reads.
    pub max_tokens: usize,
}

impl Default for ContrastiveConfig {
    fn default() -> Self {
        Self {
            text_encoder: "gpt2-medium".into(),
            text_encoder_revision: "main".into(),
            train_text_encoder: true,
            projection_dim: 512,
            dropout: 0.1,
            temperature: 0.5,
            learnable_temperature: false,
            max_tokens: 40,
        }
    }
}

impl MethodDefaults for ContrastiveConfig {}

/// `[train_contrastive]`.
pub type TrainContrastiveConfig = WithTraining<ContrastiveConfig>;

/// Recall at 1, 5 and 10 both ways.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Recall {
    pub i2t_r1: f64,
    pub i2t_r5: f64,
    pub i2t_r10: f64,
    pub t2i_r1: f64,
    pub t2i_r5: f64,
    pub t2i_r10: f64,
}

impl Recall {
    const NAMES: [&'static str; 6] = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"];

    fn values(&self) -> [f64; 6] {
        [
            self.i2t_r1,
            self.i2t_r5,
            self.i2t_r10,
            self.t2i_r1,
            self.t2i_r5,
            self.t2i_r10,
        ]
    }

    fn from_values(v: &[f64]) -> Self {
        let g = |i: usize| v.get(i).copied().unwrap_or(f64::NAN);
        Self {
            i2t_r1: g(0),
            i2t_r5: g(1),
            i2t_r10: g(2),
            t2i_r1: g(3),
            t2i_r5: g(4),
            t2i_r10: g(5),
        }
    }

    /// Recall between `images` and `texts` (rows L2-normalised, row `i` of each a pair) where
    /// pairs with the same `groups` value count as matches.
    pub fn of(images: &Tensor, texts: &Tensor, groups: &[u64]) -> candle_core::Result<Self> {
        let ks = [1, 5, 10];
        let mut v = recall_one_way(images, texts, groups, &ks)?;
        v.extend(recall_one_way(texts, images, groups, &ks)?);
        Ok(Self::from_values(&v))
    }
}

/// Recall at `ks` of `queries` against `candidates` (row `i` of both in group `groups[i]`),
/// similarities computed a block of queries at a time.
fn recall_one_way(
    queries: &Tensor,
    candidates: &Tensor,
    groups: &[u64],
    ks: &[usize],
) -> candle_core::Result<Vec<f64>> {
    let n = queries.dim(0)?;
    let ct = candidates.t()?;
    let mut ranks = Vec::with_capacity(n);
    for start in (0..n).step_by(512) {
        let len = (n - start).min(512);
        let block = queries.narrow(0, start, len)?.matmul(&ct)?;
        let block: Vec<Vec<f32>> = block.to_device(&candle_core::Device::Cpu)?.to_vec2()?;
        for (i, row) in block.iter().enumerate() {
            ranks.push(best_relevant_rank(row, groups[start + i], groups));
        }
    }
    Ok(recall_at(&ranks, ks))
}

/// What stage 1 achieved.
#[derive(Debug, Clone, Serialize)]
pub struct ContrastiveSummary {
    pub train_rows: u64,
    pub val_rows: u64,
    /// Validation recall of the best checkpoint.
    pub recall: Recall,
    /// The frozen CLIP text tower's recall on the same split (None without cached text
    /// features: `embed.texts = true`).
    pub clip_recall: Option<Recall>,
    pub chance_r1: f64,
    /// The loss temperature at the best checkpoint.
    pub temperature: f64,
    pub fit: FitSummary,
    pub dir: String,
}

impl std::fmt::Display for ContrastiveSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.fit.state;
        let clip = self.clip_recall.as_ref().map_or_else(
            || "no cached CLIP text features for the baseline".to_string(),
            |c| format!("frozen CLIP text tower i2t R@1 {:.3}", c.i2t_r1),
        );
        write!(
            f,
            "{} optimizer steps over {} pairs; best val loss {:.4} at step {}: i2t R@1/5/10 {:.3}/{:.3}/{:.3}, t2i R@1 {:.3} on {} held-out pairs (chance {:.3}; {clip}); checkpoints in {}",
            s.step,
            self.train_rows,
            s.best_value.unwrap_or(f64::NAN),
            s.best_step.unwrap_or(0),
            self.recall.i2t_r1,
            self.recall.i2t_r5,
            self.recall.i2t_r10,
            self.recall.t2i_r1,
            self.val_rows,
            self.chance_r1,
            self.dir
        )
    }
}

/// `pipeline run train-contrastive`.
pub struct TrainContrastive;

impl Stage for TrainContrastive {
    const NAME: &'static str = "train-contrastive";
    const DESCRIPTION: &'static str =
        "contrastive stage 1: GPT-2 text encoder + projections vs frozen CLIP features (InfoNCE)";
    const USES_GPU: bool = true;
    const SECTION: &'static str = "train_contrastive";
    type Config = TrainContrastiveConfig;
    type Summary = ContrastiveSummary;

    fn run(cfg: &TrainContrastiveConfig, ctx: &StageContext) -> Result<ContrastiveSummary> {
        let (train_cfg, c) = (&cfg.train, &cfg.method);
        let cap = &ctx.captioner;
        let features = |split: &str| ctx.split_features(&ctx.clip, &cap.dataset, split, "image");
        // The whole training split (`captioner.max_train_samples` limits SFT's captions only).
        let train = CaptionedSplit::new(&ctx.workdir, features(&cap.train_split)?);
        let val = CaptionedSplit::new(&ctx.workdir, features(&cap.val_split)?);
        let clip_dim = train.entries.first().map_or(0, |e| e.manifest.key.dim);
        let files = ctx.gpt2_files(&c.text_encoder, &c.text_encoder_revision)?;
        let spec = ContrastiveSpec {
            projection_dim: c.projection_dim,
            dropout: c.dropout,
            temperature: c.temperature,
            learnable_temperature: c.learnable_temperature,
            train_text_encoder: c.train_text_encoder,
            clip_dim,
        };
        check_spec(&spec)?;
        let vars = VarMap::new();
        let model = ContrastiveModel::build(&spec, &files, &vars, train_cfg.seed, &ctx.device()?)?;
        let dir = ctx.stage_dir(ctx.output_name(Self::NAME));
        std::fs::create_dir_all(&dir).at(&dir)?;
        ContrastiveManifest {
            spec,
            text_encoder: files,
            clip_model: ctx.clip.model.clone(),
            clip_revision: ctx.clip.revision.clone(),
        }
        .save(&dir.join("contrastive.json"))?;
        let data = PairBatches {
            train,
            val,
            batch_size: train_cfg.batch_size,
            tokenizer: model.tokenizer.clone(),
            pad: model.pad,
            max_tokens: c.max_tokens,
            seed: train_cfg.seed,
        };
        let mut objective = ContrastiveObjective {
            model,
            vars,
            optimizer: train_cfg.optimizer(),
            seed: train_cfg.seed,
            held_out: HeldOut::default(),
        };
        let out = FitOutput {
            checkpoint_dir: &dir,
            metrics_path: &ctx.metrics_path(),
            run_id: &ctx.run_id,
            stage: ctx.output_name(Self::NAME),
        };
        let fit = fit(&mut objective, &data, train_cfg, &out)?;
        // The frozen CLIP towers on the same held-out pairs: the baseline.
        let clip_recall = clip_baseline(ctx, &data.val)?;
        let rows: Vec<MetricRow> = read_parquet(out.metrics_path)?;
        let best = fit.state.best_step.map_or(fit.state.step, |s| s) as i64;
        let at_best = |name: &str| {
            rows.iter()
                .filter(|r| r.run_id == ctx.run_id && r.stage == Self::NAME && r.split == "val")
                .filter(|r| r.step == best && r.name == name)
                .map(|r| r.value)
                .next_back()
                .unwrap_or(f64::NAN)
        };
        let recall = Recall::from_values(
            &Recall::NAMES
                .iter()
                .map(|n| at_best(&format!("retrieval/{n}")))
                .collect::<Vec<_>>(),
        );
        let chance_r1 = at_best("retrieval/chance_r1");
        let temperature = at_best("temperature");
        if let Some(clip) = &clip_recall {
            log_baseline(&out, rows, clip)?;
        }
        Ok(ContrastiveSummary {
            train_rows: data.train.rows(),
            val_rows: data.val.rows(),
            recall,
            clip_recall,
            chance_r1,
            temperature,
            fit,
            dir: dir.display().to_string(),
        })
    }
}

/// Settings that cannot train, refused before anything is loaded.
fn check_spec(spec: &ContrastiveSpec) -> Result<()> {
    let bad = |m: String| Err(Error::Config(format!("train_contrastive: {m}")));
    if spec.projection_dim == 0 {
        return bad("projection_dim must be at least 1".into());
    }
    if !(0.0..1.0).contains(&spec.dropout) {
        return bad(format!("dropout {} is not in [0, 1)", spec.dropout));
    }
    if !(spec.temperature > 0.0 && spec.temperature.is_finite()) {
        return bad(format!("temperature {} must be positive", spec.temperature));
    }
    if spec.clip_dim == 0 {
        return bad("the training split has no cached image features".into());
    }
    Ok(())
}

/// Writes the baseline's recall as `retrieval/clip/<name>` validation rows at step 0 of this
/// stage (replacing any of an earlier attempt of the same run).
fn log_baseline(out: &FitOutput, mut rows: Vec<MetricRow>, clip: &Recall) -> Result<()> {
    let ours = |r: &MetricRow| {
        r.run_id == out.run_id && r.stage == out.stage && r.name.starts_with("retrieval/clip/")
    };
    rows.retain(|r| !ours(r));
    for (name, value) in Recall::NAMES.iter().zip(clip.values()) {
        rows.push(MetricRow {
            run_id: out.run_id.to_string(),
            stage: out.stage.to_string(),
            step: 0,
            epoch: 0,
            split: "val".into(),
            name: format!("retrieval/clip/{name}"),
            value,
        });
    }
    write_parquet(out.metrics_path, &rows)
}

/// The frozen CLIP image and text towers' recall on `val` (cached text features by sample
/// key); `None` when the split's text features were not computed.
fn clip_baseline(ctx: &StageContext, val: &CaptionedSplit) -> Result<Option<Recall>> {
    let cap = &ctx.captioner;
    let Ok(texts) = ctx.split_features(&ctx.clip, &cap.dataset, &cap.val_split, "text") else {
        return Ok(None);
    };
    let texts = embeddings_by_key(&texts)?;
    let rows = val.all_rows()?;
    let (mut img, mut txt, mut captions) = (Vec::new(), Vec::new(), Vec::new());
    for (key, emb, caption) in rows {
        let t = texts.get(&key).ok_or_else(|| Error::Invalid(format!(
            "the cached CLIP text features of {}/{} have no row for sample `{key}`; run `pipeline run embed` again",
            cap.dataset, cap.val_split
        )))?;
        img.extend(emb);
        txt.extend_from_slice(t);
        captions.push(caption);
    }
    let n = captions.len();
    if n == 0 {
        return Ok(None);
    }
    let dev = candle_core::Device::Cpu;
    let normal = |v: Vec<f32>| -> candle_core::Result<Tensor> {
        let d = v.len() / n;
        crate::losses::contrastive::l2_normalized(&Tensor::from_vec(v, (n, d), &dev)?)
    };
    let recall = Recall::of(
        &normal(img).during("baseline retrieval")?,
        &normal(txt).during("baseline retrieval")?,
        &caption_groups(&captions),
    )
    .during("baseline retrieval")?;
    Ok(Some(recall))
}

/// A group id per caption: equal texts share one.
fn caption_groups(captions: &[String]) -> Vec<u64> {
    let mut ids = HashMap::new();
    captions
        .iter()
        .map(|c| {
            let next = ids.len() as u64;
            *ids.entry(c.trim().to_string()).or_insert(next)
        })
        .collect()
}

/// A batch of image features and their tokenized captions, padded on the right.
pub struct PairBatch {
    pub rows: usize,
    pub len: usize,
    /// `rows × clip_dim`.
    pub clip: Vec<f32>,
    /// `rows × len`, padded with end-of-text.
    pub ids: Vec<u32>,
    /// `rows × len`, 1 for tokens, 0 for padding.
    pub keep: Vec<f32>,
    pub captions: Vec<String>,
}

/// The split's image features and captions in batches for the engine.
pub struct PairBatches {
    pub train: CaptionedSplit,
    pub val: CaptionedSplit,
    pub batch_size: usize,
    pub tokenizer: tokenizers::Tokenizer,
    pub pad: u32,
    pub max_tokens: usize,
    pub seed: u64,
}

impl PairBatches {
    fn stream(
        &self,
        split: &CaptionedSplit,
        shuffle: Option<(u64, String)>,
    ) -> crossbeam_channel::Receiver<Result<PairBatch>> {
        let (tok, pad, max_tokens) = (self.tokenizer.clone(), self.pad, self.max_tokens);
        let make = move |chunk: &[(String, Vec<f32>, String)]| -> Result<PairBatch> {
            let tokens = chunk
                .iter()
                .map(|(_, _, c)| text_tokens(&tok, pad, c, max_tokens))
                .collect::<Result<Vec<_>>>()?;
            let len = tokens.iter().map(Vec::len).max().unwrap_or(1);
            let mut b = PairBatch {
                rows: chunk.len(),
                len,
                clip: Vec::new(),
                ids: Vec::new(),
                keep: Vec::new(),
                captions: Vec::new(),
            };
            for ((_, emb, caption), ids) in chunk.iter().zip(tokens) {
                b.clip.extend_from_slice(emb);
                b.keep
                    .extend((0..len).map(|i| if i < ids.len() { 1.0 } else { 0.0 }));
                let n = ids.len();
                b.ids.extend(ids);
                b.ids.extend(std::iter::repeat_n(pad, len - n));
                b.captions.push(caption.clone());
            }
            Ok(b)
        };
        split.stream(self.batch_size, make, shuffle, 4)
    }
}

impl Batches<PairBatch> for PairBatches {
    fn train(&self, epoch: usize) -> Result<crossbeam_channel::Receiver<Result<PairBatch>>> {
        let shuffle = Some((self.seed, format!("contrastive-epoch-{epoch}")));
        Ok(self.stream(&self.train, shuffle))
    }

    fn val(&self) -> Result<crossbeam_channel::Receiver<Result<PairBatch>>> {
        Ok(self.stream(&self.val, None))
    }

    fn per_epoch(&self) -> usize {
        self.train.batches_per_pass(self.batch_size)
    }
}

/// The held-out embeddings of a validation pass, gathered for retrieval over all of them.
#[derive(Default)]
struct HeldOut {
    images: Vec<Tensor>,
    texts: Vec<Tensor>,
    captions: Vec<String>,
}

/// InfoNCE over the batch; one parameter group (the heads, the temperature when learned, and
/// the text encoder when trained).
pub struct ContrastiveObjective {
    pub model: ContrastiveModel,
    pub vars: VarMap,
    pub optimizer: OptimizerConfig,
    /// Seeds each step's dropout masks (by step, so a resumed run draws the same ones).
    pub seed: u64,
    held_out: HeldOut,
}

impl ContrastiveObjective {
    pub fn new(
        model: ContrastiveModel,
        vars: VarMap,
        optimizer: OptimizerConfig,
        seed: u64,
    ) -> Self {
        Self {
            model,
            vars,
            optimizer,
            seed,
            held_out: HeldOut::default(),
        }
    }
}

impl Objective for ContrastiveObjective {
    type Batch = PairBatch;

    fn groups(&self) -> Vec<ParamGroup> {
        vec![ParamGroup::new(
            "contrastive",
            &self.vars,
            self.optimizer.clone(),
        )]
    }

    fn step(&mut self, b: &PairBatch, ctx: &StepContext) -> candle_core::Result<StepOutput> {
        let dev = self.model.device().clone();
        let clip = Tensor::from_slice(&b.clip, (b.rows, b.clip.len() / b.rows.max(1)), &dev)?;
        let ids = Tensor::from_slice(&b.ids, (b.rows, b.len), &dev)?;
        let keep = Tensor::from_slice(&b.keep, (b.rows, b.len), &dev)?;
        let mut rng = SplitMix64::derived(self.seed, &format!("contrastive-dropout-{}", ctx.step));
        let (images, texts) = if ctx.train {
            (
                self.model.embed_image(&clip, Some(&mut rng))?,
                self.model.embed_text(&ids, &keep, Some(&mut rng))?,
            )
        } else {
            (
                self.model.embed_image(&clip, None)?,
                self.model.embed_text(&ids, &keep, None)?,
            )
        };
        let temperature = self.model.temperature()?;
        let loss = info_nce(&images, &texts, &temperature)?;
        if !ctx.train {
            self.held_out.images.push(images.detach());
            self.held_out.texts.push(texts.detach());
            self.held_out.captions.extend(b.captions.iter().cloned());
        }
        let t = f64::from(
            temperature
                .to_dtype(candle_core::DType::F32)?
                .to_scalar::<f32>()?,
        );
        Ok(StepOutput {
            loss,
            scalars: vec![("temperature".into(), t)],
            rows: b.rows,
        })
    }

    fn validation_end(&mut self) -> candle_core::Result<Vec<(String, f64)>> {
        let held = std::mem::take(&mut self.held_out);
        if held.captions.is_empty() {
            return Ok(Vec::new());
        }
        let images = Tensor::cat(&held.images, 0)?;
        let texts = Tensor::cat(&held.texts, 0)?;
        let groups = caption_groups(&held.captions);
        let recall = Recall::of(&images, &texts, &groups)?;
        let mut out: Vec<(String, f64)> = Recall::NAMES
            .iter()
            .zip(recall.values())
            .map(|(n, v)| (format!("retrieval/{n}"), v))
            .collect();
        out.push((
            "retrieval/chance_r1".into(),
            chance_recall_at_1(&groups, &groups),
        ));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::captioner::DecoderFiles;
    use crate::models::tiny::ensure_tiny_gpt2;
    use crate::train::{Schedule, Trainer};
    use candle_core::Device;

    fn spec(train_text_encoder: bool) -> ContrastiveSpec {
        ContrastiveSpec {
            projection_dim: 16,
            dropout: 0.1,
            temperature: 0.5,
            learnable_temperature: true,
            train_text_encoder,
            clip_dim: 8,
        }
    }

    fn batch(model: &ContrastiveModel) -> PairBatch {
        let captions = [
            "a red circle above a blue square",
            "a green triangle",
            "a cat",
        ];
        let tokens: Vec<Vec<u32>> = captions
            .iter()
            .map(|c| model.caption_tokens(c, 40).unwrap())
            .collect();
        let len = tokens.iter().map(Vec::len).max().unwrap();
        let mut b = PairBatch {
            rows: 3,
            len,
            clip: (0..24).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect(),
            ids: Vec::new(),
            keep: Vec::new(),
            captions: captions.iter().map(|c| c.to_string()).collect(),
        };
        for t in tokens {
            b.keep
                .extend((0..len).map(|i| f32::from(u8::from(i < t.len()))));
            b.ids.extend(
                t.iter()
                    .copied()
                    .chain(std::iter::repeat(model.pad))
                    .take(len),
            );
        }
        b
    }

    fn values(vars: &VarMap) -> HashMap<String, Vec<f32>> {
        vars.data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.flatten_all().unwrap().to_vec1().unwrap()))
            .collect()
    }

    /// The CLIP side is cached features, so CLIP has no variable here at all; with the text
    /// encoder frozen the only variables are the heads and the temperature, one step moves
    /// them and leaves the encoder's pooled output as it was; trained, the encoder moves too.
    #[test]
    fn only_what_is_trained_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ensure_tiny_gpt2(tmp.path(), 42, &crate::synthetic::corpus()).unwrap();
        let files = DecoderFiles::from_dir(&dir).unwrap();
        for train_text_encoder in [false, true] {
            let vars = VarMap::new();
            let model =
                ContrastiveModel::build(&spec(train_text_encoder), &files, &vars, 1, &Device::Cpu)
                    .unwrap();
            let b = batch(&model);
            let ids = Tensor::from_slice(&b.ids, (b.rows, b.len), &Device::Cpu).unwrap();
            let keep = Tensor::from_slice(&b.keep, (b.rows, b.len), &Device::Cpu).unwrap();
            let pooled = |m: &ContrastiveModel| -> Vec<f32> {
                m.pooled_text(&ids, &keep)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let before = values(&vars);
            let names: Vec<&String> = before.keys().collect();
            assert!(names.iter().all(|n| n.starts_with("text_projection.")
                || n.starts_with("image_projection.")
                || n.as_str() == "log_temperature"
                || (train_text_encoder && n.starts_with("text_encoder."))));
            assert_eq!(
                names.iter().any(|n| n.starts_with("text_encoder.")),
                train_text_encoder
            );
            let pooled_before = pooled(&model);
            let optimizer = OptimizerConfig {
                lr: 1e-2,
                warmup_steps: 0,
                schedule: Schedule::Constant,
                ..OptimizerConfig::default()
            };
            let mut obj = ContrastiveObjective::new(model, vars.clone(), optimizer, 3);
            let mut trainer = Trainer::new(obj.groups()).unwrap();
            let report = trainer.step(&mut obj, &b, 0, 1).unwrap();
            assert!(report.losses[0].is_finite() && report.updated[0]);
            let after = values(&vars);
            for (name, v) in &after {
                assert_ne!(&before[name], v, "{name} did not move");
            }
            let moved = pooled(&obj.model) != pooled_before;
            assert_eq!(
                moved, train_text_encoder,
                "text encoder trained: {train_text_encoder}"
            );
        }
    }

    /// A text encoder whose `config.json` disagrees with its weights stops with an error
    /// naming the file and the tensor, frozen or trained.
    #[test]
    fn a_text_encoder_with_the_wrong_hidden_size_is_refused_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ensure_tiny_gpt2(tmp.path(), 42, &crate::synthetic::corpus()).unwrap();
        let config = dir.join("config.json");
        let text = std::fs::read_to_string(&config).unwrap();
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json["n_embd"] = serde_json::json!(32);
        std::fs::write(&config, json.to_string()).unwrap();
        let files = DecoderFiles::from_dir(&dir).unwrap();
        for trained in [false, true] {
            let err =
                ContrastiveModel::build(&spec(trained), &files, &VarMap::new(), 1, &Device::Cpu)
                    .err()
                    .expect("a mismatched checkpoint must be refused")
                    .to_string();
            assert!(err.contains("model.safetensors"), "{err}");
            assert!(err.contains("wte.weight") && err.contains("32"), "{err}");
        }
    }

    /// The section: the loop keys go to the engine, the rest to the method, a key neither
    /// knows is named, and serialising gives back one flat table.
    #[test]
    fn the_section_splits_training_and_method_keys_strictly() {
        let parse = |t: &str| -> Result<TrainContrastiveConfig> {
            crate::stages::parse::<TrainContrastive>(Some(&toml::from_str(t).unwrap()))
        };
        let cfg =
            parse("epochs = 3\nlr = 0.01\ntemperature = 0.07\ntext_encoder = \"tiny\"").unwrap();
        assert_eq!((cfg.train.epochs, cfg.train.lr), (3, 0.01));
        assert_eq!(cfg.method.temperature, 0.07);
        assert_eq!(cfg.method.text_encoder, "tiny");
        assert_eq!(cfg.method.projection_dim, 512);
        let err = parse("temprature = 0.1").unwrap_err().to_string();
        assert!(
            err.contains("train_contrastive") && err.contains("temprature"),
            "{err}"
        );
        let err = parse("lr = \"fast\"").unwrap_err().to_string();
        assert!(err.contains("lr"), "{err}");
        let flat = toml::Value::try_from(&cfg).unwrap();
        assert_eq!(flat["epochs"].as_integer(), Some(3));
        assert_eq!(flat["temperature"].as_float(), Some(0.07));
        assert_eq!(parse(&toml::to_string(&flat).unwrap()).unwrap(), cfg);
    }
}
