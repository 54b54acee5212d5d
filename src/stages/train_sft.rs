//! `pipeline run train-sft`: teacher-forced training of the CLIP-prefix captioner on cached
//! image features and their captions, through the generic trainer loop.
//!
//! Data streams reader → batcher → trainer: a loader thread walks the split's feature entries
//! (memory-mapped) in a seeded per-epoch shard order, joins each with its shard's captions,
//! shuffles within the shard, tokenizes and pads, and sends ready batches over a bounded
//! channel, so the training thread only computes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use crossbeam_channel::{bounded, Receiver};
use tokenizers::Tokenizer;

use crate::data::features::FeatureEntry;
use crate::data::hub::HubClient;
use crate::data::records::ImageTextSample;
use crate::data::shard::read_parquet;
use crate::device::device_for;
use crate::error::{Error, Result};
use crate::models::captioner::{caption_ids, Captioner, CaptionerManifest, DecoderFiles};
use crate::pipeline::config::Config;
use crate::rng::SplitMix64;
use crate::stages::embed::{self};
use crate::train::{fit, FitOutput, Objective, StepOutput};

/// What a stage gets besides its configuration.
#[derive(Debug, Clone)]
pub struct StageContext {
    pub workdir: PathBuf,
    /// `runs/<run-id>/`.
    pub run_dir: PathBuf,
    pub run_id: String,
    pub gpu: Option<usize>,
}

impl StageContext {
    pub fn metrics_path(&self) -> PathBuf {
        self.run_dir.join("metrics.parquet")
    }

    /// `relative` inside this run's directory if it exists there, else in the newest run
    /// (by name order) that has it: how a stage finds an earlier stage's output when it runs
    /// on its own.
    pub fn find_in_runs(&self, relative: &str) -> Option<PathBuf> {
        let here = self.run_dir.join(relative);
        if here.exists() {
            return Some(here);
        }
        let mut runs: Vec<PathBuf> = std::fs::read_dir(self.workdir.join("runs"))
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        runs.sort();
        runs.into_iter()
            .rev()
            .map(|r| r.join(relative))
            .find(|p| p.exists())
    }
}

/// One padded batch, built off the training thread.
pub struct CaptionBatch {
    pub rows: usize,
    pub len: usize,
    /// `rows × clip_dim`.
    pub clip: Vec<f32>,
    /// `rows × len` token ids, padded with end-of-text.
    pub ids: Vec<u32>,
    /// `rows × len`, 1 for supervised tokens.
    pub mask: Vec<f32>,
}

/// Pads `(clip, ids)` rows into a batch.
pub fn pad_batch(rows: Vec<(Vec<f32>, Vec<u32>)>, eos: u32) -> CaptionBatch {
    let len = rows.iter().map(|r| r.1.len()).max().unwrap_or(1);
    let mut b = CaptionBatch {
        rows: rows.len(),
        len,
        clip: Vec::new(),
        ids: Vec::new(),
        mask: Vec::new(),
    };
    for (clip, ids) in rows {
        b.clip.extend_from_slice(&clip);
        b.mask
            .extend((0..len).map(|i| if i < ids.len() { 1.0 } else { 0.0 }));
        let n = ids.len();
        b.ids.extend(ids);
        b.ids.extend(std::iter::repeat_n(eos, len - n));
    }
    b
}

/// The image features of a split joined with the captions of their shards.
#[derive(Clone)]
pub struct CaptionedSplit {
    pub entries: Vec<FeatureEntry>,
    /// Rows used of each entry: all of them, or a prefix after [`CaptionedSplit::first`].
    kept: Vec<u64>,
    workdir: PathBuf,
}

impl CaptionedSplit {
    pub fn new(cfg: &Config, workdir: &Path, dataset: &str, split: &str) -> Result<Self> {
        let entries = embed::split_features(cfg, workdir, dataset, split, "image")?;
        Ok(Self {
            kept: entries.iter().map(|e| e.manifest.rows).collect(),
            entries,
            workdir: workdir.to_path_buf(),
        })
    }

    /// The first `n` rows in shard order (all when `n` is 0 or covers the split): entries
    /// past them are dropped and the last one kept is cut.
    pub fn first(mut self, n: u64) -> Self {
        self.kept = first_rows(&self.kept, n);
        self.entries.truncate(self.kept.len());
        self
    }

    pub fn rows(&self) -> u64 {
        self.kept.iter().sum()
    }

