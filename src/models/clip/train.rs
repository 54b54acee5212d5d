//! CLIP as a trainable model: the checkpoint's tensors as variables, and the forward pass of
//! transformers' `CLIPModel` over them, differentiably (the inference model in [`super`] maps
//! frozen weights and runs fused kernels instead).

use std::collections::{BTreeMap, HashMap};
use std::sync::MutexGuard;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{LayerNorm, VarMap};

use crate::error::{CandleContext, Result};
use crate::kernels::{self, activate, QkvAttention, QuickGelu, WeightLayout};
use crate::models::clip::vision::patch_rows;
use crate::models::clip::{ClipModelFiles, HfClipConfig};
use crate::models::gpt2::train_norm;
use crate::models::tiny::F32Tensors;

/// CLIP's logit scale is clamped at ln 100 during training.
pub const MAX_LOGIT_SCALE: f64 = 4.605_170_185_988_091;

fn layer_norm(params: &TrainableClip, name: &str, eps: f64) -> candle_core::Result<LayerNorm> {
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

/// A CLIP checkpoint's tensors as trainable f32 variables under their Hugging Face names, with
/// a differentiable copy of transformers' `CLIPModel` forward pass over them (pre-norm
/// encoders, quick_gelu, CLS pooling for images, first-EOS pooling for texts). A test holds it
/// to the inference model, itself checked against transformers.
pub struct TrainableClip {
    /// Every tensor of the checkpoint, under its Hugging Face name.
    pub map: VarMap,
    pub config: HfClipConfig,
}

impl TrainableClip {
    /// Every tensor of the checkpoint, as an f32 variable.
    pub fn load(files: &ClipModelFiles) -> Result<Self> {
        let config = HfClipConfig::from_file(&files.config)?;
        let map = VarMap::new();
        let during = format!("loading {}", files.weights.display());
        let loaded =
            candle_core::safetensors::load(&files.weights, &Device::Cpu).during(&during)?;
        let mut data = lock(&map).during(&during)?;
        for (name, t) in loaded {
            let var = t.to_dtype(DType::F32).and_then(|t| Var::from_tensor(&t));
            data.insert(name, var.during(&during)?);
        }
        drop(data);
        Ok(Self { map, config })
    }

    pub fn get(&self, name: &str) -> candle_core::Result<Tensor> {
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

    /// `get_image_features` of `n` preprocessed CHW images, differentiably.
    pub fn image_features(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let (params, v) = (self, &self.config.vision_config);
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
    pub fn text_features(
        &self,
        ids: &[Vec<u32>],
        pool_at: &[usize],
    ) -> candle_core::Result<Tensor> {
        let (params, tc) = (self, &self.config.text_config);
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

    /// Keeps `logit_scale` at or below ln 100, as CLIP's training does.
    pub fn clamp_logit_scale(&self) -> candle_core::Result<()> {
        if let Some(var) = lock(&self.map)?.get("logit_scale") {
            let value = var.as_tensor().to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if value > MAX_LOGIT_SCALE {
                var.set(&Tensor::new(MAX_LOGIT_SCALE as f32, &Device::Cpu)?)?;
            }
        }
        Ok(())
    }

    /// `exp(logit_scale)`: the scale of the similarity logits.
    pub fn logit_scale(&self) -> candle_core::Result<Tensor> {
        self.get("logit_scale")?.exp()
    }

    /// Every tensor, by name, as f32 values with its shape (sorted by name): what
    /// [`crate::models::tiny::save_safetensors`] writes as a checkpoint.
    pub fn tensors(&self) -> candle_core::Result<F32Tensors> {
        let mut out = BTreeMap::new();
        for (name, var) in lock(&self.map)?.iter() {
            let t = var.as_tensor();
            out.insert(
                name.clone(),
                (t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?),
            );
        }
        Ok(out)
    }
}

/// One pre-norm encoder (`{prefix}.encoder.layers.*`) over `x` `(b, t, h)`.
fn encoder(
    params: &TrainableClip,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::clip::ClipEmbedder;

    use crate::testkit::max_abs_diff as max_diff;

    /// The differentiable forward pass is transformers' `CLIPModel`: on the HF-saved tiny
    /// checkpoint it gives what the inference model (itself checked against transformers'
    /// reference outputs) gives.
    #[test]
    fn training_forward_equals_the_inference_model_on_an_hf_checkpoint() {
        let files = ClipModelFiles::from_dir(&crate::hf_tiny_fixture("clip-tiny")).unwrap();
        let model = ClipEmbedder::load(&files, &Device::Cpu, DType::F32).unwrap();
        let clip = TrainableClip::load(&files).unwrap();
        let size = model.config.vision_config.image_size;
        let mut rng = crate::rng::SplitMix64::new(3);
        let flat: Vec<f32> = (0..3 * 3 * size * size)
            .map(|_| (rng.unit_f64() * 4.0 - 2.0) as f32)
            .collect();
        let pixels = Tensor::from_vec(flat.clone(), (3, 3, size, size), &Device::Cpu).unwrap();
        let want = model.embed_pixels(&flat, 3).unwrap();
        let got = clip.image_features(&pixels).unwrap();
        assert_eq!(got.dims(), want.dims());
        assert!(
            max_diff(&got, &want) < 1e-4,
            "image: {}",
            max_diff(&got, &want)
        );

        let captions = [
            "a red circle above a blue square",
            "two shapes",
            "a green triangle",
        ];
        let want = model.embed_texts(&captions).unwrap();
        let (ids, pool_at) = model.tokenize(&captions).unwrap();
        let got = clip.text_features(&ids, &pool_at).unwrap();
        assert!(
            max_diff(&got, &want) < 1e-4,
            "text: {}",
            max_diff(&got, &want)
        );
    }
}
