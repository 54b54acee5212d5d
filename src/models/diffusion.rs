//! A caption diffusion model in the Diffusion-LM / DiffuSeq family: tokens become learned
//! embeddings x_0, a forward process q(x_t | x_0) noises them over T steps (the `sqrt`
//! schedule of Diffusion-LM, or `cosine`), and a bidirectional transformer conditioned on the
//! CLIP image predicts x_0 from x_t; decoding runs the reverse process on a respaced chain
//! from Gaussian noise, optionally clamping each prediction to its nearest token embedding
//! (DiffuSeq's clamping trick), and rounds the result through the LM head tied to the
//! embeddings.
//!
//! Timesteps are 0-based, t = 0..T−1, as in improved-diffusion: ᾱ_t = Π_{s ≤ t} (1 − β_s).

use candle_core::{Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use std::path::Path;

use candle_nn::VarMap;

use crate::error::{CandleContext, Error, Result};
use crate::models::gpt2::{tied_logprobs, DecoderFiles, Gpt2, Gpt2Config};
use crate::rng::SplitMix64;

/// How ᾱ falls with t.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoiseSchedule {
    /// Diffusion-LM's: ᾱ(s) = 1 − √(s + 10⁻⁴), s = t/T (noise rises fast at the start).
    Sqrt,
    /// Nichol & Dhariwal's: ᾱ(s) = cos²((s + 0.008)/1.008 · π/2).
    Cosine,
}

impl NoiseSchedule {
    /// ᾱ at fraction `s` of the process (before the β clipping).
    fn alpha_bar(self, s: f64) -> f64 {
        match self {
            NoiseSchedule::Sqrt => 1.0 - (s + 1e-4).sqrt(),
            NoiseSchedule::Cosine => ((s + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                .cos()
                .powi(2),
        }
    }
}

/// The largest β (improved-diffusion's `max_beta`).
const MAX_BETA: f64 = 0.999;

/// A discretised forward process: ᾱ_t for t = 0..T−1.
#[derive(Debug, Clone, PartialEq)]
pub struct Diffusion {
    pub alphas_bar: Vec<f64>,
}

impl Diffusion {
    /// `steps` (T) steps of `schedule`: β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), 0.999)
    /// (improved-diffusion's `betas_for_alpha_bar`), ᾱ_t = Π (1 − β).
    pub fn new(schedule: NoiseSchedule, steps: usize) -> Self {
        let mut alphas_bar = Vec::with_capacity(steps);
        let mut prod = 1.0;
        for t in 0..steps {
            let (a, b) = (t as f64 / steps as f64, (t + 1) as f64 / steps as f64);
            let beta = (1.0 - schedule.alpha_bar(b) / schedule.alpha_bar(a)).min(MAX_BETA);
            prod *= 1.0 - beta;
            alphas_bar.push(prod);
        }
        Self { alphas_bar }
    }

    pub fn steps(&self) -> usize {
        self.alphas_bar.len()
    }

    /// Mean coefficient √ᾱ_t and variance 1 − ᾱ_t of q(x_t | x_0).
    pub fn q_mean_var(&self, t: usize) -> (f64, f64) {
        let ab = self.alphas_bar[t];
        (ab.sqrt(), 1.0 - ab)
    }

    /// x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε for `(b, L, d)` x_0 and noise, one t per row.
    pub fn q_sample(
        &self,
        x0: &Tensor,
        t: &[usize],
        noise: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, _, _) = x0.dims3()?;
        if t.len() != b {
            candle_core::bail!("{} timesteps for {b} rows", t.len());
        }
        let coef = |f: &dyn Fn(usize) -> f64| -> candle_core::Result<Tensor> {
            let v: Vec<f32> = t.iter().map(|&t| f(t) as f32).collect();
            Tensor::from_vec(v, (b, 1, 1), x0.device())?.to_dtype(x0.dtype())
        };
        let mean = coef(&|t| self.q_mean_var(t).0)?;
        let std = coef(&|t| self.q_mean_var(t).1.sqrt())?;
        x0.broadcast_mul(&mean)? + noise.broadcast_mul(&std)?
    }

    /// `count` timesteps of the T, evenly spaced from 0 to T−1 (improved-diffusion's
    /// `space_timesteps` with one section), ascending.
    pub fn respaced(&self, count: usize) -> Vec<usize> {
        let t = self.steps();
        if count <= 1 || t <= 1 {
            return vec![t.saturating_sub(1)];
        }
        let stride = (t - 1) as f64 / (count - 1) as f64;
        let mut out: Vec<usize> = (0..count)
            .map(|i| (i as f64 * stride).round() as usize)
            .collect();
        out.dedup();
        out
    }

    /// The Gaussian posterior q(x_{prev} | x_t, x_0) between two kept timesteps `prev` < `t`
    /// of a respaced chain (`prev` = None: t is the chain's first step and x_{prev} = x_0).
    pub fn posterior(&self, t: usize, prev: Option<usize>) -> Posterior {
        let ab_t = self.alphas_bar[t];
        let Some(prev) = prev else {
            return Posterior {
                coef_x0: 1.0,
                coef_xt: 0.0,
                variance: 0.0,
            };
        };
        let ab_prev = self.alphas_bar[prev];
        // The respaced chain's own β between the two kept steps.
        let alpha = ab_t / ab_prev;
        let beta = 1.0 - alpha;
        Posterior {
            coef_x0: ab_prev.sqrt() * beta / (1.0 - ab_t),
            coef_xt: alpha.sqrt() * (1.0 - ab_prev) / (1.0 - ab_t),
            variance: beta * (1.0 - ab_prev) / (1.0 - ab_t),
        }
    }
}

/// μ = `coef_x0`·x_0 + `coef_xt`·x_t, σ² = `variance`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Posterior {
    pub coef_x0: f64,
    pub coef_xt: f64,
    pub variance: f64,
}

