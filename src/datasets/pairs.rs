//! Preference pairs as trainers read them: image-grounded and text-only pair shards, the
//! images' cached CLIP embeddings, TRL's tokenisation (prompt and prompt + completion
//! tokenized jointly) and truncation (`max_length`, `max_prompt_length`, `truncation_mode`),
//! padded into batches on the loader thread, with each pair's cached reference
//! log-probabilities when DPO needs them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crossbeam_channel::Receiver;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::data::features::FeatureEntry;
use crate::data::records::PreferencePair;
use crate::data::shard::{read_parquet, ShardSet};
use crate::datasets::features::embeddings_by_key;
use crate::datasets::loader::shard_batches;
use crate::error::{Error, Result};

/// A pair dataset split read by a trainer, and whether its pairs are about images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairSource {
    pub dataset: String,
    pub split: String,
    /// Rows must name an image (`image_key`) whose features prefix the prompt; false:
    /// text-only pairs (no image prefix).
    pub grounded: bool,
}

/// Which end of a too-long prompt + completion survives `max_length` (TRL's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncationMode {
    /// Keep the first `max_length` tokens; a pair whose prompt alone fills them is dropped.
    KeepStart,
    /// Keep the last `max_length` tokens (the prompt loses its beginning first).
    KeepEnd,
}

/// TRL's truncation settings, applied per tokenized pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncation {
    pub max_length: usize,
    pub max_prompt_length: usize,
    pub mode: TruncationMode,
}

/// One side of a pair as the model sees it: context tokens, then the scored completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Side {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
}

impl Truncation {
    /// Both sides of a tokenized pair after truncation, or `None` when the pair is dropped
    /// (`keep_start` and the prompt alone fills `max_length`, as TRL filters it out).
    /// The prompt is first cut to its last `max_prompt_length` tokens; then each side's
    /// prompt + completion is cut to `max_length`.
    pub fn apply(&self, prompt: &[u32], chosen: &[u32], rejected: &[u32]) -> Option<(Side, Side)> {
        let prompt = match self.max_prompt_length {
            0 => prompt,
            m => &prompt[prompt.len().saturating_sub(m)..],
        };
        let l = self.max_length;
        if l > 0 && self.mode == TruncationMode::KeepStart && prompt.len() >= l {
            return None;
        }
        let side = |completion: &[u32]| {
            let total = prompt.len() + completion.len();
            if l == 0 || total <= l {
                return Side {
                    prompt: prompt.to_vec(),
                    completion: completion.to_vec(),
                };
            }
            match self.mode {
                TruncationMode::KeepStart => Side {
                    prompt: prompt.to_vec(),
                    completion: completion[..l - prompt.len()].to_vec(),
                },
                TruncationMode::KeepEnd => {
                    let cut = total - l;
                    if cut <= prompt.len() {
                        Side {
                            prompt: prompt[cut..].to_vec(),
                            completion: completion.to_vec(),
                        }
                    } else {
                        Side {
                            prompt: Vec::new(),
                            completion: completion[cut - prompt.len()..].to_vec(),
                        }
                    }
                }
            }
        };
        Some((side(chosen), side(rejected)))
    }
}

/// Length of the common start of two token sequences.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A pair's token ids: the prompt, and each completion ending with end-of-text.
pub type PairIds = (Vec<u32>, Vec<u32>, Vec<u32>);

/// Tokenizes a pair as TRL does: the prompt alone and prompt + completion (joint, so merges
/// across the boundary are the tokenizer's); the completion starts where both sides leave
/// the prompt's tokens, and ends with end-of-text.
pub fn tokenize_pair(
    tok: &Tokenizer,
    eos: u32,
    prompt: &str,
    chosen: &str,
    rejected: &str,
) -> std::result::Result<PairIds, String> {
    let ids = |text: &str| {
        tok.encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| format!("tokenizing: {e}"))
    };
    let p = ids(prompt)?;
    let (pc, pr) = (
        ids(&format!("{prompt}{chosen}"))?,
        ids(&format!("{prompt}{rejected}"))?,
    );
    let n = common_prefix(&p, &pc).min(common_prefix(&p, &pr));
    let finish = |full: &[u32]| {
        let mut v = full[n..].to_vec();
        v.push(eos);
        v
    };
    Ok((p[..n].to_vec(), finish(&pc), finish(&pr)))
}

