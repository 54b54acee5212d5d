//! The CLIP embedding model: Hugging Face `config.json`, weights memory-mapped from
//! `model.safetensors`, the real tokenizer, prefcap's own vision tower (`clip::vision`) and
//! candle-transformers' text tower with pooling at the first end-of-text token as
//! transformers does.

pub mod train;
pub mod vision;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationParams, TruncationStrategy};

use crate::data::hub::HubClient;
use crate::error::{CandleContext, Error, IoContext, Result};
use crate::imaging::preprocess::{ClipPreprocessConfig, PixelTable};
use crate::models::clip::vision::VisionTower;

/// `config.json` of a Hugging Face `CLIPModel`. Missing keys take transformers' defaults,
/// which are those of openai/clip-vit-base-patch32.
#[derive(Debug, Clone, Deserialize)]
pub struct HfClipConfig {
    #[serde(default = "defaults::projection_dim")]
    pub projection_dim: usize,
    #[serde(default = "defaults::logit_scale")]
    pub logit_scale_init_value: f32,
    #[serde(default)]
    pub text_config: HfTextConfig,
    #[serde(default)]
    pub vision_config: HfVisionConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct HfTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub eos_token_id: u32,
}

impl Default for HfTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct HfVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for HfVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

mod defaults {
    pub fn projection_dim() -> usize {
        512
    }
    pub fn logit_scale() -> f32 {
        2.6592
    }
}

impl HfClipConfig {
    /// `(tokens, hidden)` of the vision tower's last hidden states: the class token plus
    /// one per patch (50 × 768 for ViT-B/32).
    pub fn token_shape(&self) -> (usize, usize) {
        let v = &self.vision_config;
        let g = v.image_size / v.patch_size.max(1);
        (g * g + 1, v.hidden_size)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).at(path)?;
        serde_json::from_slice(&bytes).map_err(|e| Error::BadFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// openai/clip-vit-base-patch32 (the default model), for shape tests and benchmarks.
    pub fn vit_base_patch32() -> Self {
        Self {
            projection_dim: 512,
            logit_scale_init_value: 2.6592,
            text_config: HfTextConfig::default(),
            vision_config: HfVisionConfig::default(),
        }
    }

    /// candle's towers implement quick_gelu and LayerNorm eps 1e-5 only: refuse anything else
    /// instead of computing different numbers.
    fn check_supported(&self, origin: &str) -> Result<()> {
        for (tower, act, eps) in [
            (
                "text_config",
                &self.text_config.hidden_act,
                self.text_config.layer_norm_eps,
            ),
            (
                "vision_config",
                &self.vision_config.hidden_act,
                self.vision_config.layer_norm_eps,
            ),
        ] {
            if act != "quick_gelu" {
                return Err(Error::Config(format!(
                    "{origin}: {tower}.hidden_act `{act}` is not supported (quick_gelu only)"
                )));
            }
            if (eps - 1e-5).abs() > 1e-12 {
                return Err(Error::Config(format!(
                    "{origin}: {tower}.layer_norm_eps {eps} is not supported (1e-5 only)"
                )));
            }
        }
        Ok(())
    }

    fn text(&self) -> ClipTextConfig {
        let t = &self.text_config;
        ClipTextConfig {
            vocab_size: t.vocab_size,
            embed_dim: t.hidden_size,
            activation: Activation::QuickGelu,
            intermediate_size: t.intermediate_size,
            max_position_embeddings: t.max_position_embeddings,
            pad_with: None,
            num_hidden_layers: t.num_hidden_layers,
            num_attention_heads: t.num_attention_heads,
            projection_dim: self.projection_dim,
        }
    }
}

/// The files of one CLIP checkpoint, local or fetched from the hub, with their provenance.
#[derive(Debug, Clone)]
pub struct ClipModelFiles {
    /// Repo id or local directory, as the user named it.
    pub model_id: String,
    /// Commit hash (hub) or `local` (a directory).
    pub revision: String,
    pub config: PathBuf,
    pub weights: PathBuf,
    pub tokenizer: PathBuf,
    pub preprocessor: PathBuf,
}

impl ClipModelFiles {
    /// A local directory holding `config.json`, `model.safetensors`, `tokenizer.json` and
    /// `preprocessor_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let files = Self {
            model_id: dir.display().to_string(),
            revision: "local".into(),
            config: dir.join("config.json"),
            weights: dir.join("model.safetensors"),
            tokenizer: dir.join("tokenizer.json"),
            preprocessor: dir.join("preprocessor_config.json"),
        };
        for p in [
            &files.config,
            &files.weights,
            &files.tokenizer,
            &files.preprocessor,
        ] {
            if !p.is_file() {
                return Err(Error::Config(format!(
                    "CLIP model directory {}: missing {} (need config.json, model.safetensors, tokenizer.json, preprocessor_config.json)",
                    dir.display(),
                    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
                )));
            }
        }
        Ok(files)
    }

    /// `model` is a local directory if one exists at that path, else a hub repo id fetched at
    /// `revision` through hf-hub.
    pub fn resolve(
        model: &str,
        revision: &str,
        hub: impl FnOnce() -> Result<HubClient>,
    ) -> Result<Self> {
        let dir = Path::new(model);
        if dir.is_dir() {
            return Self::from_dir(dir);
        }
        let hub = hub()?;
        let fetch = |name: &str| hub.model_file(model, revision, name);
        let config = fetch("config.json")?;
        Ok(Self {
            model_id: model.to_string(),
            revision: config.commit.clone(),
            config: config.local,
            weights: fetch("model.safetensors")?.local,
            tokenizer: fetch("tokenizer.json")?.local,
            preprocessor: fetch("preprocessor_config.json")?.local,
        })
    }

    /// sha256 of the weights file: part of every feature-cache key, so changed weights
    /// never reuse old embeddings even under the same name.
    pub fn weights_sha256(&self) -> Result<String> {
        crate::io::sha256_file(&self.weights)
    }
}

