//! Reward modelling and reward shaping, the pieces of the hierarchical-RLHF recipe.
//!
//! **Bradley-Terry** (TRL's `RewardTrainer.compute_loss`): for a pair's scalar rewards r_c and
//! r_r, loss = −log σ(r_c − r_r − margin), averaged over pairs, plus
//! `center_rewards_coefficient` × mean((r_c + r_r)²) when set; logged as TRL names them:
//! `accuracy` (share with r_c > r_r), `margin` (mean r_c − r_r), and `min_reward`,
//! `mean_reward`, `max_reward` over every chosen and rejected reward of the batch.
//!
//! **Shaping** (host-side, on rewards that carry no gradient): per sampled token t of a
//! caption of T tokens,
//! - dense CLIP increments r_t = w [cos(image, text(y_1..t)) − cos(image, text(y_1..t−1))],
//!   which telescope to w [cos(image, caption) − cos(image, "")];
//! - confidence weights α_t = α_max − (α_max − α_min) σ((c_t − c_0) / s) from the policy's
//!   probability c_t of the sampled token: unsure tokens lean on the dense CLIP guidance,
//!   confident ones on the preference model;
//! - R_t = α_t r_t + (1 − α_t) R_sparse / T − β_KL (log π(y_t) − log π_ref(y_t));
//! - returns-to-go and the leave-one-out baseline over the samples of one image (RLOO).

use candle_core::{DType, Result, Tensor};

use crate::losses::preference::log_sigmoid;

/// A reward model's loss over a batch of pairs and its logged scalars (TRL's names).
pub struct BradleyTerry {
    pub loss: Tensor,
    pub scalars: Vec<(String, f64)>,
}

/// The Bradley-Terry loss of per-pair rewards `chosen` and `rejected` `(b,)`, with an
/// optional per-pair `margin` `(b,)` and TRL's `center_rewards_coefficient`.
pub fn bradley_terry(
    chosen: &Tensor,
    rejected: &Tensor,
    margin: Option<&Tensor>,
    center_rewards_coefficient: Option<f64>,
) -> Result<BradleyTerry> {
    let diff = (chosen - rejected)?;
    let logits = match margin {
        Some(m) => (&diff - m)?,
        None => diff.clone(),
    };
    let mut loss = log_sigmoid(&logits)?.neg()?.mean_all()?;
    if let Some(c) = center_rewards_coefficient {
        loss = (loss + ((chosen + rejected)?.sqr()?.mean_all()? * c)?)?;
    }
    let scalar =
        |t: Tensor| -> Result<f64> { Ok(f64::from(t.to_dtype(DType::F32)?.to_scalar::<f32>()?)) };
    let all = Tensor::cat(&[chosen.detach(), rejected.detach()], 0)?;
    let scalars = vec![
        (
            "accuracy".to_string(),
            scalar(diff.gt(0f64)?.to_dtype(DType::F32)?.mean_all()?)?,
        ),
        ("margin".to_string(), scalar(diff.detach().mean_all()?)?),
        ("min_reward".to_string(), scalar(all.min(0)?)?),
        ("mean_reward".to_string(), scalar(all.mean_all()?)?),
        ("max_reward".to_string(), scalar(all.max(0)?)?),
    ];
    Ok(BradleyTerry { loss, scalars })
}

/// How the dense and the sparse reward are mixed per token.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shaping {
    /// α_t from the token's confidence (the recipe).
    Hierarchical,
    /// α = 0: the preference model alone.
    Sparse,
    /// α = 1: the dense CLIP increments alone.
    Dense,
    /// A constant α.
    Fixed,
}

/// The settings of [`shaped_rewards`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShapingConfig {
    pub shaping: Shaping,
    pub alpha_max: f64,
    pub alpha_min: f64,
    /// Confidence at the midpoint (c_0) and the sigmoid's width (s).
    pub confidence_mid: f64,
    pub confidence_scale: f64,
    /// α of [`Shaping::Fixed`].
    pub alpha: f64,
    pub beta_kl: f64,
}

impl Default for ShapingConfig {
    fn default() -> Self {
        Self {
            shaping: Shaping::Hierarchical,
            alpha_max: 0.9,
            alpha_min: 0.3,
            confidence_mid: 0.5,
            confidence_scale: 0.1,
            alpha: 0.5,
            beta_kl: 0.05,
        }
    }
}

