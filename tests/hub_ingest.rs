//! UltraFeedback and StoryReasoning ingest through the hf-hub client against a loopback
//! `MockHub`: fixtures are built here in the real hub schemas (H4 parquet, openbmb jsonl,
//! StoryReasoning parquet with PNG/JPEG images), and the shards are read back and checked
//! for rows, filters, splits, captions, provenance and resumability. Offline.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, Int32Array, LargeBinaryArray, StringArray, StructArray};
use arrow::datatypes::{DataType, Field, Fields};

use prefcap::data::hub::HubConfig;
use prefcap::data::records::{PreferencePair, StoryFrame};
use prefcap::data::shard::ShardSet;
use prefcap::stages::context::SharedConfig;
use prefcap::stages::ingest::ultrafeedback::UltraFeedbackFormat;
use prefcap::stages::ingest::{Ingest, IngestConfig, Source, SourceSummary, SplitSummary};
use prefcap::stages::{Stage, StageContext};
use prefcap::testkit::loopback::MockHub;

use common::hub_fixtures::{h4_parquet, h4_row, list_of, parquet_bytes, strings, H4, H4_REV};

const OPENBMB: &str = "openbmb/UltraFeedback";
const OPENBMB_REV: &str = "40b436560ca83a8dba36114c22ab3c66e43f6d5e";
const STORIES: &str = "daniel3303/StoryReasoning";

// ---------------------------------------------------------------------------------------
// Fixture builders in the hub schemas.

fn png(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(8, 6, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, seed]));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn jpeg(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(8, 8, |x, _| image::Rgb([seed, x as u8 * 20, 0]));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg)
        .unwrap();
    out
}

/// One StoryReasoning row: id, images, and the story text.
struct StoryRow {
    id: String,
    images: Vec<Vec<u8>>,
    story: String,
}

/// The caption the fixture writes for frame `n` of story `id`, before tag stripping.
fn tagged_caption(id: &str, n: usize) -> String {
    format!("<gdo char1>Ana</gdo> <gda char1>opens</gda> <gdl bg1>door {n}</gdl>  of story {id}.")
}

fn clean_caption(id: &str, n: usize) -> String {
    format!("Ana opens door {n} of story {id}.")
}

/// A story with `frames` PNG frames; even ids use `story_to_string`'s multi-line layout,
/// odd ids the one-line layout; `skip_block` leaves one block out.
fn story_row(id: &str, frames: usize, skip_block: Option<usize>) -> StoryRow {
    let multi_line = id.parse::<u32>().unwrap() % 2 == 0;
    let story = (1..=frames)
        .filter(|n| Some(*n) != skip_block)
        .map(|n| {
            let text = tagged_caption(id, n);
            if multi_line {
                format!("<gdi image{n}>\n{text}\n</gdi>\n\n\n\n")
            } else {
                format!("<gdi image{n}> {text} </gdi> ")
            }
        })
        .collect();
    let images = (1..=frames).map(|n| png(frame_seed(id, n))).collect();
    StoryRow {
        id: id.into(),
        images,
        story,
    }
}

fn frame_seed(id: &str, n: usize) -> u8 {
    (id.parse::<usize>().unwrap() * 7 + n) as u8
}

fn story_parquet(rows: &[StoryRow], large: bool) -> Vec<u8> {
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let stories: Vec<&str> = rows.iter().map(|r| r.story.as_str()).collect();
    let cots: Vec<&str> = rows
        .iter()
        .map(|_| "## Image 1\n### Characters\n| char1 | Ana |")
        .collect();
    let flat: Vec<&[u8]> = rows
        .iter()
        .flat_map(|r| r.images.iter().map(Vec::as_slice))
        .collect();
    let bytes: ArrayRef = if large {
        Arc::new(flat.iter().map(|b| Some(*b)).collect::<LargeBinaryArray>())
    } else {
        Arc::new(flat.iter().map(|b| Some(*b)).collect::<BinaryArray>())
    };
    let paths: ArrayRef = Arc::new(flat.iter().map(|_| None::<&str>).collect::<StringArray>());
    let fields = Fields::from(vec![
        Field::new("bytes", bytes.data_type().clone(), true),
        Field::new("path", DataType::Utf8, true),
    ]);
    let images = StructArray::new(fields, vec![bytes, paths], None);
    let lengths: Vec<usize> = rows.iter().map(|r| r.images.len()).collect();
    parquet_bytes(vec![
        ("story_id", strings(&ids, large)),
        ("images", list_of(Arc::new(images), &lengths, large)),
        (
            "frame_count",
            Arc::new(
                rows.iter()
                    .map(|r| Some(r.images.len() as i32))
                    .collect::<Int32Array>(),
            ),
        ),
        ("chain_of_thought", strings(&cots, large)),
        ("story", strings(&stories, large)),
    ])
}

