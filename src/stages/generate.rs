//! `pipeline run generate`: captions from trained (and untrained, as a baseline) captioners
//! for a dataset split's cached image features — or for an image folder, embedded on the fly
//! through the same CLIP path — with greedy, beam or nucleus decoding, into
//! `runs/<id>/generations.parquet` (and `.json` on request).

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::data::features::FeatureEntry;
use crate::data::hub::HubClient;
use crate::data::records::GenerationRow;
use crate::data::shard::write_parquet;
use crate::device::device_for;
use crate::error::{CandleContext, Error, Result};
use crate::io::write_atomic;
use crate::models::captioner::{seed_mapper, CaptionerManifest, DecodeMethod, DecoderFiles};
use crate::pipeline::config::Config;
use crate::progress::Progress;
use crate::stages::embed::{self, UserInputs};
use crate::stages::train_sft::StageContext;

/// `[generate]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateConfig {
    /// Captioners to run: `untrained` (the baseline: mapper at its seeded initialisation),
    /// or a training stage (`train-sft`, `train-dpo`, `train-orpo`) whose best checkpoint is
    /// taken from this run, else from the newest run that has one.
    pub models: Vec<String>,
    /// Any of `greedy`, `beam`, `sample`.
    pub methods: Vec<String>,
    pub beams: usize,
    pub length_penalty: f64,
    pub top_p: f64,
    pub temperature: f64,
    pub seed: u64,
    pub max_tokens: usize,
    pub batch_size: usize,
    /// Dataset and split whose images are captioned; empty = the captioner's validation split.
    pub dataset: String,
    pub split: String,
    /// Caption these images instead (a folder or a list file, as `pipeline embed --images`).
    pub images: String,
    /// Also write `generations.json`.
    pub json: bool,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            models: vec!["untrained".into(), "train-sft".into()],
            methods: vec!["greedy".into(), "beam".into()],
            beams: 3,
            length_penalty: 1.0,
            top_p: 0.9,
            temperature: 1.0,
            seed: 42,
            max_tokens: 30,
            batch_size: 64,
            dataset: String::new(),
            split: String::new(),
            images: String::new(),
            json: false,
        }
    }
}

impl GenerateConfig {
    pub fn decode_methods(&self) -> Result<Vec<DecodeMethod>> {
        self.methods
            .iter()
            .map(|m| match m.as_str() {
                "greedy" => Ok(DecodeMethod::Greedy),
                "beam" => Ok(DecodeMethod::Beam {
                    beams: self.beams,
                    length_penalty: self.length_penalty,
                }),
                "sample" => Ok(DecodeMethod::Sample {
                    top_p: self.top_p,
                    temperature: self.temperature,
                    seed: self.seed,
                }),
                other => Err(Error::Config(format!(
                    "generate.methods: unknown method `{other}` (greedy, beam, sample)"
                ))),
            })
            .collect()
    }
}

/// The directory of training stage `stage`'s output (it has a best checkpoint): in this
/// run, else the newest run.
pub fn find_stage_dir(ctx: &StageContext, stage: &str) -> Option<PathBuf> {
    let best = ctx.find_in_runs(&format!("{stage}/best/model.safetensors"))?;
    let dir = best.parent()?.parent()?.to_path_buf();
    dir.join("captioner.json").is_file().then_some(dir)
}

/// A captioner manifest for the untrained baseline: a trained model's when there is one
/// (same architecture), else the configuration's.
fn baseline_manifest(
    cfg: &Config,
    ctx: &StageContext,
    entries: &[FeatureEntry],
) -> Result<CaptionerManifest> {
    for stage in ["train-sft", "train-dpo", "train-orpo"] {
        if let Some(dir) = find_stage_dir(ctx, stage) {
            return CaptionerManifest::load(&dir.join("captioner.json"));
        }
    }
    Ok(CaptionerManifest {
        captioner: cfg.captioner.clone(),
        decoder_files: DecoderFiles::resolve(&cfg.captioner, &ctx.workdir, cfg.run.seed, || {
            HubClient::new(&cfg.hub)
        })?,
        clip_dim: entries.first().map_or(0, |e| e.manifest.key.dim),
        clip_model: cfg.embed.model.clone(),
        clip_revision: cfg.embed.revision.clone(),
    })
}

