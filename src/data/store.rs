//! An object-store workdir: `s3://bucket/prefix`, `gs://…`, `az://…` or `file:///path`, through
//! the `object_store` crate, for the files that workers on different machines share: `data/`
//! (Parquet shards and their stats markers) and the job ledger (`workers/`).
//!
//! Credentials and endpoints come from the standard environment variables of each service
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
//! `AWS_ALLOW_HTTP`; `GOOGLE_SERVICE_ACCOUNT`…; `AZURE_STORAGE_ACCOUNT_NAME`…). Opening a store
//! probes it once, so an unreachable endpoint, a missing bucket or rejected credentials is one
//! clear error naming the URL before any work starts.
//!
//! Writes are whole-object puts (atomic by nature); markers use create-if-absent puts
//! ([`PutMode::Create`]: S3's `If-None-Match: *`), so two workers never both claim one. Parquet
//! shards go through parquet's async writer over the store's buffered writer, which switches to
//! a multipart upload once a shard outgrows one part (`PREFCAP_UPLOAD_PART_BYTES`, default
//! 10 MiB).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use futures_util::StreamExt;
use object_store::buffered::BufWriter;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use parquet::arrow::async_writer::AsyncArrowWriter;
use parquet::file::properties::WriterProperties;

use crate::error::{Error, IoContext, Result};
use crate::io::{write_atomic, write_new};

/// The default size of one part of a multipart upload (S3 needs at least 5 MiB per part).
pub const DEFAULT_PART_BYTES: usize = 10 << 20;

/// A workdir in an object store.
pub struct RemoteStore {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    runtime: tokio::runtime::Runtime,
    part_bytes: usize,
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore")
            .field("url", &self.url)
            .finish()
    }
}

/// Whether `workdir` names an object store (a URL with a scheme) rather than a local directory.
pub fn is_store_url(workdir: &str) -> bool {
    workdir.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric())
    })
}

fn store_error(url: &str, what: &str, e: object_store::Error) -> Error {
    let hint = match &e {
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => {
            " (are the credentials right? AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for s3://)"
        }
        _ => "",
    };
    Error::Invalid(format!("object store {url}: {what}: {e}{hint}"))
}