/// One pair, tokenized and truncated, ready to batch.
#[derive(Clone)]
pub struct PairRow {
    pub pair_id: String,
    /// The pair's `source` (`synthetic:colour`, `ultrafeedback_binarized`, ...).
    pub source: String,
    /// The image's CLIP embedding (image-grounded pairs) or `None` (text-only).
    pub clip: Option<Vec<f32>>,
    pub chosen: Side,
    pub rejected: Side,
}

/// One padded side of a group: `[prompt | completion | padding]` per row.
pub struct SideBatch {
    pub rows: usize,
    pub len: usize,
    /// `rows × clip_dim` for image-grounded groups.
    pub clip: Option<Vec<f32>>,
    /// `rows × len`, padded with end-of-text.
    pub ids: Vec<u32>,
    /// 1 on completion tokens.
    pub supervised: Vec<f32>,
    /// 1 on prompt and completion tokens.
    pub attention: Vec<f32>,
}

impl SideBatch {
    /// The `chosen` (else rejected) sides of `rows`, padded with `pad`.
    pub fn new(rows: &[&PairRow], chosen: bool, pad: u32) -> Self {
        let sides: Vec<&Side> = rows
            .iter()
            .map(|r| if chosen { &r.chosen } else { &r.rejected })
            .collect();
        let len = sides
            .iter()
            .map(|s| s.prompt.len() + s.completion.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut b = Self {
            rows: rows.len(),
            len,
            clip: None,
            ids: Vec::with_capacity(rows.len() * len),
            supervised: Vec::with_capacity(rows.len() * len),
            attention: Vec::with_capacity(rows.len() * len),
        };
        for s in sides {
            let (p, c) = (s.prompt.len(), s.completion.len());
            b.ids.extend(&s.prompt);
            b.ids.extend(&s.completion);
            b.ids.extend(std::iter::repeat_n(pad, len - p - c));
            for i in 0..len {
                b.supervised
                    .push(if (p..p + c).contains(&i) { 1.0 } else { 0.0 });
                b.attention.push(if i < p + c { 1.0 } else { 0.0 });
            }
        }
        if rows.iter().all(|r| r.clip.is_some()) {
            b.clip = Some(
                rows.iter()
                    .flat_map(|r| r.clip.clone().unwrap_or_default())
                    .collect(),
            );
        }
        b
    }
}

/// Rows of a batch that share a kind (all image-grounded or all text-only), with the cached
/// reference log-probabilities (DPO) of each row.
pub struct PairGroup {
    pub pair_ids: Vec<String>,
    pub sources: Vec<String>,
    pub chosen: SideBatch,
    pub rejected: SideBatch,
    pub ref_chosen: Vec<f32>,
    pub ref_rejected: Vec<f32>,
}

/// A batch of pairs: one group per kind present.
pub struct PairBatch {
    pub groups: Vec<PairGroup>,
}

/// Reference log-probabilities (chosen, rejected) by pair id.
pub type RefLogps = HashMap<String, (f32, f32)>;

impl PairBatch {
    /// `refs`: the reference log-probabilities, which must cover every row; `None` where no
    /// reference is used (ORPO, the reference pass itself), which leaves them 0.
    pub fn new(rows: &[PairRow], pad: u32, refs: Option<&RefLogps>) -> Result<Self> {
        let (image, text): (Vec<&PairRow>, Vec<&PairRow>) =
            rows.iter().partition(|r| r.clip.is_some());
        let lookup = |r: &PairRow| -> Result<(f32, f32)> {
            match refs {
                None => Ok((0.0, 0.0)),
                Some(refs) => refs.get(&r.pair_id).copied().ok_or_else(|| {
                    Error::Config(format!(
                        "pair {} ({}) has no cached reference log-probabilities",
                        r.pair_id, r.source
                    ))
                }),
            }
        };
        let groups = [image, text]
            .into_iter()
            .filter(|g| !g.is_empty())
            .map(|g| -> Result<PairGroup> {
                let refs = g.iter().map(|r| lookup(r)).collect::<Result<Vec<_>>>()?;
                Ok(PairGroup {
                    pair_ids: g.iter().map(|r| r.pair_id.clone()).collect(),
                    sources: g.iter().map(|r| r.source.clone()).collect(),
                    chosen: SideBatch::new(&g, true, pad),
                    rejected: SideBatch::new(&g, false, pad),
                    ref_chosen: refs.iter().map(|r| r.0).collect(),
                    ref_rejected: refs.iter().map(|r| r.1).collect(),
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { groups })
    }

    pub fn rows(&self) -> usize {
        self.groups.iter().map(|g| g.chosen.rows).sum()
    }
}

/// How pair rows are tokenized: the policy's tokenizer and TRL's truncation.
pub struct Tokenizing {
    pub tokenizer: Tokenizer,
    pub eos: u32,
    pub truncation: Truncation,
}

/// One pair shard and what its rows are.
#[derive(Clone)]
pub struct PairShard {
    pub path: PathBuf,
    /// Whether its rows must name an image (the image-grounded dataset) or are text-only.
    pub grounded: bool,
}

/// The pairs of a split (image-grounded and/or text-only shards) with the image embeddings
/// they name.
#[derive(Clone)]
pub struct PairSplit {
    pub shards: Vec<PairShard>,
    images: Arc<HashMap<String, Vec<f32>>>,
    /// Digests of the feature-cache entries `images` came from.
    pub feature_digests: Vec<String>,
    pub tokenizing: Arc<Tokenizing>,
}

/// What loading a shard gave.
struct LoadedShard {
    rows: Vec<PairRow>,
    /// Pairs dropped because their prompt alone fills `max_length`.
    dropped: usize,
}

impl PairSplit {
    /// The pairs of `sources` (their finished shards under `workdir/data/`), with the image
    /// embeddings of `image_features` for the grounded ones.
    pub fn new(
        workdir: &Path,
        sources: &[PairSource],
        image_features: &[FeatureEntry],
        tokenizing: Arc<Tokenizing>,
    ) -> Result<Self> {
        let mut shards = Vec::new();
        for source in sources {
            let set = ShardSet::new(workdir, &source.dataset, &source.split);
            let found: Vec<PairShard> = set
                .finished()?
                .into_iter()
                .map(|s| PairShard {
                    path: set.parquet_path(s),
                    grounded: source.grounded,
                })
                .collect();
            if found.is_empty() {
                return Err(Error::Config(format!(
                    "no finished pair shards in {}/data/{}/{}; run `pipeline run ingest` first",
                    workdir.display(),
                    source.dataset,
                    source.split
                )));
            }
            shards.extend(found);
        }
        if shards.is_empty() {
            return Err(Error::Config(
                "preference.pairs_dataset and preference.text_pairs_dataset are both empty".into(),
            ));
        }
        Ok(Self {
            shards,
            images: Arc::new(embeddings_by_key(image_features)?),
            feature_digests: image_features
                .iter()
                .map(|e| e.manifest.digest.clone())
                .collect(),
            tokenizing,
        })
    }

    /// Rows of shard `i`, tokenized and truncated. A grounded pair without an image (or
    /// without its cached features), a text-only pair with an image, or a pair with an
    /// empty completion is an error naming the file and the pair.
    fn load(&self, i: usize) -> Result<LoadedShard> {
        let PairShard { path, grounded } = &self.shards[i];
        let pairs: Vec<PreferencePair> = read_parquet(path)?;
        let t = &self.tokenizing;
        let mut out = LoadedShard {
            rows: Vec::with_capacity(pairs.len()),
            dropped: 0,
        };
        for (row, p) in pairs.into_iter().enumerate() {
            let bad = |message: String| Error::BadRow {
                path: path.clone(),
                row: row as u64 + 1,
                message,
            };
            if p.chosen.trim().is_empty() || p.rejected.trim().is_empty() {
                return Err(bad(format!("pair `{}` has an empty completion", p.pair_id)));
            }
            let clip = match (&p.image_key, grounded) {
                (Some(key), true) => Some(self.images.get(key).cloned().ok_or_else(|| {
                    bad(format!(
                        "pair `{}`: no cached features for image `{key}`",
                        p.pair_id
                    ))
                })?),
                (None, true) => {
                    return Err(bad(format!(
                        "pair `{}` has no image_key; text-only pairs belong in preference.text_pairs_dataset",
                        p.pair_id
                    )))
                }
                (Some(key), false) => {
                    return Err(bad(format!(
                        "pair `{}` names image `{key}`, but preference.text_pairs_dataset is text-only; \
                         image pairs belong in preference.pairs_dataset",
                        p.pair_id
                    )))
                }
                (None, false) => None,
            };
            let (prompt, chosen, rejected) =
                tokenize_pair(&t.tokenizer, t.eos, &p.prompt, &p.chosen, &p.rejected)
                    .map_err(|e| bad(format!("pair `{}`: {e}", p.pair_id)))?;
            match t.truncation.apply(&prompt, &chosen, &rejected) {
                Some((chosen, rejected)) => out.rows.push(PairRow {
                    pair_id: p.pair_id,
                    source: p.source,
                    clip,
                    chosen,
                    rejected,
                }),
                None => out.dropped += 1,
            }
        }
        Ok(out)
    }

    /// Kept pairs, optimizer steps per pass at `batch_size` and dropped pairs.
    pub fn counts(&self, batch_size: usize) -> Result<(usize, usize, usize)> {
        let (mut rows, mut steps, mut dropped) = (0, 0, 0);
        for i in 0..self.shards.len() {
            let l = self.load(i)?;
            rows += l.rows.len();
            steps += l.rows.len().div_ceil(batch_size.max(1));
            dropped += l.dropped;
        }
        Ok((rows, steps, dropped))
    }

    pub fn batches(
        &self,
        batch_size: usize,
        refs: Option<Arc<RefLogps>>,
        shuffle: Option<(u64, String)>,
    ) -> Receiver<Result<PairBatch>> {
        let loader = {
            let split = self.clone();
            move |i: usize| split.load(i).map(|l| l.rows)
        };
        let pad = self.tokenizing.eos;
        let make = move |chunk: &[PairRow]| -> Result<PairBatch> {
            PairBatch::new(chunk, pad, refs.as_deref())
        };
        shard_batches(self.shards.len(), loader, make, batch_size, shuffle, 4)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    use crate::models::captioner::{Captioner, CaptionerConfig, DecoderFiles};

    fn trunc(max_length: usize, max_prompt_length: usize, mode: TruncationMode) -> Truncation {
        Truncation {
            max_length,
            max_prompt_length,
            mode,
        }
    }

    pub(crate) fn side(prompt: &[u32], completion: &[u32]) -> Side {
        Side {
            prompt: prompt.to_vec(),
            completion: completion.to_vec(),
        }
    }

    #[test]
    fn truncation_follows_trl() {
        use TruncationMode::{KeepEnd, KeepStart};
        // TRL's collator example: keep_start cuts each prompt+completion to its first tokens.
        let (c, r) = trunc(4, 0, KeepStart)
            .apply(&[1, 2, 3], &[4, 5], &[6])
            .unwrap();
        assert_eq!((c, r), (side(&[1, 2, 3], &[4]), side(&[1, 2, 3], &[6])));
        // A prompt that fills max_length leaves no completion: the pair is dropped.
        assert_eq!(trunc(3, 0, KeepStart).apply(&[1, 2, 3], &[4], &[5]), None);
        // keep_end drops the prompt's start first, then the completion's.
        let (c, r) = trunc(3, 0, KeepEnd)
            .apply(&[1, 2, 3], &[4, 5], &[6])
            .unwrap();
        assert_eq!((c, r), (side(&[3], &[4, 5]), side(&[2, 3], &[6])));
        let (c, _) = trunc(2, 0, KeepEnd).apply(&[1], &[2, 3, 4], &[5]).unwrap();
        assert_eq!(c, side(&[], &[3, 4]));
        // max_prompt_length keeps the prompt's end before max_length applies.
        let (c, r) = trunc(0, 2, KeepStart)
            .apply(&[1, 2, 3], &[4, 5], &[6])
            .unwrap();
        assert_eq!((c, r), (side(&[2, 3], &[4, 5]), side(&[2, 3], &[6])));
        // No limits: unchanged.
        let (c, _) = trunc(0, 0, KeepStart).apply(&[1], &[2, 3], &[4]).unwrap();
        assert_eq!(c, side(&[1], &[2, 3]));
    }

    pub(crate) fn tiny_captioner() -> Captioner {
        let files = DecoderFiles::from_dir(&crate::hf_tiny_fixture("gpt2-tiny")).unwrap();
        let cfg = CaptionerConfig {
            prefix_length: 2,
            freeze_decoder: true,
            ..CaptionerConfig::default()
        };
        let mut m =
            Captioner::build(&cfg, 8, 0, &files, None, &VarMap::new(), &Device::Cpu).unwrap();
        m.decoder.set_differentiable(false);
        m
    }

    /// The fixture reference's prompt and completion (and a shorter rejected one), tokenized.
    pub(crate) fn fixture_pair(m: &Captioner) -> PairIds {
        tokenize_pair(
            &m.tokenizer,
            m.eos,
            "Caption:",
            " a red circle above a blue square.",
            " two shapes.",
        )
        .unwrap()
    }

    #[test]
    fn pairs_tokenize_as_trl_does() {
        let m = tiny_captioner();
        let (p, c, r) = fixture_pair(&m);
        // The ids HF's GPT-2 tokenizer gives (the fixture's reference), end-of-text appended.
        assert_eq!(p, [24334, 1159, 25]);
        assert_eq!(c, [257, 2266, 9197, 2029, 257, 4171, 6616, 13, m.eos]);
        assert_eq!(r.last(), Some(&m.eos));
        // A prompt ending mid-word: the completion starts where prompt+completion leave the
        // prompt's tokens, so prompt + completion is exactly the joint tokenization.
        let (p, c, _) = tokenize_pair(&m.tokenizer, m.eos, "Capt", "ion: yes", "ion: no").unwrap();
        let joint = m.tokenizer.encode("Caption: yes", false).unwrap();
        let mut both = p.clone();
        both.extend(&c[..c.len() - 1]);
        assert_eq!(both, joint.get_ids());
        let alone = m.tokenizer.encode("Capt", false).unwrap();
        assert!(alone.get_ids().starts_with(&p));
    }

    #[test]
    fn mixed_batches_group_by_kind_and_keep_reference_order() {
        let row = |id: &str, clip: bool| PairRow {
            pair_id: id.into(),
            source: if clip { "image" } else { "text" }.into(),
            clip: clip.then(|| vec![1.0; 8]),
            chosen: side(&[1, 2], &[3]),
            rejected: side(&[], &[4, 5]),
        };
        let rows = [row("a", false), row("b", true), row("c", false)];
        let refs: HashMap<String, (f32, f32)> = [("a", 1.0), ("b", 2.0), ("c", 3.0)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), (v, -v)))
            .collect();
        let b = PairBatch::new(&rows, 0, Some(&refs)).unwrap();
        assert_eq!(b.rows(), 3);
        assert_eq!(b.groups.len(), 2);
        let (image, text) = (&b.groups[0], &b.groups[1]);
        assert_eq!(image.pair_ids, ["b"]);
        assert_eq!(image.chosen.clip.as_deref(), Some(&[1.0; 8][..]));
        assert_eq!(text.pair_ids, ["a", "c"]);
        assert_eq!(text.ref_chosen, [1.0, 3.0]);
        // Without a reference (ORPO) the fields are 0; a pair the cache lacks is an error.
        let free = PairBatch::new(&rows, 0, None).unwrap();
        assert_eq!(free.groups[1].ref_chosen, [0.0, 0.0]);
        let mut partial = refs.clone();
        partial.remove("c");
        let err = PairBatch::new(&rows, 0, Some(&partial)).err().unwrap();
        assert!(err.to_string().contains("pair c"), "{err}");
        assert_eq!(text.ref_rejected, [-1.0, -3.0]);
        // [prompt | completion | pad]: only completions supervised, padding not attended.
        assert_eq!(text.rejected.ids, [4, 5, 4, 5]);
        assert_eq!(text.chosen.ids, [1, 2, 3, 1, 2, 3]);
        assert_eq!(text.chosen.supervised, [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]);
        assert_eq!(image.rejected.attention, [1.0, 1.0]);
        let mut long = row("d", false);
        long.chosen = side(&[7], &[8, 9, 10]);
        let padded = SideBatch::new(&[&rows[0], &long], true, 0);
        assert_eq!(padded.ids, [1, 2, 3, 0, 7, 8, 9, 10]);
        assert_eq!(padded.supervised, [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        assert_eq!(padded.attention, [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
    }
}
