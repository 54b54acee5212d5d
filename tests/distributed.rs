//! A job array without a scheduler: four `pipeline` workers (indices from
//! `SLURM_ARRAY_TASK_ID`) ingest the synthetic world and a loopback-served CC TSV into one
//! workdir; one is killed with SIGKILL in the middle of a shard; `pipeline merge` names
//! exactly its unfinished shards; the resubmitted worker finishes them and merge records the
//! run; every shard is byte-identical to a single-process run's.

mod common;

use std::collections::BTreeSet;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pipeline;
use prefcap::testkit::loopback::{LoopbackServer, Reply};

const WORKERS: u32 = 4;
const CC_ROWS: u32 = 32;
const CC_SHARD: u32 = 4;
/// Worker 3 owns CC shards 3 and 7; the images of shard 3 hang until released.
const VICTIM: u32 = 3;

fn png(seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([(x * 7 + seed) as u8, (y * 5) as u8, (seed * 31) as u8])
    });
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn sets(tsv: &Path) -> Vec<String> {
    [
        "ingest.sources=[\"synthetic\", \"cc\"]",
        "ingest.synthetic.train_images=40",
        "ingest.synthetic.val_images=12",
        "ingest.synthetic.shard_size=8",
        "ingest.synthetic.pairs_per_image=1",
        "ingest.synthetic.train_stories=4",
        "ingest.synthetic.val_stories=2",
        "ingest.synthetic.frames_per_story=3",
        "ingest.cc.shard_size=4",
        "ingest.cc.image_size=32",
        "ingest.cc.timeout_secs=60",
        "ingest.cc.retries=0",
        "ingest.cc.concurrency=4",
        "run.workers=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("ingest.cc.input={}", tsv.display())])
    .collect()
}

fn args<'a>(command: &[&'a str], sets: &'a [String]) -> Vec<&'a str> {
    let mut out = command.to_vec();
    for s in sets {
        out.extend(["--set", s.as_str()]);
    }
    out
}

fn spawn_worker(work: &Path, index: u32, sets: &[String]) -> Child {
    let log = std::fs::File::create(work.join(format!("worker-{index}.log"))).unwrap();
    Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(args(&["run", "ingest", "--num-workers", "4"], sets))
        .current_dir(work)
        .env("SLURM_ARRAY_TASK_ID", index.to_string())
        .env("PREFCAP_QUIET", "1")
        .stdout(Stdio::null())
        .stderr(log.try_clone().unwrap())
        .spawn()
        .unwrap()
}

/// Every file under `dir/data`, relative, with its bytes, except the stats files (they
/// record wall times).
fn parquet_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                out.push((rel, std::fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &dir.join("data"), &mut out);
    out.sort();
    out
}

