//! CLIP's vision tower and image projection, laid out for throughput: the numbers are those
//! of transformers' `CLIPVisionModelWithProjection` (`get_image_features`), the schedule is not.
//!
//! - The patch embedding is one matrix product over all patches of the batch (the stride-32
//!   convolution without im2col).
//! - Every linear layer runs on 2-D `[batch·tokens, features]` activations, so each is one
//!   large GEMM rather than one small GEMM per image.
//! - Q, K and V are one fused projection, with the attention scale `head_dim^-0.5` folded
//!   into the query weights and bias at load time.
//! - Every bias rides inside its GEMM. On the CPU ([`kernels::dense`]) the output starts as
//!   the bias (plus the residual, for the output projection and fc2) and the GEMM accumulates
//!   onto it. On a GPU the QKV and fc1 activations get a constant `[1, 0, …, 0]` column block
//!   (8 wide, keeping K a multiple of 8 for tensor cores) and the weights the bias as the
//!   matching column, so no separate broadcast pass runs.
//! - quick_gelu `x·σ(1.702·x)` becomes one SiLU: fc1 is scaled by 1.702 at load time
//!   (`z = 1.702·x`, `x·σ(1.702·x) = silu(z) / 1.702`) and fc2 by 1 / 1.702.
//! - On the CPU, attention reads the heads straight from the QKV activations and writes them
//!   merged ([`QkvAttention`]), and the SiLU runs in parallel ([`kernels::silu`]).

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::{self, QkvAttention};
use crate::models::clip::HfClipConfig;

struct EncoderLayer {
    norm1: LayerNorm,
    /// Query (pre-scaled), key, value: `[3·hidden, hidden]` with the bias apart on the CPU,
    /// `[3·hidden, hidden + BIAS_BLOCK]` with the bias as a column elsewhere.
    qkv: BiasedWeight,
    out_weight: Tensor,
    out_bias: Tensor,
    norm2: LayerNorm,
    /// `[intermediate, hidden]` and its bias as `qkv`, everything × 1.702.
    fc1: BiasedWeight,
    /// `[hidden, intermediate]`, ÷ 1.702.
    fc2_weight: Tensor,
    fc2_bias: Tensor,
}

/// A linear layer's weight `[out, in]` and bias: apart (the CPU's [`kernels::dense`] adds the
/// bias inside its GEMM), or the bias as a column of the weight ([`with_bias_column`]).
enum BiasedWeight {
    Apart(Tensor, Tensor),
    Column(Tensor),
}

/// Width of the constant column block that carries the biases through the GEMMs.
const BIAS_BLOCK: usize = 8;
/// quick_gelu's sigmoid slope.
const QUICK_GELU: f64 = kernels::QUICK_GELU_SLOPE as f64;

/// `[w | b | 0 …]`: `w` `[out, in]` with the bias as column `in`, zero-padded to
/// `in + BIAS_BLOCK` columns.
fn with_bias_column(w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let out = w.dim(0)?;
    let pad = Tensor::zeros((out, BIAS_BLOCK - 1), w.dtype(), w.device())?;
    Tensor::cat(&[w, &b.reshape((out, 1))?, &pad], 1)
}

pub struct VisionTower {
    /// `[hidden, channels·patch·patch]`, the convolution kernel flattened.
    patch_weight: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_norm: LayerNorm,
    /// `[projection_dim, hidden]`.
    projection: Tensor,
    /// `[1, BIAS_BLOCK]` = `[1, 0, …, 0]`, appended to every activation row before a GEMM
    /// whose weights carry their bias.
    bias_block: Tensor,
    heads: usize,
    patch: usize,
    channels: usize,
}

/// `nn.LayerNorm`'s parameters, applied by [`kernels::layer_norm`] (vectorised and parallel
/// on the CPU, where candle's runs its sums serially).
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        kernels::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

