//! Computing CLIP features into the cache: the pipelined image pass (reader → decode/resize/
//! crop workers → batcher → model → writer, over bounded channels, one cache entry per unit
//! of input), the text pass, and a user's own images and texts (`pipeline embed`, and
//! `generate` on an image folder). Work already in the cache is looked up, never redone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use crossbeam_channel::{bounded, Receiver, Sender};
use sha2::{Digest, Sha256};

use crate::data::features::{export, FeatureCache, FeatureEntry, FeatureKey, Lookup};
use crate::datasets::features::{workdir_relative, ModelIdentity};
use crate::error::{CandleContext, Error, IoContext, Result};
use crate::imaging::preprocess::decode_crop;
use crate::io::sha256_file;
use crate::models::clip::ClipEmbedder;
use crate::progress::Progress;

/// How the embedding passes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedOptions {
    /// Images (or texts) per model call.
    pub batch_size: usize,
    /// Decode/resize worker threads.
    pub workers: usize,
    /// Capacity of the bounded channels between the threads.
    pub channel_capacity: usize,
}

/// What `embed` did, for the run log and tests.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EmbedSummary {
    /// Entries found in the cache and reused.
    pub cached: usize,
    /// Entries computed by this run (repaired ones included).
    pub computed: usize,
    /// Entries that were corrupt and recomputed.
    pub repaired: usize,
    pub images: u64,
    pub texts: u64,
    /// Images whose tokens were cached (`embed.image_tokens`).
    pub image_tokens: u64,
    /// Samples without a usable image (failed downloads, undecodable bytes), skipped.
    pub skipped: u64,
    /// Whether the model was loaded at all (not when everything was cached).
    pub model_loaded: bool,
}

impl std::fmt::Display for EmbedSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.computed == 0 {
            write!(
                f,
                "cached: all {} feature entries are up to date",
                self.cached
            )
        } else {
            write!(
                f,
                "{} entries computed ({} repaired), {} cached; {} images, {} texts embedded, {} samples skipped",
                self.computed, self.repaired, self.cached, self.images, self.texts, self.skipped
            )?;
            if self.image_tokens > 0 {
                write!(f, "; tokens of {} images cached", self.image_tokens)?;
            }
            Ok(())
        }
    }
}

/// Looks `key` up, counting hits and repairs; true when the entry must be computed.
pub fn needs_work(
    cache: &FeatureCache,
    key: &FeatureKey,
    summary: &mut EmbedSummary,
) -> Result<bool> {
    Ok(match cache.lookup(key)? {
        Lookup::Hit(_) => {
            summary.cached += 1;
            false
        }
        Lookup::Missing => true,
        Lookup::Corrupt { reason } => {
            eprintln!(
                "[embed] {}: cached {} features are corrupt ({reason}); recomputing",
                key.source, key.modality
            );
            summary.repaired += 1;
            true
        }
    })
}

pub use crate::data::shard::KeyedImage;

/// Where the image pass gets its units' rows from. A unit becomes one cache entry.
pub trait ImageUnits: Sync {
    /// How many units there are.
    fn count(&self) -> usize;
    fn key(&self, unit: usize) -> &FeatureKey;
    /// Loads the rows of `unit`: its sample keys and encoded images; the count is of samples
    /// without an image.
    fn load(&self, unit: usize) -> Result<(Vec<KeyedImage>, u64)>;
}

/// Embeds `texts` in batches into a new cache entry for `key`.
pub fn embed_texts_into(
    model: &ClipEmbedder,
    cache: &FeatureCache,
    key: &FeatureKey,
    keys: &[String],
    texts: &[&str],
    batch_size: usize,
) -> Result<FeatureEntry> {
    let mut writer = cache.writer(key)?;
    let n = batch_size.max(1);
    for (chunk_keys, chunk) in keys.chunks(n).zip(texts.chunks(n)) {
        let emb = model.embed_texts(chunk)?;
        let flat: Vec<f32> = emb
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .during("CLIP text embeddings")?;
        writer.push(chunk_keys, &flat)?;
    }
    writer.finish()
}

/// One image on its way: which unit it belongs to, its row, and its resized and cropped CHW
/// bytes (or why not).
struct Prepared {
    unit: usize,
    row: usize,
    pixels: std::result::Result<Vec<u8>, String>,
}

/// A batch for the model: the (unit, row) of each image and their CHW bytes back to back.
struct ByteBatch {
    rows: Vec<(usize, usize)>,
    bytes: Vec<u8>,
}

/// One embedding on its way to the writer: `None` for an undecodable image.
type Embedded = (usize, usize, Option<Vec<f32>>);

