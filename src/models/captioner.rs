//! The CLIP-prefix GPT-2 captioner (ClipCap): a mapper turns a CLIP image embedding into
//! `prefix_length` GPT-2 input embeddings, and GPT-2 continues from them with the caption.
//!
//! Two mappers, as in ClipCap: an MLP (`clip → P·d/2 → tanh → P·d`) and a transformer mapper
//! (`clip → P·d` plus `P` learned constants through a small pre-LN transformer encoder, whose
//! outputs at the constants' positions are the prefix). The decoder loads a Hugging Face GPT-2
//! checkpoint unchanged and is either frozen (prefix-only training) or fine-tuned. Trainable
//! variables live in one `VarMap` under `mapper.` and `decoder.`, saved as safetensors.
//! Decoding is batched with a key/value cache: greedy, beam search with a length penalty,
//! and nucleus sampling with temperature.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{Init, LayerNorm, Linear, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::data::hub::HubClient;
use crate::error::{CandleContext, Error, IoContext, Result};
use crate::io::write_atomic;
use crate::models::gpt2::{
    load_gpt2_weights, softmax_train, train_norm, Gpt2, Gpt2Config, KvCache,
};
use crate::rng::SplitMix64;

/// The mapper architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MapperKind {
    Mlp,
    Transformer,
}

/// `[captioner]`: the model and the data it is trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptionerConfig {
    /// GPT-2: a hub repo (`gpt2`, `gpt2-medium`), a local Hugging Face directory, or `tiny`
    /// (the embedded tiny GPT-2, generated under `cache/models/tiny-gpt2-v1/`).
    pub decoder: String,
    /// Hub revision of `decoder`.
    pub decoder_revision: String,
    pub prefix_length: usize,
    pub mapper: MapperKind,
    /// Encoder layers of the transformer mapper.
    pub mapper_layers: usize,
    /// Train the prefix only, GPT-2 frozen.
    pub freeze_decoder: bool,
    /// Caption tokens kept (the end-of-text token included).
    pub max_caption_tokens: usize,
    /// Image–caption dataset under `data/` the captioner learns from.
    pub dataset: String,
    pub train_split: String,
    pub val_split: String,
    /// Images of `train_split` that train-sft learns from: the first N in shard order
    /// (Hugging Face's `max_train_samples`); 0 = all. The rest stay for the preference
    /// stages, whose pairs may cover more images than the captions SFT saw.
    pub max_train_samples: usize,
}

impl Default for CaptionerConfig {
    fn default() -> Self {
        Self {
            decoder: "gpt2".into(),
            decoder_revision: "main".into(),
            prefix_length: 10,
            mapper: MapperKind::Mlp,
            mapper_layers: 2,
            freeze_decoder: false,
            max_caption_tokens: 40,
            dataset: "cc".into(),
            train_split: "train".into(),
            val_split: "val".into(),
            max_train_samples: 0,
        }
    }
}

/// The files of a GPT-2 checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderFiles {
    pub config: PathBuf,
    pub weights: PathBuf,
    pub tokenizer: PathBuf,
}

impl DecoderFiles {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let files = Self {
            config: dir.join("config.json"),
            weights: dir.join("model.safetensors"),
            tokenizer: dir.join("tokenizer.json"),
        };
        for p in [&files.config, &files.weights, &files.tokenizer] {
            if !p.is_file() {
                return Err(Error::Config(format!(
                    "GPT-2 directory {}: missing {} (need config.json, model.safetensors, tokenizer.json)",
                    dir.display(),
                    p.display()
                )));
            }
        }
        Ok(files)
    }

    /// A local directory, or hub repo `decoder` at `revision`.
    pub fn resolve(
        decoder: &str,
        revision: &str,
        hub: impl FnOnce() -> Result<HubClient>,
    ) -> Result<Self> {
        let dir = Path::new(decoder);
        if dir.is_dir() {
            return Self::from_dir(dir);
        }
        let hub = hub()?;
        let fetch = |f: &str| hub.model_file(decoder, revision, f).map(|h| h.local);
        Ok(Self {
            config: fetch("config.json")?,
            weights: fetch("model.safetensors")?,
            tokenizer: fetch("tokenizer.json")?,
        })
    }
}

