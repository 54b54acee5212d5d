//! The content-addressed on-disk feature cache (Arrow IPC + manifest) under `cache/features-v1/`.
//!
//! An entry holds the embeddings of one column of one input (a shard's images or captions, a
//! user's image folder) under one model. Its name is the sha256 of everything that changes the
//! numbers — weights, preprocessing/tokenizer, input bytes, column, stored precision — so a
//! changed model or shard simply misses and unchanged work is never redone. Each entry is
//! `<digest>.arrow` (IPC file: `key: utf8`, `embedding: fixed_size_list<f32|f16, dim>`) plus
//! `<digest>.json` (its manifest), both written to temporary names and renamed, manifest last: an
//! entry without a manifest does not exist. The manifest records the file's size and sha256, so
//! a truncated or bit-flipped file is detected on lookup and recomputed. Reading maps the file
//! and decodes batches without copying.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, FixedSizeListArray, Float16Array, Float32Array, RecordBatch, StringArray,
};
use arrow::buffer::Buffer;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::ipc::reader::{read_footer_length, FileDecoder};
use arrow::ipc::writer::FileWriter;
use crossbeam_channel::{bounded, Receiver};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::shard::write_atomic;
use crate::error::{Error, IoContext, Result};

/// The cache's format version: part of its directory name, bumped when the layout changes.
pub const CACHE_VERSION: &str = "features-v1";

/// Precision of stored embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheDtype {
    F32,
    F16,
}

impl CacheDtype {
    fn arrow(self) -> DataType {
        match self {
            CacheDtype::F32 => DataType::Float32,
            CacheDtype::F16 => DataType::Float16,
        }
    }
}

/// Everything that identifies one cache entry. All fields but `model_id`, `model_revision`
/// and `source` (provenance, kept in the manifest) go into the digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureKey {
    /// Hub repo or local directory the model came from.
    pub model_id: String,
    /// Hub commit, or `local`.
    pub model_revision: String,
    /// sha256 of the weights file.
    pub weights_sha256: String,
    /// sha256 of the model's `config.json` (heads, EOS id, ... with the same weights).
    pub config_sha256: String,
    /// Precision the model ran in: `f32`, `f16` or `bf16`.
    pub compute_dtype: String,
    /// Fingerprint of the image preprocessing (images) or of the tokenizer (texts).
    pub preprocess: String,
    /// `image` or `text`.
    pub modality: String,
    /// The input, relative to the workdir (`data/cc/train/part-00000.parquet`).
    pub source: String,
    /// sha256 of the input's bytes.
    pub source_sha256: String,
    /// Which column of the input was embedded (`image`, `caption`, ...).
    pub column: String,
    pub dtype: CacheDtype,
    pub dim: usize,
}

impl FeatureKey {
    /// The content address: sha256 over the fields that change the numbers.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for part in [
            CACHE_VERSION,
            &self.weights_sha256,
            &self.config_sha256,
            &self.compute_dtype,
            &self.preprocess,
            &self.modality,
            &self.source_sha256,
            &self.column,
            match self.dtype {
                CacheDtype::F32 => "f32",
                CacheDtype::F16 => "f16",
            },
            &self.dim.to_string(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        hex::encode(h.finalize())
    }
}

/// The manifest of one entry, `<digest>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub digest: String,
    pub key: FeatureKey,
    pub rows: u64,
    pub file_bytes: u64,
    pub file_sha256: String,
}

/// A verified entry.
#[derive(Debug, Clone)]
pub struct FeatureEntry {
    pub path: PathBuf,
    pub manifest: Manifest,
}

/// Result of looking a key up.
#[derive(Debug)]
pub enum Lookup {
    Hit(Box<FeatureEntry>),
    Missing,
    /// The entry exists but does not verify; it must be recomputed.
    Corrupt {
        reason: String,
    },
}

/// The cache rooted at `<workdir>/cache/features-v1/`.
#[derive(Debug, Clone)]
pub struct FeatureCache {
    root: PathBuf,
}

