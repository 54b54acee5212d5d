//! Preference-optimisation losses as TRL defines them, as pure functions over per-row sequence
//! log-probabilities (differentiable candle tensors), with TRL's metric names.
//!
//! DPO: `logits = (π_c − π_r) − (ref_c − ref_r)` with sequence log-probabilities summed over
//! completion tokens (IPO: averaged), then
//! - `sigmoid`: −(1−ε)·log σ(β·logits) − ε·log σ(−β·logits) (ε = label smoothing),
//! - `robust`:  (−(1−ε)·log σ(β·logits) + ε·log σ(−β·logits)) / (1 − 2ε),
//! - `hinge`:   relu(1 − β·logits),
//! - `ipo`:     (logits − 1/(2β))².
//!
//! Rewards are β·(π − ref). ORPO (reference-free) on average log-probabilities:
//! `log_odds = (a_c − a_r) − (log(1 − e^{a_c}) − log(1 − e^{a_r}))`, loss =
//! NLL(chosen) − λ·mean(log σ(log_odds)).

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// The DPO loss variants TRL offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLoss {
    Sigmoid,
    Hinge,
    Ipo,
    Robust,
}

/// A loss and its logged scalars (TRL's names).
pub struct PreferenceOutput {
    pub loss: Tensor,
    pub scalars: Vec<(String, f64)>,
    /// Per-row implicit rewards `(chosen, rejected)`, `(b,)` each, detached.
    pub rewards: (Tensor, Tensor),
}

/// TRL's reward scalars of per-row chosen and rejected rewards.
fn reward_scalars(chosen: &Tensor, rejected: &Tensor) -> Result<Vec<(String, f64)>> {
    let accuracies = chosen.gt(rejected)?.to_dtype(candle_core::DType::F32)?;
    Ok(vec![
        ("rewards/chosen".to_string(), mean_scalar(chosen)?),
        ("rewards/rejected".to_string(), mean_scalar(rejected)?),
        ("rewards/accuracies".to_string(), mean_scalar(&accuracies)?),
        (
            "rewards/margins".to_string(),
            mean_scalar(&(chosen - rejected)?)?,
        ),
    ])
}

fn mean_scalar(t: &Tensor) -> Result<f64> {
    Ok(f64::from(t.mean_all()?.to_scalar::<f32>()?))
}

/// log σ(x), stably and with the gradient σ(−x) everywhere: −log(1 + e^{−x}) where x ≥ 0,
/// x − log(1 + e^{x}) elsewhere. Each branch sees only its own side of 0 (so neither
/// overflows, and the branch not taken gets no NaN gradient), and at exactly 0, where a policy
/// equal to its reference puts every DPO logit, the gradient is 1/2: written with `|x|` and
/// `max`, it is whatever the kinks' conventional slopes add up to (candle: 3/2). A NaN stays
/// NaN (the branches' `relu` would turn it into 0), so the trainer's guard still sees it.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let upper = x.relu()?;
    let lower = x.neg()?.relu()?.neg()?;
    let when_upper = (upper.neg()?.exp()? + 1.0)?.log()?.neg()?;
    let when_lower = (&lower - (lower.exp()? + 1.0)?.log()?)?;
    let value = x.ge(0f64)?.where_cond(&when_upper, &when_lower)?;
    x.ne(x)?.where_cond(x, &value)
}

/// DPO loss over a batch. `policy_*`/`ref_*`: per-row sequence log-probabilities `(b,)`
/// (sums over completion tokens, or means for IPO — the caller decides, see
/// [`DpoLoss::averages_tokens`]).
pub fn dpo_loss(
    kind: DpoLoss,
    beta: f64,
    label_smoothing: f64,
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
) -> Result<PreferenceOutput> {
    let logits = ((policy_chosen - policy_rejected)? - (ref_chosen - ref_rejected)?)?;
    let scaled = (&logits * beta)?;
    let eps = label_smoothing;
    let losses = match kind {
        DpoLoss::Sigmoid => {
            ((log_sigmoid(&scaled)? * -(1.0 - eps))? - (log_sigmoid(&scaled.neg()?)? * eps)?)?
        }
        DpoLoss::Robust => {
            (((log_sigmoid(&scaled)? * -(1.0 - eps))? + (log_sigmoid(&scaled.neg()?)? * eps)?)?
                / (1.0 - 2.0 * eps))?
        }
        DpoLoss::Hinge => (scaled.neg()? + 1.0)?.relu()?,
        DpoLoss::Ipo => (&logits - 1.0 / (2.0 * beta))?.sqr()?,
    };
    let chosen_rewards = ((policy_chosen - ref_chosen)? * beta)?.detach();
    let rejected_rewards = ((policy_rejected - ref_rejected)? * beta)?.detach();
    let mut scalars = reward_scalars(&chosen_rewards, &rejected_rewards)?;
    scalars.push((
        "logps/chosen".to_string(),
        mean_scalar(&policy_chosen.detach())?,
    ));
    scalars.push((
        "logps/rejected".to_string(),
        mean_scalar(&policy_rejected.detach())?,
    ));
    Ok(PreferenceOutput {
        loss: losses.mean_all()?,
        scalars,
        rewards: (chosen_rewards, rejected_rewards),
    })
}

