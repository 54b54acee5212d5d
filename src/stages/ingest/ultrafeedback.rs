//! UltraFeedback preference pairs: the binarized H4 parquet splits, or the raw openbmb jsonl
//! binarized here (chosen = best overall_score, rejected = a seeded random other completion).
//!
//! Both formats go through the same filters (an empty reply, ties, score margin, prompt and
//! response length) and land in `data/ultrafeedback/<split>/` as [`PreferencePair`] shards. Every dropped pair
//! is counted by reason in the `failures` map of the shard stats (`dropped_tie`, ...), so
//! `successes` is always the number of rows in the shard.
//!
//! [`hub_table`] holds the hub-parquet column access and the resumable split writer that the
//! StoryReasoning source shares.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::time::Instant;

use arrow::array::{Array, Float64Array, StringArray};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::hub::{HubClient, HubFile};
use crate::data::records::PreferencePair;
use crate::error::{Error, IoContext, Result};
use crate::progress::Progress;
use crate::rng::SplitMix64;
use crate::stages::ingest::hub_table::{
    f64_column, for_each_batch, list_column, provenance, text_column, write_split, ListColumn, Unit,
};
use crate::stages::ingest::{Destination, SourceSummary, SplitSummary};

/// Output dataset: `data/ultrafeedback/<split>/`.
pub const DATASET: &str = "ultrafeedback";

/// Which UltraFeedback distribution to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UltraFeedbackFormat {
    /// HuggingFaceH4/ultrafeedback_binarized parquet splits.
    Binarized,
    /// openbmb/UltraFeedback raw jsonl, binarized by prefcap.
    Raw,
}

/// `[ingest.ultrafeedback]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UltraFeedbackConfig {
    pub format: UltraFeedbackFormat,
    pub repo: String,
    pub revision: String,
    /// Binarized splits to ingest; each is read from `data/<split>-*.parquet`.
    pub splits: Vec<String>,
    pub raw_repo: String,
    pub raw_revision: String,
    /// Raw jsonl files (patterns) to read.
    pub raw_files: Vec<String>,
    /// Raw `source` values dropped before binarization (H4 drops TruthfulQA).
    pub raw_exclude_sources: Vec<String>,
    /// Pairs held out as the raw format's `test` split (H4: 2000).
    pub raw_test_size: usize,
    /// Seed of the rejected-completion choice and the raw train/test split (H4: 42).
    pub binarize_seed: u64,
    /// Drop pairs whose chosen and rejected scores are equal.
    pub drop_ties: bool,
    /// Keep pairs with score_chosen - score_rejected >= this.
    pub min_score_margin: f64,
    /// Drop pairs whose prompt is longer than this many characters (0 = no limit).
    pub max_prompt_chars: usize,
    /// Drop pairs whose chosen or rejected response is longer than this (0 = no limit).
    pub max_response_chars: usize,
    pub shard_size: usize,
}

impl Default for UltraFeedbackConfig {
    fn default() -> Self {
        Self {
            format: UltraFeedbackFormat::Binarized,
            repo: "HuggingFaceH4/ultrafeedback_binarized".into(),
            revision: "3949bf5f8c17c394422ccfab0c31ea9c20bdeb85".into(),
            splits: vec!["train_prefs".into(), "test_prefs".into()],
            raw_repo: "openbmb/UltraFeedback".into(),
            raw_revision: "40b436560ca83a8dba36114c22ab3c66e43f6d5e".into(),
            raw_files: vec!["*.jsonl".into()],
            raw_exclude_sources: vec!["truthful_qa".into()],
            raw_test_size: 2000,
            binarize_seed: 42,
            drop_ties: true,
            min_score_margin: 0.0,
            max_prompt_chars: 0,
            max_response_chars: 0,
            shard_size: 5000,
        }
    }
}