impl FeatureCache {
    pub fn new(workdir: &Path) -> Self {
        Self {
            root: workdir.join("cache").join(CACHE_VERSION),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn paths(&self, digest: &str) -> (PathBuf, PathBuf) {
        let dir = self.root.join(&digest[..2]);
        (
            dir.join(format!("{digest}.arrow")),
            dir.join(format!("{digest}.json")),
        )
    }

    /// Removes temporary files left by killed runs (not those of a run still going).
    pub fn sweep_temp(&self) -> Result<()> {
        let Ok(dirs) = fs::read_dir(&self.root) else {
            return Ok(());
        };
        for dir in dirs {
            let dir = dir.at(&self.root)?.path();
            if !dir.is_dir() {
                continue;
            }
            for file in fs::read_dir(&dir).at(&dir)? {
                let path = file.at(&dir)?.path();
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if crate::data::shard::is_abandoned_temp(&name) {
                    fs::remove_file(&path).at(&path)?;
                }
            }
        }
        Ok(())
    }

    /// Finds and verifies the entry of `key` (size, sha256, Arrow footer, schema, row count).
    pub fn lookup(&self, key: &FeatureKey) -> Result<Lookup> {
        let digest = key.digest();
        let (data, meta) = self.paths(&digest);
        let Ok(bytes) = fs::read(&meta) else {
            return Ok(Lookup::Missing);
        };
        let manifest: Manifest = match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => {
                return Ok(Lookup::Corrupt {
                    reason: format!("{}: {e}", meta.display()),
                })
            }
        };
        let entry = FeatureEntry {
            path: data,
            manifest,
        };
        Ok(match entry.verify(key, &digest) {
            Ok(()) => Lookup::Hit(Box::new(entry)),
            Err(reason) => Lookup::Corrupt { reason },
        })
    }

    /// The verified entry of `key`, or an error saying how to produce it.
    pub fn get(&self, key: &FeatureKey) -> Result<FeatureEntry> {
        match self.lookup(key)? {
            Lookup::Hit(entry) => Ok(*entry),
            Lookup::Missing => Err(Error::Config(format!(
                "no cached {} features of {} ({}); run `pipeline run embed` first",
                key.modality, key.source, key.column
            ))),
            Lookup::Corrupt { reason } => Err(Error::Config(format!(
                "cached {} features of {} are corrupt ({reason}); re-run `pipeline run embed`",
                key.modality, key.source
            ))),
        }
    }

    /// A writer for a new entry of `key`; nothing is visible until [`FeatureWriter::finish`].
    pub fn writer(&self, key: &FeatureKey) -> Result<FeatureWriter> {
        let digest = key.digest();
        let (data, meta) = self.paths(&digest);
        let dir = data.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&dir).at(&dir)?;
        let tmp = dir.join(format!(".{digest}.arrow.tmp-{}", std::process::id()));
        let file = fs::File::create(&tmp).at(&tmp)?;
        let schema = feature_schema(key.dtype, key.dim);
        let mut ipc = FileWriter::try_new(
            HashingWriter {
                inner: BufWriter::with_capacity(1 << 20, file),
                hasher: Sha256::new(),
                bytes: 0,
            },
            &schema,
        )
        .map_err(|source| Error::Arrow {
            context: format!("creating {}", tmp.display()),
            source,
        })?;
        ipc.write_metadata(
            "prefcap.feature_key",
            serde_json::to_string(key).unwrap_or_default(),
        );
        Ok(FeatureWriter {
            key: key.clone(),
            digest,
            schema,
            ipc,
            tmp,
            data,
            meta,
            rows: 0,
        })
    }
}

/// The Arrow schema of an entry.
pub fn feature_schema(dtype: CacheDtype, dim: usize) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new(
            "embedding",
            DataType::FixedSizeList(
                Arc::new(Field::new("item", dtype.arrow(), false)),
                dim as i32,
            ),
            false,
        ),
    ]))
}

