//! `pipeline run score`: caption metrics of `generations.parquet` against the dataset's
//! references — BLEU-1..4, METEOR, ROUGE-L and CIDEr-D as pycocoevalcap computes them (see
//! [`crate::metrics::text`] and [`crate::metrics::meteor`]; METEOR with its exact and stem modules), CLIPScore and RefCLIPScore with the embed stage's CLIP, and, on the
//! synthetic world, attribute accuracy — into `scores.parquet` (one row per caption) and
//! `scores_summary.parquet` (one row per model, method and metric). `pipeline score --refs
//! --cands` scores any model's captions from COCO-format JSON, JSONL or Parquet files.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::records::{GenerationRow, ImageTextSample, ScoreRow, SummaryRow};
use crate::data::shard::{read_parquet, write_parquet, ShardSet};
use crate::error::{CandleContext, Error, IoContext, Result};
use crate::metrics::meteor::meteor;
use crate::metrics::text::{bleu, cider_d, ptb_tokenize, rouge_l_corpus};
use crate::models::clip::{l2_normalize, ClipEmbedder};
use crate::pipeline::config::Config;
use crate::stages::embed::{self, ModelIdentity};
use crate::stages::train_sft::StageContext;
use crate::synthetic::{self, AttributeMatch};

/// `[score]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoreConfig {
    /// Compute CLIPScore and RefCLIPScore (loads the embed stage's CLIP).
    pub clip_score: bool,
}

impl Default for ScoreConfig {
    fn default() -> Self {
        Self { clip_score: true }
    }
}

/// Scores of one candidate set: per image and corpus-level.
#[derive(Debug, Clone, Default)]
pub struct SetScores {
    pub per_image: Vec<ScoreRow>,
    pub corpus: BTreeMap<String, f64>,
}

/// The n-gram metrics of one caption.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextScores {
    pub bleu: [f64; 4],
    pub meteor: f64,
    pub rouge_l: f64,
    pub cider_d: f64,
}

/// BLEU, METEOR, ROUGE-L and CIDEr-D of raw (untokenized) candidates against raw references,
/// per caption and corpus-level under pycocoevalcap's names.
pub fn text_metrics(
    candidates: &[String],
    references: &[Vec<String>],
) -> (Vec<TextScores>, BTreeMap<String, f64>) {
    let cands: Vec<String> = candidates.par_iter().map(|c| ptb_tokenize(c)).collect();
    let refs: Vec<Vec<String>> = references
        .par_iter()
        .map(|rs| rs.iter().map(|r| ptb_tokenize(r)).collect())
        .collect();
    let c: Vec<&str> = cands.iter().map(String::as_str).collect();
    let r: Vec<Vec<&str>> = refs
        .iter()
        .map(|rs| rs.iter().map(String::as_str).collect())
        .collect();
    let (((b_corpus, b_per), (m_corpus, m_per)), ((r_corpus, r_per), (c_corpus, c_per))) =
        rayon::join(
            || rayon::join(|| bleu(&c, &r), || meteor(&c, &r)),
            || rayon::join(|| rouge_l_corpus(&c, &r), || cider_d(&c, &r)),
        );
    let mut corpus = BTreeMap::new();
    for (k, v) in b_corpus.iter().enumerate() {
        corpus.insert(format!("Bleu_{}", k + 1), *v);
    }
    corpus.insert("METEOR".into(), m_corpus);
    corpus.insert("ROUGE_L".into(), r_corpus);
    corpus.insert("CIDEr".into(), c_corpus);
    let per = (0..c.len())
        .map(|i| TextScores {
            bleu: b_per[i],
            meteor: m_per[i],
            rouge_l: r_per[i],
            cider_d: c_per[i],
        })
        .collect();
    (per, corpus)
}