/// Why a row or pair was not written. The `as_str` names are the keys of the shard stats'
/// `failures` map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// Raw row whose `source` is in `raw_exclude_sources`.
    ExcludedSource,
    /// Raw row with fewer than two completions that carry a numeric `overall_score`.
    TooFewCompletions,
    /// Raw row where every other completion equals the chosen one in (score, response, model).
    NoDistinctRejected,
    /// Binarized row whose chosen or rejected conversation has no assistant turn.
    MissingResponse,
    /// Chosen or rejected reply empty or whitespace only: nothing to learn a preference
    /// from, and the preference trainers refuse such pairs.
    EmptyResponse,
    /// `drop_ties`: equal scores.
    Tie,
    /// score_chosen - score_rejected < `min_score_margin`.
    Margin,
    /// Prompt longer than `max_prompt_chars`.
    PromptLength,
    /// Chosen or rejected longer than `max_response_chars`.
    ResponseLength,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::ExcludedSource => "dropped_excluded_source",
            DropReason::TooFewCompletions => "dropped_too_few_completions",
            DropReason::NoDistinctRejected => "dropped_no_distinct_rejected",
            DropReason::MissingResponse => "dropped_missing_response",
            DropReason::EmptyResponse => "dropped_empty_response",
            DropReason::Tie => "dropped_tie",
            DropReason::Margin => "dropped_margin",
            DropReason::PromptLength => "dropped_prompt_length",
            DropReason::ResponseLength => "dropped_response_length",
        }
    }
}

/// Scores closer than this count as equal, so that `8.5 - 6.5 >= 2.0` holds whatever the
/// rounding of scores computed upstream (fine-grained means).
const SCORE_EPSILON: f64 = 1e-9;

/// The filter a pair fails first, in the order empty reply, tie, margin, prompt length,
/// response length; `None` keeps it. Lengths count Unicode scalar values.
pub fn drop_reason(pair: &PreferencePair, cfg: &UltraFeedbackConfig) -> Option<DropReason> {
    let margin = pair.score_chosen - pair.score_rejected;
    let too_long = |text: &str, limit: usize| limit > 0 && text.chars().count() > limit;
    if pair.chosen.trim().is_empty() || pair.rejected.trim().is_empty() {
        Some(DropReason::EmptyResponse)
    } else if cfg.drop_ties && margin.abs() <= SCORE_EPSILON {
        Some(DropReason::Tie)
    } else if margin + SCORE_EPSILON < cfg.min_score_margin {
        Some(DropReason::Margin)
    } else if too_long(&pair.prompt, cfg.max_prompt_chars) {
        Some(DropReason::PromptLength)
    } else if too_long(&pair.chosen, cfg.max_response_chars)
        || too_long(&pair.rejected, cfg.max_response_chars)
    {
        Some(DropReason::ResponseLength)
    } else {
        None
    }
}

/// One turn of a chat conversation as stored in the H4 `chosen`/`rejected` columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Content of the last `assistant` turn: the response in an H4 `[user, assistant]` list.
pub fn last_assistant(messages: &[ChatMessage]) -> Option<&str> {
    messages
        .iter()
        .rev()
        .find(|m| m.role == "assistant")
        .map(|m| m.content.as_str())
}

/// One completion of a raw openbmb row; only the fields binarization reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawCompletion {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub response: Option<String>,
    /// A JSON number (1–10) in the fixed revision; anything else makes the completion unusable.
    #[serde(default)]
    pub overall_score: serde_json::Value,
}

/// One line of a raw openbmb jsonl file; unknown fields (annotations, critiques) are ignored.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawRow {
    #[serde(default)]
    pub source: String,
    pub instruction: String,
    #[serde(default)]
    pub completions: Vec<RawCompletion>,
}

/// A raw row and where it was read (`flan.jsonl:17`), which makes its pair id stable.
#[derive(Debug, Clone)]
pub struct RawRecord {
    pub origin: String,
    pub row: RawRow,
}

