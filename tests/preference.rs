//! train-dpo and train-orpo from the outside: they start from the SFT checkpoint, log TRL's
//! metrics, raise the training reward accuracy, cache the reference log-probabilities once
//! per (reference checkpoint, pair set), refuse a pair with an empty completion, and skip and
//! count a batch whose loss is NaN without any parameter becoming NaN; train-reward learns the
//! same pairs as a Bradley-Terry reward model.

mod common;
use common::hub_fixtures::{h4_parquet, h4_row, H4Row, H4, H4_REV};
use common::{newest_run, pipeline};

use std::path::{Path, PathBuf};

use prefcap::data::records::{MetricRow, PreferencePair, ReferenceLogps};
use prefcap::data::shard::{read_parquet, write_parquet, ShardSet};
use prefcap::testkit::loopback::MockHub;

const SMALL: [&str; 16] = [
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
    "--set",
    "pretrain_clip.steps=0",
    // The default pipeline's later trainers, briefly: these tests are about preferences.
    "--set",
    "train_diffusion.epochs=2",
    "--set",
    "story.epochs=2",
];

/// The data files of the reference-log-prob cache entries.
fn reference_files(work: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(work.join("cache/reflogps-v2"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    v.sort();
    v
}

fn with_small<'a>(head: &[&'a str]) -> Vec<&'a str> {
    let mut v = head.to_vec();
    v.extend(SMALL);
    v
}

/// A workdir where the small default pipeline ran once (one DPO epoch): pair shards, cached
/// features, an SFT checkpoint and cached reference log-probs.
fn trained_workdir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let (out, log) = pipeline(
        &with_small(&["run", "--set", "train_dpo.epochs=1"]),
        tmp.path(),
    );
    assert!(out.status.success(), "{log}");
    tmp
}

#[test]
fn dpo_learns_preferences_and_caches_reference_logps() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    // The default pipeline up to train-dpo (generate etc. follow; fine), with TRL's plain
    // sigmoid loss (the demo adds an SFT term, which slows the reward accuracy's rise).
    let (out, log) = pipeline(
        &with_small(&["run", "--set", "preference.sft_weight=0"]),
        work,
    );
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
    // The selected checkpoint's held-out accuracy per corruption kind: every kind present,
    // and together (weighted by pairs) they give the best overall validation accuracy.
    let best_step = dpo
        .iter()
        .filter(|m| m.split == "val" && m.name.starts_with("by_source/"))
        .map(|m| m.step)
        .next()
        .expect("by_source metrics");
    let overall = dpo
        .iter()
        .find(|m| m.split == "val" && m.name == "rewards/accuracies" && m.step == best_step)
        .expect("val accuracy at the selected step")
        .value;
    let by = |source: &str, name: &str| {
        dpo.iter()
            .find(|m| m.name == format!("by_source/synthetic:{source}/{name}"))
            .unwrap_or_else(|| panic!("no by_source {source} {name}"))
            .value
    };
    let (mut pairs, mut right) = (0.0, 0.0);
    for kind in ["colour", "shape", "relation", "vague"] {
        let (n, acc) = (by(kind, "pairs"), by(kind, "rewards/accuracies"));
        assert!(n >= 1.0 && (0.0..=1.0).contains(&acc), "{kind}: {n} {acc}");
        assert!(by(kind, "rewards/margins").is_finite());
        pairs += n;
        right += n * acc;
    }
    assert!(
        (right / pairs - overall).abs() <= 1.0 / pairs + 1e-9,
        "by source {} vs overall {overall}",
        right / pairs
    );
    let acc: Vec<f64> = dpo
        .iter()
        .filter(|m| m.split == "train" && m.name == "rewards/accuracies")
        .map(|m| m.value)
        .collect();
    let (first, last) = (
        acc[..4].iter().sum::<f64>() / 4.0,
        acc[acc.len() - 4..].iter().sum::<f64>() / 4.0,
    );
    eprintln!("train reward accuracy {first:.3} -> {last:.3}");
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
    for name in [
        "nll_loss",
        "log_odds_ratio",
        "log_odds_chosen",
        "rewards/chosen",
        "rewards/accuracies",
        "rewards/margins",
    ] {
        assert!(
            metrics
                .iter()
                .any(|m| m.stage == "train-orpo" && m.name == name),
            "no {name}"
        );
    }
}