impl DpoLoss {
    /// IPO uses per-token averages of the log-probabilities; the others sum them.
    pub fn averages_tokens(self) -> bool {
        self == DpoLoss::Ipo
    }
}

/// ORPO loss: `nll_chosen` (mean NLL per chosen token, a scalar) minus λ times the mean
/// log-sigmoid of the log odds ratio of the average log-probabilities `(b,)`.
pub fn orpo_loss(
    lambda: f64,
    nll_chosen: &Tensor,
    avg_chosen: &Tensor,
    avg_rejected: &Tensor,
) -> Result<PreferenceOutput> {
    // log(1 − e^{a}) for a < 0, as log(−expm1(a)); candle has no expm1, and a is a mean
    // log-probability (≤ 0), where 1 − e^a is well conditioned unless a is within 1e-7 of 0.
    let log1m_exp =
        |a: &Tensor| -> Result<Tensor> { (a.exp()?.neg()? + 1.0)?.clamp(1e-12, 1.0)?.log() };
    let log_odds =
        ((avg_chosen - avg_rejected)? - (log1m_exp(avg_chosen)? - log1m_exp(avg_rejected)?)?)?;
    let ratio = log_sigmoid(&log_odds)?;
    let loss = (nll_chosen - (ratio.mean_all()? * lambda)?)?;
    // TRL's ORPO rewards: λ times the average log-probabilities.
    let chosen_rewards = (avg_chosen.detach() * lambda)?;
    let rejected_rewards = (avg_rejected.detach() * lambda)?;
    let mut scalars = reward_scalars(&chosen_rewards, &rejected_rewards)?;
    scalars.extend([
        (
            "nll_loss".to_string(),
            f64::from(nll_chosen.to_scalar::<f32>()?),
        ),
        ("log_odds_ratio".to_string(), mean_scalar(&ratio)?),
        ("log_odds_chosen".to_string(), mean_scalar(&log_odds)?),
        ("logps/chosen".to_string(), mean_scalar(avg_chosen)?),
        ("logps/rejected".to_string(), mean_scalar(avg_rejected)?),
    ]);
    Ok(PreferenceOutput {
        loss,
        scalars,
        rewards: (chosen_rewards, rejected_rewards),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn scalar(out: &PreferenceOutput, name: &str) -> f64 {
        out.scalars.iter().find(|(n, _)| n == name).unwrap().1
    }

    fn ls(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }

    /// Two pairs: logits (3 − 1) = 2 and (−1 − (−1.5)) = 0.5 (policy vs reference margins).
    fn pairs() -> [Tensor; 4] {
        [
            t(&[-10.0, -12.0]),
            t(&[-13.0, -11.0]),
            t(&[-11.0, -12.5]),
            t(&[-12.0, -11.0]),
        ]
    }

    #[test]
    fn dpo_losses_match_trl_formulas_by_hand() {
        let [pc, pr, rc, rr] = pairs();
        let (beta, eps) = (0.1, 0.0);
        let logits = [2.0f64, 0.5];
        let cases: [(DpoLoss, &dyn Fn(f64) -> f64); 3] = [
            (DpoLoss::Sigmoid, &|l| -ls(beta * l)),
            (DpoLoss::Hinge, &|l| (1.0 - beta * l).max(0.0)),
            (DpoLoss::Ipo, &|l| (l - 1.0 / (2.0 * beta)).powi(2)),
        ];
        for (kind, f) in cases {
            let out = dpo_loss(kind, beta, eps, &pc, &pr, &rc, &rr).unwrap();
            let want = (f(logits[0]) + f(logits[1])) / 2.0;
            let got = f64::from(out.loss.to_scalar::<f32>().unwrap());
            assert!(
                (got - want).abs() < 1e-5 * want.abs().max(1.0),
                "{kind:?}: {got} vs {want}"
            );
        }
        // Label smoothing 0.1: sigmoid (cDPO) and robust.
        let eps = 0.1;
        let sig = |l: f64| -(1.0 - eps) * ls(beta * l) - eps * ls(-beta * l);
        let rob = |l: f64| (-(1.0 - eps) * ls(beta * l) + eps * ls(-beta * l)) / (1.0 - 2.0 * eps);
        for (kind, f) in [
            (DpoLoss::Sigmoid, &sig as &dyn Fn(f64) -> f64),
            (DpoLoss::Robust, &rob),
        ] {
            let out = dpo_loss(kind, beta, eps, &pc, &pr, &rc, &rr).unwrap();
            let want = (f(logits[0]) + f(logits[1])) / 2.0;
            let got = f64::from(out.loss.to_scalar::<f32>().unwrap());
            assert!((got - want).abs() < 1e-5, "{kind:?}: {got} vs {want}");
        }
    }

    #[test]
    fn dpo_metrics_have_trl_names_and_meanings() {
        let [pc, pr, rc, rr] = pairs();
        let out = dpo_loss(DpoLoss::Sigmoid, 0.1, 0.0, &pc, &pr, &rc, &rr).unwrap();
        // chosen rewards 0.1·[1, 0.5], rejected 0.1·[−1, 0]: first pair right, second right.
        assert!((scalar(&out, "rewards/chosen") - 0.075).abs() < 1e-6);
        assert!((scalar(&out, "rewards/rejected") + 0.05).abs() < 1e-6);
        assert!((scalar(&out, "rewards/margins") - 0.125).abs() < 1e-6);
        assert_eq!(scalar(&out, "rewards/accuracies"), 1.0);
        assert!((scalar(&out, "logps/chosen") + 11.0).abs() < 1e-6);
        assert!((scalar(&out, "logps/rejected") + 12.0).abs() < 1e-6);
    }

    #[test]
    fn gradients_flow_to_the_policy_only() {
        let pc = candle_core::Var::new(&[-10.0f32, -12.0], &Device::Cpu).unwrap();
        let [_, pr, rc, rr] = pairs();
        let out = dpo_loss(DpoLoss::Sigmoid, 0.1, 0.0, pc.as_tensor(), &pr, &rc, &rr).unwrap();
        let grads = out.loss.backward().unwrap();
        let g: Vec<f32> = grads.get(pc.as_tensor()).unwrap().to_vec1().unwrap();
        // d/dπ_c of −log σ(β·l)/2 = −β·σ(−β·l)/2 < 0: raising chosen log-prob lowers the loss.
        let want = |l: f64| -0.1 * (1.0 / (1.0 + (0.1 * l).exp())) / 2.0;
        assert!(
            (f64::from(g[0]) - want(2.0)).abs() < 1e-6
                && (f64::from(g[1]) - want(0.5)).abs() < 1e-6,
            "{g:?}"
        );
    }

    #[test]
    fn orpo_matches_the_odds_ratio_formula() {
        let (ac, ar) = ([-0.5f64, -1.2], [-1.0f64, -0.9]);
        let nll = Tensor::new(0.7f32, &Device::Cpu).unwrap();
        let out = orpo_loss(
            0.1,
            &nll,
            &t(&[ac[0] as f32, ac[1] as f32]),
            &t(&[ar[0] as f32, ar[1] as f32]),
        )
        .unwrap();
        let lo = |c: f64, r: f64| (c - r) - ((1.0 - c.exp()).ln() - (1.0 - r.exp()).ln());
        let ratios = [ls(lo(ac[0], ar[0])), ls(lo(ac[1], ar[1]))];
        let want = 0.7 - 0.1 * (ratios[0] + ratios[1]) / 2.0;
        let got = f64::from(out.loss.to_scalar::<f32>().unwrap());
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        assert!((scalar(&out, "log_odds_ratio") - (ratios[0] + ratios[1]) / 2.0).abs() < 1e-5);
        assert!((scalar(&out, "nll_loss") - 0.7).abs() < 1e-6);
    }

    #[test]
    fn log_sigmoid_gradient_is_sigmoid_of_minus_x_also_at_zero() {
        let xs = [-100.0f32, -3.0, -1e-3, 0.0, 1e-3, 3.0, 100.0];
        let x = candle_core::Var::new(&xs[..], &Device::Cpu).unwrap();
        let g = log_sigmoid(x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<f32> = g.get(x.as_tensor()).unwrap().to_vec1().unwrap();
        for (&x, g) in xs.iter().zip(g) {
            let expected = 1.0 / (1.0 + f64::from(x).exp());
            assert!(
                (f64::from(g) - expected).abs() < 1e-6,
                "x {x}: {g} vs {expected}"
            );
        }
    }

    #[test]
    fn log_sigmoid_is_stable_for_large_inputs_and_keeps_nan() {
        let v: Vec<f32> = log_sigmoid(&t(&[-100.0, 0.0, 100.0, f32::NAN]))
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            (v[0] + 100.0).abs() < 1e-4
                && (v[1] + std::f32::consts::LN_2).abs() < 1e-6
                && v[2].abs() < 1e-6
                && v[3].is_nan(),
            "{v:?}"
        );
    }
}