fn layer_norm(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<LayerNorm> {
    Ok(LayerNorm {
        weight: vb.get(size, "weight")?,
        bias: vb.get(size, "bias")?,
        eps: eps as f32,
    })
}

/// The `p × p` patches of pixels `[n, c, s, s]` as rows `[n·g·g, c·p·p]` (`g = s / p`), in
/// the order of the flattened convolution kernel: the stride-`p` patch convolution is then
/// one matrix product.
pub(crate) fn patch_rows(pixels: &Tensor, p: usize) -> candle_core::Result<Tensor> {
    let (n, c, s, _) = pixels.dims4()?;
    let g = s / p;
    // [n, c, g, p, g, p] → [n, g, g, c, p, p]
    pixels
        .reshape((n, c, g, p, g, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .contiguous()?
        .reshape((n * g * g, c * p * p))
}

impl VisionTower {
    /// Reads `vision_model.*` and `visual_projection.weight` from `vb` (the model root).
    pub fn new(vb: VarBuilder, config: &HfClipConfig) -> candle_core::Result<Self> {
        let v = &config.vision_config;
        let (h, heads, p, c) = (
            v.hidden_size,
            v.num_attention_heads,
            v.patch_size,
            v.num_channels,
        );
        let eps = v.layer_norm_eps;
        let head_dim = h / heads;
        let scale = (head_dim as f64).powf(-0.5);
        let grid = v.image_size / p;
        let tower = vb.pp("vision_model");
        let emb = tower.pp("embeddings");
        let patch_weight = emb
            .get((h, c, p, p), "patch_embedding.weight")?
            .reshape((h, c * p * p))?;
        let class_embedding = emb.get(h, "class_embedding")?;
        let position_embedding = emb.get((grid * grid + 1, h), "position_embedding.weight")?;
        let cpu_dense = vb.device().is_cpu() && vb.dtype() == DType::F32;
        let mut layers = Vec::with_capacity(v.num_hidden_layers);
        for i in 0..v.num_hidden_layers {
            let lb = tower.pp(format!("encoder.layers.{i}"));
            let attn = lb.pp("self_attn");
            let proj =
                |name: &str, out: usize, inp: usize| -> candle_core::Result<(Tensor, Tensor)> {
                    Ok((
                        attn.get((out, inp), &format!("{name}.weight"))?,
                        attn.get(out, &format!("{name}.bias"))?,
                    ))
                };
            let (qw, qb) = proj("q_proj", h, h)?;
            let (kw, kb) = proj("k_proj", h, h)?;
            let (vw, vbias) = proj("v_proj", h, h)?;
            let (out_weight, out_bias) = proj("out_proj", h, h)?;
            let mlp = lb.pp("mlp");
            let im = v.intermediate_size;
            let biased = |w: Tensor, b: Tensor| -> candle_core::Result<BiasedWeight> {
                Ok(if cpu_dense {
                    BiasedWeight::Apart(w, b)
                } else {
                    BiasedWeight::Column(with_bias_column(&w, &b)?)
                })
            };
            let qkv = biased(
                Tensor::cat(&[(qw * scale)?, kw, vw], 0)?,
                Tensor::cat(&[(qb * scale)?, kb, vbias], 0)?,
            )?;
            let fc1 = biased(
                (mlp.get((im, h), "fc1.weight")? * QUICK_GELU)?,
                (mlp.get(im, "fc1.bias")? * QUICK_GELU)?,
            )?;
            layers.push(EncoderLayer {
                norm1: layer_norm(lb.pp("layer_norm1"), h, eps)?,
                qkv,
                out_weight,
                out_bias,
                norm2: layer_norm(lb.pp("layer_norm2"), h, eps)?,
                fc1,
                fc2_weight: (mlp.get((h, im), "fc2.weight")? / QUICK_GELU)?,
                fc2_bias: mlp.get(h, "fc2.bias")?,
            });
        }
        let mut block = vec![0f32; BIAS_BLOCK];
        block[0] = 1.0;
        let bias_block =
            Tensor::from_vec(block, (1, BIAS_BLOCK), vb.device())?.to_dtype(vb.dtype())?;
        Ok(Self {
            bias_block,
            patch_weight,
            class_embedding,
            position_embedding,
            pre_norm: layer_norm(tower.pp("pre_layrnorm"), h, eps)?,
            layers,
            post_norm: layer_norm(tower.pp("post_layernorm"), h, eps)?,
            projection: vb.get((config.projection_dim, h), "visual_projection.weight")?,
            heads,
            patch: p,
            channels: c,
        })
    }

    /// Projected image features `[n, projection_dim]` of pixels `[n, channels, size, size]`.
    pub fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_observed(pixels, &mut |_| Ok(()))
    }

    /// [`forward`](Self::forward), calling `observe` after each stage with the stage's name
    /// (a profiler synchronises the device there and reads the clock).
    pub fn forward_observed(
        &self,
        pixels: &Tensor,
        observe: &mut dyn FnMut(&'static str) -> candle_core::Result<()>,
    ) -> candle_core::Result<Tensor> {
        let (x, n, tokens, hidden) = self.encode(pixels, observe)?;
        // The class token of every image.
        let pooled = x
            .reshape((n, tokens, hidden))?
            .narrow(1, 0, 1)?
            .squeeze(1)?;
        let out = self
            .post_norm
            .forward(&pooled)?
            .matmul(&self.projection.t()?)?;
        observe("head")?;
        Ok(out)
    }

    /// Every token's last hidden state after the post-layernorm, `[n, 1 + patches, hidden]`
    /// (the class token first): the image tokens a cross-attention captioner attends to.
    /// transformers' `post_layernorm(vision_model(pixels).last_hidden_state)`.
    pub fn forward_tokens(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let (x, n, tokens, hidden) = self.encode(pixels, &mut |_| Ok(()))?;
        self.post_norm.forward(&x)?.reshape((n, tokens, hidden))
    }

    /// The encoder's output rows `[n · tokens, hidden]` (before the post-layernorm), with
    /// `n`, `tokens` and `hidden`.
    fn encode(
        &self,
        pixels: &Tensor,
        observe: &mut dyn FnMut(&'static str) -> candle_core::Result<()>,
    ) -> candle_core::Result<(Tensor, usize, usize, usize)> {
        let (n, c, s, _) = pixels.dims4()?;
        let (p, g) = (self.patch, s / self.patch);
        let hidden = self.class_embedding.dim(0)?;
        debug_assert_eq!(c, self.channels);
        let patches = patch_rows(pixels, p)?
            .matmul(&self.patch_weight.t()?)?
            .reshape((n, g * g, hidden))?;
        let class = self
            .class_embedding
            .reshape((1, 1, hidden))?
            .broadcast_as((n, 1, hidden))?;
        let tokens = g * g + 1;
        let x = Tensor::cat(&[class, patches], 1)?
            .broadcast_add(&self.position_embedding)?
            .reshape((n * tokens, hidden))?;
        let mut x = self.pre_norm.forward(&x)?;
        observe("patch embedding")?;
        for layer in &self.layers {
            x = self.layer(layer, &x, n, tokens, observe)?;
        }
        Ok((x, n, tokens, hidden))
    }

    fn layer(
        &self,
        l: &EncoderLayer,
        x: &Tensor,
        n: usize,
        tokens: usize,
        observe: &mut dyn FnMut(&'static str) -> candle_core::Result<()>,
    ) -> candle_core::Result<Tensor> {
        let hidden = x.dim(1)?;
        let normed = l.norm1.forward(x)?;
        observe("layer norms")?;
        let qkv = self.project(&normed, &l.qkv)?;
        observe("qkv")?;
        let cpu = x.device().is_cpu() && x.dtype() == DType::F32;
        let attended = if cpu {
            let op = QkvAttention {
                heads: self.heads,
                scale: 1.0,
                mask: None,
            };
            let attended = qkv
                .reshape((n, tokens, 3 * hidden))?
                .apply_op1_no_bwd(&op)?;
            observe("attention")?;
            attended.reshape((n * tokens, hidden))?
        } else {
            self.attention(&qkv, n, tokens, observe)?
        };
        let x = kernels::dense(&attended, &l.out_weight, &l.out_bias, Some(x))?;
        observe("out proj + residual")?;
        let normed = l.norm2.forward(&x)?;
        observe("layer norms")?;
        let z = self.project(&normed, &l.fc1)?;
        observe("fc1")?;
        let h = if cpu { kernels::silu(&z)? } else { z.silu()? };
        observe("quick_gelu (as silu)")?;
        let out = kernels::dense(&h, &l.fc2_weight, &l.fc2_bias, Some(&x))?;
        observe("fc2 + residual")?;
        Ok(out)
    }

    /// Multi-head attention of `qkv` `[n·tokens, 3·hidden]` (queries pre-scaled) with tensor
    /// ops: heads split out, attended, merged back to `[n·tokens, hidden]`.
    fn attention(
        &self,
        qkv: &Tensor,
        n: usize,
        tokens: usize,
        observe: &mut dyn FnMut(&'static str) -> candle_core::Result<()>,
    ) -> candle_core::Result<Tensor> {
        let hidden = qkv.dim(1)? / 3;
        let (heads, head_dim) = (self.heads, hidden / self.heads);
        let qkv = qkv
            .reshape((n, tokens, 3, heads, head_dim))?
            .permute((2, 0, 3, 1, 4))?;
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        observe("split heads")?;
        let weights = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
        let attended = weights.matmul(&v)?;
        observe("attention")?;
        let attended = attended
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n * tokens, hidden))?;
        observe("merge heads")?;
        Ok(attended)
    }

    /// `x · wᵀ + b`, the bias added inside the GEMM either way.
    fn project(&self, x: &Tensor, w: &BiasedWeight) -> candle_core::Result<Tensor> {
        let w = match w {
            BiasedWeight::Apart(w, b) => return kernels::dense(x, w, b, None),
            BiasedWeight::Column(w) => w,
        };
        let rows = x.dim(0)?;
        let block = self
            .bias_block
            .broadcast_as((rows, BIAS_BLOCK))?
            .contiguous()?;
        Tensor::cat(&[x, &block], 1)?.matmul(&w.t()?)
    }
}