/// CLIP image and text towers with their projections, ready to embed.
pub struct ClipEmbedder {
    vision: VisionTower,
    text: ClipTextTransformer,
    text_projection: candle_nn::Linear,
    tokenizer: Tokenizer,
    pub config: HfClipConfig,
    pub preprocess: ClipPreprocessConfig,
    /// The normalised value of every byte per channel, on the CPU and (768 f32) on the device.
    pixel_table: (PixelTable, Tensor),
    device: Device,
    dtype: DType,
}

impl ClipEmbedder {
    /// Loads a checkpoint; the weights are memory-mapped, not read into memory.
    pub fn load(files: &ClipModelFiles, device: &Device, dtype: DType) -> Result<Self> {
        let preprocess = ClipPreprocessConfig::from_file(&files.preprocessor)?;
        Self::load_with(files, preprocess, device, dtype)
    }

    /// [`Self::load`] with the image preprocessing given (the checkpoint's, resolved).
    pub fn load_with(
        files: &ClipModelFiles,
        preprocess: ClipPreprocessConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let config = HfClipConfig::from_file(&files.config)?;
        config.check_supported(&files.config.display().to_string())?;
        preprocess.check().map_err(|message| Error::BadFile {
            path: files.preprocessor.clone(),
            message,
        })?;
        if preprocess.output_size() != Some(config.vision_config.image_size as u32) {
            return Err(Error::Config(format!(
                "{}: preprocessing yields {}×{} pixels but the model's image_size is {}",
                files.preprocessor.display(),
                preprocess.crop_height,
                preprocess.crop_width,
                config.vision_config.image_size
            )));
        }
        let candle_err = format!("loading {}", files.weights.display());
        // SAFETY: the file is mapped read-only; prefcap never writes a checkpoint it has mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&files.weights], dtype, device) }
            .during(candle_err.as_str())?;
        Self::from_var_builder(
            vb,
            config,
            preprocess,
            load_tokenizer(&files.tokenizer, 0)?,
            device,
            dtype,
        )
        .during(candle_err.as_str())
    }

