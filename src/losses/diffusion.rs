//! The training loss of continuous diffusion over token embeddings (Diffusion-LM, Li et al.
//! 2022; DiffuSeq, Gong et al. 2023, `training_losses_seq2seq` with `predict_xstart`):
//! L = ‖x̂_0 − x_0‖² + (−log p(y | x_0)) + ‖μ_T(x_0)‖², the MSE of the predicted start, the
//! rounding NLL through the LM head tied to the embeddings, and the prior term. The forward
//! process and its schedules belong to the model ([`crate::models::diffusion`]).

use candle_core::{Tensor, D};

/// The three loss terms per row `(b,)`.
pub struct DiffusionTerms {
    /// Mean over positions and dimensions of (x̂_0 − x_0)².
    pub mse: Tensor,
    /// Mean over positions of −log p(y_i | x_0,i) through the tied LM head (rounding).
    pub rounding: Tensor,
    /// Mean of (√ᾱ_{T−1} x_0)²: the prior term pulling x_T towards N(0, I).
    pub prior: Tensor,
}

impl DiffusionTerms {
    /// Their sum, averaged over rows.
    pub fn total(&self) -> candle_core::Result<Tensor> {
        ((&self.mse + &self.rounding)? + &self.prior)?.mean_all()
    }
}

/// The terms for predicted starts `x0_hat` and targets `x0` (`(b, L, d)`), the rounding
/// log-probabilities `(b, L)` of the tokens under the LM head tied to the embeddings, read at
/// the (noised) start `x_start`, and ᾱ_{T−1}; the rounding NLL of each position weighted by
/// `token_weights` `(b, L)` when given (the refinement's dense rewards), else 1.
pub fn diffusion_terms(
    x0_hat: &Tensor,
    x0: &Tensor,
    rounding_logp: &Tensor,
    alpha_bar_last: f64,
    token_weights: Option<&Tensor>,
) -> candle_core::Result<DiffusionTerms> {
    let mse = (x0_hat - x0)?.sqr()?.mean(D::Minus1)?.mean(D::Minus1)?;
    let nll = rounding_logp.neg()?;
    let nll = match token_weights {
        Some(w) => (nll * w)?,
        None => nll,
    };
    let rounding = nll.mean(D::Minus1)?;
    let prior = (x0 * alpha_bar_last.sqrt())?
        .sqr()?
        .mean(D::Minus1)?
        .mean(D::Minus1)?;
    Ok(DiffusionTerms {
        mse,
        rounding,
        prior,
    })
}

/// Reward-weighted regression over one image's samples: softmax(R / `temperature`) of their
/// rewards (softmax of the advantage R − mean R, the same), or with `keep_top` k > 0 equal
/// weights on the k best (RAFT). A sample whose reward is not finite gets 0; weights sum to 1
/// unless no reward is finite (all 0).
pub fn rwr_weights(rewards: &[f64], temperature: f64, keep_top: usize) -> Vec<f64> {
    let finite: Vec<usize> = (0..rewards.len())
        .filter(|&i| rewards[i].is_finite())
        .collect();
    let mut w = vec![0.0; rewards.len()];
    if finite.is_empty() {
        return w;
    }
    if keep_top > 0 {
        let mut order = finite.clone();
        order.sort_by(|&a, &b| rewards[b].total_cmp(&rewards[a]).then(a.cmp(&b)));
        let k = keep_top.min(order.len());
        for &i in &order[..k] {
            w[i] = 1.0 / k as f64;
        }
        return w;
    }
    let max = finite
        .iter()
        .map(|&i| rewards[i])
        .fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for &i in &finite {
        w[i] = ((rewards[i] - max) / temperature).exp();
        sum += w[i];
    }
    w.iter_mut().for_each(|x| *x /= sum);
    w
}