// ---------------------------------------------------------------------------------------
// Running and reading back.

/// What an ingest test runs: the `[ingest]` section, and the shared sections (`[hub]`).
#[derive(Clone)]
struct Setup {
    ingest: IngestConfig,
    shared: SharedConfig,
}

fn config(hub: &MockHub, cache: &Path, source: Source) -> Setup {
    let shared = SharedConfig {
        hub: HubConfig {
            endpoint: hub.endpoint(),
            cache_dir: cache.display().to_string(),
        },
        ..SharedConfig::default()
    };
    Setup {
        ingest: IngestConfig {
            sources: vec![source],
            ..IngestConfig::default()
        },
        shared,
    }
}

fn run(cfg: &Setup, workdir: &Path) -> prefcap::Result<Vec<SourceSummary>> {
    let ctx = StageContext::new(workdir, "test", cfg.shared.clone());
    Ok(Ingest::run(&cfg.ingest, &ctx)?.sources)
}

fn split<'a>(summary: &'a SourceSummary, name: &str) -> &'a SplitSummary {
    summary
        .splits
        .iter()
        .find(|s| s.split == name)
        .unwrap_or_else(|| panic!("no split {name} in {summary:?}"))
}

/// Failure counts summed over a split's shards.
fn failures(workdir: &Path, dataset: &str, split: &str) -> BTreeMap<String, u64> {
    let set = ShardSet::new(workdir, dataset, split);
    let mut total = BTreeMap::new();
    for shard in set.finished().unwrap() {
        for (k, v) in set.read_stats(shard).unwrap().failures {
            *total.entry(k).or_default() += v;
        }
    }
    total
}