/// The model's shape and its diffusion process, as `[train_diffusion]` sets them; recorded in
/// `diffusion.json` to rebuild it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionSpec {
    pub vocab_size: usize,
    /// Width of the token embeddings x_0 (DiffuSeq's `hidden_t_dim`).
    pub embedding_dim: usize,
    /// Fixed caption length L, end-of-text padding included.
    pub max_tokens: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Transformer positions the image takes before the caption.
    pub prefix_length: usize,
    /// Width of the CLIP image embedding it is conditioned on.
    pub clip_dim: usize,
    pub schedule: NoiseSchedule,
    pub diffusion_steps: usize,
}

/// The denoiser and its embeddings.
pub struct DiffusionCaptioner {
    pub spec: DiffusionSpec,
    /// `(V, e)`: token embeddings and, transposed, the rounding LM head.
    word: Tensor,
    in_proj: candle_nn::Linear,
    out_proj: candle_nn::Linear,
    time_1: candle_nn::Linear,
    time_2: candle_nn::Linear,
    prefix: candle_nn::Linear,
    /// GPT-2-shaped blocks run without the causal mask (its `wpe` gives the positions; its
    /// one-row `wte` is unused).
    encoder: Gpt2,
    pub process: Diffusion,
}

/// Names of the variables under the model's prefix that are not GPT-2's.
pub const PREFIX: &str = "diffusion.";