/// sha256 hex of the prompt's UTF-8 bytes: H4's `prompt_id`.
pub fn prompt_id(prompt: &str) -> String {
    hex::encode(Sha256::digest(prompt.as_bytes()))
}

/// Binarizes one raw row as H4's `create_dataset.py` does: chosen is the completion with the
/// highest `overall_score` (the first one on ties); rejected is drawn uniformly from the
/// completions whose (score, response, model) differs from chosen's, with a generator derived
/// from `seed` and the prompt, so the draw does not depend on the row's position.
/// Completions without a numeric score take no part. Equal scores remain possible.
pub fn binarize_row(record: &RawRecord, seed: u64) -> Result<PreferencePair, DropReason> {
    let row = &record.row;
    let scored: Vec<(f64, &str, &str)> = row
        .completions
        .iter()
        .filter_map(|c| {
            let score = c.overall_score.as_f64().filter(|s| s.is_finite())?;
            Some((
                score,
                c.response.as_deref().unwrap_or(""),
                c.model.as_deref().unwrap_or(""),
            ))
        })
        .collect();
    if scored.len() < 2 {
        return Err(DropReason::TooFewCompletions);
    }
    let mut best = 0;
    for (i, c) in scored.iter().enumerate() {
        if c.0 > scored[best].0 {
            best = i;
        }
    }
    let chosen = scored[best];
    let others: Vec<&(f64, &str, &str)> = scored.iter().filter(|c| **c != chosen).collect();
    if others.is_empty() {
        return Err(DropReason::NoDistinctRejected);
    }
    let rejected = **SplitMix64::derived(seed, &row.instruction).choose(&others);
    let id = prompt_id(&row.instruction);
    Ok(PreferencePair {
        pair_id: format!("{id}:{}", record.origin),
        source: format!("ultrafeedback_raw:{}", row.source),
        prompt: row.instruction.clone(),
        chosen: chosen.1.to_string(),
        rejected: rejected.1.to_string(),
        score_chosen: chosen.0,
        score_rejected: rejected.0,
        image_key: None,
    })
}

/// Binarizes `records` in order; rows from `exclude_sources` are dropped first.
pub fn binarize(
    records: &[RawRecord],
    exclude_sources: &[String],
    seed: u64,
) -> Vec<Result<PreferencePair, DropReason>> {
    records
        .iter()
        .map(|r| {
            if exclude_sources.contains(&r.row.source) {
                Err(DropReason::ExcludedSource)
            } else {
                binarize_row(r, seed)
            }
        })
        .collect()
}

/// Seeded train/test split: the `test_size` pairs with the smallest seeded hash of their
/// `pair_id` are held out (all of them when there are fewer). Membership depends only on the
/// seed and the id, not on input order; both halves keep the input order.
pub fn split_test(
    pairs: Vec<PreferencePair>,
    test_size: usize,
    seed: u64,
) -> (Vec<PreferencePair>, Vec<PreferencePair>) {
    let key = |p: &PreferencePair| {
        SplitMix64::derived(seed, &format!("ultrafeedback/test/{}", p.pair_id)).next_u64()
    };
    let mut order: Vec<(u64, usize)> = pairs.iter().enumerate().map(|(i, p)| (key(p), i)).collect();
    order.sort_unstable();
    let mut is_test = vec![false; pairs.len()];
    for &(_, i) in order.iter().take(test_size) {
        is_test[i] = true;
    }
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (pair, held_out) in pairs.into_iter().zip(is_test) {
        if held_out {
            test.push(pair);
        } else {
            train.push(pair);
        }
    }
    (train, test)
}

/// Applies the filters; each pair becomes a one-row unit or a counted drop.
fn filtered(
    outcomes: Vec<Result<PreferencePair, DropReason>>,
    cfg: &UltraFeedbackConfig,
) -> Vec<Unit<PreferencePair>> {
    outcomes
        .into_iter()
        .map(
            |o| match o.and_then(|p| drop_reason(&p, cfg).map_or(Ok(p), Err)) {
                Ok(pair) => Unit::Rows(vec![pair]),
                Err(reason) => Unit::Count(reason.as_str(), 1),
            },
        )
        .collect()
}

