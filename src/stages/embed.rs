//! `pipeline run embed`: frozen CLIP image and text embeddings of the ingested shards,
//! computed once into the content-addressed feature cache (`cache/features-v1/`).
//!
//! Work is keyed per (input, column): an unchanged shard under an unchanged model and
//! preprocessing is a cache hit that costs one hash and never loads the model; a changed shard
//! or model recomputes only what changed. Images flow reader → decode/resize/crop workers →
//! batcher → model thread → writer over bounded channels ([`crate::datasets::embedding`]), so
//! the model thread never waits on I/O or decoding while work is queued.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::features::CacheDtype;
use crate::data::features::{FeatureCache, FeatureKey};
use crate::data::shard::{shard_captions, shard_images, ShardSet};
use crate::data::store::Root;
use crate::datasets::embedding::{
    embed_images_into, embed_texts_into, needs_work, EmbedSummary, ImageOutput, ImageUnits,
    KeyedImage,
};
use crate::datasets::features::{workdir_relative, IMAGE_TOKENS};
use crate::error::{Error, IoContext, Result};
use crate::io::sha256_file;
use crate::progress::Progress;
use crate::stages::{Stage, StageContext};

/// `[embed]`: what the embed stage embeds (the model is `[clip]`'s).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedConfig {
    /// Datasets under `data/` whose splits are embedded (image–caption and story shards).
    pub datasets: Vec<String>,
    /// Also embed every sample's caption.
    pub texts: bool,
    /// Also cache each image's tokens (CLIP's last hidden states after the post-layernorm,
    /// in `clip.tokens_dtype`): what a cross-attention captioner with `image_encoder = "clip"`
    /// attends to. Large: 50 × 768 values per image for ViT-B/32.
    pub image_tokens: bool,
    /// Images (or texts) per model call.
    pub batch_size: usize,
}

impl Default for EmbedConfig {
    fn default() -> Self {
        Self {
            datasets: vec![
                "cc".into(),
                "synthetic".into(),
                "synthetic_stories".into(),
                "storyreasoning".into(),
            ],
            texts: true,
            image_tokens: false,
            batch_size: 64,
        }
    }
}

/// `pipeline run embed`.
pub struct Embed;

impl Stage for Embed {
    const NAME: &'static str = "embed";
    const DESCRIPTION: &'static str =
        "frozen CLIP image and text embeddings into the content-addressed feature cache";
    const USES_GPU: bool = true;
    const SECTION: &'static str = "embed";
    const SHARDED: bool = true;
    const OBJECT_STORE: bool = true;
    type Config = EmbedConfig;
    type Summary = EmbedSummary;