fn sources(workdir: &Path, dataset: &str, split: &str) -> BTreeSet<String> {
    let set = ShardSet::new(workdir, dataset, split);
    set.finished()
        .unwrap()
        .into_iter()
        .map(|s| set.read_stats(s).unwrap().source)
        .collect()
}

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// The request log, for assertion messages and protocol checks.
fn assert_hf_protocol(hub: &MockHub, repo: &str) {
    let log = hub.request_log();
    let listed = log
        .iter()
        .any(|l| l.starts_with(&format!("GET /api/datasets/{repo}/tree/")));
    let headed = log
        .iter()
        .any(|l| l.starts_with(&format!("HEAD /datasets/{repo}/resolve/")));
    let fetched = log
        .iter()
        .any(|l| l.starts_with(&format!("GET /datasets/{repo}/resolve/")));
    assert!(
        listed && headed && fetched,
        "expected tree listing, HEAD and GET on resolve:\n{}",
        log.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// UltraFeedback, binarized.

fn serve_h4(hub: &MockHub) {
    let long_prompt = "Describe the picture in detail. ".repeat(10);
    let mut multi_turn = h4_row("Plan a trip.", "", "Go somewhere.", (9.0, 4.0));
    multi_turn.chosen = vec![
        ("user", "Plan a trip.".into()),
        ("assistant", "Where to?".into()),
        ("user", "Lisbon.".into()),
        ("assistant", "Day 1: Alfama. Day 2: Belém.".into()),
    ];
    let train = vec![
        h4_row(
            "Why is the sky blue?",
            "Rayleigh scattering.",
            "Because.",
            (8.0, 3.0),
        ),
        h4_row("Is 7 prime?", "Yes.", "Yes!", (5.0, 5.0)),
        h4_row("Capital of France?", "Paris.", "Lyon.", (9.0, 8.5)),
        h4_row(&long_prompt, "A cat on a mat.", "A dog.", (7.0, 2.0)),
        multi_turn,
        h4_row("Say hi.", "Hi!", "No.", (6.0, 1.0)),
        h4_row("Count to 3.", "1, 2, 3.", "1, 3.", (10.0, 2.5)),
    ];
    hub.add_dataset_file(
        H4,
        H4_REV,
        "data/train_prefs-00000-of-00001.parquet",
        h4_parquet(&train, false),
    );
    // Two files of the test split, the second with large_string / large_list columns.
    let test_a = vec![
        h4_row("2+2?", "4", "5", (10.0, 1.0)),
        h4_row("3+3?", "6", "6", (7.0, 7.0)),
    ];
    let test_b = vec![h4_row("Spell cat.", "c-a-t", "k-a-t", (8.0, 2.0))];
    hub.add_dataset_file(
        H4,
        H4_REV,
        "data/test_prefs-00000-of-00002.parquet",
        h4_parquet(&test_a, false),
    );
    hub.add_dataset_file(
        H4,
        H4_REV,
        "data/test_prefs-00001-of-00002.parquet",
        h4_parquet(&test_b, true),
    );
    // Not configured: must be neither downloaded nor read.
    hub.add_dataset_file(
        H4,
        H4_REV,
        "data/train_sft-00000-of-00001.parquet",
        b"never read".to_vec(),
    );
    hub.add_dataset_file(H4, H4_REV, "README.md", b"# card".to_vec());
}

#[test]
fn binarized_splits_are_filtered_sharded_and_resumable() {
    let hub = MockHub::start().unwrap();
    serve_h4(&hub);
    let (work, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut cfg = config(&hub, cache.path(), Source::Ultrafeedback);
    let uf = &mut cfg.ingest.ultrafeedback;
    uf.min_score_margin = 1.0;
    uf.max_prompt_chars = 200;
    uf.shard_size = 2;

    let summary = run(&cfg, work.path()).unwrap();
    assert_eq!(summary.len(), 1);
    let train = split(&summary[0], "train_prefs");
    assert_eq!(
        (
            train.dataset.as_str(),
            train.rows,
            train.shards_written,
            train.shards_skipped
        ),
        ("ultrafeedback", 4, 2, 0)
    );
    let rows: Vec<PreferencePair> = ShardSet::new(work.path(), "ultrafeedback", "train_prefs")
        .read_all()
        .unwrap();
    let chosen: Vec<&str> = rows.iter().map(|p| p.chosen.as_str()).collect();
    assert_eq!(
        chosen,
        vec![
            "Rayleigh scattering.",
            "Day 1: Alfama. Day 2: Belém.",
            "Hi!",
            "1, 2, 3."
        ]
    );
    assert_eq!(rows[0].prompt, "Why is the sky blue?");
    assert_eq!(rows[0].rejected, "Because.");
    assert_eq!((rows[0].score_chosen, rows[0].score_rejected), (8.0, 3.0));
    assert!(rows
        .iter()
        .all(|p| p.source == "ultrafeedback_binarized" && p.image_key.is_none()));
    let ids: Vec<&str> = rows.iter().map(|p| p.pair_id.as_str()).collect();
    assert_eq!(ids[0], "id-20:0", "prompt_id:row index within the split");
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), ids.len());
    assert_eq!(
        failures(work.path(), "ultrafeedback", "train_prefs"),
        counts(&[
            ("dropped_margin", 1),
            ("dropped_prompt_length", 1),
            ("dropped_tie", 1)
        ])
    );
    let commit = hub.commit_of(H4, H4_REV);
    let provenance = sources(work.path(), "ultrafeedback", "train_prefs");
    assert_eq!(provenance.len(), 1);
    assert!(
        provenance
            .iter()
            .next()
            .unwrap()
            .starts_with(&format!("{H4}@{commit} ")),
        "{provenance:?}"
    );

    let test = split(&summary[0], "test_prefs");
    assert_eq!(test.rows, 2);
    let rows: Vec<PreferencePair> = ShardSet::new(work.path(), "ultrafeedback", "test_prefs")
        .read_all()
        .unwrap();
    let chosen: Vec<&str> = rows.iter().map(|p| p.chosen.as_str()).collect();
    assert_eq!(
        chosen,
        vec!["4", "c-a-t"],
        "the large_list file is read too"
    );
    assert_eq!(
        rows[1].pair_id, "id-10:2",
        "row indices continue across the split's files"
    );

    assert_hf_protocol(&hub, H4);
    let log = hub.request_log();
    assert!(
        !log.iter()
            .any(|l| l.contains("train_sft") || l.contains("README")),
        "{}",
        log.join("\n")
    );

    // A second run finds every shard finished with the same provenance.
    let again = run(&cfg, work.path()).unwrap();
    let train = split(&again[0], "train_prefs");
    assert_eq!(
        (train.rows, train.shards_written, train.shards_skipped),
        (4, 0, 2)
    );

    // Changing a filter changes the rows: the shards are rewritten and stale ones removed.
    cfg.ingest.ultrafeedback.min_score_margin = 6.0;
    let changed = run(&cfg, work.path()).unwrap();
    let train = split(&changed[0], "train_prefs");
    assert_eq!(
        (train.rows, train.shards_written, train.shards_skipped),
        (1, 1, 0)
    );
    let set = ShardSet::new(work.path(), "ultrafeedback", "train_prefs");
    let rows: Vec<PreferencePair> = set.read_all().unwrap();
    assert_eq!(
        rows.iter().map(|p| p.chosen.as_str()).collect::<Vec<_>>(),
        vec!["1, 2, 3."]
    );
    assert_eq!(
        set.finished().unwrap(),
        vec![0],
        "the stale second shard is removed"
    );
}

#[test]
fn a_hub_file_that_is_not_parquet_is_an_error_naming_it() {
    let hub = MockHub::start().unwrap();
    hub.add_dataset_file(
        H4,
        H4_REV,
        "data/train_prefs-00000-of-00001.parquet",
        b"<html>not parquet</html>".to_vec(),
    );
    let (work, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut cfg = config(&hub, cache.path(), Source::Ultrafeedback);
    cfg.ingest.ultrafeedback.splits = vec!["train_prefs".into()];
    let err = run(&cfg, work.path()).unwrap_err().to_string();
    assert!(
        err.contains("data/train_prefs-00000-of-00001.parquet"),
        "{err}"
    );
}

#[test]
fn a_split_missing_from_the_hub_names_repo_revision_and_pattern() {
    let hub = MockHub::start().unwrap();
    serve_h4(&hub);
    let (work, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut cfg = config(&hub, cache.path(), Source::Ultrafeedback);
    cfg.ingest.ultrafeedback.splits = vec!["train_gen".into()];
    let err = run(&cfg, work.path()).unwrap_err().to_string();
    assert!(
        err.contains(H4) && err.contains(H4_REV) && err.contains("data/train_gen-*.parquet"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// UltraFeedback, raw.

fn raw_line(source: &str, prompt: &str, scores: &[serde_json::Value]) -> String {
    let completions: Vec<serde_json::Value> = scores
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({
                "model": format!("model-{i}"),
                "principle": "helpfulness",
                "custom_system_prompt": "",
                "response": format!("answer {i} to {prompt}"),
                "critique": "fine",
                "fine-grained_score": 4.25,
                "overall_score": s,
                "annotations": {
                    "instruction_following": {"Rating": "4", "Rationale": "ok"},
                    "honesty": {"Rating": "N/A", "Rationale": "n/a"},
                    "truthfulness": {"Type": ["0"], "Rationale": "r", "Rating": "5", "Rationale For Rating": "r"},
                    "helpfulness": {"Type": ["1"], "Rationale": "r", "Rating": "4", "Rationale For Rating": "r"}
                }
            })
        })
        .collect();
    serde_json::json!({
        "source": source,
        "instruction": prompt,
        "models": (0..scores.len()).map(|i| format!("model-{i}")).collect::<Vec<_>>(),
        "completions": completions,
        "correct_answers": ["None"],
        "incorrect_answers": ["None"],
    })
    .to_string()
}

#[test]
fn raw_jsonl_is_binarized_split_and_filtered() {
    use serde_json::json;
    let hub = MockHub::start().unwrap();
    let mut evol: Vec<String> = (0..12)
        .map(|i| {
            raw_line(
                "evol_instruct",
                &format!("task {i}"),
                &[json!(3), json!(9), json!(5.5), json!(i % 3)],
            )
        })
        .collect();
    evol.push(raw_line(
        "evol_instruct",
        "one scored",
        &[json!(7), json!("N/A")],
    ));
    evol.push(String::new());
    evol.push(raw_line(
        "evol_instruct",
        "all equal",
        &[json!(6), json!(6), json!(6)],
    ));
    hub.add_dataset_file(
        OPENBMB,
        OPENBMB_REV,
        "evol_instruct.jsonl",
        (evol.join("\n") + "\n").into_bytes(),
    );
    let tqa = raw_line("truthful_qa", "Is the earth flat?", &[json!(9), json!(1)]);
    hub.add_dataset_file(OPENBMB, OPENBMB_REV, "truthful_qa.jsonl", tqa.into_bytes());
    hub.add_dataset_file(
        OPENBMB,
        OPENBMB_REV,
        "README.md",
        b"# UltraFeedback".to_vec(),
    );

    let (work, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut cfg = config(&hub, cache.path(), Source::Ultrafeedback);
    let uf = &mut cfg.ingest.ultrafeedback;
    uf.format = UltraFeedbackFormat::Raw;
    uf.raw_test_size = 3;
    uf.shard_size = 4;

    let summary = run(&cfg, work.path()).unwrap();
    let (train, test) = (split(&summary[0], "train"), split(&summary[0], "test"));
    // 12 binarized pairs (the all-equal row is a pair too: equal scores, distinct responses)
    // minus 1 tie → 12 kept; 3 held out before filtering.
    let train_rows: Vec<PreferencePair> = ShardSet::new(work.path(), "ultrafeedback", "train")
        .read_all()
        .unwrap();
    let test_rows: Vec<PreferencePair> = ShardSet::new(work.path(), "ultrafeedback", "test")
        .read_all()
        .unwrap();
    assert_eq!(train.rows + test.rows, 12, "{summary:?}");
    assert_eq!(
        (train_rows.len() as u64, test_rows.len() as u64),
        (train.rows, test.rows)
    );
    let held_out = test.rows
        + failures(work.path(), "ultrafeedback", "test")
            .values()
            .sum::<u64>();
    assert_eq!(
        held_out, 3,
        "raw_test_size pairs are held out before filtering"
    );
    let mut all_drops = failures(work.path(), "ultrafeedback", "train");
    for (k, v) in failures(work.path(), "ultrafeedback", "test") {
        *all_drops.entry(k).or_default() += v;
    }
    assert_eq!(
        all_drops,
        counts(&[
            ("dropped_excluded_source", 1),
            ("dropped_tie", 1),
            ("dropped_too_few_completions", 1)
        ])
    );
    for p in train_rows.iter().chain(&test_rows) {
        assert_eq!(p.source, "ultrafeedback_raw:evol_instruct");
        assert_eq!(p.score_chosen, 9.0);
        assert!(p.chosen.starts_with("answer 1 to "), "{p:?}");
        assert!(p.score_rejected < 9.0 && p.rejected != p.chosen, "{p:?}");
        assert!(p.pair_id.contains(":evol_instruct.jsonl:"), "{}", p.pair_id);
    }
    let train_ids: BTreeSet<&str> = train_rows.iter().map(|p| p.pair_id.as_str()).collect();
    assert!(test_rows
        .iter()
        .all(|p| !train_ids.contains(p.pair_id.as_str())));
    let commit = hub.commit_of(OPENBMB, OPENBMB_REV);
    assert!(sources(work.path(), "ultrafeedback", "train")
        .iter()
        .all(|s| s.starts_with(&format!("{OPENBMB}@{commit} "))));
    assert_hf_protocol(&hub, OPENBMB);

    // Same seed, fresh workdir and cache: the same pairs in the same splits.
    let (work2, cache2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut cfg2 = cfg.clone();
    cfg2.shared.hub.cache_dir = cache2.path().display().to_string();
    run(&cfg2, work2.path()).unwrap();
    let again: Vec<PreferencePair> = ShardSet::new(work2.path(), "ultrafeedback", "test")
        .read_all()
        .unwrap();
    assert_eq!(again, test_rows);
}

/// `raw_line` with completion `i`'s response replaced by `response`.
fn raw_line_with_response(
    prompt: &str,
    scores: &[serde_json::Value],
    i: usize,
    response: &str,
) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&raw_line("flan", prompt, scores)).unwrap();
    v["completions"][i]["response"] = response.into();
    v.to_string()
}

/// UltraFeedback has rows whose chosen or rejected reply is empty or whitespace only: both
/// formats drop them, counted under their own cause, and keep every other row.
#[test]
fn empty_replies_on_either_side_are_dropped_and_counted_in_both_formats() {
    use serde_json::json;
    let hub = MockHub::start().unwrap();
    let train = vec![
        h4_row(
            "Why is the sky blue?",
            "Rayleigh scattering.",
            "Because.",
            (8.0, 3.0),
        ),
        h4_row("Empty chosen.", "", "Something.", (9.0, 2.0)),
        h4_row("Blank rejected.", "An answer.", "  \n\t", (9.0, 2.0)),
        h4_row("Blank chosen.", "\n", "Something.", (9.0, 2.0)),
        h4_row("Say hi.", "Hi!", "No.", (6.0, 1.0)),
    ];
    hub.add_dataset_file(
        H4,
        H4_REV,
        "data/train_prefs-00000-of-00001.parquet",
        h4_parquet(&train, false),
    );
    let test = vec![
        h4_row("2+2?", "4", " ", (10.0, 1.0)),
        h4_row("3+3?", "6", "7", (9.0, 1.0)),
    ];
    hub.add_dataset_file(
        H4,
        H4_REV,
        "data/test_prefs-00000-of-00001.parquet",
        h4_parquet(&test, true),
    );
    let (work, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = config(&hub, cache.path(), Source::Ultrafeedback);
    let summary = run(&cfg, work.path()).unwrap();
    assert_eq!(split(&summary[0], "train_prefs").rows, 2, "{summary:?}");
    assert_eq!(split(&summary[0], "test_prefs").rows, 1, "{summary:?}");
    assert_eq!(
        failures(work.path(), "ultrafeedback", "train_prefs"),
        counts(&[("dropped_empty_response", 3)])
    );
    assert_eq!(
        failures(work.path(), "ultrafeedback", "test_prefs"),
        counts(&[("dropped_empty_response", 1)])
    );
    let kept: Vec<PreferencePair> = ShardSet::new(work.path(), "ultrafeedback", "train_prefs")
        .read_all()
        .unwrap();
    assert!(kept
        .iter()
        .all(|p| !p.chosen.trim().is_empty() && !p.rejected.trim().is_empty()));

    // Raw: the best completion's reply blank (it is chosen), or the only other one empty (it
    // is rejected).
    let lines = [
        raw_line("flan", "fine", &[json!(9), json!(2)]),
        raw_line_with_response("blank best", &[json!(2), json!(9)], 1, "   "),
        raw_line_with_response("empty other", &[json!(9), json!(2)], 1, ""),
        raw_line("flan", "also fine", &[json!(8), json!(1)]),
    ];
    hub.add_dataset_file(
        OPENBMB,
        OPENBMB_REV,
        "flan.jsonl",
        (lines.join("\n") + "\n").into_bytes(),
    );
    let (work, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut cfg = config(&hub, cache.path(), Source::Ultrafeedback);
    cfg.ingest.ultrafeedback.format = UltraFeedbackFormat::Raw;
    cfg.ingest.ultrafeedback.raw_test_size = 0;
    let summary = run(&cfg, work.path()).unwrap();
    assert_eq!(split(&summary[0], "train").rows, 2, "{summary:?}");
    assert_eq!(
        failures(work.path(), "ultrafeedback", "train"),
        counts(&[("dropped_empty_response", 2)])
    );
}

#[test]
fn a_malformed_raw_line_is_an_error_naming_file_and_line() {
    let hub = MockHub::start().unwrap();
    let good = raw_line("flan", "ok", &[serde_json::json!(8), serde_json::json!(2)]);
    let text = format!("{good}\n{good}\n{{\"source\": \"flan\", \"instruction\": \n{good}\n");
    hub.add_dataset_file(OPENBMB, OPENBMB_REV, "flan.jsonl", text.into_bytes());
    let (work, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut cfg = config(&hub, cache.path(), Source::Ultrafeedback);
    cfg.ingest.ultrafeedback.format = UltraFeedbackFormat::Raw;
    let err = run(&cfg, work.path()).unwrap_err().to_string();
    assert!(err.contains("flan.jsonl") && err.contains("row 3"), "{err}");
}

// ---------------------------------------------------------------------------------------
// StoryReasoning.

fn serve_stories(hub: &MockHub) {
    let mut train: Vec<StoryRow> = Vec::new();
    train.extend((100..106).map(|i| story_row(&i.to_string(), 5, None)));
    train.extend((200..204).map(|i| story_row(&i.to_string(), 6, None)));
    train.push(story_row("300", 6, Some(3)));
    train.push(story_row("301", 4, None));
    let mut bad_image = story_row("303", 6, None);
    bad_image.images[1] = b"GIF89a\x01\x00\x01\x00".to_vec();
    bad_image.images[4] = jpeg(9);
    train.push(bad_image);
    let (first, second) = train.split_at(7);
    hub.add_dataset_file(
        STORIES,
        "main",
        "data/train-00000-of-00002.parquet",
        story_parquet(first, false),
    );
    hub.add_dataset_file(
        STORIES,
        "main",
        "data/train-00001-of-00002.parquet",
        story_parquet(second, false),
    );
    let test = vec![story_row("900", 5, None), story_row("901", 7, None)];
    hub.add_dataset_file(
        STORIES,
        "main",
        "data/test-00000-of-00001.parquet",
        story_parquet(&test, true),
    );
}

fn frames_by_story(frames: &[StoryFrame]) -> BTreeMap<String, Vec<&StoryFrame>> {
    let mut out: BTreeMap<String, Vec<&StoryFrame>> = BTreeMap::new();
    for f in frames {
        out.entry(f.story_id.clone()).or_default().push(f);
    }
    out
}

#[test]
fn stories_become_captioned_frames_with_a_stratified_val_split() {
    let hub = MockHub::start().unwrap();
    serve_stories(&hub);
    let (work, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut cfg = config(&hub, cache.path(), Source::Storyreasoning);
    cfg.ingest.storyreasoning.val_fraction = 0.25;
    cfg.ingest.storyreasoning.shard_size = 12;

    let summary = run(&cfg, work.path()).unwrap();
    let names: Vec<&str> = summary[0].splits.iter().map(|s| s.split.as_str()).collect();
    assert_eq!(names, vec!["train", "val", "test"]);

    let read = |split: &str| -> Vec<StoryFrame> {
        ShardSet::new(work.path(), "storyreasoning", split)
            .read_all()
            .unwrap()
    };
    let (train, val, test) = (read("train"), read("val"), read("test"));
    let (train_s, val_s) = (frames_by_story(&train), frames_by_story(&val));
    // Kept: 100–105, 300 and 303 with 5 frames (8 stories), 200–203 with 6 (4 stories);
    // val takes round(0.25 × 8) = 2 and round(0.25 × 4) = 1.
    let in_val = |frames: usize| val_s.values().filter(|f| f.len() == frames).count();
    assert_eq!(
        (in_val(5), in_val(6), val_s.len()),
        (2, 1, 3),
        "{:?}",
        val_s.keys()
    );
    assert_eq!(train_s.len(), 9);
    assert!(train_s.keys().all(|k| !val_s.contains_key(k)));
    assert!(
        !train_s.contains_key("301") && !val_s.contains_key("301"),
        "4 frames < context_frames + 1"
    );

    let all: BTreeMap<String, Vec<&StoryFrame>> = train_s.into_iter().chain(val_s).collect();
    for (id, frames) in &all {
        let idx: Vec<i32> = frames.iter().map(|f| f.frame_index).collect();
        // Source positions: a dropped frame leaves its gap (300 lacks block 3, 303's
        // second image is a GIF), so no next-frame window spans it.
        let want: Vec<i32> = match id.as_str() {
            "300" => vec![0, 1, 3, 4, 5],
            "303" => vec![0, 2, 3, 4, 5],
            _ => (0..frames.len() as i32).collect(),
        };
        assert_eq!(idx, want, "story {id}");
        // `frame_count` is the story's number of images.
        let images = *want.last().unwrap() + 1;
        assert!(frames.iter().all(|f| f.frame_count == images), "story {id}");
    }
    let s100 = &all["100"];
    assert_eq!(s100[0].caption, clean_caption("100", 1));
    assert_eq!(
        s100[4].image,
        png(frame_seed("100", 5)),
        "image bytes are kept as stored"
    );
    let s200 = &all["200"];
    assert_eq!(
        s200[5].caption,
        clean_caption("200", 6),
        "multi-line blocks"
    );
    let gap: Vec<String> = all["300"].iter().map(|f| f.caption.clone()).collect();
    let want: Vec<String> = [1, 2, 4, 5, 6]
        .iter()
        .map(|&n| clean_caption("300", n))
        .collect();
    assert_eq!(gap, want, "the frame without a block is dropped");
    let s303 = &all["303"];
    assert_eq!(s303.len(), 5);
    assert_eq!(
        s303[1].caption,
        clean_caption("303", 3),
        "the GIF frame is dropped"
    );
    assert_eq!(s303[3].image, jpeg(9));

    let mut drops = failures(work.path(), "storyreasoning", "train");
    for (k, v) in failures(work.path(), "storyreasoning", "val") {
        *drops.entry(k).or_default() += v;
    }
    assert_eq!(
        drops,
        counts(&[
            ("bad_image", 1),
            ("caption_mismatch", 1),
            ("gapped_story", 2),
            ("too_few_frames", 1)
        ])
    );

    // Shards hold whole stories.
    for split in ["train", "val"] {
        let set = ShardSet::new(work.path(), "storyreasoning", split);
        let mut seen = BTreeSet::new();
        for shard in set.finished().unwrap() {
            let rows: Vec<StoryFrame> = set.read(shard).unwrap();
            assert!(rows.len() <= 12 || frames_by_story(&rows).len() == 1);
            for id in frames_by_story(&rows).into_keys() {
                assert!(
                    seen.insert(id.clone()),
                    "story {id} spans shards of {split}"
                );
            }
        }
    }

    // The test split (large_* columns) keeps its name and all of its stories.
    let test_s = frames_by_story(&test);
    assert_eq!(test_s.keys().collect::<Vec<_>>(), vec!["900", "901"]);
    assert_eq!(test_s["901"].len(), 7);
    assert_eq!(test_s["901"][6].caption, clean_caption("901", 7));

    assert_hf_protocol(&hub, STORIES);
    let commit = hub.commit_of(STORIES, "main");
    assert!(sources(work.path(), "storyreasoning", "val")
        .iter()
        .all(|s| s.starts_with(&format!("{STORIES}@{commit} "))));

    // Deterministic and resumable: a re-run skips every shard and changes nothing.
    let again = run(&cfg, work.path()).unwrap();
    assert!(
        again[0]
            .splits
            .iter()
            .all(|s| s.shards_written == 0 && s.shards_skipped > 0),
        "{again:?}"
    );
    assert_eq!(read("val"), val);
}