/// The settings that shape the written rows, so that changing one rewrites the shards.
fn settings(cfg: &UltraFeedbackConfig) -> serde_json::Value {
    let mut v = serde_json::json!({
        "format": cfg.format,
        "drop_empty_responses": true,
        "drop_ties": cfg.drop_ties,
        "min_score_margin": cfg.min_score_margin,
        "max_prompt_chars": cfg.max_prompt_chars,
        "max_response_chars": cfg.max_response_chars,
        "shard_size": cfg.shard_size,
    });
    if cfg.format == UltraFeedbackFormat::Raw {
        v["raw_files"] = serde_json::json!(cfg.raw_files);
        v["raw_exclude_sources"] = serde_json::json!(cfg.raw_exclude_sources);
        v["raw_test_size"] = serde_json::json!(cfg.raw_test_size);
        v["binarize_seed"] = serde_json::json!(cfg.binarize_seed);
    }
    v
}

/// Ingests the configured format into `data/ultrafeedback/<split>/`.
///
/// Resumable per shard: the rows of a split are a deterministic function of the hub commit
/// and the settings, so they are always recomputed from the (cached) hub files, and a shard
/// is rewritten unless it is finished and its stats' `source` equals this run's provenance
/// (`repo@commit` plus a digest of the settings). Finished shards past the new end of the
/// split are removed.
pub fn run(cfg: &UltraFeedbackConfig, hub: &HubClient, out: Destination) -> Result<SourceSummary> {
    if cfg.shard_size == 0 {
        return Err(Error::Config(
            "ingest.ultrafeedback.shard_size must be at least 1".into(),
        ));
    }
    let splits = match cfg.format {
        UltraFeedbackFormat::Binarized => run_binarized(cfg, hub, out)?,
        UltraFeedbackFormat::Raw => run_raw(cfg, hub, out)?,
    };
    Ok(SourceSummary {
        source: DATASET.into(),
        splits,
    })
}

fn run_binarized(
    cfg: &UltraFeedbackConfig,
    hub: &HubClient,
    dest: Destination,
) -> Result<Vec<SplitSummary>> {
    let mut out = Vec::new();
    for split in &cfg.splits {
        let started = Instant::now();
        let files = hub.dataset_files(
            &cfg.repo,
            &cfg.revision,
            &[format!("data/{split}-*.parquet")],
        )?;
        let progress = Progress::new(&format!("{DATASET}/{split}"), "pairs", None);
        let mut outcomes = Vec::new();
        for file in &files {
            let before = outcomes.len();
            read_binarized_file(file, before, &mut outcomes)?;
            progress.inc((outcomes.len() - before) as u64);
        }
        let source = provenance(&cfg.repo, &files, &settings(cfg));
        let summary = write_split(
            dest,
            DATASET,
            split,
            &source,
            cfg.shard_size,
            filtered(outcomes, cfg),
            started,
        )?;
        progress.finish(&format!("{} pairs kept in {split}", summary.rows));
        out.push(summary);
    }
    Ok(out)
}