#[test]
fn a_killed_worker_is_named_by_merge_and_its_resubmission_completes_the_job() {
    let hold = Arc::new(AtomicBool::new(true));
    let held = Arc::new(AtomicU64::new(0));
    let server = {
        let (hold, held) = (hold.clone(), held.clone());
        LoopbackServer::start(Arc::new(move |req| {
            let Some(i) = req
                .path
                .strip_prefix("/img/")
                .and_then(|p| p.strip_suffix(".png"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                return Reply::status(404);
            };
            if i / CC_SHARD == VICTIM && hold.load(Ordering::SeqCst) {
                held.fetch_add(1, Ordering::SeqCst);
                let until = Instant::now() + Duration::from_secs(60);
                while hold.load(Ordering::SeqCst) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Reply::ok(png(i), "image/png")
        }))
        .unwrap()
    };
    let inputs = tempfile::tempdir().unwrap();
    let tsv = inputs.path().join("cc.tsv");
    let rows: String = (0..CC_ROWS)
        .map(|i| {
            format!(
                "a picture number {i}\t{}\n",
                server.url(&format!("/img/{i}.png"))
            )
        })
        .collect();
    std::fs::write(&tsv, rows).unwrap();
    let sets = sets(&tsv);

    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let mut workers: Vec<Child> = (0..WORKERS).map(|i| spawn_worker(work, i, &sets)).collect();
    let log = |i: u32| std::fs::read_to_string(work.join(format!("worker-{i}.log"))).unwrap();
    for (i, child) in workers
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| *i as u32 != VICTIM)
    {
        let status = child.wait().unwrap();
        assert!(status.success(), "worker {i}:\n{}", log(i as u32));
    }
    // The victim is inside shard 3 once the server holds one of its images.
    let deadline = Instant::now() + Duration::from_secs(120);
    while held.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "worker 3 never reached shard 3:\n{}",
            log(VICTIM)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let victim = &mut workers[VICTIM as usize];
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    hold.store(false, Ordering::SeqCst);

    // Merge refuses, naming exactly the victim's unfinished shards and their owner.
    let cc_dir = work.join("data/cc/train");
    let finished = |shard: u32| cc_dir.join(format!("part-{shard:05}.stats.json")).is_file();
    let expected: BTreeSet<String> = (0..CC_ROWS / CC_SHARD)
        .filter(|s| s % WORKERS == VICTIM && !finished(*s))
        .map(|s| format!("data/cc/train/part-{s:05} (worker {VICTIM})"))
        .collect();
    assert!(
        expected.contains("data/cc/train/part-00003 (worker 3)"),
        "{expected:?}"
    );
    let (out, text) = pipeline(
        &args(&["merge", "ingest", "--num-workers", "4"], &sets),
        work,
    );
    assert!(!out.status.success(), "{text}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let named: BTreeSet<String> = stderr
        .lines()
        .filter_map(|l| l.trim().split_once(": ").map(|(unit, _)| unit.to_string()))
        .filter(|unit| unit.starts_with("data/"))
        .collect();
    assert_eq!(named, expected, "{text}");
    assert!(stderr.contains("resubmit worker(s) 3 of 4"), "{text}");
    assert!(
        !work.join("runs").exists(),
        "merge recorded an incomplete job"
    );

    let (out, text) = pipeline(
        &args(&["status", "ingest", "--num-workers", "4"], &sets),
        work,
    );
    assert!(out.status.success(), "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("no record yet (running, pending or killed): worker(s) 3"),
        "{text}"
    );

    // The resubmitted worker redoes only its unfinished shards; merge then records the run.
    let stats_before: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&cc_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".stats.json"))
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    let status = spawn_worker(work, VICTIM, &sets).wait().unwrap();
    assert!(status.success(), "{}", log(VICTIM));
    for (path, bytes) in &stats_before {
        assert_eq!(
            &std::fs::read(path).unwrap(),
            bytes,
            "{} was rewritten",
            path.display()
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(&cc_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "the killed worker's temporaries stayed: {leftovers:?}"
    );
    let (out, text) = pipeline(
        &args(&["merge", "ingest", "--num-workers", "4"], &sets),
        work,
    );
    assert!(out.status.success(), "{text}");
    let run = common::newest_run(work);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("run.json")).unwrap()).unwrap();
    let details = &record["steps"][0][1]["details"];
    assert_eq!(details["num_workers"], 4, "{record}");
    assert_eq!(details["workers"].as_array().unwrap().len(), 4, "{record}");
    let cc = details["sets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["set"] == "data/cc/train")
        .unwrap();
    assert_eq!(cc["finished"], CC_ROWS / CC_SHARD, "{record}");

    // One process on its own writes the same shards, byte for byte.
    let single = tempfile::tempdir().unwrap();
    let (out, text) = pipeline(&args(&["run", "ingest"], &sets), single.path());
    assert!(out.status.success(), "{text}");
    let (sharded, alone) = (parquet_files(work), parquet_files(single.path()));
    let names = |f: &[(PathBuf, Vec<u8>)]| f.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
    assert_eq!(names(&sharded), names(&alone));
    assert!(sharded.len() > 20, "{:?}", names(&sharded));
    for ((path, a), (_, b)) in sharded.iter().zip(&alone) {
        assert!(
            a == b,
            "{} differs from the single-process run's",
            path.display()
        );
    }
}
