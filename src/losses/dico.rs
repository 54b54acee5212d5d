//! Direct CLIP-based Optimisation (DiCO; Moratelli et al., BMVC 2024, eq. 4–6): a DPO-like
//! loss over several candidates per image, the best-rewarded one against the others weighted
//! by how far their reward falls short of it.
//!
//! Per image with candidates c_1..c_k, rewards r_i, winner w = argmax r (the first of ties):
//! - loser weights γ_i = softmax over the losers of τ·(r_w − r_i) (as the reference code:
//!   the further a loser falls behind, the more it weighs), Σ γ_i = 1;
//! - `logits = (π_w − Σ γ_i π_i) − (ref_w − Σ γ_i ref_i)` with π, ref the sequence
//!   log-probabilities under the policy and the frozen reference;
//! - loss = −log σ(β · logits), averaged over images;
//! - logged rewards: `rewards/chosen` = β (π_w − ref_w), `rewards/rejected` =
//!   β Σ γ_i (π_i − ref_i), as the reference code logs them.
//!
//! A candidate whose reward is not finite (an empty caption) takes no part; an image with
//! fewer than two finite rewards has nothing to rank and is skipped by the caller.

use candle_core::{DType, Result, Tensor};

use crate::losses::preference::log_sigmoid;

/// The winner and the loser weights of one image's candidates.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranking {
    /// Index of the best-rewarded candidate (the first of ties).
    pub winner: usize,
    /// γ per candidate: 0 for the winner and for candidates without a finite reward; the
    /// losers' sum to 1.
    pub gamma: Vec<f64>,
}

/// Ranks candidates by `rewards`; `None` when fewer than two rewards are finite.
pub fn rank_candidates(rewards: &[f64], tau: f64) -> Option<Ranking> {
    let finite: Vec<usize> = (0..rewards.len())
        .filter(|&i| rewards[i].is_finite())
        .collect();
    if finite.len() < 2 {
        return None;
    }
    let mut winner = finite[0];
    for &i in &finite {
        if rewards[i] > rewards[winner] {
            winner = i;
        }
    }
    let best = rewards[winner];
    let logits: Vec<(usize, f64)> = finite
        .iter()
        .filter(|&&i| i != winner)
        .map(|&i| (i, tau * (best - rewards[i])))
        .collect();
    let top = logits.iter().map(|l| l.1).fold(f64::MIN, f64::max);
    let total: f64 = logits.iter().map(|l| (l.1 - top).exp()).sum();
    let mut gamma = vec![0.0; rewards.len()];
    for (i, l) in logits {
        gamma[i] = (l - top).exp() / total;
    }
    Some(Ranking { winner, gamma })
}

/// The DiCO loss and its per-image rewards (detached).
pub struct DicoOutput {
    pub loss: Tensor,
    /// β (π_w − ref_w) per image, `(n,)`.
    pub chosen: Tensor,
    /// β Σ γ_i (π_i − ref_i) per image, `(n,)`.
    pub rejected: Tensor,
}