/// Reads one H4 parquet file; `first_index` is the split-level index of its first row, which
/// makes `pair_id = prompt_id:index` unique within the split.
fn read_binarized_file(
    file: &HubFile,
    first_index: usize,
    out: &mut Vec<Result<PreferencePair, DropReason>>,
) -> Result<()> {
    let path = file.local.as_path();
    for_each_batch(path, |batch, row_offset| {
        let prompt = text_column(batch, "prompt", path)?;
        let ids = text_column(batch, "prompt_id", path)?;
        let chosen = list_column(batch, "chosen", path)?;
        let rejected = list_column(batch, "rejected", path)?;
        let chosen_msgs = chosen.struct_texts(&["role", "content"], path)?;
        let rejected_msgs = rejected.struct_texts(&["role", "content"], path)?;
        let score_chosen = f64_column(batch, "score_chosen", path)?;
        let score_rejected = f64_column(batch, "score_rejected", path)?;
        for i in 0..batch.num_rows() {
            let row = (row_offset + i) as u64 + 1;
            let bad = |message: String| Error::BadRow {
                path: path.to_path_buf(),
                row,
                message,
            };
            let text = |a: &StringArray, name: &str| {
                if a.is_null(i) {
                    Err(bad(format!("`{name}` is null")))
                } else {
                    Ok(a.value(i).to_string())
                }
            };
            let score = |a: &Float64Array, name: &str| {
                if a.is_null(i) {
                    Err(bad(format!("`{name}` is null or not a number")))
                } else {
                    Ok(a.value(i))
                }
            };
            let prompt_text = text(&prompt, "prompt")?;
            let id = if ids.is_null(i) {
                prompt_id(&prompt_text)
            } else {
                ids.value(i).to_string()
            };
            let chosen_turns = conversation(&chosen, &chosen_msgs, i);
            let rejected_turns = conversation(&rejected, &rejected_msgs, i);
            let outcome = match (
                last_assistant(&chosen_turns),
                last_assistant(&rejected_turns),
            ) {
                (Some(c), Some(r)) => Ok(PreferencePair {
                    pair_id: format!("{id}:{}", first_index + row_offset + i),
                    source: "ultrafeedback_binarized".into(),
                    prompt: prompt_text,
                    chosen: c.to_string(),
                    rejected: r.to_string(),
                    score_chosen: score(&score_chosen, "score_chosen")?,
                    score_rejected: score(&score_rejected, "score_rejected")?,
                    image_key: None,
                }),
                _ => Err(DropReason::MissingResponse),
            };
            out.push(outcome);
        }
        Ok(())
    })
}

/// Row `row` of an H4 conversation column, given its `[role, content]` struct fields; null
/// turns are skipped and null fields read as empty.
fn conversation(list: &ListColumn, fields: &[StringArray], row: usize) -> Vec<ChatMessage> {
    let field = |a: &StringArray, j: usize| {
        if a.is_valid(j) {
            a.value(j).to_string()
        } else {
            String::new()
        }
    };
    let Some(range) = list.range(row) else {
        return Vec::new();
    };
    range
        .filter(|&j| !list.is_entry_null(j))
        .map(|j| ChatMessage {
            role: field(&fields[0], j),
            content: field(&fields[1], j),
        })
        .collect()
}

fn run_raw(
    cfg: &UltraFeedbackConfig,
    hub: &HubClient,
    dest: Destination,
) -> Result<Vec<SplitSummary>> {
    let started = Instant::now();
    let files = hub.dataset_files(&cfg.raw_repo, &cfg.raw_revision, &cfg.raw_files)?;
    let progress = Progress::new(&format!("{DATASET}/raw"), "rows", None);
    let mut records = Vec::new();
    for file in &files {
        let before = records.len();
        read_raw_file(file, &mut records)?;
        progress.inc((records.len() - before) as u64);
    }
    let mut binarize_drops: BTreeMap<DropReason, u64> = BTreeMap::new();
    let mut pairs = Vec::new();
    for outcome in binarize(&records, &cfg.raw_exclude_sources, cfg.binarize_seed) {
        match outcome {
            Ok(p) => pairs.push(p),
            Err(reason) => *binarize_drops.entry(reason).or_default() += 1,
        }
    }
    drop(records);
    let (train, test) = split_test(pairs, cfg.raw_test_size, cfg.binarize_seed);
    let source = provenance(&cfg.raw_repo, &files, &settings(cfg));
    let mut out = Vec::new();
    for (split, pairs) in [("train", train), ("test", test)] {
        // Binarization happens before the split, so its drops are recorded with `train`.
        let mut units: Vec<Unit<PreferencePair>> = Vec::new();
        if split == "train" {
            units.extend(
                binarize_drops
                    .iter()
                    .map(|(r, n)| Unit::Count(r.as_str(), *n)),
            );
        }
        units.extend(filtered(pairs.into_iter().map(Ok).collect(), cfg));
        out.push(write_split(
            dest,
            DATASET,
            split,
            &source,
            cfg.shard_size,
            units,
            started,
        )?);
    }
    progress.finish(&format!(
        "{} train / {} test pairs kept",
        out[0].rows, out[1].rows
    ));
    Ok(out)
}