/// Runs generate; returns the summary line.
pub fn run(cfg: &Config, ctx: &StageContext) -> Result<String> {
    // Trained captioners first: their CLIP decides which features (or which model embeds
    // the user's images), whatever this invocation's `[embed]` says.
    let mut trained = Vec::new();
    for name in cfg.generate.models.iter().filter(|m| *m != "untrained") {
        let dir = find_stage_dir(ctx, name).ok_or_else(|| {
            Error::Config(format!("generate.models: no `{name}` checkpoint in this run or an earlier one; run `pipeline run {name}` first"))
        })?;
        trained.push((
            name.clone(),
            CaptionerManifest::load(&dir.join("captioner.json"))?,
            dir.join("best/model.safetensors"),
        ));
    }
    let mut cfg = cfg.clone();
    if let Some((_, m, _)) = trained.first() {
        cfg.embed.model = m.clip_model.clone();
        cfg.embed.revision = m.clip_revision.clone();
    }
    let cfg = &cfg;
    let g = &cfg.generate;
    let (dataset, split, entries) = if g.images.is_empty() {
        let dataset = if g.dataset.is_empty() {
            cfg.captioner.dataset.clone()
        } else {
            g.dataset.clone()
        };
        let split = if g.split.is_empty() {
            cfg.captioner.val_split.clone()
        } else {
            g.split.clone()
        };
        let entries = embed::split_features(cfg, &ctx.workdir, &dataset, &split, "image")?;
        (dataset, split, entries)
    } else {
        let inputs = UserInputs {
            images: Some(PathBuf::from(&g.images)),
            ..UserInputs::default()
        };
        let s = embed::embed_user_inputs(cfg, &ctx.workdir, ctx.gpu, &inputs)?;
        ("images".to_string(), g.images.clone(), s.entries)
    };
    let methods = g.decode_methods()?;
    let device = device_for(ctx.gpu, cfg.embed.cpu_fallback)?;
    let mut keys = Vec::new();
    let mut embeddings = Vec::new();
    for e in &entries {
        let t = e.open()?;
        keys.extend(t.keys());
        embeddings.extend(t.embeddings());
    }
    let dim = entries.first().map_or(0, |e| e.manifest.key.dim);
    let mut rows = Vec::new();
    let progress = Progress::new(
        "generate",
        "captions",
        Some((keys.len() * methods.len() * g.models.len()) as u64),
    );
    for model_name in &g.models {
        let (manifest, checkpoint) = if model_name == "untrained" {
            (baseline_manifest(cfg, ctx, &entries)?, None)
        } else {
            let dir = find_stage_dir(ctx, model_name).ok_or_else(|| {
                Error::Config(format!("generate.models: no `{model_name}` checkpoint in this run or an earlier one; run `pipeline run {model_name}` first"))
            })?;
            (
                CaptionerManifest::load(&dir.join("captioner.json"))?,
                Some(dir.join("best/model.safetensors")),
            )
        };
        if manifest.clip_dim != dim {
            return Err(Error::Config(format!(
                "the `{model_name}` captioner expects {}-d CLIP features, the cache has {dim}-d ones (embed.model differs?)",
                manifest.clip_dim
            )));
        }
        let (model, vars) = manifest.captioner(checkpoint.as_deref(), &device)?;
        if checkpoint.is_none() {
            seed_mapper(&vars, cfg.train_sft.seed)?;
        }
        for method in &methods {
            for (chunk_keys, chunk) in keys
                .chunks(g.batch_size.max(1))
                .zip(embeddings.chunks(g.batch_size.max(1) * dim))
            {
                let clip = Tensor::from_slice(chunk, (chunk_keys.len(), dim), &device)
                    .during("uploading image features")?;
                let out = model
                    .generate(&clip, method, g.max_tokens)
                    .during("decoding captions")?;
                for (key, gen) in chunk_keys.iter().zip(out) {
                    rows.push(GenerationRow {
                        run_id: ctx.run_id.clone(),
                        model: model_name.clone(),
                        method: method.label(),
                        dataset: dataset.clone(),
                        split: split.clone(),
                        image_key: key.clone(),
                        caption: gen.text,
                        logprob: gen.logprob,
                        tokens: gen.ids.len() as i32,
                    });
                }
                progress.inc(chunk_keys.len() as u64);
            }
        }
    }
    progress.finish("");
    let path = ctx.run_dir.join("generations.parquet");
    write_parquet(&path, &rows)?;
    if g.json {
        write_json(&ctx.run_dir.join("generations.json"), &rows)?;
    }
    Ok(format!(
        "{} captions ({} models × {} methods × {} images) in {}",
        rows.len(),
        g.models.len(),
        methods.len(),
        keys.len(),
        path.display()
    ))
}

/// `generations.json`: a list of `{image_id, caption, model, method, logprob}` (COCO results
/// format plus the extra keys).
fn write_json(path: &Path, rows: &[GenerationRow]) -> Result<()> {
    let list: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| serde_json::json!({"image_id": r.image_key, "caption": r.caption, "model": r.model, "method": r.method, "logprob": r.logprob}))
        .collect();
    let bytes = serde_json::to_vec_pretty(&list).map_err(|e| Error::Config(e.to_string()))?;
    write_atomic(path, &bytes)
}