/// The rows of `keys` with their embeddings (`flat` is `keys.len() × dim`, row-major) as a batch.
pub fn feature_batch(
    schema: &SchemaRef,
    dtype: CacheDtype,
    dim: usize,
    keys: &[String],
    flat: &[f32],
) -> Result<RecordBatch> {
    if flat.len() != keys.len() * dim {
        return Err(Error::Stage {
            stage: "embed".into(),
            message: format!(
                "{} embedding values for {} keys of dimension {dim}",
                flat.len(),
                keys.len()
            ),
        });
    }
    let values: ArrayRef = match dtype {
        CacheDtype::F32 => Arc::new(Float32Array::from(flat.to_vec())),
        CacheDtype::F16 => Arc::new(
            flat.iter()
                .map(|&x| half::f16::from_f32(x))
                .collect::<Float16Array>(),
        ),
    };
    let item = Arc::new(Field::new("item", dtype.arrow(), false));
    let arrow_err = |source| Error::Arrow {
        context: "building a feature batch".into(),
        source,
    };
    let list = FixedSizeListArray::try_new(item, dim as i32, values, None).map_err(arrow_err)?;
    RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(
                keys.iter()
                    .map(|k| Some(k.as_str()))
                    .collect::<StringArray>(),
            ),
            Arc::new(list),
        ],
    )
    .map_err(arrow_err)
}

/// A `Write` that hashes and counts what passes through, so finishing an entry costs no re-read.
struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Streams rows into a new entry.
pub struct FeatureWriter {
    key: FeatureKey,
    digest: String,
    schema: SchemaRef,
    ipc: FileWriter<HashingWriter<BufWriter<fs::File>>>,
    tmp: PathBuf,
    data: PathBuf,
    meta: PathBuf,
    rows: u64,
}

impl FeatureWriter {
    /// Appends rows: `flat` holds `keys.len()` embeddings of the key's dimension, row-major.
    pub fn push(&mut self, keys: &[String], flat: &[f32]) -> Result<()> {
        let batch = feature_batch(&self.schema, self.key.dtype, self.key.dim, keys, flat)?;
        if batch.num_rows() > 0 {
            self.ipc.write(&batch).map_err(|source| Error::Arrow {
                context: format!("writing {}", self.tmp.display()),
                source,
            })?;
        }
        self.rows += keys.len() as u64;
        Ok(())
    }

