//! GPT-2 in candle, loading Hugging Face checkpoints unchanged (`gpt2`, `gpt2-medium`, ...).
//!
//! Mirrors transformers' `GPT2LMHeadModel`: learned positions, pre-LayerNorm blocks, fused
//! `c_attn` projection, `gelu_new` MLP, final `ln_f`, and the LM head tied to `wte`. HF stores
//! attention/MLP weights as Conv1D, `[in, out]`, so they are applied as `x · W + b` without a
//! transpose. Tensor names may carry the `transformer.` prefix or not. The decoder also takes
//! input embeddings directly, so a CLIP prefix can stand in front of the caption tokens.

use std::path::{Path, PathBuf};

use candle_core::{CpuStorage, DType, Device, Layout, Module, Shape, Tensor, D};
use candle_nn::{LayerNorm, VarBuilder, VarMap};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::data::hub::HubClient;
use crate::error::{CandleContext, Error, IoContext, Result};
use crate::kernels::{
    self, activate, cpu_f32, cpu_u32, exp_fast, linear, par_gemm, Activation, QkvAttention, View,
    WeightLayout,
};

/// `config.json` of a Hugging Face GPT-2 (the keys that change the computation).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Gpt2Config {
    #[serde(default = "defaults::vocab")]
    pub vocab_size: usize,
    #[serde(default = "defaults::positions")]
    pub n_positions: usize,
    #[serde(default = "defaults::embd")]
    pub n_embd: usize,
    #[serde(default = "defaults::layers")]
    pub n_layer: usize,
    #[serde(default = "defaults::heads")]
    pub n_head: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "defaults::eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "defaults::act")]
    pub activation_function: String,
    #[serde(default = "defaults::yes")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// transformers' `add_cross_attention`: every block attends to encoder states
    /// (`crossattention.{q_attn,c_attn,c_proj}`, `ln_cross_attn`) after its self-attention.
    #[serde(default)]
    pub add_cross_attention: bool,
}

mod defaults {
    pub fn vocab() -> usize {
        50257
    }
    pub fn positions() -> usize {
        1024
    }
    pub fn embd() -> usize {
        768
    }
    pub fn layers() -> usize {
        12
    }
    pub fn heads() -> usize {
        12
    }
    pub fn eps() -> f64 {
        1e-5
    }
    pub fn act() -> String {
        "gelu_new".into()
    }
    pub fn yes() -> bool {
        true
    }
}

impl Gpt2Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).at(path)?;
        let cfg: Self = serde_json::from_slice(&bytes).map_err(|e| Error::BadFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if !matches!(
            cfg.activation_function.as_str(),
            "gelu_new" | "gelu" | "gelu_pytorch_tanh"
        ) {
            return Err(Error::BadFile {
                path: path.to_path_buf(),
                message: format!(
                    "activation_function `{}` is not supported (gelu_new, gelu, gelu_pytorch_tanh)",
                    cfg.activation_function
                ),
            });
        }
        Ok(cfg)
    }

    /// GPT-2 small (124M).
    pub fn gpt2_small() -> Self {
        Self {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            n_inner: None,
            layer_norm_epsilon: 1e-5,
            activation_function: "gelu_new".into(),
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            add_cross_attention: false,
        }
    }
}

/// HF's Conv1D: `y = x · W + b` with `W` stored `[in, out]`.
#[derive(Debug, Clone)]
struct Conv1D {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1D {
    fn new(n_in: usize, n_out: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get((n_in, n_out), "weight")?,
            bias: vb.get(n_out, "bias")?,
        })
    }
}

impl Conv1D {
    /// `forward`, or when training on the CPU one op (product plus bias) whose graph node
    /// keeps only its input: the primitive pair also keeps the product before the bias.
    fn apply(&self, x: &Tensor, diff: bool) -> candle_core::Result<Tensor> {
        if !(diff && x.device().is_cpu() && x.dtype() == DType::F32) {
            return self.forward(x);
        }
        let dims = x.dims();
        let k = dims[dims.len() - 1];
        let mut out = dims.to_vec();
        *out.last_mut().expect("rank ≥ 1") = self.weight.dim(1)?;
        let rows = x.contiguous()?.reshape((x.elem_count() / k.max(1), k))?;
        linear(&rows, &self.weight, &self.bias, WeightLayout::InOut)?.reshape(out)
    }
}

impl Module for Conv1D {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        matmul_rows(x, &self.weight)?.broadcast_add(&self.bias)
    }
}

/// `x (…, k) · w (k, n)` as one 2-D product over all rows of `x`. A broadcast batched product
/// would materialise `w` (and, in backward, its gradient) once per batch row.
fn matmul_rows(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let rows = x.elem_count() / k.max(1);
    let mut out = dims.to_vec();
    *out.last_mut().expect("rank ≥ 1") = w.dim(1)?;
    x.contiguous()?.reshape((rows, k))?.matmul(w)?.reshape(out)
}

#[derive(Debug, Clone)]
struct Block {
    ln_1: LayerNorm,
    c_attn: Conv1D,
    attn_proj: Conv1D,
    ln_2: LayerNorm,
    c_fc: Conv1D,
    mlp_proj: Conv1D,
    n_head: usize,
    scale: f64,
    exact_gelu: bool,
    /// With `add_cross_attention`.
    cross: Option<CrossAttention>,
}

/// LayerNorm from differentiable primitives (candle's fused kernel has no backward pass).
pub fn layer_norm_diff(x: &Tensor, ln: &LayerNorm) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + ln.eps())?.sqrt()?)?;
    let out = normed.broadcast_mul(ln.weight())?;
    match ln.bias() {
        Some(b) => out.broadcast_add(b),
        None => Ok(out),
    }
}

/// Applies `ln` with the fused kernel, or differentiably when training: on the CPU one fused
/// op whose backward keeps only its input (the primitive composition keeps five tensors of
/// the input's size per norm), elsewhere the primitives.
fn norm(x: &Tensor, ln: &LayerNorm, differentiable: bool) -> candle_core::Result<Tensor> {
    if !differentiable {
        return ln.forward(x);
    }
    match ln.bias() {
        Some(bias) if x.device().is_cpu() && x.dtype() == DType::F32 => {
            kernels::layer_norm(x, ln.weight(), bias, ln.eps() as f32)
        }
        _ => layer_norm_diff(x, ln),
    }
}

/// Softmax over the last dimension, differentiably: on the CPU one op whose backward needs
/// only its output (`y · (g − Σ g·y)`), elsewhere the primitive composition.
pub(crate) fn softmax_train(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(SoftmaxOp)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

struct SoftmaxOp;

impl candle_core::CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "softmax-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l)?;
        let d = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let out = par_rows(x.len() / d, d, |i, o| {
            let row = &x[i * d..(i + 1) * d];
            let lse = row_lse(row).1;
            for (o, &v) in o.iter_mut().zip(row) {
                *o = (v - lse).exp();
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((g.broadcast_sub(&dot)? * y)?))
    }
}

/// `gelu_new`, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`: on the CPU one parallel,
/// vectorised pass (tanh as a rational function, within 1e-6 of libm's) whose backward is one
/// pass too; candle's forward is serial and its backward composes nine full-size ops with
/// serial `powf` and `tanh`, together about a sixth of a GPT-2 training step on two cores.
fn gelu_new(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        activate::<GeluNew>(x)
    } else {
        x.gelu()
    }
}

const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

