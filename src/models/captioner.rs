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

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Init, LayerNorm, Linear, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{CandleContext, Error, Result};
use crate::kernels::l2_normalized;
use crate::models::contrastive::{ContrastiveSpec, ProjectionHead};
use crate::models::gpt2::{
    is_cross_attention_tensor, load_gpt2_weights_but, softmax_train, train_norm, CrossStates, Gpt2,
    Gpt2Config, KvCache,
};
pub use crate::models::gpt2::{plain_ids, DecoderFiles, END_OF_TEXT};
use crate::rng::SplitMix64;

/// The mapper architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MapperKind {
    Mlp,
    Transformer,
}

/// How the image reaches GPT-2.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Conditioning {
    /// ClipCap: the image becomes `prefix_length` input embeddings in front of the caption.
    #[default]
    Prefix,
    /// Every GPT-2 block attends to image tokens (transformers' `add_cross_attention`); the
    /// caption starts after an end-of-text token.
    CrossAttention,
}

impl CaptionerConfig {
    /// The cached features this captioner reads: `image_tokens` (the CLIP tokens of a
    /// cross-attention captioner with `image_encoder = "clip"`), else `image` (pooled).
    pub fn feature_modality(&self) -> &'static str {
        if self.conditioning == Conditioning::CrossAttention
            && self.image_encoder == ImageEncoder::Clip
        {
            "image_tokens"
        } else {
            "image"
        }
    }
}

/// The image tokens a cross-attention captioner attends to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageEncoder {
    /// The cached CLIP features through a learned projection to GPT-2's width (the pooled
    /// embedding is one token).
    #[default]
    Clip,
    /// Contrastive stage 1's image head (initialised from `train-contrastive`'s best
    /// checkpoint, trained on) as one token, then a learned projection.
    Contrastive,
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
    /// `prefix` (ClipCap) or `cross_attention`.
    pub conditioning: Conditioning,
    /// With cross-attention: `clip` or `contrastive` image tokens.
    pub image_encoder: ImageEncoder,
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
            conditioning: Conditioning::Prefix,
            image_encoder: ImageEncoder::Clip,
            max_caption_tokens: 40,
            dataset: "cc".into(),
            train_split: "train".into(),
            val_split: "val".into(),
            max_train_samples: 0,
        }
    }
}

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

/// Contrastive stage 1's image head that a `contrastive` cross-attention captioner starts
/// from: its shape and the checkpoint holding its weights (`image_projection.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageHeadInit {
    pub spec: ContrastiveSpec,
    pub weights: PathBuf,
}

/// The image tokens of a cross-attention captioner: the stage-1 head (optional) and the
/// projection to GPT-2's width.
struct CrossImage {
    head: Option<ProjectionHead>,
    proj: Linear,
}

/// How the captioner conditions on the image.
enum Conditioner {
    Prefix(Mapper),
    Cross(CrossImage),
}

/// What decoding starts from: the input embeddings before the first caption token (the
/// prefix, or the start token) and, with cross-attention, the image's encoder states.
struct Start {
    embeds: Tensor,
    cross: Option<CrossStates>,
}

