//! `pipeline bench ingest`'s job-array row: `--workers` ingest worker processes
//! (`--num-workers`, one download thread pool each) writing their shards to a local S3 server
//! (moto's, from the bench venv) through the object-store workdir, timed together from the
//! first start to the last exit, then merged; beside it the bench's one process writing to
//! local disk.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};

use crate::bench::{ensure_venv, measure, write_tsv, BenchIngestArgs, Measured};
use crate::testkit::loopback::LoopbackServer;
use crate::testkit::s3::MotoServer;

const BUCKET: &str = "prefcap-bench";

/// The aggregate of `args.workers` ingest workers writing `n` images to S3.
pub(crate) fn run_workers(
    args: &BenchIngestArgs,
    dir: &Path,
    server: &LoopbackServer,
    n: usize,
) -> anyhow::Result<Measured> {
    let python = ensure_venv(
        &args.venv,
        &["moto[server]", "boto3"],
        "import moto.server, boto3",
    )?;
    let moto = MotoServer::start(&python, None).context("cannot start moto's S3 server")?;
    moto.create_bucket(BUCKET)?;

    let tsv = dir.join("input-s3.tsv");
    write_tsv(&tsv, server, n, false)?;
    let workers = args.workers.max(1);
    let workdir = format!("s3://{BUCKET}/ingest");
    let command = |extra: &[String]| {
        let mut cmd = Command::new(std::env::current_exe().expect("the bench's own binary"));
        cmd.args(extra)
            .args(["--workdir", &workdir])
            .envs(moto.client_env())
            .env("PREFCAP_QUIET", "1")
            .env("PREFCAP_LOCAL_DIR", dir.join("s3-local"));
        for set in [
            "ingest.sources=[\"cc\"]".to_string(),
            format!("ingest.cc.input={}", tsv.display()),
            "ingest.cc.shard_size=1000".into(),
            // The same downloads in flight and threads in all as the one local process.
            format!(
                "ingest.cc.concurrency={}",
                (args.concurrency / workers).max(1)
            ),
            "run.workers=1".into(),
            "ingest.cc.retries=0".into(),
        ] {
            cmd.arg("--set").arg(set);
        }
        cmd
    };
    eprintln!("prefcap ingest of {n} images by {workers} workers to S3 (moto) ...");
    let start = Instant::now();
    let runs: Vec<anyhow::Result<Measured>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|i| {
                let cmd = command(&[
                    "run".into(),
                    "ingest".into(),
                    "--num-workers".into(),
                    workers.to_string(),
                    "--worker-index".into(),
                    i.to_string(),
                ]);
                scope.spawn(move || measure(cmd, &format!("worker {i}"), None))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a worker thread panicked"))
            })
            .collect()
    });
    let wall = start.elapsed().as_secs_f64();
    let runs: Vec<Measured> = runs.into_iter().collect::<anyhow::Result<_>>()?;
    let merged = command(&[
        "merge".into(),
        "ingest".into(),
        "--num-workers".into(),
        workers.to_string(),
    ])
    .stdout(Stdio::null())
    .status()?;
    if !merged.success() {
        bail!("merge found the workers' shards incomplete");
    }
    Ok(Measured {
        wall,
        cpu: runs.iter().map(|m| m.cpu).sum(),
        // The workers ran at once: their peaks add up (an upper bound on the sum's peak).
        peak_rss_mib: runs.iter().map(|m| m.peak_rss_mib).sum(),
        peak_gpu_mib: None,
    })
}
