//! train-dpo and train-orpo from the outside: they start from the SFT checkpoint, log TRL's
//! metrics, raise the training reward accuracy, cache the reference log-probabilities once
//! per (reference checkpoint, pair set), and refuse a pair with an empty completion.

mod common;
use common::{newest_run, pipeline};

use std::path::{Path, PathBuf};

use prefcap::records::{MetricRow, PreferencePair};
use prefcap::shard::{read_parquet, write_parquet, ShardSet};

const SMALL: [&str; 10] = [
    "--set",
    "ingest.synthetic.train_images=64",
    "--set",
    "ingest.synthetic.val_images=16",
    "--set",
    "train_sft.epochs=15",
    "--set",
    "train_dpo.epochs=6",
    "--set",
    "train_orpo.epochs=2",
];

fn reference_files(work: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(work.join("cache/reflogps-v1"))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "arrow"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn with_small<'a>(head: &[&'a str]) -> Vec<&'a str> {
    let mut v = head.to_vec();
    v.extend(SMALL);
    v
}

#[test]
fn dpo_learns_preferences_and_caches_reference_logps() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    // The default pipeline up to train-dpo (generate etc. follow; fine).
    let (out, log) = pipeline(&with_small(&["run"]), work);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("step train-dpo: done"), "{log}");
    let refs = reference_files(work);
    assert_eq!(
        refs.len(),
        2,
        "train and val reference log-probs cached: {refs:?}"
    );
    let run = newest_run(work);
    let metrics: Vec<MetricRow> = read_parquet(&run.join("metrics.parquet")).unwrap();
    let dpo: Vec<&MetricRow> = metrics.iter().filter(|m| m.stage == "train-dpo").collect();
    for name in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert!(
            dpo.iter().any(|m| m.split == "val" && m.name == name),
            "no val {name}"
        );
    }
    let acc: Vec<f64> = dpo
        .iter()
        .filter(|m| m.split == "train" && m.name == "rewards/accuracies")
        .map(|m| m.value)
        .collect();
    let (first, last) = (
        acc[..4].iter().sum::<f64>() / 4.0,
        acc[acc.len() - 4..].iter().sum::<f64>() / 4.0,
    );
    assert!(
        last > first + 0.1,
        "train reward accuracy {first:.3} -> {last:.3}"
    );
    assert!(
        metrics.iter().any(|m| m.stage == "train-sft"),
        "SFT metrics kept beside DPO's"
    );

    // Again on its own: the reference log-probs come from the cache (same files, untouched).
    let stamps: Vec<_> = refs
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().modified().unwrap())
        .collect();
    let (out, log) = pipeline(&with_small(&["run", "train-dpo"]), work);
    assert!(out.status.success(), "{log}");
    assert_eq!(reference_files(work), refs);
    let again: Vec<_> = refs
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().modified().unwrap())
        .collect();
    assert_eq!(stamps, again);

    // A new SFT checkpoint is a new reference: new cache entries.
    let (out, log) = pipeline(&with_small(&["run", "--set", "train_sft.seed=7"]), work);
    assert!(out.status.success(), "{log}");
    assert_eq!(reference_files(work).len(), 4);

    // ORPO runs from the same checkpoint and logs its own metrics.
    let (out, log) = pipeline(&with_small(&["run", "train-orpo"]), work);
    assert!(out.status.success(), "{log}");
    let metrics: Vec<MetricRow> = read_parquet(&newest_run(work).join("metrics.parquet")).unwrap();
    for name in ["nll_loss", "log_odds_ratio", "log_odds_chosen"] {
        assert!(
            metrics
                .iter()
                .any(|m| m.stage == "train-orpo" && m.name == name),
            "no {name}"
        );
    }
}

#[test]
fn a_pair_with_an_empty_completion_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let (out, log) = pipeline(&with_small(&["run", "--set", "train_dpo.epochs=1"]), work);
    assert!(out.status.success(), "{log}");
    let set = ShardSet::new(work, "synthetic_prefs", "train");
    let path = set.parquet_path(0);
    let mut pairs: Vec<PreferencePair> = read_parquet(&path).unwrap();
    pairs[2].rejected = "  ".into();
    let id = pairs[2].pair_id.clone();
    write_parquet(&path, &pairs).unwrap();
    let (out, log) = pipeline(&with_small(&["run", "train-dpo"]), work);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("empty completion") && log.contains(&id) && log.contains("part-00000.parquet"),
        "{log}"
    );
}