    /// Builds the model from any VarBuilder (a checkpoint, or random weights for shape tests).
    pub fn from_var_builder(
        vb: VarBuilder,
        config: HfClipConfig,
        preprocess: ClipPreprocessConfig,
        mut tokenizer: Tokenizer,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<Self> {
        let text_cfg = config.text();
        let vision = VisionTower::new(vb.clone(), &config)?;
        let text = ClipTextTransformer::new(vb.pp("text_model"), &text_cfg)?;
        let text_projection = candle_nn::linear_no_bias(
            text_cfg.embed_dim,
            config.projection_dim,
            vb.pp("text_projection"),
        )?;
        set_truncation(&mut tokenizer, config.text_config.max_position_embeddings)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let table = PixelTable::new(&preprocess);
        let table_on_device = Tensor::new(table.values.as_slice(), device)?;
        Ok(Self {
            vision,
            text,
            text_projection,
            tokenizer,
            config,
            preprocess,
            pixel_table: (table, table_on_device),
            device: device.clone(),
            dtype,
        })
    }

    pub fn dim(&self) -> usize {
        self.config.projection_dim
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Image embeddings (`get_image_features`, not normalised) of preprocessed CHW pixels.
    /// `pixels` holds `n` images back to back.
    pub fn embed_pixels(&self, pixels: &[f32], n: usize) -> candle_core::Result<Tensor> {
        self.embed_pixel_batch(pixels.to_vec(), n)
    }

    /// [`embed_pixels`](Self::embed_pixels) of a batch the caller hands over: on the CPU the
    /// buffer becomes the input tensor without a copy.
    pub fn embed_pixel_batch(&self, pixels: Vec<f32>, n: usize) -> candle_core::Result<Tensor> {
        let s = self.config.vision_config.image_size;
        let x = Tensor::from_vec(pixels, (n, 3, s, s), &Device::Cpu)?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        self.embed_pixel_tensor(&x)
    }

    /// The model's input `[n, 3, size, size]` (on its device, in its dtype) from `n` images
    /// of resized and cropped CHW bytes ([`decode_crop`](crate::imaging::preprocess::decode_crop)).
    /// On a GPU the bytes are uploaded, a quarter of the f32 pixels, and rescaled and
    /// normalised there by table lookup; on the CPU the lookup runs on all threads. Either way
    /// the pixels are bit for bit those of [`preprocess_bytes`](crate::imaging::preprocess::preprocess_bytes).
    pub fn pixel_input(&self, bytes: Vec<u8>, n: usize) -> candle_core::Result<Tensor> {
        let s = self.config.vision_config.image_size;
        if bytes.len() != n * 3 * s * s {
            candle_core::bail!(
                "{} bytes are not {n} images of 3×{s}×{s} pixels",
                bytes.len()
            );
        }
        if self.device.is_cpu() {
            use rayon::prelude::*;
            let table = &self.pixel_table.0;
            let mut pixels = vec![0f32; bytes.len()];
            pixels
                .par_chunks_mut(3 * s * s)
                .zip(bytes.par_chunks(3 * s * s))
                .for_each(|(out, img)| table.normalise_planes(img, out, s * s));
            return Tensor::from_vec(pixels, (n, 3, s, s), &self.device)?.to_dtype(self.dtype);
        }
        let x = Tensor::from_vec(bytes, (n, 3, s, s), &Device::Cpu)?.to_device(&self.device)?;
        self.normalise_bytes(&x)?.to_dtype(self.dtype)
    }

    /// Table lookup of byte pixels `[n, 3, h, w]` (any device): entry `c·256 + v` for byte
    /// `v` of channel `c`.
    fn normalise_bytes(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let offsets = Tensor::new(&[0u32, 256, 512], x.device())?.reshape((1, 3, 1, 1))?;
        let ids = x.to_dtype(DType::U32)?.broadcast_add(&offsets)?;
        self.pixel_table
            .1
            .to_device(x.device())?
            .index_select(&ids.flatten_all()?, 0)?
            .reshape(x.shape())
    }

    /// `(tokens, hidden)` of [`Self::image_tokens_tensor`]: the class token and one per
    /// patch, of the vision tower's width.
    pub fn token_shape(&self) -> (usize, usize) {
        self.config.token_shape()
    }

    /// Image tokens `[n, tokens · hidden]` f32 of a pixel tensor (as
    /// [`Self::embed_pixel_tensor`]): the last hidden states after the post-layernorm,
    /// flattened per image.
    pub fn image_tokens_tensor(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.vision
            .forward_tokens(x)?
            .flatten_from(1)?
            .to_dtype(DType::F32)
    }

    /// Image embeddings of a pixel tensor `[n, 3, size, size]` already on the model's
    /// device and in its dtype.
    pub fn embed_pixel_tensor(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.vision.forward(x)?.to_dtype(DType::F32)
    }

    /// Seconds spent per stage of the vision tower over `runs` forward passes of `x`, the
    /// device synchronised at every stage boundary, in the order the stages first ran.
    pub fn profile_pixel_tensor(
        &self,
        x: &Tensor,
        runs: usize,
    ) -> candle_core::Result<Vec<(&'static str, f64)>> {
        let mut spent: Vec<(&'static str, f64)> = Vec::new();
        for _ in 0..runs {
            self.device.synchronize()?;
            let mut mark = std::time::Instant::now();
            self.vision.forward_observed(x, &mut |stage| {
                self.device.synchronize()?;
                let dt = mark.elapsed().as_secs_f64();
                mark = std::time::Instant::now();
                match spent.iter_mut().find(|(s, _)| *s == stage) {
                    Some((_, t)) => *t += dt,
                    None => spent.push((stage, dt)),
                }
                Ok(())
            })?;
        }
        Ok(spent)
    }

    /// Multiply-adds ×2 of one image's forward pass (patch embedding, encoder, projection),
    /// for reporting achieved FLOP/s.
    pub fn image_flops(&self) -> f64 {
        let v = &self.config.vision_config;
        let (h, im, p) = (
            v.hidden_size as f64,
            v.intermediate_size as f64,
            v.patch_size as f64,
        );
        let patches = ((v.image_size / v.patch_size) as f64).powi(2);
        let tokens = patches + 1.0;
        let per_layer = tokens * (4.0 * h * h + 2.0 * h * im) + 2.0 * tokens * tokens * h;
        let macs = patches * v.num_channels as f64 * p * p * h
            + v.num_hidden_layers as f64 * per_layer
            + h * self.config.projection_dim as f64;
        2.0 * macs
    }

    /// Token ids of `texts` (BOS … EOS, truncated to the model's positions), padded with EOS to
    /// the longest, and the position of each row's first EOS.
    pub fn tokenize(&self, texts: &[&str]) -> Result<(Vec<Vec<u32>>, Vec<usize>)> {
        let enc = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::Config(format!("tokenizing failed: {e}")))?;
        let eos = self.config.text_config.eos_token_id;
        let len = enc.iter().map(|e| e.get_ids().len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(enc.len());
        let mut pool_at = Vec::with_capacity(enc.len());
        for e in &enc {
            let mut row = e.get_ids().to_vec();
            row.resize(len, if eos == 2 { 0 } else { eos });
            pool_at.push(pool_position(&row, eos));
            ids.push(row);
        }
        Ok((ids, pool_at))
    }

    /// Text embeddings (`get_text_features`, not normalised).
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Tensor> {
        let (ids, pool_at) = self.tokenize(texts)?;
        self.embed_token_ids(&ids, &pool_at)
            .during("CLIP text embeddings")
    }

    /// L2-normalised text embeddings of `texts`, computed in chunks of 256.
    pub fn embed_texts_normalized(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(256) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let e = l2_normalize(&self.embed_texts(&refs)?)
                .and_then(|t| t.to_vec2::<f32>())
                .during("normalising CLIP text embeddings")?;
            out.extend(e);
        }
        Ok(out)
    }

    pub fn embed_token_ids(
        &self,
        ids: &[Vec<u32>],
        pool_at: &[usize],
    ) -> candle_core::Result<Tensor> {
        let (b, len) = (ids.len(), ids.first().map_or(0, Vec::len));
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let input = Tensor::from_vec(flat, (b, len), &self.device)?;
        let hidden = self.text.forward_with_mask(&input, usize::MAX)?;
        let pooled: Vec<Tensor> = pool_at
            .iter()
            .enumerate()
            .map(|(row, &at)| hidden.i((row, at)))
            .collect::<candle_core::Result<_>>()?;
        Tensor::stack(&pooled, 0)?
            .apply(&self.text_projection)?
            .to_dtype(DType::F32)
    }
}

/// Where transformers pools a text: the first `eos` token, or — for legacy configs whose
/// `eos_token_id` is 2 — the highest token id (OpenAI's EOS is the last vocabulary entry).
pub fn pool_position(ids: &[u32], eos: u32) -> usize {
    if eos == 2 {
        let max = ids.iter().copied().max().unwrap_or(0);
        ids.iter().position(|&t| t == max).unwrap_or(0)
    } else {
        ids.iter()
            .position(|&t| t == eos)
            .unwrap_or(ids.len().saturating_sub(1))
    }
}

/// Reads `tokenizer.json`; `max_len` > 0 sets truncation.
pub fn load_tokenizer(path: &Path, max_len: usize) -> Result<Tokenizer> {
    let mut tok = Tokenizer::from_file(path).map_err(|e| Error::BadFile {
        path: path.to_path_buf(),
        message: format!("not a tokenizers file: {e}"),
    })?;
    if max_len > 0 {
        set_truncation(&mut tok, max_len)?;
    }
    Ok(tok)
}

fn set_truncation(tok: &mut Tokenizer, max_len: usize) -> Result<()> {
    tok.with_padding(None);
    tok.with_truncation(Some(TruncationParams {
        max_length: max_len,
        strategy: TruncationStrategy::LongestFirst,
        ..Default::default()
    }))
    .map_err(|e| Error::Config(format!("tokenizer truncation: {e}")))?;
    Ok(())
}

/// Rows of `t` divided by their L2 norm.
pub fn l2_normalize(t: &Tensor) -> candle_core::Result<Tensor> {
    t.broadcast_div(&t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::npy::read_npy;

    fn fixture(p: &str) -> PathBuf {
        crate::hf_tiny_fixture(p)
    }

    fn reference() -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(fixture("reference/clip-embed.json")).unwrap())
            .unwrap()
    }

    fn rows(v: &serde_json::Value) -> Vec<Vec<f32>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect()
    }

    fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn tiny() -> ClipEmbedder {
        let files = ClipModelFiles::from_dir(&fixture("clip-tiny")).unwrap();
        ClipEmbedder::load(&files, &Device::Cpu, DType::F32).unwrap()
    }

    #[test]
    fn image_embeddings_match_transformers_from_pixel_values() {
        let model = tiny();
        let pv = read_npy(&fixture("reference/clip/pixel_values.npy")).unwrap();
        assert_eq!(pv.shape, vec![4, 3, 32, 32]);
        let emb = l2_normalize(&model.embed_pixels(&pv.data, 4).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let diff = max_abs_diff(&emb, &rows(&reference()["image_embeds"]));
        assert!(diff < 1e-4, "max abs diff {diff}");
    }

    /// The image tokens `embed.image_tokens` caches equal transformers'
    /// `post_layernorm(vision_model(pixels).last_hidden_state)`
    /// (`tests/fixtures/clip-tokens/make_reference.py`), the class token first.
    #[test]
    fn image_tokens_match_transformers_last_hidden_state_after_the_post_layernorm() {
        let model = tiny();
        assert_eq!(model.token_shape(), (17, 32));
        let pv = read_npy(&fixture("reference/clip/pixel_values.npy")).unwrap();
        let x = Tensor::from_vec(pv.data, (4, 3, 32, 32), &Device::Cpu).unwrap();
        let got = model.image_tokens_tensor(&x).unwrap();
        assert_eq!(got.dims(), &[4, 17 * 32]);
        let want = read_npy(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip-tokens/tokens.npy"),
        )
        .unwrap();
        assert_eq!(want.shape, vec![4, 17, 32]);
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let diff = got
            .iter()
            .zip(&want.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "max abs diff {diff}");
    }

    #[test]
    fn byte_pixels_become_transformers_pixel_values_on_every_path() {
        use crate::imaging::preprocess::{decode_crop, preprocess_bytes};
        let model = tiny();
        let pv = read_npy(&fixture("reference/clip/pixel_values.npy")).unwrap();
        let (mut bytes, mut floats) = (Vec::new(), Vec::new());
        for i in 0..4 {
            let png = std::fs::read(fixture(&format!("images/img{i}.png"))).unwrap();
            bytes.extend(decode_crop(&png, &model.preprocess).unwrap());
            floats.extend(preprocess_bytes(&png, &model.preprocess).unwrap());
        }
        // The PNGs (67×45, 50×80, 32×32, 300×200) are resized and cropped as transformers
        // (PIL) does: the same pixel values, to f32 rounding.
        let diff = floats
            .iter()
            .zip(&pv.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-6, "max abs diff from pixel_values.npy {diff}");
        // The CPU lookup and the tensor lookup a GPU runs give the same bits.
        let on_cpu = model.pixel_input(bytes.clone(), 4).unwrap();
        assert_eq!(
            on_cpu.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            floats
        );
        let x = Tensor::from_vec(bytes.clone(), (4, 3, 32, 32), &Device::Cpu).unwrap();
        let by_tensor = model.normalise_bytes(&x).unwrap();
        assert_eq!(
            by_tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            floats
        );
        let err = model.pixel_input(bytes[1..].to_vec(), 4).unwrap_err();
        assert!(err.to_string().contains("not 4 images of 3×32×32"), "{err}");
    }

    #[test]
    fn image_embeddings_match_transformers_from_png_files() {
        let model = tiny();
        let mut pixels = Vec::new();
        for i in 0..4 {
            let bytes = std::fs::read(fixture(&format!("images/img{i}.png"))).unwrap();
            pixels.extend(
                crate::imaging::preprocess::preprocess_bytes(&bytes, &model.preprocess).unwrap(),
            );
        }
        let raw = model.embed_pixels(&pixels, 4).unwrap();
        let norms: Vec<f32> = raw
            .sqr()
            .unwrap()
            .sum(1)
            .unwrap()
            .sqrt()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want_norms: Vec<f32> =
            rows(&serde_json::json!([reference()["image_embeds_raw_norm"]])).remove(0);
        for (n, w) in norms.iter().zip(&want_norms) {
            assert!((n - w).abs() < 1e-4 * w.max(1.0), "raw norm {n} vs {w}");
        }
        let emb = l2_normalize(&raw).unwrap().to_vec2::<f32>().unwrap();
        let diff = max_abs_diff(&emb, &rows(&reference()["image_embeds"]));
        assert!(diff < 1e-4, "max abs diff {diff}");
    }

    #[test]
    fn tokenizer_and_text_embeddings_match_transformers() {
        let model = tiny();
        let r = reference();
        let texts: Vec<&str> = r["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        let (ids, _) = model.tokenize(&texts).unwrap();
        let want_ids: Vec<Vec<u32>> = r["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect();
        assert_eq!(ids, want_ids);
        let emb = l2_normalize(&model.embed_texts(&texts).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let diff = max_abs_diff(&emb, &rows(&r["text_embeds"]));
        assert!(diff < 1e-4, "max abs diff {diff}");
    }

    #[test]
    fn long_texts_are_truncated_to_the_position_limit_and_end_in_eos() {
        let model = tiny();
        let long = "word ".repeat(200);
        let (ids, pool) = model.tokenize(&[long.as_str(), "short"]).unwrap();
        assert_eq!(ids[0].len(), 77);
        assert_eq!(*ids[0].last().unwrap(), 49407);
        assert_eq!(pool, vec![76, 2]);
        assert_eq!(
            model.embed_texts(&[long.as_str()]).unwrap().dims(),
            &[1, 16]
        );
    }

    #[test]
    fn pooling_follows_transformers_for_modern_and_legacy_configs() {
        assert_eq!(pool_position(&[49406, 5, 6, 49407, 49407], 49407), 3);
        assert_eq!(pool_position(&[49406, 5, 49407, 0, 0], 2), 2);
        assert_eq!(pool_position(&[1, 9, 4, 9], 9), 1);
    }

    #[test]
    fn real_size_vit_b32_runs_with_random_weights() {
        let cfg = HfClipConfig::vit_base_patch32();
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let tok = load_tokenizer(&fixture("clip-tiny/tokenizer.json"), 0).unwrap();
        let model = ClipEmbedder::from_var_builder(
            vb,
            cfg,
            ClipPreprocessConfig::openai_clip(224),
            tok,
            &Device::Cpu,
            DType::F32,
        )
        .unwrap();
        let pixels = vec![0.1f32; 2 * 3 * 224 * 224];
        assert_eq!(model.embed_pixels(&pixels, 2).unwrap().dims(), &[2, 512]);
        assert_eq!(
            model.embed_texts(&["a photo of a cat"]).unwrap().dims(),
            &[1, 512]
        );
    }

    #[test]
    fn unsupported_activation_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "model.safetensors",
            "tokenizer.json",
            "preprocessor_config.json",
        ] {
            std::fs::copy(fixture(&format!("clip-tiny/{f}")), dir.path().join(f)).unwrap();
        }
        let cfg = std::fs::read_to_string(fixture("clip-tiny/config.json"))
            .unwrap()
            .replace("quick_gelu", "gelu");
        std::fs::write(dir.path().join("config.json"), cfg).unwrap();
        let files = ClipModelFiles::from_dir(dir.path()).unwrap();
        let err = ClipEmbedder::load(&files, &Device::Cpu, DType::F32)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("config.json") && err.contains("gelu"), "{err}");
        std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
        let err = ClipModelFiles::from_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
    }
}
