//! Conceptual Captions: the TSV (caption TAB url) is cut into shards of `shard_size` rows;
//! each unfinished shard's images are downloaded concurrently, prepared on CPU workers and
//! written as one Parquet shard with per-sample status.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender, TryRecvError};
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};

use crate::data::records::{ImageTextSample, SampleStatus};
use crate::data::shard::{ShardSet, ShardStats};
use crate::error::{Error, Result};
use crate::imaging::resize::{self, ImageSpec, ResizeMode};
use crate::io::sha256_file;
use crate::progress::Progress;
use crate::stages::context::RunConfig;
use crate::stages::ingest::download::{FetchFailure, FetchPolicy, Fetcher};
use crate::stages::ingest::tsv::{self, TsvReader};
use crate::stages::ingest::{IngestOptions, SourceSummary, SplitSummary};

/// `[ingest.cc]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CcConfig {
    /// Path of the TSV (`.tsv` or `.tsv.gz`), relative to the workdir unless absolute.
    pub input: String,
    /// Output split name: `data/cc/<split>/`.
    pub split: String,
    pub shard_size: usize,
    /// Stop after this many TSV rows (0 = all).
    pub max_rows: u64,
    pub image_size: u32,
    pub resize_mode: ResizeMode,
    pub resize_only_if_bigger: bool,
    pub jpeg_quality: u8,
    /// 4:2:0 chroma subsampling, as img2dataset (OpenCV) writes; false keeps full 4:4:4 chroma.
    pub jpeg_chroma_subsampling: bool,
    /// Decoded images larger than this many pixels are rejected.
    pub max_pixels: u64,
    /// Downloads in flight at once.
    pub concurrency: usize,
    /// Per-request timeout (connect + whole body).
    pub timeout_secs: f64,
    /// Retries after a timeout, connection error, 429 or 5xx.
    pub retries: u32,
    /// First retry delay; doubles each retry.
    pub retry_backoff_ms: u64,
    /// Bodies larger than this are abandoned (`too_large`).
    pub max_image_bytes: u64,
    pub max_redirects: usize,
    pub user_agent: String,
    /// `X-Robots-Tag` directives that forbid use (`robots_disallowed`); empty = ignore the header.
    pub disallowed_robots_tags: Vec<String>,
}

impl Default for CcConfig {
    fn default() -> Self {
        Self {
            input: String::new(),
            split: "train".into(),
            shard_size: 1000,
            max_rows: 0,
            image_size: 224,
            resize_mode: ResizeMode::CenterCrop,
            resize_only_if_bigger: false,
            jpeg_quality: 95,
            jpeg_chroma_subsampling: true,
            max_pixels: 50_000_000,
            concurrency: 64,
            timeout_secs: 10.0,
            retries: 2,
            retry_backoff_ms: 200,
            max_image_bytes: 20_000_000,
            max_redirects: 5,
            user_agent: concat!(
                "prefcap/",
                env!("CARGO_PKG_VERSION"),
                " (image-caption research dataset builder)"
            )
            .into(),
            disallowed_robots_tags: vec![
                "noai".into(),
                "noimageai".into(),
                "noindex".into(),
                "noimageindex".into(),
            ],
        }
    }
}

impl CcConfig {
    /// The download settings.
    pub fn fetch_policy(&self) -> FetchPolicy {
        FetchPolicy {
            timeout_secs: self.timeout_secs,
            user_agent: self.user_agent.clone(),
            max_redirects: self.max_redirects,
            concurrency: self.concurrency,
            retries: self.retries,
            retry_backoff_ms: self.retry_backoff_ms,
            max_image_bytes: self.max_image_bytes,
            disallowed_robots_tags: self.disallowed_robots_tags.clone(),
        }
    }
}

impl CcConfig {
    fn image_spec(&self) -> ImageSpec {
        ImageSpec {
            size: self.image_size,
            mode: self.resize_mode,
            only_if_bigger: self.resize_only_if_bigger,
            jpeg_quality: self.jpeg_quality.clamp(1, 100),
            subsample_chroma: self.jpeg_chroma_subsampling,
            max_pixels: self.max_pixels,
        }
    }
}

/// What a run does with one shard.
#[derive(Debug)]
enum ShardPlan {
    /// Not finished yet: download every row.
    Fresh { expected: usize },
    /// Finished, `--retry-failed`: download only these (failed) keys and merge.
    Retry { keys: HashSet<String> },
}