/// References of the images of `dataset/split`: key → captions (for the synthetic world, the
/// caption and its converse, which states the same fact).
fn references(workdir: &Path, dataset: &str, split: &str) -> Result<HashMap<String, Vec<String>>> {
    let set = ShardSet::new(workdir, dataset, split);
    let mut out = HashMap::new();
    for shard in set.finished()? {
        for s in set.read::<ImageTextSample>(shard)? {
            let mut refs = vec![s.caption.clone()];
            if dataset == synthetic::IMAGES_DATASET {
                if let Some(scene) = synthetic::parse_caption(&s.caption) {
                    refs.push(synthetic::caption(&scene.converse()));
                }
            }
            out.insert(s.key, refs);
        }
    }
    Ok(out)
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

/// Cosine of two vectors.
pub(crate) fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    f64::from(dot / (na * nb).max(1e-12))
}

/// L2-normalised CLIP text embeddings of `texts`.
pub(crate) fn embed_texts(clip: &ClipEmbedder, texts: &[String]) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(256) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let e = l2_normalize(&clip.embed_texts(&refs)?)
            .and_then(|t| t.to_vec2::<f32>())
            .during("normalising CLIP text embeddings")?;
        out.extend(e);
    }
    Ok(out)
}

/// Runs the score stage over this run's (else the newest run's) generations.
pub fn run(cfg: &Config, ctx: &StageContext) -> Result<String> {
    let path = ctx.find_in_runs("generations.parquet").ok_or_else(|| Error::Config("no generations.parquet in this run or an earlier one; run `pipeline run generate` first".into()))?;
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
    let clip = if cfg.score.clip_score {
        Some(ModelIdentity::resolve(cfg, &ctx.workdir)?.load(cfg, ctx.gpu)?)
    } else {
        None
    };
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
        let refs: Vec<Vec<String>> = gens.iter().map(|g| refs_of[&g.image_key].clone()).collect();
        let (per, mut corpus) = text_metrics(&cands, &refs);
        let mut clip_scores = vec![None; gens.len()];
        let mut ref_clip = vec![None; gens.len()];
        if let Some(clip) = &clip {
            if !image_cache.contains_key(&key) {
                let mut m = HashMap::new();
                for e in embed::split_features(cfg, &ctx.workdir, dataset, split, "image")? {
                    let t = e.open()?;
                    let dim = t.dim;
                    let emb = t.embeddings();
                    for (i, k) in t.keys().into_iter().enumerate() {
                        m.insert(k, emb[i * dim..(i + 1) * dim].to_vec());
                    }
                }
                image_cache.insert(key.clone(), m);
            }
            let images = &image_cache[&key];
            let cand_emb = embed_texts(clip, &cands)?;
            let flat_refs: Vec<String> = refs.iter().flatten().cloned().collect();
            let ref_emb = embed_texts(clip, &flat_refs)?;
            let mut at = 0;
            for (i, g) in gens.iter().enumerate() {
                let n_refs = refs[i].len();
                if let Some(img) = images.get(&g.image_key) {
                    let s = 2.5 * cosine(img, &cand_emb[i]).max(0.0);
                    let best_ref = ref_emb[at..at + n_refs]
                        .iter()
                        .map(|r| cosine(&cand_emb[i], r))
                        .fold(0f64, f64::max);
                    clip_scores[i] = Some(s);
                    ref_clip[i] = Some(if s + best_ref > 0.0 {
                        2.0 * s * best_ref / (s + best_ref)
                    } else {
                        0.0
                    });
                }
                at += n_refs;
            }
            corpus.insert(
                "CLIPScore".into(),
                mean(clip_scores.iter().flatten().copied()),
            );
            corpus.insert(
                "RefCLIPScore".into(),
                mean(ref_clip.iter().flatten().copied()),
            );
        }
        let attributes: Vec<Option<f64>> = gens
            .iter()
            .map(|g| {
                (dataset == synthetic::IMAGES_DATASET)
                    .then(|| synthetic::parse_caption(&refs_of[&g.image_key][0]))
                    .flatten()
                    .map(|truth| AttributeMatch::score(&g.caption, &truth).accuracy())
            })
            .collect();
        if attributes.iter().any(Option::is_some) {
            corpus.insert(
                "attribute_accuracy".into(),
                mean(attributes.iter().flatten().copied()),
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
    Ok(summary_table(&summary))
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