/// Parses every non-blank line of a raw jsonl file. A line that is not a JSON object with an
/// `instruction` is an error naming the file and its 1-based line number.
fn read_raw_file(file: &HubFile, out: &mut Vec<RawRecord>) -> Result<()> {
    let path = file.local.as_path();
    let mut reader = BufReader::new(File::open(path).at(path)?);
    let mut line = Vec::new();
    let mut line_no = 0u64;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).at(path)? == 0 {
            return Ok(());
        }
        line_no += 1;
        // Without the line break, serde's own position reads "line 1 column N".
        while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let row: RawRow = serde_json::from_slice(&line).map_err(|e| Error::BadRow {
            path: path.to_path_buf(),
            row: line_no,
            message: format!(
                "not a valid UltraFeedback JSON row ({} in the repo): {e}",
                file.path_in_repo
            ),
        })?;
        out.push(RawRecord {
            origin: format!("{}:{line_no}", file.path_in_repo),
            row,
        });
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn completion(model: &str, response: &str, score: serde_json::Value) -> RawCompletion {
        RawCompletion {
            model: Some(model.into()),
            response: Some(response.into()),
            overall_score: score,
        }
    }

    fn record(source: &str, prompt: &str, completions: Vec<RawCompletion>) -> RawRecord {
        RawRecord {
            origin: format!("{source}.jsonl:1"),
            row: RawRow {
                source: source.into(),
                instruction: prompt.into(),
                completions,
            },
        }
    }

    fn pair(score_chosen: f64, score_rejected: f64) -> PreferencePair {
        PreferencePair {
            pair_id: "p".into(),
            source: "test".into(),
            prompt: "Why is the sky blue?".into(),
            chosen: "Rayleigh scattering.".into(),
            rejected: "Because.".into(),
            score_chosen,
            score_rejected,
            image_key: None,
        }
    }

    #[test]
    fn chosen_is_the_best_score_and_rejected_a_distinct_other() {
        let rec = record(
            "sharegpt",
            "Name a prime.",
            vec![
                completion("a", "4", serde_json::json!(2.0)),
                completion("b", "7", serde_json::json!(9.5)),
                completion("c", "9", serde_json::json!(3.0)),
                completion("d", "2", serde_json::json!(9.5)),
            ],
        );
        let p = binarize_row(&rec, 42).unwrap();
        assert_eq!(
            (p.chosen.as_str(), p.score_chosen),
            ("7", 9.5),
            "first of the tied best wins"
        );
        assert_ne!(p.rejected, "7");
        assert_eq!(p.source, "ultrafeedback_raw:sharegpt");
        assert_eq!(
            p.pair_id,
            format!("{}:sharegpt.jsonl:1", prompt_id("Name a prime."))
        );
        assert_eq!(p, binarize_row(&rec, 42).unwrap(), "the draw is seeded");
    }

    #[test]
    fn rejected_draw_covers_every_other_completion_across_prompts() {
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..200 {
            let rec = record(
                "flan",
                &format!("prompt {i}"),
                vec![
                    completion("a", "best", serde_json::json!(10)),
                    completion("b", "x", serde_json::json!(1)),
                    completion("c", "y", serde_json::json!(2)),
                    completion("d", "z", serde_json::json!(3)),
                ],
            );
            seen.insert(binarize_row(&rec, 7).unwrap().rejected);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec!["x", "y", "z"]);
    }

    #[test]
    fn equal_scores_with_different_text_are_a_valid_tie_pair() {
        let rec = record(
            "evol_instruct",
            "q",
            vec![
                completion("a", "one", serde_json::json!(5)),
                completion("b", "two", serde_json::json!(5)),
            ],
        );
        let p = binarize_row(&rec, 1).unwrap();
        assert_eq!((p.chosen.as_str(), p.rejected.as_str()), ("one", "two"));
        assert_eq!(
            drop_reason(&p, &UltraFeedbackConfig::default()),
            Some(DropReason::Tie)
        );
    }

    #[test]
    fn rows_without_two_scored_or_two_distinct_completions_are_dropped() {
        let one_scored = record(
            "flan",
            "q",
            vec![
                completion("a", "r", serde_json::json!(5)),
                completion("b", "s", serde_json::json!("N/A")),
            ],
        );
        assert_eq!(
            binarize_row(&one_scored, 0),
            Err(DropReason::TooFewCompletions)
        );
        let duplicates = record(
            "flan",
            "q",
            vec![
                completion("a", "r", serde_json::json!(5)),
                completion("a", "r", serde_json::json!(5)),
            ],
        );
        assert_eq!(
            binarize_row(&duplicates, 0),
            Err(DropReason::NoDistinctRejected)
        );
        let excluded = record("truthful_qa", "q", vec![]);
        let out = binarize(&[excluded], &["truthful_qa".into()], 0);
        assert_eq!(out, vec![Err(DropReason::ExcludedSource)]);
    }

    #[test]
    fn binarization_does_not_depend_on_row_order() {
        let rows: Vec<RawRecord> = (0..20)
            .map(|i| {
                let mut r = record(
                    "ultrachat",
                    &format!("p{i}"),
                    (0..4)
                        .map(|j| {
                            completion(&format!("m{j}"), &format!("r{j}"), serde_json::json!(j))
                        })
                        .collect(),
                );
                r.origin = format!("ultrachat.jsonl:{}", i + 1);
                r
            })
            .collect();
        let forward = binarize(&rows, &[], 42);
        let mut reversed_rows = rows.clone();
        reversed_rows.reverse();
        let mut backward = binarize(&reversed_rows, &[], 42);
        backward.reverse();
        assert_eq!(forward, backward);
    }

    #[test]
    fn an_empty_or_blank_reply_on_either_side_drops_the_pair_first() {
        let cfg = UltraFeedbackConfig {
            drop_ties: false,
            ..UltraFeedbackConfig::default()
        };
        for (chosen, rejected) in [("", "no"), ("yes", "  \n\t"), (" ", "")] {
            let mut p = pair(8.0, 8.0);
            (p.chosen, p.rejected) = (chosen.into(), rejected.into());
            assert_eq!(
                drop_reason(&p, &cfg),
                Some(DropReason::EmptyResponse),
                "{chosen:?} / {rejected:?}"
            );
        }
        assert_eq!(DropReason::EmptyResponse.as_str(), "dropped_empty_response");
        let mut p = pair(8.0, 7.0);
        p.rejected = " x ".into();
        assert_eq!(drop_reason(&p, &cfg), None);
    }

    #[test]
    fn filters_apply_in_order_and_zero_means_off() {
        let cfg = UltraFeedbackConfig::default();
        assert_eq!(drop_reason(&pair(8.0, 8.0), &cfg), Some(DropReason::Tie));
        assert_eq!(drop_reason(&pair(8.0, 7.0), &cfg), None);
        let keep_ties = UltraFeedbackConfig {
            drop_ties: false,
            ..UltraFeedbackConfig::default()
        };
        assert_eq!(drop_reason(&pair(8.0, 8.0), &keep_ties), None);
        let margin = UltraFeedbackConfig {
            min_score_margin: 2.0,
            ..UltraFeedbackConfig::default()
        };
        assert_eq!(
            drop_reason(&pair(8.5, 6.5), &margin),
            None,
            "a margin of exactly 2.0 is kept"
        );
        assert_eq!(
            drop_reason(&pair(8.0, 6.5), &margin),
            Some(DropReason::Margin)
        );
        assert_eq!(
            drop_reason(&pair(8.0, 8.0), &margin),
            Some(DropReason::Tie),
            "ties are reported as ties"
        );
        let prompt = UltraFeedbackConfig {
            max_prompt_chars: 10,
            ..UltraFeedbackConfig::default()
        };
        assert_eq!(
            drop_reason(&pair(9.0, 1.0), &prompt),
            Some(DropReason::PromptLength)
        );
        let response = UltraFeedbackConfig {
            max_response_chars: 10,
            ..UltraFeedbackConfig::default()
        };
        assert_eq!(
            drop_reason(&pair(9.0, 1.0), &response),
            Some(DropReason::ResponseLength)
        );
        let unicode = UltraFeedbackConfig {
            max_response_chars: 20,
            ..UltraFeedbackConfig::default()
        };
        let mut p = pair(9.0, 1.0);
        p.chosen = "é".repeat(20);
        assert_eq!(
            drop_reason(&p, &unicode),
            None,
            "limits count characters, not bytes"
        );
    }

    #[test]
    fn the_response_is_the_last_assistant_turn() {
        let m = |role: &str, content: &str| ChatMessage {
            role: role.into(),
            content: content.into(),
        };
        assert_eq!(
            last_assistant(&[m("user", "hi"), m("assistant", "hello")]),
            Some("hello")
        );
        assert_eq!(
            last_assistant(&[
                m("user", "a"),
                m("assistant", "b"),
                m("user", "c"),
                m("assistant", "d")
            ]),
            Some("d")
        );
        assert_eq!(last_assistant(&[m("user", "only a prompt")]), None);
        assert_eq!(last_assistant(&[]), None);
    }

    #[test]
    fn test_split_holds_out_a_fixed_seeded_set() {
        let pairs: Vec<PreferencePair> = (0..100)
            .map(|i| PreferencePair {
                pair_id: format!("id{i}"),
                ..pair(2.0, 1.0)
            })
            .collect();
        let (train, test) = split_test(pairs.clone(), 10, 42);
        assert_eq!((train.len(), test.len()), (90, 10));
        let ids = |v: &[PreferencePair]| v.iter().map(|p| p.pair_id.clone()).collect::<Vec<_>>();
        let mut reversed = pairs.clone();
        reversed.reverse();
        let (_, test_rev) = split_test(reversed, 10, 42);
        let mut a = ids(&test);
        let mut b = ids(&test_rev);
        a.sort();
        b.sort();
        assert_eq!(a, b, "membership does not depend on order");
        let (_, other_seed) = split_test(pairs.clone(), 10, 43);
        assert_ne!(ids(&test), ids(&other_seed));
        let (train_all, test_all) = split_test(pairs, 1000, 42);
        assert_eq!((train_all.len(), test_all.len()), (0, 100));
    }

    #[test]
    fn raw_rows_parse_from_openbmb_json_and_ignore_extra_fields() {
        let line = r#"{"source":"evol_instruct","instruction":"Say hi","models":["a","b"],
            "completions":[{"model":"a","principle":"helpfulness","custom_system_prompt":"",
            "response":"hi","critique":"ok","fine-grained_score":4.25,"overall_score":7.5,
            "annotations":{"honesty":{"Rating":"5","Rationale":"fine"}}},
            {"model":"b","response":"hey","overall_score":null,"fine-grained_score":null}],
            "correct_answers":["None"],"incorrect_answers":["None"]}"#;
        let row: RawRow = serde_json::from_str(line).unwrap();
        assert_eq!(row.completions.len(), 2);
        assert_eq!(row.completions[0].overall_score.as_f64(), Some(7.5));
        assert_eq!(row.completions[1].overall_score.as_f64(), None);
    }
}