/// tanh as the odd rational function `x·P(x²)/Q(x²)` on `[-7.9, 7.9]` (±1 beyond, where
/// tanh is 1 within f32 rounding), with the minimax coefficients Eigen uses for its float
/// tanh. Branch-free, so loops over it vectorise; NaN stays NaN.
#[inline(always)]
#[allow(clippy::excessive_precision)] // the coefficients as published
fn tanh_rational(x: f32) -> f32 {
    const CLAMP: f32 = 7.905_311;
    const P: [f32; 7] = [
        4.893_524_6e-3,
        6.372_619_3e-4,
        1.485_722_4e-5,
        5.122_297e-8,
        -8.604_671_5e-11,
        2.000_187_9e-13,
        -2.760_768_5e-16,
    ];
    const Q: [f32; 4] = [
        4.893_525_2e-3,
        2.268_434_6e-3,
        1.185_347_1e-4,
        1.198_258_4e-6,
    ];
    let x = x.clamp(-CLAMP, CLAMP);
    let x2 = x * x;
    let p = P.iter().rev().fold(0.0, |acc, &c| acc * x2 + c);
    let q = Q.iter().rev().fold(0.0, |acc, &c| acc * x2 + c);
    x * p / q
}

/// `gelu_new` for [`kernels::activate`].
struct GeluNew;

impl Activation for GeluNew {
    const NAME: &'static str = "gelu-new";

    fn value(x: f32) -> f32 {
        0.5 * x * (1.0 + tanh_rational(SQRT_TWO_OVER_PI * x * (1.0 + GELU_CUBIC * x * x)))
    }

    /// ½(1 + t) + ½·x·(1 − t²)·√(2/π)·(1 + 3·0.044715·x²), t the tanh above.
    fn slope(x: f32) -> f32 {
        let t = tanh_rational(SQRT_TWO_OVER_PI * x * (1.0 + GELU_CUBIC * x * x));
        0.5 * (1.0 + t)
            + 0.5 * x * (1.0 - t * t) * SQRT_TWO_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x)
    }
}

/// A differentiable LayerNorm for other trained modules (the captioner's mapper): the fused
/// op on the CPU.
pub(crate) fn train_norm(x: &Tensor, ln: &LayerNorm) -> candle_core::Result<Tensor> {
    norm(x, ln, true)
}