#[test]
fn a_pair_with_an_empty_completion_or_no_image_is_a_clear_error() {
    let tmp = trained_workdir();
    let work = tmp.path();
    let set = ShardSet::new(work, "synthetic_prefs", "train");
    let path = set.parquet_path(0);
    let original: Vec<PreferencePair> = read_parquet(&path).unwrap();
    let mut pairs = original.clone();
    pairs[2].rejected = "  ".into();
    let id = pairs[2].pair_id.clone();
    write_parquet(&path, &pairs).unwrap();
    let (out, log) = pipeline(&with_small(&["run", "train-dpo"]), work);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("empty completion") && log.contains(&id) && log.contains("part-00000.parquet"),
        "{log}"
    );
    // So is an image pair that names no image.
    let mut pairs = original;
    pairs[3].image_key = None;
    let id = pairs[3].pair_id.clone();
    write_parquet(&path, &pairs).unwrap();
    let (out, log) = pipeline(&with_small(&["run", "train-dpo"]), work);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains(&format!("pair `{id}` has no image_key"))
            && log.contains("part-00000.parquet"),
        "{log}"
    );
}

/// Rewrites the cached reference log-probs that hold `pair_id` with its `ref_chosen` set to
/// NaN (as an overflowing reference would give), as a valid entry: its manifest gets the new
/// file's size and sha256. Returns that file.
fn poison_reference_logp(work: &Path, pair_id: &str) -> PathBuf {
    for path in reference_files(work) {
        let mut rows: Vec<ReferenceLogps> = read_parquet(&path).unwrap();
        let Some(row) = rows.iter_mut().find(|r| r.pair_id == pair_id) else {
            continue;
        };
        row.ref_chosen = f64::NAN;
        write_parquet(&path, &rows).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let manifest_path = path.with_extension("json");
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
        manifest["file_bytes"] = bytes.len().into();
        manifest["file_sha256"] = prefcap::io::sha256_file(&path).unwrap().into();
        std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
        return path;
    }
    panic!("no cached reference log-probs for {pair_id}");
}

#[test]
fn a_nan_in_a_training_batch_is_skipped_and_counted_and_no_parameter_becomes_nan() {
    let tmp = trained_workdir();
    let work = tmp.path();
    let set = ShardSet::new(work, "synthetic_prefs", "train");
    let pairs: Vec<PreferencePair> = read_parquet(&set.parquet_path(0)).unwrap();
    poison_reference_logp(work, &pairs[0].pair_id);

    // The pair's batch gives a NaN loss in each of the 6 epochs (SMALL): skipped, counted
    // (also when it is an epoch's last batch), and the stage still finishes every epoch with
    // finite weights.
    let (out, log) = pipeline(&with_small(&["run", "train-dpo"]), work);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("non-finite loss or gradient"), "{log}");
    let run = newest_run(work);
    let metrics: Vec<MetricRow> = read_parquet(&run.join("metrics.parquet")).unwrap();
    let skipped = metrics
        .iter()
        .filter(|m| m.stage == "train-dpo" && m.name == "skipped_nonfinite_batches")
        .map(|m| m.value)
        .fold(0.0, f64::max);
    assert_eq!(skipped, 6.0, "one poisoned batch per epoch: {log}");
    let val_epochs = metrics
        .iter()
        .filter(|m| m.stage == "train-dpo" && m.split == "val" && m.name == "loss")
        .count();
    assert_eq!(val_epochs, 6, "a validation at the end of every epoch");
    assert!(metrics
        .iter()
        .filter(|m| m.stage == "train-dpo" && m.split == "train" && m.name == "loss")
        .all(|m| m.value.is_finite()));
    for dir in ["best", "last"] {
        let weights = run.join("train-dpo").join(dir).join("model.safetensors");
        let tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
        assert!(!tensors.is_empty());
        for (name, t) in tensors {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{name} in {dir} has a NaN");
        }
    }
}

