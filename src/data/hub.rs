//! The one Hugging Face hub resolver: lists a dataset or model repo at a revision through
//! hf-hub and downloads the files that match the configured patterns into the hf-hub cache.

use std::path::{Path, PathBuf};

use hf_hub::repository::RepoTreeEntry;
use hf_hub::{HFClient, HFClientSync};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `[hub]`: where Hugging Face hub downloads come from and are cached.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Hub URL; empty = `HF_ENDPOINT`, else https://huggingface.co.
    pub endpoint: String,
    /// Download cache; empty = `HF_HUB_CACHE`/`HF_HOME`, else ~/.cache/huggingface/hub.
    pub cache_dir: String,
}

/// A file fetched from the hub.
#[derive(Debug, Clone)]
pub struct HubFile {
    /// Path inside the repository (`data/train_prefs-00000-of-00001.parquet`).
    pub path_in_repo: String,
    /// Where it lies in the local hf-hub cache.
    pub local: PathBuf,
    /// The commit the revision resolved to (40 hex), for provenance.
    pub commit: String,
}

/// Blocking hub client built from `[hub]` (endpoint, cache) and the `HF_*` environment.
#[derive(Clone)]
pub struct HubClient {
    client: HFClientSync,
}

impl HubClient {
    pub fn new(cfg: &HubConfig) -> Result<Self> {
        let mut builder = HFClient::builder();
        if !cfg.endpoint.is_empty() {
            builder = builder.endpoint(cfg.endpoint.clone());
        }
        if !cfg.cache_dir.is_empty() {
            builder = builder.cache_dir(PathBuf::from(&cfg.cache_dir));
        }
        let client = builder
            .build_sync()
            .map_err(|e| Error::Http(format!("cannot build the Hugging Face hub client: {e}")))?;
        Ok(Self { client })
    }

    /// Downloads every file of dataset `repo` at `revision` (resolved to its commit once, for
    /// the listing and every download) whose path matches one of `patterns` (`*` matches any
    /// run of characters, including `/`), sorted by path.
    /// No match is an error naming the repo, revision and patterns. A download whose size
    /// differs from the listed one (an error page or a cut-off body stored as the file) is
    /// removed from the cache and fetched once more, then is an error naming the file.
    pub fn dataset_files(
        &self,
        repo: &str,
        revision: &str,
        patterns: &[String],
    ) -> Result<Vec<HubFile>> {
        let hub_err = hub_error(repo, revision);
        let (owner, name) = split_repo(repo, revision)?;
        let handle = self.client.dataset(owner, name);
        // The revision is resolved to its commit once, and the listing and every download
        // name that commit: a push to the branch during the run cannot mix two commits.
        let commit = handle
            .info()
            .revision(revision.to_string())
            .send()
            .map_err(|e| hub_err(format!("resolving the revision failed: {e}")))?
            .sha
            .ok_or_else(|| hub_err("the hub named no commit for the revision".into()))?;
        let tree = handle
            .list_tree()
            .revision(commit.clone())
            .recursive(true)
            .send()
            .map_err(|e| hub_err(format!("listing files failed: {e}")))?;
        let mut files: Vec<(String, u64)> = tree
            .into_iter()
            .filter_map(|entry| match entry {
                RepoTreeEntry::File { path, size, .. } => Some((path, size)),
                _ => None,
            })
            .filter(|(p, _)| patterns.iter().any(|pat| glob_match(pat, p)))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(hub_err(format!("no file matches {patterns:?}")));
        }
        files
            .into_iter()
            .map(|(path, size)| {
                let fetch = |force: bool| {
                    handle
                        .download_file()
                        .filename(path.clone())
                        .revision(commit.clone())
                        .force_download(force)
                        .send()
                        .map_err(|e| hub_err(format!("downloading `{path}` failed: {e}")))
                };
                let mut local = fetch(false)?;
                if file_len(&local) != Some(size) {
                    forget(&local);
                    local = fetch(true)?;
                }
                if let Some(got) = file_len(&local).filter(|&got| got != size) {
                    forget(&local);
                    return Err(hub_err(format!(
                        "`{path}` downloaded as {got} bytes, but the hub lists {size} ({})",
                        local.display()
                    )));
                }
                Ok(HubFile {
                    path_in_repo: path,
                    local,
                    commit: commit.clone(),
                })
            })
            .collect()
    }

    /// Downloads one file of model repo `repo` at `revision` (the hf-hub cache makes repeats free).
    /// The directory holding `files` of model `name`: `name` itself when it is a local
    /// directory, else the hub snapshot of repo `name` at `revision` after fetching them
    /// (one snapshot directory per revision holds them all).
    pub fn model_dir(
        name: &str,
        revision: &str,
        files: &[&str],
        hub: impl FnOnce() -> Result<HubClient>,
    ) -> Result<std::path::PathBuf> {
        let dir = std::path::Path::new(name);
        if dir.is_dir() {
            return Ok(dir.to_path_buf());
        }
        let hub = hub()?;
        let mut snapshot = None;
        for file in files {
            let got = hub.model_file(name, revision, file)?;
            snapshot = got.local.parent().map(std::path::Path::to_path_buf);
        }
        snapshot.ok_or_else(|| Error::Config(format!("no files asked of hub repo `{name}`")))
    }

    pub fn model_file(&self, repo: &str, revision: &str, filename: &str) -> Result<HubFile> {
        let hub_err = hub_error(repo, revision);
        let (owner, name) = split_repo(repo, revision)?;
        let local = self
            .client
            .model(owner, name)
            .download_file()
            .filename(filename.to_string())
            .revision(revision.to_string())
            .send()
            .map_err(|e| hub_err(format!("downloading `{filename}` failed: {e}")))?;
        let commit = commit_of(&local).unwrap_or_else(|| revision.to_string());
        Ok(HubFile {
            path_in_repo: filename.to_string(),
            local,
            commit,
        })
    }
}

