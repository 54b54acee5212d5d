//! CLIP feature entries in the content-addressed cache (`cache/features-v1/`).
//!
//! An entry holds the embeddings of one column of one input (a shard's images or captions, a
//! user's image folder) under one model. Its digest covers everything that changes the
//! numbers — weights, preprocessing/tokenizer, input bytes, column, stored precision — so a
//! changed model or shard simply misses and unchanged work is never redone. The data file is
//! Arrow IPC (`key: utf8`, `embedding: fixed_size_list<f32|f16, dim>`); writing, manifests and
//! integrity checks are the cache's ([`crate::data::cache`]). Reading maps the file and
//! decodes batches without copying.

use std::fs;
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
use serde::{Deserialize, Serialize};

use crate::data::cache::{digest_of, CacheEntry, ContentCache, EntryWriter};
use crate::error::{Error, IoContext, Result};
use crate::io::AtomicFile;

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
        let dim = self.dim.to_string();
        digest_of(
            [
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
                &dim,
            ]
            .map(str::as_bytes),
        )
    }
}

/// The manifest of a feature entry.
pub type Manifest = crate::data::cache::Manifest<FeatureKey>;
/// A verified feature entry.
pub type FeatureEntry = CacheEntry<FeatureKey>;
/// Result of looking a feature key up.
pub type Lookup = crate::data::cache::Lookup<FeatureKey>;

/// The feature bucket of the cache, `<workdir>/cache/features-v1/`.
#[derive(Debug, Clone)]
pub struct FeatureCache {
    cache: ContentCache,
}

impl FeatureCache {
    pub fn new(workdir: &Path) -> Self {
        Self {
            cache: ContentCache::new(workdir, CACHE_VERSION, "arrow"),
        }
    }

    pub fn root(&self) -> &Path {
        self.cache.root()
    }

    /// Removes temporary files left by killed runs (not those of a run still going).
    pub fn sweep_temp(&self) -> Result<()> {
        self.cache.sweep_temp()
    }

    /// The files of `key`'s entry: its data file and its manifest (written last).
    pub fn files(&self, key: &FeatureKey) -> [PathBuf; 2] {
        let (data, manifest) = self.cache.paths(&key.digest());
        [data, manifest]
    }

    /// Finds and verifies the entry of `key`: the cache's checks (size, sha256), then the
    /// manifest's key, dimension and dtype, the Arrow footer, schema and row count.
    pub fn lookup(&self, key: &FeatureKey) -> Result<Lookup> {
        let digest = key.digest();
        let path = self.cache.paths(&digest).0;
        self.cache.lookup(&digest, |m: &Manifest, bytes| {
            if m.key.digest() != digest {
                return Err("the manifest does not belong to this key".into());
            }
            if m.key.dim != key.dim || m.key.dtype != key.dtype {
                return Err("the manifest's dimension or dtype differs".into());
            }
            let rows: usize = decode_all(Buffer::from_vec(bytes), &path)
                .map_err(|e| e.to_string())?
                .iter()
                .map(RecordBatch::num_rows)
                .sum();
            if rows as u64 != m.rows {
                return Err(format!("{} rows, the manifest says {}", rows, m.rows));
            }
            Ok(())
        })
    }

    /// The verified entry of `key`, or an error saying how to produce it.
    pub fn get(&self, key: &FeatureKey) -> Result<FeatureEntry> {
        match self.lookup(key)? {
            Lookup::Hit(entry) => Ok(*entry),
            Lookup::Missing => Err(Error::Config(format!(
                "no cached {} features of {} ({}); run `pipeline run embed` first{}",
                key.modality,
                key.source,
                key.column,
                if key.modality == "image_tokens" {
                    " with embed.image_tokens = true"
                } else {
                    ""
                }
            ))),
            Lookup::Corrupt { reason } => Err(Error::Config(format!(
                "cached {} features of {} are corrupt ({reason}); re-run `pipeline run embed`",
                key.modality, key.source
            ))),
        }
    }

