//! `pipeline run generate`: captions from trained (and untrained, as a baseline) captioners
//! for a dataset split's cached image features — or for an image folder, embedded on the fly
//! through the same CLIP path — with greedy, beam or nucleus decoding, and from caption
//! diffusion models (`train-diffusion`, `refine-diffusion`) by their reverse process
//! (`sampling_steps` respaced, clamped, seeded), into `runs/<id>/generations.parquet` (and
//! `.json` on request).

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::data::records::GenerationRow;
use crate::data::shard::write_parquet;
use crate::datasets::embedding::{embed_user_inputs, UserInputs};
use crate::datasets::features::IMAGE_TOKENS;
use crate::datasets::stories::{load_split, Tokenising};
use crate::error::{CandleContext, Error, Result};
use crate::models::captioner::{seed_mapper, CaptionerManifest, DecodeMethod, Generated};
use crate::models::diffusion::{cut_at_padding, DiffusionManifest};
use crate::models::story::StoryManifest;
use crate::progress::Progress;
use crate::stages::{Stage, StageContext};

/// The story baseline that repeats the last context frame's caption.
pub const COPY_LAST: &str = "copy-last";

/// `[generate]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateConfig {
    /// Captioners to run: `untrained` (the baseline: the mapper at its initialisation seeded
    /// with `seed`), or a training step (`train-sft`, `train-dpo`, `train-orpo`,
    /// `train-dico`, `train-scst`, or a pipeline step's own name) whose best checkpoint is
    /// taken from this run, else from the newest run that has one. With a `train-story`
    /// model, every captioner captions the target frames of its story split's examples,
    /// and `copy-last` (the last context frame's caption) is a baseline.
    pub models: Vec<String>,
    /// Any of `greedy`, `beam`, `sample` (for autoregressive captioners) and `diffusion`
    /// (diffusion models are always decoded by their reverse process).
    pub methods: Vec<String>,
    /// Diffusion decoding: timesteps of the reverse process, respaced from the model's T.
    pub sampling_steps: usize,
    /// Diffusion decoding: clamp each predicted x0 to its nearest token embeddings.
    pub clamp: bool,
    pub beams: usize,
    pub length_penalty: f64,
    pub top_p: f64,
    pub temperature: f64,
    /// Seed of sampling and of the untrained baseline's mapper.
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
            sampling_steps: 100,
            clamp: true,
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
            .filter(|m| *m != "diffusion")
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
                    "generate.methods: unknown method `{other}` (greedy, beam, sample, diffusion)"
                ))),
            })
            .collect()
    }
}

/// What `generate` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateSummary {
    pub captions: usize,
    pub models: usize,
    /// Distinct (model, decoding method) pairs: each autoregressive captioner with every
    /// method, each diffusion model with its reverse process.
    pub decodings: usize,
    pub images: usize,
    pub path: String,
}

impl std::fmt::Display for GenerateSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} captions ({} models, {} decodings × {} images) in {}",
            self.captions, self.models, self.decodings, self.images, self.path
        )
    }
}

/// `pipeline run generate`.
pub struct Generate;

impl Stage for Generate {
    const NAME: &'static str = "generate";
    const DESCRIPTION: &'static str =
        "captions by greedy, beam or top-p sampling into generations.parquet";
    const USES_GPU: bool = true;
    const SECTION: &'static str = "generate";
    type Config = GenerateConfig;
    type Summary = GenerateSummary;