    /// Seals the file, renames it into place and writes the manifest last.
    pub fn finish(mut self) -> Result<FeatureEntry> {
        let arrow_err = |source| Error::Arrow {
            context: format!("finishing {}", self.tmp.display()),
            source,
        };
        self.ipc.finish().map_err(arrow_err)?;
        let mut hashing = self.ipc.into_inner().map_err(arrow_err)?;
        hashing.flush().at(&self.tmp)?;
        let file = hashing
            .inner
            .into_inner()
            .map_err(|e| e.into_error())
            .at(&self.tmp)?;
        file.sync_all().at(&self.tmp)?;
        fs::rename(&self.tmp, &self.data).at(&self.data)?;
        let manifest = Manifest {
            format: CACHE_VERSION.into(),
            digest: self.digest,
            key: self.key,
            rows: self.rows,
            file_bytes: hashing.bytes,
            file_sha256: hex::encode(hashing.hasher.finalize()),
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::BadFile {
            path: self.meta.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&self.meta, &json)?;
        Ok(FeatureEntry {
            path: self.data,
            manifest,
        })
    }
}

impl FeatureEntry {
    /// Checks the entry against its key and its file; `Err` says what is wrong.
    fn verify(&self, key: &FeatureKey, digest: &str) -> std::result::Result<(), String> {
        let m = &self.manifest;
        if m.format != CACHE_VERSION || m.digest != digest || m.key.digest() != digest {
            return Err("the manifest does not belong to this key".into());
        }
        if m.key.dim != key.dim || m.key.dtype != key.dtype {
            return Err("the manifest's dimension or dtype differs".into());
        }
        let bytes = fs::read(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
        if bytes.len() as u64 != m.file_bytes {
            return Err(format!(
                "{} has {} bytes, the manifest says {}",
                self.path.display(),
                bytes.len(),
                m.file_bytes
            ));
        }
        if hex::encode(Sha256::digest(&bytes)) != m.file_sha256 {
            return Err(format!("{} does not match its sha256", self.path.display()));
        }
        let rows: usize = decode_all(Buffer::from_vec(bytes), &self.path)
            .map_err(|e| e.to_string())?
            .iter()
            .map(RecordBatch::num_rows)
            .sum();
        if rows as u64 != m.rows {
            return Err(format!("{} rows, the manifest says {}", rows, m.rows));
        }
        Ok(())
    }

    /// Maps the file and decodes its batches without copying the data.
    pub fn open(&self) -> Result<FeatureTable> {
        let file = fs::File::open(&self.path).at(&self.path)?;
        // SAFETY: cache files are written once under a temporary name and renamed into place;
        // nothing writes to a published entry, so the mapping does not change under us.
        let map = unsafe { memmap2::Mmap::map(&file) }.at(&self.path)?;
        let buffer = if map.is_empty() {
            Buffer::from_vec(Vec::<u8>::new())
        } else {
            let ptr = NonNull::new(map.as_ptr() as *mut u8).ok_or_else(|| Error::BadFile {
                path: self.path.clone(),
                message: "empty mapping".into(),
            })?;
            let len = map.len();
            // SAFETY: `ptr` points at `len` bytes owned by `map`, which the buffer keeps alive.
            unsafe { Buffer::from_custom_allocation(ptr, len, Arc::new(map)) }
        };
        let batches = decode_all(buffer, &self.path)?;
        Ok(FeatureTable {
            dim: self.manifest.key.dim,
            batches,
        })
    }
}

/// Decodes every record batch of an Arrow IPC file held in `buffer`.
fn decode_all(buffer: Buffer, path: &Path) -> Result<Vec<RecordBatch>> {
    let bad = |message: String| Error::BadFile {
        path: path.to_path_buf(),
        message,
    };
    if buffer.len() < 10 {
        return Err(bad("too short for an Arrow IPC file".into()));
    }
    let trailer = buffer.len() - 10;
    let footer_len = read_footer_length(
        buffer[trailer..]
            .try_into()
            .map_err(|_| bad("bad trailer".into()))?,
    )
    .map_err(|e| bad(e.to_string()))?;
    if footer_len > trailer {
        return Err(bad("footer length exceeds the file".into()));
    }
    let footer = arrow::ipc::root_as_footer(&buffer[trailer - footer_len..trailer])
        .map_err(|e| bad(format!("unreadable footer: {e}")))?;
    let schema = footer
        .schema()
        .ok_or_else(|| bad("no schema in the footer".into()))
        .and_then(|s| arrow::ipc::convert::try_fb_to_schema(s).map_err(|e| bad(e.to_string())))?;
    let expected = ["key", "embedding"];
    if schema.fields().len() != 2
        || schema
            .fields()
            .iter()
            .zip(expected)
            .any(|(f, n)| f.name() != n)
    {
        return Err(bad(format!(
            "not a feature file: columns {:?}",
            schema.fields().iter().map(|f| f.name()).collect::<Vec<_>>()
        )));
    }
    let decoder = FileDecoder::new(Arc::new(schema), footer.version());
    let mut out = Vec::new();
    for block in footer.recordBatches().into_iter().flatten() {
        let len = block.bodyLength() as usize + block.metaDataLength() as usize;
        let start = block.offset() as usize;
        if start.checked_add(len).is_none_or(|end| end > trailer) {
            return Err(bad("a record batch lies outside the file".into()));
        }
        let data = buffer.slice_with_length(start, len);
        if let Some(batch) = decoder
            .read_record_batch(block, &data)
            .map_err(|e| bad(e.to_string()))?
        {
            out.push(batch);
        }
    }
    Ok(out)
}

/// The decoded (memory-mapped) contents of one entry.
#[derive(Debug, Clone)]
pub struct FeatureTable {
    pub dim: usize,
    pub batches: Vec<RecordBatch>,
}

impl FeatureTable {
    pub fn rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }

    /// Keys in row order.
    pub fn keys(&self) -> Vec<String> {
        self.batches.iter().flat_map(batch_keys).collect()
    }