#[test]
fn train_reward_learns_the_pairs_and_logs_trls_metrics_per_source() {
    let tmp = trained_workdir();
    let work = tmp.path();
    let (out, log) = pipeline(
        &[
            "run",
            "train-reward",
            "--set",
            "train_reward.epochs=4",
            "--set",
            "train_reward.lr=0.001",
        ],
        work,
    );
    assert!(out.status.success(), "{log}");
    let run = newest_run(work);
    let metrics: Vec<MetricRow> = read_parquet(&run.join("metrics.parquet")).unwrap();
    let val = |name: &str| -> Vec<f64> {
        metrics
            .iter()
            .filter(|m| m.stage == "train-reward" && m.split == "val" && m.name == name)
            .map(|m| m.value)
            .collect()
    };
    for name in [
        "loss",
        "accuracy",
        "margin",
        "min_reward",
        "mean_reward",
        "max_reward",
    ] {
        let v = val(name);
        assert_eq!(v.len(), 4, "{name}: one validation per epoch");
        assert!(v.iter().all(|x| x.is_finite()), "{name}: {v:?}");
    }
    let acc = val("accuracy");
    let best = acc.iter().copied().fold(f64::MIN, f64::max);
    assert!(best >= 0.7, "held-out accuracy {acc:?}");
    for kind in ["colour", "shape", "relation", "vague"] {
        let a = val(&format!("by_source/synthetic:{kind}/accuracy"));
        assert_eq!(a.len(), 4, "{kind}");
        assert!(a.iter().all(|x| (0.0..=1.0).contains(x)), "{kind}: {a:?}");
    }
    let weights = run.join("train-reward/best/model.safetensors");
    let tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    assert_eq!(tensors["reward_head.weight"].dims().len(), 2);
    assert!(run.join("train-reward/captioner.json").is_file());
}

/// Writes text-only pairs (UltraFeedback's shape: a prompt, no image) as one finished shard.
fn write_text_pairs(work: &Path, split: &str, n: usize) -> Vec<PreferencePair> {
    let pairs: Vec<PreferencePair> = (0..n)
        .map(|i| PreferencePair {
            pair_id: format!("uf:{split}:{i}"),
            source: "ultrafeedback_binarized".into(),
            // Every third prompt is long: it fills a small max_length on its own.
            prompt: if i % 3 == 0 {
                "Describe the picture with its colours, its shapes and where each shape is:".into()
            } else {
                "Caption:".into()
            },
            chosen: " a red circle above a blue square".into(),
            rejected: " two shapes".into(),
            score_chosen: 8.0,
            score_rejected: 3.0,
            image_key: None,
        })
        .collect();
    let set = ShardSet::new(work, "ultrafeedback", split);
    set.prepare().unwrap();
    let stats = prefcap::data::shard::ShardStats {
        count: n as u64,
        successes: n as u64,
        ..Default::default()
    };
    set.write(0, &pairs, &stats).unwrap();
    pairs
}

