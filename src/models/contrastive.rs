//! The two-tower model of contrastive stage 1: a GPT-2 text encoder, pooled by the
//! attention-masked mean of its last hidden state, and two projection heads that map the
//! pooled text and a frozen CLIP image embedding into one space where matching pairs are
//! close.
//!
//! Each head is `Linear(in, p) → ReLU → Dropout → Linear(p, p) → LayerNorm(p)` and its output
//! is L2-normalised. The image head takes the CLIP embedding L2-normalised (as the captioner's
//! prefix does). The temperature of the loss is a constant or, learned, `exp` of a variable
//! (`log_temperature`), so it stays positive. Trainable variables live in one `VarMap` under
//! `text_encoder.` (when the encoder is trained), `text_projection.`, `image_projection.` and
//! `log_temperature`; the manifest (`contrastive.json`) says how to rebuild the model from a
//! checkpoint of them.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Init, LayerNorm, Linear, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{CandleContext, Error, Result};
use crate::kernels::l2_normalized;
use crate::models::gpt2::{
    load_gpt2_weights, masked_mean_pool, plain_ids, train_norm, DecoderFiles, Gpt2, Gpt2Config,
    END_OF_TEXT,
};
use crate::rng::SplitMix64;

/// The model's shape and training switches, as `[train_contrastive]` sets them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContrastiveSpec {
    /// Width of the shared space (both heads' outputs).
    pub projection_dim: usize,
    /// Dropout inside both heads while training.
    pub dropout: f64,
    /// The loss temperature (its starting value when learned).
    pub temperature: f64,
    pub learnable_temperature: bool,
    /// Fine-tune the GPT-2 text encoder; false = only the heads (and temperature) learn.
    pub train_text_encoder: bool,
    /// Width of the frozen CLIP embeddings the image head takes.
    pub clip_dim: usize,
}

/// What rebuilds a trained model: its spec, the text encoder's files and the CLIP whose
/// features it was trained on (`<stage dir>/contrastive.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContrastiveManifest {
    pub spec: ContrastiveSpec,
    pub text_encoder: DecoderFiles,
    pub clip_model: String,
    pub clip_revision: String,
}

impl ContrastiveManifest {
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::io::write_json(path, self)
    }

    pub fn load(path: &Path) -> Result<Self> {
        crate::io::read_json(path)
    }
}

/// `Linear → ReLU → Dropout → Linear → LayerNorm`.
pub struct ProjectionHead {
    l1: Linear,
    l2: Linear,
    ln: LayerNorm,
}

impl ProjectionHead {
    pub fn new(input: usize, dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            l1: candle_nn::linear(input, dim, vb.pp("l1"))?,
            l2: candle_nn::linear(dim, dim, vb.pp("l2"))?,
            ln: candle_nn::layer_norm(dim, 1e-5, vb.pp("ln"))?,
        })
    }

    /// The head on `x` `(b, in)`; `drop` is a `(b, dim)` mask already scaled by `1/(1-p)`
    /// (training) or `None` (evaluation).
    pub fn forward(&self, x: &Tensor, drop: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let mut h = self.l1.forward(x)?.relu()?;
        if let Some(m) = drop {
            h = (h * m)?;
        }
        train_norm(&self.l2.forward(&h)?, &self.ln)
    }
}

/// The text encoder, its tokenizer and both heads.
pub struct ContrastiveModel {
    pub text_encoder: Gpt2,
    pub tokenizer: Tokenizer,
    /// What pads a batch (end-of-text; masked out).
    pub pad: u32,
    pub text_projection: ProjectionHead,
    pub image_projection: ProjectionHead,
    /// `log t` as a variable (learned) or a constant.
    log_temperature: Tensor,
    pub spec: ContrastiveSpec,
    device: Device,
}