    /// All embeddings as f32, row-major (`rows × dim`).
    pub fn embeddings(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows() * self.dim);
        for b in &self.batches {
            out.extend_from_slice(&batch_embeddings(b));
        }
        out
    }
}

/// The keys of one feature batch.
pub fn batch_keys(batch: &RecordBatch) -> Vec<String> {
    batch
        .column(0)
        .as_any()
        .downcast_ref::<StringArray>()
        .map(|a| {
            a.iter()
                .map(|k| k.unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The embeddings of one feature batch as f32, row-major. Borrowed when stored as f32.
pub fn batch_embeddings(batch: &RecordBatch) -> std::borrow::Cow<'_, [f32]> {
    let Some(list) = batch
        .column(1)
        .as_any()
        .downcast_ref::<FixedSizeListArray>()
    else {
        return std::borrow::Cow::Owned(Vec::new());
    };
    let dim = list.value_length() as usize;
    let values = list.values();
    let (start, len) = (list.offset() * dim, list.len() * dim);
    if let Some(f) = values.as_any().downcast_ref::<Float32Array>() {
        std::borrow::Cow::Borrowed(&f.values()[start..start + len])
    } else if let Some(h) = values.as_any().downcast_ref::<Float16Array>() {
        std::borrow::Cow::Owned(
            h.values()[start..start + len]
                .iter()
                .map(|x| x.to_f32())
                .collect(),
        )
    } else {
        std::borrow::Cow::Owned(Vec::new())
    }
}

/// Streams the batches of `entries`, in order, over a bounded channel from a reader thread, so
/// a trainer computes while the next file is mapped and decoded. Dropping the receiver stops
/// the reader.
pub fn stream_batches(
    entries: Vec<FeatureEntry>,
    capacity: usize,
) -> Receiver<Result<RecordBatch>> {
    let (tx, rx) = bounded(capacity.max(1));
    std::thread::spawn(move || {
        for entry in entries {
            match entry.open() {
                Ok(table) => {
                    for batch in table.batches {
                        if tx.send(Ok(batch)).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(source_sha: &str, dtype: CacheDtype) -> FeatureKey {
        FeatureKey {
            model_id: "m".into(),
            model_revision: "local".into(),
            weights_sha256: "w".into(),
            config_sha256: "c".into(),
            compute_dtype: "f32".into(),
            preprocess: "p".into(),
            modality: "image".into(),
            source: "data/x/train/part-00000.parquet".into(),
            source_sha256: source_sha.into(),
            column: "image".into(),
            dtype,
            dim: 3,
        }
    }

    fn write(cache: &FeatureCache, k: &FeatureKey, rows: usize) -> FeatureEntry {
        let mut w = cache.writer(k).unwrap();
        let keys: Vec<String> = (0..rows).map(|i| format!("k{i}")).collect();
        let flat: Vec<f32> = (0..rows * 3).map(|i| i as f32 * 0.5).collect();
        w.push(&keys[..rows / 2], &flat[..rows / 2 * 3]).unwrap();
        w.push(&keys[rows / 2..], &flat[rows / 2 * 3..]).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn digest_ignores_provenance_but_not_numbers() {
        let a = key("s", CacheDtype::F32);
        let mut b = a.clone();
        b.model_id = "elsewhere".into();
        b.source = "moved.parquet".into();
        assert_eq!(a.digest(), b.digest());
        for change in [
            |k: &mut FeatureKey| k.weights_sha256.push('x'),
            |k: &mut FeatureKey| k.config_sha256.push('x'),
            |k: &mut FeatureKey| k.compute_dtype = "bf16".into(),
            |k: &mut FeatureKey| k.preprocess.push('x'),
            |k: &mut FeatureKey| k.source_sha256.push('x'),
            |k: &mut FeatureKey| k.column.push('x'),
            |k: &mut FeatureKey| k.dtype = CacheDtype::F16,
            |k: &mut FeatureKey| k.dim = 4,
        ] {
            let mut c = a.clone();
            change(&mut c);
            assert_ne!(a.digest(), c.digest());
        }
    }

    #[test]
    fn written_entry_is_a_hit_and_reads_back_zero_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = FeatureCache::new(tmp.path());
        let k = key("s", CacheDtype::F32);
        assert!(matches!(cache.lookup(&k).unwrap(), Lookup::Missing));
        write(&cache, &k, 6);
        let Lookup::Hit(entry) = cache.lookup(&k).unwrap() else {
            panic!("expected a hit")
        };
        assert_eq!(entry.manifest.rows, 6);
        let table = entry.open().unwrap();
        assert_eq!(
            table.keys(),
            (0..6).map(|i| format!("k{i}")).collect::<Vec<_>>()
        );
        assert_eq!(
            table.embeddings(),
            (0..18).map(|i| i as f32 * 0.5).collect::<Vec<_>>()
        );
        assert!(matches!(
            batch_embeddings(&table.batches[0]),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn f16_entries_round_to_half_precision() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = FeatureCache::new(tmp.path());
        let k = key("s", CacheDtype::F16);
        let entry = write(&cache, &k, 4);
        let got = entry.open().unwrap().embeddings();
        let want: Vec<f32> = (0..12)
            .map(|i| half::f16::from_f32(i as f32 * 0.5).to_f32())
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn truncated_flipped_or_missing_files_are_corrupt() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = FeatureCache::new(tmp.path());
        let k = key("s", CacheDtype::F32);
        let entry = write(&cache, &k, 8);
        let good = fs::read(&entry.path).unwrap();
        fs::write(&entry.path, &good[..good.len() - 7]).unwrap();
        assert!(matches!(cache.lookup(&k).unwrap(), Lookup::Corrupt { .. }));
        let mut flipped = good.clone();
        flipped[good.len() / 2] ^= 0x40;
        fs::write(&entry.path, &flipped).unwrap();
        let Lookup::Corrupt { reason } = cache.lookup(&k).unwrap() else {
            panic!("bit flip not detected")
        };
        assert!(reason.contains("sha256"), "{reason}");
        fs::remove_file(&entry.path).unwrap();
        assert!(matches!(cache.lookup(&k).unwrap(), Lookup::Corrupt { .. }));
        fs::write(entry.path.with_extension("json"), b"{not json").unwrap();
        assert!(matches!(cache.lookup(&k).unwrap(), Lookup::Corrupt { .. }));
    }

    #[test]
    fn unfinished_writer_leaves_nothing_visible_and_temp_files_are_swept() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = FeatureCache::new(tmp.path());
        let k = key("s", CacheDtype::F32);
        let mut w = cache.writer(&k).unwrap();
        w.push(&["a".into()], &[1.0, 2.0, 3.0]).unwrap();
        drop(w);
        assert!(matches!(cache.lookup(&k).unwrap(), Lookup::Missing));
        // Another live process's temporary file (pid 1 always runs) stays; a dead one's goes.
        let dir = walk(cache.root())[0].parent().unwrap().to_path_buf();
        let (live, dead) = (
            dir.join(".x.arrow.tmp-1"),
            dir.join(".y.arrow.tmp-4294967294"),
        );
        fs::write(&live, b"busy").unwrap();
        fs::write(&dead, b"left").unwrap();
        cache.sweep_temp().unwrap();
        let left: Vec<_> = walk(cache.root());
        assert_eq!(left, [live]);
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
        out
    }

    #[test]
    fn wrong_length_push_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = FeatureCache::new(tmp.path());
        let mut w = cache.writer(&key("s", CacheDtype::F32)).unwrap();
        assert!(w.push(&["a".into()], &[1.0, 2.0]).is_err());
    }

    #[test]
    fn batches_stream_in_order_over_a_bounded_channel() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = FeatureCache::new(tmp.path());
        let a = write(&cache, &key("a", CacheDtype::F32), 4);
        let b = write(&cache, &key("b", CacheDtype::F32), 6);
        let rx = stream_batches(vec![a, b], 1);
        let rows: Vec<usize> = rx.iter().map(|b| b.unwrap().num_rows()).collect();
        assert_eq!(rows, vec![2, 2, 3, 3]);
    }
}