impl ShapingConfig {
    /// α for a token sampled with probability `confidence`.
    pub fn alpha(&self, confidence: f64) -> f64 {
        match self.shaping {
            Shaping::Hierarchical => {
                let z = (confidence - self.confidence_mid) / self.confidence_scale;
                self.alpha_max - (self.alpha_max - self.alpha_min) / (1.0 + (-z).exp())
            }
            Shaping::Sparse => 0.0,
            Shaping::Dense => 1.0,
            Shaping::Fixed => self.alpha,
        }
    }
}

/// Dense CLIP increments of a caption of T tokens from the cosines of its prefixes:
/// `cosines[0]` is the empty text's, `cosines[t]` that of the first t tokens.
pub fn dense_increments(cosines: &[f64], weight: f64) -> Vec<f64> {
    cosines.windows(2).map(|w| weight * (w[1] - w[0])).collect()
}

/// The two parts of each token's shaped reward, per token: the causal part
/// α_t r_t − β_KL (log π(y_t) − log π_ref(y_t)) and the sparse part (1 − α_t) R_sparse / T.
fn token_parts<'a>(
    cfg: &'a ShapingConfig,
    dense: &'a [f64],
    sparse: f64,
    confidence: &'a [f64],
    logp: &'a [f64],
    ref_logp: &'a [f64],
) -> impl Iterator<Item = (f64, f64)> + 'a {
    let t = dense.len().max(1) as f64;
    (0..dense.len()).map(move |i| {
        let a = cfg.alpha(confidence[i]);
        (
            a * dense[i] - cfg.beta_kl * (logp[i] - ref_logp[i]),
            (1.0 - a) * sparse / t,
        )
    })
}

/// Per-token shaped rewards R_t of one caption (what the logged `reward` sums, KL aside):
/// `dense` increments, the caption's `sparse` reward, the policy's probabilities of its
/// tokens (`confidence`), and the policy's and the reference's log-probabilities of them
/// (the KL penalty). NaN when any input is.
pub fn shaped_rewards(
    cfg: &ShapingConfig,
    dense: &[f64],
    sparse: f64,
    confidence: &[f64],
    logp: &[f64],
    ref_logp: &[f64],
) -> Vec<f64> {
    token_parts(cfg, dense, sparse, confidence, logp, ref_logp)
        .map(|(causal, share)| causal + share)
        .collect()
}

/// [`shaped_rewards`] split by what each part depends on: the causal per-token part
/// α_t r_t − β_KL (log π(y_t) − log π_ref(y_t)) (token t's dense increment and KL depend on
/// y_1..t only), and the caption's whole sparse share Σ_t (1 − α_t) R_sparse / T, which
/// depends on every token. REINFORCE with returns-to-go may drop a reward that comes before
/// token t only when y_t cannot change it, so the sparse share is credited to every token in
/// full (returns-to-go of the causal part, plus the share): spreading it as R_sparse / T and
/// summing only what follows t would give the last tokens of a caption almost no credit for
/// the preference model's verdict on them, and long captions credit for their length.
pub fn split_rewards(
    cfg: &ShapingConfig,
    dense: &[f64],
    sparse: f64,
    confidence: &[f64],
    logp: &[f64],
    ref_logp: &[f64],
) -> (Vec<f64>, f64) {
    let mut share = 0.0;
    let causal = token_parts(cfg, dense, sparse, confidence, logp, ref_logp)
        .map(|(causal, s)| {
            share += s;
            causal
        })
        .collect();
    (causal, share)
}

/// Returns-to-go: G_t = Σ_{u ≥ t} R_u.
pub fn rewards_to_go(rewards: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; rewards.len()];
    let mut acc = 0.0;
    for (i, r) in rewards.iter().enumerate().rev() {
        acc += r;
        out[i] = acc;
    }
    out
}

/// The leave-one-out baseline of each of an image's samples: the mean of the others'
/// returns (RLOO; 0 for a single sample).
pub fn leave_one_out(returns: &[f64]) -> Vec<f64> {
    let k = returns.len();
    if k < 2 {
        return vec![0.0; k];
    }
    let total: f64 = returns.iter().sum();
    returns
        .iter()
        .map(|r| (total - r) / (k - 1) as f64)
        .collect()
}