impl RemoteStore {
    /// Opens the store at `url` with credentials from the environment and probes it.
    pub fn open(url: &str) -> Result<Self> {
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| Error::Config(format!("--workdir {url}: not a URL: {e}")))?;
        let retry = object_store::RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(20),
            ..Default::default()
        };
        let bucket = parsed.host_str().unwrap_or_default().to_string();
        let store: Arc<dyn ObjectStore> = match parsed.scheme() {
            "s3" | "s3a" => {
                if std::env::var_os("AWS_ACCESS_KEY_ID").is_none()
                    && std::env::var_os("AWS_WEB_IDENTITY_TOKEN_FILE").is_none()
                    && std::env::var_os("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI").is_none()
                    && std::env::var_os("AWS_CONTAINER_CREDENTIALS_FULL_URI").is_none()
                    && std::env::var_os("AWS_SKIP_SIGNATURE").is_none()
                    && std::env::var_os("PREFCAP_S3_INSTANCE_CREDENTIALS").is_none()
                {
                    return Err(Error::Config(format!(
                        "--workdir {url}: no credentials for bucket `{bucket}`: set \
                         AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_WEB_IDENTITY_TOKEN_FILE; \
                         PREFCAP_S3_INSTANCE_CREDENTIALS=1 uses the instance's role)"
                    )));
                }
                Arc::new(
                    object_store::aws::AmazonS3Builder::from_env()
                        .with_url(url)
                        .with_retry(retry)
                        .build()
                        .map_err(|e| store_error(url, "cannot configure", e))?,
                )
            }
            "gs" => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url)
                    .with_retry(retry)
                    .build()
                    .map_err(|e| store_error(url, "cannot configure", e))?,
            ),
            "az" | "abfs" | "abfss" | "azure" => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url)
                    .with_retry(retry)
                    .build()
                    .map_err(|e| store_error(url, "cannot configure", e))?,
            ),
            "file" => {
                let path = parsed
                    .to_file_path()
                    .map_err(|()| Error::Config(format!("--workdir {url}: not a local path")))?;
                std::fs::create_dir_all(&path).map_err(|source| Error::Io {
                    path: path.clone(),
                    source,
                })?;
                Arc::new(
                    object_store::local::LocalFileSystem::new_with_prefix(&path)
                        .map_err(|e| store_error(url, "cannot open", e))?
                        .with_automatic_cleanup(true),
                )
            }
            other => {
                return Err(Error::Config(format!(
                    "--workdir {url}: unknown scheme `{other}` (s3://, gs://, az:// or file://)"
                )))
            }
        };
        let prefix = if parsed.scheme() == "file" {
            ObjectPath::default()
        } else {
            ObjectPath::from(parsed.path().trim_matches('/'))
        };
        let part_bytes = match std::env::var("PREFCAP_UPLOAD_PART_BYTES") {
            Ok(v) => v.parse::<usize>().ok().filter(|&b| b > 0).ok_or_else(|| {
                Error::Config(format!(
                    "PREFCAP_UPLOAD_PART_BYTES is `{v}`, not a positive number of bytes"
                ))
            })?,
            Err(_) => DEFAULT_PART_BYTES,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Invalid(format!("cannot start the object-store client: {e}")))?;
        let opened = Self {
            url: url.trim_end_matches('/').to_string(),
            store,
            prefix,
            runtime,
            part_bytes,
        };
        opened.probe()?;
        Ok(opened)
    }

    /// One listing request: fails fast on an unreachable endpoint, a missing bucket or
    /// rejected credentials.
    fn probe(&self) -> Result<()> {
        let store = self.store.clone();
        let prefix = self.prefix.clone();
        self.runtime
            .block_on(async move { store.list(Some(&prefix)).next().await.transpose() })
            .map_err(|e| {
                store_error(
                    &self.url,
                    "cannot list the workdir (is the bucket there and reachable?)",
                    e,
                )
            })?;
        Ok(())
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, rel: &str) -> ObjectPath {
        let mut parts: Vec<String> = self
            .prefix
            .parts()
            .map(|p| p.as_ref().to_string())
            .collect();
        parts.extend(rel.split('/').filter(|p| !p.is_empty()).map(str::to_string));
        ObjectPath::from_iter(parts)
    }

    /// The URL of `rel` (for messages).
    pub fn display(&self, rel: &str) -> String {
        format!("{}/{rel}", self.url)
    }

    /// Writes `bytes` to `rel`, replacing what is there.
    pub fn put(&self, rel: &str, bytes: &[u8]) -> Result<()> {
        let key = self.key(rel);
        let payload = PutPayload::from(bytes.to_vec());
        self.runtime
            .block_on(self.store.put(&key, payload))
            .map_err(|e| store_error(&self.url, &format!("cannot write {rel}"), e))?;
        Ok(())
    }

    /// Writes `bytes` to `rel` only if nothing is there; `false` when something was.
    pub fn put_new(&self, rel: &str, bytes: &[u8]) -> Result<bool> {
        let key = self.key(rel);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let payload = PutPayload::from(bytes.to_vec());
        match self
            .runtime
            .block_on(self.store.put_opts(&key, payload, opts))
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(store_error(&self.url, &format!("cannot create {rel}"), e)),
        }
    }

    /// The bytes of `rel`, or `None` when there is no such object.
    pub fn get(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        let key = self.key(rel);
        let store = self.store.clone();
        let got = self.runtime.block_on(async move {
            match store.get(&key).await {
                Ok(r) => r.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        got.map(|b| b.map(|b| b.to_vec()))
            .map_err(|e| store_error(&self.url, &format!("cannot read {rel}"), e))
    }

    /// The size of `rel` in bytes, or `None` when there is no such object.
    pub fn size(&self, rel: &str) -> Result<Option<u64>> {
        let key = self.key(rel);
        match self.runtime.block_on(self.store.head(&key)) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_error(&self.url, &format!("cannot look at {rel}"), e)),
        }
    }

    /// The objects directly inside `dir` (not in its subdirectories): (name, size).
    pub fn list(&self, dir: &str) -> Result<Vec<(String, u64)>> {
        let key = self.key(dir);
        let listed = self
            .runtime
            .block_on(self.store.list_with_delimiter(Some(&key)))
            .map_err(|e| store_error(&self.url, &format!("cannot list {dir}"), e))?;
        let mut out: Vec<(String, u64)> = listed
            .objects
            .into_iter()
            .filter_map(|o| o.location.filename().map(|n| (n.to_string(), o.size)))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Every object under `dir`, at any depth: (path relative to the workdir, size).
    pub fn list_recursive(&self, dir: &str) -> Result<Vec<(String, u64)>> {
        let key = self.key(dir);
        let store = self.store.clone();
        let metas: Vec<object_store::ObjectMeta> = self
            .runtime
            .block_on(async move {
                let mut out = Vec::new();
                let mut stream = store.list(Some(&key));
                while let Some(meta) = stream.next().await {
                    out.push(meta?);
                }
                Ok::<_, object_store::Error>(out)
            })
            .map_err(|e| store_error(&self.url, &format!("cannot list {dir}"), e))?;
        let skip = self.prefix.parts().count();
        let mut out: Vec<(String, u64)> = metas
            .into_iter()
            .map(|m| {
                let rel: Vec<String> = m
                    .location
                    .parts()
                    .skip(skip)
                    .map(|p| p.as_ref().to_string())
                    .collect();
                (rel.join("/"), m.size)
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// The subdirectories directly inside `dir`, by name.
    pub fn subdirectories(&self, dir: &str) -> Result<Vec<String>> {
        let key = self.key(dir);
        let listed = self
            .runtime
            .block_on(self.store.list_with_delimiter(Some(&key)))
            .map_err(|e| store_error(&self.url, &format!("cannot list {dir}"), e))?;
        let mut out: Vec<String> = listed
            .common_prefixes
            .into_iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Removes `rel` (nothing there is fine).
    pub fn delete(&self, rel: &str) -> Result<()> {
        let key = self.key(rel);
        match self.runtime.block_on(self.store.delete(&key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_error(&self.url, &format!("cannot remove {rel}"), e)),
        }
    }

    /// Writes `batch` as one Parquet object at `rel` with `props` (a shard written this way has
    /// the same bytes as a local one) through parquet's async writer over the buffered writer:
    /// one put for a small object, a multipart upload for one larger than a part. Returns its
    /// size.
    pub fn write_parquet(
        &self,
        rel: &str,
        batch: &RecordBatch,
        props: WriterProperties,
    ) -> Result<u64> {
        let key = self.key(rel);
        let writer = BufWriter::with_capacity(self.store.clone(), key.clone(), self.part_bytes);
        let perr = |e: parquet::errors::ParquetError| {
            Error::Invalid(format!(
                "object store {}: cannot write {rel}: {e}",
                self.url
            ))
        };
        self.runtime.block_on(async {
            let mut w =
                AsyncArrowWriter::try_new(writer, batch.schema(), Some(props)).map_err(perr)?;
            w.write(batch).await.map_err(perr)?;
            w.close().await.map_err(perr)?;
            Ok::<(), Error>(())
        })?;
        self.size(rel)?.ok_or_else(|| {
            Error::Invalid(format!(
                "object store {}: {rel} is not there after writing it",
                self.url
            ))
        })
    }
}

/// Where the shared files of a workdir live: a local directory or an object store. Paths
/// are relative (`data/cc/train/part-00000.parquet`), with `/` separators, in both.
#[derive(Debug, Clone)]
pub enum Root {
    Local(PathBuf),
    Remote(Arc<RemoteStore>),
}

impl Root {
    /// `workdir` as given to `--workdir`: a URL opens (and probes) an object store.
    pub fn open(workdir: &str) -> Result<Self> {
        if is_store_url(workdir) {
            Ok(Root::Remote(Arc::new(RemoteStore::open(workdir)?)))
        } else {
            Ok(Root::Local(PathBuf::from(workdir)))
        }
    }

    fn local(dir: &Path, rel: &str) -> PathBuf {
        rel.split('/')
            .filter(|p| !p.is_empty())
            .fold(dir.to_path_buf(), |p, part| p.join(part))
    }

    /// `rel` as a user finds it: a path or a URL.
    pub fn display(&self, rel: &str) -> String {
        match self {
            Root::Local(dir) => Self::local(dir, rel).display().to_string(),
            Root::Remote(store) if rel.is_empty() => store.url().to_string(),
            Root::Remote(store) => store.display(rel),
        }
    }

    /// Copies every file under `dir` (recursively) that `local` lacks, or has at another size,
    /// from this root into `local` (atomically, file by file); nothing for a local root.
    /// Returns (files copied, bytes copied). Cache entries are verified by their sha256 when a
    /// stage looks them up, so a damaged copy is caught there.
    pub fn copy_down(&self, dir: &str, local: &Path) -> Result<(u64, u64)> {
        let Root::Remote(store) = self else {
            return Ok((0, 0));
        };
        let (mut files, mut bytes) = (0, 0);
        for (rel, size) in store.list_recursive(dir)? {
            let path = Self::local(local, &rel);
            if std::fs::metadata(&path).is_ok_and(|m| m.len() == size) {
                continue;
            }
            let data = store.get(&rel)?.ok_or_else(|| {
                Error::Invalid(format!("{}: listed, then gone", store.display(&rel)))
            })?;
            create_parent(&path)?;
            write_atomic(&path, &data)?;
            files += 1;
            bytes += data.len() as u64;
        }
        Ok((files, bytes))
    }

    /// Copies the local files `files` (under `local`) up into this root at the same relative
    /// paths, in order, each created only if absent (list a manifest after its data file):
    /// what another worker put there first stays. Nothing for a local root.
    pub fn copy_up(&self, local: &Path, files: &[PathBuf]) -> Result<()> {
        if !self.is_remote() {
            return Ok(());
        }
        for file in files {
            let rel = relative(local, file);
            let data = std::fs::read(file).at(file)?;
            self.put_new(&rel, &data)?;
        }
        Ok(())
    }

    pub fn is_remote(&self) -> bool {
        matches!(self, Root::Remote(_))
    }

    /// The bytes of `rel`, or `None` when it does not exist.
    pub fn read(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        match self {
            Root::Local(dir) => {
                let path = Self::local(dir, rel);
                match std::fs::read(&path) {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e).at(&path),
                }
            }
            Root::Remote(store) => store.get(rel),
        }
    }

    /// The size of `rel` in bytes, or `None` when it does not exist.
    pub fn size(&self, rel: &str) -> Result<Option<u64>> {
        match self {
            Root::Local(dir) => {
                let path = Self::local(dir, rel);
                match std::fs::metadata(&path) {
                    Ok(m) if m.is_file() => Ok(Some(m.len())),
                    Ok(_) => Ok(None),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e).at(&path),
                }
            }
            Root::Remote(store) => store.size(rel),
        }
    }

    /// Writes `bytes` to `rel` atomically, replacing what is there.
    pub fn put(&self, rel: &str, bytes: &[u8]) -> Result<()> {
        match self {
            Root::Local(dir) => {
                let path = Self::local(dir, rel);
                create_parent(&path)?;
                write_atomic(&path, bytes)
            }
            Root::Remote(store) => store.put(rel, bytes),
        }
    }

    /// Writes `bytes` to `rel` only if nothing is there (create-if-absent); `false` when
    /// something was, and then nothing is written.
    pub fn put_new(&self, rel: &str, bytes: &[u8]) -> Result<bool> {
        match self {
            Root::Local(dir) => {
                let path = Self::local(dir, rel);
                create_parent(&path)?;
                write_new(&path, bytes)
            }
            Root::Remote(store) => store.put_new(rel, bytes),
        }
    }

    /// The files directly inside `dir` (temporaries of writers aside): (name, size), by name.
    pub fn list(&self, dir: &str) -> Result<Vec<(String, u64)>> {
        match self {
            Root::Local(root) => {
                let path = Self::local(root, dir);
                let entries = match std::fs::read_dir(&path) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(e).at(&path),
                };
                let mut out = Vec::new();
                for entry in entries {
                    let entry = entry.at(&path)?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with('.') {
                        continue; // a writer's temporary
                    }
                    // Another process may rename or remove a file between the listing and
                    // this look at it (a shard being rewritten): gone is not an error.
                    match entry.metadata() {
                        Ok(meta) if meta.is_file() => out.push((name, meta.len())),
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e).at(path.join(&name)),
                    }
                }
                out.sort();
                Ok(out)
            }
            Root::Remote(store) => store.list(dir),
        }
    }

    /// The subdirectories directly inside `dir`, by name.
    pub fn subdirectories(&self, dir: &str) -> Result<Vec<String>> {
        match self {
            Root::Local(root) => {
                let path = Self::local(root, dir);
                let Ok(entries) = std::fs::read_dir(&path) else {
                    return Ok(Vec::new());
                };
                let mut out: Vec<String> = entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                out.sort();
                Ok(out)
            }
            Root::Remote(store) => store.subdirectories(dir),
        }
    }

    /// Removes `rel`; nothing there is fine.
    pub fn delete(&self, rel: &str) -> Result<()> {
        match self {
            Root::Local(dir) => {
                let path = Self::local(dir, rel);
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).at(&path),
                    _ => Ok(()),
                }
            }
            Root::Remote(store) => store.delete(rel),
        }
    }

    /// Removes the temporaries that killed writers left directly inside `dir` (local only:
    /// an object store never shows a partial object).
    pub fn sweep(&self, dir: &str) -> Result<()> {
        match self {
            Root::Local(root) => {
                let path = Self::local(root, dir);
                std::fs::create_dir_all(&path).at(&path)?;
                crate::io::sweep_temp_files(&path)
            }
            Root::Remote(_) => Ok(()),
        }
    }
}

