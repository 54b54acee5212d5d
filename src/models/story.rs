//! The next-frame story model (StoryReasoning's recipe): a fusion encoder reads the `K`
//! context frames — per frame `[CLIP image ; CLIP text of its caption]`, both L2-normalised,
//! `→ Linear → ReLU → Dropout → fusion_dim`, plus a learned frame-position embedding (a
//! switch: the reference had none) — through a small post-LN Transformer encoder (PyTorch's
//! `nn.TransformerEncoderLayer` with GELU) and mean-pools them into `z`. `z` conditions a
//! CLIP-prefix GPT-2 captioner ([`Captioner`], its mapper reading `z` in place of a CLIP
//! embedding) that continues a text prompt of the context captions with the next frame's
//! caption, and an image head (`z → 256 → ReLU → CLIP dim`, normalised) predicts the next
//! frame's CLIP image embedding. A discriminator scores `[CLIP image ; CLIP text]` pairs for
//! the adversarial variants. Dropout masks come from a seeded generator, so a resumed run
//! repeats the uninterrupted one.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{LayerNorm, Linear, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{CandleContext, Error, Result};
use crate::kernels::l2_normalized;
use crate::models::captioner::{
    Captioner, CaptionerConfig, Conditioning, DecodeMethod, DecoderFiles, Generated, MapperKind,
};
use crate::models::gpt2::{plain_ids, softmax_train, train_norm};
use crate::rng::SplitMix64;

/// The shape of the fusion encoder, the image head and the discriminator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorySpec {
    /// CLIP embedding width.
    pub clip_dim: usize,
    /// K.
    pub context_frames: usize,
    pub fusion_dim: usize,
    pub layers: usize,
    pub heads: usize,
    pub ffn_dim: usize,
    pub dropout: f64,
    /// Learned frame-position embeddings added to the frame tokens.
    pub frame_positions: bool,
    /// Hidden width of the image head.
    pub image_head_dim: usize,
}

/// Inverted dropout on `x`: each value kept with probability `1 − p` and scaled by
/// `1/(1 − p)`, the mask drawn from `rng`; `x` unchanged without `rng` (evaluation) or at
/// `p = 0`.
pub fn dropout(x: &Tensor, p: f64, rng: Option<&mut SplitMix64>) -> candle_core::Result<Tensor> {
    let Some(rng) = rng.filter(|_| p > 0.0) else {
        return Ok(x.clone());
    };
    let scale = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.unit_f64() < p { 0.0 } else { scale })
        .collect();
    x * Tensor::from_vec(mask, x.shape(), x.device())?
}

/// `nn.TransformerEncoderLayer(d, heads, ffn, dropout, activation="gelu")`, post-LN:
/// `x = LN1(x + Drop(SelfAttn(x)))`, `x = LN2(x + Drop(W2 Drop(GELU(W1 x))))`.
struct EncoderLayer {
    qkv: Linear,
    out: Linear,
    ln1: LayerNorm,
    ff1: Linear,
    ff2: Linear,
    ln2: LayerNorm,
    heads: usize,
}

