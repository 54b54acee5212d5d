//! Conceptual Captions ingest against a loopback image server that also misbehaves:
//! every sample gets the right status, nothing is lost, stats add up, an interrupted run
//! resumes to the same shards, and `--retry-failed` fetches only what failed.

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prefcap::data::records::{ImageTextSample, SampleStatus};
use prefcap::data::shard::ShardSet;
use prefcap::pipeline::config::Config;
use prefcap::stages::ingest::{Ingest, Source, SourceSummary};
use prefcap::stages::Stage;
use prefcap::testkit::loopback::{Fault, LoopbackServer, Reply};

fn png(w: u32, h: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8 ^ seed, y as u8, seed]));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn cc_config(tsv: &Path, extra: &[&str]) -> Config {
    let mut sets = vec![
        "ingest.sources=[\"cc\"]".to_string(),
        format!("ingest.cc.input={}", tsv.display()),
        "ingest.cc.image_size=32".into(),
        "ingest.cc.timeout_secs=1.0".into(),
        "ingest.cc.retries=0".into(),
        "ingest.cc.retry_backoff_ms=10".into(),
        "ingest.cc.concurrency=8".into(),
        "run.workers=2".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    Config::load(None, None, &sets).unwrap()
}

/// `pipeline run ingest` on `cfg` under `dir` (with `--retry-failed` when asked).
fn ingest(cfg: &Config, dir: &Path, retry_failed: bool) -> prefcap::Result<Vec<SourceSummary>> {
    let mut ctx = cfg.context(dir, "test");
    ctx.retry_failed = retry_failed;
    Ok(Ingest::run(&cfg.stage::<Ingest>()?, &ctx)?.sources)
}

fn write_tsv(path: &Path, urls: &[String]) {
    let text: String = urls
        .iter()
        .enumerate()
        .map(|(i, u)| format!("caption number {i}\t{u}\n"))
        .collect();
    std::fs::write(path, text).unwrap();
}

fn all_rows(workdir: &Path) -> Vec<ImageTextSample> {
    ShardSet::new(workdir, "cc", "train").read_all().unwrap()
}

#[test]
fn every_misbehaviour_maps_to_its_status_and_stats_add_up() {
    let good = Arc::new(png(64, 48, 1));
    let flaky_hits = Arc::new(AtomicU64::new(0));
    let server = {
        let (good, flaky_hits) = (good.clone(), flaky_hits.clone());
        LoopbackServer::start(Arc::new(move |req| match req.path.as_str() {
            "/good.png" => Reply::shared(good.clone(), "image/png"),
            "/missing.jpg" => Reply::status(404),
            "/slow.jpg" => {
                Reply::shared(good.clone(), "image/png").fault(Fault::Delay(Duration::from_secs(3)))
            }
            "/truncated.jpg" => {
                Reply::shared(good.clone(), "image/png").fault(Fault::TruncateAt(good.len() / 2))
            }
            "/corrupt.jpg" => Reply::ok(b"\x89PNG this is not really a png".to_vec(), "image/png"),
            "/huge.jpg" => Reply::ok(vec![0u8; 200_000], "image/jpeg"),
            "/loop" => Reply::redirect(302, "/loop"),
            "/moved.jpg" => Reply::redirect(301, "/good.png"),
            "/to-file.jpg" => Reply::redirect(302, "file:///etc/passwd"),
            "/to-data.jpg" => Reply::redirect(302, "data:image/png;base64,iVBORw0KGgo="),
            "/to-ftp.jpg" => Reply::redirect(307, "ftp://example.invalid/x.jpg"),
            "/nowhere.jpg" => Reply::status(302),
            "/noai.png" => Reply::shared(good.clone(), "image/png").header("X-Robots-Tag", "noai"),
            "/otherbot.png" => {
                Reply::shared(good.clone(), "image/png").header("X-Robots-Tag", "otherbot: noai")
            }
            "/flaky.png" => {
                if flaky_hits.fetch_add(1, Ordering::SeqCst) == 0 {
                    Reply::status(503)
                } else {
                    Reply::shared(good.clone(), "image/png")
                }
            }
            _ => Reply::status(404),
        }))
        .unwrap()
    };
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/gone.jpg", l.local_addr().unwrap())
    };
    let cases: Vec<(String, SampleStatus)> = vec![
        (server.url("/good.png"), SampleStatus::Success),
        (server.url("/missing.jpg"), SampleStatus::HttpError),
        (server.url("/slow.jpg"), SampleStatus::Timeout),
        (server.url("/truncated.jpg"), SampleStatus::Truncated),
        (server.url("/corrupt.jpg"), SampleStatus::DecodeError),
        (server.url("/huge.jpg"), SampleStatus::TooLarge),
        (server.url("/loop"), SampleStatus::RedirectError),
        (server.url("/moved.jpg"), SampleStatus::Success),
        (server.url("/to-file.jpg"), SampleStatus::RedirectError),
        (server.url("/to-data.jpg"), SampleStatus::RedirectError),
        (server.url("/to-ftp.jpg"), SampleStatus::RedirectError),
        (server.url("/nowhere.jpg"), SampleStatus::RedirectError),
        (server.url("/noai.png"), SampleStatus::RobotsDisallowed),
        (server.url("/otherbot.png"), SampleStatus::Success),
        (server.url("/flaky.png"), SampleStatus::Success),
        (closed, SampleStatus::ConnectionError),
        (
            "ftp://example.invalid/x.jpg".to_string(),
            SampleStatus::InvalidUrl,
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let tsv = dir.path().join("cc.tsv");
    write_tsv(&tsv, &cases.iter().map(|c| c.0.clone()).collect::<Vec<_>>());
    let cfg = cc_config(
        &tsv,
        &[
            "ingest.cc.shard_size=5",
            "ingest.cc.retries=1",
            "ingest.cc.max_image_bytes=100000",
        ],
    );
    let summary = ingest(&cfg, dir.path(), false).unwrap();
    assert_eq!(cfg.stage::<Ingest>().unwrap().sources, vec![Source::Cc]);
    let split = &summary[0].splits[0];
    assert_eq!(
        (split.rows, split.shards_written),
        (cases.len() as u64, cases.len().div_ceil(5))
    );

    let rows = all_rows(dir.path());
    assert_eq!(rows.len(), cases.len(), "no sample is lost");
    for (i, (row, (url, want))) in rows.iter().zip(&cases).enumerate() {
        assert_eq!(row.key, format!("{i:09}"));
        assert_eq!(&row.url, url);
        assert_eq!(row.caption, format!("caption number {i}"));
        assert_eq!(row.status, *want, "row {i} ({url}): error {:?}", row.error);
        if want.is_success() {
            let img = image::load_from_memory(row.image.as_ref().unwrap()).unwrap();
            assert_eq!((img.width(), img.height()), (32, 32));
            assert_eq!(
                (row.original_width, row.original_height),
                (Some(64), Some(48))
            );
            assert!(row.error.is_none() && row.sha256.as_ref().unwrap().len() == 64);
        } else {
            assert!(row.image.is_none() && !row.error.as_ref().unwrap().is_empty());
        }
    }
    // A redirect that is not followed says why: the target's scheme, or no Location.
    let error_of = |path: &str| {
        let url = server.url(path);
        rows.iter()
            .find(|r| r.url == url)
            .unwrap()
            .error
            .clone()
            .unwrap()
    };
    for (path, why) in [
        ("/to-file.jpg", "`file:`"),
        ("/to-data.jpg", "`data:`"),
        ("/to-ftp.jpg", "`ftp:`"),
        ("/nowhere.jpg", "no Location"),
        ("/loop", "redirects"),
    ] {
        let error = error_of(path);
        assert!(error.contains(why), "{path}: {error}");
    }
    assert!(error_of("/to-file.jpg").contains("file:///etc/passwd"));
    // The stats files add up to what the shards hold.
    let set = ShardSet::new(dir.path(), "cc", "train");
    let mut by_cause: BTreeMap<String, u64> = BTreeMap::new();
    let (mut count, mut ok) = (0, 0);
    for shard in set.finished().unwrap() {
        let s = set.read_stats(shard).unwrap();
        assert_eq!(s.count, s.successes + s.failed());
        count += s.count;
        ok += s.successes;
        for (k, v) in s.failures {
            *by_cause.entry(k).or_default() += v;
        }
    }
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for (_, s) in cases.iter().filter(|c| !c.1.is_success()) {
        *want.entry(s.as_str().to_string()).or_default() += 1;
    }
    assert_eq!(count, cases.len() as u64);
    assert_eq!(ok, cases.iter().filter(|c| c.1.is_success()).count() as u64);
    assert_eq!(by_cause, want);
}

#[test]
fn malformed_tsv_is_rejected_with_file_and_row_before_any_download() {
    let hits = Arc::new(AtomicU64::new(0));
    let server = {
        let hits = hits.clone();
        LoopbackServer::start(Arc::new(move |_| {
            hits.fetch_add(1, Ordering::SeqCst);
            Reply::status(404)
        }))
        .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let tsv = dir.path().join("broken.tsv");
    std::fs::write(
        &tsv,
        format!("fine\t{}\nno tab on this line\n", server.url("/a.jpg")),
    )
    .unwrap();
    let err = ingest(&cc_config(&tsv, &[]), dir.path(), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("broken.tsv") && err.contains("row 2") && err.contains("no TAB"),
        "{err}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    assert!(ShardSet::new(dir.path(), "cc", "train")
        .finished()
        .unwrap()
        .is_empty());
}

/// Serves distinct images slowly enough that a run can be killed half-way.
fn slow_image_server(delay: Duration) -> LoopbackServer {
    let cache: Arc<Mutex<HashMap<String, Arc<Vec<u8>>>>> = Arc::default();
    LoopbackServer::start(Arc::new(move |req| {
        let seed = req
            .path
            .bytes()
            .fold(0u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
        let body = cache
            .lock()
            .unwrap()
            .entry(req.path.clone())
            .or_insert_with(|| Arc::new(png(40, 30, seed)))
            .clone();
        if req.path.contains("/bad/") {
            return Reply::status(404).fault(Fault::Delay(delay));
        }
        Reply::shared(body, "image/png").fault(Fault::Delay(delay))
    }))
    .unwrap()
}

fn pipeline(workdir: &Path, tsv: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pipeline"));
    cmd.args(["run", "ingest", "--workdir"])
        .arg(workdir)
        .env("PREFCAP_QUIET", "1");
    let mut sets = vec![
        "ingest.sources=[\"cc\"]".to_string(),
        format!("ingest.cc.input={}", tsv.display()),
        "ingest.cc.image_size=16".into(),
        "ingest.cc.shard_size=4".into(),
        "ingest.cc.concurrency=2".into(),
        "ingest.cc.retries=0".into(),
        "run.workers=1".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    cmd
}

fn assert_success(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_killed_run_resumes_to_the_same_shards_and_never_shows_partial_files() {
    let server = slow_image_server(Duration::from_millis(60));
    let dir = tempfile::tempdir().unwrap();
    let tsv = dir.path().join("cc.tsv");
    let urls: Vec<String> = (0..24)
        .map(|i| {
            server.url(&if i % 5 == 3 {
                format!("/bad/{i}.png")
            } else {
                format!("/img/{i}.png")
            })
        })
        .collect();
    write_tsv(&tsv, &urls);

    let reference = dir.path().join("uninterrupted");
    assert_success(&mut pipeline(&reference, &tsv, &[]));

    let resumed = dir.path().join("resumed");
    let set = ShardSet::new(&resumed, "cc", "train");
    let mut child = pipeline(&resumed, &tsv, &[]).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while set.finished().map_or(true, |f| f.len() < 2) {
        assert!(Instant::now() < deadline, "no shard finished in time");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done_before = set.finished().unwrap();
    assert!(
        done_before.len() < 6,
        "the run should have been killed before the end: {done_before:?}"
    );
    // Whatever is visible is complete: every non-hidden parquet file reads back.
    for entry in std::fs::read_dir(set.dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".parquet") && !name.starts_with('.') {
            prefcap::data::shard::read_parquet::<ImageTextSample>(&path).unwrap();
        }
    }
    assert_success(&mut pipeline(&resumed, &tsv, &[]));
    assert_eq!(all_rows(&resumed), all_rows(&reference));
    let hidden: Vec<_> = std::fs::read_dir(set.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "temporary files left behind: {hidden:?}");
}

#[test]
fn retry_failed_fetches_only_the_failed_samples_again() {
    let healed = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let server = {
        let (healed, log) = (healed.clone(), log.clone());
        let body = Arc::new(png(20, 20, 9));
        LoopbackServer::start(Arc::new(move |req| {
            log.lock().unwrap().push(req.path.clone());
            if req.path.starts_with("/sometimes/") && !healed.load(Ordering::SeqCst) {
                Reply::status(404)
            } else {
                Reply::shared(body.clone(), "image/png")
            }
        }))
        .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let tsv = dir.path().join("cc.tsv");
    let urls: Vec<String> = (0..10)
        .map(|i| {
            server.url(&if i % 3 == 0 {
                format!("/sometimes/{i}")
            } else {
                format!("/always/{i}")
            })
        })
        .collect();
    write_tsv(&tsv, &urls);
    let cfg = cc_config(&tsv, &["ingest.cc.shard_size=4"]);
    ingest(&cfg, dir.path(), false).unwrap();
    let failed: Vec<String> = all_rows(dir.path())
        .into_iter()
        .filter(|r| !r.status.is_success())
        .map(|r| r.key)
        .collect();
    assert_eq!(failed, ["000000000", "000000003", "000000006", "000000009"]);

    // A plain re-run does nothing: every shard is finished.
    log.lock().unwrap().clear();
    let again = ingest(&cfg, dir.path(), false).unwrap();
    assert_eq!(
        (
            again[0].splits[0].shards_written,
            again[0].splits[0].shards_skipped
        ),
        (0, 3)
    );
    assert!(log.lock().unwrap().is_empty());

    healed.store(true, Ordering::SeqCst);
    let before = all_rows(dir.path());
    let retried = ingest(&cfg, dir.path(), true).unwrap();
    let mut requested = log.lock().unwrap().clone();
    requested.sort();
    assert_eq!(
        requested,
        [
            "/sometimes/0",
            "/sometimes/3",
            "/sometimes/6",
            "/sometimes/9"
        ]
    );
    assert_eq!(retried[0].splits[0].failed, 0);
    let after = all_rows(dir.path());
    assert_eq!(after.len(), before.len());
    for (b, a) in before.iter().zip(&after) {
        if b.status.is_success() {
            assert_eq!(a, b, "successful samples are kept as they were");
        } else {
            assert_eq!(
                (a.key.as_str(), a.status),
                (b.key.as_str(), SampleStatus::Success)
            );
        }
    }
    let set = ShardSet::new(dir.path(), "cc", "train");
    assert!(set
        .finished()
        .unwrap()
        .iter()
        .all(|s| set.read_stats(*s).unwrap().failed() == 0));
}

#[test]
fn more_rows_or_other_image_settings_redo_exactly_the_shards_they_change() {
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let server = {
        let log = log.clone();
        let body = Arc::new(png(40, 30, 3));
        LoopbackServer::start(Arc::new(move |req| {
            log.lock().unwrap().push(req.path.clone());
            Reply::shared(body.clone(), "image/png")
        }))
        .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let tsv = dir.path().join("cc.tsv");
    let urls: Vec<String> = (0..10).map(|i| server.url(&format!("/{i}"))).collect();
    write_tsv(&tsv, &urls);
    let requested = || {
        let mut r = std::mem::take(&mut *log.lock().unwrap());
        r.sort_by_key(|p| p[1..].parse::<u32>().unwrap());
        r
    };
    let split = |cfg: &Config| {
        let s = ingest(cfg, dir.path(), false).unwrap();
        let s = &s[0].splits[0];
        (s.shards_written, s.shards_skipped, s.rows)
    };

    // Rows 0-5: shard 0 full, shard 1 with 2 of its 4 rows.
    let first = cc_config(&tsv, &["ingest.cc.shard_size=4", "ingest.cc.max_rows=6"]);
    assert_eq!(split(&first), (2, 0, 6));
    assert_eq!(requested().len(), 6);

    // All 10 rows: shard 0 is kept; shard 1 is refilled and shard 2 written.
    let all = cc_config(&tsv, &["ingest.cc.shard_size=4"]);
    assert_eq!(split(&all), (2, 1, 10));
    assert_eq!(
        requested(),
        (4..10).map(|i| format!("/{i}")).collect::<Vec<_>>()
    );
    let keys: Vec<String> = all_rows(dir.path()).into_iter().map(|r| r.key).collect();
    assert_eq!(keys, (0..10).map(|i| format!("{i:09}")).collect::<Vec<_>>());

    // Another stored image size changes every shard, though none changes its row count.
    let smaller = cc_config(&tsv, &["ingest.cc.shard_size=4", "ingest.cc.image_size=16"]);
    assert_eq!(split(&smaller), (3, 0, 10));
    assert_eq!(requested().len(), 10);
    for row in all_rows(dir.path()) {
        let img = image::load_from_memory(row.image.as_deref().unwrap()).unwrap();
        assert_eq!(img.width().min(img.height()), 16, "{}", row.key);
    }
    // And the same settings again are a no-op.
    assert_eq!(split(&smaller), (0, 3, 10));
    assert!(requested().is_empty());
}