/// DiCO over `n` images whose candidates are rows of `policy` and `reference` (`(R,)`
/// sequence log-probabilities; only `policy` carries gradients): image `j` owns the rows
/// `rows[j]` (in its ranking's candidate order).
pub fn dico_loss(
    policy: &Tensor,
    reference: &Tensor,
    rankings: &[Ranking],
    rows: &[Vec<usize>],
    beta: f64,
) -> Result<DicoOutput> {
    let r = policy.dim(0)?;
    let n = rankings.len();
    let (mut win, mut lose) = (vec![0f32; n * r], vec![0f32; n * r]);
    for (j, (rank, own)) in rankings.iter().zip(rows).enumerate() {
        win[j * r + own[rank.winner]] = 1.0;
        for (c, &g) in rank.gamma.iter().enumerate() {
            lose[j * r + own[c]] = g as f32;
        }
    }
    let dev = policy.device();
    let win = Tensor::from_vec(win, (n, r), dev)?;
    let lose = Tensor::from_vec(lose, (n, r), dev)?;
    let ratio = (policy - reference.detach())?
        .to_dtype(DType::F32)?
        .unsqueeze(1)?;
    let chosen = (win.matmul(&ratio)?.squeeze(1)? * beta)?;
    let rejected = (lose.matmul(&ratio)?.squeeze(1)? * beta)?;
    let loss = log_sigmoid(&(&chosen - &rejected)?)?.neg()?.mean_all()?;
    Ok(DicoOutput {
        loss,
        chosen: chosen.detach(),
        rejected: rejected.detach(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn softmax(x: &[f64]) -> Vec<f64> {
        let m = x.iter().copied().fold(f64::MIN, f64::max);
        let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    fn ln_sigmoid(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }

    #[test]
    fn gamma_weighs_losers_by_their_shortfall_and_sums_to_one() {
        let r = [0.5, 0.9, 0.7, 0.9, 0.1];
        let rank = rank_candidates(&r, 10.0).unwrap();
        assert_eq!(rank.winner, 1, "the first of the tied best");
        let want = softmax(&[10.0 * 0.4, 10.0 * 0.2, 0.0, 10.0 * 0.8]);
        for (got, want) in [0usize, 2, 3, 4].iter().map(|&i| rank.gamma[i]).zip(want) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        assert_eq!(rank.gamma[1], 0.0);
        assert!((rank.gamma.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // The default τ = 300 over CLIP-sized gaps does not overflow.
        let rank = rank_candidates(&[1.2, 0.1, 0.3, 1.1, -0.5], 300.0).unwrap();
        assert!((rank.gamma.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(rank.gamma.iter().all(|g| g.is_finite()));
        // A non-finite reward takes no part; fewer than two finite ones: nothing to rank.
        let rank = rank_candidates(&[f64::NAN, 0.2, 0.4], 1.0).unwrap();
        assert_eq!((rank.winner, rank.gamma.clone()), (2, vec![0.0, 1.0, 0.0]));
        assert!(rank_candidates(&[f64::NAN, 0.2], 1.0).is_none());
        assert!(rank_candidates(&[0.2], 1.0).is_none());
    }

    /// Two images, five candidates each, a tie in reward and a candidate equal to the
    /// winner (same tokens, so the same log-probabilities): the loss and rewards by hand.
    #[test]
    fn the_loss_equals_the_hand_computed_value() {
        let dev = Device::Cpu;
        let (beta, tau) = (0.2, 3.0);
        let rewards = [
            vec![0.30, 0.50, 0.50, 0.10, 0.20], // tie at the top: candidate 1 wins
            vec![0.70, 0.40, 0.70, 0.60, 0.00], // candidate 2 repeats the winner 0
        ];
        let pi = [
            [-3.0, -2.0, -2.5, -6.0, -4.0],
            [-1.5, -3.0, -1.5, -2.0, -5.0],
        ];
        let re = [
            [-3.5, -2.5, -2.0, -5.0, -4.5],
            [-2.0, -2.5, -2.0, -2.5, -4.0],
        ];
        let flat = |a: &[[f64; 5]; 2]| {
            Tensor::from_vec(
                a.iter().flatten().map(|&v| v as f32).collect::<Vec<_>>(),
                10,
                &dev,
            )
            .unwrap()
        };
        let rankings: Vec<Ranking> = rewards
            .iter()
            .map(|r| rank_candidates(r, tau).unwrap())
            .collect();
        let rows = vec![(0..5).collect(), (5..10).collect()];
        let out = dico_loss(&flat(&pi), &flat(&re), &rankings, &rows, beta).unwrap();
        let mut want_loss = 0.0;
        let chosen = out.chosen.to_vec1::<f32>().unwrap();
        let rejected = out.rejected.to_vec1::<f32>().unwrap();
        for j in 0..2 {
            let r = &rewards[j];
            let w = if j == 0 { 1 } else { 0 };
            let losers: Vec<usize> = (0..5).filter(|&i| i != w).collect();
            let g = softmax(
                &losers
                    .iter()
                    .map(|&i| tau * (r[w] - r[i]))
                    .collect::<Vec<_>>(),
            );
            let c = beta * (pi[j][w] - re[j][w]);
            let l: f64 = losers
                .iter()
                .zip(&g)
                .map(|(&i, g)| g * (pi[j][i] - re[j][i]))
                .sum::<f64>()
                * beta;
            assert!((f64::from(chosen[j]) - c).abs() < 1e-5, "{j}");
            assert!((f64::from(rejected[j]) - l).abs() < 1e-5, "{j}");
            want_loss -= ln_sigmoid(c - l) / 2.0;
        }
        let got = f64::from(out.loss.to_scalar::<f32>().unwrap());
        assert!((got - want_loss).abs() < 1e-5, "{got} vs {want_loss}");
    }

    #[test]
    fn at_initialisation_the_loss_is_ln_2_and_gradients_reach_only_the_policy() {
        let dev = Device::Cpu;
        let values = vec![-2.0f32, -3.0, -1.0, -4.0, -2.5, -2.2];
        let policy = Var::from_vec(values.clone(), 6, &dev).unwrap();
        let reference = Var::from_vec(values, 6, &dev).unwrap();
        let rankings = vec![
            rank_candidates(&[0.1, 0.5, 0.3], 10.0).unwrap(),
            rank_candidates(&[0.9, 0.5, 0.2], 10.0).unwrap(),
        ];
        let rows = vec![vec![0, 1, 2], vec![3, 4, 5]];
        let out = dico_loss(
            policy.as_tensor(),
            reference.as_tensor(),
            &rankings,
            &rows,
            0.2,
        )
        .unwrap();
        let loss = f64::from(out.loss.to_scalar::<f32>().unwrap());
        assert!((loss - std::f64::consts::LN_2).abs() < 1e-6, "{loss}");
        let grads = out.loss.backward().unwrap();
        let g = grads
            .get(policy.as_tensor())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // d loss / d π_w = −β/2 · σ(0) / n_images, and the losers' gradients carry +γ.
        assert!((g[1] + 0.2 * 0.5 / 2.0).abs() < 1e-6, "{g:?}");
        assert!(g[0] > 0.0 && g[2] > 0.0);
        assert!(
            grads.get(reference.as_tensor()).is_none(),
            "the reference is frozen"
        );
    }
}
