//! An object-store workdir against a local S3-compatible server (moto's, started here):
//! two ingest workers write to `s3://…` (a shard larger than one part goes up as a multipart
//! upload), merge names the missing worker's shards and then records the run in the bucket,
//! pyarrow reads every shard back from S3 byte-identical to a local single-process run, the
//! server refuses a second create of one key, embed works from the store, and an unreachable
//! endpoint, a missing bucket or missing credentials are clear errors. Python with moto and
//! pyarrow comes from `.ci/run` (`PREFCAP_TEST_PYTHON`); without it the test is skipped,
//! saying so (under CI it fails).

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use prefcap::testkit::s3::MotoServer;
use sha2::{Digest, Sha256};

const BUCKET: &str = "prefcap-test";

fn python() -> Option<PathBuf> {
    let python = std::env::var_os("PREFCAP_TEST_PYTHON").map(PathBuf::from);
    let usable = python.filter(|p| {
        Command::new(p)
            .args(["-c", "import moto.server, boto3, pyarrow.fs"])
            .status()
            .is_ok_and(|s| s.success())
    });
    common::needed_tool(
        "Python with moto[server] and pyarrow (PREFCAP_TEST_PYTHON)",
        usable,
    )
}

fn check(python: &Path, endpoint: &str, args: &[&str]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/s3_check.py");
    let out = Command::new(python)
        .arg(script)
        .arg(endpoint)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "s3_check.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

const SETS: [&str; 7] = [
    "ingest.synthetic.train_images=128",
    "ingest.synthetic.val_images=16",
    "ingest.synthetic.shard_size=64",
    "ingest.synthetic.pairs_per_image=1",
    "ingest.synthetic.train_stories=0",
    "ingest.synthetic.val_stories=0",
    "clip.model=\"tiny\"",
];

/// `pipeline ARGS --set …` with the S3 environment (`env` adds or, with `None`, removes).
fn run(work: &Path, args: &[&str], env: &[(&str, Option<&str>)]) -> (Output, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pipeline"));
    cmd.args(args).current_dir(work).env("PREFCAP_QUIET", "1");
    for s in SETS
        .iter()
        .chain(&["embed.datasets=[\"synthetic\"]", "embed.batch_size=16"])
    {
        cmd.args(["--set", s]);
    }
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.output().unwrap();
    let text = common::transcript(args, &out);
    (out, text)
}

fn sha256(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

#[test]
fn workers_write_shards_to_s3_that_merge_checks_and_pyarrow_reads_back() {
    let Some(python) = python() else { return };
    // Parts as small as prefcap's test part size (S3's own minimum is 5 MiB).
    let server = MotoServer::start(&python, Some(1024)).unwrap();
    let endpoint = server.endpoint();
    server.create_bucket(BUCKET).unwrap();
    // The server honours create-if-absent, which the markers rely on.
    let twice = check(
        &python,
        endpoint,
        &["create-twice", BUCKET, "probe/marker.json"],
    );
    assert_eq!(twice["first"], "ok");
    assert_eq!(twice["second"], "PreconditionFailed", "{twice}");
    assert_eq!(twice["body"], "first");

    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().join("local");
    let local_dir = local.to_string_lossy().into_owned();
    let client = server.client_env();
    let mut env: Vec<(&str, Option<&str>)> =
        client.iter().map(|(k, v)| (*k, Some(v.as_str()))).collect();
    env.extend([
        // A 64-image shard (~110 KB) is larger than one part: a multipart upload.
        ("PREFCAP_UPLOAD_PART_BYTES", Some("65536")),
        ("PREFCAP_LOCAL_DIR", Some(local_dir.as_str())),
    ]);
    let workdir = format!("s3://{BUCKET}/job");
    let cwd = tmp.path();
    let worker = |i: &str| {
        run(
            cwd,
            &[
                "run",
                "ingest",
                "--num-workers",
                "2",
                "--worker-index",
                i,
                "--workdir",
                &workdir,
            ],
            &env,
        )
    };
    let merge = || {
        run(
            cwd,
            &[
                "merge",
                "ingest",
                "--num-workers",
                "2",
                "--workdir",
                &workdir,
            ],
            &env,
        )
    };

    let (out, text) = worker("0");
    assert!(out.status.success(), "{text}");
    let (out, text) = merge();
    assert!(!out.status.success(), "{text}");
    // Worker 1 owns shard 1 of train and of the pairs' train; val has one shard (worker 0's).
    for missing in [
        "data/synthetic/train/part-00001 (worker 1)",
        "data/synthetic_prefs/train/part-00001 (worker 1)",
    ] {
        assert!(text.contains(missing), "{missing}\n{text}");
    }
    assert!(!text.contains("(worker 0)"), "{text}");
    let (out, text) = worker("1");
    assert!(out.status.success(), "{text}");
    let (out, text) = merge();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("record in s3://{BUCKET}/job/runs/ingest-")),
        "{text}"
    );

    // pyarrow reads every shard back from S3; each is the single-process run's, byte for byte.
    let alone = tmp.path().join("alone");
    std::fs::create_dir_all(&alone).unwrap();
    let (out, text) = common::pipeline(
        &[
            &["run", "ingest"][..],
            &SETS.iter().flat_map(|s| ["--set", s]).collect::<Vec<_>>(),
        ]
        .concat(),
        &alone,
    );
    assert!(out.status.success(), "{text}");
    for (set, shards) in [
        ("synthetic/train", 2),
        ("synthetic/val", 1),
        ("synthetic_prefs/train", 2),
    ] {
        let listed = check(
            &python,
            endpoint,
            &["inspect", BUCKET, &format!("job/data/{set}")],
        );
        let listed: BTreeMap<String, serde_json::Value> = serde_json::from_value(listed).unwrap();
        assert_eq!(listed.len(), shards, "{set}: {listed:?}");
        for (name, object) in &listed {
            let mine = alone.join("data").join(set).join(name);
            assert_eq!(object["sha256"], sha256(&mine), "{set}/{name}");
            assert!(object["rows"].as_u64().unwrap() > 0);
        }
        if set == "synthetic/train" {
            let etag = listed["part-00000.parquet"]["etag"].as_str().unwrap();
            assert!(
                etag.ends_with("-2"),
                "a 2-part multipart upload's ETag, got {etag}"
            );
        }
    }

    // embed reads its shards from the store (copied locally) and puts its entries there.
    let (out, text) = run(cwd, &["run", "embed", "--workdir", &workdir], &env);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("[embed] copied 3 shard(s)"), "{text}");
    let cache = check(&python, endpoint, &["list", BUCKET, "job/cache/"]);
    let cache: Vec<String> = serde_json::from_value(cache).unwrap();
    // An image and a text entry per shard, each a data file and its manifest.
    assert_eq!(cache.len(), 12, "{cache:?}");
    assert_eq!(
        cache.iter().filter(|k| k.ends_with(".json")).count(),
        6,
        "{cache:?}"
    );

    // Bad input: each a clear error naming what is wrong.
    let mut no_keys = env.clone();
    no_keys.retain(|(k, _)| *k != "AWS_ACCESS_KEY_ID");
    no_keys.push(("AWS_ACCESS_KEY_ID", None));
    let (out, text) = run(cwd, &["run", "ingest", "--workdir", &workdir], &no_keys);
    assert!(!out.status.success());
    assert!(
        text.contains("no credentials for bucket `prefcap-test`"),
        "{text}"
    );
    let (out, text) = run(
        cwd,
        &["run", "ingest", "--workdir", "s3://no-such-bucket/x"],
        &env,
    );
    assert!(!out.status.success());
    assert!(
        text.contains("s3://no-such-bucket/x") && text.contains("NoSuchBucket"),
        "{text}"
    );
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let mut unreachable = env.clone();
    unreachable.retain(|(k, _)| *k != "AWS_ENDPOINT_URL");
    unreachable.push(("AWS_ENDPOINT_URL", Some(&closed)));
    let (out, text) = run(cwd, &["run", "ingest", "--workdir", &workdir], &unreachable);
    assert!(!out.status.success());
    assert!(
        text.contains(&format!("object store {workdir}: cannot list the workdir")),
        "{text}"
    );
}