#[test]
fn text_only_pairs_train_beside_image_pairs_and_truncate_as_trl() {
    let tmp = trained_workdir();
    let work = tmp.path();
    write_text_pairs(work, "train_prefs", 24);
    write_text_pairs(work, "test_prefs", 6);
    let text = [
        "--set",
        "preference.text_pairs_dataset=ultrafeedback",
        "--set",
        "train_dpo.epochs=2",
    ];

    // Text-only alone: the decoder is conditioned on the prompt, no image needed.
    let mut args = with_small(&["run", "train-dpo", "--set", "preference.pairs_dataset=\"\""]);
    args.extend(text);
    let (out, log) = pipeline(&args, work);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("over 24 pairs"), "{log}");
    let metrics: Vec<MetricRow> = read_parquet(&newest_run(work).join("metrics.parquet")).unwrap();
    assert!(metrics
        .iter()
        .any(|m| m.stage == "train-dpo" && m.split == "val" && m.name == "rewards/accuracies"));
    assert!(metrics.iter().all(|m| m.value.is_finite()));

    // Mixed with the image-grounded synthetic pairs.
    let image_pairs = ShardSet::new(work, "synthetic_prefs", "train")
        .read_all::<PreferencePair>()
        .unwrap()
        .len();
    assert!(image_pairs >= 128);
    let mut args = with_small(&["run", "train-dpo"]);
    args.extend(text);
    let (out, log) = pipeline(&args, work);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains(&format!("over {} pairs", 24 + image_pairs)),
        "{log}"
    );

    // keep_start truncation: with max_length two tokens past the short prompt, the long
    // prompts alone fill it, so TRL drops those pairs (8 of 24); the rest train on cut
    // completions.
    let tok =
        tokenizers::Tokenizer::from_file(work.join("cache/models/tiny-gpt2-v1/tokenizer.json"))
            .unwrap();
    let tokens = |s: &str| tok.encode(s, false).unwrap().get_ids().len();
    let short = tokens("Caption:");
    let long = tokens(&write_text_pairs(work, "train_prefs", 24)[0].prompt);
    let max_length = short + 2;
    assert!(long >= max_length);
    let set_max = format!("preference.max_length={max_length}");
    let mut args = with_small(&[
        "run",
        "train-dpo",
        "--set",
        "preference.pairs_dataset=\"\"",
        "--set",
        &set_max,
    ]);
    args.extend(text);
    let (out, log) = pipeline(&args, work);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "over 16 pairs (8 dropped: prompt fills max_length {max_length})"
        )),
        "{log}"
    );
    // keep_end keeps every pair.
    let mut keep_end = args.clone();
    keep_end.extend(["--set", "preference.truncation_mode=\"keep_end\""]);
    let (out, log) = pipeline(&keep_end, work);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("over 24 pairs from"), "{log}");
    // A max_length no prompt fits: a clear error, not a stage without batches.
    let mut none_fit = args.clone();
    none_fit.extend(["--set", "preference.max_length=1"]);
    let (out, log) = pipeline(&none_fit, work);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("no training pairs left: all 24"), "{log}");

    // Text-only pairs named as the image-grounded dataset: a clear error naming the pair.
    write_text_pairs(work, "train", 4);
    write_text_pairs(work, "val", 2);
    let (out, log) = pipeline(
        &with_small(&[
            "run",
            "train-dpo",
            "--set",
            "preference.pairs_dataset=ultrafeedback",
        ]),
        work,
    );
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("uf:train:0") && log.contains("no image_key") && log.contains("part-00000"),
        "{log}"
    );

    // UltraFeedback as ingest writes it from the hub, whose rows include empty and blank
    // replies: ingest drops and counts those, and train-dpo trains on the rest.
    let hub = MockHub::start().unwrap();
    let rows = |split: &str, n: usize| -> Vec<H4Row> {
        (0..n)
            .map(|i| {
                let (chosen, rejected) = match i % 4 {
                    0 => ("", "No."),
                    1 => ("A fine answer.", " \n "),
                    _ => ("A fine answer.", "No."),
                };
                h4_row(
                    &format!("{split} question {i}?"),
                    chosen,
                    rejected,
                    (8.0, 2.0),
                )
            })
            .collect()
    };
    for (split, n) in [("train_prefs", 12), ("test_prefs", 4)] {
        hub.add_dataset_file(
            H4,
            H4_REV,
            &format!("data/{split}-00000-of-00001.parquet"),
            h4_parquet(&rows(split, n), false),
        );
    }
    let hub_cache = tempfile::tempdir().unwrap();
    let endpoint = format!("hub.endpoint=\"{}\"", hub.endpoint());
    let cache_dir = format!("hub.cache_dir=\"{}\"", hub_cache.path().display());
    let (out, log) = pipeline(
        &[
            "run",
            "ingest",
            "--set",
            "ingest.sources=[\"ultrafeedback\"]",
            "--set",
            &endpoint,
            "--set",
            &cache_dir,
        ],
        work,
    );
    assert!(out.status.success(), "{log}");
    let set = ShardSet::new(work, "ultrafeedback", "train_prefs");
    let dropped: u64 = set
        .finished()
        .unwrap()
        .into_iter()
        .map(|s| set.read_stats(s).unwrap().failures["dropped_empty_response"])
        .sum();
    assert_eq!(dropped, 6, "{log}");
    let mut args = with_small(&["run", "train-dpo", "--set", "preference.pairs_dataset=\"\""]);
    args.extend(text);
    let (out, log) = pipeline(&args, work);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("over 6 pairs"), "{log}");
}