/// Per-token advantages of one image's samples (RLOO on rewards-to-go): sample i's return
/// at position t minus the mean of the other samples' returns at t, a sample past its end
/// counting 0 (nothing more to earn). The baseline never depends on sample i's own tokens,
/// so the policy gradient stays unbiased.
pub fn rloo_advantages(returns: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let len = returns.iter().map(Vec::len).max().unwrap_or(0);
    let mut out: Vec<Vec<f64>> = returns.iter().map(|r| vec![0.0; r.len()]).collect();
    for t in 0..len {
        let column: Vec<f64> = returns
            .iter()
            .map(|r| r.get(t).copied().unwrap_or(0.0))
            .collect();
        for (i, b) in leave_one_out(&column).into_iter().enumerate() {
            if t < returns[i].len() {
                out[i][t] = returns[i][t] - b;
            }
        }
    }
    out
}

/// The policy-gradient loss of sampled tokens: per-token log-probabilities `logp` `(R, T)`
/// under the current policy (with gradients), the rollout's `old_logp` (without), the
/// `advantages` and the token `mask` `(R, T)` (1 = a sampled token). With ratio
/// ρ = exp(logp − old_logp), the loss is −min(ρA, clip(ρ, 1 − ε, 1 + ε)A) averaged over
/// the batch's tokens (PPO's clipped surrogate); on the rollout's first update ρ = 1 and
/// its gradient is REINFORCE's, −A ∇log π. Returns the loss and the share of tokens whose
/// ratio was clipped.
pub fn policy_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    clip_range: f64,
) -> Result<(Tensor, f64)> {
    let ratio = (logp - old_logp.detach())?.exp()?;
    let clipped = ratio.clamp(1.0 - clip_range, 1.0 + clip_range)?;
    let a = advantages.detach();
    let surrogate = (&ratio * &a)?.minimum(&(&clipped * &a)?)?;
    let tokens = f64::from(mask.sum_all()?.to_scalar::<f32>()?).max(1.0);
    let loss = ((surrogate * mask)?.sum_all()?.neg()? / tokens)?;
    let off = ratio
        .detach()
        .ne(&clipped.detach())?
        .to_dtype(DType::F32)?
        .mul(mask)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok((loss, f64::from(off) / tokens))
}