impl DiffusionCaptioner {
    /// Builds the model's variables in `vb` (under [`PREFIX`]).
    pub fn new(spec: &DiffusionSpec, vb: VarBuilder) -> candle_core::Result<Self> {
        if !spec.n_embd.is_multiple_of(spec.n_head) {
            candle_core::bail!(
                "n_embd {} is not a multiple of n_head {}",
                spec.n_embd,
                spec.n_head
            );
        }
        let vb = vb.pp("diffusion");
        let n = spec.n_embd;
        let gpt = Gpt2Config {
            vocab_size: 1,
            n_positions: spec.prefix_length + spec.max_tokens,
            n_embd: n,
            n_layer: spec.n_layer,
            n_head: spec.n_head,
            ..Gpt2Config::gpt2_small()
        };
        let mut encoder = Gpt2::new(&gpt, vb.pp("encoder"))?;
        encoder.set_differentiable(true);
        Ok(Self {
            word: vb.get((spec.vocab_size, spec.embedding_dim), "word_embedding")?,
            in_proj: candle_nn::linear(spec.embedding_dim, n, vb.pp("in_proj"))?,
            out_proj: candle_nn::linear(n, spec.embedding_dim, vb.pp("out_proj"))?,
            time_1: candle_nn::linear(n, 4 * n, vb.pp("time_1"))?,
            time_2: candle_nn::linear(4 * n, n, vb.pp("time_2"))?,
            prefix: candle_nn::linear(spec.clip_dim, spec.prefix_length * n, vb.pp("prefix"))?,
            encoder,
            process: Diffusion::new(spec.schedule, spec.diffusion_steps),
            spec: spec.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        self.word.device()
    }

    /// Switches the blocks between differentiable primitives (training) and fused kernels.
    pub fn set_differentiable(&mut self, on: bool) {
        self.encoder.set_differentiable(on);
    }

    /// x_0: the embeddings of `tokens` `(b, L)` → `(b, L, e)`.
    pub fn embed(&self, tokens: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l) = tokens.dims2()?;
        self.word
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, l, self.spec.embedding_dim))
    }

    /// Rounding logits `(b, L, V)` of embeddings `(b, L, e)`: the LM head tied to them.
    pub fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, e) = x.dims3()?;
        x.reshape((b * l, e))?
            .matmul(&self.word.t()?)?
            .reshape((b, l, self.spec.vocab_size))
    }

    /// log p(`tokens` | `x`) `(b, L)` under the rounding head for embeddings `x` `(b, L, e)`:
    /// one fused op on the CPU, the `(b·L, V)` logits never in the autograd graph.
    pub fn rounding_logprobs(&self, x: &Tensor, tokens: &Tensor) -> candle_core::Result<Tensor> {
        tied_logprobs(x, &self.word, tokens, true)
    }

    /// x̂_0 `(b, L, e)` from x_t `(b, L, e)` at timesteps `t` (one per row) for CLIP image
    /// embeddings `clip` `(b, clip_dim)`.
    pub fn denoise(&self, x_t: &Tensor, t: &[usize], clip: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, _) = x_t.dims3()?;
        let n = self.spec.n_embd;
        let h = self.in_proj.forward(x_t)?;
        let temb = timestep_embedding(t, n, x_t.device())?.to_dtype(x_t.dtype())?;
        let temb = self.time_2.forward(&self.time_1.forward(&temb)?.silu()?)?;
        let h = h.broadcast_add(&temb.unsqueeze(1)?)?;
        let p = self.spec.prefix_length;
        let prefix = self.prefix.forward(clip)?.reshape((b, p, n))?;
        let seq = Tensor::cat(&[&prefix, &h], 1)?;
        let out = self.encoder.forward_hidden_bidirectional(&seq)?;
        self.out_proj.forward(&out.narrow(1, p, l)?)
    }

    /// One training pass over `tokens` `(b, L)` for CLIP embeddings `clip`, as DiffuSeq's
    /// `training_losses_seq2seq`: x_0 = their embeddings, x_start = x_0 + √(1 − ᾱ_0) ε₀, a
    /// timestep per row uniform over the T, x_t ~ q(x_t | x_start), and x̂_0; noise and
    /// timesteps from `rng`. Returns (x̂_0, x_0, the rounding log-probabilities `(b, L)` of
    /// the tokens at x_start): what the loss terms take.
    pub fn training_pass(
        &self,
        tokens: &Tensor,
        clip: &Tensor,
        rng: &mut SplitMix64,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (b, l) = tokens.dims2()?;
        let e = self.spec.embedding_dim;
        let dev = self.device();
        let t: Vec<usize> = (0..b)
            .map(|_| rng.below(self.spec.diffusion_steps as u64) as usize)
            .collect();
        let x0 = self.embed(tokens)?;
        let std0 = self.process.q_mean_var(0).1.sqrt();
        let noise0 = Tensor::from_vec(rng.normal_samples(b * l * e, 1.0), (b, l, e), dev)?;
        let x_start = (&x0 + (noise0 * std0)?)?;
        let noise = Tensor::from_vec(rng.normal_samples(b * l * e, 1.0), (b, l, e), dev)?;
        let x_t = self.process.q_sample(&x_start, &t, &noise)?;
        let x0_hat = self.denoise(&x_t, &t, clip)?;
        Ok((x0_hat, x0, self.rounding_logprobs(&x_start, tokens)?))
    }

    /// ᾱ_{T−1}: what the prior term scales x_0 by (squared).
    pub fn alpha_bar_last(&self) -> f64 {
        *self.process.alphas_bar.last().unwrap_or(&0.0)
    }

    /// Each position of `x` `(b, L, e)` replaced by its nearest token embedding (L2; DiffuSeq's
    /// clamping), and those tokens.
    pub fn clamp(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        // argmin ‖x − w‖² = argmax (2 x·w − ‖w‖²).
        let norms = self.word.sqr()?.sum(1)?;
        let score = (self.logits(x)? * 2.0)?.broadcast_sub(&norms)?;
        let ids = score.argmax(candle_core::D::Minus1)?;
        Ok((self.embed(&ids)?, ids))
    }

    /// Captions' token ids `(b, L)` for CLIP embeddings `clip` `(b, clip_dim)` by the reverse
    /// process over `sampling_steps` timesteps respaced from T, starting from noise drawn
    /// from `seed`; with `clamp`, every x̂_0 is clamped to token embeddings. Returns the
    /// rounded ids and the rounding softmax's probability of each.
    pub fn sample(
        &self,
        clip: &Tensor,
        sampling_steps: usize,
        clamp: bool,
        seed: u64,
    ) -> candle_core::Result<Decoded> {
        Ok(self
            .sample_chain(clip, sampling_steps, clamp, seed, false)?
            .0)
    }

    /// [`Self::sample`], and with `record` every stochastic transition of the chain (a
    /// policy-gradient step's actions: DDPO).
    pub fn sample_chain(
        &self,
        clip: &Tensor,
        sampling_steps: usize,
        clamp: bool,
        seed: u64,
        record: bool,
    ) -> candle_core::Result<(Decoded, Vec<Transition>)> {
        let (b, _) = clip.dims2()?;
        let (l, e) = (self.spec.max_tokens, self.spec.embedding_dim);
        let dev = clip.device();
        let mut rng = SplitMix64::derived(seed, "diffusion-sample");
        let noise = |rng: &mut SplitMix64| -> candle_core::Result<Tensor> {
            Tensor::from_vec(rng.normal_samples(b * l * e, 1.0), (b, l, e), dev)
        };
        let mut x = noise(&mut rng)?;
        let kept = self.process.respaced(sampling_steps);
        let mut chain = Vec::new();
        for i in (0..kept.len()).rev() {
            let t = kept[i];
            let mut x0 = self.denoise(&x, &vec![t; b], clip)?;
            if clamp {
                x0 = self.clamp(&x0)?.0;
            }
            let post = self.process.posterior(t, i.checked_sub(1).map(|j| kept[j]));
            let mean = ((x0 * post.coef_x0)? + (&x * post.coef_xt)?)?;
            let next = if post.variance > 0.0 {
                (mean + (noise(&mut rng)? * post.variance.sqrt())?)?
            } else {
                mean
            };
            if record && post.variance > 0.0 {
                chain.push(Transition {
                    t,
                    posterior: post,
                    x_t: x.detach(),
                    x_prev: next.detach(),
                });
            }
            x = next;
        }
        let probs = candle_nn::ops::softmax_last_dim(&self.logits(&x)?)?;
        let ids = probs.argmax(candle_core::D::Minus1)?;
        let conf = probs
            .gather(&ids.unsqueeze(2)?, 2)?
            .squeeze(2)?
            .to_vec2::<f32>()?;
        Ok(((ids.to_vec2::<u32>()?, conf), chain))
    }

    /// log p_θ(x_prev | x_t) of a recorded transition under the current parameters, per row
    /// `(b,)`, averaged over positions and dimensions (DDPO's per-step log-probability, up to
    /// its constant): −(x_prev − μ_θ(x_t))² / 2σ² with μ_θ = c₀ x̂_0(x_t) + c_t x_t (no
    /// clamping: it has no gradient).
    pub fn transition_logprob(
        &self,
        step: &Transition,
        clip: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let b = step.x_t.dim(0)?;
        let p = &step.posterior;
        let x0 = self.denoise(&step.x_t, &vec![step.t; b], clip)?;
        let mean = ((x0 * p.coef_x0)? + (&step.x_t * p.coef_xt)?)?;
        ((&step.x_prev - mean)?.sqr()? / (-2.0 * p.variance))?
            .mean(candle_core::D::Minus1)?
            .mean(candle_core::D::Minus1)
    }
}