#[test]
fn sample_pairs_ranks_sft_samples_by_clipscore_into_pair_shards_dpo_can_train_on() {
    let tmp = trained_workdir();
    let work = tmp.path();
    let args = [
        "run",
        "sample-pairs",
        "--set",
        "sample_pairs.dataset=synthetic",
        "--set",
        "sample_pairs.shard_size=10",
        "--set",
        "sample_pairs.max_images=24",
    ];
    // As a job array of two workers first (worker 0 owns shards 0 and 2 of train, 0 of val),
    // merged; then one process finds every shard done: the workers wrote its shards.
    for i in ["0", "1"] {
        let worker = [&args[..], &["--num-workers", "2", "--worker-index", i]].concat();
        let (out, log) = pipeline(&worker, work);
        assert!(out.status.success(), "{log}");
    }
    let merge = [
        &["merge", "sample-pairs", "--num-workers", "2"][..],
        &args[2..],
    ]
    .concat();
    let (out, log) = pipeline(&merge, work);
    assert!(out.status.success(), "{log}");
    let (out, log) = pipeline(&args, work);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("train: ") && log.contains("0 shard(s) written, 3 already done"),
        "{log}"
    );
    assert!(log.contains("0 shard(s) written, 2 already done"), "{log}");
    for split in ["train", "val"] {
        let set = ShardSet::new(work, "synthetic_sampled_prefs", split);
        let shards = set.finished().unwrap();
        let images = if split == "train" { 24 } else { 16 };
        assert_eq!(shards.len(), (images as usize).div_ceil(10), "{split}");
        let pairs: Vec<PreferencePair> = set.read_all().unwrap();
        let stats: Vec<_> = shards.iter().map(|&s| set.read_stats(s).unwrap()).collect();
        assert_eq!(stats.iter().map(|s| s.count).sum::<u64>(), images);
        assert_eq!(
            stats.iter().map(|s| s.successes).sum::<u64>(),
            pairs.len() as u64
        );
        assert!(
            pairs.len() as u64 > images / 2,
            "{split}: {} pairs",
            pairs.len()
        );
        let keys: std::collections::HashSet<String> = ShardSet::new(work, "synthetic", split)
            .read_all::<prefcap::data::records::ImageTextSample>()
            .unwrap()
            .into_iter()
            .map(|s| s.key)
            .collect();
        for p in &pairs {
            assert!(keys.contains(p.image_key.as_deref().unwrap()), "{p:?}");
            assert_ne!(p.chosen.trim(), p.rejected.trim());
            assert!(p.score_chosen >= p.score_rejected, "{p:?}");
            assert!((0.0..=2.5).contains(&p.score_rejected) && p.score_chosen <= 2.5);
            assert_eq!(p.source, "sft_samples_clipscore");
        }
    }
    // Resumable: nothing is redone.
    let (out, log) = pipeline(&args, work);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("0 shard(s) written, 3 already done"), "{log}");
    // Image features preprocessed another way (transformers' torchvision backend) are other
    // cache entries, and the pairs ranked with the old ones are redone.
    let backend = ["--set", "clip.image_backend=\"torchvision\""];
    let embed_again = [
        "run",
        "embed",
        "--set",
        "clip.model=\"tiny\"",
        "--set",
        "embed.datasets=[\"synthetic\"]",
    ];
    let (out, log) = pipeline(&[&embed_again[..], &backend].concat(), work);
    assert!(out.status.success(), "{log}");
    let (out, log) = pipeline(&[&args[..], &backend].concat(), work);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("3 shard(s) written, 0 already done"), "{log}");

    // DPO trains on them.
    let (out, log) = pipeline(
        &with_small(&[
            "run",
            "train-dpo",
            "--set",
            "preference.pairs_dataset=synthetic_sampled_prefs",
        ]),
        work,
    );
    assert!(out.status.success(), "{log}");

    // SFT on the first 40 of the 64 training images only (the pairs above cover all 64); a
    // lone stage reads configs/default.toml, so the embedded models are named.
    let (out, log) = pipeline(
        &with_small(&[
            "run",
            "train-sft",
            "--set",
            "captioner.max_train_samples=40",
            "--set",
            "captioner.dataset=synthetic",
            "--set",
            "captioner.decoder=tiny",
            "--set",
            "clip.model=tiny",
        ]),
        work,
    );
    assert!(out.status.success(), "{log}");
    assert!(log.contains("optimizer steps over 40 rows"), "{log}");
}