    /// Embeds the finished shards of the configured datasets under `[clip]`.
    fn run(cfg: &EmbedConfig, ctx: &StageContext) -> Result<EmbedSummary> {
        let workdir = &ctx.workdir;
        let sets = input_shards(&cfg.datasets, &ctx.root, workdir)?;
        if sets.iter().all(|(_, finished)| finished.is_empty()) {
            return Err(Error::Config(format!(
                "embed: no finished shards under {}/data/{{{}}}; run `pipeline run ingest` first",
                workdir.display(),
                cfg.datasets.join(",")
            )));
        }
        let identity = ctx.feature_identity(&ctx.clip)?;
        let cache = FeatureCache::new(workdir);
        cache.sweep_temp()?;
        let mut summary = EmbedSummary::default();
        // Planning hashes each shard but loads no rows, so memory does not grow with the data.
        let mut image_work = Vec::new();
        let mut token_work = Vec::new();
        let mut text_work = Vec::new();
        // The entries each owned shard needs, for its done marker in a job array's ledger.
        let mut units: Vec<(String, u32, Vec<FeatureKey>)> = Vec::new();
        let (mut fetched, mut fetched_bytes) = (0u64, 0u64);
        for (shards, indices) in sets {
            ctx.sharding.plan_units(shards.rel(), &indices)?;
            for shard in indices {
                if !ctx.sharding.owns(shard) {
                    continue;
                }
                // From an object store: a local copy, checked against the size its stats give.
                let (path, copied) = shards.local_copy(shard)?;
                if copied {
                    fetched += 1;
                    fetched_bytes += std::fs::metadata(&path).map_or(0, |m| m.len());
                }
                let source = workdir_relative(workdir, &path);
                let sha256 = sha256_file(&path)?;
                let mut keys = vec![identity.key("image", &source, &sha256, "image")];
                if cfg.image_tokens {
                    keys.push(identity.key(IMAGE_TOKENS, &source, &sha256, "image"));
                }
                if cfg.texts {
                    keys.push(identity.key("text", &source, &sha256, "caption"));
                }
                for key in &keys {
                    if needs_work(&cache, key, &mut summary)? {
                        let work = match key.modality.as_str() {
                            IMAGE_TOKENS => &mut token_work,
                            "text" => &mut text_work,
                            _ => &mut image_work,
                        };
                        work.push((path.clone(), key.clone()));
                    }
                }
                units.push((shards.rel().to_string(), shard, keys));
            }
        }
        if fetched > 0 {
            eprintln!(
                "[embed] copied {fetched} shard(s) ({:.1} MB) from {} to {}",
                fetched_bytes as f64 / 1e6,
                ctx.root.display("data"),
                workdir.join("data").display()
            );
        }
        // Each owned shard's entries go up to an object store (data file, then manifest), then
        // its done marker in a job array's ledger.
        let mark_done = || -> Result<()> {
            for (set, shard, keys) in &units {
                let files: Vec<PathBuf> = keys.iter().flat_map(|k| cache.files(k)).collect();
                ctx.root.copy_up(workdir, &files)?;
                ctx.sharding.mark_done(set, *shard, &files)?;
            }
            Ok(())
        };
        if image_work.is_empty() && text_work.is_empty() && token_work.is_empty() {
            mark_done()?;
            return Ok(summary);
        }
        if !token_work.is_empty() {
            // Say what the tokens will take before computing them.
            let rows: u64 = token_work
                .iter()
                .map(|(path, _)| shard_rows(path))
                .sum::<Result<u64>>()?;
            let (t, h) = identity.token_shape();
            let bytes = match ctx.clip.tokens_dtype {
                CacheDtype::F16 => 2,
                CacheDtype::F32 => 4,
            };
            let per_image = (t * h * bytes) as u64;
            eprintln!(
                "[embed] image tokens: {t} x {h} x {bytes} bytes = {:.1} KiB per image; {rows} rows in {} shard(s): about {:.2} GiB in cache/features-v1/",
                per_image as f64 / 1024.0,
                token_work.len(),
                (per_image * rows) as f64 / (1u64 << 30) as f64
            );
        }
        let model = ctx.load_clip(&identity)?;
        summary.model_loaded = true;
        if !text_work.is_empty() {
            let progress = Progress::new("embed text", "shards", Some(text_work.len() as u64));
            for (path, key) in &text_work {
                let (rows, _) = shard_captions(path)?;
                let keys: Vec<String> = rows.iter().map(|(k, _)| k.clone()).collect();
                let captions: Vec<&str> = rows.iter().map(|(_, c)| c.as_str()).collect();
                embed_texts_into(&model, &cache, key, &keys, &captions, cfg.batch_size)?;
                summary.texts += keys.len() as u64;
                summary.computed += 1;
                progress.inc(1);
            }
            progress.finish("");
        }
        if !image_work.is_empty() {
            summary.computed += image_work.len();
            let units = ShardImages { units: image_work };
            let opts = ctx.embed_options(cfg.batch_size);
            let (images, skipped) =
                embed_images_into(&model, &cache, &units, &opts, ImageOutput::Pooled)?;
            summary.images += images;
            summary.skipped += skipped;
        }
        if !token_work.is_empty() {
            summary.computed += token_work.len();
            let units = ShardImages { units: token_work };
            let opts = ctx.embed_options(cfg.batch_size);
            let (images, _) =
                embed_images_into(&model, &cache, &units, &opts, ImageOutput::Tokens)?;
            summary.image_tokens += images;
        }
        mark_done()?;
        Ok(summary)
    }
}

/// Rows of a finished shard, from its Parquet footer.
fn shard_rows(path: &Path) -> Result<u64> {
    use parquet::file::reader::FileReader;
    let file = std::fs::File::open(path).at(path)?;
    let reader =
        parquet::file::reader::SerializedFileReader::new(file).map_err(|e| Error::BadFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    Ok(reader.metadata().file_metadata().num_rows().max(0) as u64)
}

/// The shard sets of every split of `datasets` in the workdir (local or an object store),
/// by dataset and split, each with its finished shards (listed once).
fn input_shards(
    datasets: &[String],
    root: &Root,
    workdir: &Path,
) -> Result<Vec<(ShardSet, Vec<u32>)>> {
    let mut out = Vec::new();
    for dataset in datasets {
        for split in root.subdirectories(&format!("data/{dataset}"))? {
            let set = ShardSet::in_root(root, workdir, dataset, &split);
            let finished = set.finished()?;
            out.push((set, finished));
        }
    }
    Ok(out)
}

/// Image units that are ingest shards: one cache entry per shard.
struct ShardImages {
    units: Vec<(PathBuf, FeatureKey)>,
}

impl ImageUnits for ShardImages {
    fn count(&self) -> usize {
        self.units.len()
    }
    fn key(&self, unit: usize) -> &FeatureKey {
        &self.units[unit].1
    }
    fn load(&self, unit: usize) -> Result<(Vec<KeyedImage>, u64)> {
        shard_images(&self.units[unit].0)
    }
}
