//! Image–caption training data: a split's cached image features joined with their shards'
//! captions, tokenized and padded into batches on a loader thread.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use crossbeam_channel::Receiver;
use tokenizers::Tokenizer;

use crate::data::features::FeatureEntry;
use crate::data::records::ImageTextSample;
use crate::data::shard::{read_parquet, shard_captions, ShardSet};
use crate::datasets::loader::shard_batches;
use crate::error::{Error, Result};
use crate::models::captioner::caption_ids;
use crate::synthetic;
use crate::train::Batches;

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
    /// The split whose verified image-feature entries are `entries` (in shard order), their
    /// shards under `workdir`.
    pub fn new(workdir: &Path, entries: Vec<FeatureEntry>) -> Self {
        Self {
            kept: entries.iter().map(|e| e.manifest.rows).collect(),
            entries,
            workdir: workdir.to_path_buf(),
        }
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

    /// `(key, embedding, caption)` of every row kept, in shard order.
    pub fn all_rows(&self) -> Result<Vec<(String, Vec<f32>, String)>> {
        let mut rows = Vec::new();
        for i in 0..self.entries.len() {
            rows.extend(self.load(i)?);
        }
        Ok(rows)
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
        let tok = tok.clone();
        let make = move |chunk: &[(String, Vec<f32>, String)]| -> Result<CaptionBatch> {
            let rows = chunk
                .iter()
                .map(|(_, e, c)| Ok((e.clone(), caption_ids(&tok, eos, c, max_tokens)?)))
                .collect::<Result<Vec<_>>>()?;
            Ok(pad_batch(rows, eos))
        };
        let shuffle = shuffle_seed.map(|(seed, epoch)| (seed, format!("sft-epoch-{epoch}")));
        self.stream(batch_size, make, shuffle, capacity)
    }

    /// Batches that `make` builds from `(key, embedding, caption)` rows, over a bounded
    /// channel from a loader thread ([`shard_batches`]: shards in the order `shuffle` seeds,
    /// else in order, rows shuffled within each shard).
    pub fn stream<B: Send + 'static>(
        &self,
        batch_size: usize,
        make: impl Fn(&[(String, Vec<f32>, String)]) -> Result<B> + Send + 'static,
        shuffle: Option<(u64, String)>,
        capacity: usize,
    ) -> Receiver<Result<B>> {
        let split = self.clone();
        let loader = move |i: usize| split.load(i);
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

/// The train and validation batches of a captioner: [`Batches`] for the engine.
pub struct CaptionBatches {
    pub train: CaptionedSplit,
    pub val: CaptionedSplit,
    pub batch_size: usize,
    pub tokenizer: Tokenizer,
    pub eos: u32,
    /// Caption tokens kept, end-of-text included.
    pub max_tokens: usize,
    /// Seed of the per-epoch shard and row order.
    pub seed: u64,
    /// Batches in flight on the channel.
    pub capacity: usize,
}

impl Batches<CaptionBatch> for CaptionBatches {
    fn train(&self, epoch: usize) -> Result<Receiver<Result<CaptionBatch>>> {
        Ok(self.train.batches(
            self.batch_size,
            &self.tokenizer,
            self.eos,
            self.max_tokens,
            Some((self.seed, epoch)),
            self.capacity,
        ))
    }

    fn val(&self) -> Result<Receiver<Result<CaptionBatch>>> {
        Ok(self.val.batches(
            self.batch_size,
            &self.tokenizer,
            self.eos,
            self.max_tokens,
            None,
            self.capacity,
        ))
    }

    fn per_epoch(&self) -> usize {
        self.train.batches_per_pass(self.batch_size)
    }
}

/// A batch of images for objectives that caption them themselves (DiCO, SCST): their keys
/// and the captioner's features of each.
#[derive(Debug, Clone)]
pub struct ImageBatch {
    pub rows: usize,
    pub keys: Vec<String>,
    /// `rows × clip_dim`.
    pub features: Vec<f32>,
}

/// The train and validation images of a split, for [`Batches`]: training batches in a
/// seeded per-epoch order, validation in shard order.
pub struct ImageBatches {
    pub train: CaptionedSplit,
    pub val: CaptionedSplit,
    pub batch_size: usize,
    pub seed: u64,
    pub capacity: usize,
    /// Each training batch is delivered this many times in a row (PPO epochs over one
    /// rollout); 1 = once.
    pub repeat: usize,
}

fn image_batch(chunk: &[(String, Vec<f32>, String)]) -> Result<ImageBatch> {
    Ok(ImageBatch {
        rows: chunk.len(),
        keys: chunk.iter().map(|r| r.0.clone()).collect(),
        features: chunk.iter().flat_map(|r| r.1.iter().copied()).collect(),
    })
}

impl Batches<ImageBatch> for ImageBatches {
    fn train(&self, epoch: usize) -> Result<Receiver<Result<ImageBatch>>> {
        let shuffle = Some((self.seed, format!("images-epoch-{epoch}")));
        let once = self
            .train
            .stream(self.batch_size, image_batch, shuffle, self.capacity);
        let times = self.repeat.max(1);
        if times == 1 {
            return Ok(once);
        }
        let (tx, rx) = crossbeam_channel::bounded(self.capacity.max(1));
        std::thread::spawn(move || {
            for item in once {
                let Ok(b) = item else {
                    let _ = tx.send(item);
                    return;
                };
                for _ in 0..times {
                    if tx.send(Ok(b.clone())).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    fn val(&self) -> Result<Receiver<Result<ImageBatch>>> {
        Ok(self
            .val
            .stream(self.batch_size, image_batch, None, self.capacity))
    }

    fn per_epoch(&self) -> usize {
        self.train.batches_per_pass(self.batch_size) * self.repeat.max(1)
    }
}

/// References of the images of `dataset/split` (image–caption samples with an image, or
/// story frames by frame key): key → captions (for the synthetic world's images, the caption
/// and its converse, which states the same fact).
pub fn references(
    workdir: &Path,
    dataset: &str,
    split: &str,
) -> Result<HashMap<String, Vec<String>>> {
    let mut out = HashMap::new();
    for path in ShardSet::new(workdir, dataset, split).finished_paths()? {
        for (key, caption) in shard_captions(&path)?.0 {
            let mut refs = vec![caption];
            if dataset == synthetic::IMAGES_DATASET {
                if let Some(scene) = synthetic::parse_caption(&refs[0]) {
                    refs.push(synthetic::caption(&scene.converse()));
                }
            }
            out.insert(key, refs);
        }
    }
    Ok(out)
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
