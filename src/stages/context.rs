//! What every stage gets besides its own section: where it runs (workdir, run directory,
//! device), the configuration sections several stages share (`[run]`, `[hub]`, `[clip]`,
//! `[captioner]`, `[preference]`), model-name resolution, and how to find an earlier stage's
//! outputs. Stages exchange files; this is the one place that knows where they are.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::data::features::{CacheDtype, FeatureEntry};
use crate::data::hub::{HubClient, HubConfig};
use crate::data::partition::Sharding;
use crate::data::store::Root;
use crate::datasets::embedding::EmbedOptions;
use crate::datasets::features::{FeatureSettings, ModelIdentity, IMAGE_TOKENS};
use crate::datasets::pairs::TruncationMode;
use crate::device::{device_for, ComputeDtype};
use crate::error::{Error, Result};
use crate::imaging::preprocess::ImageBackend;
use crate::losses::preference::DpoLoss;
use crate::models::captioner::{
    CaptionerConfig, Conditioning, DecoderFiles, ImageEncoder, ImageHeadInit,
};
use crate::models::clip::{ClipEmbedder, ClipModelFiles};
use crate::models::contrastive::ContrastiveManifest;
use crate::models::tiny::{ensure_tiny_clip, ensure_tiny_gpt2, TinyClipSpec};

/// `[run]`: settings shared by all stages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Seed of every seeded choice (synthetic data, binarization, splits, tiny models).
    pub seed: u64,
    /// Capacity of the bounded channels between pipeline threads.
    pub channel_capacity: usize,
    /// CPU worker threads for decode/resize work; 0 = all cores.
    pub workers: usize,
    /// With `--gpu` on a binary without CUDA: run on the CPU instead of failing.
    pub cpu_fallback: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            channel_capacity: 256,
            workers: 0,
            cpu_fallback: false,
        }
    }
}

impl RunConfig {
    pub fn worker_threads(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(2, usize::from)
        }
    }
}

/// `[clip]`: the frozen CLIP every stage that embeds or scores uses, and how its features are
/// computed and stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClipConfig {
    /// Hub model repo, a local directory in Hugging Face layout, or `tiny`: the embedded
    /// tiny CLIP (the newest `pretrain-clip` output, else its seeded random initialisation).
    pub model: String,
    /// Hub revision (a pinned commit by default); ignored for local directories.
    pub revision: String,
    /// Precision the model computes in (f16/bf16 on a GPU only).
    pub dtype: ComputeDtype,
    /// Precision of the stored embeddings.
    pub cache_dtype: CacheDtype,
    /// Precision of the stored image tokens (`embed.image_tokens`).
    pub tokens_dtype: CacheDtype,
    /// Whose image preprocessing to reproduce: transformers' Pillow backend or its
    /// torchvision one. Unset: torchvision's for a checkpoint whose
    /// `preprocessor_config.json` names a `...Fast` processor, else Pillow's.
    pub image_backend: Option<ImageBackend>,
}

impl Default for ClipConfig {
    fn default() -> Self {
        Self {
            model: "openai/clip-vit-base-patch32".into(),
            revision: "3d74acf9a28c67741b2f4f2ea7635f0aaf6f0268".into(),
            dtype: ComputeDtype::F32,
            cache_dtype: CacheDtype::F32,
            tokens_dtype: CacheDtype::F16,
            image_backend: None,
        }
    }
}

impl ClipConfig {
    /// The same settings for another checkpoint (the one a trained captioner was trained on).
    pub fn with_model(&self, model: &str, revision: &str) -> Self {
        Self {
            model: model.to_string(),
            revision: revision.to_string(),
            ..self.clone()
        }
    }

    pub fn feature_settings(&self) -> FeatureSettings {
        FeatureSettings {
            compute_dtype: self.dtype,
            cache_dtype: self.cache_dtype,
            tokens_dtype: self.tokens_dtype,
            image_backend: self.image_backend,
        }
    }
}

