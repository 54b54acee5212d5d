//! `pipeline run score`: caption metrics of `generations.parquet` against the dataset's
//! references — BLEU-1..4, METEOR, ROUGE-L and CIDEr-D as pycocoevalcap computes them (see
//! [`crate::metrics::text`] and [`crate::metrics::meteor`]; METEOR with its exact and stem
//! modules), CLIPScore and RefCLIPScore with `[clip]`'s model, and, on the synthetic world,
//! attribute accuracy — into `scores.parquet` (one row per caption) and
//! `scores_summary.parquet` (one row per model, method and metric). `pipeline score --refs
//! --cands` scores any model's captions from COCO-format JSON, JSONL or Parquet files.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::hub::HubClient;
use crate::data::records::{GenerationRow, ScoreRow, SummaryRow};
use crate::data::shard::{read_parquet, write_parquet};
use crate::datasets::captions::references;
use crate::datasets::features::embeddings_by_key;
use crate::datasets::stories::is_story_split;
use crate::error::{Error, IoContext, Result};
use crate::metrics::bertscore::{bert_score, BertScore, IdfWeights, TokenEmbeddings};
use crate::metrics::embedding::{clip_score, cosine, ref_clip_score};
use crate::metrics::{mean, text_metrics, TextScores};
use crate::models::bert::{BertEncoder, SentenceStates};
use crate::stages::{Stage, StageContext};
use crate::synthetic::{self, AttributeMatch};

/// `[score]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoreConfig {
    /// Compute CLIPScore and RefCLIPScore (loads `[clip]`'s model).
    pub clip_score: bool,
    /// BERTScore's model: a BERT, DistilBERT or RoBERTa checkpoint (hub repo or local Hugging
    /// Face directory); empty = no BERTScore.
    pub bertscore_model: String,
    pub bertscore_revision: String,
    /// The layer whose hidden states are matched (bert-score's `num_layers`; 9 for
    /// bert-base-uncased).
    pub bertscore_layer: usize,
    /// Weight tokens by their idf over each scored set's references.
    pub idf: bool,
}

impl Default for ScoreConfig {
    fn default() -> Self {
        Self {
            clip_score: true,
            bertscore_model: String::new(),
            bertscore_revision: "main".into(),
            bertscore_layer: 9,
            idf: false,
        }
    }
}

/// The BERTScore encoder `cfg` names, if any: a local directory or a hub repo.
fn bertscore_encoder(cfg: &ScoreConfig, ctx: &StageContext) -> Result<Option<BertEncoder>> {
    if cfg.bertscore_model.is_empty() {
        return Ok(None);
    }
    let dir = HubClient::model_dir(
        &cfg.bertscore_model,
        &cfg.bertscore_revision,
        &["config.json", "tokenizer.json", "model.safetensors"],
        || ctx.hub_client(),
    )?;
    BertEncoder::load(&dir, cfg.bertscore_layer, &ctx.device()?).map(Some)
}

/// BERTScore of each candidate against its references (flattened in `flat_refs`, `refs[i]`
/// of them for candidate `i`), idf over these references when asked.
pub fn bertscores(
    encoder: &BertEncoder,
    cands: &[String],
    refs: &[Vec<String>],
    idf: bool,
) -> Result<Vec<BertScore>> {
    let tokens = |v: Vec<SentenceStates>| -> Vec<TokenEmbeddings> {
        v.into_iter()
            .map(|(ids, vectors)| TokenEmbeddings { ids, vectors })
            .collect()
    };
    let cand = tokens(encoder.embed(cands, 64)?);
    let flat: Vec<String> = refs.iter().flatten().cloned().collect();
    let flat = tokens(encoder.embed(&flat, 64)?);
    let special = [encoder.cls, encoder.sep];
    let weights = if idf {
        IdfWeights::idf(
            &flat.iter().map(|e| e.ids.clone()).collect::<Vec<_>>(),
            &special,
        )
    } else {
        IdfWeights::uniform(&special)
    };
    let mut at = 0;
    Ok(cand
        .iter()
        .zip(refs)
        .map(|(c, r)| {
            let s = bert_score(c, &flat[at..at + r.len()], &weights);
            at += r.len();
            s
        })
        .collect())
}