/// What the image pass stores per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageOutput {
    /// The projected image embedding.
    Pooled,
    /// The vision tower's last hidden states after the post-layernorm, flattened.
    Tokens,
}

/// Embeds the images of every unit into its cache entry: a reader thread loads one unit at a
/// time → decode/resize/crop workers → a batcher that packs their bytes → batched model calls
/// on this thread → a writer thread that finishes each entry once all its rows are in.
/// Returns (embedded, skipped) counts.
pub fn embed_images_into(
    model: &ClipEmbedder,
    cache: &FeatureCache,
    units: &dyn ImageUnits,
    opts: &EmbedOptions,
    output: ImageOutput,
) -> Result<(u64, u64)> {
    let label = match output {
        ImageOutput::Pooled => "embed image",
        ImageOutput::Tokens => "embed image tokens",
    };
    let progress = Progress::new(label, "images", None);
    let cap = opts.channel_capacity.max(1);
    let batch = opts.batch_size.max(1);
    let dim = output_dim(model, output);
    // Image `i` of the stream goes to worker `i mod w` and the batcher takes results back in
    // the same rotation: batches are then the same whatever order the workers finish in (a
    // GEMM's rounding can depend on how many rows it is given), with no reorder buffer.
    let workers = opts.workers.max(1);
    let (job_txs, job_rxs): (Vec<_>, Vec<_>) = (0..workers)
        .map(|_| bounded::<(usize, usize, Vec<u8>)>(cap.div_ceil(workers)))
        .unzip();
    let (meta_tx, meta_rx) = bounded::<(usize, Vec<String>, u64)>(cap);
    // About two batches of cropped images in flight (150 KiB each at 224 px), and one packed
    // batch waiting while the model runs the previous one.
    let in_flight = cap.min(2 * batch).div_ceil(workers);
    let (prep_txs, prep_rxs): (Vec<_>, Vec<_>) =
        (0..workers).map(|_| bounded::<Prepared>(in_flight)).unzip();
    let (batch_tx, batch_rx) = bounded::<ByteBatch>(1);
    let (out_tx, out_rx) = bounded::<Embedded>(cap);
    let preprocess = model.preprocess.clone();
    let outcome = std::thread::scope(|scope| -> Result<(u64, u64)> {
        let reader = scope.spawn(move || -> Result<()> {
            let mut next_worker = (0..workers).cycle();
            for unit in 0..units.count() {
                let (rows, skipped) = units.load(unit)?;
                let keys = rows.iter().map(|(k, _)| k.clone()).collect();
                if meta_tx.send((unit, keys, skipped)).is_err() {
                    return Ok(());
                }
                for (row, (_, bytes)) in rows.into_iter().enumerate() {
                    let w = next_worker.next().unwrap_or(0);
                    if job_txs[w].send((unit, row, bytes)).is_err() {
                        return Ok(());
                    }
                }
            }
            Ok(())
        });
        for (rx, tx) in job_rxs.into_iter().zip(prep_txs) {
            let pre = preprocess.clone();
            scope.spawn(move || {
                for (unit, row, bytes) in rx {
                    let pixels = decode_crop(&bytes, &pre).map_err(|e| e.to_string());
                    if tx.send(Prepared { unit, row, pixels }).is_err() {
                        break;
                    }
                }
            });
        }
        let skipped_tx = out_tx.clone();
        scope.spawn(move || pack_batches(&prep_rxs, batch_tx, skipped_tx, batch));
        let writer = scope.spawn(move || write_entries(cache, units, meta_rx, out_rx, dim));
        let computed = run_model(model, output, batch_rx, out_tx, &progress);
        let panicked = |what: &str| Error::Panicked(what.into());
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(panicked("feature writer")));
        let read = reader
            .join()
            .unwrap_or_else(|_| Err(panicked("shard reader")));
        read?;
        computed?;
        written
    });
    progress.finish("");
    outcome
}