/// `[preference]`: the pair data and losses of the preference stages (train-dpo, train-orpo).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreferenceConfig {
    /// Image-grounded pair dataset under `data/` (rows with `image_key`); empty = none.
    pub pairs_dataset: String,
    /// Image dataset whose cached features the pairs' `image_key`s name.
    pub image_dataset: String,
    pub train_split: String,
    pub val_split: String,
    /// Text-only pair dataset (UltraFeedback: the decoder is conditioned on the prompt, no
    /// image prefix), trained on beside the image-grounded pairs; empty = none.
    pub text_pairs_dataset: String,
    pub text_train_split: String,
    pub text_val_split: String,
    /// TRL's `max_length`: prompt + completion tokens per sequence (the CLIP prefix not
    /// counted); 0 = no limit. Also capped by the decoder's positions.
    pub max_length: usize,
    /// TRL's (pre-1.0) `max_prompt_length`: a longer prompt keeps its last tokens; 0 = no limit.
    pub max_prompt_length: usize,
    /// TRL's `truncation_mode` for `max_length`.
    pub truncation_mode: TruncationMode,
    /// DPO loss: sigmoid, hinge, ipo, robust.
    pub loss: DpoLoss,
    pub beta: f64,
    pub label_smoothing: f64,
    /// Weight of an SFT term (mean NLL of the chosen completion tokens) added to the DPO loss:
    /// TRL's `loss_type=["sigmoid", "sft"]` with `loss_weights=[1, sft_weight]` (RPO); 0 = off.
    pub sft_weight: f64,
    /// ORPO's λ.
    pub orpo_lambda: f64,
    /// Training stage whose best checkpoint initialises the policy (and is DPO's reference).
    pub init_from: String,
}

impl Default for PreferenceConfig {
    fn default() -> Self {
        Self {
            pairs_dataset: "synthetic_prefs".into(),
            image_dataset: "synthetic".into(),
            train_split: "train".into(),
            val_split: "val".into(),
            text_pairs_dataset: String::new(),
            text_train_split: "train_prefs".into(),
            text_val_split: "test_prefs".into(),
            max_length: 1024,
            max_prompt_length: 0,
            truncation_mode: TruncationMode::KeepStart,
            loss: DpoLoss::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            sft_weight: 0.0,
            orpo_lambda: 0.1,
            init_from: "train-sft".into(),
        }
    }
}

/// The sections several stages share. Every field defaults to `configs/default.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedConfig {
    pub run: RunConfig,
    pub hub: HubConfig,
    pub clip: ClipConfig,
    pub captioner: CaptionerConfig,
    pub preference: PreferenceConfig,
}

impl SharedConfig {
    /// The shared sections' names, as `configs/default.toml` has them.
    pub const SECTIONS: [&'static str; 5] = ["run", "hub", "clip", "captioner", "preference"];
}

/// Where the embedded tiny CLIP's seeded random initialisation is kept.
const TINY_CLIP_DIR: &str = "cache/models/tiny-clip-v1";
/// Where the embedded tiny GPT-2 is kept.
const TINY_GPT2_DIR: &str = "cache/models/tiny-gpt2-v1";
/// The checkpoint directory `pretrain-clip` writes inside the run directory.
pub const PRETRAINED_TINY_CLIP: &str = "pretrain-clip/model";

/// What a stage gets besides its own section.
#[derive(Debug, Clone)]
pub struct StageContext {
    /// The directory that holds `data/`, `cache/` and `runs/`.
    pub workdir: PathBuf,
    /// `runs/<run-id>/`: this run's outputs.
    pub run_dir: PathBuf,
    pub run_id: String,
    /// `--gpu N`: the CUDA device model stages run on.
    pub gpu: Option<usize>,
    /// `--retry-failed`: re-download only the failed samples of finished shards.
    pub retry_failed: bool,
    /// The pipeline step being run (empty: the stage runs under its own name).
    pub step: String,
    /// Where the workdir's shared files (`data/`, the job ledger) live: `workdir` itself, or
    /// an object store (`--workdir s3://…`), `workdir` then being the local directory beside it
    /// for everything else. Only stages that write or read through it support a store.
    pub root: Root,
    /// Which worker of a job array this is and the job's ledger (a single process: all the
    /// work, no ledger). Only stages with `Stage::SHARDED` look at it.
    pub sharding: Sharding,
    pub run: RunConfig,
    pub hub: HubConfig,
    pub clip: ClipConfig,
    pub captioner: CaptionerConfig,
    pub preference: PreferenceConfig,
}

impl StageContext {
    /// A context for run `run_id` under `workdir` with the shared sections `shared`.
    pub fn new(workdir: &Path, run_id: &str, shared: SharedConfig) -> Self {
        let SharedConfig {
            run,
            hub,
            clip,
            captioner,
            preference,
        } = shared;
        Self {
            workdir: workdir.to_path_buf(),
            run_dir: workdir.join("runs").join(run_id),
            run_id: run_id.to_string(),
            gpu: None,
            retry_failed: false,
            step: String::new(),
            sharding: Sharding::default(),
            root: Root::Local(workdir.to_path_buf()),
            run,
            hub,
            clip,
            captioner,
            preference,
        }
    }

