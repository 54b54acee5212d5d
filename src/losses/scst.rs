//! Self-critical sequence training (Rennie et al., CVPR 2017, eq. 8–9): REINFORCE on sampled
//! captions with the reward of the model's own greedy caption as the baseline.
//!
//! For sampled captions y^s with rewards r(y^s) and the greedy caption ŷ of the same image,
//! the advantage is `a = r(y^s) − r(ŷ)` and the loss is `−Σ_s a_s Σ_t log p(y^s_t) / Σ_s T_s`:
//! the mean over sampled tokens of the advantage times the token's log-probability. Samples
//! that beat the greedy caption are made more likely, the others less.

use candle_core::{DType, Result, Tensor};

/// The SCST loss of rows whose summed log-probabilities are `logps` `(R,)` (with gradients)
/// over `tokens` `(R,)` tokens each, with per-row `advantages` (rewards minus the greedy
/// baseline; computed without gradients).
pub fn scst_loss(logps: &Tensor, tokens: &Tensor, advantages: &[f32]) -> Result<Tensor> {
    let adv = Tensor::from_slice(advantages, advantages.len(), logps.device())?;
    let total = f64::from(tokens.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?).max(1.0);
    (logps.to_dtype(DType::F32)? * adv)?.sum_all()?.neg()? / total
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn samples_that_beat_the_greedy_caption_are_pushed_up() {
        let dev = Device::Cpu;
        let logps = Var::from_vec(vec![-4.0f32, -6.0, -3.0], 3, &dev).unwrap();
        let tokens = Tensor::new(&[4f32, 6.0, 2.0], &dev).unwrap();
        // Rewards 0.9, 0.2, 0.5 against a greedy caption's 0.5.
        let adv = [0.4f32, -0.3, 0.0];
        let loss = scst_loss(logps.as_tensor(), &tokens, &adv).unwrap();
        let want = -(0.4 * -4.0 + -0.3 * -6.0 + 0.0) / 12.0;
        assert!((f64::from(loss.to_scalar::<f32>().unwrap()) - want).abs() < 1e-6);
        let g = loss.backward().unwrap();
        let g = g.get(logps.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        // Gradient descent moves log p against the gradient: up for a positive advantage,
        // down for a negative one, not at all for a sample as good as the baseline.
        assert!(g[0] < 0.0 && g[1] > 0.0 && g[2] == 0.0, "{g:?}");
        assert!((g[0] + 0.4 / 12.0).abs() < 1e-7);
    }
}