/// The size of the file `path` leads to (following the cache's snapshot link).
fn file_len(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}

/// Removes a cached download: the blob behind the snapshot link, then the link.
fn forget(path: &Path) {
    if let Ok(blob) = std::fs::canonicalize(path) {
        let _ = std::fs::remove_file(blob);
    }
    let _ = std::fs::remove_file(path);
}

/// Errors about `repo` at `revision`.
fn hub_error<'a>(repo: &'a str, revision: &'a str) -> impl Fn(String) -> Error + 'a {
    move |message| Error::Hub {
        repo: repo.to_string(),
        revision: revision.to_string(),
        message,
    }
}

/// `owner/name` split in two; anything else is an error naming the repo.
fn split_repo<'a>(repo: &'a str, revision: &str) -> Result<(&'a str, &'a str)> {
    repo.split_once('/')
        .ok_or_else(|| hub_error(repo, revision)("repository id must be `owner/name`".into()))
}

/// The commit hash from an hf-hub cache path `.../snapshots/<commit>/<path>`.
fn commit_of(local: &Path) -> Option<String> {
    let mut comps = local
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned());
    comps.by_ref().find(|c| c == "snapshots")?;
    comps.next()
}

/// Shell-style match where `*` matches any run of characters (also across `/`).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first)
        || !text[first.len()..].ends_with(last)
        || text.len() < first.len() + last.len()
    {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_hub_file_names() {
        assert!(glob_match(
            "data/train_prefs-*.parquet",
            "data/train_prefs-00000-of-00001.parquet"
        ));
        assert!(glob_match(
            "data/train_prefs-*.parquet",
            "data/train_prefs-00000-of-00001-abc123.parquet"
        ));
        assert!(!glob_match(
            "data/train_prefs-*.parquet",
            "data/test_prefs-00000-of-00001.parquet"
        ));
        assert!(glob_match("*.jsonl", "evol_instruct.jsonl"));
        assert!(glob_match("a*b*c", "aXbYc"));
        assert!(!glob_match("a*b*c", "aXc"));
        assert!(!glob_match("ab*ba", "aba"));
        assert!(glob_match("exact.json", "exact.json"));
    }

    #[test]
    fn the_listing_and_downloads_name_the_commit_the_revision_resolved_to() {
        let hub = crate::testkit::loopback::MockHub::start().unwrap();
        hub.add_dataset_file("o/n", "main", "data/a.parquet", b"a".to_vec());
        hub.add_dataset_file("o/n", "main", "data/b.parquet", b"bb".to_vec());
        let cache = tempfile::tempdir().unwrap();
        let client = HubClient::new(&HubConfig {
            endpoint: hub.endpoint(),
            cache_dir: cache.path().display().to_string(),
        })
        .unwrap();
        let files = client
            .dataset_files("o/n", "main", &["data/*".to_string()])
            .unwrap();
        let commit = hub.commit_of("o/n", "main");
        assert!(files.iter().all(|f| f.commit == commit));
        let log = hub.request_log();
        // Only the first request names the branch; the tree and the files name the commit.
        let named_main: Vec<&String> = log.iter().filter(|l| l.contains("main")).collect();
        assert_eq!(named_main.len(), 1, "{log:?}");
        assert!(
            named_main[0].starts_with("GET /api/datasets/o/n/revision/main"),
            "{log:?}"
        );
        assert!(
            log.iter().any(|l| l.contains(&format!("/tree/{commit}"))),
            "{log:?}"
        );
        for path in ["data/a.parquet", "data/b.parquet"] {
            assert!(
                log.iter()
                    .any(|l| l == &format!("GET /datasets/o/n/resolve/{commit}/{path}")),
                "{log:?}"
            );
        }
    }

    #[test]
    fn a_download_of_the_wrong_size_is_fetched_again_then_refused() {
        let hub = crate::testkit::loopback::MockHub::start().unwrap();
        let bytes = b"PAR1 pretend parquet".repeat(50);
        hub.add_dataset_file("o/n", "main", "data/x.parquet", bytes.clone());
        let cache = tempfile::tempdir().unwrap();
        let client = HubClient::new(&HubConfig {
            endpoint: hub.endpoint(),
            cache_dir: cache.path().display().to_string(),
        })
        .unwrap();
        let patterns = ["data/*.parquet".to_string()];
        let gets = || {
            hub.request_log()
                .iter()
                .filter(|l| l.starts_with("GET /datasets/o/n/resolve/"))
                .count()
        };
        // One error page: stored, caught by its size, fetched again.
        hub.garble_downloads("data/x.parquet", 1);
        let files = client.dataset_files("o/n", "main", &patterns).unwrap();
        assert_eq!(std::fs::read(&files[0].local).unwrap(), bytes);
        assert_eq!(gets(), 2);
        // Every answer wrong: an error naming the file, and nothing wrong left in the cache.
        let other = tempfile::tempdir().unwrap();
        let client = HubClient::new(&HubConfig {
            endpoint: hub.endpoint(),
            cache_dir: other.path().display().to_string(),
        })
        .unwrap();
        hub.garble_downloads("data/x.parquet", 5);
        let err = client
            .dataset_files("o/n", "main", &patterns)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`data/x.parquet` downloaded as 28 bytes, but the hub lists 1000"),
            "{err}"
        );
        hub.garble_downloads("data/x.parquet", 0);
        let files = client.dataset_files("o/n", "main", &patterns).unwrap();
        assert_eq!(std::fs::read(&files[0].local).unwrap(), bytes);
    }

    #[test]
    fn commit_is_read_from_the_snapshot_path() {
        let p = Path::new("/c/datasets--o--n/snapshots/0123abcd/data/x.parquet");
        assert_eq!(commit_of(p).as_deref(), Some("0123abcd"));
        assert_eq!(commit_of(Path::new("/tmp/x")), None);
    }
}
