//! Parquet shards on disk: `data/<dataset>/<split>/part-NNNNN.parquet` plus a
//! `part-NNNNN.stats.json` written after it. The one shard writer every stage uses.
//!
//! Both files are written to a temporary name and renamed into place, and the stats file
//! goes last, so a shard counts as finished only when its stats file exists: a process
//! killed at any point leaves no partial shard visible, and a re-run redoes exactly the
//! unfinished shards.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::data::record::{read_column, Record};
use crate::data::records::{story_frame_key, SampleStatus};
use crate::data::store::Root;
use crate::error::{Error, IoContext, Result};
use crate::io::AtomicFile;

/// Per-shard summary written beside each Parquet shard.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardStats {
    pub shard: u32,
    /// Rows in the shard.
    pub count: u64,
    pub successes: u64,
    /// Failed rows by cause (the `status` column's values).
    pub failures: BTreeMap<String, u64>,
    /// Wall time spent producing this shard (for a retried shard: the retry's time).
    pub duration_secs: f64,
    /// Where the rows came from (input file, hub repo@revision).
    pub source: String,
    /// Size of the Parquet file in bytes (set by [`ShardSet::write`]; 0 in stats written
    /// before it was recorded), so a marker whose shard was replaced or cut short is caught.
    #[serde(default)]
    pub bytes: u64,
}

impl ShardStats {
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }
}

/// Serialises `rows` as one Parquet file (snappy), atomically.
pub fn write_parquet<R: Record>(path: &Path, rows: &[R]) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    write_parquet_to(&mut file, rows, path)?;
    file.commit()
}

/// How every shard is written (snappy, row groups of 1024 rows), locally or to an object store.
pub fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(1024))
        .build()
}

/// Serialises `rows` as one Parquet file (snappy) into `out`; `path` names it in errors.
pub fn write_parquet_to<R: Record>(out: impl Write + Send, rows: &[R], path: &Path) -> Result<()> {
    let batch = R::to_batch(rows)?;
    let props = writer_properties();
    let perr = |source| Error::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let mut writer = ArrowWriter::try_new(out, R::schema(), Some(props)).map_err(perr)?;
    writer.write(&batch).map_err(perr)?;
    writer.close().map_err(perr)?;
    Ok(())
}

/// Streams the record batches of any Parquet file (a shard, or a file from the hub); errors
/// name the file. Memory stays bounded by one row group at a time.
pub fn read_batches(path: &Path) -> Result<impl Iterator<Item = Result<RecordBatch>>> {
    let file = fs::File::open(path).at(path)?;
    let perr = |source| Error::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(perr)?
        .build()
        .map_err(perr)?;
    let path = path.to_path_buf();
    Ok(reader.map(move |batch| {
        batch.map_err(|source| Error::Arrow {
            context: format!("reading {}", path.display()),
            source,
        })
    }))
}

/// The record batches of only the named columns of a Parquet file (columns it lacks are
/// left out); errors name the file.
pub fn read_columns(path: &Path, names: &[&str]) -> Result<Vec<RecordBatch>> {
    let file = fs::File::open(path).at(path)?;
    let perr = |source| Error::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(perr)?;
    let mask = ProjectionMask::columns(builder.parquet_schema(), names.iter().copied());
    let reader = builder.with_projection(mask).build().map_err(perr)?;
    reader
        .map(|batch| {
            batch.map_err(|source| Error::Arrow {
                context: format!("reading {}", path.display()),
                source,
            })
        })
        .collect()
}

/// Reads every row of a Parquet file written with `R`'s schema.
/// A truncated or foreign file gives an error naming the file.
pub fn read_parquet<R: Record>(path: &Path) -> Result<Vec<R>> {
    let mut rows = Vec::new();
    for batch in read_batches(path)? {
        rows.extend(R::from_batch(&batch?, path)?);
    }
    Ok(rows)
}

/// The shards of one dataset split: `data/<dataset>/<split>/` in a workdir, local or in an
/// object store ([`Root`]). Local readers get paths ([`ShardSet::finished_paths`]); everything
/// the writers and the job ledger need goes through the root, alike for both.
#[derive(Debug, Clone)]
pub struct ShardSet {
    /// The local directory (for an object-store workdir: where a local copy would go).
    dir: PathBuf,
    root: Root,
    /// `data/<dataset>/<split>`.
    rel: String,
}