    fn run(g: &GenerateConfig, ctx: &StageContext) -> Result<GenerateSummary> {
        // Trained captioners first: their CLIP decides which features (or which model
        // embeds the user's images), whatever this invocation's `[clip]` says.
        let mut trained = Vec::new();
        let mut diffusion = Vec::new();
        let mut stories = Vec::new();
        for name in g
            .models
            .iter()
            .filter(|m| *m != "untrained" && *m != COPY_LAST)
        {
            if let Some(dir) = ctx.find_model(name, "story.json") {
                stories.push((
                    name.clone(),
                    StoryManifest::load(&dir.join("story.json"))?,
                    dir.join("best/model.safetensors"),
                ));
                continue;
            }
            if let Some(dir) = ctx.find_model(name, "diffusion.json") {
                let manifest = DiffusionManifest::load(&dir.join("diffusion.json"))?;
                let t = manifest.spec.diffusion_steps;
                if g.sampling_steps == 0 || g.sampling_steps > t {
                    return Err(Error::Config(format!(
                        "generate.sampling_steps must be between 1 and the `{name}` model's diffusion_steps ({t}), not {}",
                        g.sampling_steps
                    )));
                }
                diffusion.push((name.clone(), manifest, dir.join("best/model.safetensors")));
                continue;
            }
            let dir = ctx.find_captioner(name).ok_or_else(|| {
                Error::Config(format!("generate.models: no `{name}` checkpoint in this run or an earlier one; run `pipeline run {name}` first"))
            })?;
            trained.push((
                name.clone(),
                CaptionerManifest::load(&dir.join("captioner.json"))?,
                dir.join("best/model.safetensors"),
            ));
        }
        let clip = match (trained.first(), diffusion.first(), stories.first()) {
            (Some((_, m, _)), _, _) => ctx.clip.with_model(&m.clip_model, &m.clip_revision),
            (None, Some((_, m, _)), _) => ctx.clip.with_model(&m.clip_model, &m.clip_revision),
            (None, None, Some((_, m, _))) => ctx.clip.with_model(&m.clip_model, &m.clip_revision),
            (None, None, None) => ctx.clip.clone(),
        };
        let copy_last = g.models.iter().any(|m| m == COPY_LAST);
        // Story models caption the target frames of their story split's examples; with
        // `dataset` naming that story dataset, the image captioners caption the same frames.
        let story = if stories.is_empty() && !copy_last {
            None
        } else {
            let (_, m, _) = stories.first().ok_or_else(|| {
                Error::Config(format!(
                    "generate.models: `{COPY_LAST}` is a story baseline; name a train-story model too"
                ))
            })?;
            for (name, other, _) in &stories[1..] {
                let same = (
                    other.dataset.as_str(),
                    other.spec.context_frames,
                    other.targets,
                ) == (m.dataset.as_str(), m.spec.context_frames, m.targets);
                if !same {
                    return Err(Error::Config(format!(
                        "generate.models: the story models `{}` and `{name}` cut their examples differently (dataset, context_frames or targets); generate them in separate steps",
                        stories[0].0
                    )));
                }
            }
            let story_mode = g.dataset == m.dataset;
            let dataset = m.dataset.clone();
            let split = if story_mode && !g.split.is_empty() {
                g.split.clone()
            } else {
                m.val_split.clone()
            };
            let data = load_split(
                &ctx.workdir,
                &dataset,
                &split,
                &ctx.split_features(&clip, &dataset, &split, "image")?,
                &ctx.split_features(&clip, &dataset, &split, "text")?,
                m.spec.context_frames,
                m.targets,
            )?;
            Some((dataset, split, data, story_mode))
        };
        let (dataset, split, entries) = if let Some((dataset, split, _, true)) = &story {
            (dataset.clone(), split.clone(), Vec::new())
        } else if g.images.is_empty() {
            let dataset = if g.dataset.is_empty() {
                ctx.captioner.dataset.clone()
            } else {
                g.dataset.clone()
            };
            let split = if g.split.is_empty() {
                ctx.captioner.val_split.clone()
            } else {
                g.split.clone()
            };
            let entries = ctx.split_features(&clip, &dataset, &split, "image")?;
            (dataset, split, entries)
        } else {
            let inputs = UserInputs {
                images: Some(PathBuf::from(&g.images)),
                ..UserInputs::default()
            };
            let s = embed_user_inputs(
                &ctx.feature_identity(&clip)?,
                &ctx.device()?,
                &ctx.workdir,
                &inputs,
                &ctx.embed_options(g.batch_size),
            )?;
            ("images".to_string(), g.images.clone(), s.entries)
        };
        let methods = g.decode_methods()?;
        let device = ctx.device()?;
        let mut keys = Vec::new();
        let mut embeddings = Vec::new();
        for e in &entries {
            let t = e.open()?;
            keys.extend(t.keys());
            embeddings.extend(t.embeddings());
        }
        let mut dim = entries.first().map_or(0, |e| e.manifest.key.dim);
        if let Some((_, _, data, true)) = &story {
            for e in &data.examples {
                keys.push(e.target_key());
                embeddings.extend_from_slice(&data.frame(e, e.target).image);
            }
            dim = data
                .examples
                .first()
                .map_or(0, |e| data.frame(e, e.target).image.len());
        }
        let story_targets = story.as_ref().map_or(0, |s| s.2.examples.len());
        let story_rows = |model: &str, method: &str, key: String, gen: &Generated| GenerationRow {
            run_id: ctx.run_id.clone(),
            model: model.to_string(),
            method: method.to_string(),
            dataset: story.as_ref().map_or(String::new(), |s| s.0.clone()),
            split: story.as_ref().map_or(String::new(), |s| s.1.clone()),
            image_key: key,
            caption: gen.text.clone(),
            logprob: gen.logprob,
            tokens: gen.ids.len() as i32,
        };
        let mut rows = Vec::new();
        let progress = Progress::new(
            "generate",
            "captions",
            Some(
                (keys.len() * (methods.len() * trained.len() + diffusion.len())
                    + story_targets * (methods.len() * stories.len() + usize::from(copy_last)))
                    as u64,
            ),
        );
        for model_name in &g.models {
            if let (Some((_, _, data, _)), true) = (&story, model_name == COPY_LAST) {
                // The baseline that says the last context frame's caption again.
                for e in &data.examples {
                    let last = e.context.last().copied().unwrap_or(e.target);
                    let text = data.frame(e, last).caption.clone();
                    let gen = Generated {
                        ids: Vec::new(),
                        text,
                        logprob: 0.0,
                    };
                    rows.push(story_rows(model_name, "copy", e.target_key(), &gen));
                }
                progress.inc(data.examples.len() as u64);
                continue;
            }
            if let Some((_, manifest, best)) = stories.iter().find(|d| &d.0 == model_name) {
                let data = &story
                    .as_ref()
                    .expect("story data is loaded with a story model")
                    .2;
                let width = data
                    .examples
                    .first()
                    .map_or(0, |e| data.frame(e, e.target).image.len());
                if manifest.spec.clip_dim != width {
                    return Err(Error::Config(format!(
                        "the `{model_name}` story model expects {}-d CLIP features, the cache has {width}-d ones (clip.model differs?)",
                        manifest.spec.clip_dim
                    )));
                }
                let model = manifest.model(best, &device)?;
                let (tokenizer, eos) = manifest.decoder_files.tokenizer()?;
                let tokenising = Tokenising {
                    tokenizer,
                    eos,
                    prompt: manifest.prompt.clone(),
                    max_caption_tokens: manifest.max_caption_tokens,
                };
                for method in &methods {
                    for chunk in data.examples.chunks(g.batch_size.max(1)) {
                        let b = tokenising.batch(data, chunk)?;
                        let shape = (b.rows, b.k, b.dim);
                        let image = Tensor::from_slice(&b.context_image, shape, &device)
                            .during("uploading context features")?;
                        let text = Tensor::from_slice(&b.context_text, shape, &device)
                            .during("uploading context features")?;
                        let prompts: Vec<Vec<u32>> = (0..b.rows)
                            .map(|r| b.ids[r * b.len..r * b.len + b.prompt_lens[r]].to_vec())
                            .collect();
                        let out = model
                            .generate(&image, &text, &prompts, method, g.max_tokens)
                            .during("decoding next-frame captions")?;
                        for (key, gen) in b.keys.iter().zip(&out) {
                            rows.push(story_rows(model_name, &method.label(), key.clone(), gen));
                        }
                        progress.inc(b.rows as u64);
                    }
                }
                continue;
            }
            if let Some((_, manifest, best)) = diffusion.iter().find(|d| &d.0 == model_name) {
                if manifest.spec.clip_dim != dim {
                    return Err(Error::Config(format!(
                        "the `{model_name}` diffusion model expects {}-d CLIP features, the cache has {dim}-d ones (clip.model differs?)",
                        manifest.spec.clip_dim
                    )));
                }
                let model = manifest.model(best, &device)?;
                let tokenizer = manifest.tokenizer()?;
                for (i, (chunk_keys, chunk)) in keys
                    .chunks(g.batch_size.max(1))
                    .zip(embeddings.chunks(g.batch_size.max(1) * dim))
                    .enumerate()
                {
                    let clip = Tensor::from_slice(chunk, (chunk_keys.len(), dim), &device)
                        .during("uploading image features")?;
                    let (ids, confidence) = model
                        .sample(&clip, g.sampling_steps, g.clamp, g.seed ^ i as u64)
                        .during("diffusion decoding")?;
                    for ((key, ids), conf) in chunk_keys.iter().zip(&ids).zip(&confidence) {
                        let kept = cut_at_padding(ids, manifest.eos);
                        let text = tokenizer.decode(kept, true).unwrap_or_default();
                        rows.push(GenerationRow {
                            run_id: ctx.run_id.clone(),
                            model: model_name.clone(),
                            method: "diffusion".into(),
                            dataset: dataset.clone(),
                            split: split.clone(),
                            image_key: key.clone(),
                            caption: text.trim().to_string(),
                            // The rounding softmax's log-probabilities of the kept tokens.
                            logprob: conf[..kept.len()].iter().map(|p| (*p as f64).ln()).sum(),
                            tokens: kept.len() as i32,
                        });
                    }
                    progress.inc(chunk_keys.len() as u64);
                }
                continue;
            }
            let (manifest, checkpoint) = if model_name == "untrained" {
                // The baseline: a trained captioner's architecture when there is one, the
                // mapper at its seeded initialisation.
                let manifest = match trained.first() {
                    Some((_, m, _)) => m.clone(),
                    None => CaptionerManifest {
                        captioner: ctx.captioner.clone(),
                        decoder_files: ctx.decoder_files()?,
                        clip_dim: if ctx.captioner.feature_modality() == IMAGE_TOKENS {
                            let (t, h) = ctx.feature_identity(&clip)?.token_shape();
                            t * h
                        } else {
                            dim
                        },
                        clip_model: clip.model.clone(),
                        clip_revision: clip.revision.clone(),
                        image_head: ctx.image_head_init()?,
                        image_tokens: if ctx.captioner.feature_modality() == IMAGE_TOKENS {
                            ctx.feature_identity(&clip)?.token_shape().0
                        } else {
                            0
                        },
                    },
                };
                (manifest, None)
            } else {
                let (_, m, best) = trained
                    .iter()
                    .find(|(n, _, _)| n == model_name)
                    .ok_or_else(|| {
                        ctx.missing(&format!("`{model_name}` checkpoint"), model_name)
                    })?;
                (m.clone(), Some(best.clone()))
            };
            // A captioner over image tokens reads the token entries of the same shards (the
            // same rows: both skip the same undecodable images).
            let tokens;
            let (embeddings, dim) = if manifest.captioner.feature_modality() == IMAGE_TOKENS {
                if !g.images.is_empty() {
                    return Err(Error::Config(format!(
                        "generate.images: the `{model_name}` captioner attends to CLIP image tokens, which are cached for dataset shards only"
                    )));
                }
                tokens =
                    ctx.image_tokens_for(&manifest.captioner, &clip, &dataset, &split, &keys)?;
                let dim = tokens.len() / keys.len().max(1);
                (&tokens, dim)
            } else {
                (&embeddings, dim)
            };
            if manifest.clip_dim != dim {
                return Err(Error::Config(format!(
                    "the `{model_name}` captioner expects {}-d CLIP features, the cache has {dim}-d ones (clip.model differs?)",
                    manifest.clip_dim
                )));
            }
            let (model, vars) = manifest.captioner(checkpoint.as_deref(), &device)?;
            if checkpoint.is_none() {
                seed_mapper(&vars, g.seed)?;
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
        Ok(GenerateSummary {
            captions: rows.len(),
            models: g.models.len(),
            decodings: rows
                .iter()
                .map(|r| (r.model.as_str(), r.method.as_str()))
                .collect::<std::collections::HashSet<_>>()
                .len(),
            images: keys.len(),
            path: path.display().to_string(),
        })
    }
}

/// `generations.json`: a list of `{image_id, caption, model, method, logprob}` (COCO results
/// format plus the extra keys).
fn write_json(path: &Path, rows: &[GenerationRow]) -> Result<()> {
    let list: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| serde_json::json!({"image_id": r.image_key, "caption": r.caption, "model": r.model, "method": r.method, "logprob": r.logprob}))
        .collect();
    crate::io::write_json(path, &list)
}
