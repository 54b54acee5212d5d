//! The `pipeline` binary from the outside: the embedded default, stage runs, validation
//! and configuration errors. Failing tests print the command and its stderr.

mod common;
use common::pipeline;

use std::path::Path;

use prefcap::data::records::{ImageTextSample, PreferencePair, Record, StoryFrame};
use prefcap::data::shard::{read_parquet, ShardSet};

fn parquet_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    files
}

fn assert_schema<R: Record>(path: &Path) {
    let file = std::fs::File::open(path).unwrap();
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let got = reader.schema();
    let want = R::schema();
    let names = |s: &arrow::datatypes::Schema| -> Vec<(String, String)> {
        s.fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().to_string()))
            .collect()
    };
    assert_eq!(names(got), names(&want), "{}", path.display());
}

#[test]
fn run_ingest_on_the_synthetic_source_writes_documented_files() {
    let dir = tempfile::tempdir().unwrap();
    let (out, log) = pipeline(
        &[
            "run",
            "ingest",
            "--workdir",
            ".",
            "--set",
            "ingest.synthetic.train_images=40",
            "--set",
            "ingest.synthetic.val_images=12",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{log}");
    for (dataset, split) in [("synthetic", "train"), ("synthetic", "val")] {
        let set = ShardSet::new(dir.path(), dataset, split);
        let files = parquet_files(set.dir());
        assert!(!files.is_empty(), "{dataset}/{split}: no shards\n{log}");
        for f in &files {
            assert_schema::<ImageTextSample>(f);
            assert!(
                f.with_extension("stats.json").is_file(),
                "{} has no stats file",
                f.display()
            );
        }
    }
    let images: Vec<ImageTextSample> = ShardSet::new(dir.path(), "synthetic", "train")
        .read_all()
        .unwrap();
    assert_eq!(images.len(), 40);
    for f in parquet_files(ShardSet::new(dir.path(), "synthetic_prefs", "train").dir()) {
        assert_schema::<PreferencePair>(&f);
        assert!(!read_parquet::<PreferencePair>(&f).unwrap().is_empty());
    }
    for f in parquet_files(ShardSet::new(dir.path(), "synthetic_stories", "train").dir()) {
        assert_schema::<StoryFrame>(&f);
    }
    // The resolved config was saved into the run directory.
    let runs: Vec<_> = std::fs::read_dir(dir.path().join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1);
    let saved = std::fs::read_to_string(runs[0].join("config.toml")).unwrap();
    assert!(saved.contains("train_images = 40"), "{saved}");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(runs[0].join("run.json")).unwrap()).unwrap();
    assert_eq!(record["steps"][0][1]["outcome"], "done", "{record}");
}

#[test]
fn default_pipeline_runs_what_is_built_and_names_what_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let (out, log) = pipeline(
        &[
            "run",
            "--set",
            "ingest.synthetic.train_images=16",
            "--set",
            "ingest.synthetic.val_images=8",
            "--set",
            "pretrain_clip.steps=3",
            "--set",
            "pretrain_clip.batch_size=8",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{log}");
    assert!(log.contains("step ingest: done"), "{log}");
    assert!(log.contains("step pretrain-clip: done"), "{log}");
    assert!(log.contains("step embed: done"), "{log}");
    assert!(log.contains("step train-sft: done"), "{log}");
    for step in [
        "train-dpo",
        "train-orpo",
        "train-reward",
        "train-dico",
        "train-scst",
        "train-rlhf",
        "train-diffusion",
        "refine-diffusion",
        "train-story",
        "generate",
        "score",
        "report",
    ] {
        assert!(log.contains(&format!("step {step}: done")), "{log}");
    }
    // The embedded tiny CLIP was generated, pretrained into the run, and the features cached.
    assert!(dir
        .path()
        .join("cache/models/tiny-clip-v1/model.safetensors")
        .is_file());
    assert!(common::newest_run(dir.path())
        .join("pretrain-clip/model/model.safetensors")
        .is_file());
    assert!(dir.path().join("cache/features-v1").is_dir());
    assert!(!ShardSet::new(dir.path(), "synthetic", "train")
        .finished()
        .unwrap()
        .is_empty());
}

#[test]
fn validate_reports_all_plan_errors_at_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    std::fs::write(
        dir.path().join("pipelines/broken.toml"),
        "[[steps]]\nstage = \"ingest\"\n[[steps]]\nstage = \"embedd\"\ninputs = [\"ingest\"]\n\
         [[steps]]\nstage = \"score\"\ninputs = [\"generate\", \"missing\"]\n\
         [[steps]]\nstage = \"generate\"\ninputs = [\"score\"]\n[config.ingest.cc]\nshard_sze = 1\n",
    )
    .unwrap();
    let (out, log) = pipeline(&["validate", "broken"], dir.path());
    assert!(!out.status.success(), "{log}");
    for needle in [
        "unknown stage `embedd`",
        "input `missing`",
        "cycle",
        "shard_sze",
    ] {
        assert!(log.contains(needle), "missing `{needle}`:\n{log}");
    }
    let (out, log) = pipeline(&["validate", "default"], dir.path());
    assert!(out.status.success(), "{log}");
    assert!(log.contains("train-dpo <- train-sft\n"), "{log}");
    assert!(
        log.contains(
            "generate <- train-sft, train-dpo, train-orpo, train-dico, train-scst, train-rlhf, refine-diffusion, train-story\n"
        ),
        "{log}"
    );
    assert!(log.contains("embed <- ingest, pretrain-clip\n"), "{log}");
    assert!(
        log.contains("refine-diffusion <- train-diffusion, train-reward\n"),
        "{log}"
    );
    assert!(log.contains("train-sft <- embed\n"), "{log}");
    for real in [
        "cc-ultrafeedback-dpo",
        "cc-ultrafeedback-orpo",
        "cc-contrastive-dpo",
        "cc-rlhf",
    ] {
        let (out, log) = pipeline(&["validate", real], dir.path());
        assert!(out.status.success(), "{real}: {log}");
        assert!(log.contains("sample-pairs <- train-sft\n"), "{log}");
        assert!(log.contains("embed <- ingest\n"), "{log}");
    }
    let (out, log) = pipeline(&["validate", "cc-contrastive-dpo"], dir.path());
    assert!(out.status.success(), "{log}");
    assert!(log.contains("train-sft <- train-contrastive\n"), "{log}");
}

#[test]
fn unknown_config_key_is_rejected_naming_the_key_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (out, log) = pipeline(
        &["run", "ingest", "--set", "ingest.synthetic.train_imagez=3"],
        dir.path(),
    );
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("ingest.synthetic") && log.contains("train_imagez"),
        "{log}"
    );
    assert!(
        !dir.path().join("data").exists() && !dir.path().join("runs").exists(),
        "{log}"
    );

    std::fs::write(dir.path().join("my.toml"), "[run]\nseed = 1\nsede = 2\n").unwrap();
    let (out, log) = pipeline(&["run", "ingest", "--config", "my.toml"], dir.path());
    assert!(
        !out.status.success() && log.contains("my.toml") && log.contains("sede"),
        "{log}"
    );
}

#[test]
#[cfg(not(feature = "cuda"))]
fn gpu_flag_without_cuda_build_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (out, log) = pipeline(&["run", "ingest", "--gpu", "0"], dir.path());
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("--features cuda"), "{log}");
}

#[test]
fn list_names_every_stage_and_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let (out, log) = pipeline(&["list"], dir.path());
    assert!(out.status.success(), "{log}");
    for s in prefcap::stages::STAGES {
        assert!(log.contains(s.name), "{log}");
    }
    assert!(
        [
            "default",
            "ingest-real",
            "cc-ultrafeedback-dpo",
            "cc-ultrafeedback-orpo",
            "contrastive",
            "cc-contrastive-dpo"
        ]
        .iter()
        .all(|p| log.contains(p)),
        "{log}"
    );
}