/// The captioner: mapper (or cross-attention image tokens), GPT-2 and its tokenizer.
pub struct Captioner {
    conditioner: Conditioner,
    pub decoder: Gpt2,
    pub tokenizer: Tokenizer,
    pub eos: u32,
    /// Positions the image takes before the caption: the prefix, or the one start token of
    /// a cross-attention captioner.
    pub prefix_length: usize,
    pub clip_dim: usize,
    /// Image tokens per row of the features (`clip_dim` = tokens × width); 0 = one pooled
    /// embedding.
    pub image_tokens: usize,
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
        image_tokens: usize,
        files: &DecoderFiles,
        image_head: Option<&ImageHeadInit>,
        vars: &VarMap,
        device: &Device,
    ) -> Result<Self> {
        let mut gcfg = Gpt2Config::from_file(&files.config)?;
        let err = format!("building the captioner from {}", files.weights.display());
        let cross = cfg.conditioning == Conditioning::CrossAttention;
        if cross {
            if cfg.freeze_decoder {
                return Err(Error::Config(
                    "captioner.freeze_decoder = true is for the prefix captioner: a cross-attention captioner's new layers live in GPT-2's blocks and must train".into(),
                ));
            }
            gcfg.add_cross_attention = true;
        }
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
            let new = load_gpt2_weights_but(
                vars,
                "decoder",
                &files.weights,
                device,
                is_cross_attention_tensor,
            )?;
            init_new_cross_attention(vars, &new, gcfg.n_layer)?;
            model
        };
        let mut decoder = decoder;
        decoder.set_differentiable(true);
        let d = gcfg.n_embd;
        let p = if cross { 1 } else { cfg.prefix_length.max(1) };
        let vb = VarBuilder::from_varmap(vars, DType::F32, device).pp("mapper");
        let conditioner = if cross {
            let root = VarBuilder::from_varmap(vars, DType::F32, device);
            let (head, width) = match (cfg.image_encoder, image_head) {
                (ImageEncoder::Clip, _) if image_tokens > 0 => {
                    if !clip_dim.is_multiple_of(image_tokens) {
                        return Err(Error::Config(format!(
                            "image features of width {clip_dim} are not {image_tokens} tokens"
                        )));
                    }
                    (None, clip_dim / image_tokens)
                }
                (ImageEncoder::Clip, _) => (None, clip_dim),
                (ImageEncoder::Contrastive, None) => {
                    return Err(Error::Config(
                        "captioner.image_encoder = \"contrastive\" needs a train-contrastive checkpoint".into(),
                    ))
                }
                (ImageEncoder::Contrastive, Some(init)) => {
                    if init.spec.clip_dim != clip_dim {
                        return Err(Error::Config(format!(
                            "the train-contrastive checkpoint {} takes CLIP features of width {}, these are {clip_dim}",
                            init.weights.display(),
                            init.spec.clip_dim
                        )));
                    }
                    let head = ProjectionHead::new(
                        clip_dim,
                        init.spec.projection_dim,
                        root.pp("image_encoder"),
                    )
                    .during(err.as_str())?;
                    load_image_head(vars, &init.weights, device)?;
                    (Some(head), init.spec.projection_dim)
                }
            };
            let proj = candle_nn::linear(width, d, root.pp("image_proj")).during(err.as_str())?;
            Conditioner::Cross(CrossImage { head, proj })
        } else {
            Conditioner::Prefix(match cfg.mapper {
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
            })
        };
        let (tokenizer, eos) = files.tokenizer()?;
        Ok(Self {
            conditioner,
            decoder,
            tokenizer,
            eos,
            prefix_length: p,
            clip_dim,
            image_tokens,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// What decoding and teacher forcing start from, for CLIP embeddings `(b, clip_dim)`:
    /// the prefix; or, with cross-attention, the start token (end-of-text) and the encoder
    /// states of the image tokens.
    fn start(&self, clip: &Tensor) -> candle_core::Result<Start> {
        let Conditioner::Cross(c) = &self.conditioner else {
            return Ok(Start {
                embeds: self.prefix(clip)?,
                cross: None,
            });
        };
        let b = clip.dim(0)?;
        let tokens = if self.image_tokens > 0 {
            let t = self.image_tokens;
            clip.reshape((b, t, clip.dim(1)? / t))?
        } else {
            let unit = l2_normalized(clip)?;
            match &c.head {
                Some(head) => l2_normalized(&head.forward(&unit, None)?)?,
                None => unit,
            }
            .unsqueeze(1)?
        };
        let states = c.proj.forward(&tokens)?;
        let bos = Tensor::from_vec(vec![self.eos; b], (b, 1), &self.device)?;
        Ok(Start {
            embeds: self.decoder.embed_tokens(&bos)?,
            cross: Some(self.decoder.cross_states(&states, None)?),
        })
    }

    /// [`Self::start`] followed by the embeddings of `prompt` `(b, t)` token ids, if any.
    fn start_with(&self, clip: &Tensor, prompt: Option<&Tensor>) -> candle_core::Result<Start> {
        let mut start = self.start(clip)?;
        if let Some(p) = prompt.filter(|p| p.dim(1).is_ok_and(|t| t > 0)) {
            start.embeds = Tensor::cat(&[&start.embeds, &self.decoder.embed_tokens(p)?], 1)?;
        }
        Ok(start)
    }

    /// Prefix embeddings `(b, P, d)` of L2-normalised CLIP embeddings `(b, clip_dim)`.
    pub fn prefix(&self, clip: &Tensor) -> candle_core::Result<Tensor> {
        let Conditioner::Prefix(mapper) = &self.conditioner else {
            candle_core::bail!("a cross-attention captioner has no prefix");
        };
        let clip = clip.broadcast_div(
            &clip
                .sqr()?
                .sum_keepdim(D::Minus1)?
                .sqrt()?
                .clamp(1e-12, f64::MAX)?,
        )?;
        let b = clip.dim(0)?;
        let (p, d) = (self.prefix_length, self.decoder.hidden_size());
        match mapper {
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

    /// Final hidden states `(b, p + t, d)` (after GPT-2's `ln_f`) of what the image starts
    /// (the prefix, or the start token of a cross-attention captioner; nothing without
    /// `clip`: text-only) followed by `ids` `(b, t)` under `attention` `(b, t)` f32, and `p`,
    /// the positions the image takes.
    pub fn hidden_states(
        &self,
        clip: Option<&Tensor>,
        ids: &Tensor,
        attention: &Tensor,
    ) -> candle_core::Result<(Tensor, usize)> {
        let b = ids.dim(0)?;
        let tokens = self.decoder.embed_tokens(ids)?;
        let (x, keep, p, cross) = match clip {
            Some(clip) => {
                let start = self.start(clip)?;
                let p = start.embeds.dim(1)?;
                let ones = Tensor::ones((b, p), DType::F32, &self.device)?;
                (
                    Tensor::cat(&[&start.embeds, &tokens], 1)?,
                    Tensor::cat(&[&ones, attention], 1)?,
                    p,
                    start.cross,
                )
            }
            None => (tokens, attention.clone(), 0, None),
        };
        let hidden = self
            .decoder
            .forward_hidden_with(&x, Some(&keep), cross.as_ref())?;
        Ok((hidden, p))
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
        let t = ids.dim(1)?;
        let (tok_lp, p) = self.predicted_logprobs(clip, ids, attention)?;
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

    /// Log-probabilities of the predicted tokens and the positions the image takes: with
    /// `clip`, `(b, t)`, column j = log p(ids_j | image, ids_<j); without (text-only),
    /// `(b, t − 1)` for tokens 1.. (token 0 is context only).
    fn predicted_logprobs(
        &self,
        clip: Option<&Tensor>,
        ids: &Tensor,
        attention: &Tensor,
    ) -> candle_core::Result<(Tensor, usize)> {
        let t = ids.dim(1)?;
        let (hidden, p) = self.hidden_states(clip, ids, attention)?;
        // Position j of `pred` predicts `targets` column j. The LM head runs on those
        // positions only.
        let (pred, targets) = if p > 0 {
            (hidden.narrow(1, p - 1, t)?, ids.clone())
        } else {
            (hidden.narrow(1, 0, t - 1)?, ids.narrow(1, 1, t - 1)?)
        };
        Ok((self.decoder.target_logprobs(&pred, &targets)?, p))
    }

    /// Per-token log p(ids_j | image, ids_<j) `(b, t)` of captions `ids` `(b, t)` after the
    /// image of `clip` `(b, clip_dim)`, under `attention` `(b, t)` f32 (padding's values are
    /// meaningless: mask them). RLHF's per-token rewards and ratios.
    pub fn token_logprobs(
        &self,
        clip: &Tensor,
        ids: &Tensor,
        attention: &Tensor,
    ) -> candle_core::Result<Tensor> {
        Ok(self.predicted_logprobs(Some(clip), ids, attention)?.0)
    }

    /// Mean negative log-likelihood per supervised token of a batch.
    pub fn nll(&self, clip: &Tensor, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (lp, n) = self.sequence_logprobs(clip, ids, mask)?;
        lp.sum_all()?.neg()? / f64::from(n.sum_all()?.to_scalar::<f32>()?.max(1.0))
    }

    /// The text of token ids, end-of-text dropped.
    pub fn decode_text(&self, ids: &[u32]) -> String {
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
        self.generate_after(clip, None, method, max_tokens)
    }

    /// Captions that continue a text `prompt` `(b, t)` of token ids (the same length in every
    /// row) after the image of `clip` `(b, clip_dim)`; `None`: right after the image.
    pub fn generate_after(
        &self,
        clip: &Tensor,
        prompt: Option<&Tensor>,
        method: &DecodeMethod,
        max_tokens: usize,
    ) -> candle_core::Result<Vec<Generated>> {
        let start = self.start_with(clip, prompt)?;
        match method {
            DecodeMethod::Greedy => self.sample_like(start, max_tokens, None),
            DecodeMethod::Sample {
                top_p,
                temperature,
                seed,
            } => self.sample_like(start, max_tokens, Some((*top_p, *temperature, *seed))),
            DecodeMethod::Beam {
                beams,
                length_penalty,
            } => Ok(self
                .beams_from(start, *beams, *length_penalty, max_tokens)?
                .into_iter()
                .map(|mut c| {
                    if c.is_empty() {
                        Generated {
                            ids: Vec::new(),
                            text: String::new(),
                            logprob: 0.0,
                        }
                    } else {
                        c.swap_remove(0)
                    }
                })
                .collect()),
        }
    }

    /// Last-position log-probabilities `(b, vocab)` after feeding `embeds`.
    fn step_logprobs(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        cross: Option<&CrossStates>,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let h = self.decoder.forward_cached_with(embeds, cache, cross)?;
        let t = h.dim(1)?;
        let last = h.narrow(1, t - 1, 1)?.squeeze(1)?;
        candle_nn::ops::log_softmax(&self.decoder.lm_logits(&last)?, D::Minus1)?.to_vec2::<f32>()
    }

    /// Greedy (`sampling` None) or nucleus sampling, batched.
    fn sample_like(
        &self,
        start: Start,
        max_tokens: usize,
        sampling: Option<(f64, f64, u64)>,
    ) -> candle_core::Result<Vec<Generated>> {
        let b = start.embeds.dim(0)?;
        let used = start.embeds.dim(1)?;
        let mut cache = KvCache::default();
        let cross = start.cross.as_ref();
        let mut lps = self.step_logprobs(&start.embeds, &mut cache, cross)?;
        let mut out: Vec<(Vec<u32>, f64, bool)> = vec![(Vec::new(), 0.0, false); b];
        let mut rngs: Vec<SplitMix64> = (0..b)
            .map(|i| SplitMix64::derived(sampling.map_or(0, |s| s.2), &format!("row{i}")))
            .collect();
        let room = self.decoder.config.n_positions.saturating_sub(used);
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
            lps = self.step_logprobs(&self.decoder.embed_tokens(&ids)?, &mut cache, cross)?;
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

    /// Beam search for each image of `clip` `(b, clip_dim)`, all images' beams decoded
    /// together: `beams` hypotheses per image, finished ones scored by
    /// `logprob / len^length_penalty` (transformers' convention). Returns, per image, up to
    /// `beams` distinct token sequences, best first: the finished hypotheses, then, when
    /// fewer finished, the live ones the token budget cut (a beam never holds a sequence
    /// twice, so neither do these; two sequences may still decode to the same text). DiCO's
    /// candidates.
    pub fn beam_search_candidates(
        &self,
        clip: &Tensor,
        beams: usize,
        length_penalty: f64,
        max_tokens: usize,
    ) -> candle_core::Result<Vec<Vec<Generated>>> {
        self.beams_from(self.start(clip)?, beams, length_penalty, max_tokens)
    }

    /// [`Self::beam_search_candidates`] from what `start` feeds first.
    fn beams_from(
        &self,
        start: Start,
        beams: usize,
        length_penalty: f64,
        max_tokens: usize,
    ) -> candle_core::Result<Vec<Vec<Generated>>> {
        let beams = beams.max(1);
        let b = start.embeds.dim(0)?;
        let used = start.embeds.dim(1)?;
        let mut cache = KvCache::default();
        let mut cross = start.cross;
        let first = self.step_logprobs(&start.embeds, &mut cache, cross.as_ref())?;
        let norm = |score: f64, len: usize| score / (len.max(1) as f64).powf(length_penalty);
        // Per image: finished (ids, score, normalised score) and live (ids, score) hypotheses.
        let mut finished: Vec<Vec<(Vec<u32>, f64, f64)>> = vec![Vec::new(); b];
        let mut live: Vec<Vec<(Vec<u32>, f64)>> = vec![Vec::new(); b];
        let mut parents: Vec<u32> = Vec::new();
        for (j, lp) in first.iter().enumerate() {
            for tok in top_k(lp, 2 * beams) {
                let entry = (vec![tok], f64::from(lp[tok as usize]));
                if tok == self.eos {
                    finished[j].push((entry.0, entry.1, norm(entry.1, 1)));
                } else if live[j].len() < beams {
                    live[j].push(entry);
                    parents.push(j as u32);
                }
            }
        }
        let room = self.decoder.config.n_positions.saturating_sub(used);
        for step in 1..max_tokens.min(room) {
            if parents.is_empty() {
                break;
            }
            let rows = Tensor::from_vec(parents.clone(), parents.len(), &self.device)?;
            cache.select_rows(&rows)?;
            cross = cross.map(|c| c.select_rows(&rows)).transpose()?;
            let last: Vec<u32> = live
                .iter()
                .flatten()
                .map(|(ids, _)| *ids.last().unwrap_or(&self.eos))
                .collect();
            let ids = Tensor::from_vec(last, (parents.len(), 1), &self.device)?;
            let lps = self.step_logprobs(
                &self.decoder.embed_tokens(&ids)?,
                &mut cache,
                cross.as_ref(),
            )?;
            parents.clear();
            let mut first_row = 0;
            for j in 0..b {
                let n = live[j].len();
                if n == 0 {
                    continue;
                }
                let mut cands: Vec<(usize, u32, f64)> = Vec::new();
                for (row, lp) in lps[first_row..first_row + n].iter().enumerate() {
                    for tok in top_k(lp, 2 * beams) {
                        cands.push((row, tok, live[j][row].1 + f64::from(lp[tok as usize])));
                    }
                }
                cands.sort_by(|a, b| b.2.total_cmp(&a.2));
                let mut next = Vec::new();
                let mut next_parents = Vec::new();
                for (row, tok, score) in cands {
                    let mut ids = live[j][row].0.clone();
                    ids.push(tok);
                    if tok == self.eos {
                        finished[j].push((ids, score, norm(score, step + 1)));
                    } else if next.len() < beams {
                        next.push((ids, score));
                        next_parents.push((first_row + row) as u32);
                    }
                    if next.len() >= beams {
                        break;
                    }
                }
                first_row += n;
                finished[j].sort_by(|a, b| b.2.total_cmp(&a.2));
                finished[j].truncate(beams);
                live[j] = next;
                // Done: nothing live, or no live hypothesis can beat the finished ones.
                if finished[j].len() >= beams {
                    let best_live = live[j]
                        .iter()
                        .map(|(ids, s)| norm(*s, ids.len()))
                        .fold(f64::MIN, f64::max);
                    if best_live <= finished[j][beams - 1].2 {
                        live[j].clear();
                        continue;
                    }
                }
                parents.extend(next_parents);
            }
        }
        Ok(finished
            .into_iter()
            .zip(live)
            .map(|(mut pool, live)| {
                pool.sort_by(|a, b| b.2.total_cmp(&a.2));
                pool.truncate(beams);
                if pool.len() < beams {
                    let mut rest: Vec<(Vec<u32>, f64, f64)> = live
                        .into_iter()
                        .map(|(ids, s)| {
                            let n = norm(s, ids.len());
                            (ids, s, n)
                        })
                        .collect();
                    rest.sort_by(|a, b| b.2.total_cmp(&a.2));
                    pool.extend(rest.into_iter().take(beams - pool.len()));
                }
                pool.into_iter()
                    .map(|(ids, logprob, _)| Generated {
                        text: self.decode_text(&ids),
                        ids,
                        logprob,
                    })
                    .collect()
            })
            .collect())
    }
}

/// Re-initialises the mapper's variables (a cross-attention captioner's image projection)
/// from `seed` ([`crate::models::seed_vars`]).
pub fn seed_mapper(vars: &VarMap, seed: u64) -> Result<()> {
    crate::models::seed_vars(vars, "mapper.", "captioner-mapper-init", seed)?;
    crate::models::seed_vars(vars, "image_proj.", "captioner-image-proj-init", seed)
}

/// Cross-attention variables `names` that the decoder checkpoint did not have, initialised
/// as transformers initialises GPT-2 (seeded): weights N(0, 0.02), `c_proj` weights
/// N(0, 0.02/sqrt(2·n_layer)), biases 0, LayerNorm gains 1.
fn init_new_cross_attention(vars: &VarMap, names: &[String], n_layer: usize) -> Result<()> {
    let rng = SplitMix64::derived(0, "gpt2-cross-attention-init");
    crate::models::init_vars(vars, names, rng, |name, dims, rng| {
        let n: usize = dims.iter().product();
        if name.ends_with(".bias") {
            vec![0.0; n]
        } else if name.contains(".ln_cross_attn.") {
            vec![1.0; n]
        } else if name.contains(".c_proj.") {
            rng.normal_samples(n, 0.02 / (2.0 * n_layer as f32).sqrt())
        } else {
            rng.normal_samples(n, 0.02)
        }
    })
}

/// Sets the `image_encoder.` variables from a train-contrastive checkpoint's
/// `image_projection.*` tensors.
fn load_image_head(vars: &VarMap, weights: &Path, device: &Device) -> Result<()> {
    crate::models::load_vars(
        vars,
        "image_encoder",
        weights,
        device,
        |rest| vec![format!("image_projection.{rest}")],
        |_| false,
    )
    .map(|_| ())
}

/// Token ids of `caption` followed by end-of-text, at most `max_tokens` in all.
pub fn caption_ids(
    tok: &Tokenizer,
    eos: u32,
    caption: &str,
    max_tokens: usize,
) -> Result<Vec<u32>> {
    let mut ids = plain_ids(tok, caption)?;
    ids.truncate(max_tokens.saturating_sub(1));
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
    /// A `contrastive` cross-attention captioner's starting image head.
    #[serde(default)]
    pub image_head: Option<ImageHeadInit>,
    /// Image tokens per feature row (`image_encoder = "clip"` over cached tokens); 0 = pooled.
    #[serde(default)]
    pub image_tokens: usize,
}

impl CaptionerManifest {
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::io::write_json(path, self)
    }

    pub fn load(path: &Path) -> Result<Self> {
        crate::io::read_json(path)
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
            self.image_tokens,
            &self.decoder_files,
            self.image_head.as_ref(),
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
    use candle_core::IndexOp;

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
            let model = Captioner::build(
                &cfg(mapper, freeze),
                16,
                0,
                &files,
                None,
                &vars,
                &Device::Cpu,
            )
            .unwrap();
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

    fn cross(image_encoder: ImageEncoder) -> CaptionerConfig {
        CaptionerConfig {
            conditioning: Conditioning::CrossAttention,
            image_encoder,
            ..cfg(MapperKind::Mlp, false)
        }
    }

    /// The prefix captioner and the cross-attention one over one pooled token and over
    /// four image tokens of width 4 (the features' rows are 16 wide in each case).
    fn both() -> [(CaptionerConfig, usize); 3] {
        [
            (cfg(MapperKind::Mlp, true), 0),
            (cross(ImageEncoder::Clip), 0),
            (cross(ImageEncoder::Clip), 4),
        ]
    }

    /// Cross-attention on a plain GPT-2 checkpoint: its blocks gain the layers (seeded as
    /// transformers initialises them), the image projection is new, every trainable
    /// variable gets a gradient from the caption loss, the caption starts after one start
    /// token; a frozen decoder or a missing stage-1 checkpoint is refused with the reason.
    #[test]
    fn a_cross_attention_captioner_trains_its_new_layers() {
        let files = DecoderFiles::from_dir(&fixture("gpt2-tiny")).unwrap();
        let vars = VarMap::new();
        let model = Captioner::build(
            &cross(ImageEncoder::Clip),
            16,
            0,
            &files,
            None,
            &vars,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(model.prefix_length, 1);
        let names: Vec<String> = vars.data().lock().unwrap().keys().cloned().collect();
        for want in [
            "decoder.h.0.crossattention.q_attn.weight",
            "decoder.h.1.crossattention.c_attn.weight",
            "decoder.h.0.ln_cross_attn.weight",
            "image_proj.weight",
        ] {
            assert!(names.iter().any(|n| n == want), "{want}");
        }
        assert!(!names.iter().any(|n| n.starts_with("mapper.")));
        let q = vars.data().lock().unwrap()["decoder.h.0.crossattention.q_attn.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let std = (q.iter().map(|x| x * x).sum::<f32>() / q.len() as f32).sqrt();
        assert!((0.015..0.025).contains(&std), "N(0, 0.02) init: {std}");
        let clip = Tensor::randn(0f32, 1.0, (2, 16), &Device::Cpu).unwrap();
        let ids = caption_ids(&model.tokenizer, model.eos, "a red circle", 12).unwrap();
        let t = ids.len();
        let ids = Tensor::from_vec([ids.clone(), ids].concat(), (2, t), &Device::Cpu).unwrap();
        let mask = Tensor::ones((2, t), DType::F32, &Device::Cpu).unwrap();
        let grads = model.nll(&clip, &ids, &mask).unwrap().backward().unwrap();
        for (name, var) in vars.data().lock().unwrap().iter() {
            // Position embeddings past the caption and unused token rows get none.
            if name.ends_with("wpe.weight") || name.ends_with("wte.weight") {
                continue;
            }
            assert!(grads.get(var.as_tensor()).is_some(), "{name}");
        }
        let frozen = CaptionerConfig {
            freeze_decoder: true,
            ..cross(ImageEncoder::Clip)
        };
        let err = Captioner::build(&frozen, 16, 0, &files, None, &VarMap::new(), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("freeze_decoder"), "{err}");
        let err = Captioner::build(
            &cross(ImageEncoder::Contrastive),
            16,
            0,
            &files,
            None,
            &VarMap::new(),
            &Device::Cpu,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("train-contrastive"), "{err}");
    }

    #[test]
    fn padding_does_not_change_a_rows_log_probability() {
        for (c, tokens) in both() {
            padding_invariance(&c, tokens);
        }
    }

    fn padding_invariance(c: &CaptionerConfig, tokens: usize) {
        let vars = VarMap::new();
        let files = DecoderFiles::from_dir(&fixture("gpt2-tiny")).unwrap();
        let model = Captioner::build(c, 16, tokens, &files, None, &vars, &Device::Cpu).unwrap();
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
        for (c, tokens) in both() {
            decoding_consistency(&c, tokens);
        }
    }

    fn decoding_consistency(c: &CaptionerConfig, tokens: usize) {
        let vars = VarMap::new();
        let files = DecoderFiles::from_dir(&fixture("gpt2-tiny")).unwrap();
        let mut model = Captioner::build(c, 16, tokens, &files, None, &vars, &Device::Cpu).unwrap();
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

    /// DiCO's candidates: `beams` distinct token sequences per image, best first by the
    /// length-normalised score, the first the beam search's answer, each one's log-probability
    /// its teacher-forced one.
    #[test]
    fn beam_candidates_are_distinct_ranked_and_their_best_is_the_beam_answer() {
        let (c, tokens) = both()[0].clone();
        let vars = VarMap::new();
        let files = DecoderFiles::from_dir(&fixture("gpt2-tiny")).unwrap();
        let mut model =
            Captioner::build(&c, 16, tokens, &files, None, &vars, &Device::Cpu).unwrap();
        model.decoder.set_differentiable(false);
        let clip = Tensor::randn(0f32, 1.0, (2, 16), &Device::Cpu).unwrap();
        let all = model.beam_search_candidates(&clip, 5, 1.0, 6).unwrap();
        let best = model
            .generate(
                &clip,
                &DecodeMethod::Beam {
                    beams: 5,
                    length_penalty: 1.0,
                },
                6,
            )
            .unwrap();
        for (cands, best) in all.iter().zip(&best) {
            assert_eq!(cands.len(), 5);
            assert_eq!(&cands[0], best);
            let set: std::collections::HashSet<&Vec<u32>> = cands.iter().map(|g| &g.ids).collect();
            assert_eq!(set.len(), 5, "distinct token sequences");
            let finished = cands.iter().filter(|g| g.ids.last() == Some(&model.eos));
            let norm: Vec<f64> = finished.map(|g| g.logprob / g.ids.len() as f64).collect();
            assert!(norm.windows(2).all(|w| w[0] >= w[1] - 1e-12), "{norm:?}");
        }
        for (i, g) in all[0].iter().enumerate() {
            let t = g.ids.len();
            let (lp, _) = model
                .sequence_logprobs(
                    &clip.i(0..1).unwrap(),
                    &Tensor::from_vec(g.ids.clone(), (1, t), &Device::Cpu).unwrap(),
                    &Tensor::ones((1, t), DType::F32, &Device::Cpu).unwrap(),
                )
                .unwrap();
            let lp = f64::from(lp.to_vec1::<f32>().unwrap()[0]);
            assert!((lp - g.logprob).abs() < 1e-3, "{i}: {lp} vs {}", g.logprob);
        }
    }
}