impl Block {
    fn new(cfg: &Gpt2Config, layer: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.n_embd;
        let inner = cfg.n_inner.unwrap_or(4 * d);
        let head_dim = d / cfg.n_head;
        let mut scale = if cfg.scale_attn_weights {
            1.0 / (head_dim as f64).sqrt()
        } else {
            1.0
        };
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f64;
        }
        Ok(Self {
            ln_1: candle_nn::layer_norm(d, cfg.layer_norm_epsilon, vb.pp("ln_1"))?,
            c_attn: Conv1D::new(d, 3 * d, vb.pp("attn").pp("c_attn"))?,
            attn_proj: Conv1D::new(d, d, vb.pp("attn").pp("c_proj"))?,
            ln_2: candle_nn::layer_norm(d, cfg.layer_norm_epsilon, vb.pp("ln_2"))?,
            c_fc: Conv1D::new(d, inner, vb.pp("mlp").pp("c_fc"))?,
            mlp_proj: Conv1D::new(inner, d, vb.pp("mlp").pp("c_proj"))?,
            n_head: cfg.n_head,
            scale,
            exact_gelu: cfg.activation_function == "gelu",
            cross: if cfg.add_cross_attention {
                let c = vb.pp("crossattention");
                Some(CrossAttention {
                    ln: candle_nn::layer_norm(d, cfg.layer_norm_epsilon, vb.pp("ln_cross_attn"))?,
                    q_attn: Conv1D::new(d, d, c.pp("q_attn"))?,
                    c_attn: Conv1D::new(d, 2 * d, c.pp("c_attn"))?,
                    c_proj: Conv1D::new(d, d, c.pp("c_proj"))?,
                })
            } else {
                None
            },
        })
    }

    /// This block's keys and values `(b, h, s, hd)` of encoder states `(b, s, d)`.
    fn cross_keys_values(
        &self,
        enc: &Tensor,
        diff: bool,
    ) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        let Some(c) = &self.cross else {
            return Ok(None);
        };
        let (b, s, d) = enc.dims3()?;
        let hd = d / self.n_head;
        let kv = c.c_attn.apply(enc, diff)?;
        let split = |i: usize| -> candle_core::Result<Tensor> {
            kv.narrow(D::Minus1, i * d, d)?
                .reshape((b, s, self.n_head, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        Ok(Some((split(0)?, split(1)?)))
    }

    /// Cross-attention of `x` `(b, t, d)` (already through the self-attention residual) over
    /// the encoder's keys and values, its output projected (the residual is the caller's).
    fn cross_attend(
        &self,
        x: &Tensor,
        (k, v): &(Tensor, Tensor),
        mask: Option<&Tensor>,
        diff: bool,
    ) -> candle_core::Result<Tensor> {
        let Some(c) = &self.cross else {
            candle_core::bail!("encoder states given to a GPT-2 without cross-attention");
        };
        let (b, t, d) = x.dims3()?;
        let hd = d / self.n_head;
        let q = c
            .q_attn
            .apply(&norm(x, &c.ln, diff)?, diff)?
            .reshape((b, t, self.n_head, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = (q * self.scale)?;
        let att = q.matmul(&k.t()?)?;
        let att = match mask {
            Some(m) => att.broadcast_add(m)?,
            None => att,
        };
        let att = if diff {
            softmax_train(&att)?
        } else {
            candle_nn::ops::softmax_last_dim(&att)?
        };
        let y = att.matmul(v)?.transpose(1, 2)?.reshape((b, t, d))?;
        c.c_proj.apply(&y, diff)
    }

    /// `x`: `(b, t, d)`; `mask`: additive `(b|1, 1, t, past + t)` (causal and padding);
    /// `cache`: this layer's keys and values of the `past` earlier positions, extended in place.
    fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        cross: Option<(&(Tensor, Tensor), Option<&Tensor>)>,
        diff: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.n_head;
        let qkv = self.c_attn.apply(&norm(x, &self.ln_1, diff)?, diff)?;
        if cache.is_none() && x.device().is_cpu() && x.dtype() == DType::F32 {
            let op = QkvAttention {
                heads: self.n_head,
                scale: self.scale as f32,
                mask: Some(mask.broadcast_as((b, 1, t, t))?.flatten_all()?.to_vec1()?),
            };
            let qkv = qkv.contiguous()?;
            let y = if diff {
                qkv.apply_op1(op)?
            } else {
                qkv.apply_op1_no_bwd(&op)?
            };
            return self.finish(x, &y, cross, diff);
        }
        let split = |i: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(D::Minus1, i * d, d)?
                .reshape((b, t, self.n_head, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, mut k, mut v) = (split(0)?, split(1)?, split(2)?);
        if let Some(cache) = cache {
            if let Some((pk, pv)) = cache.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            // Detached: cached decoding is inference only, and with trainable (variable)
            // weights the keys and values record the ops that made them, so the cache would
            // hold every earlier step's whole graph.
            *cache = Some((k.detach(), v.detach()));
        }
        // The scale on q (`(b, h, t, hd)`) rather than on the scores (`(b, h, t, t)`).
        let q = (q * self.scale)?;
        let att = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let att = if diff {
            softmax_train(&att)?
        } else {
            candle_nn::ops::softmax_last_dim(&att)?
        };
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.finish(x, &y, cross, diff)
    }

    /// The rest of the block after self-attention: `y` `(b, t, d)`, heads merged; then the
    /// cross-attention over `cross` (this layer's encoder keys and values and the encoder's
    /// padding mask) when given, as transformers' `GPT2Block`; then the MLP.
    fn finish(
        &self,
        x: &Tensor,
        y: &Tensor,
        cross: Option<(&(Tensor, Tensor), Option<&Tensor>)>,
        diff: bool,
    ) -> candle_core::Result<Tensor> {
        let mut x = (x + self.attn_proj.apply(y, diff)?)?;
        if let Some((kv, mask)) = cross {
            x = (&x + self.cross_attend(&x, kv, mask, diff)?)?;
        }
        let h = self.c_fc.apply(&norm(&x, &self.ln_2, diff)?, diff)?;
        let h = if self.exact_gelu {
            h.gelu_erf()?
        } else {
            gelu_new(&h)?
        };
        x + self.mlp_proj.apply(&h, diff)?
    }
}

/// A block's cross-attention (transformers' `GPT2Attention` with `is_cross_attention`):
/// queries from the decoder (`q_attn`), keys and values from the encoder states (`c_attn`).
#[derive(Debug, Clone)]
struct CrossAttention {
    /// `ln_cross_attn`, before the queries.
    ln: LayerNorm,
    q_attn: Conv1D,
    c_attn: Conv1D,
    c_proj: Conv1D,
}

/// The encoder side of cross-attention, computed once for a batch
/// ([`Gpt2::cross_states`]): each layer's keys and values of the encoder states and their
/// additive padding mask `(b, 1, 1, s)`.
#[derive(Debug, Clone)]
pub struct CrossStates {
    layers: Vec<(Tensor, Tensor)>,
    mask: Option<Tensor>,
}

impl CrossStates {
    /// The states of `rows` (`(n,)` u32 indices into the batch), as beam search reorders them.
    pub fn select_rows(&self, rows: &Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            layers: self
                .layers
                .iter()
                .map(|(k, v)| Ok((k.index_select(rows, 0)?, v.index_select(rows, 0)?)))
                .collect::<candle_core::Result<_>>()?,
            mask: self
                .mask
                .as_ref()
                .map(|m| m.index_select(rows, 0))
                .transpose()?,
        })
    }

    fn layer(&self, i: usize) -> Option<(&(Tensor, Tensor), Option<&Tensor>)> {
        self.layers.get(i).map(|kv| (kv, self.mask.as_ref()))
    }
}

/// GPT-2 with its tied LM head.
#[derive(Debug, Clone)]
pub struct Gpt2 {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    pub config: Gpt2Config,
    /// Use differentiable primitives (training); the fused kernels are faster but have no
    /// backward pass.
    differentiable: bool,
}

impl Gpt2 {
    /// Builds the model from `vb`, which may or may not carry the `transformer.` prefix.
    pub fn new(cfg: &Gpt2Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let vb = if vb.contains_tensor("transformer.wte.weight") {
            vb.pp("transformer")
        } else {
            vb
        };
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::new(cfg, i, vb.pp("h").pp(i.to_string())))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            wte: vb.get((cfg.vocab_size, cfg.n_embd), "wte.weight")?,
            wpe: vb.get((cfg.n_positions, cfg.n_embd), "wpe.weight")?,
            blocks,
            ln_f: candle_nn::layer_norm(cfg.n_embd, cfg.layer_norm_epsilon, vb.pp("ln_f"))?,
            config: cfg.clone(),
            differentiable: false,
        })
    }

    /// Switches between differentiable primitives (for training) and fused kernels.
    pub fn set_differentiable(&mut self, on: bool) {
        self.differentiable = on;
    }

    /// Loads `config.json` + `model.safetensors` from a Hugging Face directory (memory-mapped).
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let cfg = Gpt2Config::from_file(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        let err = format!("loading {}", weights.display());
        // SAFETY: the checkpoint is mapped read-only and never written while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, device) }
            .during(err.as_str())?;
        Self::new(&cfg, vb).during(err.as_str())
    }

    /// Token embeddings of `ids` (`(b, t)` u32) → `(b, t, d)`.
    pub fn embed_tokens(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.wte
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.config.n_embd))
    }

    /// Logits `(b, t, vocab)` for input embeddings `(b, t, d)`; `keep` (`(b, t)`, 1 = real,
    /// 0 = padding, optional) masks padded keys. Positions are 0..t.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        keep: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.lm_logits(&self.forward_hidden(embeds, keep)?)
    }

    /// Final hidden states `(b, t, d)` (after `ln_f`) of input embeddings, before the LM
    /// head: callers that need logits at some positions only apply [`Self::lm_logits`] there.
    pub fn forward_hidden(
        &self,
        embeds: &Tensor,
        keep: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.forward_hidden_with(embeds, keep, None)
    }

    /// Whether the blocks have cross-attention (`add_cross_attention`).
    pub fn has_cross_attention(&self) -> bool {
        self.config.add_cross_attention
    }

    /// Every layer's cross-attention keys and values of encoder states `(b, s, d)`, with
    /// `keep` `(b, s)` (1 = token, 0 = padding; `None`: all tokens), as transformers'
    /// `encoder_hidden_states` and `encoder_attention_mask`. Differentiable when the model is.
    pub fn cross_states(
        &self,
        encoder: &Tensor,
        keep: Option<&Tensor>,
    ) -> candle_core::Result<CrossStates> {
        if !self.has_cross_attention() {
            candle_core::bail!("this GPT-2 has no cross-attention (add_cross_attention is false)");
        }
        let (b, s, d) = encoder.dims3()?;
        if d != self.config.n_embd {
            candle_core::bail!(
                "encoder states of width {d} for a GPT-2 of width {}",
                self.config.n_embd
            );
        }
        let layers = self
            .blocks
            .iter()
            .map(|blk| {
                blk.cross_keys_values(encoder, self.differentiable)?
                    .ok_or_else(|| {
                        candle_core::Error::Msg("a block without cross-attention".into())
                    })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mask = keep
            .map(|k| {
                let neg = f64::from(f32::MIN / 2.0);
                (k.to_dtype(DType::F32)?.affine(-1.0, 1.0)? * neg)?
                    .reshape((b, 1, 1, s))?
                    .to_dtype(encoder.dtype())
            })
            .transpose()?;
        Ok(CrossStates { layers, mask })
    }

    /// [`Self::forward_hidden`] attending to `cross` (encoder states) in every block.
    pub fn forward_hidden_with(
        &self,
        embeds: &Tensor,
        keep: Option<&Tensor>,
        cross: Option<&CrossStates>,
    ) -> candle_core::Result<Tensor> {
        self.run_blocks(embeds, keep, cross, true)
    }

    /// Final hidden states `(b, t, d)` of the blocks without the causal mask: every position
    /// attends to every other (a denoiser over a whole sequence). Positions are 0..t.
    pub fn forward_hidden_bidirectional(&self, embeds: &Tensor) -> candle_core::Result<Tensor> {
        self.run_blocks(embeds, None, None, false)
    }

    fn run_blocks(
        &self,
        embeds: &Tensor,
        keep: Option<&Tensor>,
        cross: Option<&CrossStates>,
        causal: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = embeds.dims3()?;
        if t > self.config.n_positions {
            candle_core::bail!(
                "sequence of {t} exceeds n_positions {}",
                self.config.n_positions
            );
        }
        let x = embeds.broadcast_add(&self.wpe.narrow(0, 0, t)?)?;
        let mask = attention_mask(b, t, keep, causal, x.device(), x.dtype())?;
        let mut x = x;
        for (i, block) in self.blocks.iter().enumerate() {
            let c = cross.and_then(|c| c.layer(i));
            x = block.forward(&x, &mask, None, c, self.differentiable)?;
        }
        norm(&x, &self.ln_f, self.differentiable)
    }

    /// Incremental decoding: final hidden states `(b, t, d)` (after `ln_f`) of new input
    /// embeddings at positions `cache.len()..`, attending to everything cached, which is
    /// extended by them.
    pub fn forward_cached(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
    ) -> candle_core::Result<Tensor> {
        self.forward_cached_with(embeds, cache, None)
    }

    /// [`Self::forward_cached`] attending to `cross` (encoder states, rows as the cache's).
    pub fn forward_cached_with(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        cross: Option<&CrossStates>,
    ) -> candle_core::Result<Tensor> {
        let (_, t, _) = embeds.dims3()?;
        let past = cache.len;
        if past + t > self.config.n_positions {
            candle_core::bail!(
                "sequence of {} exceeds n_positions {}",
                past + t,
                self.config.n_positions
            );
        }
        let x = embeds.broadcast_add(&self.wpe.narrow(0, past, t)?)?;
        let neg = f32::MIN / 2.0;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..past + t).map(move |j| if j > past + i { neg } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, t, past + t), x.device())?.to_dtype(x.dtype())?;
        if cache.layers.len() != self.blocks.len() {
            cache.layers = vec![None; self.blocks.len()];
        }
        let mut x = x;
        for (i, (block, layer)) in self.blocks.iter().zip(cache.layers.iter_mut()).enumerate() {
            let c = cross.and_then(|c| c.layer(i));
            x = block.forward(&x, &mask, Some(layer), c, self.differentiable)?;
        }
        cache.len += t;
        norm(&x, &self.ln_f, self.differentiable)
    }

    /// The tied LM head: hidden `(…, d)` → logits `(…, vocab)`. `hidden` may be a view (the
    /// last position of a sequence).
    pub fn lm_logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        matmul_rows(hidden, &self.wte.t()?)
    }

    /// `log p(target | position)` `(b, t)` of final hidden states `(b, t, d)` under the tied
    /// LM head. On the CPU one op ([`LmHeadLogprob`]) whose `(b·t, vocab)` logits never enter
    /// the autograd graph; elsewhere [`Self::lm_logits`] then [`token_logprobs`].
    pub fn target_logprobs(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
    ) -> candle_core::Result<Tensor> {
        tied_logprobs(hidden, &self.wte, targets, self.differentiable)
    }

    /// Longest sequence (prefix included) the position table covers.
    pub fn max_positions(&self) -> usize {
        self.config.n_positions
    }

    pub fn hidden_size(&self) -> usize {
        self.config.n_embd
    }

    /// Logits for token ids `(b, t)`.
    pub fn forward(&self, ids: &Tensor, keep: Option<&Tensor>) -> candle_core::Result<Tensor> {
        self.forward_embeds(&self.embed_tokens(ids)?, keep)
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
    /// The tokenizer and its end-of-text id.
    pub fn tokenizer(&self) -> Result<(Tokenizer, u32)> {
        let tokenizer = Tokenizer::from_file(&self.tokenizer).map_err(|e| Error::BadFile {
            path: self.tokenizer.clone(),
            message: format!("not a tokenizers file: {e}"),
        })?;
        let eos = tokenizer
            .token_to_id(END_OF_TEXT)
            .ok_or_else(|| Error::BadFile {
                path: self.tokenizer.clone(),
                message: format!("no `{END_OF_TEXT}` token"),
            })?;
        Ok((tokenizer, eos))
    }

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
        let files = ["config.json", "model.safetensors", "tokenizer.json"];
        Self::from_dir(&HubClient::model_dir(decoder, revision, &files, hub)?)
    }
}

pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Token ids of `caption` as `tok` splits it, without special tokens (`tokenizer(caption)`
/// for GPT-2).
pub fn plain_ids(tok: &Tokenizer, caption: &str) -> Result<Vec<u32>> {
    let enc = tok
        .encode(caption, false)
        .map_err(|e| Error::Config(format!("tokenizing `{caption}`: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

/// Sets the variables of `vars` under `prefix.` (a GPT-2 built from
/// `VarBuilder::from_varmap(vars, ..).pp(prefix)`) from the checkpoint `weights`, whose names
/// may carry `transformer.` or not. An error names the file and the tensor (missing, or of
/// another shape: a checkpoint whose `config.json` does not match its weights).
pub fn load_gpt2_weights(
    vars: &VarMap,
    prefix: &str,
    weights: &Path,
    device: &Device,
) -> Result<()> {
    load_gpt2_weights_but(vars, prefix, weights, device, |_| false).map(|_| ())
}

/// [`load_gpt2_weights`], where tensors for which `may_be_new` holds may be absent from the
/// checkpoint (cross-attention layers added to a plain GPT-2): their names are returned,
/// their variables left as they are.
pub fn load_gpt2_weights_but(
    vars: &VarMap,
    prefix: &str,
    weights: &Path,
    device: &Device,
    may_be_new: impl Fn(&str) -> bool,
) -> Result<Vec<String>> {
    crate::models::load_vars(
        vars,
        prefix,
        weights,
        device,
        |rest| vec![format!("transformer.{rest}"), rest.to_string()],
        may_be_new,
    )
}

/// Whether `name` (relative to the model) is a cross-attention tensor.
pub fn is_cross_attention_tensor(name: &str) -> bool {
    name.contains(".crossattention.") || name.contains(".ln_cross_attn.")
}

/// The attention-masked mean over positions of hidden states `(b, t, d)`, with `keep`
/// `(b, t)` (1 = real token, 0 = padding): `Σ_t h·m / Σ_t m`, as sentence-transformers pool
/// (and the contrastive recipes pool GPT-2's last hidden state). Differentiable.
pub fn masked_mean_pool(hidden: &Tensor, keep: &Tensor) -> candle_core::Result<Tensor> {
    let m = keep.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
    sum.broadcast_div(&count)
}

/// Keys and values of the positions decoded so far, per layer.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps (and repeats) the batch rows `rows` (`u32` indices): beam search reordering.
    pub fn select_rows(&mut self, rows: &Tensor) -> candle_core::Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(rows, 0)?;
            *v = v.index_select(rows, 0)?;
        }
        Ok(())
    }
}

/// Additive attention mask `(b, 1, t, t)`: causal, plus padded keys when `keep` is given.
fn attention_mask(
    b: usize,
    t: usize,
    keep: Option<&Tensor>,
    causal: bool,
    device: &Device,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    let neg = f32::MIN / 2.0;
    let causal: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if causal && j > i { neg } else { 0.0 }))
        .collect();
    let causal = Tensor::from_vec(causal, (1, 1, t, t), device)?;
    let mask = match keep {
        None => causal.broadcast_as((b, 1, t, t))?.contiguous()?,
        Some(keep) => {
            let pad = ((keep.to_dtype(DType::F32)?.affine(-1.0, 1.0)? * f64::from(neg))?)
                .reshape((b, 1, 1, t))?;
            causal.broadcast_add(&pad)?
        }
    };
    mask.to_dtype(dtype)
}

/// Per-position log-probabilities of the next token: `out[b][i] = log p(ids[b][i+1] | ids[b][..=i])`.
pub fn next_token_logprobs(logits: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    let (_, t, _) = logits.dims3()?;
    token_logprobs(&logits.narrow(1, 0, t - 1)?, &ids.narrow(1, 1, t - 1)?)
}

/// `log softmax(hidden · weightᵀ)[.., target]` `(b, t)` for `hidden` `(b, t, d)`, a tied head
/// `weight` `(V, d)` and `targets` `(b, t)`. On the CPU one op ([`LmHeadLogprob`]) whose
/// `(b·t, V)` logits never enter the autograd graph (with a backward pass when
/// `differentiable`); elsewhere the logits, then [`token_logprobs`].
pub fn tied_logprobs(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    differentiable: bool,
) -> candle_core::Result<Tensor> {
    let (b, t, d) = hidden.dims3()?;
    if !(hidden.device().is_cpu() && hidden.dtype() == DType::F32) {
        return token_logprobs(&matmul_rows(hidden, &weight.t()?)?, targets);
    }
    let rows = hidden.contiguous()?.reshape((b * t, d))?;
    let ids = targets.reshape(b * t)?.to_dtype(DType::U32)?.contiguous()?;
    let op = LmHeadLogprob::default();
    let weight = weight.contiguous()?;
    let lp = if differentiable {
        rows.apply_op3(&weight, &ids, op)?
    } else {
        rows.apply_op3_no_bwd(&weight, &ids, &op)?
    };
    lp.reshape((b, t))
}

