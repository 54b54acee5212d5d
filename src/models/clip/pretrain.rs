//! Contrastive pretraining of a CLIP checkpoint on the synthetic world (CLIP's symmetric
//! InfoNCE loss, with NegCLIP-style hard negatives), so that the embedded tiny CLIP grounds
//! colours, shapes and layout the way the real one grounds web images.
//!
//! A random CLIP's pooled image embedding carries little of an image's layout, and a
//! captioner conditioned on it cannot tell `a red circle above a blue square` from its
//! converse-false swap. Pretraining renders fresh scenes (never the dataset's own images) and
//! pulls each image towards its caption and away from the other captions of the batch and,
//! as a hard negative, from its own caption with subject and object exchanged, which names
//! the same shapes in the wrong places.
//!
//! The model here is a differentiable copy of the Hugging Face `CLIPModel` forward pass (pre-
//! norm encoders, quick_gelu, CLS pooling for images, first-EOS pooling for texts) over the
//! checkpoint's own tensor names; [`pretrain`] rewrites `model.safetensors` in place, and the
//! result loads through the ordinary checkpoint path. A test checks that both forward passes
//! agree.

use std::collections::{BTreeMap, HashMap};
use std::sync::MutexGuard;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{LayerNorm, VarMap};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::imaging::preprocess::preprocess_rgb;
use crate::kernels::{self, activate, QkvAttention, QuickGelu, WeightLayout};
use crate::models::clip::vision::patch_rows;
use crate::models::clip::{ClipEmbedder, ClipModelFiles, HfClipConfig};
use crate::models::gpt2::train_norm;
use crate::models::tiny::save_safetensors;
use crate::progress::Progress;
use crate::rng::SplitMix64;
use crate::synthetic::{self, Scene};
use crate::train::{clip_and_step, grad_norm, gradients, lr_at, AdamW, TrainConfig};

/// How the tiny CLIP is pretrained (`[embed.tiny_pretrain]`); `steps = 0` keeps it random.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    /// Optimizer steps, each on `batch_size` freshly rendered scenes.
    pub steps: usize,
    pub batch_size: usize,
    /// Peak learning rate (AdamW, linear warmup then cosine decay).
    pub lr: f64,
    pub warmup_steps: usize,
    /// Add each image's subject/object-swapped caption as an extra negative text.
    pub hard_negatives: bool,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            steps: 0,
            batch_size: 128,
            lr: 2e-3,
            warmup_steps: 20,
            hard_negatives: true,
        }
    }
}

/// What pretraining achieved, on held-out scenes rendered after training.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PretrainSummary {
    pub steps: usize,
    /// Loss of the first and the last step.
    pub first_loss: f64,
    pub last_loss: f64,
    /// Share of held-out images closer to their caption than to its subject/object swap.
    pub swap_accuracy: f64,
    /// Share of held-out images whose nearest caption, among those of all held-out images, is
    /// their own (or one with the same meaning).
    pub retrieval_at_1: f64,
}

/// Scale of CLIP's similarity logits is `exp(logit_scale)`, clamped at 100 as in CLIP.
const MAX_LOGIT_SCALE: f64 = 4.605_170_185_988_091;
/// Held-out scenes of the summary.
const EVAL_SCENES: usize = 256;

fn layer_norm(params: &Params, name: &str, eps: f64) -> candle_core::Result<LayerNorm> {
    Ok(LayerNorm::new(
        params.get(&format!("{name}.weight"))?,
        params.get(&format!("{name}.bias"))?,
        eps,
    ))
}

/// The variables of `map`, by name.
fn lock(map: &VarMap) -> candle_core::Result<MutexGuard<'_, HashMap<String, Var>>> {
    map.data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("var map lock poisoned".into()))
}

/// The checkpoint's tensors as trainable variables, by their Hugging Face names.
struct Params {
    map: VarMap,
}

impl Params {
    /// Every tensor of the checkpoint, as an f32 variable.
    fn load(files: &ClipModelFiles) -> Result<Self> {
        let map = VarMap::new();
        let loaded =
            candle_core::safetensors::load(&files.weights, &Device::Cpu).map_err(candle)?;
        let mut data = lock(&map).map_err(candle)?;
        for (name, t) in loaded {
            let var = t.to_dtype(DType::F32).and_then(|t| Var::from_tensor(&t));
            data.insert(name, var.map_err(candle)?);
        }
        drop(data);
        Ok(Self { map })
    }