impl ContrastiveModel {
    /// Builds the model on `device` with its trainable variables in `vars`: the heads (and
    /// the log-temperature when learned) seeded from `seed`, the text encoder from its
    /// checkpoint (a variable only when trained, else memory-mapped and frozen).
    pub fn build(
        spec: &ContrastiveSpec,
        files: &DecoderFiles,
        vars: &VarMap,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let gcfg = Gpt2Config::from_file(&files.config)?;
        let err = format!("building the text encoder from {}", files.weights.display());
        check_shapes(&files.weights, &gcfg)?;
        let mut text_encoder = if spec.train_text_encoder {
            let vb = VarBuilder::from_varmap(vars, DType::F32, device).pp("text_encoder");
            let model = Gpt2::new(&gcfg, vb).during(err.as_str())?;
            load_gpt2_weights(vars, "text_encoder", &files.weights, device)?;
            model
        } else {
            // SAFETY: checkpoints are mapped read-only and never written while mapped.
            let vb = unsafe {
                VarBuilder::from_mmaped_safetensors(&[&files.weights], DType::F32, device)
            }
            .during(err.as_str())?;
            Gpt2::new(&gcfg, vb).during(err.as_str())?
        };
        // A frozen encoder runs the fused kernels: nothing flows back through it.
        text_encoder.set_differentiable(spec.train_text_encoder);
        let vb = VarBuilder::from_varmap(vars, DType::F32, device);
        let p = spec.projection_dim;
        let text_projection = ProjectionHead::new(gcfg.n_embd, p, vb.pp("text_projection"))
            .during("building the text projection")?;
        let image_projection = ProjectionHead::new(spec.clip_dim, p, vb.pp("image_projection"))
            .during("building the image projection")?;
        crate::models::seed_vars(vars, "text_projection.", "contrastive-text-head", seed)?;
        crate::models::seed_vars(vars, "image_projection.", "contrastive-image-head", seed)?;
        let log_t = spec.temperature.ln();
        let log_temperature = if spec.learnable_temperature {
            vb.get_with_hints((), "log_temperature", Init::Const(log_t))
                .during("building the temperature")?
        } else {
            Tensor::new(log_t as f32, device).during("building the temperature")?
        };
        let tokenizer = Tokenizer::from_file(&files.tokenizer).map_err(|e| Error::BadFile {
            path: files.tokenizer.clone(),
            message: format!("not a tokenizers file: {e}"),
        })?;
        let pad = tokenizer.token_to_id(END_OF_TEXT).unwrap_or(0);
        Ok(Self {
            text_encoder,
            tokenizer,
            pad,
            text_projection,
            image_projection,
            log_temperature,
            spec: spec.clone(),
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The loss temperature, `exp(log_temperature)`.
    pub fn temperature(&self) -> candle_core::Result<Tensor> {
        self.log_temperature.exp()
    }

    /// Token ids of `caption` as the text encoder's tokenizer splits it (no special tokens,
    /// as `tokenizer(caption)` for GPT-2), at most `max_tokens` (at least one: an empty
    /// caption is end-of-text).
    pub fn caption_tokens(&self, caption: &str, max_tokens: usize) -> Result<Vec<u32>> {
        text_tokens(&self.tokenizer, self.pad, caption, max_tokens)
    }

    /// Pooled text embeddings `(b, d)` of padded ids `(b, t)` with `keep` `(b, t)` (1 = token).
    pub fn pooled_text(&self, ids: &Tensor, keep: &Tensor) -> candle_core::Result<Tensor> {
        let embeds = self.text_encoder.embed_tokens(ids)?;
        let hidden = self.text_encoder.forward_hidden(&embeds, Some(keep))?;
        let pooled = masked_mean_pool(&hidden, keep)?;
        if self.spec.train_text_encoder {
            Ok(pooled)
        } else {
            Ok(pooled.detach())
        }
    }

    /// L2-normalised text embeddings `(b, p)` in the shared space; `rng` draws the dropout
    /// mask while training (`None`: evaluation).
    pub fn embed_text(
        &self,
        ids: &Tensor,
        keep: &Tensor,
        rng: Option<&mut SplitMix64>,
    ) -> candle_core::Result<Tensor> {
        let pooled = self.pooled_text(ids, keep)?;
        let mask = self.dropout_mask(pooled.dim(0)?, rng)?;
        l2_normalized(&self.text_projection.forward(&pooled, mask.as_ref())?)
    }

    /// L2-normalised image embeddings `(b, p)` of frozen CLIP embeddings `(b, clip_dim)`.
    pub fn embed_image(
        &self,
        clip: &Tensor,
        rng: Option<&mut SplitMix64>,
    ) -> candle_core::Result<Tensor> {
        let clip = l2_normalized(clip)?;
        let mask = self.dropout_mask(clip.dim(0)?, rng)?;
        l2_normalized(&self.image_projection.forward(&clip, mask.as_ref())?)
    }

    /// Inverted dropout's mask `(b, p)`: each unit kept with probability `1 - p` and scaled by
    /// `1/(1 - p)`, drawn from `rng` (seeded, so training is reproducible).
    fn dropout_mask(
        &self,
        b: usize,
        rng: Option<&mut SplitMix64>,
    ) -> candle_core::Result<Option<Tensor>> {
        let p = self.spec.dropout;
        let Some(rng) = rng.filter(|_| p > 0.0) else {
            return Ok(None);
        };
        let n = b * self.spec.projection_dim;
        let scale = (1.0 / (1.0 - p)) as f32;
        let values: Vec<f32> = (0..n)
            .map(|_| if rng.unit_f64() < p { 0.0 } else { scale })
            .collect();
        Tensor::from_vec(values, (b, self.spec.projection_dim), &self.device).map(Some)
    }
}

/// `caption`'s ids under `tok` without special tokens, cut to `max_tokens`; `[pad]` when
/// it has none.
pub fn text_tokens(
    tok: &Tokenizer,
    pad: u32,
    caption: &str,
    max_tokens: usize,
) -> Result<Vec<u32>> {
    let mut ids = plain_ids(tok, caption)?;
    ids.truncate(max_tokens.max(1));
    if ids.is_empty() {
        ids.push(pad);
    }
    Ok(ids)
}

/// Checks that the text encoder's embedding has the shape its `config.json` says, so a
/// checkpoint of another hidden size is refused with that reason before anything is built.
fn check_shapes(weights: &Path, cfg: &Gpt2Config) -> Result<()> {
    let bad = |message: String| Error::BadFile {
        path: weights.to_path_buf(),
        message,
    };
    // SAFETY: the checkpoint is mapped read-only; only its header is read here.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(weights) }
        .map_err(|e| bad(e.to_string()))?;
    let wte = st
        .get("transformer.wte.weight")
        .or_else(|_| st.get("wte.weight"))
        .map_err(|_| bad("no tensor `wte.weight` in the checkpoint".into()))?;
    let dims = wte.shape().to_vec();
    let want = [cfg.vocab_size, cfg.n_embd];
    if dims != want {
        return Err(bad(format!(
            "tensor `wte.weight` is {dims:?}, the model (from config.json) needs {want:?}: a hidden size of {} against config.json's n_embd {}",
            dims.get(1).copied().unwrap_or(0),
            cfg.n_embd
        )));
    }
    Ok(())
}
