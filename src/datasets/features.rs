//! The feature space trainers read: a CLIP checkpoint as the feature cache sees it (the
//! identity that keys its entries, read from its files without building the model), the
//! verified entries of a dataset split, and embeddings by sample key.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Device;

use crate::data::features::{CacheDtype, FeatureCache, FeatureEntry, FeatureKey};
use crate::data::shard::ShardSet;
use crate::device::{candle_dtype, ComputeDtype};
use crate::error::{Error, Result};
use crate::imaging::preprocess::{ClipPreprocessConfig, ImageBackend};
use crate::io::sha256_file;
use crate::models::clip::{ClipEmbedder, ClipModelFiles, HfClipConfig};

/// The modality of image-token entries.
pub const IMAGE_TOKENS: &str = "image_tokens";

/// What, besides the checkpoint, decides the cached numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureSettings {
    /// Precision the model computes in.
    pub compute_dtype: ComputeDtype,
    /// Precision of the stored embeddings.
    pub cache_dtype: CacheDtype,
    /// Precision of the stored image tokens.
    pub tokens_dtype: CacheDtype,
    /// Whose image preprocessing to reproduce; `None`: as the checkpoint's
    /// `preprocessor_config.json` says.
    pub image_backend: Option<ImageBackend>,
}

/// A model as the feature cache sees it, read from its files without building it: what a
/// cache key needs, so fully cached work never loads the weights.
#[derive(Debug, Clone)]
pub struct ModelIdentity {
    pub files: ClipModelFiles,
    pub config: HfClipConfig,
    pub preprocess: ClipPreprocessConfig,
    weights_sha256: String,
    config_sha256: String,
    compute_dtype: ComputeDtype,
    /// sha256 of `tokenizer.json` and the position limit: what changes text token ids.
    text_fingerprint: String,
    cache_dtype: CacheDtype,
    tokens_dtype: CacheDtype,
}

impl ModelIdentity {
    /// The identity of the checkpoint in `files` computed and stored under `settings`.
    pub fn new(files: ClipModelFiles, settings: FeatureSettings) -> Result<Self> {
        let config = HfClipConfig::from_file(&files.config)?;
        let mut preprocess = ClipPreprocessConfig::from_file(&files.preprocessor)?;
        if let Some(backend) = settings.image_backend {
            preprocess = preprocess.with_backend(backend);
        }
        preprocess.check().map_err(|message| {
            Error::Config(format!("{}: {message}", files.preprocessor.display()))
        })?;
        let text_fingerprint = format!(
            "tokenizer-sha256:{}:max-positions:{}",
            sha256_file(&files.tokenizer)?,
            config.text_config.max_position_embeddings
        );
        Ok(Self {
            weights_sha256: files.weights_sha256()?,
            config_sha256: sha256_file(&files.config)?,
            compute_dtype: settings.compute_dtype,
            files,
            config,
            preprocess,
            text_fingerprint,
            cache_dtype: settings.cache_dtype,
            tokens_dtype: settings.tokens_dtype,
        })
    }

    pub fn dim(&self) -> usize {
        self.config.projection_dim
    }

    /// `(tokens, hidden)` of the image-token entries.
    pub fn token_shape(&self) -> (usize, usize) {
        self.config.token_shape()
    }

    /// The cache key of `column` of `source` embedded as `modality`: `image`, `text`, or
    /// `image_tokens` (the vision tower's last hidden states, `tokens · hidden` per row).
    pub fn key(
        &self,
        modality: &str,
        source: &str,
        source_sha256: &str,
        column: &str,
    ) -> FeatureKey {
        FeatureKey {
            model_id: self.files.model_id.clone(),
            model_revision: self.files.revision.clone(),
            weights_sha256: self.weights_sha256.clone(),
            config_sha256: self.config_sha256.clone(),
            compute_dtype: match self.compute_dtype {
                ComputeDtype::F32 => "f32",
                ComputeDtype::F16 => "f16",
                ComputeDtype::Bf16 => "bf16",
            }
            .into(),
            preprocess: if modality.starts_with("image") {
                self.preprocess.fingerprint()
            } else {
                self.text_fingerprint.clone()
            },
            modality: modality.into(),
            source: source.into(),
            source_sha256: source_sha256.into(),
            column: column.into(),
            dtype: if modality == IMAGE_TOKENS {
                self.tokens_dtype
            } else {
                self.cache_dtype
            },
            dim: if modality == IMAGE_TOKENS {
                let (t, h) = self.token_shape();
                t * h
            } else {
                self.dim()
            },
        }
    }

    /// Builds the model on `device`, in the compute precision.
    pub fn load(&self, device: &Device) -> Result<ClipEmbedder> {
        let dtype = candle_dtype(self.compute_dtype, device)?;
        ClipEmbedder::load_with(&self.files, self.preprocess.clone(), device, dtype)
    }

    /// The cached entries of one dataset split under this model, in shard order: what
    /// the trainers read. `modality` is `image` (column `image`) or `text` (column `caption`).
    /// A missing or stale entry is an error that says to run `embed`.
    pub fn split_features(
        &self,
        workdir: &Path,
        dataset: &str,
        split: &str,
        modality: &str,
    ) -> Result<Vec<FeatureEntry>> {
        let cache = FeatureCache::new(workdir);
        let column = if modality.starts_with("image") {
            "image"
        } else {
            "caption"
        };
        let shards = ShardSet::new(workdir, dataset, split).finished_paths()?;
        if shards.is_empty() {
            return Err(Error::Config(format!(
                "no finished shards in {}/data/{dataset}/{split}; run `pipeline run ingest` first",
                workdir.display()
            )));
        }
        shards
            .iter()
            .map(|path| {
                let key = self.key(
                    modality,
                    &workdir_relative(workdir, path),
                    &sha256_file(path)?,
                    column,
                );
                cache.get(&key)
            })
            .collect()
    }
}

/// Every row of `entries` as key → embedding.
pub fn embeddings_by_key(entries: &[FeatureEntry]) -> Result<HashMap<String, Vec<f32>>> {
    let mut out = HashMap::new();
    for e in entries {
        let t = e.open()?;
        let (dim, emb) = (t.dim, t.embeddings());
        for (i, k) in t.keys().into_iter().enumerate() {
            out.insert(k, emb[i * dim..(i + 1) * dim].to_vec());
        }
    }
    Ok(out)
}

/// `path` relative to `workdir`, as the cache names inputs (`data/cc/train/part-00000.parquet`).
pub fn workdir_relative(workdir: &Path, path: &Path) -> String {
    path.strip_prefix(workdir)
        .unwrap_or(path)
        .display()
        .to_string()
}
