//! The report's gallery: held-out images (thumbnails from the ingest shards) with every model's
//! caption of each, its per-caption scores, and the references.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use crate::data::records::{GenerationRow, ScoreRow};
use crate::data::shard::{read_parquet, shard_images, ShardSet};
use crate::datasets::captions::references;
use crate::error::Result;

/// Longest side of a thumbnail, in pixels.
pub const THUMBNAIL: u32 = 128;

/// One model's caption of an image.
#[derive(Debug, Clone, PartialEq)]
pub struct Caption {
    /// `model · method` (with the run id first when several runs are compared).
    pub model: String,
    pub caption: String,
    /// Per-caption scores, in display order (absent ones left out).
    pub scores: Vec<(&'static str, f64)>,
}

/// One held-out image.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub image_key: String,
    /// Where the image came from: `dataset/split`.
    pub source: String,
    /// A JPEG thumbnail, when the image is in the shards and decodes.
    pub thumbnail: Option<Vec<u8>>,
    pub references: Vec<String>,
    pub captions: Vec<Caption>,
}

impl Entry {
    /// Whether the models wrote different captions for this image.
    pub fn differs(&self) -> bool {
        let distinct: BTreeSet<&str> = self.captions.iter().map(|c| c.caption.as_str()).collect();
        distinct.len() > 1
    }
}

/// What the gallery holds and what it left out.
#[derive(Debug, Clone, Default)]
pub struct Gallery {
    pub entries: Vec<Entry>,
    /// Images beyond the limit, not shown.
    pub omitted: usize,
}

fn scores_of(s: &ScoreRow) -> Vec<(&'static str, f64)> {
    let mut v = vec![
        ("CIDEr", Some(s.cider_d)),
        ("BLEU-4", Some(s.bleu_4)),
        ("CLIPScore", s.clip_score),
        ("RefCLIPScore", s.ref_clip_score),
        ("attr", s.attribute_accuracy),
        ("BERTScore", s.bertscore_f1),
    ];
    v.retain(|(_, x)| x.is_some_and(f64::is_finite));
    v.into_iter()
        .map(|(n, x)| (n, x.unwrap_or(f64::NAN)))
        .collect()
}

/// A JPEG thumbnail of an encoded image.
fn thumbnail(bytes: &[u8]) -> Option<Vec<u8>> {
    let rgb = crate::imaging::preprocess::decode_rgb(bytes).ok()?;
    let (w, h) = rgb.dimensions();
    let scale = THUMBNAIL as f64 / w.max(h) as f64;
    let (tw, th) = if scale < 1.0 {
        (
            ((w as f64 * scale).round() as u32).max(1),
            ((h as f64 * scale).round() as u32).max(1),
        )
    } else {
        (w, h)
    };
    let small = image::imageops::thumbnail(&rgb, tw, th);
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 88)
        .encode_image(&small)
        .ok()?;
    Some(out)
}

/// The gallery of `runs` (ids under `workdir/runs`): every image some model captioned in
/// `generations.parquet`, its captions with their scores from `scores.parquet` where the run
/// scored them, the references and a thumbnail of the images of the ingest shards. At most
/// `limit` images (0 = all), in key order.
pub fn gallery(workdir: &Path, runs: &[String], limit: usize) -> Result<Gallery> {
    let several = runs.len() > 1;
    let mut captions: BTreeMap<String, Vec<Caption>> = BTreeMap::new();
    let mut source: HashMap<String, (String, String)> = HashMap::new();
    for run in runs {
        let dir = workdir.join("runs").join(run);
        let gens_path = dir.join("generations.parquet");
        if !gens_path.is_file() {
            continue;
        }
        let gens: Vec<GenerationRow> = read_parquet(&gens_path)?;
        let scores_path = dir.join("scores.parquet");
        let scores: HashMap<(String, String, String), ScoreRow> = if scores_path.is_file() {
            read_parquet::<ScoreRow>(&scores_path)?
                .into_iter()
                .map(|s| ((s.model.clone(), s.method.clone(), s.image_key.clone()), s))
                .collect()
        } else {
            HashMap::new()
        };
        for g in gens {
            let label = if several {
                format!("{run} · {} · {}", g.model, g.method)
            } else {
                format!("{} · {}", g.model, g.method)
            };
            let scored = scores.get(&(g.model.clone(), g.method.clone(), g.image_key.clone()));
            source
                .entry(g.image_key.clone())
                .or_insert((g.dataset.clone(), g.split.clone()));
            captions
                .entry(g.image_key.clone())
                .or_default()
                .push(Caption {
                    model: label,
                    caption: g.caption,
                    scores: scored.map(scores_of).unwrap_or_default(),
                });
        }
    }
    let total = captions.len();
    let keep = if limit == 0 { total } else { limit.min(total) };
    let shown: Vec<(String, Vec<Caption>)> = captions.into_iter().take(keep).collect();
    // References and thumbnails, one pass over each dataset split's shards.
    let mut splits: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for (key, _) in &shown {
        if let Some(s) = source.get(key) {
            splits.entry(s.clone()).or_default().insert(key.clone());
        }
    }
    let mut refs: HashMap<String, Vec<String>> = HashMap::new();
    let mut thumbs: HashMap<String, Vec<u8>> = HashMap::new();
    for ((dataset, split), keys) in &splits {
        let set = ShardSet::new(workdir, dataset, split);
        // An image folder or a removed dataset has no shards: captions still show.
        if !set.dir().is_dir() {
            continue;
        }
        let mut of_split = references(workdir, dataset, split)?;
        refs.extend(keys.iter().filter_map(|k| of_split.remove_entry(k)));
        for path in set.finished_paths()? {
            let (images, _) = shard_images(&path)?;
            for (key, bytes) in images {
                if keys.contains(&key) {
                    if let Some(t) = thumbnail(&bytes) {
                        thumbs.insert(key, t);
                    }
                }
            }
        }
    }
    let entries = shown
        .into_iter()
        .map(|(key, captions)| Entry {
            source: source
                .get(&key)
                .map(|(d, s)| format!("{d}/{s}"))
                .unwrap_or_default(),
            thumbnail: thumbs.remove(&key),
            references: refs.remove(&key).unwrap_or_default(),
            image_key: key,
            captions,
        })
        .collect();
    Ok(Gallery {
        entries,
        omitted: total - keep,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbnails_keep_the_aspect_and_fit_the_limit() {
        let img = image::RgbImage::from_pixel(400, 200, image::Rgb([200, 10, 10]));
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let t = image::load_from_memory(&thumbnail(&png).unwrap()).unwrap();
        assert_eq!((t.width(), t.height()), (THUMBNAIL, THUMBNAIL / 2));
        assert!(thumbnail(b"not an image").is_none());
    }

    #[test]
    fn an_image_differs_only_when_the_captions_do() {
        let cap = |c: &str| Caption {
            model: "m".into(),
            caption: c.into(),
            scores: vec![],
        };
        let mut e = Entry {
            image_key: "k".into(),
            source: String::new(),
            thumbnail: None,
            references: vec![],
            captions: vec![cap("a red circle"), cap("a red circle")],
        };
        assert!(!e.differs());
        e.captions.push(cap("a blue square"));
        assert!(e.differs());
    }
}