    fn get(&self, name: &str) -> candle_core::Result<Tensor> {
        lock(&self.map)?
            .get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint has no tensor {name}")))
    }

    /// `x · wᵀ + b` on 2-D activations, with `name.weight` and `name.bias`.
    fn linear(&self, x: &Tensor, name: &str) -> candle_core::Result<Tensor> {
        kernels::linear(
            x,
            &self.get(&format!("{name}.weight"))?,
            &self.get(&format!("{name}.bias"))?,
            WeightLayout::OutIn,
        )
    }
}

/// One pre-norm encoder (`{prefix}.encoder.layers.*`) over `x` `(b, t, h)`.
fn encoder(
    params: &Params,
    prefix: &str,
    layers: usize,
    heads: usize,
    eps: f64,
    x: Tensor,
    mask: Option<Vec<f32>>,
) -> candle_core::Result<Tensor> {
    let (b, t, h) = x.dims3()?;
    let scale = ((h / heads) as f32).powf(-0.5);
    let mut x = x;
    for l in 0..layers {
        let p = format!("{prefix}.encoder.layers.{l}");
        let attn = format!("{p}.self_attn");
        let w = |n: &str| params.get(&format!("{attn}.{n}"));
        let qkv_w = Tensor::cat(
            &[
                w("q_proj.weight")?,
                w("k_proj.weight")?,
                w("v_proj.weight")?,
            ],
            0,
        )?;
        let qkv_b = Tensor::cat(
            &[w("q_proj.bias")?, w("k_proj.bias")?, w("v_proj.bias")?],
            0,
        )?;
        let normed = train_norm(&x, &layer_norm(params, &format!("{p}.layer_norm1"), eps)?)?
            .reshape((b * t, h))?;
        let qkv = kernels::linear(&normed, &qkv_w, &qkv_b, WeightLayout::OutIn)?.reshape((
            b,
            t,
            3 * h,
        ))?;
        let heads_out = qkv.contiguous()?.apply_op1(QkvAttention {
            heads,
            scale,
            mask: mask.clone(),
        })?;
        let attended =
            params.linear(&heads_out.reshape((b * t, h))?, &format!("{attn}.out_proj"))?;
        x = (x + attended.reshape((b, t, h))?)?;
        let normed = train_norm(&x, &layer_norm(params, &format!("{p}.layer_norm2"), eps)?)?
            .reshape((b * t, h))?;
        let up = params.linear(&normed, &format!("{p}.mlp.fc1"))?;
        let act = activate::<QuickGelu>(&up)?;
        let down = params.linear(&act, &format!("{p}.mlp.fc2"))?;
        x = (x + down.reshape((b, t, h))?)?;
    }
    Ok(x)
}

/// `get_image_features` of `n` preprocessed CHW images, differentiably.
fn image_features(
    params: &Params,
    cfg: &HfClipConfig,
    pixels: &Tensor,
) -> candle_core::Result<Tensor> {
    let v = &cfg.vision_config;
    let (n, c, s, _) = pixels.dims4()?;
    let (p, h) = (v.patch_size, v.hidden_size);
    let g = s / p;
    let patches = patch_rows(pixels, p)?;
    let kernel = params
        .get("vision_model.embeddings.patch_embedding.weight")?
        .reshape((h, c * p * p))?;
    let embedded = patches.matmul(&kernel.t()?)?.reshape((n, g * g, h))?;
    let class = params
        .get("vision_model.embeddings.class_embedding")?
        .reshape((1, 1, h))?
        .broadcast_as((n, 1, h))?;
    let x = Tensor::cat(&[&class, &embedded], 1)?
        .broadcast_add(&params.get("vision_model.embeddings.position_embedding.weight")?)?;
    let eps = v.layer_norm_eps;
    let x = train_norm(&x, &layer_norm(params, "vision_model.pre_layrnorm", eps)?)?;
    let x = encoder(
        params,
        "vision_model",
        v.num_hidden_layers,
        v.num_attention_heads,
        eps,
        x,
        None,
    )?;
    let pooled = x.narrow(1, 0, 1)?.squeeze(1)?;
    let pooled = train_norm(
        &pooled,
        &layer_norm(params, "vision_model.post_layernorm", eps)?,
    )?;
    pooled.matmul(&params.get("visual_projection.weight")?.t()?)
}