/// What `score` computed: one row per model, method and metric.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreSummary {
    pub rows: Vec<SummaryRow>,
}

impl std::fmt::Display for ScoreSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", summary_table(&self.rows))
    }
}

/// `pipeline run score`.
pub struct Score;

impl Stage for Score {
    const NAME: &'static str = "score";
    const DESCRIPTION: &'static str =
        "BLEU, METEOR, ROUGE-L, CIDEr-D, CLIPScore, BERTScore and attribute accuracy into scores.parquet";
    const USES_GPU: bool = false;
    const SECTION: &'static str = "score";
    type Config = ScoreConfig;
    type Summary = ScoreSummary;

    fn run(cfg: &ScoreConfig, ctx: &StageContext) -> Result<ScoreSummary> {
        score(cfg, ctx)
    }
}

/// Scores this run's (else the newest run's) generations.
fn score(cfg: &ScoreConfig, ctx: &StageContext) -> Result<ScoreSummary> {
    let path = ctx
        .find_output("generations.parquet")
        .ok_or_else(|| ctx.missing("generations.parquet", "generate"))?;
    let rows: Vec<GenerationRow> = read_parquet(&path)?;
    let mut groups: BTreeMap<(String, String, String, String), Vec<&GenerationRow>> =
        BTreeMap::new();
    for r in &rows {
        groups
            .entry((
                r.dataset.clone(),
                r.split.clone(),
                r.model.clone(),
                r.method.clone(),
            ))
            .or_default()
            .push(r);
    }
    let clip = if cfg.clip_score {
        Some(ctx.load_clip(&ctx.feature_identity(&ctx.clip)?)?)
    } else {
        None
    };
    let bert = bertscore_encoder(cfg, ctx)?;
    let mut per_image = Vec::new();
    let mut summary = Vec::new();
    let mut refs_cache: HashMap<(String, String), HashMap<String, Vec<String>>> = HashMap::new();
    let mut image_cache: HashMap<(String, String), HashMap<String, Vec<f32>>> = HashMap::new();
    for ((dataset, split, model, method), gens) in &groups {
        let key = (dataset.clone(), split.clone());
        if !refs_cache.contains_key(&key) {
            refs_cache.insert(key.clone(), references(&ctx.workdir, dataset, split)?);
        }
        let refs_of = &refs_cache[&key];
        let gens: Vec<&&GenerationRow> = gens
            .iter()
            .filter(|g| refs_of.contains_key(&g.image_key))
            .collect();
        if gens.is_empty() {
            continue;
        }
        let cands: Vec<String> = gens.iter().map(|g| g.caption.clone()).collect();
        let is_story = is_story_split(&ctx.workdir, dataset, split)?;
        let refs: Vec<Vec<String>> = gens.iter().map(|g| refs_of[&g.image_key].clone()).collect();
        let (per, mut corpus) = text_metrics(&cands, &refs);
        let mut clip_scores = vec![None; gens.len()];
        let mut ref_clip = vec![None; gens.len()];
        if let Some(clip) = &clip {
            if !image_cache.contains_key(&key) {
                let entries = ctx.split_features(&ctx.clip, dataset, split, "image")?;
                image_cache.insert(key.clone(), embeddings_by_key(&entries)?);
            }
            let images = &image_cache[&key];
            let cand_emb = clip.embed_texts_normalized(&cands)?;
            let flat_refs: Vec<String> = refs.iter().flatten().cloned().collect();
            let ref_emb = clip.embed_texts_normalized(&flat_refs)?;
            let mut at = 0;
            for (i, g) in gens.iter().enumerate() {
                let n_refs = refs[i].len();
                if let Some(img) = images.get(&g.image_key) {
                    let s = clip_score(img, &cand_emb[i]);
                    clip_scores[i] = Some(s);
                    ref_clip[i] = Some(ref_clip_score(s, &cand_emb[i], &ref_emb[at..at + n_refs]));
                }
                at += n_refs;
            }
            corpus.insert(
                "CLIPScore".into(),
                mean(clip_scores.iter().flatten().copied()),
            );
            if is_story {
                // The raw cosine the StoryReasoning write-up reports beside CLIPScore.
                corpus.insert(
                    "CLIP_cosine".into(),
                    mean(gens.iter().enumerate().filter_map(|(i, g)| {
                        images
                            .get(&g.image_key)
                            .map(|img| cosine(img, &cand_emb[i]))
                    })),
                );
            }
            corpus.insert(
                "RefCLIPScore".into(),
                mean(ref_clip.iter().flatten().copied()),
            );
        }
        let mut berts = vec![None; gens.len()];
        if let Some(encoder) = &bert {
            let s = bertscores(encoder, &cands, &refs, cfg.idf)?;
            for (name, pick) in [
                (
                    "BERTScore_P",
                    (|b: &BertScore| b.precision) as fn(&BertScore) -> f64,
                ),
                ("BERTScore_R", |b| b.recall),
                ("BERTScore_F1", |b| b.f1),
            ] {
                corpus.insert(name.into(), mean(s.iter().map(pick)));
            }
            berts = s.into_iter().map(Some).collect();
        }
        let attributes: Vec<Option<f64>> = gens
            .iter()
            .map(|g| {
                let truth = &refs_of[&g.image_key][0];
                if dataset == synthetic::STORIES_DATASET {
                    return synthetic::story_attribute_accuracy(&g.caption, truth);
                }
                (dataset == synthetic::IMAGES_DATASET)
                    .then(|| synthetic::parse_caption(truth))
                    .flatten()
                    .map(|truth| AttributeMatch::score(&g.caption, &truth).accuracy())
            })
            .collect();
        if attributes.iter().any(Option::is_some) {
            corpus.insert(
                "attribute_accuracy".into(),
                mean(attributes.iter().flatten().copied()),
            );
            // The share of captions the synthetic grammar reads back (a scene of two shapes
            // and a relation, nothing more).
            corpus.insert(
                "grammatical".into(),
                mean(gens.iter().map(|g| {
                    let parsed = if dataset == synthetic::STORIES_DATASET {
                        synthetic::parse_story_caption(&g.caption).is_some()
                    } else {
                        synthetic::parse_caption(&g.caption).is_some()
                    };
                    f64::from(u8::from(parsed))
                })),
            );
        }
        for (i, g) in gens.iter().enumerate() {
            per_image.push(ScoreRow {
                run_id: ctx.run_id.clone(),
                model: model.clone(),
                method: method.clone(),
                image_key: g.image_key.clone(),
                caption: g.caption.clone(),
                bleu_1: per[i].bleu[0],
                bleu_2: per[i].bleu[1],
                bleu_3: per[i].bleu[2],
                bleu_4: per[i].bleu[3],
                meteor: per[i].meteor,
                rouge_l: per[i].rouge_l,
                cider_d: per[i].cider_d,
                clip_score: clip_scores[i],
                ref_clip_score: ref_clip[i],
                attribute_accuracy: attributes[i],
                bertscore_p: berts[i].map(|b| b.precision),
                bertscore_r: berts[i].map(|b| b.recall),
                bertscore_f1: berts[i].map(|b| b.f1),
            });
        }
        for (metric, value) in corpus {
            summary.push(SummaryRow {
                run_id: ctx.run_id.clone(),
                model: model.clone(),
                method: method.clone(),
                metric,
                value,
            });
        }
    }
    write_parquet(&ctx.run_dir.join("scores.parquet"), &per_image)?;
    write_parquet(&ctx.run_dir.join("scores_summary.parquet"), &summary)?;
    Ok(ScoreSummary { rows: summary })
}