impl ShardSet {
    /// The set in the local workdir `workdir`.
    pub fn new(workdir: &Path, dataset: &str, split: &str) -> Self {
        Self::in_root(&Root::Local(workdir.to_path_buf()), workdir, dataset, split)
    }

    /// The set in `root`; `workdir` is the local directory beside it.
    pub fn in_root(root: &Root, workdir: &Path, dataset: &str, split: &str) -> Self {
        Self {
            dir: workdir.join("data").join(dataset).join(split),
            root: root.clone(),
            rel: format!("data/{dataset}/{split}"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `data/<dataset>/<split>`, as the job ledger names the set.
    pub fn rel(&self) -> &str {
        &self.rel
    }

    pub fn parquet_path(&self, shard: u32) -> PathBuf {
        self.dir.join(parquet_name(shard))
    }

    pub fn stats_path(&self, shard: u32) -> PathBuf {
        self.dir.join(stats_name(shard))
    }

    fn key(&self, name: &str) -> String {
        format!("{}/{name}", self.rel)
    }

    /// Where shard `shard`'s Parquet file is, as a user finds it (a path or a URL).
    pub fn display(&self, shard: u32) -> String {
        self.root.display(&self.key(&parquet_name(shard)))
    }

    /// Creates the directory and removes temporary files a killed run left behind (not those
    /// of a run still going).
    pub fn prepare(&self) -> Result<()> {
        self.root.sweep(&self.rel)
    }

    /// A shard is finished when its stats file (written last) exists.
    pub fn is_finished(&self, shard: u32) -> bool {
        let there = |name: String| matches!(self.root.size(&self.key(&name)), Ok(Some(_)));
        there(stats_name(shard)) && there(parquet_name(shard))
    }

    /// Indices of finished shards, ascending.
    pub fn finished(&self) -> Result<Vec<u32>> {
        let files = self.root.list(&self.rel)?;
        let names: std::collections::HashSet<&str> =
            files.iter().map(|(n, _)| n.as_str()).collect();
        let mut out: Vec<u32> = files
            .iter()
            .filter_map(|(name, _)| {
                name.strip_prefix("part-")
                    .and_then(|r| r.strip_suffix(".stats.json"))
                    .and_then(|n| n.parse::<u32>().ok())
            })
            .filter(|&i| names.contains(parquet_name(i).as_str()))
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// Paths of the finished shards, ascending (a local workdir's).
    pub fn finished_paths(&self) -> Result<Vec<PathBuf>> {
        Ok(self
            .finished()?
            .into_iter()
            .map(|s| self.parquet_path(s))
            .collect())
    }

    /// Writes shard `shard`: the Parquet file, then its stats (recording the file's size),
    /// created only if absent. A shard being rewritten stops counting as finished first, so a
    /// kill in between cannot pair new rows with old stats; a stats file that appears in the
    /// meantime means another worker claimed the shard, and is an error naming it.
    pub fn write<R: Record>(&self, shard: u32, rows: &[R], stats: &ShardStats) -> Result<()> {
        let stats_key = self.key(&stats_name(shard));
        self.root.delete(&stats_key)?;
        let bytes = match &self.root {
            Root::Local(_) => {
                std::fs::create_dir_all(&self.dir).at(&self.dir)?;
                let parquet = self.parquet_path(shard);
                write_parquet(&parquet, rows)?;
                fs::metadata(&parquet).at(&parquet)?.len()
            }
            Root::Remote(store) => store.write_parquet(
                &self.key(&parquet_name(shard)),
                &R::to_batch(rows)?,
                writer_properties(),
            )?,
        };
        let stats = ShardStats {
            bytes,
            ..stats.clone()
        };
        let json = serde_json::to_vec_pretty(&stats).map_err(|e| Error::BadFile {
            path: self.stats_path(shard),
            message: e.to_string(),
        })?;
        if !self.root.put_new(&stats_key, &json)? {
            return Err(Error::Invalid(format!(
                "{}: another process finished this shard while this one wrote it (two workers \
                 with the same --worker-index?)",
                self.root.display(&stats_key)
            )));
        }
        Ok(())
    }

    /// A local file holding shard `shard`: its own path in a local workdir; from an object
    /// store, a copy at that path, fetched unless one of the size its stats record is there.
    /// Returns the path and whether it was fetched.
    pub fn local_copy(&self, shard: u32) -> Result<(PathBuf, bool)> {
        let path = self.parquet_path(shard);
        let Root::Remote(_) = &self.root else {
            return Ok((path, false));
        };
        let expected = self.read_stats(shard)?.bytes;
        if fs::metadata(&path).is_ok_and(|m| expected > 0 && m.len() == expected) {
            return Ok((path, false));
        }
        let key = self.key(&parquet_name(shard));
        let bytes = self.root.read(&key)?.ok_or_else(|| Error::BadFile {
            path: PathBuf::from(self.root.display(&key)),
            message: "its stats are there but the shard is not".into(),
        })?;
        if expected > 0 && bytes.len() as u64 != expected {
            return Err(Error::BadFile {
                path: PathBuf::from(self.root.display(&key)),
                message: format!("{} bytes, its stats say {expected}", bytes.len()),
            });
        }
        fs::create_dir_all(&self.dir).at(&self.dir)?;
        crate::io::write_atomic(&path, &bytes)?;
        Ok((path, true))
    }

    /// Removes shard `shard` (stats first: without them it stops counting as finished at once).
    pub fn remove(&self, shard: u32) -> Result<()> {
        self.root.delete(&self.key(&stats_name(shard)))?;
        self.root.delete(&self.key(&parquet_name(shard)))
    }

    pub fn read<R: Record>(&self, shard: u32) -> Result<Vec<R>> {
        match &self.root {
            Root::Local(_) => read_parquet(&self.parquet_path(shard)),
            Root::Remote(_) => {
                let key = self.key(&parquet_name(shard));
                let bytes = self.root.read(&key)?.ok_or_else(|| Error::BadFile {
                    path: PathBuf::from(self.root.display(&key)),
                    message: "no such object".into(),
                })?;
                let path = PathBuf::from(self.root.display(&key));
                let perr = |source| Error::Parquet {
                    path: path.clone(),
                    source,
                };
                let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
                    .map_err(perr)?
                    .build()
                    .map_err(perr)?;
                let mut rows = Vec::new();
                for batch in reader {
                    let batch = batch.map_err(|source| Error::Arrow {
                        context: format!("reading {}", path.display()),
                        source,
                    })?;
                    rows.extend(R::from_batch(&batch, &path)?);
                }
                Ok(rows)
            }
        }
    }

    pub fn read_stats(&self, shard: u32) -> Result<ShardStats> {
        let key = self.key(&stats_name(shard));
        let path = PathBuf::from(self.root.display(&key));
        let bytes = self.root.read(&key)?.ok_or_else(|| Error::BadFile {
            path: path.clone(),
            message: "no such file".into(),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| Error::BadFile {
            path,
            message: e.to_string(),
        })
    }

    /// All rows of all finished shards, in shard order.
    pub fn read_all<R: Record>(&self) -> Result<Vec<R>> {
        let mut rows = Vec::new();
        for shard in self.finished()? {
            rows.extend(self.read::<R>(shard)?);
        }
        Ok(rows)
    }
}

fn parquet_name(shard: u32) -> String {
    format!("part-{shard:05}.parquet")
}

fn stats_name(shard: u32) -> String {
    format!("part-{shard:05}.stats.json")
}

/// What an ingest shard holds: image–caption samples or story frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardKind {
    ImageText,
    Story,
}

impl ShardKind {
    /// The kind of the shard at `path`, from its schema (a `story_id` column: story frames).
    pub fn of(path: &Path) -> Result<Self> {
        let file = fs::File::open(path).at(path)?;
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(file).map_err(|source| Error::Parquet {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(if builder.schema().field_with_name("story_id").is_ok() {
            ShardKind::Story
        } else {
            ShardKind::ImageText
        })
    }
}

/// `(key, caption)` of the samples of an ingest shard that have an image (image–caption
/// samples whose download succeeded, every story frame), reading no image bytes; and the
/// number of samples left out.
pub fn shard_captions(path: &Path) -> Result<(Vec<(String, String)>, u64)> {
    let story = ShardKind::of(path)? == ShardKind::Story;
    let columns: &[&str] = if story {
        &["story_id", "frame_index", "caption"]
    } else {
        &["key", "status", "caption"]
    };
    let mut rows = Vec::new();
    let mut skipped = 0u64;
    for batch in read_columns(path, columns)? {
        let captions = read_column::<String>(&batch, "caption", path)?;
        if story {
            let stories = read_column::<String>(&batch, "story_id", path)?;
            let frames = read_column::<i32>(&batch, "frame_index", path)?;
            for ((s, f), c) in stories.iter().zip(frames).zip(captions) {
                rows.push((story_frame_key(s, f), c));
            }
            continue;
        }
        let keys = read_column::<String>(&batch, "key", path)?;
        let status = read_column::<SampleStatus>(&batch, "status", path)?;
        for ((k, s), c) in keys.into_iter().zip(status).zip(captions) {
            if s.is_success() {
                rows.push((k, c));
            } else {
                skipped += 1;
            }
        }
    }
    Ok((rows, skipped))
}

/// A sample key and its encoded image.
pub type KeyedImage = (String, Vec<u8>);

/// `(key, encoded image)` of the samples of an ingest shard that have an image, and the
/// number of samples without one (failed downloads).
pub fn shard_images(path: &Path) -> Result<(Vec<KeyedImage>, u64)> {
    if ShardKind::of(path)? == ShardKind::Story {
        let frames: Vec<crate::data::records::StoryFrame> = read_parquet(path)?;
        return Ok((frames.into_iter().map(|f| (f.key(), f.image)).collect(), 0));
    }
    let samples: Vec<crate::data::records::ImageTextSample> = read_parquet(path)?;
    let total = samples.len() as u64;
    let rows: Vec<KeyedImage> = samples
        .into_iter()
        .filter(|s| s.status.is_success())
        .filter_map(|s| s.image.map(|image| (s.key, image)))
        .collect();
    let kept = rows.len() as u64;
    Ok((rows, total - kept))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::records::PreferencePair;

    fn pair(i: usize) -> PreferencePair {
        PreferencePair {
            pair_id: format!("p{i}"),
            source: "test".into(),
            prompt: "q".into(),
            chosen: "good".into(),
            rejected: "bad".into(),
            score_chosen: 2.0,
            score_rejected: 1.0,
            image_key: Some(format!("{i:09}")),
        }
    }

    #[test]
    fn written_shard_reads_back_and_counts_as_finished() {
        let tmp = tempfile::tempdir().unwrap();
        let set = ShardSet::new(tmp.path(), "prefs", "train");
        set.prepare().unwrap();
        let rows: Vec<_> = (0..3).map(pair).collect();
        let stats = ShardStats {
            shard: 0,
            count: 3,
            successes: 3,
            ..Default::default()
        };
        set.write(0, &rows, &stats).unwrap();
        assert_eq!(set.finished().unwrap(), vec![0]);
        assert_eq!(set.read::<PreferencePair>(0).unwrap(), rows);
        let bytes = std::fs::metadata(set.parquet_path(0)).unwrap().len();
        assert!(bytes > 0);
        assert_eq!(set.read_stats(0).unwrap(), ShardStats { bytes, ..stats });
    }

    #[test]
    fn parquet_without_stats_is_not_finished_and_temp_files_are_swept() {
        let tmp = tempfile::tempdir().unwrap();
        let set = ShardSet::new(tmp.path(), "prefs", "train");
        set.prepare().unwrap();
        write_parquet(&set.parquet_path(4), &[pair(0)]).unwrap();
        fs::write(set.dir().join(".part-00005.parquet.tmp-999"), b"junk").unwrap();
        assert!(set.finished().unwrap().is_empty());
        set.prepare().unwrap();
        let names: Vec<_> = fs::read_dir(set.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn truncated_parquet_gives_an_error_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("part-00000.parquet");
        write_parquet(&path, &(0..50).map(pair).collect::<Vec<_>>()).unwrap();
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = read_parquet::<PreferencePair>(&path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("part-00000.parquet"), "{err}");
    }
}