pub const END_OF_TEXT: &str = "<|endoftext|>";

/// One pre-LN encoder layer of the transformer mapper (bidirectional attention).
struct MapperLayer {
    ln1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl MapperLayer {
    fn new(d: usize, heads: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            ln1: candle_nn::layer_norm(d, 1e-5, vb.pp("ln1"))?,
            qkv: candle_nn::linear(d, 3 * d, vb.pp("qkv"))?,
            proj: candle_nn::linear(d, d, vb.pp("proj"))?,
            ln2: candle_nn::layer_norm(d, 1e-5, vb.pp("ln2"))?,
            fc1: candle_nn::linear(d, 2 * d, vb.pp("fc1"))?,
            fc2: candle_nn::linear(2 * d, d, vb.pp("fc2"))?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.heads;
        let qkv = self.qkv.forward(&train_norm(x, &self.ln1)?)?;
        let split = |i: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(D::Minus1, i * d, d)?
                .reshape((b, t, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let att = softmax_train(&att)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        let x = (x + self.proj.forward(&y)?)?;
        let h = self.fc1.forward(&train_norm(&x, &self.ln2)?)?.relu()?;
        x + self.fc2.forward(&h)?
    }
}

enum Mapper {
    Mlp {
        l1: Linear,
        l2: Linear,
    },
    Transformer {
        input: Linear,
        constants: Tensor,
        layers: Vec<MapperLayer>,
    },
}

/// The captioner: mapper, GPT-2 and its tokenizer.
pub struct Captioner {
    mapper: Mapper,
    pub decoder: Gpt2,
    pub tokenizer: Tokenizer,
    pub eos: u32,
    pub prefix_length: usize,
    pub clip_dim: usize,
    device: Device,
}

/// Output of one decoded caption.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub ids: Vec<u32>,
    pub text: String,
    /// Sum of the token log-probabilities (end-of-text included when produced).
    pub logprob: f64,
}

/// How to decode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum DecodeMethod {
    Greedy,
    Beam {
        beams: usize,
        length_penalty: f64,
    },
    Sample {
        top_p: f64,
        temperature: f64,
        seed: u64,
    },
}

impl DecodeMethod {
    /// A short name for result tables: `greedy`, `beam5`, `top_p0.9_t1`.
    pub fn label(&self) -> String {
        match self {
            DecodeMethod::Greedy => "greedy".into(),
            DecodeMethod::Beam { beams, .. } => format!("beam{beams}"),
            DecodeMethod::Sample {
                top_p, temperature, ..
            } => format!("top_p{top_p}_t{temperature}"),
        }
    }
}

impl Captioner {
    /// Builds the captioner on `device`. Trainable variables are created in `vars` (mapper
    /// always; the decoder unless frozen, initialised from its checkpoint).
    pub fn build(
        cfg: &CaptionerConfig,
        clip_dim: usize,
        files: &DecoderFiles,
        vars: &VarMap,
        device: &Device,
    ) -> Result<Self> {
        let gcfg = Gpt2Config::from_file(&files.config)?;
        let err = format!("building the captioner from {}", files.weights.display());
        let decoder = if cfg.freeze_decoder {
            // SAFETY: checkpoints are mapped read-only and never written while mapped.
            let vb = unsafe {
                VarBuilder::from_mmaped_safetensors(&[&files.weights], DType::F32, device)
            }
            .during(err.as_str())?;
            Gpt2::new(&gcfg, vb).during(err.as_str())?
        } else {
            let vb = VarBuilder::from_varmap(vars, DType::F32, device).pp("decoder");
            let model = Gpt2::new(&gcfg, vb).during(err.as_str())?;
            load_gpt2_weights(vars, "decoder", &files.weights, device)?;
            model
        };
        let mut decoder = decoder;
        decoder.set_differentiable(true);
        let d = gcfg.n_embd;
        let p = cfg.prefix_length.max(1);
        let vb = VarBuilder::from_varmap(vars, DType::F32, device).pp("mapper");
        let mapper = match cfg.mapper {
            MapperKind::Mlp => Mapper::Mlp {
                l1: candle_nn::linear(clip_dim, d * p / 2, vb.pp("l1")).during(err.as_str())?,
                l2: candle_nn::linear(d * p / 2, d * p, vb.pp("l2")).during(err.as_str())?,
            },
            MapperKind::Transformer => {
                let heads = if d % 8 == 0 { 8 } else { 4 };
                Mapper::Transformer {
                    input: candle_nn::linear(clip_dim, d * p, vb.pp("input"))
                        .during(err.as_str())?,
                    constants: vb
                        .get_with_hints(
                            (p, d),
                            "constants",
                            Init::Randn {
                                mean: 0.0,
                                stdev: 1.0,
                            },
                        )
                        .during(err.as_str())?,
                    layers: (0..cfg.mapper_layers)
                        .map(|i| MapperLayer::new(d, heads, vb.pp(format!("layers.{i}"))))
                        .collect::<candle_core::Result<_>>()
                        .during(err.as_str())?,
                }
            }
        };
        let tokenizer = Tokenizer::from_file(&files.tokenizer).map_err(|e| Error::BadFile {
            path: files.tokenizer.clone(),
            message: format!("not a tokenizers file: {e}"),
        })?;
        let eos = tokenizer
            .token_to_id(END_OF_TEXT)
            .ok_or_else(|| Error::BadFile {
                path: files.tokenizer.clone(),
                message: format!("no `{END_OF_TEXT}` token"),
            })?;
        Ok(Self {
            mapper,
            decoder,
            tokenizer,
            eos,
            prefix_length: p,
            clip_dim,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Prefix embeddings `(b, P, d)` of L2-normalised CLIP embeddings `(b, clip_dim)`.
    pub fn prefix(&self, clip: &Tensor) -> candle_core::Result<Tensor> {
        let clip = clip.broadcast_div(
            &clip
                .sqr()?
                .sum_keepdim(D::Minus1)?
                .sqrt()?
                .clamp(1e-12, f64::MAX)?,
        )?;
        let b = clip.dim(0)?;
        let (p, d) = (self.prefix_length, self.decoder.hidden_size());
        match &self.mapper {
            Mapper::Mlp { l1, l2 } => l2.forward(&l1.forward(&clip)?.tanh()?)?.reshape((b, p, d)),
            Mapper::Transformer {
                input,
                constants,
                layers,
            } => {
                let x = input.forward(&clip)?.reshape((b, p, d))?;
                let c = constants
                    .unsqueeze(0)?
                    .broadcast_as((b, p, d))?
                    .contiguous()?;
                let mut h = Tensor::cat(&[&x, &c], 1)?;
                for l in layers {
                    h = l.forward(&h)?;
                }
                h.narrow(1, p, p)
            }
        }
    }

    /// Per-row sums of log p(token) over the supervised tokens and the per-row token counts,
    /// teacher-forced after the prefix. `ids`/`mask` are `(b, t)` (u32 / f32, 1 = supervised).
    pub fn sequence_logprobs(
        &self,
        clip: &Tensor,
        ids: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        self.completion_logprobs(Some(clip), ids, mask, mask)
    }

    /// Per-row sums of log p(token) over the `supervised` tokens and their counts, for
    /// sequences that may start with a prompt: `ids` `(b, t)`, `supervised` and `attention`
    /// `(b, t)` f32 (1 = a completion token / a real token; right padding is 0 in both).
    /// With `clip`, the CLIP prefix comes first and predicts token 0; without it (text-only),
    /// token `i` is predicted from tokens `..i`, so token 0 is context only — as in TRL,
    /// where the logits are shifted against the labels.
    pub fn completion_logprobs(
        &self,
        clip: Option<&Tensor>,
        ids: &Tensor,
        supervised: &Tensor,
        attention: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let mut sums = self.masked_logprobs(clip, ids, attention, &[supervised])?;
        Ok(sums.remove(0))
    }

    /// [`Self::completion_logprobs`] for several token masks from one forward pass: per mask,
    /// the per-row sums of log p(token) over its tokens and their counts (a mask's token 0
    /// counts only with `clip`, which predicts it).
    pub fn masked_logprobs(
        &self,
        clip: Option<&Tensor>,
        ids: &Tensor,
        attention: &Tensor,
        masks: &[&Tensor],
    ) -> candle_core::Result<Vec<(Tensor, Tensor)>> {
        let (b, t) = ids.dims2()?;
        let tokens = self.decoder.embed_tokens(ids)?;
        let (x, keep, p) = match clip {
            Some(clip) => {
                let prefix = self.prefix(clip)?;
                let p = prefix.dim(1)?;
                let ones = Tensor::ones((b, p), DType::F32, &self.device)?;
                (
                    Tensor::cat(&[&prefix, &tokens], 1)?,
                    Tensor::cat(&[&ones, attention], 1)?,
                    p,
                )
            }
            None => (tokens, attention.clone(), 0),
        };
        let hidden = self.decoder.forward_hidden(&x, Some(&keep))?;
        // Position j of `pred` predicts `targets` column j. The LM head runs on those
        // positions only.
        let (pred, targets) = if p > 0 {
            (hidden.narrow(1, p - 1, t)?, ids.clone())
        } else {
            (hidden.narrow(1, 0, t - 1)?, ids.narrow(1, 1, t - 1)?)
        };
        let tok_lp = self.decoder.target_logprobs(&pred, &targets)?;
        masks
            .iter()
            .map(|mask| {
                let weight = if p > 0 {
                    (*mask).clone()
                } else {
                    mask.narrow(1, 1, t - 1)?
                };
                Ok(((&tok_lp * &weight)?.sum(1)?, weight.sum(1)?))
            })
            .collect()
    }

    /// Mean negative log-likelihood per supervised token of a batch.
    pub fn nll(&self, clip: &Tensor, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (lp, n) = self.sequence_logprobs(clip, ids, mask)?;
        lp.sum_all()?.neg()? / f64::from(n.sum_all()?.to_scalar::<f32>()?.max(1.0))
    }

    fn decode_text(&self, ids: &[u32]) -> String {
        let ids: Vec<u32> = ids.iter().copied().filter(|&i| i != self.eos).collect();
        self.tokenizer
            .decode(&ids, true)
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Captions for a batch of CLIP embeddings `(b, clip_dim)`.
    pub fn generate(
        &self,
        clip: &Tensor,
        method: &DecodeMethod,
        max_tokens: usize,
    ) -> candle_core::Result<Vec<Generated>> {
        match method {
            DecodeMethod::Greedy => self.sample_like(clip, max_tokens, None),
            DecodeMethod::Sample {
                top_p,
                temperature,
                seed,
            } => self.sample_like(clip, max_tokens, Some((*top_p, *temperature, *seed))),
            DecodeMethod::Beam {
                beams,
                length_penalty,
            } => {
                let b = clip.dim(0)?;
                (0..b)
                    .map(|i| {
                        self.beam(
                            &clip.i(i..i + 1)?,
                            (*beams).max(1),
                            *length_penalty,
                            max_tokens,
                        )
                    })
                    .collect()
            }
        }
    }

    /// Last-position log-probabilities `(b, vocab)` after feeding `embeds`.
    fn step_logprobs(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let h = self.decoder.forward_cached(embeds, cache)?;
        let t = h.dim(1)?;
        let last = h.narrow(1, t - 1, 1)?.squeeze(1)?;
        candle_nn::ops::log_softmax(&self.decoder.lm_logits(&last)?, D::Minus1)?.to_vec2::<f32>()
    }

    /// Greedy (`sampling` None) or nucleus sampling, batched.
    fn sample_like(
        &self,
        clip: &Tensor,
        max_tokens: usize,
        sampling: Option<(f64, f64, u64)>,
    ) -> candle_core::Result<Vec<Generated>> {
        let b = clip.dim(0)?;
        let mut cache = KvCache::default();
        let mut lps = self.step_logprobs(&self.prefix(clip)?, &mut cache)?;
        let mut out: Vec<(Vec<u32>, f64, bool)> = vec![(Vec::new(), 0.0, false); b];
        let mut rngs: Vec<SplitMix64> = (0..b)
            .map(|i| SplitMix64::derived(sampling.map_or(0, |s| s.2), &format!("row{i}")))
            .collect();
        let room = self
            .decoder
            .config
            .n_positions
            .saturating_sub(self.prefix_length);
        for _ in 0..max_tokens.min(room) {
            let mut next = Vec::with_capacity(b);
            for (row, lp) in lps.iter().enumerate() {
                let tok = match sampling {
                    None => argmax(lp),
                    Some((top_p, temp, _)) => nucleus(lp, top_p, temp, &mut rngs[row]),
                };
                let (ids, score, done) = &mut out[row];
                if !*done {
                    ids.push(tok);
                    *score += f64::from(lp[tok as usize]);
                    *done = tok == self.eos;
                }
                next.push(if *done { self.eos } else { tok });
            }
            if out.iter().all(|(_, _, d)| *d) {
                break;
            }
            let ids = Tensor::from_vec(next, (b, 1), &self.device)?;
            lps = self.step_logprobs(&self.decoder.embed_tokens(&ids)?, &mut cache)?;
        }
        Ok(out
            .into_iter()
            .map(|(ids, logprob, _)| Generated {
                text: self.decode_text(&ids),
                ids,
                logprob,
            })
            .collect())
    }

    /// Beam search for one image: `beams` hypotheses, finished ones scored by
    /// `logprob / len^length_penalty` (transformers' convention).
    fn beam(
        &self,
        clip: &Tensor,
        beams: usize,
        length_penalty: f64,
        max_tokens: usize,
    ) -> candle_core::Result<Generated> {
        let mut cache = KvCache::default();
        let first = self
            .step_logprobs(&self.prefix(clip)?, &mut cache)?
            .remove(0);
        let norm = |score: f64, len: usize| score / (len.max(1) as f64).powf(length_penalty);
        let mut finished: Vec<(Vec<u32>, f64, f64)> = Vec::new();
        let mut live: Vec<(Vec<u32>, f64)> = Vec::new();
        for tok in top_k(&first, 2 * beams) {
            let entry = (vec![tok], f64::from(first[tok as usize]));
            if tok == self.eos {
                finished.push((entry.0, entry.1, norm(entry.1, 1)));
            } else if live.len() < beams {
                live.push(entry);
            }
        }
        let room = self
            .decoder
            .config
            .n_positions
            .saturating_sub(self.prefix_length);
        let rows = Tensor::from_vec(vec![0u32; live.len()], live.len(), &self.device)?;
        cache.select_rows(&rows)?;
        for step in 1..max_tokens.min(room) {
            if live.is_empty() {
                break;
            }
            let last: Vec<u32> = live
                .iter()
                .map(|(ids, _)| *ids.last().unwrap_or(&self.eos))
                .collect();
            let ids = Tensor::from_vec(last, (live.len(), 1), &self.device)?;
            let lps = self.step_logprobs(&self.decoder.embed_tokens(&ids)?, &mut cache)?;
            let mut cands: Vec<(usize, u32, f64)> = Vec::new();
            for (row, lp) in lps.iter().enumerate() {
                for tok in top_k(lp, 2 * beams) {
                    cands.push((row, tok, live[row].1 + f64::from(lp[tok as usize])));
                }
            }
            cands.sort_by(|a, b| b.2.total_cmp(&a.2));
            let mut next = Vec::new();
            let mut parents = Vec::new();
            for (row, tok, score) in cands {
                let mut ids = live[row].0.clone();
                ids.push(tok);
                if tok == self.eos {
                    finished.push((ids, score, norm(score, step + 1)));
                } else if next.len() < beams {
                    next.push((ids, score));
                    parents.push(row as u32);
                }
                if next.len() >= beams {
                    break;
                }
            }
            finished.sort_by(|a, b| b.2.total_cmp(&a.2));
            finished.truncate(beams);
            if parents.is_empty() {
                live.clear();
                break;
            }
            cache.select_rows(&Tensor::from_vec(
                parents.clone(),
                parents.len(),
                &self.device,
            )?)?;
            live = next;
            if finished.len() >= beams {
                let best_live = live
                    .iter()
                    .map(|(ids, s)| norm(*s, ids.len()))
                    .fold(f64::MIN, f64::max);
                if best_live <= finished[beams - 1].2 {
                    break;
                }
            }
        }
        let pool: Vec<(Vec<u32>, f64, f64)> = if finished.is_empty() {
            live.into_iter()
                .map(|(ids, s)| {
                    let n = norm(s, ids.len());
                    (ids, s, n)
                })
                .collect()
        } else {
            finished
        };
        let best = pool
            .into_iter()
            .max_by(|a, b| a.2.total_cmp(&b.2))
            .unwrap_or_default();
        Ok(Generated {
            text: self.decode_text(&best.0),
            ids: best.0,
            logprob: best.1,
        })
    }
}

/// Re-initialises the mapper's variables from `seed` ([`crate::models::seed_vars`]).
pub fn seed_mapper(vars: &VarMap, seed: u64) -> Result<()> {
    crate::models::seed_vars(vars, "mapper.", "captioner-mapper-init", seed)
}

/// Token ids of `caption` followed by end-of-text, at most `max_tokens` in all.
pub fn caption_ids(
    tok: &Tokenizer,
    eos: u32,
    caption: &str,
    max_tokens: usize,
) -> Result<Vec<u32>> {
    let enc = tok
        .encode(caption, false)
        .map_err(|e| Error::Config(format!("tokenizing `{caption}`: {e}")))?;
    let mut ids: Vec<u32> = enc
        .get_ids()
        .iter()
        .copied()
        .take(max_tokens.saturating_sub(1))
        .collect();
    ids.push(eos);
    Ok(ids)
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

fn top_k(v: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..v.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(k - 1, |a, b| v[*b as usize].total_cmp(&v[*a as usize]));
    idx.truncate(k);
    idx.sort_by(|a, b| v[*b as usize].total_cmp(&v[*a as usize]));
    idx
}

/// Samples from the smallest set of tokens whose probability (at `temperature`) reaches
/// `top_p`.
fn nucleus(logprobs: &[f32], top_p: f64, temperature: f64, rng: &mut SplitMix64) -> u32 {
    let t = temperature.max(1e-6);
    let mut probs: Vec<(u32, f64)> = logprobs
        .iter()
        .enumerate()
        .map(|(i, &lp)| (i as u32, f64::from(lp) / t))
        .collect();
    let max = probs.iter().map(|p| p.1).fold(f64::MIN, f64::max);
    let mut total = 0.0;
    for p in &mut probs {
        p.1 = (p.1 - max).exp();
        total += p.1;
    }
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= top_p {
            cut = i + 1;
            break;
        }
    }
    let mass: f64 = probs[..cut].iter().map(|p| p.1).sum();
    let mut r = rng.unit_f64() * mass;
    for p in &probs[..cut] {
        r -= p.1;
        if r <= 0.0 {
            return p.0;
        }
    }
    probs[cut - 1].0
}

/// Written beside a trained captioner's checkpoints so `generate` can rebuild it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptionerManifest {
    pub captioner: CaptionerConfig,
    pub decoder_files: DecoderFiles,
    pub clip_dim: usize,
    /// The `[embed]` model (and revision) whose features the captioner was trained on.
    pub clip_model: String,
    pub clip_revision: String,
}

impl CaptionerManifest {
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::Config(e.to_string()))?;
        write_atomic(path, &json)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).at(path)?;
        serde_json::from_slice(&bytes).map_err(|e| Error::BadFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Rebuilds the captioner with the weights of `checkpoint` (a `model.safetensors`), or
    /// untrained when `None`.
    pub fn captioner(
        &self,
        checkpoint: Option<&Path>,
        device: &Device,
    ) -> Result<(Captioner, VarMap)> {
        let mut vars = VarMap::new();
        let mut model = Captioner::build(
            &self.captioner,
            self.clip_dim,
            &self.decoder_files,
            &vars,
            device,
        )?;
        if let Some(ckpt) = checkpoint {
            vars.load(ckpt).map_err(|e| Error::BadFile {
                path: ckpt.to_path_buf(),
                message: e.to_string(),
            })?;
        }
        model.decoder.set_differentiable(false);
        Ok((model, vars))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(p: &str) -> PathBuf {
        crate::hf_tiny_fixture(p)
    }

    fn cfg(mapper: MapperKind, freeze: bool) -> CaptionerConfig {
        CaptionerConfig {
            prefix_length: 4,
            mapper,
            freeze_decoder: freeze,
            max_caption_tokens: 12,
            ..CaptionerConfig::default()
        }
    }

    #[test]
    fn both_mappers_give_prefix_shapes_and_gradients_reach_them() {
        for (mapper, freeze) in [(MapperKind::Mlp, true), (MapperKind::Transformer, false)] {
            let vars = VarMap::new();
            let files = DecoderFiles::from_dir(&fixture("gpt2-tiny")).unwrap();
            let model =
                Captioner::build(&cfg(mapper, freeze), 16, &files, &vars, &Device::Cpu).unwrap();
            let clip = Tensor::randn(0f32, 1.0, (2, 16), &Device::Cpu).unwrap();
            assert_eq!(model.prefix(&clip).unwrap().dims(), &[2, 4, 32]);
            let a = caption_ids(&model.tokenizer, model.eos, "a red circle", 12).unwrap();
            let b = caption_ids(&model.tokenizer, model.eos, "two shapes above", 12).unwrap();
            let t = a.len().max(b.len());
            let pad = |v: &Vec<u32>| {
                let mut v = v.clone();
                v.resize(t, model.eos);
                v
            };
            let mask: Vec<f32> = [a.len(), b.len()]
                .iter()
                .flat_map(|&n| (0..t).map(move |i| if i < n { 1.0 } else { 0.0 }))
                .collect();
            let ids = Tensor::from_vec([pad(&a), pad(&b)].concat(), (2, t), &Device::Cpu).unwrap();
            let mask = Tensor::from_vec(mask, (2, t), &Device::Cpu).unwrap();
            let loss = model.nll(&clip, &ids, &mask).unwrap();
            let grads = loss.backward().unwrap();
            let trainable = vars.all_vars();
            assert!(
                trainable.iter().all(|v| grads.get(v.as_tensor()).is_some()),
                "{mapper:?}: every trainable var gets a gradient"
            );
            let decoder_vars = vars
                .data()
                .lock()
                .unwrap()
                .keys()
                .filter(|k| k.starts_with("decoder."))
                .count();
            assert_eq!(decoder_vars > 0, !freeze);
        }
    }

    #[test]
    fn padding_does_not_change_a_rows_log_probability() {
        let vars = VarMap::new();
        let files = DecoderFiles::from_dir(&fixture("gpt2-tiny")).unwrap();
        let model =
            Captioner::build(&cfg(MapperKind::Mlp, true), 16, &files, &vars, &Device::Cpu).unwrap();
        let clip = Tensor::randn(0f32, 1.0, (1, 16), &Device::Cpu).unwrap();
        let ids = caption_ids(
            &model.tokenizer,
            model.eos,
            "a red circle above a blue square",
            12,
        )
        .unwrap();
        let n = ids.len();
        let one = |extra: usize| {
            let mut v = ids.clone();
            v.resize(n + extra, model.eos);
            let m: Vec<f32> = (0..n + extra)
                .map(|i| if i < n { 1.0 } else { 0.0 })
                .collect();
            let (lp, count) = model
                .sequence_logprobs(
                    &clip,
                    &Tensor::from_vec(v, (1, n + extra), &Device::Cpu).unwrap(),
                    &Tensor::from_vec(m, (1, n + extra), &Device::Cpu).unwrap(),
                )
                .unwrap();
            (
                lp.to_vec1::<f32>().unwrap()[0],
                count.to_vec1::<f32>().unwrap()[0],
            )
        };
        let (a, na) = one(0);
        let (b, nb) = one(5);
        assert_eq!(na, nb);
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }

    #[test]
    fn greedy_beam_and_sampling_decode_consistently() {
        let vars = VarMap::new();
        let files = DecoderFiles::from_dir(&fixture("gpt2-tiny")).unwrap();
        let mut model =
            Captioner::build(&cfg(MapperKind::Mlp, true), 16, &files, &vars, &Device::Cpu).unwrap();
        model.decoder.set_differentiable(false);
        let clip = Tensor::randn(0f32, 1.0, (3, 16), &Device::Cpu).unwrap();
        let greedy = model.generate(&clip, &DecodeMethod::Greedy, 6).unwrap();
        assert_eq!(greedy.len(), 3);
        // Greedy log-probability equals the teacher-forced one of its own tokens.
        for (i, g) in greedy.iter().enumerate() {
            assert!(!g.ids.is_empty() && g.ids.len() <= 6);
            let t = g.ids.len();
            let (lp, _) = model
                .sequence_logprobs(
                    &clip.i(i..i + 1).unwrap(),
                    &Tensor::from_vec(g.ids.clone(), (1, t), &Device::Cpu).unwrap(),
                    &Tensor::ones((1, t), DType::F32, &Device::Cpu).unwrap(),
                )
                .unwrap();
            let lp = f64::from(lp.to_vec1::<f32>().unwrap()[0]);
            assert!((lp - g.logprob).abs() < 1e-3, "{lp} vs {}", g.logprob);
        }
        // A beam of 1 is greedy; a wider beam never finds a worse raw score at penalty 0.
        let b1 = model
            .generate(
                &clip,
                &DecodeMethod::Beam {
                    beams: 1,
                    length_penalty: 0.0,
                },
                6,
            )
            .unwrap();
        assert_eq!(
            b1.iter().map(|g| &g.ids).collect::<Vec<_>>(),
            greedy.iter().map(|g| &g.ids).collect::<Vec<_>>()
        );
        let s = DecodeMethod::Sample {
            top_p: 0.9,
            temperature: 1.0,
            seed: 1,
        };
        assert_eq!(
            model.generate(&clip, &s, 6).unwrap(),
            model.generate(&clip, &s, 6).unwrap()
        );
        // top_p → 0 is greedy.
        let s0 = DecodeMethod::Sample {
            top_p: 1e-9,
            temperature: 1.0,
            seed: 1,
        };
        assert_eq!(
            model
                .generate(&clip, &s0, 6)
                .unwrap()
                .iter()
                .map(|g| &g.ids)
                .collect::<Vec<_>>(),
            greedy.iter().map(|g| &g.ids).collect::<Vec<_>>()
        );
    }
}