    /// A writer for a new entry of `key`; nothing is visible until [`FeatureWriter::finish`].
    pub fn writer(&self, key: &FeatureKey) -> Result<FeatureWriter> {
        let entry = self.cache.writer(&key.digest())?;
        let path = entry.path().to_path_buf();
        let schema = feature_schema(key.dtype, key.dim);
        let mut ipc = FileWriter::try_new(entry, &schema).map_err(|source| Error::Arrow {
            context: format!("creating {}", path.display()),
            source,
        })?;
        ipc.write_metadata(
            "prefcap.feature_key",
            serde_json::to_string(key).unwrap_or_default(),
        );
        Ok(FeatureWriter {
            key: key.clone(),
            schema,
            ipc,
            path,
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
        return Err(Error::Invalid(format!(
            "{} embedding values for {} keys of dimension {dim}",
            flat.len(),
            keys.len()
        )));
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

/// Streams rows into a new entry.
pub struct FeatureWriter {
    key: FeatureKey,
    schema: SchemaRef,
    ipc: FileWriter<EntryWriter>,
    path: std::path::PathBuf,
    rows: u64,
}

impl FeatureWriter {
    /// Appends rows: `flat` holds `keys.len()` embeddings of the key's dimension, row-major.
    pub fn push(&mut self, keys: &[String], flat: &[f32]) -> Result<()> {
        let batch = feature_batch(&self.schema, self.key.dtype, self.key.dim, keys, flat)?;
        if batch.num_rows() > 0 {
            self.ipc.write(&batch).map_err(|source| Error::Arrow {
                context: format!("writing {}", self.path.display()),
                source,
            })?;
        }
        self.rows += keys.len() as u64;
        Ok(())
    }

    /// Seals the file; the cache renames it into place and writes the manifest last.
    pub fn finish(mut self) -> Result<FeatureEntry> {
        let arrow_err = |source| Error::Arrow {
            context: format!("finishing {}", self.path.display()),
            source,
        };
        self.ipc.finish().map_err(arrow_err)?;
        let entry = self.ipc.into_inner().map_err(arrow_err)?;
        entry.finish(self.key, self.rows)
    }
}

impl FeatureEntry {
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

/// Writes the rows of `entries` to `out` as one table `modality, key, embedding`
/// (fixed-size list of f32): Parquet for `.parquet`, Arrow IPC otherwise. Both open in
/// pyarrow and polars; `np.stack(table["embedding"].to_numpy(zero_copy_only=False))` gives
/// the matrix.
pub fn export(entries: &[FeatureEntry], out: &Path) -> Result<u64> {
    let dim = entries.first().map_or(0, |e| e.manifest.key.dim);
    if entries.iter().any(|e| e.manifest.key.dim != dim) {
        return Err(Error::Config(
            "cannot export entries of different dimensions into one file".into(),
        ));
    }
    let feature_schema = feature_schema(CacheDtype::F32, dim);
    let schema = Arc::new(Schema::new(vec![
        Field::new("modality", DataType::Utf8, false),
        feature_schema.field(0).clone(),
        feature_schema.field(1).clone(),
    ]));
    let mut batches = Vec::new();
    for entry in entries {
        let table = entry.open()?;
        for b in &table.batches {
            let keys = batch_keys(b);
            let emb = batch_embeddings(b);
            let fb = feature_batch(&feature_schema, CacheDtype::F32, dim, &keys, &emb)?;
            let modality =
                StringArray::from(vec![entry.manifest.key.modality.as_str(); b.num_rows()]);
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(modality),
                    fb.column(0).clone(),
                    fb.column(1).clone(),
                ],
            )
            .map_err(|source| Error::Arrow {
                context: "building the export table".into(),
                source,
            })?;
            batches.push(batch);
        }
    }
    let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
    let mut file = AtomicFile::create(out)?;
    let is_parquet = out.extension().is_some_and(|e| e == "parquet");
    if is_parquet {
        let perr = |source| Error::Parquet {
            path: out.to_path_buf(),
            source,
        };
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut file, schema, None).map_err(perr)?;
        for b in &batches {
            w.write(b).map_err(perr)?;
        }
        w.close().map_err(perr)?;
    } else {
        let aerr = |source| Error::Arrow {
            context: format!("writing {}", out.display()),
            source,
        };
        let mut w = arrow::ipc::writer::FileWriter::try_new(&mut file, &schema).map_err(aerr)?;
        for b in &batches {
            w.write(b).map_err(aerr)?;
        }
        w.finish().map_err(aerr)?;
    }
    file.commit()?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

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
        assert_eq!(
            walk(cache.root()),
            Vec::<PathBuf>::new(),
            "a dropped writer removes its temporary file"
        );
        // What a killed process leaves: another live process's temporary file (pid 1 always
        // runs) stays; a dead one's goes.
        let dir = cache.root().join(&k.digest()[..2]);
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
}