    /// `(key, embedding, caption)` of entry `i`, in file order.
    pub fn load(&self, i: usize) -> Result<Vec<(String, Vec<f32>, String)>> {
        let entry = &self.entries[i];
        let shard = self.workdir.join(&entry.manifest.key.source);
        let samples: Vec<ImageTextSample> = read_parquet(&shard)?;
        let captions: HashMap<String, String> =
            samples.into_iter().map(|s| (s.key, s.caption)).collect();
        let table = entry.open()?;
        let dim = table.dim;
        let emb = table.embeddings();
        table
            .keys()
            .into_iter()
            .take(self.kept[i] as usize)
            .enumerate()
            .map(|(r, key)| {
                let caption = captions.get(&key).cloned().ok_or_else(|| Error::BadFile {
                    path: shard.clone(),
                    message: format!("no sample `{key}` for a cached feature row"),
                })?;
                Ok((key, emb[r * dim..(r + 1) * dim].to_vec(), caption))
            })
            .collect()
    }

    /// Batches over a bounded channel from a loader thread: shards in a seeded order (or in
    /// order when `shuffle_seed` is None), rows shuffled within each shard.
    pub fn batches(
        &self,
        batch_size: usize,
        tok: &Tokenizer,
        eos: u32,
        max_tokens: usize,
        shuffle_seed: Option<(u64, usize)>,
        capacity: usize,
    ) -> Receiver<Result<CaptionBatch>> {
        let (split, tok) = (self.clone(), tok.clone());
        let loader = move |i: usize| split.load(i);
        let make = move |chunk: &[(String, Vec<f32>, String)]| -> Result<CaptionBatch> {
            let rows = chunk
                .iter()
                .map(|(_, e, c)| Ok((e.clone(), caption_ids(&tok, eos, c, max_tokens)?)))
                .collect::<Result<Vec<_>>>()?;
            Ok(pad_batch(rows, eos))
        };
        let shuffle = shuffle_seed.map(|(seed, epoch)| (seed, format!("sft-epoch-{epoch}")));
        shard_batches(
            self.entries.len(),
            loader,
            make,
            batch_size,
            shuffle,
            capacity,
        )
    }

    /// Batches per pass at `batch_size` (each shard's last batch may be short).
    pub fn batches_per_pass(&self, batch_size: usize) -> usize {
        self.kept
            .iter()
            .map(|&rows| (rows as usize).div_ceil(batch_size.max(1)))
            .sum()
    }
}

/// Rows kept of shards holding `rows` rows when only the first `n` count (0 = all):
/// whole shards, then part of one; shards past the `n`th row are left out.
fn first_rows(rows: &[u64], n: u64) -> Vec<u64> {
    if n == 0 {
        return rows.to_vec();
    }
    let mut left = n;
    let mut kept: Vec<u64> = rows
        .iter()
        .map(|&r| {
            let k = r.min(left);
            left -= k;
            k
        })
        .collect();
    let used = kept.iter().rposition(|k| *k > 0).map_or(0, |last| last + 1);
    kept.truncate(used);
    kept
}