/// Per-position weights of a caption's rounding NLL from its tokens' shaped rewards
/// `token_rewards` (T of them) on a sequence of `len` positions: T · softmax(R_t /
/// `temperature`) over the caption's tokens (mean 1: a token its reward favours counts more),
/// 1 on the padding after them. Non-finite rewards: all 1.
pub fn token_weights(token_rewards: &[f64], temperature: f64, len: usize) -> Vec<f32> {
    let t = token_rewards.len().min(len);
    let mut w = vec![1f32; len];
    if t == 0 || token_rewards.iter().any(|r| !r.is_finite()) {
        return w;
    }
    let soft = rwr_weights(&token_rewards[..t], temperature, 0);
    for i in 0..t {
        w[i] = (soft[i] * t as f64) as f32;
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `log softmax(logits)[token]` `(b, L)`: what the model's fused tied head returns.
    fn logp(logits: &Tensor, tokens: &Tensor) -> Tensor {
        candle_nn::ops::log_softmax(logits, D::Minus1)
            .unwrap()
            .gather(&tokens.unsqueeze(D::Minus1).unwrap(), D::Minus1)
            .unwrap()
            .squeeze(D::Minus1)
            .unwrap()
    }

    #[test]
    fn loss_terms_match_a_hand_computed_example() {
        let dev = Device::Cpu;
        // One row, two positions, dimension 2.
        let x0 = Tensor::new(&[[[1f32, 0.], [0., 2.]]], &dev).unwrap();
        let x0_hat = Tensor::new(&[[[0f32, 0.], [0., 1.]]], &dev).unwrap();
        // Logits over 3 tokens; targets 0 and 2.
        let logits = Tensor::new(&[[[0f32, 0., 0.], [1., 0., 1.]]], &dev).unwrap();
        let tokens = Tensor::new(&[[0u32, 2]], &dev).unwrap();
        let t = diffusion_terms(&x0_hat, &x0, &logp(&logits, &tokens), 0.25, None).unwrap();
        let get = |x: &Tensor| x.to_vec1::<f32>().unwrap()[0] as f64;
        // ((1)² + 0 + 0 + (1)²)/4
        assert!((get(&t.mse) - 0.5).abs() < 1e-6);
        let nll0 = 3f64.ln();
        let nll1 = -(1.0 - (2.0 * 1f64.exp() + 1.0).ln());
        assert!((get(&t.rounding) - (nll0 + nll1) / 2.0).abs() < 1e-6);
        // 0.25 · (1 + 0 + 0 + 4)/4
        assert!((get(&t.prior) - 0.3125).abs() < 1e-6);
        let total = t.total().unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((total - (0.5 + (nll0 + nll1) / 2.0 + 0.3125)).abs() < 1e-5);
    }

    #[test]
    fn token_weights_scale_each_positions_rounding_nll() {
        let dev = Device::Cpu;
        let x0 = Tensor::zeros((1, 2, 2), candle_core::DType::F32, &dev).unwrap();
        let logits = Tensor::new(&[[[0f32, 0., 0.], [1., 0., 1.]]], &dev).unwrap();
        let tokens = Tensor::new(&[[0u32, 2]], &dev).unwrap();
        let w = Tensor::new(&[[0.5f32, 1.5]], &dev).unwrap();
        let t = diffusion_terms(&x0, &x0, &logp(&logits, &tokens), 0.25, Some(&w)).unwrap();
        let nll0 = 3f64.ln();
        let nll1 = -(1.0 - (2.0 * 1f64.exp() + 1.0).ln());
        let got = t.rounding.to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got - (0.5 * nll0 + 1.5 * nll1) / 2.0).abs() < 1e-6);
    }

    #[test]
    fn rwr_weights_are_a_softmax_of_the_rewards_or_the_top_k() {
        let w = rwr_weights(&[1.0, 2.0, f64::NAN, 0.0], 0.5, 0);
        let z = (2f64).exp() + (4f64).exp() + 1.0;
        for (got, want) in w.iter().zip([2f64.exp() / z, 4f64.exp() / z, 0.0, 1.0 / z]) {
            assert!((got - want).abs() < 1e-12, "{w:?}");
        }
        // Shifting every reward (an advantage) changes nothing.
        let shifted = rwr_weights(&[11.0, 12.0, f64::NAN, 10.0], 0.5, 0);
        assert!(w.iter().zip(&shifted).all(|(a, b)| (a - b).abs() < 1e-12));
        assert_eq!(
            rwr_weights(&[1.0, 3.0, 2.0, f64::NAN], 1.0, 2),
            [0.0, 0.5, 0.5, 0.0]
        );
        assert_eq!(rwr_weights(&[f64::NAN, f64::NAN], 1.0, 0), [0.0, 0.0]);
    }

    #[test]
    fn token_weights_average_one_over_the_caption_and_leave_padding_at_one() {
        let w = token_weights(&[0.0, 1.0, 0.0], 1.0, 5);
        let mean: f32 = w[..3].iter().sum::<f32>() / 3.0;
        assert!((mean - 1.0).abs() < 1e-6 && w[1] > w[0] && w[0] == w[2]);
        assert_eq!(&w[3..], &[1.0, 1.0]);
        assert_eq!(token_weights(&[f64::NAN, 1.0], 1.0, 3), [1.0, 1.0, 1.0]);
        assert_eq!(token_weights(&[], 1.0, 2), [1.0, 1.0]);
    }
}