/// The batcher: takes the cropped images back from the workers in stream order (image `i`
/// from worker `i mod w`), passes undecodable ones straight to the writer, and packs up to
/// `batch` images into one buffer for the model thread. A batch never spans two units: each
/// unit is cut into the same batches whatever else the run embeds (a resumed run, one shard
/// changed), so its cache entry gets the same bits.
fn pack_batches(
    prepared: &[Receiver<Prepared>],
    batches: Sender<ByteBatch>,
    skipped: Sender<Embedded>,
    batch: usize,
) {
    let mut from = prepared.iter().cycle();
    // The first image of the next unit, read while filling the last batch of a unit.
    let mut carried: Option<Prepared> = None;
    loop {
        let mut items: Vec<Prepared> = carried.take().into_iter().collect();
        while items.len() < batch {
            let Some(p) = from.next().and_then(|rx| rx.recv().ok()) else {
                break;
            };
            if items.first().is_some_and(|first| first.unit != p.unit) {
                carried = Some(p);
                break;
            }
            items.push(p);
        }
        if items.is_empty() {
            return;
        }
        let per_image = items
            .iter()
            .find_map(|p| p.pixels.as_ref().ok().map(Vec::len))
            .unwrap_or(0);
        let mut packed = ByteBatch {
            rows: Vec::with_capacity(items.len()),
            bytes: Vec::with_capacity(per_image * items.len()),
        };
        for p in items {
            match p.pixels {
                Ok(px) => {
                    packed.bytes.extend_from_slice(&px);
                    packed.rows.push((p.unit, p.row));
                }
                Err(msg) => {
                    eprintln!(
                        "[embed] skipping an undecodable image (unit {}, row {}): {msg}",
                        p.unit, p.row
                    );
                    if skipped.send((p.unit, p.row, None)).is_err() {
                        return;
                    }
                }
            }
        }
        if !packed.rows.is_empty() && batches.send(packed).is_err() {
            return;
        }
    }
}

/// The model thread: runs each packed batch through CLIP and passes each embedding on. The
/// next batch's input is made (on a GPU: its bytes uploaded) before the previous batch's
/// embeddings are read back, and its forward pass is queued right after: between two
/// forward passes the device waits only for that readback.
fn run_model(
    model: &ClipEmbedder,
    output: ImageOutput,
    batches: Receiver<ByteBatch>,
    out: Sender<Embedded>,
    progress: &Progress,
) -> Result<()> {
    let dim = output_dim(model, output);
    let mut running: Option<(Vec<(usize, usize)>, Tensor)> = None;
    loop {
        let next = match batches.recv() {
            Ok(b) => {
                let n = b.rows.len();
                Some((
                    b.rows,
                    model.pixel_input(b.bytes, n).during("uploading pixels")?,
                ))
            }
            Err(_) => None,
        };
        if let Some((rows, emb)) = running.take() {
            let flat: Vec<f32> = emb
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .during("reading image embeddings back")?;
            for ((unit, row), e) in rows.iter().zip(flat.chunks(dim)) {
                if out.send((*unit, *row, Some(e.to_vec()))).is_err() {
                    return Ok(());
                }
            }
            progress.inc(rows.len() as u64);
        }
        match next {
            Some((rows, x)) => {
                let y = match output {
                    ImageOutput::Pooled => model.embed_pixel_tensor(&x),
                    ImageOutput::Tokens => model.image_tokens_tensor(&x),
                };
                running = Some((rows, y.during("CLIP image embeddings")?));
            }
            None => return Ok(()),
        }
    }
}

/// Values stored per image for `output`.
fn output_dim(model: &ClipEmbedder, output: ImageOutput) -> usize {
    match output {
        ImageOutput::Pooled => model.dim(),
        ImageOutput::Tokens => {
            let (t, h) = model.token_shape();
            t * h
        }
    }
}

/// A row's index within its unit and its embedding (`None`: the image did not decode).
type RowEmbedding = (usize, Option<Vec<f32>>);