/// One stochastic step of the reverse process: from x_t at timestep `t` to the drawn x_prev.
#[derive(Debug, Clone)]
pub struct Transition {
    pub t: usize,
    pub posterior: Posterior,
    pub x_t: Tensor,
    pub x_prev: Tensor,
}

/// Decoded captions: token ids `(b, L)` and the rounding softmax's probability of each.
pub type Decoded = (Vec<Vec<u32>>, Vec<Vec<f32>>);

/// The sinusoidal embedding of timesteps (improved-diffusion's `timestep_embedding`, max
/// period 10⁴): `(b, dim)`, cosines then sines.
pub fn timestep_embedding(t: &[usize], dim: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    let mut v = Vec::with_capacity(t.len() * dim);
    for &step in t {
        let freqs = (0..half).map(|i| (-(10_000f64.ln()) * i as f64 / half as f64).exp());
        let args: Vec<f64> = freqs.map(|f| step as f64 * f).collect();
        v.extend(args.iter().map(|a| a.cos() as f32));
        v.extend(args.iter().map(|a| a.sin() as f32));
        v.extend(std::iter::repeat_n(0f32, dim - 2 * half));
    }
    Tensor::from_vec(v, (t.len(), dim), dev)
}

/// The token ids of a caption up to its first end-of-text (`eos`), which is also the padding.
pub fn cut_at_padding(ids: &[u32], eos: u32) -> &[u32] {
    let end = ids.iter().position(|&i| i == eos).unwrap_or(ids.len());
    &ids[..end]
}