/// `get_text_features` of padded token ids `(b, t)` pooled at `pool_at`, differentiably.
fn text_features(
    params: &Params,
    cfg: &HfClipConfig,
    ids: &[Vec<u32>],
    pool_at: &[usize],
) -> candle_core::Result<Tensor> {
    let tc = &cfg.text_config;
    let (b, t, h) = (ids.len(), ids.first().map_or(0, Vec::len), tc.hidden_size);
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    let flat = Tensor::from_vec(flat, b * t, &Device::Cpu)?;
    let tokens = params
        .get("text_model.embeddings.token_embedding.weight")?
        .index_select(&flat, 0)?
        .reshape((b, t, h))?;
    let x = tokens.broadcast_add(
        &params
            .get("text_model.embeddings.position_embedding.weight")?
            .narrow(0, 0, t)?,
    )?;
    let neg = f32::MIN / 2.0;
    let causal: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { neg } else { 0.0 }))
        .collect();
    let mask = causal.repeat(b);
    let eps = tc.layer_norm_eps;
    let x = encoder(
        params,
        "text_model",
        tc.num_hidden_layers,
        tc.num_attention_heads,
        eps,
        x,
        Some(mask),
    )?;
    let rows: Vec<u32> = pool_at
        .iter()
        .enumerate()
        .map(|(i, &at)| (i * t + at) as u32)
        .collect();
    let pooled = x
        .reshape((b * t, h))?
        .index_select(&Tensor::from_vec(rows, b, &Device::Cpu)?, 0)?;
    let pooled = train_norm(
        &pooled,
        &layer_norm(params, "text_model.final_layer_norm", eps)?,
    )?;
    pooled.matmul(&params.get("text_projection.weight")?.t()?)
}