/// Collects embeddings per unit and writes each unit's entry, in row order, once complete.
/// Unit metadata (keys) and results come on separate channels, so results may arrive first.
fn write_entries(
    cache: &FeatureCache,
    units: &dyn ImageUnits,
    meta: Receiver<(usize, Vec<String>, u64)>,
    results: Receiver<Embedded>,
    dim: usize,
) -> Result<(u64, u64)> {
    let mut keys_of: HashMap<usize, Vec<String>> = HashMap::new();
    let mut pending: HashMap<usize, Vec<RowEmbedding>> = HashMap::new();
    // (embedded, skipped) so far.
    let mut counts = (0u64, 0u64);
    let finish = |unit: usize,
                  keys: &[String],
                  mut done: Vec<RowEmbedding>,
                  counts: &mut (u64, u64)|
     -> Result<()> {
        done.sort_by_key(|(r, _)| *r);
        let mut kept = Vec::with_capacity(done.len());
        let mut flat = Vec::with_capacity(done.len() * dim);
        for (r, emb) in done {
            match emb {
                Some(e) => {
                    kept.push(keys[r].clone());
                    flat.extend_from_slice(&e);
                }
                None => counts.1 += 1,
            }
        }
        let mut writer = cache.writer(units.key(unit))?;
        writer.push(&kept, &flat)?;
        writer.finish()?;
        counts.0 += kept.len() as u64;
        Ok(())
    };
    let mut meta_open = true;
    loop {
        crossbeam_channel::select! {
            recv(meta) -> m => match m {
                Ok((unit, keys, unit_skipped)) => {
                    counts.1 += unit_skipped;
                    let have = pending.get(&unit).map_or(0, Vec::len);
                    if have == keys.len() {
                        finish(unit, &keys, pending.remove(&unit).unwrap_or_default(), &mut counts)?;
                    } else {
                        keys_of.insert(unit, keys);
                    }
                }
                Err(_) => {
                    meta_open = false;
                    break;
                }
            },
            recv(results) -> r => match r {
                Ok((unit, row, emb)) => {
                    let rows = pending.entry(unit).or_default();
                    rows.push((row, emb));
                    if keys_of.get(&unit).is_some_and(|k| k.len() == rows.len()) {
                        let keys = keys_of.remove(&unit).unwrap_or_default();
                        finish(unit, &keys, pending.remove(&unit).unwrap_or_default(), &mut counts)?;
                    }
                }
                Err(_) => break,
            },
        }
    }
    // One of the channels closed: drain the other, then finish what is complete.
    if meta_open {
        for (unit, keys, unit_skipped) in meta.iter() {
            counts.1 += unit_skipped;
            keys_of.insert(unit, keys);
        }
    }
    for (unit, row, emb) in results.iter() {
        pending.entry(unit).or_default().push((row, emb));
    }
    let mut units_left: Vec<usize> = keys_of.keys().copied().collect();
    units_left.sort_unstable();
    for unit in units_left {
        let keys = keys_of.remove(&unit).unwrap_or_default();
        let rows = pending.remove(&unit).unwrap_or_default();
        if rows.len() == keys.len() {
            finish(unit, &keys, rows, &mut counts)?;
        }
    }
    Ok(counts)
}

// ---------------------------------------------------------------------------------------
// A user's own images and texts: `pipeline embed --images PATH --texts FILE [--out FILE]`
// ---------------------------------------------------------------------------------------

/// Images per cache entry when embedding a folder: bounds memory and makes a killed run
/// resume at the last finished chunk.
pub const FILES_PER_ENTRY: usize = 1000;

/// Image file extensions picked up from a folder.
const IMAGE_EXTENSIONS: [&str; 7] = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "jpe"];

/// What to embed besides the datasets.
#[derive(Debug, Clone, Default)]
pub struct UserInputs {
    /// A folder of images (searched recursively) or a text file listing image paths, one per
    /// line (relative paths are taken from the list's folder).
    pub images: Option<PathBuf>,
    /// A UTF-8 text file, one text per line.
    pub texts: Option<PathBuf>,
    /// Write every embedding to this file too: `.parquet` or `.arrow` (IPC).
    pub out: Option<PathBuf>,
}

/// What [`embed_user_inputs`] did.
#[derive(Debug, Clone, Default)]
pub struct UserSummary {
    pub embed: EmbedSummary,
    /// The entries, images first, in input order.
    pub entries: Vec<FeatureEntry>,
}

/// The images named by `path`: (key, file), sorted by key. Keys are paths relative to the
/// folder, or the lines of the list as written.
pub fn list_images(path: &Path) -> Result<Vec<(String, PathBuf)>> {
    if path.is_dir() {
        let mut out = Vec::new();
        let mut stack = vec![path.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).at(&dir)? {
                let p = entry.at(&dir)?.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|e| {
                    IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_lowercase().as_str())
                }) {
                    out.push((workdir_relative(path, &p), p));
                }
            }
        }
        out.sort();
        return Ok(out);
    }
    let text = std::fs::read_to_string(path).at(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let p = base.join(line);
        if !p.is_file() {
            return Err(Error::BadRow {
                path: path.to_path_buf(),
                row: i as u64 + 1,
                message: format!("no image file at {}", p.display()),
            });
        }
        out.push((line.to_string(), p));
    }
    Ok(out)
}

/// Image units that are chunks of a user's image list.
struct FileImages {
    units: Vec<(Vec<(String, PathBuf)>, FeatureKey)>,
}

impl ImageUnits for FileImages {
    fn count(&self) -> usize {
        self.units.len()
    }
    fn key(&self, unit: usize) -> &FeatureKey {
        &self.units[unit].1
    }
    fn load(&self, unit: usize) -> Result<(Vec<KeyedImage>, u64)> {
        let rows = self.units[unit]
            .0
            .iter()
            .map(|(k, p)| Ok((k.clone(), std::fs::read(p).at(p)?)))
            .collect::<Result<_>>()?;
        Ok((rows, 0))
    }
}