impl ShardPlan {
    fn expected(&self) -> usize {
        match self {
            ShardPlan::Fresh { expected } => *expected,
            ShardPlan::Retry { keys } => keys.len(),
        }
    }
}

/// One row on its way through the pipeline.
#[derive(Debug)]
struct Job {
    shard: u32,
    key: String,
    url: String,
    caption: String,
}

struct Fetched {
    job: Job,
    result: std::result::Result<Vec<u8>, FetchFailure>,
}

/// Downloads and shards the CC TSV at `cfg.input` into `data/cc/<split>/`.
///
/// Shard `s` holds rows `[s*shard_size, (s+1)*shard_size)` of the TSV, sorted by key, so a
/// resumed or interrupted run produces the same shards as an uninterrupted one. Finished
/// shards are skipped; with `opts.retry_failed` their failed samples are fetched again and
/// the shard is rewritten with the new outcomes.
pub fn run(
    cfg: &CcConfig,
    run: &RunConfig,
    workdir: &Path,
    opts: &IngestOptions,
) -> Result<SourceSummary> {
    if cfg.input.is_empty() {
        return Err(Error::Config(
            "ingest.cc.input is empty: set it to the Conceptual Captions TSV (caption TAB url), \
             e.g. --set ingest.cc.input=Train_GCC-training.tsv"
                .into(),
        ));
    }
    if cfg.shard_size == 0 || cfg.concurrency == 0 {
        return Err(Error::Config(
            "ingest.cc.shard_size and ingest.cc.concurrency must be > 0".into(),
        ));
    }
    if !(cfg.timeout_secs.is_finite() && cfg.timeout_secs > 0.0 && cfg.timeout_secs <= 86_400.0) {
        return Err(Error::Config(format!(
            "ingest.cc.timeout_secs = {}: give seconds in (0, 86400]",
            cfg.timeout_secs
        )));
    }
    let input = resolve(workdir, &cfg.input);
    let total = tsv::validate(&input, cfg.max_rows)?;
    let set = ShardSet::in_root(&opts.root, workdir, "cc", &cfg.split);
    set.prepare()?;
    let shard_size = cfg.shard_size as u64;
    let n_shards = u32::try_from(total.div_ceil(shard_size))
        .map_err(|_| Error::Config("too many shards: raise ingest.cc.shard_size".into()))?;
    let source = provenance(&input, cfg)?;
    let sharding = &opts.sharding;
    sharding.plan_shards(set.rel(), &source, n_shards)?;
    let finished: HashSet<u32> = set.finished()?.into_iter().collect();
    let mut plan = BTreeMap::new();
    let owned: Vec<u32> = (0..n_shards).filter(|&s| sharding.owns(s)).collect();
    for &shard in &owned {
        let start = u64::from(shard) * shard_size;
        let expected = (total - start).min(shard_size) as usize;
        // A finished shard is kept only if this run would write the same rows the same way:
        // same input bytes, shard size and image settings, and the same row count (a raised
        // max_rows fills the last shard further).
        let current = finished.contains(&shard)
            && set
                .read_stats(shard)
                .is_ok_and(|s| s.source == source && s.count == expected as u64);
        if !current {
            plan.insert(shard, ShardPlan::Fresh { expected });
        } else if opts.retry_failed && set.read_stats(shard)?.failed() > 0 {
            let keys = set
                .read::<ImageTextSample>(shard)?
                .into_iter()
                .filter(|s| !s.status.is_success())
                .map(|s| s.key)
                .collect();
            plan.insert(shard, ShardPlan::Retry { keys });
        }
    }
    let work: u64 = plan.values().map(|p| p.expected() as u64).sum();
    let skipped = owned.len() - plan.len();
    let written = if work > 0 {
        let progress = Progress::new("cc", "images", Some(work));
        let written = Pipeline {
            cfg,
            run,
            set: &set,
            plan: &plan,
            input: &input,
            source: &source,
            total,
            progress: &progress,
        }
        .execute()?;
        progress.finish(&format!(
            "({written} shards written, {skipped} already done)"
        ));
        written
    } else {
        eprintln!(
            "[cc] all {} of the {n_shards} shards of {} that this process owns are already done",
            owned.len(),
            input.display()
        );
        0
    };
    let (mut rows, mut failed) = (0, 0);
    for shard in set
        .finished()?
        .into_iter()
        .filter(|&s| s < n_shards && sharding.owns(s))
    {
        let stats = set.read_stats(shard)?;
        rows += stats.count;
        failed += stats.failed();
    }
    Ok(SourceSummary {
        source: "cc".into(),
        splits: vec![SplitSummary {
            dataset: "cc".into(),
            split: cfg.split.clone(),
            shards_written: written,
            shards_skipped: skipped,
            rows,
            failed,
        }],
    })
}

