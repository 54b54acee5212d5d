//! `pipeline run sample-pairs`: image-grounded preference pairs for images that have no
//! human preferences (Conceptual Captions): the SFT captioner samples `candidates` captions
//! per image (top-p), the captioner's own CLIP scores each against its image (CLIPScore,
//! 2.5·max(cos, 0)), and the best and worst distinct candidates become a chosen / rejected
//! pair, written as preference shards like the ingest ones (`data/<dataset>_sampled_prefs/<split>/`)
//! for train-dpo and train-orpo.
//!
//! Shards are resumable: shard `i` holds the pairs of the split's images `i·shard_size..`,
//! and a stamp (checkpoint, CLIP, settings, the image features' cache keys), beside them and
//! in each shard's stats, throws stale shards away. The workers of a job array
//! (`--num-workers`) each sample the shards they own. An image
//! whose candidates are all the same text, or whose best and worst differ by less than
//! `min_margin`, gives no pair and is counted in the shard's stats.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::records::PreferencePair;
use crate::data::shard::{ShardSet, ShardStats};
use crate::datasets::features::IMAGE_TOKENS;
use crate::error::{CandleContext, Error, IoContext, Result};
use crate::io::{sha256_file, write_atomic};
use crate::metrics::embedding::clip_score;
use crate::models::captioner::{CaptionerManifest, DecodeMethod};
use crate::models::clip::ClipEmbedder;
use crate::progress::Progress;
use crate::stages::{Stage, StageContext};

/// `[sample_pairs]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplePairsConfig {
    /// Training stage whose best checkpoint samples the candidates.
    pub model: String,
    /// Image dataset under `data/` (its cached features); empty = `captioner.dataset`.
    pub dataset: String,
    /// Splits to build pairs for; empty = `captioner.train_split` and `captioner.val_split`.
    pub splits: Vec<String>,
    /// Captions sampled per image.
    pub candidates: usize,
    pub top_p: f64,
    pub temperature: f64,
    pub max_tokens: usize,
    /// Smallest CLIPScore gap between chosen and rejected that makes a pair.
    pub min_margin: f64,
    /// Images per split; 0 = all.
    pub max_images: usize,
    /// Images per generation batch.
    pub batch_size: usize,
    /// Images per output shard.
    pub shard_size: usize,
    pub seed: u64,
}

impl Default for SamplePairsConfig {
    fn default() -> Self {
        Self {
            model: "train-sft".into(),
            dataset: String::new(),
            splits: Vec::new(),
            candidates: 4,
            top_p: 0.9,
            temperature: 1.0,
            max_tokens: 30,
            min_margin: 0.0,
            max_images: 0,
            batch_size: 16,
            shard_size: 1000,
            seed: 42,
        }
    }
}

/// The pair dataset `sample-pairs` writes for image dataset `dataset`.
pub fn pairs_dataset(dataset: &str) -> String {
    format!("{dataset}_sampled_prefs")
}

/// `source` of the pairs this stage writes.
pub const SOURCE: &str = "sft_samples_clipscore";

/// Best and worst distinct candidates by score: `(chosen, rejected)` indices, or why none.
pub fn rank(
    texts: &[String],
    scores: &[f64],
    min_margin: f64,
) -> std::result::Result<(usize, usize), &'static str> {
    let mut best: Option<usize> = None;
    let mut worst: Option<usize> = None;
    for (i, s) in scores.iter().enumerate() {
        if texts[i].trim().is_empty() || !s.is_finite() {
            continue;
        }
        if best.is_none_or(|b| *s > scores[b]) {
            best = Some(i);
        }
        if worst.is_none_or(|w| *s < scores[w]) {
            worst = Some(i);
        }
    }
    match (best, worst) {
        (Some(b), Some(w)) if texts[b].trim() != texts[w].trim() => {
            if scores[b] - scores[w] < min_margin {
                Err("small_margin")
            } else {
                Ok((b, w))
            }
        }
        _ => Err("identical_candidates"),
    }
}

/// CLIPScores (2.5·max(cos, 0)) of `texts` against `image` (one embedding).
fn clip_scores(clip: &ClipEmbedder, image: &[f32], texts: &[String]) -> Result<Vec<f64>> {
    Ok(clip
        .embed_texts_normalized(texts)?
        .iter()
        .map(|t| clip_score(image, t))
        .collect())
}

/// What `sample-pairs` wrote, one line per split.
#[derive(Debug, Clone, Serialize)]
pub struct SamplePairsSummary {
    pub splits: Vec<String>,
}

impl std::fmt::Display for SamplePairsSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.splits.join("; "))
    }
}

/// `pipeline run sample-pairs`.
pub struct SamplePairs;

impl Stage for SamplePairs {
    const NAME: &'static str = "sample-pairs";
    const DESCRIPTION: &'static str =
        "image-grounded pairs: SFT samples per image ranked by CLIPScore (best vs worst)";
    const USES_GPU: bool = true;
    const SECTION: &'static str = "sample_pairs";
    const SHARDED: bool = true;
    type Config = SamplePairsConfig;
    type Summary = SamplePairsSummary;