    /// The device model stages run on: `--gpu N`, else the CPU.
    pub fn device(&self) -> Result<Device> {
        device_for(self.gpu, self.run.cpu_fallback)
    }

    /// The hub client `[hub]` describes.
    pub fn hub_client(&self) -> Result<HubClient> {
        HubClient::new(&self.hub)
    }

    /// `runs/<run-id>/metrics.parquet`, where the training stages log.
    pub fn metrics_path(&self) -> PathBuf {
        self.run_dir.join("metrics.parquet")
    }

    /// The name stage `stage` runs under: the pipeline step's, else its own. Its outputs go
    /// to `runs/<id>/<name>/` and its metrics rows carry it, so one stage can run as two
    /// steps.
    pub fn output_name<'a>(&'a self, stage: &'a str) -> &'a str {
        if self.step.is_empty() {
            stage
        } else {
            &self.step
        }
    }

    /// Where stage `stage` keeps its checkpoints in this run.
    pub fn stage_dir(&self, stage: &str) -> PathBuf {
        self.run_dir.join(stage)
    }

    /// `relative` inside this run's directory if it exists there, else in the newest run
    /// (by start time, [`run_started`]) that has it: how a stage finds an earlier stage's
    /// output when it runs on its own.
    pub fn find_output(&self, relative: &str) -> Option<PathBuf> {
        let here = self.run_dir.join(relative);
        if here.exists() {
            return Some(here);
        }
        let mut runs: Vec<PathBuf> = std::fs::read_dir(self.workdir.join("runs"))
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        runs.sort_by_key(|r| {
            let name = r.file_name().map(|n| n.to_string_lossy().into_owned());
            let name = name.unwrap_or_default();
            (run_started(&name), name)
        });
        runs.into_iter()
            .rev()
            .map(|r| r.join(relative))
            .find(|p| p.exists())
    }

    /// The output directory of captioner stage `stage` (its `captioner.json` and a best
    /// checkpoint), from this run or the newest that has one.
    pub fn find_captioner(&self, stage: &str) -> Option<PathBuf> {
        self.find_model(stage, "captioner.json")
    }

    /// The directory of `stage`'s newest best checkpoint whose manifest is `manifest`
    /// (`captioner.json`, `diffusion.json`).
    pub fn find_model(&self, stage: &str, manifest: &str) -> Option<PathBuf> {
        let best = self.find_output(&format!("{stage}/best/model.safetensors"))?;
        let dir = best.parent()?.parent()?.to_path_buf();
        dir.join(manifest).is_file().then_some(dir)
    }

    /// The checkpoint files of `clip.model`: a local directory, a hub repo at `clip.revision`,
    /// or `tiny`, the embedded tiny CLIP: what `pretrain-clip` trained (this run's, else the
    /// newest run's), else its seeded random initialisation, generated on first use.
    pub fn clip_files(&self, clip: &ClipConfig) -> Result<ClipModelFiles> {
        if clip.model == "tiny" {
            if let Some(dir) =
                self.find_output(&format!("{PRETRAINED_TINY_CLIP}/model.safetensors"))
            {
                return ClipModelFiles::from_dir(dir.parent().unwrap_or(&self.workdir));
            }
            return ClipModelFiles::from_dir(&self.random_tiny_clip()?);
        }
        ClipModelFiles::resolve(&clip.model, &clip.revision, || self.hub_client())
    }

    /// The embedded tiny CLIP's seeded random initialisation (what `pretrain-clip` starts from).
    pub fn random_tiny_clip(&self) -> Result<PathBuf> {
        let spec = TinyClipSpec {
            seed: self.run.seed,
            ..TinyClipSpec::default()
        };
        ensure_tiny_clip(
            &self.workdir.join(TINY_CLIP_DIR),
            &spec,
            &crate::synthetic::corpus(),
        )
    }