/// The one batch loader of the trainers: a thread walks `shards` shards (in a seeded order
/// when `shuffle` gives a seed and a label, else in order), loads each with `load`, shuffles
/// its rows with the same generator, and sends `make`'s batches of `batch_size` rows over a
/// bounded channel. The first error is sent and ends the stream; dropping the receiver
/// stops the thread.
pub fn shard_batches<R, B>(
    shards: usize,
    load: impl Fn(usize) -> Result<Vec<R>> + Send + 'static,
    make: impl Fn(&[R]) -> Result<B> + Send + 'static,
    batch_size: usize,
    shuffle: Option<(u64, String)>,
    capacity: usize,
) -> Receiver<Result<B>>
where
    R: Send + 'static,
    B: Send + 'static,
{
    let (tx, rx) = bounded(capacity.max(1));
    std::thread::spawn(move || {
        let mut order: Vec<usize> = (0..shards).collect();
        let mut rng = shuffle.map(|(seed, label)| SplitMix64::derived(seed, &label));
        if let Some(rng) = rng.as_mut() {
            rng.shuffle(&mut order);
        }
        for i in order {
            let mut rows = match load(i) {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            if let Some(rng) = rng.as_mut() {
                rng.shuffle(&mut rows);
            }
            for chunk in rows.chunks(batch_size.max(1)) {
                let batch = make(chunk);
                let failed = batch.is_err();
                if tx.send(batch).is_err() || failed {
                    return;
                }
            }
        }
    });
    rx
}

/// Tensors of a batch on `device`.
pub fn batch_tensors(
    b: &CaptionBatch,
    clip_dim: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    Ok((
        Tensor::from_slice(&b.clip, (b.rows, clip_dim), device)?,
        Tensor::from_slice(&b.ids, (b.rows, b.len), device)?,
        Tensor::from_slice(&b.mask, (b.rows, b.len), device)?,
    ))
}

struct SftObjective {
    model: Captioner,
    vars: VarMap,
    train: CaptionedSplit,
    val: CaptionedSplit,
    batch_size: usize,
    max_tokens: usize,
    seed: u64,
    capacity: usize,
}

impl Objective for SftObjective {
    type Batch = CaptionBatch;

    fn vars(&self) -> &VarMap {
        &self.vars
    }

    fn step(&mut self, b: &CaptionBatch, _train: bool) -> candle_core::Result<StepOutput> {
        let (clip, ids, mask) = batch_tensors(b, self.model.clip_dim, self.model.device())?;
        let loss = self.model.nll(&clip, &ids, &mask)?;
        Ok(StepOutput {
            loss,
            scalars: Vec::new(),
            rows: b.rows,
        })
    }

    fn train_batches(&self, epoch: usize) -> Result<Receiver<Result<CaptionBatch>>> {
        Ok(self.train.batches(
            self.batch_size,
            &self.model.tokenizer,
            self.model.eos,
            self.max_tokens,
            Some((self.seed, epoch)),
            self.capacity,
        ))
    }

    fn val_batches(&self) -> Result<Receiver<Result<CaptionBatch>>> {
        Ok(self.val.batches(
            self.batch_size,
            &self.model.tokenizer,
            self.model.eos,
            self.max_tokens,
            None,
            self.capacity,
        ))
    }
}

/// Where a stage keeps its checkpoints inside the run directory.
pub fn stage_dir(ctx: &StageContext, stage: &str) -> PathBuf {
    ctx.run_dir.join(stage)
}

/// Runs train-sft; returns the one-line summary for the run log.
pub fn run(cfg: &Config, ctx: &StageContext) -> Result<String> {
    let cap = &cfg.captioner;
    let train = CaptionedSplit::new(cfg, &ctx.workdir, &cap.dataset, &cap.train_split)?
        .first(cap.max_train_samples as u64);
    let val = CaptionedSplit::new(cfg, &ctx.workdir, &cap.dataset, &cap.val_split)?;
    let clip_dim = train.entries.first().map_or(0, |e| e.manifest.key.dim);
    let device = device_for(ctx.gpu, cfg.embed.cpu_fallback)?;
    let files =
        DecoderFiles::resolve(cap, &ctx.workdir, cfg.run.seed, || HubClient::new(&cfg.hub))?;
    let vars = VarMap::new();
    let model = Captioner::build(cap, clip_dim, &files, &vars, &device)?;
    crate::models::captioner::seed_mapper(&vars, cfg.train_sft.seed)?;
    let dir = stage_dir(ctx, "train-sft");
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        path: dir.clone(),
        source,
    })?;
    let manifest = CaptionerManifest {
        captioner: cap.clone(),
        decoder_files: files,
        clip_dim,
        clip_model: cfg.embed.model.clone(),
        clip_revision: cfg.embed.revision.clone(),
    };
    manifest.save(&dir.join("captioner.json"))?;
    let steps_per_epoch = train.batches_per_pass(cfg.train_sft.batch_size);
    let mut objective = SftObjective {
        model,
        vars,
        train,
        val,
        batch_size: cfg.train_sft.batch_size,
        max_tokens: cap.max_caption_tokens,
        seed: cfg.train_sft.seed,
        capacity: 4,
    };
    let metrics = ctx.metrics_path();
    let summary = fit(
        &mut objective,
        &cfg.train_sft,
        steps_per_epoch,
        &FitOutput {
            checkpoint_dir: &dir,
            metrics_path: &metrics,
            run_id: &ctx.run_id,
            stage: "train-sft",
        },
    )?;
    Ok(format!(
        "{} optimizer steps over {} rows; best val loss {:.4} at step {}; {} non-finite batches skipped; trainer waited on data {:.1}% of the time; checkpoints in {}",
        summary.state.step,
        objective.train.rows(),
        summary.state.best_value.unwrap_or(f64::NAN),
        summary.state.best_step.unwrap_or(0),
        summary.state.skipped_nonfinite,
        100.0 * summary.data_wait_fraction,
        dir.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::first_rows;

    #[test]
    fn the_first_n_rows_take_whole_shards_then_part_of_one() {
        let rows = [128, 128, 0, 128, 64];
        assert_eq!(first_rows(&rows, 0), rows.to_vec(), "0 = all");
        assert_eq!(first_rows(&rows, 100), vec![100]);
        assert_eq!(first_rows(&rows, 128), vec![128]);
        assert_eq!(first_rows(&rows, 300), vec![128, 128, 0, 44]);
        assert_eq!(first_rows(&rows, 10_000), rows.to_vec());
        assert_eq!(
            first_rows(&[0, 5], 3),
            vec![0, 3],
            "an empty shard is skipped"
        );
    }
}
