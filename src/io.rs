//! Files as prefcap writes them: the one atomic writer (a hidden temporary sibling, renamed
//! into place once complete and synced), atomic directory replacement for checkpoints, the
//! sweep of temporaries that killed processes left behind, and streamed sha256.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};

/// A file written under a temporary name and renamed to `path` by [`AtomicFile::commit`]:
/// readers see the old file or the whole new one, never part of it. Dropped uncommitted,
/// it removes its temporary file.
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<BufWriter<fs::File>>,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<Self> {
        let tmp = temp_path(path);
        let file = fs::File::create(&tmp).at(&tmp)?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes and syncs the temporary file and renames it into place.
    pub fn commit(mut self) -> Result<()> {
        if let Some(writer) = self.file.take() {
            let file = writer
                .into_inner()
                .map_err(|e| e.into_error())
                .at(&self.tmp)?;
            file.sync_all().at(&self.tmp)?;
        }
        fs::rename(&self.tmp, &self.path).at(&self.path)
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.file {
            Some(f) => f.write(buf),
            None => Err(std::io::Error::other("write after commit")),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.file {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `value` to `path` as pretty JSON, atomically.
pub fn write_json<T: serde::Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| Error::BadFile {
        path: path.to_path_buf(),
        message: format!("cannot serialise: {e}"),
    })?;
    write_atomic(path, &json)
}

/// Reads the JSON file `path` as `T`; an error names the file and the problem.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = fs::read(path).at(path)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::BadFile {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Writes `bytes` to `path` atomically ([`AtomicFile`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes).at(path)?;
    file.commit()
}

/// Writes `bytes` to `path` only if no file is there yet (create-if-absent): the bytes go to a
/// temporary sibling, which is then hard-linked to `path`, an operation that fails when `path`
/// exists. Returns `false` (and writes nothing) when another writer got there first, so two
/// processes can never both claim the same marker.
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<bool> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes).at(path)?;
    let tmp = file.tmp.clone();
    if let Some(writer) = file.file.take() {
        let f = writer.into_inner().map_err(|e| e.into_error()).at(&tmp)?;
        f.sync_all().at(&tmp)?;
    }
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e).at(path),
    }
}

/// A directory filled under a temporary name, then swapped for `path` whole by
/// [`AtomicDir::commit`] (checkpoints: weights, optimizer state and step always agree).
pub struct AtomicDir {
    path: PathBuf,
    tmp: PathBuf,
    committed: bool,
}

impl AtomicDir {
    /// Creates the (empty) temporary directory beside `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let parent = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(parent).at(parent)?;
        let tmp = temp_path(path);
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).at(&tmp)?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            committed: false,
        })
    }

    /// Where to write the directory's files.
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// Replaces `path` with the filled directory: the old one is moved aside, the new one
    /// renamed into place, the old one removed.
    pub fn commit(mut self) -> Result<()> {
        let old = self.path.with_file_name(format!(
            ".{}.old-{}",
            file_name(&self.path),
            std::process::id()
        ));
        if self.path.exists() {
            fs::rename(&self.path, &old).at(&self.path)?;
        }
        fs::rename(&self.tmp, &self.path).at(&self.path)?;
        self.committed = true;
        let _ = fs::remove_dir_all(&old);
        Ok(())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Temporary sibling of `path`: hidden, and tagged with the pid so concurrent writers never
/// collide (`.<name>.tmp-<pid>`).
fn temp_path(path: &Path) -> PathBuf {
    path.with_file_name(format!(".{}.tmp-{}", file_name(path), std::process::id()))
}

/// Whether `name` is a temporary file ([`AtomicFile`]'s `.<name>.tmp-<pid>`) that no other
/// running process is writing: its writer was killed (or is this process, whose sweeps run
/// before it writes). Another process working in the same directory keeps its own.
pub fn is_abandoned_temp(name: &str) -> bool {
    let Some(pid) = name
        .strip_prefix('.')
        .and_then(|rest| rest.rsplit_once(".tmp-"))
        .map(|(_, pid)| pid)
    else {
        return false;
    };
    match pid.parse::<u32>() {
        Ok(pid) if pid == std::process::id() => true,
        Ok(pid) => !Path::new("/proc").join(pid.to_string()).exists(),
        Err(_) => true,
    }
}

/// Removes the abandoned temporary files directly inside `dir` ([`is_abandoned_temp`]);
/// a missing `dir` has none.
pub fn sweep_temp_files(dir: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry.at(dir)?.path();
        if path.is_file() && is_abandoned_temp(&file_name(&path)) {
            // Another process sweeping the same directory may have removed it first.
            match fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).at(&path),
                _ => {}
            }
        }
    }
    Ok(())
}

/// sha256 of the file at `path`, hex, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).at(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).at(path)?;
    Ok(hex::encode(hasher.finalize()))
}

/// A `Write` that hashes and counts what passes through, so finishing a file costs no
/// re-read to learn its size and sha256.
pub struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// The inner writer, the byte count and the hex sha256 of what was written.
    pub fn finish(self) -> (W, u64, String) {
        (self.inner, self.bytes, hex::encode(self.hasher.finalize()))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_uncommitted_file_leaves_nothing_and_a_committed_one_replaces_the_old() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.txt");
        fs::write(&path, b"old").unwrap();
        let mut f = AtomicFile::create(&path).unwrap();
        f.write_all(b"new").unwrap();
        drop(f);
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
        write_atomic(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_directory_is_swapped_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("ckpt");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("old.bin"), b"1").unwrap();
        let dir = AtomicDir::create(&path).unwrap();
        fs::write(dir.dir().join("new.bin"), b"2").unwrap();
        assert!(path.join("old.bin").exists());
        dir.commit().unwrap();
        assert!(!path.join("old.bin").exists());
        assert_eq!(fs::read(path.join("new.bin")).unwrap(), b"2");
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn sweeps_keep_live_processes_temporaries() {
        let tmp = tempfile::tempdir().unwrap();
        // pid 1 always runs; the other pid cannot exist.
        let (live, dead) = (".x.tmp-1", ".y.tmp-4294967294");
        for name in [live, dead, "kept.parquet"] {
            fs::write(tmp.path().join(name), b"").unwrap();
        }
        sweep_temp_files(tmp.path()).unwrap();
        let mut left: Vec<String> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [live, "kept.parquet"]);
    }

    #[test]
    fn hashing_writer_counts_and_hashes() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"abc").unwrap();
        let (inner, bytes, sha) = w.finish();
        assert_eq!((inner, bytes), (b"abc".to_vec(), 3));
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