    /// `clip` as the feature cache sees it (reads the checkpoint's files, builds nothing).
    pub fn feature_identity(&self, clip: &ClipConfig) -> Result<ModelIdentity> {
        ModelIdentity::new(self.clip_files(clip)?, clip.feature_settings())
    }

    /// The CLIP of `identity`, built on this stage's device.
    pub fn load_clip(&self, identity: &ModelIdentity) -> Result<ClipEmbedder> {
        identity.load(&self.device()?)
    }

    /// The verified feature entries of `dataset/split` under `clip` (`modality`: `image` or
    /// `text`); an error says to run `embed` when one is missing.
    pub fn split_features(
        &self,
        clip: &ClipConfig,
        dataset: &str,
        split: &str,
        modality: &str,
    ) -> Result<Vec<FeatureEntry>> {
        self.feature_identity(clip)?
            .split_features(&self.workdir, dataset, split, modality)
    }

    /// The cached features captioner `cap` reads for `dataset/split` under `clip` (pooled
    /// image embeddings, or image tokens for a cross-attention captioner over CLIP tokens),
    /// and the image tokens per row (0 = pooled).
    pub fn captioner_features(
        &self,
        cap: &CaptionerConfig,
        clip: &ClipConfig,
        dataset: &str,
        split: &str,
    ) -> Result<(Vec<FeatureEntry>, usize)> {
        let identity = self.feature_identity(clip)?;
        let modality = cap.feature_modality();
        let entries = identity.split_features(&self.workdir, dataset, split, modality)?;
        let tokens = if modality == IMAGE_TOKENS {
            identity.token_shape().0
        } else {
            0
        };
        Ok((entries, tokens))
    }

    /// The cached image tokens of `dataset/split` under `clip` for the images `keys` (the
    /// pooled entries' rows), in that order, `tokens · hidden` values each; an error names the
    /// first image without tokens.
    pub fn image_tokens_for(
        &self,
        cap: &CaptionerConfig,
        clip: &ClipConfig,
        dataset: &str,
        split: &str,
        keys: &[String],
    ) -> Result<Vec<f32>> {
        let (entries, _) = self.captioner_features(cap, clip, dataset, split)?;
        let dim = entries.first().map_or(0, |e| e.manifest.key.dim);
        let (mut token_keys, mut values) = (Vec::new(), Vec::new());
        for e in &entries {
            let t = e.open()?;
            token_keys.extend(t.keys());
            values.extend(t.embeddings());
        }
        if token_keys == keys {
            return Ok(values);
        }
        let row: std::collections::HashMap<&str, usize> = token_keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.as_str(), i))
            .collect();
        let mut out = Vec::with_capacity(keys.len() * dim);
        for key in keys {
            let i = row.get(key.as_str()).ok_or_else(|| {
                Error::Invalid(format!(
                    "no cached image tokens for image `{key}` of {dataset}/{split}; re-run `pipeline run embed` with embed.image_tokens = true"
                ))
            })?;
            out.extend_from_slice(&values[i * dim..(i + 1) * dim]);
        }
        Ok(out)
    }

    /// The files of `captioner.decoder` ([`Self::gpt2_files`]).
    pub fn decoder_files(&self) -> Result<DecoderFiles> {
        self.gpt2_files(&self.captioner.decoder, &self.captioner.decoder_revision)
    }

    /// The files of GPT-2 checkpoint `name`: a local directory, a hub repo at `revision`, or
    /// `tiny`, the embedded tiny GPT-2 (generated on first use).
    pub fn gpt2_files(&self, name: &str, revision: &str) -> Result<DecoderFiles> {
        if name == "tiny" {
            let dir = ensure_tiny_gpt2(
                &self.workdir.join(TINY_GPT2_DIR),
                self.run.seed,
                &crate::synthetic::corpus(),
            )?;
            return DecoderFiles::from_dir(&dir);
        }
        DecoderFiles::resolve(name, revision, || self.hub_client())
    }

    /// The stage-1 image head a `contrastive` cross-attention `[captioner]` starts from: the
    /// best checkpoint of `train-contrastive` (this run's, else the newest run's); `None` for
    /// every other captioner.
    pub fn image_head_init(&self) -> Result<Option<ImageHeadInit>> {
        let cap = &self.captioner;
        if cap.conditioning != Conditioning::CrossAttention
            || cap.image_encoder != ImageEncoder::Contrastive
        {
            return Ok(None);
        }
        let stage = "train-contrastive";
        let weights = self
            .find_output(&format!("{stage}/best/model.safetensors"))
            .ok_or_else(|| self.missing("train-contrastive checkpoint", stage))?;
        let dir = weights
            .parent()
            .and_then(Path::parent)
            .unwrap_or(&self.workdir);
        let manifest = ContrastiveManifest::load(&dir.join("contrastive.json"))?;
        if manifest.clip_model != self.clip.model {
            return Err(Error::Config(format!(
                "{} was trained on features of CLIP `{}`; clip.model is `{}`",
                dir.display(),
                manifest.clip_model,
                self.clip.model
            )));
        }
        Ok(Some(ImageHeadInit {
            spec: manifest.spec,
            weights,
        }))
    }

    /// How the embedding passes run: `batch_size` per model call, `[run]`'s threads and
    /// channel capacity.
    pub fn embed_options(&self, batch_size: usize) -> EmbedOptions {
        EmbedOptions {
            batch_size,
            workers: self.run.worker_threads(),
            channel_capacity: self.run.channel_capacity,
        }
    }

    /// An error for a missing earlier output: what was looked for and what to run.
    pub fn missing(&self, what: &str, stage: &str) -> Error {
        Error::Config(format!(
            "no {what} in this run or an earlier one under {}; run `pipeline run {stage}` first",
            self.workdir.display()
        ))
    }
}