/// `log softmax(logits)[.., target]` for logits `(b, t, V)` and targets `(b, t)` u32: `(b, t)`.
///
/// On the CPU this is one fused pass per row (max, log-sum-exp, gather) whose backward
/// needs only the logits: the `(b, t, V)` log-softmax is never materialised, which is most
/// of a language-model step's memory at GPT-2's vocabulary. Elsewhere it is the tensor-op
/// composition.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        let flat = logits.reshape((b * t, v))?.contiguous()?;
        let ids = targets.reshape(b * t)?.to_dtype(DType::U32)?.contiguous()?;
        return flat.apply_op2(&ids, TokenLogprob)?.reshape((b, t));
    }
    let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    lp.gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?
        .squeeze(D::Minus1)
}

/// The tied LM head and the target token's log-probability in one CPU op: hidden `(n, d)`,
/// `wte` `(V, d)`, targets `(n,)` u32 → `(n,)`. The forward keeps its `(n, V)` logits for its
/// own backward, which turns them in place into their gradient and applies the two products
/// to it. Through candle's graph the same computation would hold the logits, their gradient,
/// a zeroed accumulator and the accumulated sum (four `(n, V)` buffers, 370 MB each for a
/// GPT-2 batch of 1,900 tokens) at the peak of the backward pass.
#[derive(Default)]
struct LmHeadLogprob {
    /// Logits and per-row log-sum-exp of the forward pass, taken by the backward pass.
    saved: std::sync::Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl candle_core::CustomOp3 for LmHeadLogprob {
    fn name(&self) -> &'static str {
        "lm-head-logprob"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (hidden, wte, ids) = (cpu_f32(s1, l1)?, cpu_f32(s2, l2)?, cpu_u32(s3, l3)?);
        let ((n, d), (v, dw)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        if d != dw || ids.len() != n || ids.iter().any(|&i| i as usize >= v) {
            candle_core::bail!(
                "lm head: hidden {n}x{d}, wte {v}x{dw}, {} targets",
                ids.len()
            );
        }
        let mut logits = vec![0f32; n * v];
        // SAFETY: hidden is n × d, wte is v × d (read transposed), logits n × v.
        unsafe {
            par_gemm(
                n,
                v,
                d,
                logits.as_mut_ptr(),
                v,
                false,
                View::rows(hidden, 0, d),
                View::rows(wte, 0, d).t(),
            )
        };
        let lse: Vec<f32> = logits.par_chunks(v).map(|row| row_lse(row).1).collect();
        let out = ids
            .iter()
            .enumerate()
            .map(|(r, &id)| logits[r * v + id as usize] - lse[r])
            .collect();
        *self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("lm head: lock poisoned".into()))? =
            Some((logits, lse));
        Ok((CpuStorage::F32(out), n.into()))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        wte: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("lm head: lock poisoned".into()))?
            .take();
        let Some((mut logits, lse)) = saved else {
            candle_core::bail!("lm head: backward ran twice or without its forward")
        };
        let (n, v) = (lse.len(), wte.dim(0)?);
        let g = grad.flatten_all()?.to_vec1::<f32>()?;
        let ids = ids.to_vec1::<u32>()?;
        // d logit_j = g · (onehot(target)_j − softmax_j), in place.
        logits.par_chunks_mut(v).enumerate().for_each(|(r, row)| {
            let (g, lse) = (g[r], lse[r]);
            if g == 0.0 {
                row.fill(0.0);
                return;
            }
            for x in row.iter_mut() {
                *x = -g * exp_fast(*x - lse);
            }
            row[ids[r] as usize] += g;
        });
        let dlogits = Tensor::from_vec(logits, (n, v), &Device::Cpu)?;
        let dhidden = dlogits.matmul(&wte.detach())?;
        let dwte = dlogits.t()?.matmul(&hidden.detach())?;
        Ok((Some(dhidden), Some(dwte), None))
    }
}

/// `n` rows of `d` values, row `i` filled by `fill(i, row)` (rows in parallel).
fn par_rows(n: usize, d: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; n * d];
    out.par_chunks_mut(d.max(1))
        .enumerate()
        .for_each(|(i, row)| fill(i, row));
    out
}

/// Row maximum and log-sum-exp of one row of logits.
fn row_lse(row: &[f32]) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&x| exp_fast(x - max)).sum();
    (max, max + sum.ln())
}

/// `(n, V)` logits, `(n,)` targets → `(n,)` target log-probabilities.
struct TokenLogprob;

impl candle_core::CustomOp2 for TokenLogprob {
    fn name(&self) -> &'static str {
        "token-logprob"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (logits, ids) = (cpu_f32(s1, l1)?, cpu_u32(s2, l2)?);
        let (n, v) = l1.shape().dims2()?;
        if ids.len() != n || ids.iter().any(|&i| i as usize >= v) {
            candle_core::bail!("token_logprobs: {} targets for {n} rows of {v}", ids.len());
        }
        let out: Vec<f32> = logits
            .par_chunks(v)
            .zip(ids.par_iter())
            .map(|(row, &id)| row[id as usize] - row_lse(row).1)
            .collect();
        Ok((CpuStorage::F32(out), n.into()))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = logits.apply_op3_no_bwd(ids, &grad.contiguous()?, &TokenLogprobGrad)?;
        Ok((Some(g), None))
    }
}

/// Gradient of [`TokenLogprob`]: `g · (onehot(target) − softmax(logits))` per row.
struct TokenLogprobGrad;

