//! The story model's auxiliary image losses and the adversarial terms (pure functions over
//! tensors).
//!
//! - `L_img = MSE(pred, v)`: the predicted CLIP image embedding (normalised) against the next
//!   frame's, normalised; the mean over rows and dimensions (`F.mse_loss`).
//! - `L_align = mean(1 − cos(pred, t))` against the CLIP text embedding of its caption.
//! - Hinge GAN (Lim & Ye 2017; Miyato et al. 2018): `L_D = E[relu(1 − D(real))] +
//!   E[relu(1 + D(fake))]`, `L_G = −E[D(fake)]`.
//! - Feature matching (Salimans et al. 2016): `‖E f(real) − E f(fake)‖²` on the
//!   discriminator's penultimate features, averaged over the feature dimension.
//! - SeqGAN's policy gradient (Yu et al. 2017): a caption sampled from the generator earns
//!   the discriminator's score of it as a reward, detached; the generator descends
//!   `−mean((r − b) · log p(caption))` with baseline `b`, so the adversarial signal reaches the
//!   generator's parameters through its own log-probabilities.

use candle_core::{Tensor, D};

use crate::kernels::l2_normalized;

/// `MSE(pred, normalise(target))` over rows `(b, d)`.
pub fn image_loss(pred: &Tensor, target: &Tensor) -> candle_core::Result<Tensor> {
    (pred - l2_normalized(target)?)?.sqr()?.mean_all()
}

/// `mean(1 − cos(pred, text))` over rows `(b, d)`.
pub fn align_loss(pred: &Tensor, text: &Tensor) -> candle_core::Result<Tensor> {
    let cos = (l2_normalized(pred)? * l2_normalized(text)?)?.sum(D::Minus1)?;
    (1.0 - cos)?.mean_all()
}

/// The discriminator's hinge loss on scores of real and fake pairs.
pub fn hinge_discriminator(real: &Tensor, fake: &Tensor) -> candle_core::Result<Tensor> {
    (1.0 - real)?.relu()?.mean_all()? + (1.0 + fake)?.relu()?.mean_all()?
}

/// The generator's hinge loss on the scores of its fakes.
pub fn hinge_generator(fake: &Tensor) -> candle_core::Result<Tensor> {
    fake.mean_all()?.neg()
}

/// `‖mean_rows(real) − mean_rows(fake)‖²` / dim over features `(b, h)`.
pub fn feature_matching(real: &Tensor, fake: &Tensor) -> candle_core::Result<Tensor> {
    (real.mean(0)? - fake.mean(0)?)?.sqr()?.mean_all()
}

/// SeqGAN's surrogate `−mean((r − b) · logp)` for per-row log-probabilities `logp` `(b,)`
/// (summed, or per token), detached rewards `r` `(b,)` and baseline `b`: its gradient is the
/// REINFORCE estimate of `−∇ E[r]`.
pub fn policy_gradient(
    logp: &Tensor,
    rewards: &Tensor,
    baseline: f64,
) -> candle_core::Result<Tensor> {
    let advantage = (rewards.detach() - baseline)?;
    (logp * advantage)?.mean_all()?.neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    fn s(x: Tensor) -> f32 {
        x.to_scalar::<f32>().unwrap()
    }

    #[test]
    fn image_losses_match_hand_computed_values() {
        // pred (1, 0) and (0.6, 0.8); targets (2, 0) → (1, 0) and (0, 3) → (0, 1).
        let pred = t(&[1.0, 0.0, 0.6, 0.8], (2, 2));
        let target = t(&[2.0, 0.0, 0.0, 3.0], (2, 2));
        // Squared errors 0, 0, 0.36, 0.04 → mean 0.1.
        assert!((s(image_loss(&pred, &target).unwrap()) - 0.1).abs() < 1e-6);
        // cos 1 and 0.8 → mean(0, 0.2) = 0.1.
        assert!((s(align_loss(&pred, &target).unwrap()) - 0.1).abs() < 1e-6);
    }

    #[test]
    fn hinge_losses_match_their_definition() {
        let real = Tensor::new(&[2.0f32, 0.5, -1.0], &Device::Cpu).unwrap();
        let fake = Tensor::new(&[-2.0f32, 0.0, 1.0], &Device::Cpu).unwrap();
        // relu(1 - real) = 0, 0.5, 2 → 2.5/3; relu(1 + fake) = 0, 1, 2 → 1.
        let d = s(hinge_discriminator(&real, &fake).unwrap());
        assert!((d - (2.5 / 3.0 + 1.0)).abs() < 1e-6, "{d}");
        assert!((s(hinge_generator(&fake).unwrap()) - 1.0 / 3.0).abs() < 1e-6);
        let fm = feature_matching(
            &t(&[1.0, 2.0, 3.0, 4.0], (2, 2)),
            &t(&[0.0, 0.0, 0.0, 2.0], (2, 2)),
        )
        .unwrap();
        // Means (2, 3) and (0, 1): squared differences 4, 4 → 4.
        assert!((s(fm) - 4.0).abs() < 1e-6);
    }

    #[test]
    fn the_policy_gradient_pushes_up_captions_better_than_the_baseline() {
        let logp = candle_core::Var::new(&[-1.0f32, -2.0], &Device::Cpu).unwrap();
        let r = Tensor::new(&[1.0f32, 0.0], &Device::Cpu).unwrap();
        let loss = policy_gradient(logp.as_tensor(), &r, 0.5).unwrap();
        // −mean(0.5·(−1) + (−0.5)·(−2)) = −0.25.
        assert!((s(loss.clone()) + 0.25).abs() < 1e-6);
        let g = loss.backward().unwrap();
        let grad: Vec<f32> = g.get(logp.as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!(
            grad,
            vec![-0.25, 0.25],
            "descending raises the better caption's log p"
        );
    }
}