impl EncoderLayer {
    fn new(d: usize, heads: usize, ffn: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            qkv: candle_nn::linear(d, 3 * d, vb.pp("qkv"))?,
            out: candle_nn::linear(d, d, vb.pp("out"))?,
            ln1: candle_nn::layer_norm(d, 1e-5, vb.pp("ln1"))?,
            ff1: candle_nn::linear(d, ffn, vb.pp("ff1"))?,
            ff2: candle_nn::linear(ffn, d, vb.pp("ff2"))?,
            ln2: candle_nn::layer_norm(d, 1e-5, vb.pp("ln2"))?,
            heads,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        p: f64,
        mut rng: Option<&mut SplitMix64>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.heads;
        let qkv = self.qkv.forward(x)?;
        let split = |i: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(D::Minus1, i * d, d)?
                .reshape((b, t, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let att = softmax_train(&(q.matmul(&k.t()?)? / (hd as f64).sqrt())?)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        let y = dropout(&self.out.forward(&y)?, p, rng.as_deref_mut())?;
        let x = train_norm(&(x + y)?, &self.ln1)?;
        let h = dropout(&self.ff1.forward(&x)?.gelu_erf()?, p, rng.as_deref_mut())?;
        let h = dropout(&self.ff2.forward(&h)?, p, rng)?;
        train_norm(&(x + h)?, &self.ln2)
    }
}

/// The fusion encoder: context frames → `z` `(b, fusion_dim)`.
pub struct FusionEncoder {
    input: Linear,
    positions: Option<Tensor>,
    layers: Vec<EncoderLayer>,
    spec: StorySpec,
}

impl FusionEncoder {
    fn new(spec: &StorySpec, vb: VarBuilder) -> candle_core::Result<Self> {
        let f = spec.fusion_dim;
        Ok(Self {
            input: candle_nn::linear(2 * spec.clip_dim, f, vb.pp("input"))?,
            positions: if spec.frame_positions {
                Some(vb.get_with_hints(
                    (spec.context_frames, f),
                    "positions",
                    candle_nn::Init::Const(0.0),
                )?)
            } else {
                None
            },
            layers: (0..spec.layers)
                .map(|i| {
                    EncoderLayer::new(f, spec.heads, spec.ffn_dim, vb.pp(format!("layers.{i}")))
                })
                .collect::<candle_core::Result<_>>()?,
            spec: spec.clone(),
        })
    }

    /// `z` of context frames' CLIP image and text embeddings, each `(b, K, clip_dim)`;
    /// dropout masks from `rng` while training.
    pub fn forward(
        &self,
        image: &Tensor,
        text: &Tensor,
        mut rng: Option<&mut SplitMix64>,
    ) -> candle_core::Result<Tensor> {
        let x = Tensor::cat(&[&l2_normalized(image)?, &l2_normalized(text)?], D::Minus1)?;
        let p = self.spec.dropout;
        let mut h = dropout(&self.input.forward(&x)?.relu()?, p, rng.as_deref_mut())?;
        if let Some(pos) = &self.positions {
            h = h.broadcast_add(pos)?;
        }
        for l in &self.layers {
            h = l.forward(&h, p, rng.as_deref_mut())?;
        }
        h.mean(1)
    }
}

/// The image head: `z → image_head_dim → ReLU → clip_dim`, L2-normalised.
pub struct ImageHead {
    l1: Linear,
    l2: Linear,
}

impl ImageHead {
    pub fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        l2_normalized(&self.l2.forward(&self.l1.forward(z)?.relu()?)?)
    }
}

/// The adversarial variants' discriminator on `[CLIP image ; CLIP text]` (both normalised):
/// `2·clip_dim → 1024 → 512 → 512 → 1`, LeakyReLU(0.2) between.
pub struct Discriminator {
    layers: [Linear; 3],
    score: Linear,
}

impl Discriminator {
    pub fn new(clip_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            layers: [
                candle_nn::linear(2 * clip_dim, 1024, vb.pp("l1"))?,
                candle_nn::linear(1024, 512, vb.pp("l2"))?,
                candle_nn::linear(512, 512, vb.pp("l3"))?,
            ],
            score: candle_nn::linear(512, 1, vb.pp("score"))?,
        })
    }

    /// Scores `(b,)` and the penultimate features `(b, 512)` of image and text embeddings
    /// `(b, clip_dim)` each.
    pub fn forward(&self, image: &Tensor, text: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let mut h = Tensor::cat(&[&l2_normalized(image)?, &l2_normalized(text)?], D::Minus1)?;
        for l in &self.layers {
            let y = l.forward(&h)?;
            // LeakyReLU(0.2) = max(y, 0.2 y).
            h = y.maximum(&(&y * 0.2)?)?;
        }
        Ok((self.score.forward(&h)?.squeeze(1)?, h))
    }
}

/// Fusion encoder, image head and the prefix captioner that writes the next caption.
pub struct StoryModel {
    pub fusion: FusionEncoder,
    pub image_head: ImageHead,
    pub captioner: Captioner,
    pub spec: StorySpec,
}