/// What the shards of `input` are made from, recorded as their stats' `source`: the TSV
/// (path and sha256), the shard size and every setting that changes a stored image.
fn provenance(input: &Path, cfg: &CcConfig) -> Result<String> {
    let digest = sha256_file(input)?;
    Ok(format!(
        "{} sha256={} shard_size={} {:?}",
        input.display(),
        &digest[..16],
        cfg.shard_size,
        cfg.image_spec()
    ))
}

fn resolve(workdir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        workdir.join(p)
    }
}

/// The threads of one CC ingest: TSV reader → downloader → image workers → shard writer.
struct Pipeline<'a> {
    cfg: &'a CcConfig,
    run: &'a RunConfig,
    set: &'a ShardSet,
    plan: &'a BTreeMap<u32, ShardPlan>,
    input: &'a Path,
    /// The shards' provenance, see [`provenance`].
    source: &'a str,
    total: u64,
    progress: &'a Progress,
}

impl Pipeline<'_> {
    /// Runs the threads; returns the number of shards written. The first error stops the
    /// others (their channel ends close) and is returned; unfinished shards are not written.
    fn execute(&self) -> Result<usize> {
        let cap = self.run.channel_capacity.max(1);
        let fetcher = Fetcher::new(&self.cfg.fetch_policy())?;
        let spec = self.cfg.image_spec();
        let (job_tx, job_rx) = bounded::<Job>(cap);
        let (fetched_tx, fetched_rx) = bounded::<Fetched>(cap);
        let (sample_tx, sample_rx) = bounded::<(u32, ImageTextSample)>(cap);
        std::thread::scope(|scope| {
            let reader = scope.spawn(move || self.read_rows(job_tx));
            let concurrency = self.cfg.concurrency;
            let downloader =
                scope.spawn(move || download_loop(&fetcher, job_rx, fetched_tx, concurrency));
            for _ in 0..self.run.worker_threads() {
                let (rx, tx) = (fetched_rx.clone(), sample_tx.clone());
                scope.spawn(move || {
                    for fetched in rx {
                        let shard = fetched.job.shard;
                        if tx.send((shard, prepare_sample(fetched, &spec))).is_err() {
                            break;
                        }
                    }
                });
            }
            drop((fetched_rx, sample_tx));
            let written = self.write_shards(sample_rx);
            let read = reader
                .join()
                .unwrap_or_else(|_| Err(panicked("TSV reader")));
            let downloaded = downloader
                .join()
                .unwrap_or_else(|_| Err(panicked("downloader")));
            read?;
            downloaded?;
            written
        })
    }

    fn read_rows(&self, jobs: Sender<Job>) -> Result<()> {
        let mut reader = TsvReader::open(self.input)?;
        let shard_size = self.cfg.shard_size as u64;
        while let Some(row) = reader.next_row()? {
            if row.index >= self.total {
                break;
            }
            let shard = (row.index / shard_size) as u32;
            let wanted = match self.plan.get(&shard) {
                None => false,
                Some(ShardPlan::Fresh { .. }) => true,
                Some(ShardPlan::Retry { keys }) => keys.contains(&row.key()),
            };
            if wanted {
                let job = Job {
                    shard,
                    key: row.key(),
                    url: row.url,
                    caption: row.caption,
                };
                if jobs.send(job).is_err() {
                    break; // the writer stopped; its error is reported
                }
            }
        }
        Ok(())
    }

    /// Collects samples per shard and writes each shard as soon as it is complete.
    fn write_shards(&self, samples: Receiver<(u32, ImageTextSample)>) -> Result<usize> {
        let mut pending: HashMap<u32, (Instant, Vec<ImageTextSample>)> = HashMap::new();
        let mut written = 0;
        for (shard, sample) in samples {
            self.progress.inc(1);
            let entry = pending
                .entry(shard)
                .or_insert_with(|| (Instant::now(), Vec::new()));
            entry.1.push(sample);
            let plan = &self.plan[&shard];
            if entry.1.len() == plan.expected() {
                let (started, rows) = pending.remove(&shard).expect("entry exists");
                self.finish_shard(shard, plan, rows, started.elapsed())?;
                written += 1;
            }
        }
        // Every planned sample comes back (a failure is a sample too), so a shard still open
        // means the input did not hold the rows the plan expected.
        if let Some((shard, (_, rows))) = pending.iter().min_by_key(|(s, _)| **s) {
            return Err(Error::Invalid(format!(
                "cc shard {shard} of {} got {} of its {} planned samples; nothing of it was written",
                self.input.display(),
                rows.len(),
                self.plan[shard].expected()
            )));
        }
        Ok(written)
    }

    fn finish_shard(
        &self,
        shard: u32,
        plan: &ShardPlan,
        fresh: Vec<ImageTextSample>,
        took: Duration,
    ) -> Result<()> {
        let mut rows = match plan {
            ShardPlan::Fresh { .. } => fresh,
            ShardPlan::Retry { .. } => {
                let mut by_key: HashMap<String, ImageTextSample> =
                    fresh.into_iter().map(|s| (s.key.clone(), s)).collect();
                self.set
                    .read::<ImageTextSample>(shard)?
                    .into_iter()
                    .map(|old| by_key.remove(&old.key).unwrap_or(old))
                    .collect()
            }
        };
        rows.sort_by(|a, b| a.key.cmp(&b.key));
        let stats = shard_stats(shard, &rows, took, self.source);
        self.set.write(shard, &rows, &stats)
    }
}