/// `<section>.<key> must be at least 1` for each `(key, value)` that is 0: the start of a
/// section's check of settings that cannot work.
pub fn zero_keys(section: &str, values: &[(&str, usize)]) -> Vec<String> {
    values
        .iter()
        .filter(|(_, v)| *v == 0)
        .map(|(key, _)| format!("{section}.{key} must be at least 1"))
        .collect()
}

/// `Ok` when `bad` is empty, else a configuration error listing every problem in it.
pub fn refuse(bad: Vec<String>) -> Result<()> {
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Error::Config(bad.join("; ")))
    }
}

/// A new run id: `<name>-<UTC start, YYYYMMDDTHHMMSS>-<pid>`.
pub fn new_run_id(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        utc_stamp(SystemTime::now()),
        std::process::id()
    )
}

/// When run `run_id` started, as (stamp, pid) from its id; ids without one (runs made ad hoc)
/// count as older than any stamped run. Names differ in length and may hold `-`, so run ids
/// sort by this, not by name.
pub fn run_started(run_id: &str) -> (String, u64) {
    let mut parts = run_id.rsplitn(3, '-');
    let (pid, stamp) = (parts.next(), parts.next());
    match (pid.and_then(|p| p.parse().ok()), stamp) {
        (Some(pid), Some(stamp))
            if stamp.len() == 15 && stamp.as_bytes()[8] == b'T' && parts.next().is_some() =>
        {
            (stamp.to_string(), pid)
        }
        _ => (String::new(), 0),
    }
}

/// `YYYYMMDDTHHMMSS` in UTC, without a date-time dependency.
pub fn utc_stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn runs_sort_by_start_whatever_their_pipeline_names() {
        let mut ids = [
            "synthetic-grounded-20261201T100000-9",
            "default-20261201T090000-12",
            "train-sft-adhoc",
            "cc-ultrafeedback-dpo-20261201T090000-3",
        ];
        ids.sort_by_key(|id| (run_started(id), id.to_string()));
        assert_eq!(
            ids,
            [
                "train-sft-adhoc",
                "cc-ultrafeedback-dpo-20261201T090000-3",
                "default-20261201T090000-12",
                "synthetic-grounded-20261201T100000-9",
            ]
        );
        let id = new_run_id("default");
        assert!(run_started(&id).0.starts_with("20"), "{id}");
    }

    #[test]
    fn utc_stamp_matches_known_dates() {
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101T000000");
        assert_eq!(
            utc_stamp(UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_661)),
            "20000229T010101"
        );
        assert_eq!(
            utc_stamp(UNIX_EPOCH + Duration::from_secs(1_795_000_000)),
            "20261118T110640"
        );
    }
}