fn normalized(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

/// CLIP's symmetric loss over `n` images and `texts` (`n` captions, then any hard negatives):
/// images pick their caption among all texts, captions pick their image among all images.
fn clip_loss(params: &Params, images: &Tensor, texts: &Tensor) -> candle_core::Result<Tensor> {
    let n = images.dim(0)?;
    let scale = params.get("logit_scale")?.exp()?;
    let logits = normalized(images)?
        .matmul(&normalized(texts)?.t()?)?
        .broadcast_mul(&scale)?;
    let targets = Tensor::arange(0u32, n as u32, &Device::Cpu)?;
    let per_image = candle_nn::loss::cross_entropy(&logits, &targets)?;
    let per_text = candle_nn::loss::cross_entropy(&logits.narrow(1, 0, n)?.t()?, &targets)?;
    (per_image + per_text)? * 0.5
}

/// One batch of fresh scenes: layouts, preprocessed pixels `(n, 3, s, s)`.
fn render_batch(
    rng: &mut SplitMix64,
    n: usize,
    embedder: &ClipEmbedder,
) -> Result<(Vec<Scene>, Tensor)> {
    let size = embedder.config.vision_config.image_size;
    let mut scenes = Vec::with_capacity(n);
    let mut pixels = Vec::with_capacity(n * 3 * size * size);
    for _ in 0..n {
        let layout = synthetic::random_layout(rng);
        let img = synthetic::render(&layout, size as u32);
        let (w, h) = img.dimensions();
        pixels.extend(preprocess_rgb(
            img.as_raw(),
            w as usize,
            h as usize,
            &embedder.preprocess,
        )?);
        scenes.push(layout.scene);
    }
    let pixels = Tensor::from_vec(pixels, (n, 3, size, size), &Device::Cpu).map_err(candle)?;
    Ok((scenes, pixels))
}

/// The caption naming the same shapes with subject and object exchanged: false for the image.
fn swapped(scene: &Scene) -> Scene {
    Scene {
        subject: scene.object,
        relation: scene.relation,
        object: scene.subject,
    }
}

fn candle(e: candle_core::Error) -> Error {
    Error::Candle {
        context: "tiny CLIP pretraining".into(),
        source: e,
    }
}

/// Pretrains the checkpoint in `files` on rendered synthetic scenes and rewrites its
/// `model.safetensors` (atomically). Deterministic for a given checkpoint, config and seed.
pub fn pretrain(
    files: &ClipModelFiles,
    cfg: &PretrainConfig,
    seed: u64,
) -> Result<PretrainSummary> {
    let embedder = ClipEmbedder::load(files, &Device::Cpu, DType::F32)?;
    let config = embedder.config.clone();
    let params = Params::load(files)?;
    let train = TrainConfig {
        lr: cfg.lr,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        ..TrainConfig::default()
    };
    let mut opt = AdamW::new(&params.map).map_err(candle)?;
    let vars = opt.var_list();
    let mut rng = SplitMix64::derived(seed, "tiny-clip-pretrain");
    let progress = Progress::new("pretrain tiny CLIP", "steps", Some(cfg.steps as u64));
    let mut summary = PretrainSummary {
        steps: cfg.steps,
        ..PretrainSummary::default()
    };
    for step in 0..cfg.steps {
        let (scenes, pixels) = render_batch(&mut rng, cfg.batch_size, &embedder)?;
        let mut captions: Vec<String> = scenes.iter().map(synthetic::caption).collect();
        if cfg.hard_negatives {
            captions.extend(scenes.iter().map(|s| synthetic::caption(&swapped(s))));
        }
        let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
        let (ids, pool_at) = embedder.tokenize(&refs)?;
        let loss = (|| {
            let images = image_features(&params, &config, &pixels)?;
            let texts = text_features(&params, &config, &ids, &pool_at)?;
            clip_loss(&params, &images, &texts)
        })()
        .map_err(candle)?;
        let value = f64::from(loss.to_scalar::<f32>().map_err(candle)?);
        if !value.is_finite() {
            return Err(Error::Invalid(format!(
                "tiny CLIP pretraining: loss became {value} at step {step}"
            )));
        }
        if step == 0 {
            summary.first_loss = value;
        }
        summary.last_loss = value;
        let store = loss.backward().map_err(candle)?;
        let grads = gradients(&store, &vars);
        let norm = grad_norm(&grads).map_err(candle)?;
        let lr = lr_at(step, cfg.steps, cfg.warmup_steps, cfg.lr);
        clip_and_step(&mut opt, &grads, norm, lr, &train).map_err(candle)?;
        clamp_logit_scale(&params).map_err(candle)?;
        progress.inc(1);
    }
    progress.finish(&format!(
        "loss {:.3} → {:.3}",
        summary.first_loss, summary.last_loss
    ));
    let mut tensors = BTreeMap::new();
    {
        for (name, var) in lock(&params.map).map_err(candle)?.iter() {
            let t = var.as_tensor();
            let values = t
                .flatten_all()
                .and_then(|f| f.to_vec1::<f32>())
                .map_err(candle)?;
            tensors.insert(name.clone(), (t.dims().to_vec(), values));
        }
    }
    (summary.swap_accuracy, summary.retrieval_at_1) = evaluate(&params, &config, &embedder, seed)?;
    // The embedder maps the old weights file: let it go before the file is replaced.
    drop(embedder);
    save_safetensors(&files.weights, &tensors)?;
    Ok(summary)
}

/// Swap accuracy and retrieval@1 on [`EVAL_SCENES`] scenes the training never saw.
fn evaluate(
    params: &Params,
    config: &HfClipConfig,
    embedder: &ClipEmbedder,
    seed: u64,
) -> Result<(f64, f64)> {
    let mut rng = SplitMix64::derived(seed, "tiny-clip-pretrain-eval");
    let (scenes, pixels) = render_batch(&mut rng, EVAL_SCENES, embedder)?;
    let captions: Vec<String> = scenes
        .iter()
        .map(synthetic::caption)
        .chain(scenes.iter().map(|s| synthetic::caption(&swapped(s))))
        .collect();
    let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
    let (ids, pool_at) = embedder.tokenize(&refs)?;
    let sims = (|| {
        let images = normalized(&image_features(params, config, &pixels)?)?;
        let texts = normalized(&text_features(params, config, &ids, &pool_at)?)?;
        images.matmul(&texts.t()?)?.to_vec2::<f32>()
    })()
    .map_err(candle)?;
    let n = scenes.len();
    let mut swap_right = 0usize;
    let mut retrieved = 0usize;
    for (i, row) in sims.iter().enumerate() {
        swap_right += usize::from(row[i] > row[n + i]);
        let best = (0..n)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap_or(i);
        retrieved += usize::from(scenes[best].same_meaning(&scenes[i]));
    }
    Ok((swap_right as f64 / n as f64, retrieved as f64 / n as f64))
}

/// Keeps `logit_scale` at or below ln 100, as CLIP's training does.
fn clamp_logit_scale(params: &Params) -> candle_core::Result<()> {
    if let Some(var) = lock(&params.map)?.get("logit_scale") {
        let value = var.as_tensor().to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if value > MAX_LOGIT_SCALE {
            var.set(&Tensor::new(MAX_LOGIT_SCALE as f32, &Device::Cpu)?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    use crate::models::tiny::{ensure_tiny_clip, TinyClipSpec};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .unwrap()
    }

    /// The differentiable forward pass is transformers' `CLIPModel`: on the HF-saved tiny
    /// checkpoint it gives what the inference model (itself checked against transformers'
    /// reference outputs) gives.
    #[test]
    fn training_forward_equals_the_inference_model_on_an_hf_checkpoint() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-tiny/clip-tiny");
        let files = ClipModelFiles::from_dir(&dir).unwrap();
        let model = ClipEmbedder::load(&files, &Device::Cpu, DType::F32).unwrap();
        let params = Params::load(&files).unwrap();
        let mut rng = SplitMix64::new(3);
        let (scenes, pixels) = render_batch(&mut rng, 3, &model).unwrap();
        let flat: Vec<f32> = pixels.flatten_all().unwrap().to_vec1().unwrap();
        let want = model.embed_pixels(&flat, 3).unwrap();
        let got = image_features(&params, &model.config, &pixels).unwrap();
        assert_eq!(got.dims(), want.dims());
        assert!(
            max_diff(&got, &want) < 1e-4,
            "image: {}",
            max_diff(&got, &want)
        );

        let captions: Vec<String> = scenes.iter().map(synthetic::caption).collect();
        let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
        let want = model.embed_texts(&refs).unwrap();
        let (ids, pool_at) = model.tokenize(&refs).unwrap();
        let got = text_features(&params, &model.config, &ids, &pool_at).unwrap();
        assert!(
            max_diff(&got, &want) < 1e-4,
            "text: {}",
            max_diff(&got, &want)
        );
    }

    fn small(steps: usize) -> TinyClipSpec {
        TinyClipSpec {
            image_size: 32,
            vision_hidden: 32,
            text_hidden: 32,
            projection_dim: 16,
            pretrain: PretrainConfig {
                steps,
                batch_size: 16,
                warmup_steps: 2,
                ..PretrainConfig::default()
            },
            ..TinyClipSpec::default()
        }
    }

    /// Pretraining lowers the contrastive loss, is byte-for-byte deterministic, and its
    /// checkpoint loads through the ordinary path and embeds as the trained parameters do.
    #[test]
    fn pretraining_is_deterministic_lowers_the_loss_and_saves_a_loadable_checkpoint() {
        let (a, b, raw) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        ensure_tiny_clip(a.path(), &small(40)).unwrap();
        ensure_tiny_clip(b.path(), &small(40)).unwrap();
        ensure_tiny_clip(raw.path(), &small(0)).unwrap();
        let bytes = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
        assert_eq!(bytes(a.path()), bytes(b.path()));
        assert_ne!(bytes(a.path()), bytes(raw.path()));
        assert!(!raw.path().join("pretrain.json").exists());

        let summary: PretrainSummary =
            serde_json::from_slice(&std::fs::read(a.path().join("pretrain.json")).unwrap())
                .unwrap();
        assert_eq!(summary.steps, 40);
        assert!(
            summary.last_loss < 0.9 * summary.first_loss,
            "loss {} -> {}",
            summary.first_loss,
            summary.last_loss
        );
        assert!((0.0..=1.0).contains(&summary.swap_accuracy));

        let files = ClipModelFiles::from_dir(a.path()).unwrap();
        let model = ClipEmbedder::load(&files, &Device::Cpu, DType::F32).unwrap();
        let params = Params::load(&files).unwrap();
        let (_, pixels) = render_batch(&mut SplitMix64::new(9), 2, &model).unwrap();
        let flat: Vec<f32> = pixels.flatten_all().unwrap().to_vec1().unwrap();
        let want = model.embed_pixels(&flat, 2).unwrap();
        let got = image_features(&params, &model.config, &pixels).unwrap();
        assert!(max_diff(&got, &want) < 1e-4);
    }
}