impl candle_core::CustomOp3 for TokenLogprobGrad {
    fn name(&self) -> &'static str {
        "token-logprob-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (logits, ids, grad) = (cpu_f32(s1, l1)?, cpu_u32(s2, l2)?, cpu_f32(s3, l3)?);
        let (n, v) = l1.shape().dims2()?;
        let out = par_rows(n, v, |r, o| {
            let g = grad[r];
            if g == 0.0 {
                return;
            }
            let row = &logits[r * v..(r + 1) * v];
            let lse = row_lse(row).1;
            for (o, &x) in o.iter_mut().zip(row) {
                *o = -g * (x - lse).exp();
            }
            o[ids[r] as usize] += g;
        });
        Ok((CpuStorage::F32(out), (n, v).into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::npy::read_npy;
    use std::path::PathBuf;

    fn fixture(p: &str) -> PathBuf {
        crate::hf_tiny_fixture(p)
    }

    /// transformers' `GPT2LMHeadModel` with `add_cross_attention=True` on a tiny random
    /// checkpoint (`tests/fixtures/gpt2-cross/make_reference.py`): the same logits within 1e-4
    /// with padded decoder and encoder inputs, by the fused kernels, the differentiable path,
    /// and token-by-token decoding with the key/value cache.
    #[test]
    fn cross_attention_logits_equal_transformers() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2-cross");
        let dev = Device::Cpu;
        let ids = crate::testkit::npy::read_npy_i64(&dir.join("ids.npy")).unwrap();
        let ids: Vec<u32> = ids.data.iter().map(|&i| i as u32).collect();
        let keep = read_npy(&dir.join("attention_mask.npy")).unwrap();
        let enc = read_npy(&dir.join("encoder.npy")).unwrap();
        let enc_keep = read_npy(&dir.join("encoder_mask.npy")).unwrap();
        let want = read_npy(&dir.join("logits.npy")).unwrap();
        let ids = Tensor::from_vec(ids, (2, 5), &dev).unwrap();
        let keep = Tensor::from_vec(keep.data, (2, 5), &dev).unwrap();
        let enc = Tensor::from_vec(enc.data, (2, 3, 32), &dev).unwrap();
        let enc_keep = Tensor::from_vec(enc_keep.data, (2, 3), &dev).unwrap();
        let mut model = Gpt2::load(&dir, &dev, DType::F32).unwrap();
        assert!(model.has_cross_attention());
        // Only positions that are real tokens: padded ones are free in either implementation.
        let real = [5usize, 3];
        let check = |got: &Tensor, what: &str| {
            let got: Vec<Vec<Vec<f32>>> = got.to_vec3().unwrap();
            let mut worst = 0f32;
            for (b, n) in real.iter().enumerate() {
                for (t, row) in got[b].iter().take(*n).enumerate() {
                    for (v, g) in row.iter().enumerate() {
                        let w = want.data[(b * 5 + t) * 64 + v];
                        worst = worst.max((g - w).abs());
                    }
                }
            }
            assert!(worst < 1e-4, "{what}: {worst}");
        };
        for diff in [false, true] {
            model.set_differentiable(diff);
            let cross = model.cross_states(&enc, Some(&enc_keep)).unwrap();
            let h = model
                .forward_hidden_with(
                    &model.embed_tokens(&ids).unwrap(),
                    Some(&keep),
                    Some(&cross),
                )
                .unwrap();
            check(
                &model.lm_logits(&h).unwrap(),
                &format!("differentiable {diff}"),
            );
        }
        // One token at a time through the cache.
        model.set_differentiable(false);
        let cross = model.cross_states(&enc, Some(&enc_keep)).unwrap();
        let mut cache = KvCache::default();
        let steps: Vec<Tensor> = (0..5)
            .map(|t| {
                let x = model.embed_tokens(&ids.narrow(1, t, 1).unwrap()).unwrap();
                let h = model
                    .forward_cached_with(&x, &mut cache, Some(&cross))
                    .unwrap();
                model.lm_logits(&h).unwrap()
            })
            .collect();
        check(&Tensor::cat(&steps, 1).unwrap(), "cached");
        // Without encoder states the blocks skip cross-attention (as transformers does), so
        // the logits differ.
        let plain = model.forward(&ids, Some(&keep)).unwrap();
        let a: Vec<f32> = plain.flatten_all().unwrap().to_vec1().unwrap();
        assert!(a.iter().zip(&want.data).any(|(x, y)| (x - y).abs() > 1e-3));
    }

    /// Masked mean pooling: padding positions count for nothing, so a padded caption pools to
    /// what it pools to alone (the causal mask keeps padding out of the real positions too),
    /// and the value is the plain mean of the real positions' hidden states.
    #[test]
    fn masked_mean_pooling_ignores_padding() {
        let dir = tempfile::tempdir().unwrap();
        let corpus: Vec<String> = ["a red circle above a blue square", "a green triangle"]
            .iter()
            .map(|c| c.to_string())
            .collect();
        let dir = crate::models::tiny::ensure_tiny_gpt2(dir.path(), 42, &corpus).unwrap();
        let model = Gpt2::load(&dir, &Device::Cpu, DType::F32).unwrap();
        let alone = Tensor::new(&[[5u32, 9, 13]], &Device::Cpu).unwrap();
        let padded = Tensor::new(&[[5u32, 9, 13, 0, 0], [7, 8, 0, 0, 0]], &Device::Cpu).unwrap();
        let keep = Tensor::new(
            &[[1f32, 1., 1., 0., 0.], [1., 1., 0., 0., 0.]],
            &Device::Cpu,
        )
        .unwrap();
        let h_alone = model
            .forward_hidden(&model.embed_tokens(&alone).unwrap(), None)
            .unwrap();
        let want: Vec<f32> = h_alone
            .mean(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let h = model
            .forward_hidden(&model.embed_tokens(&padded).unwrap(), Some(&keep))
            .unwrap();
        let pooled = masked_mean_pool(&h, &keep).unwrap();
        let got: Vec<f32> = pooled.get(0).unwrap().to_vec1().unwrap();
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "{diff}");
        // Against the formula on the second row: the mean of its two real positions.
        let row: Vec<Vec<f32>> = h.get(1).unwrap().to_vec2().unwrap();
        let got: Vec<f32> = pooled.get(1).unwrap().to_vec1().unwrap();
        for (j, g) in got.iter().enumerate() {
            assert!((g - (row[0][j] + row[1][j]) / 2.0).abs() < 1e-6);
        }
        let not_masked: Vec<f32> = h.get(1).unwrap().mean(0).unwrap().to_vec1().unwrap();
        assert!(not_masked
            .iter()
            .zip(&got)
            .any(|(a, b)| (a - b).abs() > 1e-3));
    }

    fn reference(name: &str) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(fixture(&format!("reference/{name}"))).unwrap())
            .unwrap()
    }

    #[test]
    fn fused_layer_norm_and_its_gradients_equal_the_primitive_composition() {
        let dev = Device::Cpu;
        let var = |shape: &[usize], std: f32| {
            candle_core::Var::from_tensor(&Tensor::randn(0f32, std, shape, &dev).unwrap()).unwrap()
        };
        let (x, w, b) = (var(&[3, 5, 16], 2.0), var(&[16], 1.0), var(&[16], 1.0));
        let ln = LayerNorm::new(w.as_tensor().clone(), b.as_tensor().clone(), 1e-5);
        let up = Tensor::randn(0f32, 1.0, (3, 5, 16), &dev).unwrap();
        let run = |y: Tensor| {
            let grads = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g = |v: &candle_core::Var| {
                grads
                    .get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            (
                y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                g(&x),
                g(&w),
                g(&b),
            )
        };
        let fused = run(norm(x.as_tensor(), &ln, true).unwrap());
        let plain = run(layer_norm_diff(x.as_tensor(), &ln).unwrap());
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| (p - q).abs() < 1e-4);
        assert!(close(&fused.0, &plain.0), "forward");
        assert!(close(&fused.1, &plain.1), "d/dx");
        assert!(close(&fused.2, &plain.2), "d/dweight");
        assert!(close(&fused.3, &plain.3), "d/dbias");
    }

    #[test]
    fn fused_softmax_and_its_gradient_equal_the_primitive_composition() {
        let dev = Device::Cpu;
        let x =
            candle_core::Var::from_tensor(&Tensor::randn(0f32, 3.0, (2, 3, 4, 7), &dev).unwrap())
                .unwrap();
        let up = Tensor::randn(0f32, 1.0, (2, 3, 4, 7), &dev).unwrap();
        let run = |y: Tensor| {
            let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (flat(&y), flat(g.get(x.as_tensor()).unwrap()))
        };
        let (fy, fg) = run(softmax_train(x.as_tensor()).unwrap());
        let (py, pg) = run(candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap());
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| (p - q).abs() < 1e-5);
        assert!(close(&fy, &py) && close(&fg, &pg));
    }

    #[test]
    fn qkv_attention_and_its_gradient_equal_the_primitive_composition() {
        let dev = Device::Cpu;
        let (b, heads, t, hd) = (2, 3, 5, 4);
        let d = heads * hd;
        let scale = 0.5f32;
        let qkv = Tensor::randn(0f32, 1.0, (b, t, 3 * d), &dev).unwrap();
        let qkv = candle_core::Var::from_tensor(&qkv).unwrap();
        // The second row's last two positions are padding.
        let keep =
            Tensor::from_vec(vec![1f32, 1., 1., 1., 1., 1., 1., 1., 0., 0.], (b, t), &dev).unwrap();
        let mask = attention_mask(b, t, Some(&keep), true, &dev, DType::F32).unwrap();
        let up = Tensor::randn(0f32, 1.0, (b, t, d), &dev).unwrap();
        let run = |y: Tensor| {
            let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (flat(&y), flat(g.get(qkv.as_tensor()).unwrap()))
        };
        let op = QkvAttention {
            heads,
            scale,
            mask: Some(mask.flatten_all().unwrap().to_vec1().unwrap()),
        };
        let fused = run(qkv.as_tensor().apply_op1(op).unwrap());
        let split = |i: usize| {
            qkv.as_tensor()
                .narrow(2, i * d, d)
                .unwrap()
                .reshape((b, t, heads, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split(0), split(1), split(2));
        let att = (q.matmul(&k.t().unwrap()).unwrap() * f64::from(scale)).unwrap();
        let att = candle_nn::ops::softmax(&att.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
        let y = att.matmul(&v).unwrap().transpose(1, 2).unwrap();
        let plain = run(y.reshape((b, t, d)).unwrap());
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| (p - q).abs() < 1e-5);
        assert!(close(&fused.0, &plain.0), "outputs");
        assert!(close(&fused.1, &plain.1), "dqkv");
        for (third, name) in ["q", "k", "v"].iter().enumerate() {
            let part = fused.1.chunks(d).skip(third).step_by(3).flatten();
            assert!(part.into_iter().any(|g| g.abs() > 1e-4), "d{name} is zero");
        }
    }

    #[test]
    fn fused_linear_and_its_gradients_equal_the_primitive_composition() {
        let dev = Device::Cpu;
        let var = |shape: &[usize]| {
            let x = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
            candle_core::Var::from_tensor(&x).unwrap()
        };
        let (x, w, b) = (var(&[2, 3, 5]), var(&[5, 4]), var(&[4]));
        let conv = Conv1D {
            weight: w.as_tensor().clone(),
            bias: b.as_tensor().clone(),
        };
        let up = Tensor::randn(0f32, 1.0, (2, 3, 4), &dev).unwrap();
        let run = |y: Tensor| {
            let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let grads = [&x, &w, &b].map(|v| flat(g.get(v.as_tensor()).unwrap()));
            (flat(&y), grads)
        };
        let fused = run(conv.apply(x.as_tensor(), true).unwrap());
        let plain = run(conv.forward(x.as_tensor()).unwrap());
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| (p - q).abs() < 1e-5);
        assert!(close(&fused.0, &plain.0), "outputs");
        for (i, name) in ["x", "w", "b"].iter().enumerate() {
            assert!(close(&fused.1[i], &plain.1[i]), "d{name}");
        }
    }

    #[test]
    fn rational_tanh_is_libms_within_a_few_ulp() {
        let mut worst = 0f32;
        for i in -200_000..=200_000 {
            let x = i as f32 * 1e-4;
            worst = worst.max((tanh_rational(x) - x.tanh()).abs());
        }
        assert!(worst < 1e-6, "max abs error {worst}");
        assert!((tanh_rational(1e-30) / 1e-30 - 1.0).abs() < 1e-6);
        assert!((tanh_rational(100.0) - 1.0).abs() < 1e-6);
        assert!((tanh_rational(-100.0) + 1.0).abs() < 1e-6);
        assert!(tanh_rational(f32::NAN).is_nan());
    }

    #[test]
    fn fused_gelu_new_and_its_gradient_equal_candles_gelu() {
        let dev = Device::Cpu;
        // Wide enough to split into parallel tasks; large magnitudes saturate the tanh.
        let x = (Tensor::randn(0f32, 1.0, (3, 40_000), &dev).unwrap() * 4.0).unwrap();
        let x = candle_core::Var::from_tensor(&x).unwrap();
        let up = Tensor::randn(0f32, 1.0, (3, 40_000), &dev).unwrap();
        let run = |y: Tensor| {
            let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (flat(&y), flat(g.get(x.as_tensor()).unwrap()))
        };
        let (fy, fg) = run(gelu_new(x.as_tensor()).unwrap());
        let (py, pg) = run(x.as_tensor().gelu().unwrap());
        let worst = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(p, q)| (p - q).abs() / q.abs().max(1.0))
                .fold(0f32, f32::max)
        };
        assert!(
            worst(&fy, &py) < 2e-6,
            "output differs by {}",
            worst(&fy, &py)
        );
        // candle's backward rounds its constants to six digits; the exact derivative in f64:
        let exact: Vec<f32> = x
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(up.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .map(|(&v, u)| {
                let (v, c, a) = (f64::from(v), (2.0 / std::f64::consts::PI).sqrt(), 0.044715);
                let t = (c * (v + a * v * v * v)).tanh();
                let slope = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * c * (1.0 + 3.0 * a * v * v);
                (slope * f64::from(u)) as f32
            })
            .collect();
        // Where the tanh saturates, 1 − t² cancels: the rational tanh's 4e-7 becomes ~1e-5
        // there (libm's tanh gives ~2e-6), far below f32 training's gradient noise.
        let (ours, candles) = (worst(&fg, &exact), worst(&pg, &exact));
        assert!(ours < 3e-5, "gradient differs by {ours}");
        assert!(candles < 1e-4, "candle's gradient differs by {candles}");
        assert!(fg.iter().any(|g| g.abs() > 0.5), "gradient is degenerate");
    }

    #[test]
    fn fused_token_logprobs_and_gradient_equal_log_softmax_and_gather() {
        let dev = Device::Cpu;
        let logits =
            candle_core::Var::from_tensor(&(Tensor::randn(0f32, 3.0, (2, 5, 37), &dev).unwrap()))
                .unwrap();
        let ids = Tensor::from_vec(vec![0u32, 36, 5, 7, 9, 1, 2, 3, 30, 11], (2, 5), &dev).unwrap();
        let weight = Tensor::randn(0f32, 1.0, (2, 5), &dev).unwrap();
        let fused = token_logprobs(logits.as_tensor(), &ids).unwrap();
        let plain = candle_nn::ops::log_softmax(logits.as_tensor(), D::Minus1)
            .unwrap()
            .gather(&ids.unsqueeze(D::Minus1).unwrap(), D::Minus1)
            .unwrap()
            .squeeze(D::Minus1)
            .unwrap();
        let diff = crate::testkit::max_abs_diff;
        assert!(diff(&fused, &plain) < 1e-5);
        let grad = |t: &Tensor| {
            (t * &weight)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
                .get(logits.as_tensor())
                .unwrap()
                .clone()
        };
        assert!(diff(&grad(&fused), &grad(&plain)) < 1e-5);
        // Out-of-range targets are an error, not a read past the row.
        let bad = Tensor::from_vec(vec![37u32; 10], (2, 5), &dev).unwrap();
        assert!(token_logprobs(logits.as_tensor(), &bad).is_err());
    }

    #[test]
    fn fused_lm_head_logprobs_and_gradients_equal_logits_then_token_logprobs() {
        let dev = Device::Cpu;
        let var = |shape: (usize, usize, usize)| {
            candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap()
        };
        let (hidden, wte) = (var((2, 5, 8)), var((1, 37, 8)));
        let cfg = Gpt2Config {
            vocab_size: 37,
            n_embd: 8,
            n_positions: 8,
            n_layer: 0,
            n_head: 2,
            ..Gpt2Config::gpt2_small()
        };
        let mut model = Gpt2 {
            wte: wte.as_tensor().squeeze(0).unwrap(),
            wpe: Tensor::zeros((8, 8), DType::F32, &dev).unwrap(),
            blocks: vec![],
            ln_f: candle_nn::layer_norm(8, 1e-5, candle_nn::VarBuilder::zeros(DType::F32, &dev))
                .unwrap(),
            config: cfg,
            differentiable: true,
        };
        let ids = Tensor::from_vec(vec![0u32, 36, 5, 7, 9, 1, 2, 3, 30, 11], (2, 5), &dev).unwrap();
        // Zero weights stand for padded positions.
        let weight = Tensor::from_vec(
            vec![1f32, -0.5, 2.0, 0.0, 1.0, 0.3, 0.0, 0.0, 1.5, 1.0],
            (2, 5),
            &dev,
        )
        .unwrap();
        let run = |lp: Tensor| {
            let g = (&lp * &weight)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let grads = [&hidden, &wte].map(|x| flat(g.get(x.as_tensor()).unwrap()));
            (flat(&lp), grads)
        };
        let fused = run(model.target_logprobs(hidden.as_tensor(), &ids).unwrap());
        let logits = model.lm_logits(hidden.as_tensor()).unwrap();
        let plain = run(token_logprobs(&logits, &ids).unwrap());
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| (p - q).abs() < 1e-5);
        assert!(close(&fused.0, &plain.0), "log-probs");
        for (i, name) in ["hidden", "wte"].iter().enumerate() {
            assert!(close(&fused.1[i], &plain.1[i]), "d{name}");
            assert!(fused.1[i].iter().any(|g| g.abs() > 1e-3), "d{name} is zero");
        }
        // Inference mode: the same values, no graph.
        model.set_differentiable(false);
        let lp = model.target_logprobs(hidden.as_tensor(), &ids).unwrap();
        assert!(close(
            &lp.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            &plain.0
        ));
        let bad = Tensor::from_vec(vec![37u32; 10], (2, 5), &dev).unwrap();
        assert!(model.target_logprobs(hidden.as_tensor(), &bad).is_err());
    }

    fn ids_of(r: &serde_json::Value) -> Vec<u32> {
        r["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    }

    #[test]
    fn token_logprobs_and_logits_match_transformers() {
        let model = Gpt2::load(&fixture("gpt2-tiny"), &Device::Cpu, DType::F32).unwrap();
        for (json, npy) in [
            ("gpt2-logprobs.json", "gpt2/logits.npy"),
            ("gpt2-logprobs-noprompt.json", "gpt2b/logits.npy"),
        ] {
            let r = reference(json);
            let ids = ids_of(&r);
            let t = ids.len();
            let input = Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap();
            let logits = model.forward(&input, None).unwrap();
            let want = read_npy(&fixture(&format!("reference/{npy}"))).unwrap();
            let got: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got.len(), want.data.len());
            let d = got
                .iter()
                .zip(&want.data)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-4, "{json}: logits max abs diff {d}");
            let lp: Vec<f32> = next_token_logprobs(&logits, &input)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want: Vec<f64> = r["token_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            for (i, (g, w)) in lp.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(*g) - w).abs() < 1e-4,
                    "{json} token {i}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn differentiable_mode_computes_the_same_logits_and_has_gradients() {
        let mut model = Gpt2::load(&fixture("gpt2-tiny"), &Device::Cpu, DType::F32).unwrap();
        let ids = ids_of(&reference("gpt2-logprobs.json"));
        let t = ids.len();
        let input = Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap();
        let fused = model.forward(&input, None).unwrap();
        model.set_differentiable(true);
        let emb = candle_core::Var::from_tensor(&model.embed_tokens(&input).unwrap()).unwrap();
        let diff = model.forward_embeds(emb.as_tensor(), None).unwrap();
        let d = (&fused - &diff)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-4, "{d}");
        let grads = diff.sum_all().unwrap().backward().unwrap();
        let g = grads
            .get(emb.as_tensor())
            .expect("gradient reaches the input embeddings");
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }

    #[test]
    fn padding_on_the_right_leaves_real_positions_unchanged() {
        let model = Gpt2::load(&fixture("gpt2-tiny"), &Device::Cpu, DType::F32).unwrap();
        let ids = ids_of(&reference("gpt2-logprobs.json"));
        let t = ids.len();
        let mut padded = ids.clone();
        padded.extend([50256, 50256, 50256]);
        let keep: Vec<u32> = (0..t + 3).map(|i| u32::from(i < t)).collect();
        let a = model
            .forward(&Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap(), None)
            .unwrap();
        let b = model
            .forward(
                &Tensor::from_vec(padded, (1, t + 3), &Device::Cpu).unwrap(),
                Some(&Tensor::from_vec(keep, (1, t + 3), &Device::Cpu).unwrap()),
            )
            .unwrap()
            .narrow(1, 0, t)
            .unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn incremental_decoding_with_the_cache_equals_the_full_forward() {
        let model = Gpt2::load(&fixture("gpt2-tiny"), &Device::Cpu, DType::F32).unwrap();
        let ids = ids_of(&reference("gpt2-logprobs.json"));
        let t = ids.len();
        let input = Tensor::from_vec(ids.clone(), (1, t), &Device::Cpu).unwrap();
        let full = model.forward(&input, None).unwrap();
        let mut cache = KvCache::default();
        let emb = model.embed_tokens(&input).unwrap();
        let mut parts = vec![model
            .forward_cached(&emb.narrow(1, 0, 4).unwrap(), &mut cache)
            .unwrap()];
        for i in 4..t {
            parts.push(
                model
                    .forward_cached(&emb.narrow(1, i, 1).unwrap(), &mut cache)
                    .unwrap(),
            );
        }
        assert_eq!(cache.len(), t);
        let inc = model.lm_logits(&Tensor::cat(&parts, 1).unwrap()).unwrap();
        let d = (full - inc)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-4, "{d}");
    }

    #[test]
    fn the_cache_holds_no_graph_even_with_trainable_weights() {
        let cfg = Gpt2Config::from_file(&fixture("gpt2-tiny/config.json")).unwrap();
        let vars = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let mut model = Gpt2::new(&cfg, vb).unwrap();
        // Variable weights and differentiable ops: every output records its graph, as the
        // tensor-op path does on a GPU.
        model.set_differentiable(true);
        let ids = Tensor::new(&[[464u32, 2068, 7586]], &Device::Cpu).unwrap();
        let emb = model.embed_tokens(&ids).unwrap();
        let mut cache = KvCache::default();
        let h = model.forward_cached(&emb, &mut cache).unwrap();
        assert!(h.track_op(), "the step's output records its graph");
        model
            .forward_cached(&emb.narrow(1, 2, 1).unwrap(), &mut cache)
            .unwrap();
        assert_eq!(cache.layers.iter().flatten().count(), cfg.n_layer);
        for (k, v) in cache.layers.iter().flatten() {
            assert_eq!(k.dims(), &[1, cfg.n_head, 4, cfg.n_embd / cfg.n_head]);
            assert!(
                !k.track_op() && !v.track_op(),
                "cached keys/values hold no graph"
            );
        }
    }

    #[test]
    fn keys_without_the_transformer_prefix_load_too() {
        let tensors =
            candle_core::safetensors::load(fixture("gpt2-tiny/model.safetensors"), &Device::Cpu)
                .unwrap();
        let stripped: std::collections::HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches("transformer.").to_string(), v))
            .collect();
        let cfg = Gpt2Config::from_file(&fixture("gpt2-tiny/config.json")).unwrap();
        let vb = VarBuilder::from_tensors(stripped, DType::F32, &Device::Cpu);
        let model = Gpt2::new(&cfg, vb).unwrap();
        let ids = Tensor::from_vec(vec![464u32, 2068], (1, 2), &Device::Cpu).unwrap();
        assert_eq!(model.forward(&ids, None).unwrap().dims(), &[1, 2, 50257]);
    }
}