/// Per-token advantages of one image's samples from their causal rewards-to-go `causal`
/// (per sample, per token) and their sparse shares `sparse`: the causal part against the
/// other samples' at the same position ([`rloo_advantages`]) plus the sparse share against
/// the mean of the other samples' shares (RLOO), the latter on every token of the sample.
pub fn rlhf_advantages(causal: &[Vec<f64>], sparse: &[f64]) -> Vec<Vec<f64>> {
    let base = leave_one_out(sparse);
    rloo_advantages(causal)
        .into_iter()
        .enumerate()
        .map(|(i, a)| a.into_iter().map(|x| x + sparse[i] - base[i]).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn value(out: &BradleyTerry, name: &str) -> f64 {
        out.scalars.iter().find(|(n, _)| n == name).unwrap().1
    }

    #[test]
    fn bradley_terry_and_its_metrics_follow_trls_formulas() {
        let dev = Device::Cpu;
        let c = [1.5f32, -0.5, 0.2];
        let r = [0.5f32, 0.5, 0.2];
        let chosen = Var::from_slice(&c, 3, &dev).unwrap();
        let rejected = Tensor::new(&r, &dev).unwrap();
        let ls = |x: f64| -(1.0 + (-x).exp()).ln();
        let plain: f64 = -(0..3).map(|i| ls(f64::from(c[i] - r[i]))).sum::<f64>() / 3.0;
        let out = bradley_terry(chosen.as_tensor(), &rejected, None, None).unwrap();
        let got = f64::from(out.loss.to_scalar::<f32>().unwrap());
        assert!((got - plain).abs() < 1e-6, "{got} vs {plain}");
        assert!(
            (value(&out, "accuracy") - 1.0 / 3.0).abs() < 1e-6,
            "a tie is not a win"
        );
        assert!((value(&out, "margin") - (1.0 - 1.0 + 0.0) / 3.0).abs() < 1e-6);
        assert!((value(&out, "min_reward") + 0.5).abs() < 1e-6);
        assert!((value(&out, "max_reward") - 1.5).abs() < 1e-6);
        assert!((value(&out, "mean_reward") - 2.4 / 6.0).abs() < 1e-6);
        // With a margin and centring.
        let m = Tensor::new(&[0.5f32, 0.0, 1.0], &dev).unwrap();
        let out = bradley_terry(chosen.as_tensor(), &rejected, Some(&m), Some(0.01)).unwrap();
        let margins = [0.5, 0.0, 1.0];
        let want: f64 = -(0..3)
            .map(|i| ls(f64::from(c[i] - r[i]) - margins[i]))
            .sum::<f64>()
            / 3.0
            + 0.01 * (0..3).map(|i| f64::from(c[i] + r[i]).powi(2)).sum::<f64>() / 3.0;
        let got = f64::from(out.loss.to_scalar::<f32>().unwrap());
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // The chosen reward's gradient: −σ(−(Δ − m))/b + 2·0.01·(r_c + r_r)/b.
        let g = out.loss.backward().unwrap();
        let g = g.get(chosen.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let want0 = -sig(-(1.0 - 0.5)) / 3.0 + 2.0 * 0.01 * 2.0 / 3.0;
        assert!((f64::from(g[0]) - want0).abs() < 1e-6, "{g:?}");
    }

    #[test]
    fn alpha_reaches_its_documented_edges() {
        let cfg = ShapingConfig::default();
        assert!(
            (cfg.alpha(0.5) - 0.6).abs() < 1e-12,
            "the midpoint: halfway"
        );
        assert!((cfg.alpha(0.0) - 0.9).abs() < 0.01, "unsure: alpha_max");
        assert!((cfg.alpha(1.0) - 0.3).abs() < 0.01, "confident: alpha_min");
        assert!(cfg.alpha(0.2) > cfg.alpha(0.8));
        for (shaping, want) in [
            (Shaping::Sparse, 0.0),
            (Shaping::Dense, 1.0),
            (Shaping::Fixed, 0.5),
        ] {
            let c = ShapingConfig { shaping, ..cfg };
            assert_eq!(c.alpha(0.0), want);
            assert_eq!(c.alpha(1.0), want);
        }
    }

    #[test]
    fn dense_increments_telescope_and_each_shaping_mixes_as_documented() {
        let cos = [0.05, 0.20, 0.18, 0.31];
        let d = dense_increments(&cos, 2.5);
        assert_eq!(d.len(), 3);
        assert!((d.iter().sum::<f64>() - 2.5 * (0.31 - 0.05)).abs() < 1e-12);
        let conf = [0.9, 0.2, 0.5];
        let lp = [-0.1, -1.6, -0.7];
        let same = lp;
        let sparse = 1.2;
        for shaping in [
            Shaping::Hierarchical,
            Shaping::Sparse,
            Shaping::Dense,
            Shaping::Fixed,
        ] {
            let cfg = ShapingConfig {
                shaping,
                ..ShapingConfig::default()
            };
            let r = shaped_rewards(&cfg, &d, sparse, &conf, &lp, &same);
            for i in 0..3 {
                let a = cfg.alpha(conf[i]);
                let want = a * d[i] + (1.0 - a) * sparse / 3.0;
                assert!((r[i] - want).abs() < 1e-12, "{shaping:?} {i}");
            }
            if shaping == Shaping::Sparse {
                assert!(
                    (r.iter().sum::<f64>() - sparse).abs() < 1e-12,
                    "sparse alone sums to R"
                );
            }
            if shaping == Shaping::Dense {
                assert!((r.iter().sum::<f64>() - d.iter().sum::<f64>()).abs() < 1e-12);
            }
        }
        // The KL term: zero when the policy is its reference, −β_KL per nat above it.
        let cfg = ShapingConfig::default();
        let up = [0.0, -1.0, 0.0];
        let r0 = shaped_rewards(&cfg, &d, sparse, &conf, &lp, &lp);
        let r1 = shaped_rewards(&cfg, &d, sparse, &conf, &up, &lp);
        assert!((r1[0] - r0[0] + 0.05 * 0.1).abs() < 1e-12);
    }

    #[test]
    fn rloo_advantages_compare_each_position_with_the_other_samples() {
        let g = vec![vec![3.0, 1.0], vec![1.0, 0.5, 0.2], vec![2.0]];
        let a = rloo_advantages(&g);
        assert_eq!(a[0], vec![3.0 - 1.5, 1.0 - 0.25]);
        assert_eq!(a[1], vec![1.0 - 2.5, 0.5 - 0.5, 0.2 - 0.0]);
        assert_eq!(a[2], vec![2.0 - 2.0]);
    }

    #[test]
    fn the_sparse_share_is_credited_to_every_token_and_the_causal_part_to_what_follows() {
        let cfg = ShapingConfig::default();
        let d = [0.2, -0.1, 0.3];
        let conf = [0.9, 0.2, 0.5];
        let lp = [-0.1, -1.6, -0.7];
        let rf = [-0.2, -1.0, -0.7];
        let (causal, share) = split_rewards(&cfg, &d, 1.2, &conf, &lp, &rf);
        let whole = shaped_rewards(&cfg, &d, 1.2, &conf, &lp, &rf);
        // Together they are the documented per-token rewards.
        let total: f64 = causal.iter().sum::<f64>() + share;
        assert!((total - whole.iter().sum::<f64>()).abs() < 1e-12);
        for i in 0..3 {
            let a = cfg.alpha(conf[i]);
            assert!((causal[i] - (a * d[i] - 0.05 * (lp[i] - rf[i]))).abs() < 1e-12);
        }
        // Two samples: the second's better verdict lifts all of its tokens, the first's
        // lower one lowers all of its tokens; the causal parts compare position by position.
        let a = rlhf_advantages(&[vec![0.5, 0.1], vec![0.2, 0.4, 0.3]], &[1.0, 2.0]);
        let want = [
            vec![0.5 - 0.2 - 1.0, 0.1 - 0.4 - 1.0],
            vec![0.2 - 0.5 + 1.0, 0.4 - 0.1 + 1.0, 0.3 + 1.0],
        ];
        for (got, want) in a.iter().zip(&want) {
            assert_eq!(got.len(), want.len());
            assert!(
                got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-12),
                "{a:?}"
            );
        }
    }

    #[test]
    fn the_policy_loss_is_reinforce_at_ratio_one_and_clips_beyond() {
        let dev = Device::Cpu;
        let lp = [-1.0f32, -2.0, -0.5, -3.0];
        let logp = Var::from_slice(&lp, (2, 2), &dev).unwrap();
        let old = Tensor::from_slice(&lp, (2, 2), &dev).unwrap();
        let adv = Tensor::new(&[[1.0f32, -1.0], [0.5, 9.0]], &dev).unwrap();
        let mask = Tensor::new(&[[1.0f32, 1.0], [1.0, 0.0]], &dev).unwrap();
        let (loss, clipped) = policy_loss(logp.as_tensor(), &old, &adv, &mask, 0.2).unwrap();
        assert!((f64::from(loss.to_scalar::<f32>().unwrap()) + 0.5 / 3.0).abs() < 1e-6);
        assert_eq!(clipped, 0.0);
        let g = loss.backward().unwrap();
        let g = g.get(logp.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        // −A/tokens per sampled token, nothing for the masked one.
        assert_eq!(g, vec![vec![-1.0 / 3.0, 1.0 / 3.0], vec![-0.5 / 3.0, 0.0]]);
        // Ratio e^0.5 > 1.2 with a positive advantage: clipped, no gradient.
        let old = Tensor::from_slice(&[-1.5f32, -2.0, -0.5, -3.0], (2, 2), &dev).unwrap();
        let (loss, clipped) = policy_loss(logp.as_tensor(), &old, &adv, &mask, 0.2).unwrap();
        assert!((clipped - 1.0 / 3.0).abs() < 1e-9);
        let g = loss.backward().unwrap();
        let g = g.get(logp.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(g[0][0], 0.0, "the clipped token has no gradient");
    }

    #[test]
    fn returns_to_go_and_the_leave_one_out_baseline() {
        assert_eq!(rewards_to_go(&[1.0, 2.0, 3.0]), vec![6.0, 5.0, 3.0]);
        let b = leave_one_out(&[1.0, 2.0, 6.0, 3.0]);
        assert_eq!(b, vec![11.0 / 3.0, 10.0 / 3.0, 2.0, 3.0]);
        assert_eq!(leave_one_out(&[4.0]), vec![0.0]);
        // Advantages against the baseline sum to k/(k−1) times the centred returns: zero mean.
        let r = [1.0, 2.0, 6.0, 3.0];
        let adv: f64 = r.iter().zip(&b).map(|(r, b)| r - b).sum();
        assert!(adv.abs() < 1e-12);
    }
}