/// `--workdir` resolved: where the shared files live, and the local directory for everything
/// else (runs, caches, models). For an object store that is `$PREFCAP_LOCAL_DIR`, else
/// `<temp dir>/prefcap-<digest of the URL>`.
pub fn open_workdir(workdir: &Path) -> Result<(Root, PathBuf)> {
    let text = workdir.to_string_lossy();
    if !is_store_url(&text) {
        return Ok((Root::Local(workdir.to_path_buf()), workdir.to_path_buf()));
    }
    let root = Root::open(&text)?;
    let local = match std::env::var_os("PREFCAP_LOCAL_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            use sha2::Digest;
            let digest = hex::encode(sha2::Sha256::digest(text.as_bytes()));
            std::env::temp_dir().join(format!("prefcap-{}", &digest[..12]))
        }
    };
    std::fs::create_dir_all(&local).at(&local)?;
    Ok((root, local))
}

/// `path` relative to `workdir`, with `/` separators (as roots, plans and markers name files).
pub fn relative(workdir: &Path, path: &Path) -> String {
    path.strip_prefix(workdir)
        .unwrap_or(path)
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

fn create_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(parent) => std::fs::create_dir_all(parent).at(parent),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_stores_and_paths_are_not() {
        assert!(is_store_url("s3://bucket/prefix"));
        assert!(is_store_url("file:///tmp/x"));
        assert!(!is_store_url("/tmp/x"));
        assert!(!is_store_url("runs/a://b"));
        assert!(!is_store_url("."));
    }

    #[test]
    fn a_local_root_creates_once_lists_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::Local(dir.path().to_path_buf());
        assert!(root.put_new("a/b/m.json", b"one").unwrap());
        assert!(!root.put_new("a/b/m.json", b"two").unwrap());
        assert_eq!(root.read("a/b/m.json").unwrap().unwrap(), b"one");
        root.put("a/b/n.bin", b"12345").unwrap();
        assert_eq!(
            root.list("a/b").unwrap(),
            vec![("m.json".to_string(), 3), ("n.bin".to_string(), 5)]
        );
        assert_eq!(root.subdirectories("a").unwrap(), vec!["b".to_string()]);
        assert_eq!(root.size("a/b/missing").unwrap(), None);
        root.delete("a/b/n.bin").unwrap();
        root.delete("a/b/n.bin").unwrap();
        assert_eq!(root.read("a/b/n.bin").unwrap(), None);
    }

    #[test]
    fn a_file_url_is_an_object_store_with_create_if_absent() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let root = Root::open(&url).unwrap();
        assert!(root.is_remote());
        assert!(root.put_new("workers/x/plan.json", b"{}").unwrap());
        assert!(!root.put_new("workers/x/plan.json", b"[]").unwrap());
        assert_eq!(
            std::fs::read(dir.path().join("workers/x/plan.json")).unwrap(),
            b"{}"
        );
        assert_eq!(
            root.list("workers/x").unwrap(),
            vec![("plan.json".to_string(), 2)]
        );
        let e = Root::open("ftp://host/x").unwrap_err().to_string();
        assert!(e.contains("unknown scheme `ftp`"), "{e}");
    }
}