/// `model/method: metric value, ...` lines, for the run log.
pub fn summary_table(rows: &[SummaryRow]) -> String {
    let mut by: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for r in rows {
        by.entry((r.model.clone(), r.method.clone()))
            .or_default()
            .push(format!("{} {:.4}", r.metric, r.value));
    }
    by.into_iter()
        .map(|((m, d), v)| format!("{m}/{d}: {}", v.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

/// `(image_id, caption)` pairs of a COCO-format JSON (`{"annotations": [...]}` or a list),
/// a JSONL file, or a Parquet file with `image_id` and `caption` columns.
pub fn read_captions(path: &Path) -> Result<Vec<(String, String)>> {
    let bad = |message: String| Error::BadFile {
        path: path.to_path_buf(),
        message,
    };
    let id_of = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let pair = |v: &serde_json::Value, where_: String| -> Result<(String, String)> {
        let id = v
            .get("image_id")
            .and_then(id_of)
            .ok_or_else(|| bad(format!("{where_}: no `image_id`")))?;
        let cap = v
            .get("caption")
            .and_then(|c| c.as_str())
            .ok_or_else(|| bad(format!("{where_}: no `caption` string")))?;
        Ok((id, cap.to_string()))
    };
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if ext == "parquet" {
        let mut out = Vec::new();
        for batch in crate::data::shard::read_batches(path)? {
            let batch = batch?;
            let col = |n: &str| -> Result<Vec<String>> {
                let c = batch
                    .column_by_name(n)
                    .ok_or_else(|| bad(format!("no column `{n}`")))?;
                let c = arrow::compute::cast(c, &arrow::datatypes::DataType::Utf8)
                    .map_err(|e| bad(e.to_string()))?;
                let s = c
                    .as_any()
                    .downcast_ref::<arrow::array::StringArray>()
                    .ok_or_else(|| bad(format!("column `{n}` is not text")))?;
                Ok(s.iter()
                    .map(|x| x.unwrap_or_default().to_string())
                    .collect())
            };
            out.extend(col("image_id")?.into_iter().zip(col("caption")?));
        }
        return Ok(out);
    }
    let text = std::fs::read_to_string(path).at(path)?;
    if ext == "jsonl" {
        return text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let v: serde_json::Value = serde_json::from_str(l).map_err(|e| Error::BadRow {
                    path: path.to_path_buf(),
                    row: i as u64 + 1,
                    message: e.to_string(),
                })?;
                pair(&v, format!("line {}", i + 1))
            })
            .collect();
    }
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let list = v
        .get("annotations")
        .unwrap_or(&v)
        .as_array()
        .ok_or_else(|| bad("expected a list or {\"annotations\": [...]}".into()))?;
    list.iter()
        .enumerate()
        .map(|(i, v)| pair(v, format!("entry {i}")))
        .collect()
}

/// Corpus-level metrics under pycocoevalcap's names, and each image id's caption scores.
pub type FileScores = (BTreeMap<String, f64>, Vec<(String, TextScores)>);

/// Scores the captions of `cands` (one per image) against `refs` (any number per image), as
/// pycocoevalcap does; images without a candidate are an error naming one of them.
pub fn score_files(refs: &Path, cands: &Path) -> Result<FileScores> {
    let mut by_image: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (id, c) in read_captions(refs)? {
        by_image.entry(id).or_default().push(c);
    }
    let mut cand_of: HashMap<String, String> = HashMap::new();
    for (id, c) in read_captions(cands)? {
        if !by_image.contains_key(&id) {
            return Err(Error::BadFile {
                path: cands.to_path_buf(),
                message: format!("image_id {id} has no reference"),
            });
        }
        cand_of.insert(id, c);
    }
    if let Some(missing) = by_image.keys().find(|k| !cand_of.contains_key(*k)) {
        return Err(Error::BadFile {
            path: cands.to_path_buf(),
            message: format!("no candidate for image_id {missing}"),
        });
    }
    let ids: Vec<String> = by_image.keys().cloned().collect();
    let c: Vec<String> = ids.iter().map(|i| cand_of[i].clone()).collect();
    let r: Vec<Vec<String>> = ids.iter().map(|i| by_image[i].clone()).collect();
    let (per, corpus) = text_metrics(&c, &r);
    Ok((corpus, ids.into_iter().zip(per).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coco_json_jsonl_and_parquet_inputs_score_like_pycocoevalcap() {
        let f: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/coco-eval/reference.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let mut anns = Vec::new();
        let mut cands = Vec::new();
        for id in f["images"].as_array().unwrap() {
            let id = id.as_str().unwrap();
            for r in f["references"][id].as_array().unwrap() {
                anns.push(serde_json::json!({"image_id": id, "caption": r}));
            }
            cands.push(serde_json::json!({"image_id": id, "caption": f["candidates"][id]}));
        }
        let refs = tmp.path().join("refs.json");
        std::fs::write(
            &refs,
            serde_json::to_vec(&serde_json::json!({"annotations": anns})).unwrap(),
        )
        .unwrap();
        let cj = tmp.path().join("cands.jsonl");
        std::fs::write(
            &cj,
            cands
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join("\n"),
        )
        .unwrap();
        let (corpus, per) = score_files(&refs, &cj).unwrap();
        assert_eq!(per.len(), 40);
        for (ours, theirs) in [
            ("Bleu_1", "Bleu_1"),
            ("Bleu_4", "Bleu_4"),
            ("ROUGE_L", "ROUGE_L"),
            ("CIDEr", "CIDEr"),
        ] {
            let want = f["scores"][theirs]["corpus"].as_f64().unwrap();
            assert!(
                (corpus[ours] - want).abs() < 1e-9,
                "{ours}: {} vs {want}",
                corpus[ours]
            );
        }
        // METEOR with exact and stem matching only, against METEOR 1.5 with all four
        // modules: src/meteor.rs reports the agreement.
        let want = f["scores"]["METEOR"]["corpus"].as_f64().unwrap();
        assert!(
            (corpus["METEOR"] - want).abs() < 2e-3,
            "{}",
            corpus["METEOR"]
        );
        std::fs::write(&cj, "{\"image_id\": \"nat0\"}\n").unwrap();
        let err = score_files(&refs, &cj).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("caption"), "{err}");
    }
}

#[cfg(test)]
mod bertscore_tests {
    use super::*;
    use candle_core::Device;

    /// BERTScore on a tiny random BERT, DistilBERT and RoBERTa equals the bert-score package's, without and with
    /// idf, several references per candidate (`tests/fixtures/bertscore/make_reference.py`).
    #[test]
    fn bertscore_equals_the_bert_score_package() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bertscore");
        let reference: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
        let layer = reference["num_layers"].as_u64().unwrap() as usize;
        let texts = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect()
        };
        let cands = texts(&reference["cands"]);
        let refs: Vec<Vec<String>> = reference["refs"]
            .as_array()
            .unwrap()
            .iter()
            .map(texts)
            .collect();
        for model in ["bert-tiny", "distilbert-tiny", "roberta-tiny"] {
            let enc = BertEncoder::load(&dir.join(model), layer, &Device::Cpu).unwrap();
            for (key, idf) in [("plain", false), ("idf", true)] {
                let scores = bertscores(&enc, &cands, &refs, idf).unwrap();
                for (i, s) in scores.iter().enumerate() {
                    for (name, got) in [("P", s.precision), ("R", s.recall), ("F", s.f1)] {
                        let want = reference[model][key][name][i].as_f64().unwrap();
                        assert!(
                            (got - want).abs() < 1e-5,
                            "{model} {key} {name} of `{}`: {got} vs {want}",
                            cands[i]
                        );
                    }
                }
            }
        }
        let err = BertEncoder::load(&dir.join("bert-tiny"), 3, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("bertscore_layer") && err.contains("2 layers"),
            "{err}"
        );
    }
}