/// How to rebuild a trained diffusion model (`<stage dir>/diffusion.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiffusionManifest {
    pub spec: DiffusionSpec,
    /// The tokenizer's files (a GPT-2's).
    pub decoder_files: DecoderFiles,
    pub eos: u32,
    /// The CLIP whose image embeddings condition it.
    pub clip_model: String,
    pub clip_revision: String,
}

impl DiffusionManifest {
    pub fn load(path: &Path) -> Result<Self> {
        crate::io::read_json(path)
    }

    /// The model with the weights of `checkpoint` (a `model.safetensors`), for decoding.
    pub fn model(&self, checkpoint: &Path, device: &Device) -> Result<DiffusionCaptioner> {
        let (mut model, _) = self.model_and_vars(checkpoint, device)?;
        model.set_differentiable(false);
        Ok(model)
    }

    /// The model with the weights of `checkpoint`, and its variables (to train further).
    pub fn model_and_vars(
        &self,
        checkpoint: &Path,
        device: &Device,
    ) -> Result<(DiffusionCaptioner, VarMap)> {
        let mut vars = VarMap::new();
        let model = build(&self.spec, &vars, device)?;
        vars.load(checkpoint).map_err(|e| Error::BadFile {
            path: checkpoint.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok((model, vars))
    }

    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        Ok(self.decoder_files.tokenizer()?.0)
    }
}

/// The model's variables in `vars` (not yet initialised: seed or load them).
pub fn build(spec: &DiffusionSpec, vars: &VarMap, device: &Device) -> Result<DiffusionCaptioner> {
    let vb = VarBuilder::from_varmap(vars, candle_core::DType::F32, device);
    DiffusionCaptioner::new(spec, vb).during("building the diffusion model")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedules_follow_their_closed_forms() {
        for schedule in [NoiseSchedule::Sqrt, NoiseSchedule::Cosine] {
            let d = Diffusion::new(schedule, 2000);
            assert_eq!(d.steps(), 2000);
            // ᾱ_t telescopes to ᾱ((t+1)/T)/ᾱ(0) while no β is clipped.
            for t in [0usize, 10, 500, 1000, 1500] {
                let want = schedule.alpha_bar((t + 1) as f64 / 2000.0) / schedule.alpha_bar(0.0);
                assert!((d.alphas_bar[t] - want).abs() < 1e-9, "{schedule:?} t={t}");
                let (mean, var) = d.q_mean_var(t);
                assert!(
                    (mean * mean + var - 1.0).abs() < 1e-12,
                    "variance preserving"
                );
            }
            assert!(d.alphas_bar.windows(2).all(|w| w[1] < w[0]), "ᾱ falls");
            assert!(
                *d.alphas_bar.last().unwrap() < 1e-2,
                "x_T is nearly pure noise"
            );
        }
        // The sqrt schedule adds noise much faster at the start than the cosine one.
        let (s, c) = (
            Diffusion::new(NoiseSchedule::Sqrt, 2000),
            Diffusion::new(NoiseSchedule::Cosine, 2000),
        );
        assert!(s.alphas_bar[20] < 0.92 && c.alphas_bar[20] > 0.99);
    }

    #[test]
    fn q_sample_has_the_closed_form_mean_and_variance() {
        let d = Diffusion::new(NoiseSchedule::Sqrt, 100);
        let dev = Device::Cpu;
        let (b, l, dim) = (2, 500, 8);
        let x0 = Tensor::ones((b, l, dim), candle_core::DType::F32, &dev).unwrap();
        let noise = Tensor::randn(0f32, 1.0, (b, l, dim), &dev).unwrap();
        let ts = [3usize, 80];
        let xt = d.q_sample(&x0, &ts, &noise).unwrap();
        for (row, &t) in ts.iter().enumerate() {
            let v: Vec<f32> = xt
                .get(row)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let n = v.len() as f64;
            let mean = v.iter().map(|x| *x as f64).sum::<f64>() / n;
            let var = v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / n;
            let (m, s2) = d.q_mean_var(t);
            assert!(
                (mean - m).abs() < 4.0 * (s2 / n).sqrt() + 1e-6,
                "t={t}: {mean} vs {m}"
            );
            assert!((var / s2 - 1.0).abs() < 0.1, "t={t}: {var} vs {s2}");
        }
    }

    #[test]
    fn respacing_keeps_both_ends_and_the_posterior_interpolates() {
        let d = Diffusion::new(NoiseSchedule::Sqrt, 2000);
        let kept = d.respaced(100);
        assert_eq!(kept.len(), 100);
        assert_eq!((kept[0], kept[99]), (0, 1999));
        assert_eq!(d.respaced(1), vec![1999]);
        // Between adjacent original steps the posterior is DDPM's.
        let p = d.posterior(10, Some(9));
        let (ab, abp) = (d.alphas_bar[10], d.alphas_bar[9]);
        let beta = 1.0 - ab / abp;
        assert!((p.variance - beta * (1.0 - abp) / (1.0 - ab)).abs() < 1e-15);
        // E[x_prev] from E[x_t] = √ᾱ_t x0 is √ᾱ_prev x0: the posterior keeps the marginal.
        let x0 = 1.7;
        let mean = p.coef_x0 * x0 + p.coef_xt * ab.sqrt() * x0;
        assert!((mean - abp.sqrt() * x0).abs() < 1e-12);
        assert_eq!(d.posterior(0, None).coef_x0, 1.0);
    }

    fn tiny(steps: usize) -> (DiffusionCaptioner, VarMap) {
        let spec = DiffusionSpec {
            vocab_size: 11,
            embedding_dim: 4,
            max_tokens: 6,
            n_layer: 1,
            n_head: 2,
            n_embd: 8,
            prefix_length: 2,
            clip_dim: 3,
            schedule: NoiseSchedule::Sqrt,
            diffusion_steps: steps,
        };
        let vars = VarMap::new();
        let model = build(&spec, &vars, &Device::Cpu).unwrap();
        crate::models::seed_vars(&vars, PREFIX, "test", 7).unwrap();
        (model, vars)
    }

    #[test]
    fn clamping_returns_embeddings_of_real_tokens() {
        let (model, _vars) = tiny(10);
        let x = Tensor::randn(0f32, 1.0, (2, 6, 4), &Device::Cpu).unwrap();
        let (clamped, ids) = model.clamp(&x).unwrap();
        let again = model.embed(&ids).unwrap();
        let diff = (clamped - &again)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        // And each is the nearest: no token embedding is closer.
        let xs: Vec<Vec<Vec<f32>>> = x.to_vec3().unwrap();
        let words: Vec<Vec<f32>> = model.word.to_vec2().unwrap();
        let ids: Vec<Vec<u32>> = ids.to_vec2().unwrap();
        let d2 = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>();
        for (r, row) in xs.iter().enumerate() {
            for (p, v) in row.iter().enumerate() {
                let best = d2(v, &words[ids[r][p] as usize]);
                assert!(words.iter().all(|w| d2(v, w) >= best - 1e-5));
            }
        }
    }

    #[test]
    fn decoding_is_seeded_and_one_step_is_rounding_the_prediction() {
        let (model, _vars) = tiny(50);
        let clip = Tensor::new(&[[0.5f32, -1.0, 2.0], [1.0, 0.0, 0.0]], &Device::Cpu).unwrap();
        let a = model.sample(&clip, 10, true, 3).unwrap();
        assert_eq!(
            a,
            model.sample(&clip, 10, true, 3).unwrap(),
            "same seed, same captions"
        );
        assert_ne!(
            a.1,
            model.sample(&clip, 10, true, 4).unwrap().1,
            "another seed, other noise"
        );
        assert!(a.1.iter().flatten().all(|p| (0.0..=1.0).contains(p)));

        // T = 1: one reverse step, x = x̂0(noise), rounded through the LM head.
        let (one, _vars) = tiny(1);
        let (ids, _) = one.sample(&clip, 1, false, 9).unwrap();
        let mut rng = SplitMix64::derived(9, "diffusion-sample");
        let noise =
            Tensor::from_vec(rng.normal_samples(2 * 6 * 4, 1.0), (2, 6, 4), &Device::Cpu).unwrap();
        let x0 = one.denoise(&noise, &[0, 0], &clip).unwrap();
        let want: Vec<Vec<u32>> = one
            .logits(&x0)
            .unwrap()
            .argmax(candle_core::D::Minus1)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(ids, want);
    }

    #[test]
    fn captions_stop_at_the_first_padding() {
        assert_eq!(cut_at_padding(&[4, 5, 0, 6, 0], 0), &[4, 5]);
        assert_eq!(cut_at_padding(&[0, 5], 0), &[] as &[u32]);
        assert_eq!(cut_at_padding(&[4, 5], 0), &[4, 5]);
    }

    #[test]
    fn timestep_embeddings_are_cosines_then_sines() {
        let e: Vec<Vec<f32>> = timestep_embedding(&[0, 7], 6, &Device::Cpu)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(e[0], [1., 1., 1., 0., 0., 0.]);
        assert!((e[1][0] - 7f32.cos()).abs() < 1e-6 && (e[1][3] - 7f32.sin()).abs() < 1e-6);
        let f2 = (-(10_000f64.ln()) * 2.0 / 3.0).exp();
        assert!((e[1][5] as f64 - (7.0 * f2).sin()).abs() < 1e-6);
    }

    #[test]
    fn a_transition_drawn_by_the_chain_has_the_gaussians_log_probability() {
        let (model, _vars) = tiny(50);
        let clip = Tensor::new(&[[0.5f32, -1.0, 2.0], [1.0, 0.0, 0.0]], &Device::Cpu).unwrap();
        let (decoded, chain) = model.sample_chain(&clip, 10, false, 3, true).unwrap();
        assert_eq!(
            decoded,
            model.sample(&clip, 10, false, 3).unwrap(),
            "recording changes nothing"
        );
        assert_eq!(chain.len(), 9, "every step but the last, deterministic one");
        // Under the parameters that drew it, x_prev − μ = σε: the mean of −ε²/2 over 6 × 4
        // dimensions per row, about −0.5.
        for step in &chain {
            let lp: Vec<f32> = model
                .transition_logprob(step, &clip)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(lp.iter().all(|v| (-1.5..0.0).contains(v)), "{lp:?}");
        }
        let all: f32 = chain
            .iter()
            .map(|s| {
                model
                    .transition_logprob(s, &clip)
                    .unwrap()
                    .mean_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .sum::<f32>()
            / 9.0;
        assert!((all + 0.5).abs() < 0.1, "{all}");
    }
}