/// Embeds a user's images and/or texts into the feature cache (chunks already cached are
/// reused) and optionally exports them all to one file.
pub fn embed_user_inputs(
    identity: &ModelIdentity,
    device: &Device,
    workdir: &Path,
    inputs: &UserInputs,
    opts: &EmbedOptions,
) -> Result<UserSummary> {
    if inputs.images.is_none() && inputs.texts.is_none() {
        return Err(Error::Config(
            "give --images PATH and/or --texts FILE".into(),
        ));
    }
    let cache = FeatureCache::new(workdir);
    cache.sweep_temp()?;
    let mut summary = UserSummary::default();
    let mut image_units = Vec::new();
    let mut order: Vec<FeatureKey> = Vec::new();
    if let Some(images) = &inputs.images {
        let files = list_images(images)?;
        if files.is_empty() {
            return Err(Error::Config(format!(
                "no image files in {}",
                images.display()
            )));
        }
        for (i, chunk) in files.chunks(FILES_PER_ENTRY).enumerate() {
            let mut h = Sha256::new();
            for (key, path) in chunk {
                h.update(key.as_bytes());
                h.update([0]);
                h.update(sha256_file(path)?.as_bytes());
            }
            let source = format!("{}#{i}", images.display());
            let key = identity.key("image", &source, &hex::encode(h.finalize()), "image");
            order.push(key.clone());
            if needs_work(&cache, &key, &mut summary.embed)? {
                image_units.push((chunk.to_vec(), key));
            }
        }
    }
    let mut text_job = None;
    if let Some(texts) = &inputs.texts {
        let key = identity.key(
            "text",
            &texts.display().to_string(),
            &sha256_file(texts)?,
            "line",
        );
        order.push(key.clone());
        if needs_work(&cache, &key, &mut summary.embed)? {
            text_job = Some((texts.clone(), key));
        }
    }
    if !image_units.is_empty() || text_job.is_some() {
        let model = identity.load(device)?;
        summary.embed.model_loaded = true;
        if let Some((path, key)) = text_job {
            let text = std::fs::read_to_string(&path).at(&path)?;
            let lines: Vec<&str> = text.lines().collect();
            let keys: Vec<String> = (1..=lines.len()).map(|i| format!("line-{i}")).collect();
            embed_texts_into(&model, &cache, &key, &keys, &lines, opts.batch_size)?;
            summary.embed.texts += lines.len() as u64;
            summary.embed.computed += 1;
        }
        if !image_units.is_empty() {
            summary.embed.computed += image_units.len();
            let units = FileImages { units: image_units };
            let (images, skipped) =
                embed_images_into(&model, &cache, &units, opts, ImageOutput::Pooled)?;
            summary.embed.images += images;
            summary.embed.skipped += skipped;
        }
    }
    summary.entries = order.iter().map(|k| cache.get(k)).collect::<Result<_>>()?;
    if let Some(out) = &inputs.out {
        export(&summary.entries, out)?;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_end_at_each_unit_and_undecodable_images_go_to_the_writer() {
        // Units of 3, 1 and 4 images over 2 workers, in stream order; unit 2's second image
        // does not decode.
        let images: Vec<(usize, usize, bool)> = [(0, 3), (1, 1), (2, 4)]
            .into_iter()
            .flat_map(|(unit, n)| (0..n).map(move |row| (unit, row, !(unit == 2 && row == 1))))
            .collect();
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..2).map(|_| bounded::<Prepared>(16)).unzip();
        for (i, &(unit, row, ok)) in images.iter().enumerate() {
            let pixels = if ok {
                Ok(vec![i as u8; 2])
            } else {
                Err("bad".into())
            };
            txs[i % 2].send(Prepared { unit, row, pixels }).unwrap();
        }
        drop(txs);
        let (batch_tx, batch_rx) = bounded::<ByteBatch>(16);
        let (skip_tx, skip_rx) = bounded::<Embedded>(16);
        pack_batches(&rxs, batch_tx, skip_tx, 2);
        let got: Vec<_> = batch_rx.iter().map(|b| (b.rows, b.bytes)).collect();
        assert_eq!(
            got,
            [
                (vec![(0, 0), (0, 1)], vec![0, 0, 1, 1]),
                (vec![(0, 2)], vec![2, 2]),
                (vec![(1, 0)], vec![3, 3]),
                (vec![(2, 0)], vec![4, 4]),
                (vec![(2, 2), (2, 3)], vec![6, 6, 7, 7]),
            ]
        );
        let skipped: Vec<(usize, usize)> = skip_rx.iter().map(|(u, r, _)| (u, r)).collect();
        assert_eq!(skipped, [(2, 1)]);
    }
}