fn panicked(what: &str) -> Error {
    Error::Panicked(what.into())
}

/// Counts outcomes by status for a shard's stats file.
pub fn shard_stats(
    shard: u32,
    rows: &[ImageTextSample],
    took: Duration,
    source: &str,
) -> ShardStats {
    let mut failures = BTreeMap::new();
    for r in rows.iter().filter(|r| !r.status.is_success()) {
        *failures.entry(r.status.as_str().to_string()).or_insert(0) += 1;
    }
    let successes = rows.iter().filter(|r| r.status.is_success()).count() as u64;
    ShardStats {
        shard,
        count: rows.len() as u64,
        successes,
        failures,
        duration_secs: took.as_secs_f64(),
        source: source.to_string(),
        bytes: 0,
    }
}

/// Turns a download outcome into a stored sample (decode + resize + JPEG on success).
fn prepare_sample(fetched: Fetched, spec: &ImageSpec) -> ImageTextSample {
    let Job {
        key, url, caption, ..
    } = fetched.job;
    let bytes = match fetched.result {
        Ok(bytes) => bytes,
        Err(f) => return ImageTextSample::failed(key, url, caption, f.status, f.message),
    };
    match resize::prepare(&bytes, spec) {
        Ok(p) => ImageTextSample {
            key,
            url,
            caption,
            status: SampleStatus::Success,
            error: None,
            width: Some(p.width),
            height: Some(p.height),
            original_width: Some(p.original_width),
            original_height: Some(p.original_height),
            sha256: Some(p.sha256),
            image: Some(p.jpeg),
        },
        Err(msg) => ImageTextSample::failed(key, url, caption, SampleStatus::DecodeError, msg),
    }
}

/// Keeps up to `concurrency` downloads in flight on a single-threaded tokio runtime, taking
/// jobs from `jobs` and passing outcomes on as they complete. Blocking on the output channel
/// when the image workers are busy is the backpressure that keeps memory flat.
fn download_loop(
    fetcher: &Fetcher,
    jobs: Receiver<Job>,
    out: Sender<Fetched>,
    concurrency: usize,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Http(format!("cannot start the download runtime: {e}")))?;
    rt.block_on(async {
        let fetch = |job: Job| async move {
            let result = fetcher.fetch(&job.url).await;
            Fetched { job, result }
        };
        let mut inflight = FuturesUnordered::new();
        let mut input_open = true;
        loop {
            while input_open && inflight.len() < concurrency {
                match jobs.try_recv() {
                    Ok(job) => inflight.push(fetch(job)),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => input_open = false,
                }
            }
            if inflight.is_empty() {
                if !input_open {
                    break;
                }
                // Nothing in flight, so blocking this thread for input stalls nothing.
                match jobs.recv() {
                    Ok(job) => inflight.push(fetch(job)),
                    Err(_) => input_open = false,
                }
                continue;
            }
            let done = if input_open && inflight.len() < concurrency {
                // Room for more: wake up shortly to look for new jobs.
                match tokio::time::timeout(Duration::from_millis(2), inflight.next()).await {
                    Ok(done) => done,
                    Err(_) => continue,
                }
            } else {
                inflight.next().await
            };
            if let Some(fetched) = done {
                if out.send(fetched).is_err() {
                    break;
                }
            }
        }
    });
    Ok(())
}
