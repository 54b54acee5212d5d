//! The one content-addressed cache: `cache/<bucket>/<dd>/<digest>.<ext>` plus its manifest
//! `<digest>.json`, for every artefact prefcap computes once and reuses (CLIP features,
//! reference log-probabilities, anything later).
//!
//! A digest is the sha256 of everything that changes an entry's contents, so changed inputs
//! simply miss and unchanged work is never redone. The data file is written under a temporary
//! name (hashed and counted as it is written), renamed into place, and the manifest goes last:
//! an entry without a manifest does not exist. The manifest records the file's size and
//! sha256, so a truncated or bit-flipped file is detected on lookup and recomputed, and the
//! key that made the digest, for provenance. Temporaries of killed runs are swept.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::io::{sweep_temp_files, write_atomic, AtomicFile, HashingWriter};

/// A bucket of the cache: its directory name carries the format version (`features-v1`).
#[derive(Debug, Clone)]
pub struct ContentCache {
    root: PathBuf,
    bucket: &'static str,
    extension: &'static str,
}

/// The manifest of one entry, `<digest>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest<K> {
    /// The bucket (format version) the entry belongs to.
    pub format: String,
    pub digest: String,
    /// What the digest was computed from.
    pub key: K,
    pub rows: u64,
    pub file_bytes: u64,
    pub file_sha256: String,
}

/// A verified entry: its data file and manifest.
#[derive(Debug, Clone)]
pub struct CacheEntry<K> {
    pub path: PathBuf,
    pub manifest: Manifest<K>,
}

/// Result of looking a digest up.
#[derive(Debug)]
pub enum Lookup<K> {
    Hit(Box<CacheEntry<K>>),
    Missing,
    /// The entry exists but does not verify; it must be recomputed.
    Corrupt {
        reason: String,
    },
}

/// A digest over `parts`, each length-prefixed so that no two lists of parts collide.
pub fn digest_of<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    hex::encode(h.finalize())
}

impl ContentCache {
    /// `<workdir>/cache/<bucket>/`, whose entries' data files end in `.<extension>`.
    pub fn new(workdir: &Path, bucket: &'static str, extension: &'static str) -> Self {
        Self {
            root: workdir.join("cache").join(bucket),
            bucket,
            extension,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The data file and manifest of `digest`.
    pub fn paths(&self, digest: &str) -> (PathBuf, PathBuf) {
        let dir = self.root.join(digest.get(..2).unwrap_or("00"));
        (
            dir.join(format!("{digest}.{}", self.extension)),
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
            if dir.is_dir() {
                sweep_temp_files(&dir)?;
            }
        }
        Ok(())
    }

    /// Finds `digest`'s entry and verifies it: the manifest belongs to this bucket and digest,
    /// the file has the recorded size and sha256, and `check` (a format's own checks: schema,
    /// row count) accepts the manifest and the file's bytes.
    pub fn lookup<K: DeserializeOwned>(
        &self,
        digest: &str,
        check: impl FnOnce(&Manifest<K>, Vec<u8>) -> std::result::Result<(), String>,
    ) -> Result<Lookup<K>> {
        let (data, meta) = self.paths(digest);
        let Ok(bytes) = fs::read(&meta) else {
            return Ok(Lookup::Missing);
        };
        let manifest: Manifest<K> = match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => {
                return Ok(Lookup::Corrupt {
                    reason: format!("{}: {e}", meta.display()),
                })
            }
        };
        let verified = (|| {
            if manifest.format != self.bucket || manifest.digest != digest {
                return Err("the manifest does not belong to this entry".to_string());
            }
            let bytes = fs::read(&data).map_err(|e| format!("{}: {e}", data.display()))?;
            if bytes.len() as u64 != manifest.file_bytes {
                return Err(format!(
                    "{} has {} bytes, the manifest says {}",
                    data.display(),
                    bytes.len(),
                    manifest.file_bytes
                ));
            }
            if hex::encode(Sha256::digest(&bytes)) != manifest.file_sha256 {
                return Err(format!("{} does not match its sha256", data.display()));
            }
            check(&manifest, bytes)
        })();
        Ok(match verified {
            Ok(()) => Lookup::Hit(Box::new(CacheEntry {
                path: data,
                manifest,
            })),
            Err(reason) => Lookup::Corrupt { reason },
        })
    }

    /// A writer for `digest`'s entry; nothing is visible until [`EntryWriter::finish`].
    pub fn writer(&self, digest: &str) -> Result<EntryWriter> {
        let (data, meta) = self.paths(digest);
        let dir = data.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&dir).at(&dir)?;
        Ok(EntryWriter {
            file: HashingWriter::new(AtomicFile::create(&data)?),
            bucket: self.bucket,
            digest: digest.to_string(),
            data,
            meta,
        })
    }
}

/// The data file of a new entry, hashed as it is written.
pub struct EntryWriter {
    file: HashingWriter<AtomicFile>,
    bucket: &'static str,
    digest: String,
    data: PathBuf,
    meta: PathBuf,
}

impl EntryWriter {
    /// The path the data file will have.
    pub fn path(&self) -> &Path {
        &self.data
    }

    /// Commits the data file, then writes the manifest (`key`, `rows`, size, sha256) last.
    pub fn finish<K: Serialize>(self, key: K, rows: u64) -> Result<CacheEntry<K>> {
        let (file, file_bytes, file_sha256) = self.file.finish();
        file.commit()?;
        let manifest = Manifest {
            format: self.bucket.to_string(),
            digest: self.digest,
            key,
            rows,
            file_bytes,
            file_sha256,
        };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::BadFile {
            path: self.meta.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&self.meta, &json)?;
        Ok(CacheEntry {
            path: self.data,
            manifest,
        })
    }
}

impl Write for EntryWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}