impl StoryModel {
    /// Builds the model on `device` with its variables in `vars` (`fusion.`, `image_head.`,
    /// the captioner's `mapper.` and, unless frozen, `decoder.`).
    pub fn build(
        spec: &StorySpec,
        captioner: &CaptionerConfig,
        files: &DecoderFiles,
        vars: &VarMap,
        device: &Device,
    ) -> Result<Self> {
        if captioner.conditioning != Conditioning::Prefix {
            return Err(Error::Config(
                "the story model conditions GPT-2 through a prefix".into(),
            ));
        }
        let vb = VarBuilder::from_varmap(vars, DType::F32, device);
        let err = "building the story model";
        let fusion = FusionEncoder::new(spec, vb.pp("fusion")).during(err)?;
        let image_head = ImageHead {
            l1: candle_nn::linear(spec.fusion_dim, spec.image_head_dim, vb.pp("image_head.l1"))
                .during(err)?,
            l2: candle_nn::linear(spec.image_head_dim, spec.clip_dim, vb.pp("image_head.l2"))
                .during(err)?,
        };
        let captioner = Captioner::build(captioner, spec.fusion_dim, 0, files, None, vars, device)?;
        Ok(Self {
            fusion,
            image_head,
            captioner,
            spec: spec.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        self.captioner.device()
    }

    /// Next-frame captions for rows of context features `(b, K, clip_dim)` and their prompts
    /// (token ids): rows with prompts of one length are decoded together.
    pub fn generate(
        &self,
        context_image: &Tensor,
        context_text: &Tensor,
        prompts: &[Vec<u32>],
        method: &DecodeMethod,
        max_tokens: usize,
    ) -> candle_core::Result<Vec<Generated>> {
        let z = self
            .fusion
            .forward(context_image, context_text, None)?
            .detach();
        let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (r, p) in prompts.iter().enumerate() {
            by_len.entry(p.len()).or_default().push(r);
        }
        let mut out: Vec<Option<Generated>> = vec![None; prompts.len()];
        let device = self.device();
        for (len, rows) in by_len {
            let idx = Tensor::from_vec(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                rows.len(),
                device,
            )?;
            let ids: Vec<u32> = rows
                .iter()
                .flat_map(|&r| prompts[r].iter().copied())
                .collect();
            let prompt = Tensor::from_vec(ids, (rows.len(), len), device)?;
            let gens = self.captioner.generate_after(
                &z.index_select(&idx, 0)?,
                Some(&prompt),
                method,
                max_tokens,
            )?;
            for (r, g) in rows.into_iter().zip(gens) {
                out[r] = Some(g);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }
}

/// Re-initialises the story model's own variables and the captioner's mapper from `seed`.
pub fn seed_story_model(vars: &VarMap, seed: u64) -> Result<()> {
    crate::models::seed_vars(vars, "fusion.", "story-fusion-init", seed)?;
    crate::models::seed_vars(vars, "image_head.", "story-image-head-init", seed)?;
    crate::models::captioner::seed_mapper(vars, seed)
}

/// Which frames of a story are targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Targets {
    /// The reference's one example per story: the first frame with `K` whole frames before
    /// it (frame `K` of a story without gaps).
    Last,
    /// Every frame with `K` whole frames before it (a sliding window).
    All,
}

/// The text prompt after the prefix: the context captions in a template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptFormat {
    /// The prompt with `{context}` where the context lines go (`CTX\n{context}\nNEXT:`);
    /// empty = no text prompt (the prefix alone conditions the caption).
    pub template: String,
    /// One context line, `{n}` its 1-based number, `{caption}` the caption (`{n}: {caption}`);
    /// lines are joined by newlines.
    pub line: String,
    /// GPT-2 tokens kept of each context caption.
    pub caption_tokens: usize,
    /// Tokens kept of the whole prompt: the last ones (the most recent context and the
    /// template's end survive).
    pub max_tokens: usize,
}

impl PromptFormat {
    /// The prompt's token ids for the context `captions`, oldest first.
    pub fn ids(&self, tok: &Tokenizer, captions: &[&str]) -> Result<Vec<u32>> {
        if self.template.is_empty() {
            return Ok(Vec::new());
        }
        let (before, after) = self
            .template
            .split_once("{context}")
            .unwrap_or((self.template.as_str(), ""));
        let mut ids = plain_ids(tok, before)?;
        for (i, caption) in captions.iter().enumerate() {
            if i > 0 {
                ids.extend(plain_ids(tok, "\n")?);
            }
            let (head, tail) = self
                .line
                .split_once("{caption}")
                .unwrap_or((self.line.as_str(), ""));
            let n = (i + 1).to_string();
            ids.extend(plain_ids(tok, &head.replace("{n}", &n))?);
            let mut c = plain_ids(tok, caption)?;
            c.truncate(self.caption_tokens);
            ids.extend(c);
            ids.extend(plain_ids(tok, &tail.replace("{n}", &n))?);
        }
        ids.extend(plain_ids(tok, after)?);
        let cut = ids.len().saturating_sub(self.max_tokens);
        Ok(ids.split_off(cut))
    }
}

/// Written beside a trained story model's checkpoints so `generate` can rebuild it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoryManifest {
    pub spec: StorySpec,
    pub captioner: CaptionerConfig,
    pub decoder_files: DecoderFiles,
    pub prompt: PromptFormat,
    pub max_caption_tokens: usize,
    pub clip_model: String,
    pub clip_revision: String,
    /// The story dataset and the validation split it was trained against.
    pub dataset: String,
    pub val_split: String,
    pub targets: Targets,
}

impl StoryManifest {
    pub fn load(path: &Path) -> Result<Self> {
        crate::io::read_json(path)
    }

    /// The model with the weights of `checkpoint`.
    pub fn model(&self, checkpoint: &Path, device: &Device) -> Result<StoryModel> {
        let mut vars = VarMap::new();
        let mut model = StoryModel::build(
            &self.spec,
            &self.captioner,
            &self.decoder_files,
            &vars,
            device,
        )?;
        vars.load(checkpoint).map_err(|e| Error::BadFile {
            path: checkpoint.to_path_buf(),
            message: e.to_string(),
        })?;
        model.captioner.decoder.set_differentiable(false);
        Ok(model)
    }
}

/// The captioner settings of a story model: a prefix of `prefix_length` through `mapper`.
pub fn story_captioner(
    decoder: &str,
    revision: &str,
    prefix_length: usize,
    mapper: MapperKind,
    freeze_decoder: bool,
) -> CaptionerConfig {
    CaptionerConfig {
        decoder: decoder.into(),
        decoder_revision: revision.into(),
        prefix_length,
        mapper,
        freeze_decoder,
        conditioning: Conditioning::Prefix,
        ..CaptionerConfig::default()
    }
}