    fn run(cfg: &SamplePairsConfig, ctx: &StageContext) -> Result<SamplePairsSummary> {
        sample_pairs(cfg, ctx)
    }
}

fn sample_pairs(s: &SamplePairsConfig, ctx: &StageContext) -> Result<SamplePairsSummary> {
    if s.candidates < 2 {
        return Err(Error::Config(format!(
            "sample_pairs.candidates = {}: a pair needs at least 2",
            s.candidates
        )));
    }
    let dir = ctx
        .find_captioner(&s.model)
        .ok_or_else(|| ctx.missing(&format!("`{}` checkpoint", s.model), &s.model))?;
    let manifest = CaptionerManifest::load(&dir.join("captioner.json"))?;
    let checkpoint = dir.join("best/model.safetensors");
    // The captioner's own CLIP scores its samples and names the features it reads.
    let clip_cfg = ctx
        .clip
        .with_model(&manifest.clip_model, &manifest.clip_revision);
    let dataset = if s.dataset.is_empty() {
        ctx.captioner.dataset.clone()
    } else {
        s.dataset.clone()
    };
    let splits = if s.splits.is_empty() {
        vec![
            ctx.captioner.train_split.clone(),
            ctx.captioner.val_split.clone(),
        ]
    } else {
        s.splits.clone()
    };
    let device = ctx.device()?;
    let (model, _vars) = manifest.captioner(Some(&checkpoint), &device)?;
    let identity = ctx.feature_identity(&clip_cfg)?;
    let clip = ctx.load_clip(&identity)?;
    let out_dataset = pairs_dataset(&dataset);
    let mut base_stamp = Sha256::new();
    base_stamp.update(sha256_file(&checkpoint)?.as_bytes());
    base_stamp.update(sha256_file(&identity.files.weights)?.as_bytes());
    base_stamp.update(format!("{s:?}").as_bytes());

    let mut lines = Vec::new();
    for split in &splits {
        let features = identity.split_features(&ctx.workdir, &dataset, split, "image")?;
        // The image features' cache keys cover their shards and everything that changes
        // their numbers (preprocessing included).
        let mut stamp = base_stamp.clone();
        for e in &features {
            stamp.update(e.manifest.key.digest().as_bytes());
        }
        let stamp = hex::encode(stamp.finalize());
        let set = ShardSet::new(&ctx.workdir, &out_dataset, split);
        let stamp_path = set.dir().join("prefcap-stamp.txt");
        // One process clears a stale set; the workers of a job array leave that alone (one
        // may be writing while another starts) and each reuses only shards with this stamp.
        if ctx.sharding.workers.is_single()
            && set.dir().exists()
            && std::fs::read_to_string(&stamp_path).ok().as_deref() != Some(stamp.as_str())
        {
            std::fs::remove_dir_all(set.dir()).at(set.dir())?;
        }
        set.prepare()?;
        write_atomic(&stamp_path, stamp.as_bytes())?;
        let source = format!(
            "{} best checkpoint, {}, stamp {}",
            s.model,
            clip_cfg.model,
            &stamp[..16]
        );
        let mut keys = Vec::new();
        let mut images = Vec::new();
        for e in features {
            let t = e.open()?;
            keys.extend(t.keys());
            images.extend(t.embeddings());
        }
        // What the captioner reads: the same pooled embeddings, or the image tokens of the
        // same rows (CLIPScore always ranks with the pooled ones).
        let mut inputs = None;
        if manifest.captioner.feature_modality() == IMAGE_TOKENS {
            inputs = Some(ctx.image_tokens_for(
                &manifest.captioner,
                &clip_cfg,
                &dataset,
                split,
                &keys,
            )?);
        }
        let dim = identity.dim();
        let in_dim = manifest.clip_dim;
        if s.max_images > 0 {
            keys.truncate(s.max_images);
            images.truncate(s.max_images * dim);
        }
        let inputs: &[f32] = inputs.as_deref().unwrap_or(&images);
        let shard_size = s.shard_size.max(1);
        let shards = keys.len().div_ceil(shard_size);
        let planned = u32::try_from(shards)
            .map_err(|_| Error::Config("sample_pairs.shard_size: too many shards".into()))?;
        ctx.sharding.plan_shards(set.rel(), &source, planned)?;
        // The images of the shards this process owns (all of them for a single process).
        let owned: usize = (0..shards)
            .filter(|&i| ctx.sharding.owns(i as u32))
            .map(|i| (keys.len() - i * shard_size).min(shard_size))
            .sum();
        let progress = Progress::new(
            &format!("sample-pairs {dataset}/{split}"),
            "images",
            Some(owned as u64),
        );
        let (mut written, mut skipped, mut pairs_total) = (0, 0, 0u64);
        let mut failures: BTreeMap<String, u64> = BTreeMap::new();
        for shard in 0..shards {
            if !ctx.sharding.owns(shard as u32) {
                continue;
            }
            let lo = shard * shard_size;
            let hi = (lo + shard_size).min(keys.len());
            let reusable = set.is_finished(shard as u32)
                && set
                    .read_stats(shard as u32)
                    .is_ok_and(|st| st.source == source);
            if reusable {
                let st = set.read_stats(shard as u32)?;
                pairs_total += st.successes;
                for (k, v) in st.failures {
                    *failures.entry(k).or_default() += v;
                }
                skipped += 1;
                progress.inc((hi - lo) as u64);
                continue;
            }
            let started = Instant::now();
            let mut pairs = Vec::new();
            let mut stats = ShardStats {
                shard: shard as u32,
                source: source.clone(),
                ..ShardStats::default()
            };
            let batch = s.batch_size.max(1);
            for start in (lo..hi).step_by(batch) {
                let end = (start + batch).min(hi);
                let k = s.candidates;
                // Each image k times; every row samples with its own stream.
                let mut rows = Vec::with_capacity((end - start) * k * in_dim);
                for i in start..end {
                    for _ in 0..k {
                        rows.extend_from_slice(&inputs[i * in_dim..(i + 1) * in_dim]);
                    }
                }
                let n = (end - start) * k;
                let clip_in = Tensor::from_vec(rows, (n, in_dim), &device)
                    .during("uploading image features")?;
                let method = DecodeMethod::Sample {
                    top_p: s.top_p,
                    temperature: s.temperature,
                    seed: s.seed.wrapping_add(start as u64),
                };
                let gens = model
                    .generate(&clip_in, &method, s.max_tokens)
                    .during("sampling candidates")?;
                for (j, i) in (start..end).enumerate() {
                    let texts: Vec<String> = gens[j * k..(j + 1) * k]
                        .iter()
                        .map(|g| g.text.clone())
                        .collect();
                    let image = &images[i * dim..(i + 1) * dim];
                    let scores = clip_scores(&clip, image, &texts)?;
                    stats.count += 1;
                    match rank(&texts, &scores, s.min_margin) {
                        Ok((c, r)) => {
                            stats.successes += 1;
                            pairs.push(PreferencePair {
                                pair_id: format!("{}:{split}:{}", out_dataset, keys[i]),
                                source: SOURCE.into(),
                                prompt: String::new(),
                                chosen: texts[c].clone(),
                                rejected: texts[r].clone(),
                                score_chosen: scores[c],
                                score_rejected: scores[r],
                                image_key: Some(keys[i].clone()),
                            });
                        }
                        Err(why) => *stats.failures.entry(why.into()).or_default() += 1,
                    }
                }
                progress.inc((end - start) as u64);
            }
            stats.duration_secs = started.elapsed().as_secs_f64();
            set.write(shard as u32, &pairs, &stats)?;
            pairs_total += stats.successes;
            for (k, v) in &stats.failures {
                *failures.entry(k.clone()).or_default() += v;
            }
            written += 1;
        }
        progress.finish("");
        // Finished shards past the plan (an earlier run's, with more images) are removed.
        for stale in set
            .finished()?
            .into_iter()
            .filter(|&i| i >= planned && ctx.sharding.owns(i))
        {
            set.remove(stale)?;
        }
        let failed = if failures.is_empty() {
            String::new()
        } else {
            format!(
                " (no pair: {})",
                failures
                    .iter()
                    .map(|(k, v)| format!("{v} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        lines.push(format!(
            "{out_dataset}/{split}: {pairs_total} pairs from {} images{failed}, {written} shard(s) written, {skipped} already done",
            keys.len()
        ));
    }
    Ok(SamplePairsSummary { splits: lines })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn best_and_worst_distinct_candidates_make_the_pair() {
        let texts = t(&["a red circle", "two shapes", "a red circle above", "x"]);
        assert_eq!(rank(&texts, &[0.7, 0.2, 0.9, 0.5], 0.0), Ok((2, 1)));
        // A gap under the margin gives no pair.
        assert_eq!(
            rank(&texts, &[0.7, 0.6, 0.65, 0.62], 0.2),
            Err("small_margin")
        );
        // All the same text (or empty ones) give no pair.
        let same = t(&["a dog", "a dog ", "a dog"]);
        assert_eq!(
            rank(&same, &[0.1, 0.5, 0.3], 0.0),
            Err("identical_candidates")
        );
        let empty = t(&["", "a dog", " "]);
        assert_eq!(
            rank(&empty, &[0.9, 0.5, 0.1], 0.0),
            Err("identical_candidates")
        );
        // NaN scores are ignored, not ranked.
        assert_eq!(rank(&texts, &[f64::NAN, 0.2, 0.9, 0.5], 0.0), Ok((2, 1)));
    }
}
